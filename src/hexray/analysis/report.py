"""One request, one forward pass, every requested analysis: what ``hexray --prompt ...`` computes.

The CLI and the server both call :func:`analyze`; renderers turn its :class:`Report` into
console tables, ``--json`` and the HTML report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hexray.analysis.arithmetic import arithmetic_graph, arithmetic_hooks
from hexray.analysis.attribution import attribution_hooks, check_granularity, direct_logit_attribution
from hexray.analysis.lens import lens_hooks, logit_lens, next_token_predictions, residual_hooks, residual_trace
from hexray.analysis.results import ArithmeticGraph, Attribution, Granularity, LogitLens, ResidualTrace, StepAttribution, TokenScore, WeightView
from hexray.analysis.steps import step_attribution
from hexray.analysis.weights import weight_view
from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel, ModelSpec
from hexray.tracing.engine import Trace, run_trace


@dataclass(frozen=True)
class AnalysisOptions:
    """The options of ``hexray --prompt``; every field has the CLI's default."""

    target: str | None = None  # a token string; None = the model's prediction
    contrast: str | None = None
    token_index: int = -1
    granularity: Granularity = "layer"
    top_k: int = 10
    logit_lens: bool = False
    lens_k: int = 5
    residual: bool = False
    logit_debug: bool = False  # adds per-head attribution even at layer granularity
    cot: bool = False
    weight_specs: tuple[str, ...] = ()
    arithmetic: bool = False
    save_hooks: tuple[str, ...] = ()  # hook names to keep in the trace for --save-activations
    prepend_bos: bool | None = None
    predictions_k: int = 0  # > 0: the top next tokens at every position (the lab's token strip)
    lens_window: int = 0  # > 0: the residual trace's lens only at this many positions up to the explained one

    def validate(self) -> None:
        """Checks that need no model: run before loading anything."""
        check_granularity(self.granularity)
        if self.top_k <= 0:
            raise HexRayError(f"--top-k-attribution must be positive, got {self.top_k}")
        if self.lens_k <= 0:
            raise HexRayError(f"--lens-k must be positive, got {self.lens_k}")
        if self.lens_window < 0:
            raise HexRayError(f"lens_window must be 0 or more, got {self.lens_window}")
        if self.predictions_k < 0:
            raise HexRayError(f"predictions_k must be 0 or more, got {self.predictions_k}")


@dataclass(frozen=True)
class Report:
    spec: ModelSpec
    options: AnalysisOptions
    attribution: Attribution
    head_attribution: Attribution | None = None  # --logit-debug: per head, whatever the granularity
    logit_lens: LogitLens | None = None
    residual: ResidualTrace | None = None
    steps: StepAttribution | None = None
    weights: tuple[WeightView, ...] = ()
    arithmetic: ArithmeticGraph | None = None
    predictions: tuple[tuple[TokenScore, ...], ...] | None = None  # [pos][k]
    trace: Trace | None = field(default=None, repr=False, compare=False)


def plan_hooks(spec: ModelSpec, options: AnalysisOptions) -> set[str]:
    """Every hook the requested analyses read, so one filtered forward pass serves them all."""
    hooks = attribution_hooks(spec, options.granularity)
    if options.logit_debug and options.granularity == "layer":
        hooks |= attribution_hooks(spec, "head")
    if options.logit_lens:
        hooks |= lens_hooks(spec)
    if options.residual:
        hooks |= residual_hooks(spec)
    if options.arithmetic:
        hooks |= arithmetic_hooks(spec)
    return hooks | set(options.save_hooks)


def analyze(model: LoadedModel, prompt: str, options: AnalysisOptions = AnalysisOptions()) -> Report:
    """Run ``prompt`` once and compute every analysis ``options`` asks for."""
    options.validate()
    # resolve everything a user can get wrong before the forward pass
    target = model.single_token(options.target, role="target") if options.target is not None else None
    contrast = model.single_token(options.contrast, role="contrast") if options.contrast is not None else None
    weights = tuple(weight_view(model, spec) for spec in options.weight_specs)
    trace = run_trace(model, prompt, plan_hooks(model.spec, options), prepend_bos=options.prepend_bos)

    attribution = direct_logit_attribution(
        model, trace, position=options.token_index, target=target, contrast=contrast, granularity=options.granularity
    )
    head_attribution = None
    if options.logit_debug:
        head_attribution = attribution if options.granularity != "layer" else direct_logit_attribution(
            model, trace, position=options.token_index, target=target, contrast=contrast, granularity="head"
        )
    return Report(
        spec=model.spec,
        options=options,
        attribution=attribution,
        head_attribution=head_attribution,
        logit_lens=logit_lens(model, trace, position=attribution.position, target=attribution.target.id, k=options.lens_k)
        if options.logit_lens
        else None,
        residual=residual_trace(model, trace, lens_positions=_lens_window(attribution.position, options.lens_window))
        if options.residual
        else None,
        steps=step_attribution(model, trace, granularity=options.granularity) if options.cot else None,
        weights=weights,
        arithmetic=arithmetic_graph(model, trace, position=attribution.position) if options.arithmetic else None,
        predictions=next_token_predictions(model, trace, k=options.predictions_k) if options.predictions_k else None,
        trace=trace,
    )


def _lens_window(position: int, window: int) -> range | None:
    return range(max(0, position - window + 1), position + 1) if window else None
