"""Streaming statistics of many units over a corpus, one batch of activations at a time.

:class:`Running` holds what the index keeps for each unit of one group (a layer's neurons, a
layer's heads, a dictionary's latents) while the corpus streams past; :func:`update` folds one
batch of activations into it and :func:`merge` folds another :class:`Running` (a second worker, a
second corpus slice). Everything is *exact and order-free*, so any split of the corpus into
batches or workers gives the same result bit for bit (given the same activations):

- **top-k examples** under a total order: activation descending, then the token's global index
  (``context * context_size + position``) ascending, which orders by context then position. Only
  positions with activation > 0 are examples (a unit that never fires has none).
- **max, mean, firing density** over counted positions (density: the fraction with activation > 0).
- **an activation histogram** in fixed log bins: bin 0 holds activations <= 0, bin 1 (0, 2^-8),
  bins 2..97 quarter-octaves from 2^-8 to 2^16 (edges at 1, 1.25, 1.5, 1.75 times a power of
  two: what a float's exponent and top two mantissa bits give, without a logarithm), bin 98
  everything from 2^16. Fixed bins need no first pass to find each unit's max, and merge by
  addition. It counts a deterministic 1-in-:data:`SAMPLE_EVERY` sample of the counted positions
  (the same positions for every unit); max, mean, density and the top examples use them all.
- **quantile samples**: from that same position sample, one example per octave of activation
  (:data:`N_BANDS` bands over the histogram's range), the one with the smallest hash priority:
  a uniform random pick within each band that is the same whichever order batches come in.

Positions are never copied out of the batch: masked sums and counts are matrix-vector products
with the counted mask as weights, and candidate examples are found per (context, unit) first, so a
batch costs a few passes over its activations (what keeps all 46,080 neurons of SmolLM2 cheap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAMPLE_EVERY = 8  # the histogram and quantile samples read 1 in 8 counted positions (by hash)
_Z0 = 119 << 2  # a float's bits >> 21 at 2^-8: the first quarter-octave bin's lower edge
N_BINS = 99  # [<= 0], (0, 2^-8), 96 quarter-octaves up to 2^16, [2^16, inf)
N_BANDS = 26  # quantile-sample bands: (0, 2^-8), 24 octaves up to 2^16, [2^16, inf)
_NONE = torch.iinfo(torch.int64).max  # an empty slot's global index (sorts after every real one)
_P = 2**31 - 1  # the hash's modulus (a Mersenne prime: products stay below 2^62)
_CANDIDATE_LIMIT = 8  # more than this many candidates per unit and slot: bound them by the batch's own k-th value first


def bin_edges() -> list[float]:
    """The histogram bins' lower edges (bin 0 is everything <= 0, its edge -inf; bin 1 starts just above 0)."""
    z = torch.arange(_Z0, _Z0 + N_BINS - 2, dtype=torch.int32) << 21
    return [-math.inf, 0.0, *z.view(torch.float32).tolist()]


def band_edges() -> list[float]:
    """The quantile-sample bands' lower edges: 0, then 2^-8, 2^-7, ... 2^16."""
    return [0.0] + [2.0**e for e in range(-8, 17)]


def priority(gidx: torch.Tensor) -> torch.Tensor:
    """A deterministic pseudo-random priority in [0, 2^31 - 1) per global token index (two Lehmer steps)."""
    h = (gidx % _P + 1) * 48271 % _P
    return h * 16807 % _P


def is_sampled(gidx: torch.Tensor) -> torch.Tensor:
    """Whether a position is in the 1-in-SAMPLE_EVERY sample the histogram and quantile samples read."""
    return priority(gidx) < _P // SAMPLE_EVERY


def histogram_bins(x: torch.Tensor) -> torch.Tensor:
    """Each activation's histogram bin (see the module docstring), int64 of ``x``'s shape."""
    z = (x.contiguous().view(torch.int32) >> 21).long()  # exponent and two mantissa bits; meaningful for x > 0
    return torch.where(x > 0, (z - _Z0 + 2).clamp(1, N_BINS - 1), 0)


def sample_bands(bins: torch.Tensor) -> torch.Tensor:
    """The quantile-sample band of each histogram bin: -1 for activations <= 0 (never sampled)."""
    return torch.where(bins >= 2, ((bins - 2) >> 2) + 1, bins - 1)  # a shift: four quarter-octave bins an octave


