"""Patching and ablation over a set of prompts: the mean and spread of each site's effect.

Each row runs exactly as a single ``hexray patch`` / ``hexray ablate`` would (every row's
patched variants batched together), and the statistics are taken over rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hexray.analysis.dataset import Spread
from hexray.errors import HexRayError
from hexray.intervene.ablation import ablate
from hexray.intervene.patching import activation_patching
from hexray.intervene.results import Site, Sweep
from hexray.models.loading import LoadedModel


@dataclass(frozen=True)
class SiteSpread:
    site: Site
    sweep: Sweep
    score: Spread  # of the normalised score (1 = clean behaviour, 0 = corrupt)


@dataclass(frozen=True)
class PairOutcome:
    clean: str
    corrupt: str
    target: str
    contrast: str
    clean_value: float
    corrupt_value: float


@dataclass(frozen=True)
class DatasetPatching:
    model: str
    method: str
    sweeps: tuple[Sweep, ...]
    pairs: tuple[PairOutcome, ...]
    sites: tuple[SiteSpread, ...]  # in the single runs' order

    def top(self, k: int, sweep: str | None = None) -> tuple[SiteSpread, ...]:
        rows = [s for s in self.sites if sweep is None or s.sweep == sweep]
        return tuple(sorted(rows, key=lambda s: -abs(s.score.mean))[:k])


def dataset_patching(model: LoadedModel, rows: Sequence[dict], options, *, progress: Callable[[int, int], None] | None = None) -> DatasetPatching:
    """``rows``: ``{"clean", "corrupt", "target"?, "contrast"?}``; ``options``: PatchOptions (a row's tokens win)."""
    options.validate()
    kwargs = {k: getattr(options, k) for k in ("sweeps", "method", "last_position_only", "batch_size", "prepend_bos")}
    pairs, scores, order = [], {}, []
    lengths = set()
    for i, row in enumerate(rows):
        r = activation_patching(
            model, row["clean"], row["corrupt"], target=row.get("target", options.target), contrast=row.get("contrast", options.contrast), **kwargs,
        )
        lengths.add(len(r.corrupt_token_ids))
        if len(lengths) > 1 and not options.last_position_only and any(p.site.position is not None for p in r.results):
            raise HexRayError(
                f"{{field}}: per-position sweeps need every pair at the same length in tokens (row {i + 1} is {len(r.corrupt_token_ids)})",
                hint="use rows of one template, patch only the final token, or sweep heads", field="prompts",
            )
        pairs.append(PairOutcome(r.clean_prompt, r.corrupt_prompt, r.target.token, r.contrast.token, r.clean_value, r.corrupt_value))
        for p in r.results:
            key = (p.sweep, p.site)
            if key not in scores:
                order.append(key)
            scores.setdefault(key, []).append(p.score)
        if progress is not None:
            progress(i + 1, len(rows))
    return DatasetPatching(
        model=model.name, method=options.method, sweeps=r.sweeps, pairs=tuple(pairs),
        sites=tuple(SiteSpread(site, sweep, Spread.of(scores[(sweep, site)])) for sweep, site in order),
    )


@dataclass(frozen=True)
class PromptAblation:
    prompt: str
    target: str
    p_before: float
    p_after: float
    kl: float
    logit_diff_before: float | None
    logit_diff_after: float | None


@dataclass(frozen=True)
class DatasetAblation:
    model: str
    components: str
    mode: str
    prompts: tuple[PromptAblation, ...]
    kl: Spread
    p_before: Spread
    p_after: Spread
    logit_diff_change: Spread | None  # after - before, where a contrast is given


def dataset_ablation(model: LoadedModel, rows: Sequence[dict], components: str, options, *, reference: Sequence[str] | None = None) -> DatasetAblation:
    """Ablate ``components`` in every row's prompt (``{"prompt", "target"?, "contrast"?}``)."""
    options.validate()
    out = []
    for row in rows:
        r = ablate(
            model, row["prompt"], components, mode=options.mode, reference=reference, samples=options.samples, seed=options.seed,
            target=row.get("target", options.target), contrast=row.get("contrast", options.contrast), token_index=options.token_index,
            k=options.top_k, prepend_bos=options.prepend_bos,
        )
        out.append(PromptAblation(r.prompt, r.before.target.token, r.before.target.prob, r.after.target.prob, r.kl, r.before.logit_diff, r.after.logit_diff))
    diffs = [p.logit_diff_after - p.logit_diff_before for p in out if p.logit_diff_before is not None]
    return DatasetAblation(
        model=model.name, components=components, mode=options.mode, prompts=tuple(out),
        kl=Spread.of([p.kl for p in out]), p_before=Spread.of([p.p_before for p in out]), p_after=Spread.of([p.p_after for p in out]),
        logit_diff_change=Spread.of(diffs) if diffs else None,
    )
