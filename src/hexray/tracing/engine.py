"""The tracing engine: one filtered forward pass that captures exactly the hooks analyses need."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel
from hexray.tracing import sites


@dataclass(frozen=True)
class Trace:
    """What one forward pass saw. Tensors are on the CPU with the batch dimension removed."""

    model_name: str
    prompt: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]  # each token's character span in ``prompt``
    logits: torch.Tensor  # [pos, d_vocab]
    acts: Mapping[str, torch.Tensor] = field(repr=False)  # hook name -> [pos, ...] (patterns: [head, q, k])

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def tokenize_prompt(model: LoadedModel, prompt: str, *, prepend_bos: bool | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids (and character spans) for ``prompt``, with the user-facing checks."""
    if not prompt or not prompt.strip():
        raise HexRayError("the prompt is empty", hint="pass --prompt with some text")
    ids, offsets = model.encode_with_offsets(prompt, prepend_bos=prepend_bos)
    if not ids:
        raise HexRayError("the prompt produced no tokens", hint="pass --prompt with some text")
    if len(ids) > model.spec.n_ctx:
        raise HexRayError(
            f"the prompt is {len(ids)} tokens, longer than {model.name}'s context of {model.spec.n_ctx}",
            hint="shorten the prompt",
        )
    return ids, offsets


def run_trace(
    model: LoadedModel,
    prompt: str,
    hooks: Iterable[str],
    *,
    prepend_bos: bool | None = None,
) -> Trace:
    """Run ``prompt`` through the model once, caching only ``hooks`` (plus the final-norm scale)."""
    ids, offsets = tokenize_prompt(model, prompt, prepend_bos=prepend_bos)
    wanted = set(hooks) | {sites.FINAL_SCALE}
    unknown = wanted - set(model.bridge.hook_dict)
    if unknown:
        raise ValueError(f"hooks not in this model: {sorted(unknown)[:5]}")  # a HexRay bug, not user input
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        logits, cache = model.bridge.run_with_cache(tokens, names_filter=lambda name: name in wanted)
    acts = {name: cache[name][0].detach() for name in wanted if name in cache}
    return Trace(
        model_name=model.name,
        prompt=prompt,
        token_ids=tuple(ids),
        tokens=tuple(model.token_strs(ids)),
        offsets=tuple(offsets),
        logits=logits[0].detach().float(),
        acts=acts,
    )


def resolve_position(index: int, n_tokens: int) -> int:
    """An absolute position from a possibly negative ``--token-index``."""
    pos = index + n_tokens if index < 0 else index
    if not 0 <= pos < n_tokens:
        raise HexRayError(
            f"--token-index {index} is out of range for a prompt of {n_tokens} tokens",
            hint=f"use 0..{n_tokens - 1}, or -1..-{n_tokens} from the end",
        )
    return pos