@dataclass(eq=False)
class Running:
    """One unit group's statistics so far (mutable: :func:`update` and :func:`merge` fill it in place)."""

    context_size: int
    before: int  # window: tokens kept before and after each example's position
    after: int
    top_val: torch.Tensor  # [U, k] float32, best first; -inf in empty slots
    top_gidx: torch.Tensor  # [U, k] int64 global token index; _NONE in empty slots
    top_win: torch.Tensor  # [U, k, W] float32 activations over the window (nan: outside the context or not counted)
    total: torch.Tensor  # [U] float64 sum of activations at counted positions
    fired: torch.Tensor  # [U] int64 counted positions with activation > 0
    counted: int  # counted positions seen
    hist: torch.Tensor  # [N_BINS, U] int64 over the sampled positions
    sampled: int  # sampled positions seen
    samp_key: torch.Tensor  # [N_BANDS, U] int64 priority << 32 | global index; _NONE when the band is empty
    samp_val: torch.Tensor  # [N_BANDS, U] float32
    samp_win: torch.Tensor  # [N_BANDS, U, W] float32

    @property
    def units(self) -> int:
        return int(self.top_val.shape[0])

    @property
    def k(self) -> int:
        return int(self.top_val.shape[1])

    @property
    def width(self) -> int:
        return self.before + 1 + self.after


def new_running(units: int, k: int, context_size: int, before: int, after: int, device: torch.device | str = "cpu") -> Running:
    w = before + 1 + after
    nan = float("nan")
    return Running(
        context_size, before, after,
        top_val=torch.full((units, k), -math.inf, device=device),
        top_gidx=torch.full((units, k), _NONE, dtype=torch.int64, device=device),
        top_win=torch.full((units, k, w), nan, device=device),
        total=torch.zeros(units, dtype=torch.float64, device=device),
        fired=torch.zeros(units, dtype=torch.int64, device=device),
        counted=0,
        hist=torch.zeros(N_BINS, units, dtype=torch.int64, device=device),
        sampled=0,
        samp_key=torch.full((N_BANDS, units), _NONE, dtype=torch.int64, device=device),
        samp_val=torch.zeros(N_BANDS, units, device=device),
        samp_win=torch.full((N_BANDS, units, w), nan, device=device),
    )


def update(run: Running, acts: torch.Tensor, counted: torch.Tensor, first_context: int) -> None:
    """Fold one batch into ``run``: ``acts`` [B, P, U] float32, ``counted`` [B, P] bool, contexts ``first_context``.. ."""
    B, P, U = acts.shape
    if P != run.context_size or U != run.units:
        raise ValueError(f"a batch of {tuple(acts.shape)} does not fit {run.units} units over contexts of {run.context_size}")  # a HexRay bug
    x2 = acts.reshape(B * P, U)  # a view: the hook's tensor is never copied whole
    w = counted.to(acts.dtype).reshape(1, B * P)
    gidx = (first_context + torch.arange(B, device=acts.device))[:, None] * P + torch.arange(P, device=acts.device)  # [B, P]

    # mean and density: the counted mask as weights of a matrix-vector product (masked sums without a copy)
    run.total += (w @ x2).squeeze(0).double()
    mask = torch.gt(x2, 0, out=torch.empty_like(x2))  # [B*P, U] 1.0 where the unit fires
    run.fired += (w @ mask).squeeze(0).round().long()
    run.counted += int(counted.sum())

    _update_top(run, acts, counted, gidx, mask)
    _update_samples(run, acts, counted, gidx)


def _threshold(run: Running) -> torch.Tensor:
    """[U] the least activation that could still enter each unit's top k: its k-th value, else the least positive float."""
    least = torch.tensor(torch.finfo(torch.float32).smallest_normal * 2.0**-23, device=run.top_val.device)  # the smallest float above 0
    return torch.maximum(run.top_val[:, -1], least)


