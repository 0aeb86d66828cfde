"""Dataset-level attribution: the mean and spread of direct logit attribution over a set of prompts.

The prompts run in batches through :func:`hexray.tracing.engine.trace_prompts`; each prompt's
attribution is exactly its single run's, and the statistics accumulate one prompt at a time, so a
large set never sits in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution
from hexray.analysis.results import Granularity, TokenScore
from hexray.models.loading import LoadedModel
from hexray.tracing.engine import trace_prompts
from hexray.tracing.sites import Component


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (0 for one value), min and max over ``n`` values."""

    mean: float
    std: float
    min: float
    max: float
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Spread:
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        return Spread(mean, std, min(values), max(values), n)


@dataclass(frozen=True)
class ComponentSpread:
    component: Component
    score: Spread

    @property
    def name(self) -> str:
        return self.component.name


@dataclass(frozen=True)
class PromptOutcome:
    """One prompt of the set: what was explained there."""

    prompt: str
    position: int
    target: TokenScore
    contrast: TokenScore | None
    value: float


@dataclass(frozen=True)
class DatasetAttribution:
    model: str
    granularity: Granularity
    token_index: int
    prompts: tuple[PromptOutcome, ...]
    value: Spread
    components: tuple[ComponentSpread, ...]  # sorted by |mean score| descending

    def top(self, k: int) -> tuple[ComponentSpread, ...]:
        return self.components[:k]


def dataset_attribution(model: LoadedModel, rows: Sequence[dict], options, *, batch_size: int | None = None) -> DatasetAttribution:
    """Attribution of every row's prompt (``{"prompt", "target"?, "contrast"?}``; ``options`` fill what a row leaves out)."""
    options.validate()
    ids = [
        (
            model.single_token(r["target"], role="target") if r.get("target") else model.single_token(options.target, role="target") if options.target else None,
            model.single_token(r["contrast"], role="contrast") if r.get("contrast") else model.single_token(options.contrast, role="contrast") if options.contrast else None,
        )
        for r in rows
    ]
    hooks = attribution_hooks(model.spec, options.granularity)
    outcomes, scores = [], {}
    traces = trace_prompts(model, (r["prompt"] for r in rows), hooks, prepend_bos=options.prepend_bos, batch_size=batch_size)
    for (target, contrast), trace in zip(ids, traces):
        a = direct_logit_attribution(model, trace, position=options.token_index, target=target, contrast=contrast, granularity=options.granularity)
        outcomes.append(PromptOutcome(trace.prompt, a.position, a.target, a.contrast, a.value))
        for c in a.components:
            scores.setdefault(c.component, []).append(c.score)
    spreads = sorted((ComponentSpread(c, Spread.of(v)) for c, v in scores.items()), key=lambda s: -abs(s.score.mean))
    return DatasetAttribution(
        model=model.name, granularity=options.granularity, token_index=options.token_index, prompts=tuple(outcomes),
        value=Spread.of([o.value for o in outcomes]), components=tuple(spreads),
    )
