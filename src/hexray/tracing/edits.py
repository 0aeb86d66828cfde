"""The edit runner: many interventions on one prompt in one batched forward pass.

Patching, ablation, steering and (later) dictionary splices are all *edits*: values passed to this
runner, never in-place changes to the model. A *variant* is a set of :class:`Edit` s: at a hook,
replace the activation where ``mask`` is true with ``values`` (or add ``values`` there). :func:`run_variants` runs every variant of a prompt together:

- The batch starts as a single row (the unedited prompt) and **grows at each layer where a variant's
  first edit is**: a variant that first edits layer L shares the computation of layers 0..L-1 with
  the unedited row, so a sweep over all layers costs about half of a flat batch. Causal attention
  and broadcast masks/rotary tables make the extra rows exact copies of the unedited run up to L.
- The pass stops after the last block and keeps the residual stream at one position, so no
  vocabulary-sized logits are built per variant (the caller projects onto the directions it needs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from hexray.models.loading import LoadedModel
from hexray.tracing import sites
from hexray.tracing.engine import rows_per_chunk, stop_hooks
from hexray.tracing.sites import parse_hook


@dataclass(frozen=True, eq=False)
class Edit:
    """Replace the activation at ``hook`` where ``mask`` holds: ``act = where(mask, values, act)``;
    with ``op="add"`` (steering, adding a vector): ``act = act + where(mask, values, 0)``.

    ``mask`` and ``values`` are shaped like the activation without its batch dimension, or
    broadcast to it: e.g. ``[pos, n_heads, 1]`` for ``hook_z``, ``[pos, 1]`` for the residual stream.
    """

    hook: str
    mask: torch.Tensor  # bool
    values: torch.Tensor
    op: Literal["replace", "add"] = "replace"

    @property
    def layer(self) -> int:
        layer = parse_hook(self.hook).layer
        if layer is None:
            raise ValueError(f"edits must be at block hooks, got {self.hook}")  # a HexRay bug
        return layer


Variant = tuple[Edit, ...]


def site_mask(unit: int | None, position: int | None, shape: Sequence[int]) -> torch.Tensor:
    """Where a site lives in an activation of ``shape`` ([pos, units, ...] or [pos, width]).

    A unit (head, neuron, feature: ``Component.unit``) is an index on axis 1: heads give
    [pos, n_heads, 1], neurons [pos, d_mlp]; a whole vector (``unit=None``) gives [pos, 1].
    ``position=None``: every position.
    """
    rows = slice(None) if position is None else slice(position, position + 1)
    if unit is None:
        mask = torch.zeros(shape[0], 1, dtype=torch.bool)
        mask[rows] = True
    else:
        mask = torch.zeros(shape[0], shape[1], *([1] * (len(shape) - 2)), dtype=torch.bool)
        mask[rows, unit] = True
    return mask


class _Done(Exception):
    """Raised by the read-out hook: nothing after the last block is needed."""


def start_layer(variant: Variant) -> int:
    return min((e.layer for e in variant), default=0)


def run_variants(
    model: LoadedModel,
    token_ids: Sequence[int],
    variants: Sequence[Variant],
    *,
    read_position: int = -1,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The final residual stream at ``read_position`` for every variant: [n_variants, d_model].

    Variants run in chunks of ``batch_size`` (default: what fits the memory budget).
    An empty variant gives the unedited run.
    """
    n = len(variants)
    out = torch.empty(n, model.spec.d_model, device=model.device)
    if n == 0:
        return out
    fits = rows_per_chunk(model, len(token_ids))
    size = min(batch_size, fits) if batch_size else fits  # a larger batch_size never passes the memory budget
    order = sorted(range(n), key=lambda i: start_layer(variants[i]))  # chunks of neighbouring start layers
    tokens = torch.tensor([list(token_ids)], device=model.device)
    done = 0
    for lo in range(0, n, size):
        idx = order[lo : lo + size]
        out[idx] = _run_chunk(model, tokens, [variants[i] for i in idx], read_position)
        done += len(idx)
        if progress is not None:
            progress(done, n)
    return out


