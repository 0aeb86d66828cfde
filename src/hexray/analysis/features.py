"""Features per token and exact feature-level logit attribution, from a dictionary at a site.

A dictionary at a site rebuilds what the site holds as ``sum_f a_f W_dec[f] + b_dec (+ skip)``; the
reconstruction error ``site - recon`` makes it exact. With the final norm's scale frozen (as in
:mod:`hexray.analysis.attribution`) every part projects linearly onto the logit direction, so:

- an MLP / attention-output dictionary (or a transcoder) replaces that layer's row of the
  attribution table by its features, its skip term and its error; ``b_dec`` joins the constant;
- a residual-stream dictionary at ``resid.L`` replaces everything written before block L (the
  embeddings and layers 0..L-1) by the features of the stream entering block L and its error.

The parts still sum to the explained logit, to float rounding, as the plain table does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hexray.analysis.attribution import residual_direction
from hexray.analysis.registry import Analysis, View, lazy
from hexray.analysis.results import Attribution, ComparableResult, ComponentScore, OnPrompt, PromptRef
from hexray.errors import HexRayError
from hexray.features.dictionary import Dictionary
from hexray.models.loading import LoadedModel, ModelSpec
from hexray.options import Option
from hexray.tracing import sites
from hexray.tracing.engine import Trace
from hexray.tracing.sites import Component


def dictionary_hooks(spec: ModelSpec, dictionaries: Sequence[Dictionary]) -> set[str]:
    """What a trace must hold for :func:`token_features` and :func:`feature_attribution`."""
    hooks: set[str] = {sites.FINAL_SCALE}
    for d in dictionaries:
        hooks |= {d.site.hook_in(spec), d.site.hook_out(spec)}
    return hooks


def site_latents(model: LoadedModel, trace: Trace, d: Dictionary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [pos, d_sae], reconstruction [pos, d_out], the site's actual activation [pos, d_out]) on the trace."""
    spec = model.spec
    x, y = trace.acts[d.site.hook_in(spec)], trace.acts[d.site.hook_out(spec)]
    dev = d.to(x.device)
    with torch.inference_mode():
        a = dev.encode(x)
        return a, dev.decode(a, x), y


@dataclass(frozen=True)
class FeatureActivation:
    feature: int
    label: str  # L10F123
    activation: float


@dataclass(frozen=True, eq=False)
class TokenFeatures(OnPrompt, ComparableResult):
    """Each token's top active features in one dictionary, with how well the dictionary rebuilt the site there."""

    ref: PromptRef
    dictionary: str
    site: str  # resid.10
    top: tuple[tuple[FeatureActivation, ...], ...]  # [pos][<= k], strongest first
    l0: np.ndarray  # [pos] latents firing
    relative_error: np.ndarray  # [pos] |site - recon| / |site|


def token_features(model: LoadedModel, trace: Trace, d: Dictionary, *, k: int = 5) -> TokenFeatures:
    """Per position, the ``k`` latents of ``d`` with the largest activations (only those that fire)."""
    if k < 1:
        raise HexRayError(f"{{field}} must be at least 1, got {k}", field="features_k")
    a, recon, y = site_latents(model, trace, d)
    values, index = a.topk(min(k, d.d_sae), dim=-1)
    top = tuple(
        tuple(FeatureActivation(int(f), d.feature_label(int(f)), float(v)) for v, f in zip(vs, fs) if v > 0)
        for vs, fs in zip(values.tolist(), index.tolist())
    )
    err = (y - recon).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)
    return TokenFeatures(trace.ref, d.name or d.site.label, d.site.label, top, (a > 0).sum(-1).cpu().numpy(), err.cpu().numpy())


