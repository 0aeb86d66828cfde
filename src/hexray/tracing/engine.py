"""The tracing engine: one filtered forward pass that captures exactly the hooks analyses need."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel
from hexray.tracing import sites


@dataclass(frozen=True)
class Trace:
    """What one forward pass saw: float32 tensors on the model's device, the batch dimension removed."""

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
    tokens = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        logits, cache = model.bridge.run_with_cache(tokens, names_filter=lambda name: name in wanted)
    acts = {name: cache[name][0].detach().float() for name in wanted if name in cache}  # float32 on the model's device
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


class IncrementalRun:
    """KV-cached forward passes over one growing sequence, with the cache owned here.

    The cache object is created once and handed to every step, and HF extends it in place, so
    nothing depends on which output field (``past_key_values`` before transformers 5.24, ``cache``
    after) carries it back. After each step the cache must hold exactly the tokens run so far;
    a step that ran without its context would otherwise look like a plausible wrong answer.
    """

    def __init__(self, model: LoadedModel):
        from transformers import DynamicCache

        hf = model.bridge.original_model
        self.model = model
        self.cache = DynamicCache(config=hf.config)
        # transformers renamed forward's ``past_key_values`` to ``cache`` (5.24); pass what it takes
        self._cache_kwarg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        self.n_tokens = 0

    def step(self, tokens: torch.Tensor, fwd_hooks: list) -> torch.Tensor:
        """Run ``tokens`` ([1, new]) after everything run before; the logits, [new, d_vocab]."""
        new = tokens.shape[1]
        with torch.inference_mode():
            logits = self.model.bridge.run_with_hooks(
                tokens.to(self.model.device), fwd_hooks=fwd_hooks, return_type="logits", use_cache=True, **{self._cache_kwarg: self.cache}
            )
        self.n_tokens += new
        if self.cache.get_seq_length() != self.n_tokens:  # a HexRay/library mismatch, never user input
            raise RuntimeError(f"the KV cache holds {self.cache.get_seq_length()} tokens after {self.n_tokens} were run")
        return logits[0]