def _run_chunk(model: LoadedModel, tokens: torch.Tensor, chunk: list[Variant], read_position: int) -> torch.Tensor:
    """One forward pass for ``chunk`` (sorted by start layer): [len(chunk), d_model]."""
    n_layers = model.spec.n_layers
    starts = [start_layer(v) for v in chunk]
    last_join = starts[-1]
    joins: dict[int, int] = {}
    for s in starts:
        joins[s] = joins.get(s, 0) + 1
    edits_at: dict[str, list[tuple[int, Edit]]] = {}
    for row, variant in enumerate(chunk):
        for edit in variant:
            edits_at.setdefault(edit.hook, []).append((row, edit))

    def rows_before(layer: int) -> tuple[int, int]:
        """(variant rows present, leading unedited row present?) inside ``layer``, after its join."""
        present = sum(1 for s in starts if s <= layer)
        return present, int(layer < last_join)

    def apply_edits(x: torch.Tensor, hook: str, layer: int) -> torch.Tensor:
        present, offset = rows_before(layer)
        act_shape = x.shape[1:]
        replacing = [(row, e) for row, e in edits_at[hook] if e.op == "replace"]
        new = x[offset:]
        if replacing:
            mask = torch.zeros((present, *act_shape), dtype=torch.bool, device=x.device)
            shared = _shared_values(replacing)
            values = None if shared is not None else torch.zeros((present, *act_shape), dtype=x.dtype, device=x.device)
            for row, edit in replacing:
                edit_mask = edit.mask.to(x.device).expand(act_shape)
                mask[row] |= edit_mask
                if values is not None:  # several edits in one row keep their own values
                    values[row] = torch.where(edit_mask, edit.values.to(x.device, x.dtype).expand(act_shape), values[row])
            new = torch.where(mask, shared.to(x.device, x.dtype) if shared is not None else values, new)
        for row, edit in edits_at[hook]:
            if edit.op == "add":  # after any replacement in the same row
                added = torch.where(edit.mask.to(x.device).expand(act_shape), edit.values.to(x.device, x.dtype).expand(act_shape), 0)
                new = torch.cat([new[:row], (new[row] + added)[None], new[row + 1 :]])
        return torch.cat([x[:offset], new]) if offset else new

    def make_hook(name: str, layer: int, grow: int, read: bool):
        def fn(x: torch.Tensor, hook=None):
            if grow:  # x is [unedited, variants so far]; new variants start as copies of the unedited row
                base = x[:1]
                keep_base = [base] if layer < last_join else []
                x = torch.cat([*keep_base, x[1:], base.expand(grow, *x.shape[1:])])
            if name in edits_at:
                x = apply_edits(x, name, layer)
            if read:
                raise _Done(x[:, read_position].detach().clone())
            return x

        return fn

    final = sites.resid_post(n_layers - 1)
    hook_names = set(edits_at) | {sites.resid_pre(layer) for layer in joins} | {final}
    fwd_hooks = []
    for hook in sorted(hook_names):
        layer = parse_hook(hook).layer
        grow = joins.get(layer, 0) if hook == sites.resid_pre(layer) else 0
        fwd_hooks.append((hook, make_hook(hook, layer, grow, hook == final)))
    with torch.inference_mode():
        try:
            model.bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks + stop_hooks(model), use_cache=False)
        except _Done as stop:
            return stop.args[0].float()
    raise RuntimeError("the read-out hook never fired")  # a HexRay bug


def _shared_values(edits: list[tuple[int, Edit]]) -> torch.Tensor | None:
    """The one ``values`` tensor every edit here uses (patching from one source run), else None."""
    first = edits[0][1].values
    return first if all(e.values is first for _, e in edits) else None
