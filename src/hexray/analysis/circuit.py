"""A first-order circuit: the explained logit's strongest contributors, and theirs, level by level.

Level 0 is direct logit attribution (exact, with the final norm's scale frozen): the top ``k``
heads and MLPs by ``|DLA score|``, each with an edge into the logit weighted by that score.

Each further level expands a frontier of at most ``k`` nodes. A node ``v``'s *direct
contribution* is the linear readout DLA uses — its output at the explained position projected
on the target(−contrast) unembedding direction, every norm scale frozen at its cached value —
and one backward pass differentiates it with respect to every earlier component's output at
every position. The edge ``u -> v`` is input × gradient::

    score(u -> v) = sum_pos  out_u[pos] . d contribution_v / d out_u[pos]

the first-order change in ``v``'s contribution were ``u``'s output removed. "Earlier" is every
head and MLP of a lower layer, and for an MLP also the heads of its own layer. A head's output is
``z_h @ W_O[h]`` (so ``z_h . grad_z_h``, ``W_O`` being linear); an MLP's is ``hook_mlp_out``
without its bias, as in DLA (the bias is DLA's constant, never a component's). Only level 0 is
exact: every other edge is a linearisation, and removing ``u`` may change ``v`` by a different
amount (attention patterns and norms are not linear). Path patching will measure that.
"""

from __future__ import annotations

import torch

from hexray.analysis.attribution import (
    attribution_hooks,
    direct_logit_attribution,
    logit_direction,
    residual_direction,
    write_directions,
)
from hexray.analysis.results import Circuit, CircuitEdge, ComponentScore
from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel
from hexray.tracing import sites
from hexray.tracing.engine import Trace, run_trace, run_with_gradients
from hexray.tracing.sites import Component, Hook

MAX_K = 16  # parents kept per node, and nodes expanded per level
MAX_DEPTH = 4  # levels past the direct contributions: at most 1 + MAX_K * MAX_DEPTH passes


def check_circuit_size(k: int, depth: int) -> None:
    """A HexRayError unless ``k`` is 1..MAX_K and ``depth`` is 1..MAX_DEPTH (whole numbers)."""
    for name, value, top, what in (("k", k, MAX_K, "contributors kept per node"), ("depth", depth, MAX_DEPTH, "levels traced back past the logit's contributors")):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise HexRayError(
                f"{{field}} must be a whole number from 1 to {top}, not {value!r}",
                hint=f"{{field}} is how many {what}; each expanded node costs one forward and backward pass, try {5 if name == 'k' else 2}",
                field=name,
            )


def circuit(
    model: LoadedModel,
    prompt: str,
    *,
    target: str | None = None,
    contrast: str | None = None,
    position: int = -1,
    k: int = 5,
    depth: int = 2,
    prepend_bos: bool | None = None,
) -> Circuit:
    """The circuit behind the logit of ``target`` (minus ``contrast``'s) at ``position``.

    ``target`` and ``contrast`` are single tokens (``" Mary"``); ``target`` defaults to the
    model's prediction. Level 0 keeps the ``k`` strongest direct contributors (heads and MLPs);
    each of the next ``depth`` levels expands at most ``k`` nodes (the strongest reaching the level
    before, by ``|edge score|``) and keeps each one's ``k`` strongest parents.

    Cost: one forward pass for level 0, then one forward and one backward pass per expanded node:
    1 + (number of expanded nodes) passes, at most 1 + k·depth. Layer-0 heads read only the
    embeddings, so they are never expanded.
    """
    check_circuit_size(k, depth)
    target_id = model.single_token(target, role="target") if target is not None else None
    contrast_id = model.single_token(contrast, role="contrast") if contrast is not None else None
    trace = run_trace(model, prompt, attribution_hooks(model.spec, "head"), prepend_bos=prepend_bos)
    attribution = direct_logit_attribution(model, trace, position=position, target=target_id, contrast=contrast_id, granularity="head")
    pos = attribution.position
    dla = {c.component: c.score for c in attribution.components if c.component.kind in ("head", "mlp")}  # sorted by |score|

    u, _ = logit_direction(model, attribution.target.id, contrast_id)  # [d_model]
    d = residual_direction(model, trace, pos, u)  # [d_model], the final scale frozen
    readout = ContributionReadout(model, trace, pos, d)

    frontier = list(dla)[:k]
    edges = [CircuitEdge(c, None, dla[c], exact=True) for c in frontier]
    expanded: set[Component] = set()
    for _level in range(depth):
        reaching: dict[Component, float] = {}  # parent -> its strongest |edge score| at this level
        for v in frontier:
            if not has_parents(v):
                continue
            expanded.add(v)
            for parent, score in strongest_parents(model, trace, readout, v, k):
                edges.append(CircuitEdge(parent, v, score, exact=False))
                reaching[parent] = max(reaching.get(parent, 0.0), abs(score))
        candidates = [c for c in reaching if c not in expanded and has_parents(c)]
        frontier = sorted(candidates, key=lambda c: -reaching[c])[:k]
        if not frontier:
            break

    order: dict[Component, None] = {}
    for e in edges:
        order.setdefault(e.source)
        if e.destination is not None:
            order.setdefault(e.destination)
    L = model.spec.n_layers
    z = torch.stack([trace.acts[sites.head_z(layer)][pos] for layer in range(L)])  # [layers, heads, d_head]
    writes = torch.einsum("lhd,lhdm->lhm", z, torch.stack(model.W_O))  # [layers, heads, d_model]
    return Circuit(
        head_write_norm=writes.norm(dim=-1).cpu().numpy(),
        mlp_write_norm=torch.stack([trace.acts[sites.mlp_out(layer)][pos] for layer in range(L)]).norm(dim=-1).cpu().numpy(),
        ref=trace.ref,
        position=pos,
        target=attribution.target,
        contrast=attribution.contrast,
        value=attribution.value,
        nodes=tuple(ComponentScore(c, dla[c]) for c in order),
        edges=tuple(edges),
    )