def _update_top(run: Running, acts: torch.Tensor, counted: torch.Tensor, gidx: torch.Tensor, buf: torch.Tensor) -> None:
    B, P, U = acts.shape
    k = run.k
    x2 = acts.reshape(B * P, U)
    w3 = counted.to(acts.dtype)[:, None, :]  # [B, 1, P]
    thr = _threshold(run)
    per_ctx = torch.bmm(w3, torch.ge(x2, thr, out=buf).view(B, P, U)).squeeze(1)  # [B, U] candidates per context and unit
    if per_ctx.sum() > _CANDIDATE_LIMIT * k * U:  # early batches: bound by the batch's own k-th value first
        rows = counted.reshape(-1).nonzero().squeeze(1)
        if rows.numel() >= k:
            thr = torch.maximum(thr, x2.index_select(0, rows).topk(k, dim=0).values[-1])
            per_ctx = torch.bmm(w3, torch.ge(x2, thr, out=buf).view(B, P, U)).squeeze(1)
    pairs = (per_ctx > 0).nonzero()  # [n, 2] (context in batch, unit)
    if pairs.numel() == 0:
        return
    b, u = pairs[:, 0], pairs[:, 1]
    cols = acts[b, :, u]  # [n, P]: each pair's activations along its context
    ok = (cols >= thr[u][:, None]) & counted[b]
    i, p = ok.nonzero(as_tuple=True)
    cb, cu = b[i], u[i]
    merge_top(run, cu, cols[i, p], gidx[cb, p], window_acts(run, acts, counted, cb, p, cu))


