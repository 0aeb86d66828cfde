"""The frozen results of the causal tools; renderers, ``--json`` and the server consume these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from hexray.analysis.results import ComparableResult, OnPrompt, PromptRef, TokenScore
from hexray.tracing.sites import Component

Sweep = Literal["heads", "heads-pos", "resid", "attn", "mlp", "neurons"]
SWEEPS: tuple[str, ...] = ("heads", "heads-pos", "resid", "attn", "mlp", "neurons", "features")
SWEEP_KINDS: dict[str, str] = {"heads": "head", "heads-pos": "head", "resid": "resid", "attn": "attn", "mlp": "mlp", "neurons": "neuron", "features": "feature"}
Method = Literal["exact", "attribution", "both"]
METHODS: tuple[str, ...] = ("exact", "attribution", "both")
AblationMode = Literal["zero", "mean", "resample"]
ABLATION_MODES: tuple[str, ...] = ("zero", "mean", "resample")


@dataclass(frozen=True)
class Site:
    """A component at one position (``position=None``: at every position)."""

    component: Component
    position: int | None = None
    value: float | None = None  # features: clamp the latent to this activation instead of the mode's value
    steer: float | None = None  # features: add this multiple of the decoder row instead (steering)

    @property
    def name(self) -> str:
        return self.component.name

    @property
    def label(self) -> str:
        name = self.name if self.value is None else f"{self.name}={self.value:g}"
        name = name if self.steer is None else f"{name}+={self.steer:g}"
        return name if self.position is None else f"{name}@{self.position}"


@dataclass(frozen=True)
class PatchScore:
    """One patched site. ``score`` is normalised: 1 = clean behaviour, 0 = corrupt behaviour."""

    site: Site
    sweep: Sweep
    score: float  # exact when measured, else the attribution estimate
    attribution: float | None = None  # the gradient estimate, with method="both"


@dataclass(frozen=True, eq=False)
class PatchingResult(ComparableResult):
    clean: PromptRef
    corrupt: PromptRef
    target: TokenScore  # on the clean prompt
    contrast: TokenScore
    clean_value: float  # logit(target) - logit(contrast) on the clean prompt
    corrupt_value: float
    method: Method
    sweeps: tuple[Sweep, ...]
    last_position_only: bool
    results: tuple[PatchScore, ...]  # in sweep order, then layer, head, position
    correlation: dict[str, float | None] | None = None  # per sweep (and "all"), exact vs attribution

    metric: str = "logit_diff"

    model = property(lambda self: self.clean.model)
    clean_prompt = property(lambda self: self.clean.prompt)
    corrupt_prompt = property(lambda self: self.corrupt.prompt)
    clean_tokens = property(lambda self: self.clean.tokens)
    corrupt_tokens = property(lambda self: self.corrupt.tokens)
    clean_token_ids = property(lambda self: self.clean.token_ids)
    corrupt_token_ids = property(lambda self: self.corrupt.token_ids)

    def _repr_html_(self) -> str:
        from hexray.render.html import patching_html

        return patching_html(self, {}, 10)

    def top(self, k: int, sweep: str | None = None) -> tuple[PatchScore, ...]:
        rows = [r for r in self.results if sweep is None or r.sweep == sweep]
        return tuple(sorted(rows, key=lambda r: -abs(r.score))[:k])

    def of(self, sweep: str) -> tuple[PatchScore, ...]:
        return tuple(r for r in self.results if r.sweep == sweep)

    def grid(self, sweep: str, *, attribution: bool = False) -> tuple[np.ndarray, list[str], list[str]]:
        """A sweep's scores as a heatmap: (values [rows, cols], row labels, column labels).

        heads: layers x heads; heads-pos: heads x positions; resid/attn/mlp: layers x positions;
        neurons: layers x neurons; features: dictionary layers x features. Missing cells are NaN.
        """
        rows = self.of(sweep)
        def row_key(r: PatchScore) -> str:
            c = r.site.component
            return c.name if sweep == "heads-pos" else f"L{c.layer}"
        def col_key(r: PatchScore):
            c = r.site.component
            return {"heads": c.head, "neurons": c.neuron, "features": c.feature}.get(sweep, r.site.position)
        row_labels = list(dict.fromkeys(row_key(r) for r in rows))
        cols = sorted({col_key(r) for r in rows}, key=lambda v: -1 if v is None else v)
        values = np.full((len(row_labels), len(cols)), np.nan)
        ri, ci = {k: i for i, k in enumerate(row_labels)}, {k: i for i, k in enumerate(cols)}
        for r in rows:
            values[ri[row_key(r)], ci[col_key(r)]] = r.attribution if attribution else r.score
        tokens = self.corrupt_tokens
        if sweep == "heads":
            col_labels = [f"H{c}" for c in cols]
        elif sweep in ("neurons", "features"):
            col_labels = [str(c) for c in cols]
        else:
            col_labels = ["all" if c is None else f"{c}:{tokens[c]!r}" for c in cols]
        return values, row_labels, col_labels


@dataclass(frozen=True)
class Distribution:
    """The next-token distribution at one position."""

    top: tuple[TokenScore, ...]
    target: TokenScore
    contrast: TokenScore | None
    logit_diff: float | None  # logit(target) - logit(contrast)


@dataclass(frozen=True)
class AblationResult(OnPrompt):
    ref: PromptRef
    position: int
    sites: tuple[Site, ...]
    mode: AblationMode
    n_reference: int  # reference prompts behind mean/resample (0 for zero)
    samples: int  # resample draws averaged
    before: Distribution
    after: Distribution
    kl: float  # KL(before || after), nats

    def _repr_html_(self) -> str:
        from hexray.render.html import ablation_html

        return ablation_html(self, {})
