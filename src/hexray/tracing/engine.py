"""The tracing engine: every forward pass HexRay makes goes through this module or :mod:`.edits`.

- :func:`run_trace` — one prompt, caching exactly the hooks the analyses need;
- :func:`capture` / :func:`trace_prompts` — a batch of prompts (right-padded: attention is causal,
  so padding never reaches a real token), chunked to a memory budget, streamed chunk by chunk,
  optionally stopping after the last layer an analysis reads;
- :func:`run_with_gradients` — one forward and one backward pass to a scalar metric;
- :func:`run_recorded` — one prompt with edits, recording every hook asked for, optionally
  starting at a block from a recorded residual stream (the debugger);
- :class:`IncrementalRun` — KV-cached steps over one growing sequence (generation).

Runs with edits (patch, ablate, steer) are in :mod:`hexray.tracing.edits`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from hexray.errors import HexRayError, check_text
from hexray.models.loading import LoadedModel
from hexray.tracing import sites
from hexray.tracing.sites import Hook, parse_hook

DEFAULT_MEMORY_BUDGET = 1.5e9  # bytes of activations per chunk of a batch

_stop_check: ContextVar[Callable[[], None] | None] = ContextVar("hexray_stop_check", default=None)


@contextmanager
def cancellable(check: Callable[[], None]):
    """Within this block every forward pass calls ``check()`` before each block; whatever it raises stops the pass.

    The server passes its job's stop check, so a time limit or a closed socket frees the model
    within one block of one forward pass, not at the end of the request.
    """
    token = _stop_check.set(check)
    try:
        yield
    finally:
        _stop_check.reset(token)


def stop_hooks(model: LoadedModel) -> list[tuple[Hook, Callable]]:
    """Hooks that call the current stop check before every block (none outside :func:`cancellable`)."""
    check = _stop_check.get()
    if check is None:
        return []

    def before_block(x, hook=None):
        check()

    return [(sites.resid_pre(layer), before_block) for layer in range(model.spec.n_layers)]


def check_stop() -> None:
    """Between forward passes: the current stop check, if any."""
    check = _stop_check.get()
    if check is not None:
        check()


@dataclass(frozen=True)
class Trace:
    """What one forward pass saw: float32 tensors on the model's device, the batch dimension removed."""

    model_name: str
    prompt: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]  # each token's character span in ``prompt``
    logits: torch.Tensor | None  # [pos, d_vocab]; None when the run stopped before the unembedding
    acts: Mapping[str, torch.Tensor] = field(repr=False)  # hook name -> [pos, ...] (patterns: [head, q, k])

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def ref(self):
        """The prompt reference every result built from this trace shares."""
        from hexray.analysis.results import PromptRef

        return PromptRef(self.model_name, self.prompt, self.tokens, self.token_ids)