def feature_attribution(model: LoadedModel, trace: Trace, attribution: Attribution, dictionaries: Sequence[Dictionary]) -> Attribution:
    """``attribution`` with each dictionary's site split into features, skip term and error.

    ``attribution`` is the plain one at any granularity on the same trace; the trace must hold
    :func:`dictionary_hooks`. Sites must not overlap (one dictionary per site).
    """
    spec = model.spec
    pos = attribution.position
    u = model.W_U[:, attribution.target.id] - (model.W_U[:, attribution.contrast.id] if attribution.contrast else 0)
    # output hooks (hook_mlp_out, hook_attn_out) already sit after any post-norm, so every site projects onto d
    direction = residual_direction(model, trace, pos, u)  # [d_model]
    rows = list(attribution.components)
    labels = [d.site.label for d in dictionaries]
    if len(set(labels)) != len(labels):
        raise HexRayError(f"two dictionaries at the same site: {', '.join(labels)}", hint="give one dictionary per site", field="dict")
    for d in sorted(dictionaries, key=lambda d: d.site.kind == "resid"):  # a stream's dictionary last: it absorbs earlier ones
        site, dev = d.site, d.to(direction.device)
        a, recon, y = site_latents(model, trace, d)
        if site.kind == "resid":
            replaced = [c for c in rows if _written_before(c.component, site.layer)]
        else:
            part = "attn" if site.kind == "attn_out" else "mlp"
            replaced = [c for c in rows if c.component.layer == site.layer and _part_of(c.component) == part]
        w = dev.W_dec @ direction  # [d_sae] each latent's logit effect per unit of activation
        act = a[pos]
        parts = [ComponentScore(Component("feature", site.layer, feature=f, site=site.kind), float(act[f] * w[f])) for f in torch.nonzero(act).flatten().tolist()]
        if d.W_skip is not None:
            parts.append(ComponentScore(Component("skip", site.layer, site=site.kind), float(dev.skip(trace.acts[site.hook_in(model.spec)][pos]) @ direction)))
        parts.append(ComponentScore(Component("error", site.layer, site=site.kind), float((y[pos] - recon[pos]) @ direction)))
        # the constant takes b_dec and the biases the replaced rows left out: the table still sums to the logit
        shift = sum(c.score for c in replaced) - sum(p.score for p in parts)
        rows = [ComponentScore(c.component, c.score + shift) if c.component.kind == "bias" else c for c in rows if c not in replaced] + parts
    rows.sort(key=lambda c: -abs(c.score))
    total = sum(c.score for c in rows)
    return Attribution(
        ref=attribution.ref, position=pos, target=attribution.target, contrast=attribution.contrast, value=attribution.value,
        granularity=attribution.granularity, components=tuple(rows), reconstruction_error=abs(total - attribution.value),
    )


def _part_of(c: Component) -> str | None:
    if c.kind in ("attn", "head"):
        return "attn"
    if c.kind in ("mlp", "neuron"):
        return "mlp"
    return None


def _written_before(c: Component, layer: int) -> bool:
    """Whether ``c`` is part of the residual stream entering block ``layer``."""
    if c.kind == "embed":
        return True
    if c.kind in ("attn", "head", "mlp", "neuron"):
        return c.layer < layer
    if c.kind in ("feature", "error", "skip") and c.site != "resid":
        return c.layer < layer
    return False


