"""Activation patching, exact (batched) and by attribution (one backward pass).

The metric is the logit difference ``logit(target) - logit(contrast)`` at the last position,
normalised so that 1 is the clean prompt's value and 0 the corrupt prompt's::

    score = (patched - corrupt) / (clean - corrupt)

*Exact* patching copies one site's clean activation into the corrupt run and measures the metric
(every site of a sweep in a few batched forward passes, see :mod:`hexray.tracing.edits`).
*Attribution* patching estimates the same number to first order from one forward and one backward
pass on the corrupt prompt: ``(clean_act - corrupt_act) . d metric / d act``.

With dictionaries (``dict``), the ``features`` sweep patches one feature at a time: the corrupt
run's activation at the dictionary's output moves by ``(clean_f - corrupt_f) W_dec[f]`` at every
position (the rest of the site, its error term included, stays corrupt). Its attribution estimate
is ``(clean_f - corrupt_f) * W_dec[f] . d metric / d output``, summed over positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from hexray.analysis.attribution import logit_direction, token_score
from hexray.analysis.results import PromptRef
from hexray.errors import HexRayError
from hexray.intervene.results import METHODS, SWEEP_KINDS, SWEEPS, Method, PatchingResult, PatchScore, Site, Sweep
from hexray.models.loading import LoadedModel, ModelSpec
from hexray.options import Option, options_class
from hexray.tracing.edits import Edit, run_variants, site_mask
from hexray.tracing.engine import run_trace, run_with_gradients, tokenize_prompt
from hexray.tracing.sites import Component, Hook

PATCH_OPTIONS: tuple[Option, ...] = (
    Option("target", str | None, None, "Target token (one token, e.g. ' Mary'). Default: the clean prompt's prediction."),
    Option("contrast", str | None, None, "Contrast token: the metric is logit(target) - logit(contrast). Default: the corrupt prompt's prediction."),
    Option("sweeps", str | None, None, "Comma-separated: heads, heads-pos, resid, attn, mlp, neurons (attribution only), or all. Default: heads,resid (attribution: all).", flag="--sweep", api_name="sweep"),
    Option("method", str, "exact", "exact | attribution | both.", choices=METHODS),
    Option("batch_size", int | None, None, "Patched variants per forward pass (default: what fits ~1.5 GB).", gt=0, api_le=4096),
    Option("last_position_only", bool, False, "Patch only the final token; the prompts may then differ in length.", flag="--last-position", api_name="last_position"),
    Option("top_k", int, 10, "Rows in each console table.", short="-k", gt=0, api=False),
    Option("prepend_bos", bool | None, None, "Force a BOS token on or off (default: the model's own tokenizer behaviour).", flag="--prepend-bos/--no-prepend-bos"),
    Option("dict", str | None, None, "Dictionaries (names such as resid.12, or folders; comma-separated) whose features are patched one by one (the features sweep, added by default)."),
)
PatchOptions = options_class("PatchOptions", PATCH_OPTIONS, check=lambda o: parse_sweeps(o.sweeps, o.method, features=bool(o.dict)),
                             doc="The options of ``hexray patch`` and ``/api/patch``.")

DEFAULT_SWEEPS: dict[str, tuple[Sweep, ...]] = {
    "exact": ("heads", "resid"),
    "both": ("heads", "resid"),
    "attribution": ("heads", "resid", "attn", "mlp", "neurons"),
}
_PER_POSITION = {"heads-pos", "resid", "attn", "mlp"}


def sweep_hook(sweep: Sweep, layer: int) -> Hook:
    """The hook a sweep patches at ``layer``: its component kind's hook (``sites.KINDS``)."""
    return Component(SWEEP_KINDS[sweep], layer).hook


def parse_sweeps(text: str | Iterable[str] | None, method: str, *, features: bool = False) -> tuple[Sweep, ...]:
    """``"heads,resid"`` (or ``"all"``) -> sweep names, checked against ``method``.

    ``features``: dictionaries were given, so the features sweep joins the defaults and ``all``.
    """
    if method not in METHODS:
        raise HexRayError(f"unknown {{field}} {method!r}", hint="use exact, attribution or both", field="method")
    if text is None:
        return DEFAULT_SWEEPS[method] + (("features",) if features else ())
    parts = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if parts == ["all"]:
        return tuple(s for s in SWEEPS if (method == "attribution" or s != "neurons") and (features or s != "features"))  # type: ignore[misc]
    if not parts:
        raise HexRayError("{field} is empty", hint=f"use some of {', '.join(SWEEPS)}, or all", field="sweeps")
    for p in parts:
        if p not in SWEEPS:
            raise HexRayError(f"unknown sweep {p!r}", hint=f"use some of {', '.join(SWEEPS)}, or all", field="sweeps")
    if "neurons" in parts and method != "attribution":
        raise HexRayError(
            "the neurons sweep is attribution-only (one exact forward pass per neuron would be tens of thousands)",
            hint="use method attribution, or drop neurons from the sweeps",
        )
    if "features" in parts and not features:
        raise HexRayError("the features sweep needs dictionaries", hint="give --dict NAME (e.g. resid.12)", field="sweeps")
    return tuple(dict.fromkeys(parts))  # type: ignore[arg-type]