def window_acts(run: Running, acts: torch.Tensor, counted: torch.Tensor, b: torch.Tensor, p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[n, W] unit ``u``'s activations around position ``p`` of batch context ``b`` (nan outside the context or not counted)."""
    _, P, U = acts.shape
    pos = p[:, None] + torch.arange(-run.before, run.after + 1, device=acts.device)  # [n, W]
    inside = (pos >= 0) & (pos < P)
    row = b[:, None] * P + pos.clamp(0, P - 1)  # flat (context, position) rows: one take() is faster than 3-way indexing
    vals = acts.reshape(-1).take(row * U + u[:, None])
    return torch.where(inside & counted.reshape(-1).take(row), vals, float("nan"))


def _lexsort(unit: torch.Tensor, value: torch.Tensor, gidx: torch.Tensor) -> torch.Tensor:
    """The order by unit ascending, then value descending, then global index ascending (stable sorts, last key first).

    Values are positive or -inf (an empty slot), so their float bits order them as integers: unit and
    value go in one int64 key.
    """
    bits = torch.where(value > 0, value.float(), 0.0).view(torch.int32).long()  # -inf (empty) sorts as 0, last
    key = unit.long() << 32 | (0x7FFFFFFF - bits)
    order = torch.argsort(gidx, stable=True)
    return order[torch.argsort(key[order], stable=True)]


def merge_top(run: Running, unit: torch.Tensor, value: torch.Tensor, gidx: torch.Tensor, win: torch.Tensor) -> None:
    """Merge candidate examples (``unit``, ``value``, ``gidx`` [n], ``win`` [n, W]) into ``run``'s top k under the total order."""
    if unit.numel() == 0:
        return
    k = run.k
    units = torch.unique(unit)  # [m] sorted
    old_val, old_gidx, old_win = run.top_val[units], run.top_gidx[units], run.top_win[units]  # [m, k], [m, k], [m, k, W]
    all_unit = torch.cat([units.repeat_interleave(k), unit])
    all_val = torch.cat([old_val.reshape(-1), value.to(old_val.dtype)])
    all_gidx = torch.cat([old_gidx.reshape(-1), gidx])
    all_win = torch.cat([old_win.reshape(-1, run.width), win.to(old_win.dtype)])
    order = _lexsort(all_unit, all_val, all_gidx)
    sorted_unit = all_unit[order]
    _, counts = torch.unique_consecutive(sorted_unit, return_counts=True)  # every unit in `units` has >= k entries
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts.repeat_interleave(counts)
    keep = rank < k
    order, rank, sorted_unit = order[keep], rank[keep], sorted_unit[keep]
    run.top_val[sorted_unit, rank] = all_val[order]
    run.top_gidx[sorted_unit, rank] = all_gidx[order]
    run.top_win[sorted_unit, rank] = all_win[order]


def _update_samples(run: Running, acts: torch.Tensor, counted: torch.Tensor, gidx: torch.Tensor) -> None:
    B, P, U = acts.shape
    rows = (counted & is_sampled(gidx)).reshape(-1).nonzero().squeeze(1)  # [R] flat rows of the sample
    if rows.numel() == 0:
        return
    xs = acts.reshape(B * P, U).index_select(0, rows)  # [R, U]: a small copy (1 in SAMPLE_EVERY rows)
    bins = histogram_bins(xs)
    run.hist.scatter_add_(0, bins, torch.ones_like(bins))
    run.sampled += int(rows.numel())
    g = gidx.reshape(-1)[rows]
    keys = (priority(g) << 32 | g)[:, None].expand(-1, U)  # [R, U]
    best = torch.cat([run.samp_key.new_full((1, U), _NONE), run.samp_key.clone()])  # row 0 takes activations <= 0
    best.scatter_reduce_(0, sample_bands(bins) + 1, keys, "amin")
    band, u = (best[1:] < run.samp_key).nonzero(as_tuple=True)
    if band.numel() == 0:
        return
    key = best[1:][band, u]
    row = (key & 0xFFFFFFFF) - gidx[0, 0]  # flat row in this batch
    b, p = row // P, row % P
    run.samp_key[band, u] = key
    run.samp_val[band, u] = acts[b, p, u]
    run.samp_win[band, u] = window_acts(run, acts, counted, b, p, u)


def merge(a: Running, b: Running) -> Running:
    """``a`` with ``b`` folded in (both over the same units and window; disjoint corpus slices)."""
    if (a.units, a.k, a.context_size, a.before, a.after) != (b.units, b.k, b.context_size, b.before, b.after):
        raise ValueError("cannot merge statistics of different unit groups")  # a HexRay bug
    filled = b.top_gidx != _NONE
    u = torch.arange(b.units, device=b.top_val.device)[:, None].expand_as(b.top_val)
    merge_top(a, u[filled], b.top_val[filled], b.top_gidx[filled], b.top_win[filled])
    a.total += b.total
    a.fired += b.fired
    a.counted += b.counted
    a.hist += b.hist
    a.sampled += b.sampled
    better = b.samp_key < a.samp_key
    a.samp_key = torch.where(better, b.samp_key, a.samp_key)
    a.samp_val = torch.where(better, b.samp_val, a.samp_val)
    a.samp_win = torch.where(better[..., None], b.samp_win, a.samp_win)
    return a


_TENSORS = ("top_val", "top_gidx", "top_win", "total", "fired", "hist", "samp_key", "samp_val", "samp_win")


def state_of(run: Running) -> dict:
    """``run`` as plain CPU tensors and ints (a checkpoint, or what a Ray worker sends back)."""
    return {"context_size": run.context_size, "before": run.before, "after": run.after, "counted": run.counted, "sampled": run.sampled,
            **{name: getattr(run, name).cpu() for name in _TENSORS}}


def from_state(state: dict, device: torch.device | str = "cpu") -> Running:
    """The :class:`Running` :func:`state_of` gave."""
    return Running(state["context_size"], state["before"], state["after"], counted=int(state["counted"]), sampled=int(state["sampled"]),
                   **{name: state[name].to(device) for name in _TENSORS})


@dataclass(frozen=True, eq=False)
class Finished:
    """A group's final statistics, on the CPU, ready to store."""

    max: torch.Tensor  # [U] the top activation (0 for a unit that never fires)
    mean: torch.Tensor  # [U] float64
    density: torch.Tensor  # [U] float64
    fired: torch.Tensor  # [U] int64
    counted: int
    top_val: torch.Tensor  # [U, k]
    top_gidx: torch.Tensor  # [U, k] (_NONE: empty)
    top_win: torch.Tensor  # [U, k, W]
    hist: torch.Tensor  # [U, N_BINS]
    sampled: int
    samp_gidx: torch.Tensor  # [U, N_BANDS] (_NONE: empty)
    samp_val: torch.Tensor  # [U, N_BANDS]
    samp_win: torch.Tensor  # [U, N_BANDS, W]


def finish(run: Running) -> Finished:
    n = max(run.counted, 1)
    top = run.top_val[:, 0]
    empty = run.samp_key == _NONE
    return Finished(
        max=torch.where(torch.isfinite(top), top, 0.0).cpu(),
        mean=(run.total / n).cpu(),
        density=(run.fired.double() / n).cpu(),
        fired=run.fired.cpu(),
        counted=run.counted,
        top_val=run.top_val.cpu(),
        top_gidx=run.top_gidx.cpu(),
        top_win=run.top_win.cpu(),
        hist=run.hist.T.contiguous().cpu(),
        sampled=run.sampled,
        samp_gidx=torch.where(empty, _NONE, run.samp_key & 0xFFFFFFFF).T.contiguous().cpu(),
        samp_val=run.samp_val.T.contiguous().cpu(),
        samp_win=run.samp_win.transpose(0, 1).contiguous().cpu(),
    )


def is_empty(gidx: torch.Tensor) -> torch.Tensor:
    return gidx == _NONE
