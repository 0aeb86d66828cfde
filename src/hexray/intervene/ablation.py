"""Ablation: knock out heads, attention/MLP layers, neurons or residual-stream positions and compare
the next-token distribution before and after.

- ``zero``: the activation becomes 0.
- ``mean``: the activation becomes its mean over every token of a reference set of prompts.
- ``resample``: the activation at each position comes from a randomly drawn reference prompt at
  the same position (a prompt long enough is drawn; past the longest one, any reference token);
  ``samples`` draws run as one batch and their probabilities are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path

import torch

from hexray.analysis.lens import lens_logits
from hexray.analysis.results import TokenScore
from hexray.errors import HexRayError, check_text
from hexray.intervene.results import ABLATION_MODES, AblationMode, AblationResult, Distribution, Site
from hexray.models.loading import LoadedModel, ModelSpec
from hexray.options import Option, options_class
from hexray.tracing.edits import Edit, run_variants, site_mask
from hexray.tracing.engine import capture, resolve_position, rows_per_chunk, run_trace
from hexray.tracing.sites import COMPONENT_FORMS, component_hook, parse_component, parse_hook


ABLATE_OPTIONS: tuple[Option, ...] = (
    Option("mode", str, "zero", "zero | mean | resample.", choices=ABLATION_MODES),
    Option("samples", int, 8, "Resample draws to average.", gt=0, api_le=64),
    Option("seed", int, 0, "Seed for resampling.", ge=0, le=2**63 - 1),
    Option("target", str | None, None, "Target token (one token, e.g. ' Mary'). Default: the prediction."),
    Option("contrast", str | None, None, "Contrast token: also report logit(target) - logit(contrast)."),
    Option("token_index", int, -1, "Position whose next-token distribution to compare; negative counts from the end."),
    Option("top_k", int, 10, "Tokens in each distribution (and rows in the console table).", short="-k", gt=0, api_le=1000),
    Option("prepend_bos", bool | None, None, "Force a BOS token on or off (default: the model's own tokenizer behaviour).", flag="--prepend-bos/--no-prepend-bos"),
    Option("dict", str | None, None, "Dictionaries whose features (L8F117; L8F117=5 clamps, L8F117+=5 steers) the components name (names such as resid.12, or folders)."),
)
AblateOptions = options_class("AblateOptions", ABLATE_OPTIONS, doc="The options of ``hexray ablate`` and ``/api/ablate`` (besides the prompt, components and reference set).")


def default_reference_prompts() -> list[str]:
    """The built-in reference set: varied everyday English, one prompt a line."""
    text = resources.files("hexray.intervene").joinpath("reference_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_reference_prompts(path: str | Path) -> list[str]:
    """One prompt a line from ``path``; blank lines are skipped."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HexRayError(f"{{field}} {path}: no such file", field="reference") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HexRayError(f"{{field}} {path} cannot be read: {getattr(exc, 'strerror', None) or exc}", field="reference") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise HexRayError(f"{{field}} {path} has no prompts", hint="give one prompt a line", field="reference")
    return prompts