def example_dictionary(model: LoadedModel) -> str:
    """A small random topk dictionary at ``resid.1`` saved in the cache (``examples/<model>``): its folder."""
    from hexray.features.dictionary import DictSite
    from hexray.features.formats import dictionaries_root, save_dictionary

    folder = dictionaries_root() / "examples" / model.name.replace("/", "-")
    if not folder.exists():
        g = torch.Generator().manual_seed(0)
        width, n = model.spec.d_model, 4 * model.spec.d_model
        W_dec = torch.randn(n, width, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        site = DictSite("resid", min(1, model.spec.n_layers - 1))
        save_dictionary(Dictionary(site, "topk", W_dec.T.clone(), torch.zeros(n), W_dec, torch.zeros(width), model.name, k=8, name="example"), folder, spec=model.spec)
    return str(folder)


# -- the registry entry (hexray trace --dict NAME, /api/analyze {"dict": ...}) -----------------------
@dataclass(frozen=True)
class FeatureSection:
    """What ``--dict`` adds to a report: per dictionary, each token's top features, and the features
    (with the error and skip terms) that wrote most of the explained logit."""

    dictionaries: tuple[TokenFeatures, ...]
    attributed: tuple[tuple[ComponentScore, ...], ...]  # per dictionary: its rows of the attribution, by |score|


def _attributed(attribution: Attribution, d: Dictionary, k: int) -> tuple[ComponentScore, ...]:
    """``d``'s rows of the (refined) attribution: its top ``k`` features by |score|, then its error and skip terms."""
    mine = [c for c in attribution.components if c.component.kind in ("feature", "error", "skip")
            and c.component.layer == d.site.layer and c.component.site == d.site.kind]
    features = sorted((c for c in mine if c.component.kind == "feature"), key=lambda c: -abs(c.score))[:k]
    return tuple(features) + tuple(c for c in mine if c.component.kind != "feature")


def _loaded(spec: ModelSpec, options) -> tuple[Dictionary, ...]:
    from hexray.features.store import load_named

    return load_named(options.dict, spec)


def _section(model: LoadedModel, trace: Trace, ctx) -> FeatureSection:
    dictionaries, k = _loaded(model.spec, ctx.options), ctx.options.features_k
    return FeatureSection(tuple(token_features(model, trace, d, k=k) for d in dictionaries), tuple(_attributed(ctx.attribution, d, 2 * k) for d in dictionaries))


def _features_view(section: FeatureSection, ctx) -> View:
    rows = []
    for f in section.dictionaries:
        for pos, top in enumerate(f.top):
            rows.append((f.dictionary, pos, f.tokens[pos], int(f.l0[pos]), float(f.relative_error[pos]), "  ".join(f"{a.label} {a.activation:.2f}" for a in top)))
    return View("Top features per token", ("dictionary", "position", "token", "L0", "rel. error", "features"), tuple(rows),
                note="rel. error = |site - reconstruction| / |site|; the attribution table splits each dictionary's site into its features")


def _attribution_view(section: FeatureSection, ctx) -> View:
    a = ctx.attribution
    rows = []
    for f, parts in zip(section.dictionaries, section.attributed):
        for c in parts:
            rows.append((f.dictionary, c.component.name, round(c.score, 4), f"{100 * c.score / a.value:+.1f}%" if abs(a.value) > 1e-9 else "-"))
    return View(f"Feature attribution: logit({a.target.token!r}) @{a.position}", ("dictionary", "component", "score", "share"), tuple(rows),
                note="direct effects; with the error (ERR), skip and bias rows they sum to the site's")


ANALYSIS = Analysis(
    name="features",
    title="Features per token",
    switch=Option("dict", str | None, None, "Sparse dictionaries (names such as resid.12, or folders; comma-separated): each token's top features, and features in the attribution table."),
    options=(Option("features_k", int, 5, "Features per token shown with --dict.", gt=0, api_le=64),),
    hooks=lambda spec, o: dictionary_hooks(spec, _loaded(spec, o)),
    compute=lambda model, trace, ctx: _section(model, trace, ctx),
    refine=lambda model, trace, attribution, o: feature_attribution(model, trace, attribution, _loaded(model.spec, o)),
    example=lambda model: example_dictionary(model),
    json_key="features",
    document=lambda s, ctx: [lazy("hexray.render.jsondoc:features_doc")(f) for f in s.dictionaries],
    table=_features_view,
    console=lambda s, ctx: lazy("hexray.render.console:view_tables")([_features_view(s, ctx), _attribution_view(s, ctx)]),
    html=lambda s, ctx: "".join(lazy("hexray.render.html:view_section")(v) for v in (_features_view(s, ctx), _attribution_view(s, ctx))),
    lab_panel="tokens-panel",
)