def sweep_sites(spec: ModelSpec, sweep: Sweep, positions: Sequence[int] | None) -> list[Site]:
    """Every site of ``sweep``. ``positions``: where per-position sweeps patch (None = each one)."""
    out: list[Site] = []
    for layer in range(spec.n_layers):
        if sweep == "heads":
            out += [Site(Component("head", layer, head=h), positions[0] if positions and len(positions) == 1 else None) for h in range(spec.n_heads)]
        elif sweep == "heads-pos":
            out += [Site(Component("head", layer, head=h), p) for h in range(spec.n_heads) for p in positions]
        elif sweep == "neurons":
            out += [Site(Component("neuron", layer, neuron=n)) for n in range(spec.d_mlp)]
        else:
            out += [Site(Component(SWEEP_KINDS[sweep], layer), p) for p in positions]
    return out


def site_edit(site: Site, hook: str, source: torch.Tensor, n_tokens: int) -> Edit:
    """Copy ``source`` (aligned to the base prompt's positions) into the base run at ``site``."""
    return Edit(hook, site_mask(site.component.unit, site.position, (n_tokens, *source.shape[1:])), source)


def _aligned(source: torch.Tensor, base_len: int) -> torch.Tensor:
    """``source`` [src_pos, ...] on the base prompt's positions; unequal lengths align the last token."""
    if source.shape[0] == base_len:
        return source
    out = torch.zeros((base_len, *source.shape[1:]), dtype=source.dtype, device=source.device)
    out[-1] = source[-1]
    return out


def _metric(model: LoadedModel, final_resid: torch.Tensor, target: int, contrast: int) -> torch.Tensor:
    """logit(target) - logit(contrast) from the final residual stream [n, d_model] -> [n]."""
    u, const = logit_direction(model, target, contrast)
    return model.apply_final_norm(final_resid).float() @ u + const