def tokenize_prompt(model: LoadedModel, prompt: str, *, prepend_bos: bool | None = None, field_name: str = "prompt") -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids (and character spans) for ``prompt``, with the user-facing checks."""
    if not prompt or not prompt.strip():
        raise HexRayError("{field}: the prompt is empty", hint="give {field} some text", field=field_name)
    check_text(prompt, field_name)
    ids, offsets = model.encode_with_offsets(prompt, prepend_bos=prepend_bos)
    if not ids:
        raise HexRayError("{field}: the prompt produced no tokens", hint="give {field} some text", field=field_name)
    if len(ids) > model.spec.n_ctx:
        raise HexRayError(
            f"{{field}}: the prompt is {len(ids)} tokens, longer than {model.name}'s context of {model.spec.n_ctx}", hint="shorten it", field=field_name,
        )
    return ids, offsets


def _check_hooks(model: LoadedModel, wanted: set[str]) -> None:
    unknown = wanted - set(model.bridge.hook_dict)
    if unknown:
        raise ValueError(f"hooks not in this model: {sorted(str(h) for h in unknown)[:5]}")  # a HexRay bug, not user input


def run_trace(
    model: LoadedModel,
    prompt: str,
    hooks: Iterable[str],
    *,
    prepend_bos: bool | None = None,
    on_layer: Callable[[int, Mapping[Hook, torch.Tensor]], None] | None = None,
) -> Trace:
    """Run ``prompt`` through the model once, caching only ``hooks`` (plus the final-norm scale).

    ``on_layer(layer, acts)`` is called as each block finishes, while the pass runs, with that
    block's ``resid_post`` and its cached attention and MLP outputs ([pos, ...], float32): what lets
    the server stream layers live.
    """
    ids, offsets = tokenize_prompt(model, prompt, prepend_bos=prepend_bos)
    wanted = {parse_hook(h) for h in hooks} | {sites.FINAL_SCALE}
    _check_hooks(model, wanted)
    logits, acts = capture(model, [ids], wanted, on_layer=on_layer)
    return Trace(
        model_name=model.name, prompt=prompt, token_ids=tuple(ids), tokens=tuple(model.token_strs(ids)),
        offsets=tuple(offsets), logits=logits[0], acts=acts[0],
    )


def capture(
    model: LoadedModel,
    batch: Sequence[Sequence[int]],
    hooks: Iterable[str],
    *,
    stop_after_layer: int | None = None,
    on_layer: Callable[[int, Mapping[Hook, torch.Tensor]], None] | None = None,
) -> tuple[list[torch.Tensor] | None, list[dict[Hook, torch.Tensor]]]:
    """One forward pass over token-id rows of any lengths: per row, logits [pos, d_vocab] and ``hooks`` [pos, ...].

    Rows are right-padded with their last token and trimmed back, so each row's activations are
    what it alone would give. ``stop_after_layer``: stop after that block (no logits, None).
    ``on_layer(layer, acts)``: called after each block with the first row's block outputs.
    """
    wanted = {parse_hook(h) for h in hooks}
    lengths = [len(r) for r in batch]
    width = max(lengths)
    tokens = torch.tensor([list(r) + [r[-1]] * (width - len(r)) for r in batch], device=model.device)
    stop = stop_after_layer + 1 if stop_after_layer is not None and stop_after_layer + 1 < model.spec.n_layers else None
    check_fits(model, width, wanted, rows=1)
    stops = stop_hooks(model) + (_layer_watch(model, wanted, lengths[0], on_layer) if on_layer is not None else [])
    with torch.inference_mode(), model.bridge.hooks(fwd_hooks=stops) if stops else nullcontext():
        out, cache = model.bridge.run_with_cache(tokens, names_filter=lambda name: name in wanted, stop_at_layer=stop)
    acts = []
    for row, n in enumerate(lengths):
        acts.append({h: _trim(h, cache[h][row], n).float() for h in wanted if h in cache})  # float32 on the model's device
    logits = None if stop is not None else [out[row, :n].float() for row, n in enumerate(lengths)]
    return logits, acts


LIVE_POINTS = ("attn_out", "mlp_out")  # what a block's live report carries besides its result (resid_post)


def _layer_watch(model: LoadedModel, wanted: set[Hook], n: int, on_layer) -> list[tuple[Hook, Callable]]:
    """Hooks that keep the first row's block outputs as they appear and report each finished block.

    ``on_layer(layer, acts)`` sees that block's ``resid_post`` and, where cached, its attention and
    MLP outputs; each block's are dropped once reported, so the watch holds one block at a time.
    """
    seen: dict[Hook, torch.Tensor] = {}

    def keep(name: Hook):
        def hook(x, hook=None):
            seen[name] = _trim(name, x[0].detach(), n).float()

        return hook

    def block_done(layer: int):
        def hook(x, hook=None):
            seen[sites.resid_post(layer)] = x[0, :n].detach().float()  # always: it is the block's result
            on_layer(layer, seen)
            seen.clear()

        return hook

    kept = [(h, keep(h)) for h in sorted(wanted) if h.point in LIVE_POINTS]
    return kept + [(sites.resid_post(layer), block_done(layer)) for layer in range(model.spec.n_layers)]


def run_recorded(
    model: LoadedModel,
    token_ids: Sequence[int],
    hooks: Iterable[str],
    *,
    edits: Sequence = (),
    start_layer: int = 0,
    resid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[Hook, torch.Tensor]]:
    """One prompt's pass with ``edits`` applied, recording ``hooks`` ([pos, ...]) and the logits [pos, d_vocab].

    With ``start_layer`` > 0 the pass starts at that block from ``resid`` ([pos, d_model], the
    stream entering it, e.g. recorded by an earlier pass): an edit at layer L re-runs only the
    blocks from L on (what the debugger's edit-and-continue costs). Hooks below ``start_layer``
    are not recorded. ``edits``: :class:`hexray.tracing.edits.Edit` values.
    """
    wanted = sorted({parse_hook(h) for h in hooks})
    n = len(token_ids)
    check_fits(model, n, wanted, rows=1)
    acts: dict[Hook, torch.Tensor] = {}

    def edit_hook(edit):
        def hook(x, hook=None):
            mask, values = edit.mask.to(x.device), edit.values.to(x.device, x.dtype)
            return x + torch.where(mask, values, torch.zeros_like(x)) if edit.op == "add" else torch.where(mask, values, x)

        return hook

    def keep(name: Hook):
        def hook(x, hook=None):
            acts[name] = _trim(name, x[0].detach(), n).float()

        return hook

    # edits first: a hook point runs its hooks in order, so what is recorded is the edited value
    fwd = [(parse_hook(e.hook), edit_hook(e)) for e in edits] + [(h, keep(h)) for h in wanted] + stop_hooks(model)
    if start_layer > 0:
        if resid is None:
            raise ValueError("start_layer needs the residual stream entering that block")  # a HexRay bug
        inputs = resid[None].to(model.device, model.dtype)
    else:
        inputs = torch.tensor([list(token_ids)], device=model.device)
    with torch.inference_mode(), _blocks_from(model, start_layer):
        logits = model.bridge.run_with_hooks(inputs, fwd_hooks=fwd, start_at_layer=start_layer if start_layer > 0 else None)
    return logits[0].float(), acts


@contextmanager
def _blocks_from(model: LoadedModel, start: int):
    """Within this block the model's own layer loop holds only blocks ``start``.. .

    The bridge's ``start_at_layer`` injects the residual at block ``start`` but still runs every
    block before it and throws their output away (measured: resuming at block 23 of 30 cost a full
    pass); the blocks before ``start`` are removed from the loop for the call instead.
    """
    found = _block_list(model) if start > 0 else None
    if found is None:
        yield
        return
    parent, name, blocks = found
    setattr(parent, name, torch.nn.ModuleList(list(blocks)[start:]))
    try:
        yield
    finally:
        setattr(parent, name, blocks)


def _block_list(model: LoadedModel):
    """(parent module, attribute, ModuleList) of the HF model's list that holds the bridge's blocks, or None."""
    blocks = list(model.bridge.blocks)
    for parent in model.bridge.original_model.modules():
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == len(blocks) and all(a is b for a, b in zip(child, blocks)):
                return parent, name, child
    return None


def run_reduced(
    model: LoadedModel,
    batch: torch.Tensor,
    reducers: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    *,
    stop_after_layer: int | None = None,
) -> dict[Hook, torch.Tensor]:
    """One forward pass over token ids [batch, pos] keeping only ``reducer(activation)`` at each hook.

    The activation ([batch, ...], float32) is reduced inside the pass and dropped, so memory holds
    one layer's activation at a time, never every layer's (a pattern of 1024 tokens is 38 MB a head
    layer; thirty of them would be over a gigabyte).
    """
    out: dict[Hook, torch.Tensor] = {}

    def reducer_hook(name: Hook, reduce):
        def hook(x, hook=None):
            out[name] = reduce(x.detach().float())

        return hook

    hooks = [(parse_hook(h), fn) for h, fn in reducers.items()]
    check_fits(model, batch.shape[1], [hooks[0][0]] if hooks else [], rows=1)
    stop = stop_after_layer + 1 if stop_after_layer is not None and stop_after_layer + 1 < model.spec.n_layers else None
    with torch.inference_mode():
        model.bridge.run_with_hooks(
            batch.to(model.device), fwd_hooks=[(h, reducer_hook(h, fn)) for h, fn in hooks] + stop_hooks(model), stop_at_layer=stop, use_cache=False,
        )
    return out


def run_rewritten(
    model: LoadedModel,
    batch: torch.Tensor,
    rewrites: Mapping[str, Callable[[torch.Tensor], torch.Tensor | None]],
) -> torch.Tensor:
    """Logits [batch, pos, d_vocab] (float32) of one pass over token ids [batch, pos] with ``rewrites`` at their hooks.

    A rewrite returns the activation's replacement, or None to leave it (an observer: a transcoder
    splice reads the MLP's input at one hook and replaces its output at another). Hooks run in the
    order of ``rewrites``.
    """

    def hook_of(fn):
        def hook(x, hook=None):
            return fn(x)

        return hook

    with torch.inference_mode():
        logits = model.bridge.run_with_hooks(
            batch.to(model.device), fwd_hooks=[(parse_hook(h), hook_of(fn)) for h, fn in rewrites.items()] + stop_hooks(model), use_cache=False,
        )
    return logits.float()


def _trim(hook: Hook, act: torch.Tensor, n: int) -> torch.Tensor:
    """One row's activation without the padding: patterns [head, q, k] on both axes, the rest on positions."""
    return act[:, :n, :n] if hook.point == "pattern" else act[:n]


def row_bytes(model: LoadedModel, n_tokens: int, hooks: Iterable[str] = ()) -> int:
    """Bytes one row of ``n_tokens`` needs: the forward's transient activations plus the cached ``hooks``."""
    s = model.spec
    # eager attention holds about eight [heads, q, k] tensors' worth at its peak (scores, mask, softmax, hooks),
    # measured on SmolLM2 at 1024 tokens; the rest is the residual stream, MLP and per-head values
    per_token = 4 * (8 * s.d_model + 4 * s.d_mlp + 8 * s.n_heads * n_tokens + 4 * s.n_heads * s.d_head)
    widths = {"z": s.n_heads * s.d_head, "v": s.n_kv_heads * s.d_head, "pattern": s.n_heads * n_tokens, "mlp_post": s.d_mlp}
    cached = sum(4 * widths.get(parse_hook(h).point, s.d_model) for h in hooks)
    return (per_token + cached) * n_tokens


def memory_budget() -> float:
    """Bytes of activations one chunk of a batch may take: ``HEXRAY_MEMORY_BUDGET`` (e.g. ``4e9``), else 1.5 GB."""
    import os

    try:
        return float(os.environ.get("HEXRAY_MEMORY_BUDGET") or DEFAULT_MEMORY_BUDGET)
    except ValueError:
        raise HexRayError(f"HEXRAY_MEMORY_BUDGET={os.environ['HEXRAY_MEMORY_BUDGET']!r} is not a number of bytes", hint="e.g. 4e9") from None


def rows_per_chunk(model: LoadedModel, n_tokens: int, hooks: Iterable[str] = (), budget: float | None = None) -> int:
    """How many rows of ``n_tokens`` fit ``budget`` bytes (default :func:`memory_budget`); at least one."""
    budget = memory_budget() if budget is None else budget
    return int(max(1, min(1024, budget // row_bytes(model, n_tokens, hooks))))


def _bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_fits(model: LoadedModel, n_tokens: int, hooks: Iterable[str] = (), *, rows: int = 1) -> None:
    """A HexRayError (413) before any work when even ``rows`` rows cannot fit the memory budget."""
    need, budget = rows * row_bytes(model, n_tokens, hooks), memory_budget()
    if need > budget:
        raise HexRayError(
            f"this request needs about {_bytes(need)} of activations, over the {_bytes(budget)} budget",
            hint="ask for less (a shorter prompt, fewer or shorter sequences), or raise HEXRAY_MEMORY_BUDGET", http_status=413,
        )


def trace_prompts(
    model: LoadedModel,
    prompts: Iterable[str],
    hooks: Iterable[str],
    *,
    prepend_bos: bool | None = None,
    batch_size: int | None = None,
    stop_after_layer: int | None = None,
    field_name: str = "prompts",
) -> Iterator[Trace]:
    """Stream :class:`Trace` s of many prompts, run in batches (default: what fits the memory budget).

    Prompts are taken from ``prompts`` lazily, a chunk at a time, so a corpus never sits in memory.
    With ``stop_after_layer`` the traces have no logits (and no final-norm scale).
    """
    wanted = {parse_hook(h) for h in hooks} | ({sites.FINAL_SCALE} if stop_after_layer is None else set())
    _check_hooks(model, wanted)
    pending: list[tuple[str, list[int], list[tuple[int, int]]]] = []
    index = 0

    def flush() -> Iterator[Trace]:
        logits, acts = capture(model, [ids for _, ids, _ in pending], wanted, stop_after_layer=stop_after_layer)
        for row, (prompt, ids, offsets) in enumerate(pending):
            yield Trace(model.name, prompt, tuple(ids), tuple(model.token_strs(ids)), tuple(offsets), None if logits is None else logits[row], acts[row])
        pending.clear()

    for prompt in prompts:
        ids, offsets = tokenize_prompt(model, prompt, prepend_bos=prepend_bos, field_name=f"{field_name}[{index}]")
        index += 1
        pending.append((prompt, ids, offsets))
        longest = max(len(p[1]) for p in pending)
        if len(pending) >= (batch_size or rows_per_chunk(model, longest, wanted)):
            yield from flush()
    if pending:
        yield from flush()


def run_with_gradients(
    model: LoadedModel, token_ids: Sequence[int], hooks: Iterable[str], metric: Callable[..., torch.Tensor], *, metric_reads_acts: bool = False
) -> tuple[torch.Tensor, dict[Hook, torch.Tensor], dict[Hook, torch.Tensor]]:
    """One forward and one backward pass of ``metric(logits [pos, d_vocab])`` (a scalar).

    With ``metric_reads_acts`` it is ``metric(logits, acts)``, ``acts`` being ``hooks``'
    activations [pos, ...] still in the graph, so the metric may be a function of them.
    Returns (logits [pos, d_vocab], activations, d metric / d activation) at ``hooks``, without
    the batch dimension. Gradients flow to the activations only, never to the weights.
    """
    wanted = sorted({parse_hook(h) for h in hooks})
    acts: dict[Hook, torch.Tensor] = {}
    first = sites.resid_pre(0)

    def keeper(name: Hook):
        def keep(x: torch.Tensor, hook) -> torch.Tensor:
            if name == first:  # a leaf: everything downstream is differentiable in it
                x = x.detach().requires_grad_(True)
            acts[name] = x
            return x  # returned, so the stored tensor is the one the model goes on with

        return keep

    with torch.enable_grad():
        tokens = torch.tensor([list(token_ids)], device=model.device)
        logits = model.bridge.run_with_hooks(tokens, fwd_hooks=[(n, keeper(n)) for n in sorted({*wanted, first})] + stop_hooks(model), use_cache=False)
        value = metric(logits[0], {n: acts[n][0] for n in wanted}) if metric_reads_acts else metric(logits[0])
        grads = torch.autograd.grad(value, [acts[n] for n in wanted])
    return (
        logits[0].detach().float(),
        {n: acts[n][0].detach().float() for n in wanted},
        {n: g[0].detach().float() for n, g in zip(wanted, grads)},
    )


def resolve_position(index: int, n_tokens: int, *, field_name: str = "token_index") -> int:
    """An absolute position from a possibly negative index."""
    pos = index + n_tokens if index < 0 else index
    if not 0 <= pos < n_tokens:
        raise HexRayError(
            f"{{field}} {index} is out of range for a prompt of {n_tokens} tokens",
            hint=f"use 0..{n_tokens - 1}, or -1..-{n_tokens} from the end", field=field_name,
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

    def step(self, tokens: torch.Tensor, hooks: Iterable[str] = ()) -> tuple[torch.Tensor, dict[Hook, torch.Tensor]]:
        """Run ``tokens`` ([1, new]) after everything run before: (logits [new, d_vocab], ``hooks`` [new, ...]).

        Patterns come as [heads, new, keys] (keys: every token so far, or a sliding window's).
        """
        new = tokens.shape[1]
        store: dict[Hook, torch.Tensor] = {}

        def keeper(name: Hook):
            def keep(x: torch.Tensor, hook) -> None:
                store[name] = x[0].detach().float()

            return keep

        with torch.inference_mode():
            logits = self.model.bridge.run_with_hooks(
                tokens.to(self.model.device), fwd_hooks=[(h, keeper(h)) for h in {parse_hook(h) for h in hooks}] + stop_hooks(self.model),
                return_type="logits", use_cache=True, **{self._cache_kwarg: self.cache},
            )
        self.n_tokens += new
        if self.cache.get_seq_length() != self.n_tokens:  # a HexRay/library mismatch, never user input
            raise RuntimeError(f"the KV cache holds {self.cache.get_seq_length()} tokens after {self.n_tokens} were run")
        return logits[0], store