def has_parents(c: Component) -> bool:
    """Whether any head or MLP writes before ``c`` reads: all but the layer-0 heads."""
    return c.layer > 0 or c.kind == "mlp"


def earlier_components(model: LoadedModel, v: Component) -> list[Component]:
    """Every head and MLP whose output ``v`` can read: lower layers, and for an MLP its own layer's heads."""
    head_layers = range(v.layer + 1 if v.kind == "mlp" else v.layer)
    heads = [sites.head(layer, h) for layer in head_layers for h in range(model.spec.n_heads)]
    return heads + [Component("mlp", layer) for layer in range(v.layer)]


class ContributionReadout:
    """A component's direct contribution at one position, as a differentiable function of its activation.

    The same linear readout DLA uses: ``z_h @ W_O[h] . d_attn`` for a head, ``mlp_out . d`` for an
    MLP (plus a constant), with the final norm's and any post-norm's scale frozen at ``trace``'s values.
    """

    def __init__(self, model: LoadedModel, trace: Trace, position: int, d: torch.Tensor):
        self.model, self.position = model, position
        self.d = d  # [d_model]
        self.d_attn, _ = write_directions(model, trace.acts, position, d)  # per layer [d_model]

    def __call__(self, v: Component, activation: torch.Tensor) -> torch.Tensor:
        """``activation``: ``v``'s hook, [pos, n_heads, d_head] (head) or [pos, d_model] (MLP); a scalar."""
        at = activation[self.position].float()
        if v.kind == "head":
            return at[v.head] @ self.model.W_O[v.layer][v.head] @ self.d_attn[v.layer]  # [d_head] @ [d_head, d_model] @ [d_model]
        return at @ self.d  # [d_model] @ [d_model]


def strongest_parents(model: LoadedModel, trace: Trace, readout: ContributionReadout, v: Component, k: int) -> list[tuple[Component, float]]:
    """``v``'s ``k`` earlier components with the largest ``|input × gradient|`` on its direct contribution (one backward pass)."""
    parents = earlier_components(model, v)
    hooks = {p.hook for p in parents} | {v.hook}

    def contribution(logits: torch.Tensor, acts: dict[Hook, torch.Tensor]) -> torch.Tensor:
        return readout(v, acts[v.hook])

    _, acts, grads = run_with_gradients(model, trace.token_ids, hooks, contribution, metric_reads_acts=True)
    scores = [(p, input_times_gradient(model, p, acts[p.hook], grads[p.hook])) for p in parents]
    scores.sort(key=lambda ps: -abs(ps[1]))
    return scores[:k]


def input_times_gradient(model: LoadedModel, u: Component, activation: torch.Tensor, grad: torch.Tensor) -> float:
    """``sum_pos out_u . grad``: head ``u`` from hook_z [pos, n_heads, d_head], an MLP from hook_mlp_out [pos, d_model]."""
    if u.kind == "head":
        return float((activation[:, u.head].double() * grad[:, u.head].double()).sum())
    out = activation.double()
    if not model.spec.post_norms:  # DLA's MLP component leaves out b_out (its constant); a post-norm's output has no separable bias
        out = out - model.b_out[u.layer].double()
    return float((out * grad.double()).sum())