def exact_patching_values(
    model: LoadedModel,
    base_ids: Sequence[int],
    source_acts: dict[str, torch.Tensor],
    site_sweeps: Sequence[tuple[Site, Sweep]],
    *,
    target: int,
    contrast: int,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The raw metric after patching each site's ``source_acts`` into the base run: [n_sites]."""
    n_tokens = len(base_ids)
    aligned: dict[str, torch.Tensor] = {}
    variants = []
    for site, sweep in site_sweeps:
        hook = sweep_hook(sweep, site.component.layer)
        if hook not in aligned:
            aligned[hook] = _aligned(source_acts[hook], n_tokens)
        variants.append((site_edit(site, hook, aligned[hook], n_tokens),))
    final = run_variants(model, base_ids, variants, batch_size=batch_size, progress=progress)
    return _metric(model, final, target, contrast)


def metric_gradients(
    model: LoadedModel, token_ids: Sequence[int], hooks: Iterable[str], *, target: int, contrast: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward and one backward pass: (logits [pos, vocab], activations, d metric / d activation).

    The metric is logit(target) - logit(contrast) at the last position; activations and gradients
    are at ``hooks``, without the batch dimension.
    """
    return run_with_gradients(model, token_ids, hooks, lambda logits: logits[-1, target] - logits[-1, contrast])


def attribution_scores(site_sweeps: Sequence[tuple[Site, Sweep]], delta_grad: dict[str, torch.Tensor]) -> torch.Tensor:
    """First-order patch effect of each site from ``(clean - corrupt) * grad`` per hook: [n_sites]."""
    groups: dict[str, tuple[str, list[int], list[int], list[int]]] = {}  # hook -> (kind, site index, unit, position)
    for i, (site, sweep) in enumerate(site_sweeps):
        c = site.component
        kind, index, unit, position = groups.setdefault(sweep_hook(sweep, c.layer), (c.kind, [], [], []))
        index.append(i)
        unit.append(c.head if kind == "head" else c.neuron if kind == "neuron" else 0)
        position.append(-1 if site.position is None else site.position)
    out = torch.empty(len(site_sweeps))
    for hook, (kind, index, unit, position) in groups.items():
        dg = delta_grad[hook]
        # per unit and position: hook_z [pos, n_heads, d_head] -> [pos, n_heads]; mlp_post is
        # [pos, d_mlp] already; residual-stream sites [pos, d_model] -> [pos, 1]
        per = dg.sum(-1) if kind == "head" else dg if kind == "neuron" else dg.sum(-1, keepdim=True)
        everywhere = torch.cat([per, per.sum(0, keepdim=True)])  # row -1: every position at once
        out[index] = everywhere[torch.tensor(position, device=dg.device), torch.tensor(unit, device=dg.device)].cpu()
    return out


def activation_patching(
    model: LoadedModel,
    clean: str,
    corrupt: str,
    *,
    target: str | None = None,
    contrast: str | None = None,
    sweeps: str | Iterable[str] | None = None,
    method: Method = "exact",
    last_position_only: bool = False,
    batch_size: int | None = None,
    prepend_bos: bool | None = None,
    dict: str | None = None,  # noqa: A002 - the option's name, as the CLI and API spell it
    progress: Callable[[int, int], None] | None = None,
) -> PatchingResult:
    """Patch clean activations into the corrupt run, site by site, for every site of ``sweeps``.

    ``target``/``contrast`` default to the clean and the corrupt prompt's predictions.
    ``last_position_only`` patches only the final token, so the prompts may differ in length.
    """
    chosen = parse_sweeps(sweeps, method, features=bool(dict))
    PatchOptions(batch_size=batch_size).validate()  # the declared bounds, as the CLI and the API check them
    clean_ids = _tokens(model, clean, "clean", prepend_bos)
    corrupt_ids = _tokens(model, corrupt, "corrupt", prepend_bos)
    if len(clean_ids) != len(corrupt_ids) and not last_position_only:
        raise HexRayError(
            f"the clean prompt is {len(clean_ids)} tokens and the corrupt prompt {len(corrupt_ids)}; "
            "patching position by position needs equal lengths",
            hint="make the prompts the same length in tokens, or patch only the final token ({field})", field="last_position_only",
        )
    target_id = model.single_token(target, role="target") if target is not None else None
    contrast_id = model.single_token(contrast, role="contrast") if contrast is not None else None

    dictionaries = _dictionaries(model, dict) if "features" in chosen else ()
    unit_sweeps = [s for s in chosen if s != "features"]
    unit_hooks = {sweep_hook(s, layer) for s in unit_sweeps for layer in range(model.spec.n_layers)}
    hooks = unit_hooks | {h for d in dictionaries for h in (d.site.hook_in(model.spec), d.site.hook_out(model.spec))}
    clean_trace = run_trace(model, clean, hooks, prepend_bos=prepend_bos)
    if target_id is None:
        target_id = int(clean_trace.logits[-1].argmax())
    corrupt_logits = corrupt_inputs = None
    if contrast_id is None or method == "exact":  # with the dictionaries' inputs: the exact features sweep reads them
        corrupt_trace = run_trace(model, corrupt, {d.site.hook_in(model.spec) for d in dictionaries}, prepend_bos=prepend_bos)
        corrupt_logits, corrupt_inputs = corrupt_trace.logits, corrupt_trace.acts
    if contrast_id is None:
        contrast_id = int(corrupt_logits[-1].argmax())
        if contrast_id == target_id:
            raise HexRayError(
                f"the clean and corrupt prompts both predict {model.token_str(target_id)!r}",
                hint="give a target and a contrast, e.g. ' Mary' and ' John'",
            )
    corrupt_acts = grads = None
    if method != "exact":  # attribution's forward pass on the corrupt prompt also gives its logits
        corrupt_logits, corrupt_acts, grads = metric_gradients(model, corrupt_ids, hooks, target=target_id, contrast=contrast_id)
        corrupt_inputs = corrupt_acts
    if contrast_id == target_id:
        raise HexRayError("target and contrast are the same token", hint="the metric is logit(target) - logit(contrast)")

    def diff(logits: torch.Tensor) -> float:
        return float(logits[-1, target_id] - logits[-1, contrast_id])

    clean_value, corrupt_value = diff(clean_trace.logits), diff(corrupt_logits)
    span = clean_value - corrupt_value
    if abs(span) < 1e-6:
        raise HexRayError(
            f"the clean and corrupt prompts give the same logit difference ({clean_value:.4f}); there is nothing to restore",
            hint="choose prompts (or a target and contrast) where the behaviour differs",
        )
    n = len(corrupt_ids)
    positions = [n - 1] if last_position_only else list(range(n))
    site_sweeps = [(site, s) for s in unit_sweeps for site in sweep_sites(model.spec, s, positions if s in _PER_POSITION or last_position_only else None)]
    feature_sites = [Site(Component("feature", d.site.layer, feature=f, site=d.site.kind)) for d in dictionaries for f in range(d.d_sae)]
    keep = torch.zeros(n, 1, dtype=torch.bool)  # the positions patched: all, or the last
    keep[-1 if last_position_only else slice(None)] = True
    # per dictionary: (clean - corrupt) latents on the corrupt prompt's positions, [pos, d_sae]
    latent_deltas = [
        (_aligned(d.encode(clean_trace.acts[d.site.hook_in(model.spec)]), n) - d.encode(corrupt_inputs[d.site.hook_in(model.spec)])) * keep
        for d in dictionaries
    ]

    exact = attrib = None
    if method in ("exact", "both"):
        measured = [(site, s) for site, s in site_sweeps if s != "neurons"]
        raw = exact_patching_values(
            model, corrupt_ids, clean_trace.acts, measured,
            target=target_id, contrast=contrast_id, batch_size=batch_size, progress=progress,
        ) if measured else torch.empty(0)
        variants = [(Edit(d.site.hook_out(model.spec), keep, delta[:, f : f + 1] * d.W_dec[f], op="add"),)
                    for d, delta in zip(dictionaries, latent_deltas) for f in range(d.d_sae)]
        if variants:
            patched = run_variants(model, corrupt_ids, variants, batch_size=batch_size, progress=progress)
            raw = torch.cat([raw, _metric(model, patched, target_id, contrast_id).cpu()])
        exact = ((raw - corrupt_value) / span).tolist()
    if method in ("attribution", "both"):
        delta_grad = {}
        for hook in unit_hooks:
            delta_grad[hook] = (_aligned(clean_trace.acts[hook], n) - corrupt_acts[hook]) * keep.view(-1, *([1] * (corrupt_acts[hook].dim() - 1))) * grads[hook]
        attrib = attribution_scores(site_sweeps, delta_grad)
        for d, delta in zip(dictionaries, latent_deltas):  # d metric / d latent_f = W_dec[f] . d metric / d output
            attrib = torch.cat([attrib, (delta * (grads[d.site.hook_out(model.spec)] @ d.W_dec.T)).sum(0).cpu()])
        attrib = (attrib / span).tolist()
    site_sweeps += [(site, "features") for site in feature_sites]

    results = []
    for i, (site, s) in enumerate(site_sweeps):
        a = attrib[i] if attrib is not None else None
        e = exact[i] if exact is not None else None
        results.append(PatchScore(site=site, sweep=s, score=e if e is not None else a, attribution=a if method == "both" else None))
    correlation = _correlations(results, chosen) if method == "both" else None
    return PatchingResult(
        clean=clean_trace.ref,
        corrupt=PromptRef(model.name, corrupt, tuple(model.token_strs(corrupt_ids)), tuple(corrupt_ids)),
        target=token_score(model, clean_trace.logits[-1], target_id),
        contrast=token_score(model, clean_trace.logits[-1], contrast_id),
        clean_value=clean_value,
        corrupt_value=corrupt_value,
        method=method,
        sweeps=chosen,
        last_position_only=last_position_only,
        results=tuple(results),
        correlation=correlation,
    )


def _dictionaries(model: LoadedModel, names: str | None) -> tuple:
    from hexray.features.store import load_named

    return load_named(names, model.spec) if names else ()


def _tokens(model: LoadedModel, prompt: str, field: str, prepend_bos: bool | None) -> list[int]:
    """Token ids of one of the two prompts; errors name the field they came from."""
    return tokenize_prompt(model, prompt, prepend_bos=prepend_bos, field_name=field)[0]


def _correlations(results: Sequence[PatchScore], chosen: Sequence[str]) -> dict[str, float | None]:
    """Pearson correlation of exact and attribution scores, per sweep and over all sites."""

    def pearson(rows: Sequence[PatchScore]) -> float | None:
        if len(rows) < 2:
            return None
        x = np.array([r.score for r in rows])
        y = np.array([r.attribution for r in rows])
        if x.std() == 0 or y.std() == 0:
            return None
        return float(np.corrcoef(x, y)[0, 1])

    out = {s: pearson([r for r in results if r.sweep == s]) for s in chosen}
    out["all"] = pearson(results)
    return out
