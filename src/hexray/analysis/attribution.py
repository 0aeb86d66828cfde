"""Direct logit attribution, exact through the final norm.

The logit (difference) at position ``p`` is linear in the final residual stream once the final
norm's scale at ``p`` is fixed to its cached value::

    value = norm(resid)_p . u + b_U[t] - b_U[c],      u = W_U[:, t] - W_U[:, c]
          = sum_components  component_p . d  +  constant,   d = centre(w_ln * u) / scale_p

(``centre`` subtracts the mean for LayerNorm; RMSNorm has none). The components are the
embeddings, each attention head (``z_h @ W_O[h]``) or layer, and each MLP layer or neuron
(``post_n * W_out[n]``); every bias (attention ``b_O``, MLP ``b_out``, the norm's bias, ``b_U``) is
the constant, reported as its own ``bias`` component. The parts therefore sum to the logit.

Models with post-norms (Gemma 2/3) normalise what attention and the MLP write before it joins the
residual stream. With that norm's scale at ``p`` fixed to its cached value it is linear too, so a
head's share is ``z_h W_O[h] . (w_post * d / scale_post)``, exactly like the final norm.

With logit soft-capping (``logit = cap * tanh(z / cap)``) the components add up to the pre-cap
logit ``z``, which is what is explained (the capped logit is not linear in anything).
"""

from __future__ import annotations

import torch

from hexray.analysis.results import GRANULARITIES, Attribution, ComponentScore, Granularity, TokenScore
from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel, ModelSpec
from hexray.tracing import sites
from hexray.tracing.engine import Trace, resolve_position
from hexray.tracing.sites import Component


def attribution_hooks(spec: ModelSpec, granularity: Granularity) -> set[str]:
    """The hooks :func:`direct_logit_attribution` reads at ``granularity``."""
    check_granularity(granularity)
    hooks = {sites.EMBED, sites.FINAL_SCALE} | ({sites.POS_EMBED} if spec.pos_embed else set())
    for layer in range(spec.n_layers):
        hooks.add(sites.attn_out(layer) if granularity == "layer" else sites.head_z(layer))
        hooks.add(sites.mlp_post(layer) if granularity == "neuron" else sites.mlp_out(layer))
        if spec.post_norms:
            hooks |= {sites.post_norm_scale(layer, "attn"), sites.post_norm_scale(layer, "mlp")}
    return hooks


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise HexRayError(f"unknown granularity {granularity!r}", hint="use layer, head or neuron")


def token_score(model: LoadedModel, logits: torch.Tensor, token_id: int) -> TokenScore:
    """``logits``: [d_vocab] at one position."""
    probs = torch.softmax(logits.double(), dim=-1)
    return TokenScore(model.token_str(token_id), int(token_id), float(logits[token_id]), float(probs[token_id]))


def logit_direction(model: LoadedModel, target: int, contrast: int | None) -> tuple[torch.Tensor, float]:
    """The unembedding direction of the explained value, [d_model], and its ``b_U`` constant."""
    u = model.W_U[:, target].clone()
    const = float(model.b_U[target])
    if contrast is not None:
        u -= model.W_U[:, contrast]
        const -= float(model.b_U[contrast])
    return u, const


def residual_direction(model: LoadedModel, trace: Trace, position: int, u: torch.Tensor) -> torch.Tensor:
    """``d`` with ``component . d`` = that component's share of the value at ``position``: [d_model]."""
    weight, _ = model.final_norm
    d = weight * u
    if model.spec.norm == "layernorm":
        d = d - d.mean()  # LayerNorm's centring, moved onto the direction (it is linear)
    scale = trace.acts[sites.FINAL_SCALE][position].reshape(-1)[0]
    return d / scale


