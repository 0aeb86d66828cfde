"""The logit lens: read each layer's residual stream through the final norm and unembedding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hexray.analysis.attribution import token_score
from hexray.analysis.results import LensRow, LogitLens, ResidualTrace, TokenScore
from hexray.models.loading import LoadedModel, ModelSpec
from hexray.tracing import sites
from hexray.tracing.engine import Trace, resolve_position
from hexray.tracing.sites import Hook

if TYPE_CHECKING:  # features.tuned_lens imports this module
    from hexray.features.tuned_lens import TunedLens


def lens_hooks(spec: ModelSpec) -> set[str]:
    return set(sites.residual_stream(spec))


def row_labels(spec: ModelSpec) -> tuple[str, ...]:
    """Residual-stream rows: after the embeddings, then after each block."""
    return ("embed", *(f"L{layer}" for layer in range(spec.n_layers)))


def stacked_residual(model: LoadedModel, trace: Trace) -> torch.Tensor:
    """The residual stream at every depth: [n_layers + 1, pos, d_model]."""
    return torch.stack([trace.acts[name] for name in sites.residual_stream(model.spec)])


def lens_logits(model: LoadedModel, resid: torch.Tensor) -> torch.Tensor:
    """Logits the model would output from ``resid`` [..., d_model] -> [..., d_vocab].

    Uses the model's own final-norm module, so every norm variant is applied as the model does.
    """
    with torch.inference_mode():
        return model.apply_final_norm(resid) @ model.W_U + model.b_U


def logit_lens(
    model: LoadedModel, trace: Trace, *, position: int = -1, target: int | None = None, k: int = 5, tuned: TunedLens | None = None,
) -> LogitLens:
    """Per layer, the top-``k`` tokens at ``position`` and the rank and probability of ``target``.

    ``target`` defaults to the model's final prediction at ``position``. With ``tuned``, each row is
    read through that tuned lens's translator first (same rows; the final row is unchanged).
    """
    pos = resolve_position(position, trace.n_tokens)
    target_id = int(trace.logits[pos].argmax()) if target is None else int(target)
    resid = stacked_residual(model, trace)[:, pos]  # [rows, d_model]
    if tuned is None:
        logits = lens_logits(model, resid)  # [rows, d_vocab]
    else:
        from hexray.features.tuned_lens import tuned_logits

        logits = tuned_logits(model, tuned, resid)
    probs = torch.softmax(logits.double(), dim=-1)
    top_p, top_i = probs.topk(min(k, probs.shape[-1]), dim=-1)
    ranks = (logits > logits[:, target_id : target_id + 1]).sum(-1)  # tokens strictly above target
    rows = []
    for r, label in enumerate(row_labels(model.spec)):
        top = tuple(
            TokenScore(model.token_str(i), int(i), float(logits[r, i]), float(p))
            for p, i in zip(top_p[r].tolist(), top_i[r].tolist())
        )
        rows.append(LensRow(label, top, int(ranks[r]), float(probs[r, target_id])))
    return LogitLens(position=pos, target=token_score(model, trace.logits[pos], target_id), rows=tuple(rows))


def next_token_predictions(model: LoadedModel, trace: Trace, *, k: int = 5) -> tuple[tuple[TokenScore, ...], ...]:
    """At every position, the model's top-``k`` next tokens: [pos][k] (what the lab's token strip shows)."""
    probs = torch.softmax(trace.logits.double(), dim=-1)  # [pos, d_vocab]
    top_p, top_i = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return tuple(
        tuple(TokenScore(model.token_str(i), int(i), float(trace.logits[pos, i]), float(p)) for p, i in zip(ps, ids))
        for pos, (ps, ids) in enumerate(zip(top_p.tolist(), top_i.tolist()))
    )


def residual_hooks(spec: ModelSpec) -> set[str]:
    hooks = lens_hooks(spec)
    for layer in range(spec.n_layers):
        hooks |= {sites.attn_out(layer), sites.mlp_out(layer)}
    return hooks


def residual_trace(model: LoadedModel, trace: Trace, *, lens_positions: Sequence[int] | None = None) -> ResidualTrace:
    """Residual norms, per-block write norms and logit-lens top tokens at every layer and position.

    The lens costs a [pos, d_model] x [d_model, d_vocab] product per layer (seconds for hundreds of
    tokens on a CPU), so ``lens_positions`` can limit it to some positions; the norms cover all.
    """
    spec = model.spec
    resid = stacked_residual(model, trace)  # [rows, pos, d_model]
    positions = tuple(range(trace.n_tokens)) if lens_positions is None else tuple(lens_positions)
    attn = torch.stack([trace.acts[sites.attn_out(layer)] for layer in range(spec.n_layers)])
    mlp = torch.stack([trace.acts[sites.mlp_out(layer)] for layer in range(spec.n_layers)])
    top_tokens, top_probs = [], []
    for row in resid[:, list(positions)]:  # one row at a time keeps memory at [pos, d_vocab]
        logits = lens_logits(model, row)
        best, i = logits.max(dim=-1)
        top_tokens.append(tuple(model.token_strs(i.tolist())))
        top_probs.append(torch.exp(best - torch.logsumexp(logits, dim=-1)))  # softmax at the max only
    return ResidualTrace(
        ref=trace.ref,
        row_labels=row_labels(spec),
        resid_norm=resid.norm(dim=-1).cpu().numpy(),
        attn_delta_norm=attn.norm(dim=-1).cpu().numpy(),
        mlp_delta_norm=mlp.norm(dim=-1).cpu().numpy(),
        lens_top_tokens=tuple(top_tokens),
        lens_top_probs=torch.stack(top_probs).cpu().numpy(),
        lens_positions=positions,
    )


@dataclass(frozen=True)
class LayerSnapshot:
    """One block's result, read while the forward pass is still running (what the lab streams).

    ``lens`` is the lens at the explained position only (one vocabulary product a layer: the
    whole grid comes with the finished analysis); ``target_rank`` only when the target was given,
    since the default target, the prediction, is known only after the last layer.
    """

    layer: int
    n_layers: int
    position: int
    resid_norm: np.ndarray  # [pos]: |resid| after the block
    attn_norm: np.ndarray | None  # [pos]: |attention output| (None when the residual analysis is off)
    mlp_norm: np.ndarray | None  # [pos]
    lens: tuple[TokenScore, ...]  # top tokens at ``position`` after the block
    target_rank: int | None
    target_prob: float | None


def layer_snapshot(model: LoadedModel, layer: int, acts: Mapping[Hook, torch.Tensor], *, position: int = -1, target: int | None = None, k: int = 5) -> LayerSnapshot:
    """What ``acts`` (the hooks a running pass has seen) say about block ``layer``."""
    resid = acts[sites.resid_post(layer)]  # [pos, d_model]
    pos = resolve_position(position, resid.shape[0])
    attn, mlp = acts.get(sites.attn_out(layer)), acts.get(sites.mlp_out(layer))
    with torch.inference_mode():
        logits = lens_logits(model, resid[pos])  # [d_vocab]
        probs = torch.softmax(logits.double(), dim=-1)
        top_p, top_i = probs.topk(min(k, probs.shape[-1]))
    top = tuple(TokenScore(model.token_str(i), int(i), float(logits[i]), float(p)) for p, i in zip(top_p.tolist(), top_i.tolist()))
    return LayerSnapshot(
        layer=layer, n_layers=model.spec.n_layers, position=pos,
        resid_norm=resid.norm(dim=-1).cpu().numpy(),
        attn_norm=None if attn is None else attn.norm(dim=-1).cpu().numpy(),
        mlp_norm=None if mlp is None else mlp.norm(dim=-1).cpu().numpy(),
        lens=top,
        target_rank=None if target is None else int((logits > logits[target]).sum()),
        target_prob=None if target is None else float(probs[target]),
    )