def parse_sites(text: str, spec: ModelSpec) -> tuple[Site, ...]:
    """``"L9H6,MLP10,L10N1234@3,RESID12@-1,L8F117=5,L8F9+=4"`` -> sites.

    ``@P`` limits a site to one position; ``=V`` clamps a feature's activation to V; ``+=A`` steers
    by adding ``A * W_dec[f]`` (its activation is left as it is).
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise HexRayError("no components given", hint=f"use {COMPONENT_FORMS}; add @P for one position, e.g. L9H6@-1")
    out = []
    for part in parts:
        name, at, pos = part.partition("@")
        if at and not pos.strip():
            raise HexRayError(f"{part}: no position after @", hint="write e.g. L9H6@3 or L9H6@-1, or drop the @ for every position")
        steering = "+=" in name
        name, eq, amount = name.partition("+=" if steering else "=")
        component = parse_component(name, spec)
        value = steer = None
        if eq:
            verb, example = ("steered", "L8F117+=5") if steering else ("clamped to a value", "L8F117=5")
            if component.kind != "feature":
                raise HexRayError(f"{part}: only a feature can be {verb}", hint=f"write e.g. {example} (with --dict)")
            try:
                number = float(amount)
            except ValueError:
                raise HexRayError(f"{part}: {amount!r} is not a number", hint=f"write e.g. {example}") from None
            if number != number or abs(number) == float("inf"):
                raise HexRayError(f"{part}: {amount!r} is not a finite number", hint=f"write e.g. {example}")
            value, steer = (None, number) if steering else (number, None)
        if component.kind in ("embed", "bias"):
            raise HexRayError(f"{part}: {component.kind} cannot be ablated", hint="ablate RESID0 for the embeddings")
        if component.kind == "resid" and component.layer == spec.n_layers:
            raise HexRayError(f"{part}: the final residual stream is the output", hint=f"use RESID0..RESID{spec.n_layers - 1}")
        position = None
        if pos:
            try:
                position = int(pos)
            except ValueError:
                raise HexRayError(f"{part}: position {pos!r} is not a number", hint="write e.g. L9H6@3 or L9H6@-1") from None
        out.append(Site(component, position, value, steer))
    return tuple(out)


def _reference_acts(model: LoadedModel, prompts: Sequence[str], hooks: set[str], prepend_bos: bool | None) -> list[dict[str, torch.Tensor]]:
    """Each reference prompt's activations at ``hooks``: one dict of [pos, ...] per prompt, in batches within the memory budget.

    The batch stops after the deepest hooked layer: nothing later is read.
    """
    ids = [model.encode(p, prepend_bos=prepend_bos) for p in prompts]  # tokenized like the prompt
    ids = [i[: model.spec.n_ctx] for i in ids if i]
    deepest = max(parse_hook(h).layer for h in hooks)
    chunk = rows_per_chunk(model, max(len(i) for i in ids), hooks)
    out = []
    for lo in range(0, len(ids), chunk):  # within the memory budget, whatever the reference set's size
        out += capture(model, ids[lo : lo + chunk], hooks, stop_after_layer=deepest)[1]
    return out


def _distribution(model: LoadedModel, logits: torch.Tensor, probs: torch.Tensor, target: int, contrast: int | None, k: int) -> Distribution:
    """``logits``/``probs``: [d_vocab] at one position (probs may be an average over samples)."""
    top_p, top_i = probs.topk(min(k, probs.shape[-1]))

    def score(i: int) -> TokenScore:
        return TokenScore(model.token_str(i), int(i), float(logits[i]), float(probs[i]))

    return Distribution(
        top=tuple(score(int(i)) for i in top_i),
        target=score(target),
        contrast=score(contrast) if contrast is not None else None,
        logit_diff=float(logits[target] - logits[contrast]) if contrast is not None else None,
    )


def check_ablation_options(mode: str, *, k: int, samples: int) -> None:
    """The checks that need no model (the CLI runs them before loading one)."""
    AblateOptions(mode=mode, top_k=k, samples=samples).validate()


def ablate(
    model: LoadedModel,
    prompt: str,
    components: str | Sequence[Site],
    *,
    mode: AblationMode = "zero",
    reference: Sequence[str] | None = None,
    samples: int = 8,
    seed: int = 0,
    target: str | None = None,
    contrast: str | None = None,
    token_index: int = -1,
    k: int = 10,
    prepend_bos: bool | None = None,
    dict: str | None = None,  # noqa: A002 - the option's name, as the CLI and API spell it
) -> AblationResult:
    """The distribution at ``token_index`` before and after ablating ``components`` together.

    A feature (``L8F117``, with ``dict`` naming its dictionary) is ablated by moving the site's
    activation along its decoder row: ``+ (v - a_f) W_dec[f]`` where ``a_f`` is its activation and
    ``v`` is 0 (zero), its mean or a resampled activation, or the clamped value (``L8F117=5``);
    steering (``L8F117+=5``) adds ``5 W_dec[f]`` whatever the feature's activation.
    """
    check_ablation_options(mode, k=k, samples=samples)
    chosen = parse_sites(components, model.spec) if isinstance(components, str) else tuple(components)
    owner = _feature_dictionaries(model, chosen, dict)
    chosen = tuple(replace(s, component=replace(s.component, site=owner[s.component.layer].site.kind)) if s.component.kind == "feature" else s for s in chosen)
    if reference is not None and not [p for p in reference if p.strip()]:
        raise HexRayError("the reference set is empty", hint="give one prompt a line")
    target_id = model.single_token(target, role="target") if target is not None else None
    contrast_id = model.single_token(contrast, role="contrast") if contrast is not None else None

    hooks = {h for s in chosen for h in _site_hooks(model, s, owner)}
    trace = run_trace(model, prompt, hooks, prepend_bos=prepend_bos)
    n = trace.n_tokens
    position = resolve_position(token_index, n)
    sites_at = []
    for s in chosen:
        p = None
        if s.position is not None:
            try:
                p = resolve_position(s.position, n)
            except HexRayError:
                raise HexRayError(f"{s.label}: position {s.position} is out of range for a prompt of {n} tokens",
                                  hint=f"use 0..{n - 1}, or -1..-{n} from the end") from None
        sites_at.append((s, p))

    refs = [] if mode == "zero" else [p for p in (reference or default_reference_prompts()) if p.strip()]
    for i, text in enumerate(refs):
        check_text(text, f"reference[{i}]")
    n_draws = samples if mode == "resample" else 1
    variants: list[list[Edit]] = [[] for _ in range(n_draws)]
    ref_acts = _reference_acts(model, refs, hooks, prepend_bos) if refs else []
    gen = torch.Generator().manual_seed(seed)
    for site, p in sites_at:
        if site.component.kind == "feature":
            edits = _feature_edits(model.spec, owner[site.component.layer], site, p, trace.acts, ref_acts, mode, n_draws, gen)
            for d in range(n_draws):
                variants[d].append(edits[min(d, len(edits) - 1)])
            continue
        hook = component_hook(site.component)
        shape = trace.acts[hook].shape
        mask = site_mask(site.component.unit, p, shape)
        if mode == "zero":
            values = [torch.zeros(shape)]
        elif mode == "mean":
            values = [torch.cat([a[hook] for a in ref_acts]).mean(0, keepdim=True).expand(shape)]
        else:
            values = [_resample(ref_acts, hook, shape, gen) for _ in range(n_draws)]
        for d in range(n_draws):
            variants[d].append(Edit(hook, mask, values[min(d, len(values) - 1)]))

    final = run_variants(model, trace.token_ids, [tuple(v) for v in variants], read_position=position)
    after_logits = lens_logits(model, final).float()  # [draws, vocab]
    before_logits = trace.logits[position]
    before_probs = torch.softmax(before_logits.double(), -1)
    after_probs = torch.softmax(after_logits.double(), -1).mean(0)
    if target_id is None:
        target_id = int(before_logits.argmax())
    kl = float((before_probs * (before_probs.clamp_min(1e-300).log() - after_probs.clamp_min(1e-300).log())).sum())
    return AblationResult(
        ref=trace.ref,
        position=position,
        sites=tuple(s for s, _ in sites_at),
        mode=mode,
        n_reference=len(refs),
        samples=n_draws,
        before=_distribution(model, before_logits, before_probs, target_id, contrast_id, k),
        after=_distribution(model, after_logits.mean(0), after_probs, target_id, contrast_id, k),
        kl=max(kl, 0.0),
    )


def _feature_dictionaries(model: LoadedModel, chosen: Sequence[Site], names: str | None) -> dict[int, object]:
    """Layer -> the dictionary that owns the features named at that layer."""
    wanted = sorted({s.component.layer for s in chosen if s.component.kind == "feature"})
    if not wanted:
        return {}
    if not names:
        raise HexRayError(f"{', '.join(f'L{layer}F..' for layer in wanted)}: a feature needs its dictionary", hint="give --dict NAME (e.g. resid.12)", field="dict")
    from hexray.features.store import load_named

    loaded = load_named(names, model.spec)
    owner = {}
    for layer in wanted:
        here = [d for d in loaded if d.site.layer == layer]
        if len(here) != 1:
            found = ", ".join(d.site.label for d in loaded)
            raise HexRayError(f"L{layer}F..: {'no' if not here else 'more than one'} dictionary at layer {layer} among {found}", hint="give one dictionary per layer whose features you name", field="dict")
        owner[layer] = here[0]
    for s in chosen:
        if s.component.kind == "feature" and s.component.feature >= owner[s.component.layer].d_sae:
            d = owner[s.component.layer]
            raise HexRayError(f"{s.label}: feature {s.component.feature} is out of range", hint=f"{d.name or d.site.label} has features 0..{d.d_sae - 1}")
    return owner


def _site_hooks(model: LoadedModel, s: Site, owner) -> set[str]:
    if s.component.kind != "feature":
        return {component_hook(s.component)}
    d = owner[s.component.layer]
    return {d.site.hook_in(model.spec), d.site.hook_out(model.spec)}


def _feature_edits(spec: ModelSpec, d, site: Site, position: int | None, acts, ref_acts, mode: str, n_draws: int, gen: torch.Generator) -> list[Edit]:
    """Additive edits moving feature ``f`` from its activation to the ablated one, one per draw, at the dictionary's output hook."""
    f = site.component.feature
    hook_in, hook_out = d.site.hook_in(spec), d.site.hook_out(spec)
    mask = site_mask(None, position, acts[hook_out].shape)  # [pos, 1]
    if site.steer is not None:
        return [Edit(hook_out, mask, site.steer * d.W_dec[f].expand(acts[hook_out].shape), op="add")]
    latent = d.encode(acts[hook_in])[:, f]  # [pos]
    if site.value is not None or mode == "zero":
        targets = [torch.full_like(latent, site.value or 0.0)]
    elif mode == "mean":
        targets = [torch.cat([d.encode(a[hook_in])[:, f] for a in ref_acts]).mean().expand_as(latent)]
    else:
        targets = [d.encode(_resample(ref_acts, hook_in, acts[hook_in].shape, gen))[:, f] for _ in range(n_draws)]
    return [Edit(hook_out, mask, (t - latent)[:, None] * d.W_dec[f], op="add") for t in targets]


def _resample(ref_acts: list[dict[str, torch.Tensor]], hook: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Per position, the activation of a random reference prompt long enough to have that position."""
    out = torch.empty(shape)
    pool = torch.cat([a[hook] for a in ref_acts])
    for pos in range(shape[0]):
        long_enough = [a[hook] for a in ref_acts if a[hook].shape[0] > pos]
        if long_enough:
            pick = long_enough[int(torch.randint(len(long_enough), (1,), generator=gen))]
            out[pos] = pick[pos]
        else:
            out[pos] = pool[int(torch.randint(pool.shape[0], (1,), generator=gen))]
    return out