def write_directions(model: LoadedModel, acts, position: int, d: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the directions that attention's and the MLP's raw outputs project onto: [d_model] each.

    ``d`` itself unless the model has post-norms; then ``w_post * d / scale_post`` at ``position``.
    """
    n = model.spec.n_layers
    if not model.spec.post_norms:
        return [d] * n, [d] * n
    attn, mlp = [], []
    for layer, (w_attn, w_mlp) in enumerate(model.post_norms):
        attn.append(w_attn * d / acts[sites.post_norm_scale(layer, "attn")][position].reshape(-1)[0])
        mlp.append(w_mlp * d / acts[sites.post_norm_scale(layer, "mlp")][position].reshape(-1)[0])
    return attn, mlp


def explained_logits(model: LoadedModel, logits: torch.Tensor) -> torch.Tensor:
    """The logits attribution explains: the model's own, or the pre-cap ones under soft-capping."""
    cap = model.spec.logit_softcap
    if not cap:
        return logits
    return cap * torch.atanh((logits.double() / cap).clamp(-1 + 1e-12, 1 - 1e-12))


def direct_logit_attribution(
    model: LoadedModel,
    trace: Trace,
    *,
    position: int = -1,
    target: int | None = None,
    contrast: int | None = None,
    granularity: Granularity = "layer",
) -> Attribution:
    """Split the logit of ``target`` (minus ``contrast``'s) at ``position`` into component scores.

    ``target`` defaults to the model's top prediction at ``position``. ``trace`` must hold
    :func:`attribution_hooks` for ``granularity``.
    """
    check_granularity(granularity)
    spec = model.spec
    pos = resolve_position(position, trace.n_tokens)
    logits = trace.logits[pos]  # [d_vocab]
    target_id = int(logits.argmax()) if target is None else int(target)
    u, b_u_const = logit_direction(model, target_id, contrast)
    d = residual_direction(model, trace, pos, u)  # [d_model]
    acts = trace.acts
    d_attn, d_mlp = write_directions(model, acts, pos, d)

    scores: list[tuple[Component, float]] = []
    embed = acts[sites.EMBED][pos] + (acts[sites.POS_EMBED][pos] if sites.POS_EMBED in acts else 0)
    scores.append((Component("embed"), float(embed @ d)))
    constant = float(model.final_norm[1] @ u) + b_u_const
    for layer in range(spec.n_layers):
        b_attn, b_mlp = float(model.b_O[layer] @ d_attn[layer]), float(model.b_out[layer] @ d_mlp[layer])
        constant += b_attn + b_mlp
        if granularity == "layer":  # hook_attn_out is what joins the residual (after any post-norm)
            scores.append((Component("attn", layer), float(acts[sites.attn_out(layer)][pos] @ d) - b_attn))
        else:
            z = acts[sites.head_z(layer)][pos]  # [n_heads, d_head]
            per_head = torch.einsum("hk,hkm,m->h", z, model.W_O[layer], d_attn[layer])
            scores.extend((Component("head", layer, head=h), float(s)) for h, s in enumerate(per_head.tolist()))
        if granularity == "neuron":
            post = acts[sites.mlp_post(layer)][pos]  # [d_mlp]
            per_neuron = post * (model.W_out[layer] @ d_mlp[layer])
            scores.extend((Component("neuron", layer, neuron=n), s) for n, s in enumerate(per_neuron.tolist()))
        else:
            scores.append((Component("mlp", layer), float(acts[sites.mlp_out(layer)][pos] @ d) - b_mlp))
    scores.append((Component("bias"), constant))

    explained = explained_logits(model, logits)
    value = float(explained[target_id] - (explained[contrast] if contrast is not None else 0.0))
    total = sum(s for _, s in scores)
    scores.sort(key=lambda cs: -abs(cs[1]))
    return Attribution(
        ref=trace.ref,
        position=pos,
        target=token_score(model, logits, target_id),
        contrast=None if contrast is None else token_score(model, logits, contrast),
        value=value,
        granularity=granularity,
        components=tuple(ComponentScore(c, s) for c, s in scores),
        reconstruction_error=abs(total - value),
    )
