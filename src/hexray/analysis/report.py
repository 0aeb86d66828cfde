"""One request, one forward pass, every requested analysis: what ``hexray trace`` computes.

The CLI and the server both call :func:`analyze`; the analyses it runs, their options, and how
each is rendered come from :mod:`hexray.analysis.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hexray.analysis.attribution import direct_logit_attribution
from hexray.analysis.lens import LayerSnapshot, layer_snapshot
from hexray.analysis.registry import Analysis, Context, analyses
from hexray.analysis.results import GRANULARITIES, Attribution, ComparableResult
from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel, ModelSpec
from hexray.options import Option, options_class
from hexray.tracing.engine import Trace, run_trace

CORE_OPTIONS: tuple[Option, ...] = (
    Option("target", str | None, None, "Explain this token's logit (one token, e.g. ' Mary'). Default: the prediction."),
    Option("contrast", str | None, None, "Explain logit(target) - logit(contrast), e.g. ' John'."),
    Option("token_index", int, -1, "Position whose next-token prediction to explain; negative counts from the end."),
    Option("granularity", str, "layer", "layer | head | neuron.", choices=GRANULARITIES, unknown="unknown granularity {value!r}", api_default="head"),
    Option("top_k", int, 10, "Show the top K components.", flag="--top-k-attribution", short="-k", gt=0, api_le=1000, cli_unset=True),
    Option("prepend_bos", bool | None, None, "Force a BOS token on or off (default: the model's own tokenizer behaviour).", flag="--prepend-bos/--no-prepend-bos"),
    Option("save_hooks", tuple[str, ...], (), "Hook names to keep in the trace (for saving activations).", flag="", api=False),
)


def trace_options() -> tuple[Option, ...]:
    """Every option of ``hexray trace`` / ``/api/analyze``: the core ones, then each analysis's."""
    return CORE_OPTIONS + tuple(o for a in analyses() for o in a.all_options)


AnalysisOptions = options_class(
    "AnalysisOptions", trace_options(),
    doc="The options of ``hexray trace`` (and ``/api/analyze``): the core ones and every registered analysis's; the CLI's defaults.",
)


@dataclass(frozen=True, eq=False)
class Report(ComparableResult):
    """The core attribution and every requested analysis's result, by registry name.

    ``report.logit_lens`` (any registry name) is that analysis's result, or its ``absent`` value
    (None, or () for weights) when it was not asked for.
    """

    spec: ModelSpec
    options: Any  # AnalysisOptions
    attribution: Attribution
    sections: Mapping[str, Any] = field(default_factory=dict)
    trace: Trace | None = field(default=None, repr=False, compare=False)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("spec", "options", "attribution", "sections", "trace"):
            raise AttributeError(name)
        for a in analyses():
            if a.name == name:
                return self.sections.get(name, a.absent)
        raise AttributeError(f"Report has no analysis {name!r}")

    @property
    def context(self) -> Context:
        return Context(self.spec, self.options, self.attribution)

    def computed(self) -> list[tuple[Analysis, Any]]:
        """(analysis, result) for the core attribution and every analysis computed, in registry order."""
        return [(a, self.attribution if a.switch is None else self.sections[a.name]) for a in analyses() if a.switch is None or a.name in self.sections]

    def _repr_html_(self) -> str:
        from hexray.render.html import report_html

        return report_html(self, {})


def plan_hooks(spec: ModelSpec, options) -> set[str]:
    """Every hook the requested analyses read, so one filtered forward pass serves them all."""
    hooks: set[str] = set(options.save_hooks)
    for a in analyses():
        if a.enabled(options):
            hooks |= a.hooks(spec, options)
    return hooks


def analyze(model: LoadedModel, prompt: str, options=None, *, on_layer: Callable[[LayerSnapshot], None] | None = None) -> Report:
    """Run ``prompt`` once and compute every analysis ``options`` asks for.

    ``on_layer`` gets a :class:`LayerSnapshot` as each block finishes, during the forward pass.
    """
    options = AnalysisOptions() if options is None else options
    options.validate()
    # resolve everything a user can get wrong before the forward pass
    target = model.single_token(options.target, role="target") if options.target is not None else None
    contrast = model.single_token(options.contrast, role="contrast") if options.contrast is not None else None
    watch = None
    if on_layer is not None:
        def watch(layer, acts):
            on_layer(layer_snapshot(model, layer, acts, position=options.token_index, target=target, k=getattr(options, "lens_k", 5)))
    trace = run_trace(model, prompt, plan_hooks(model.spec, options), prepend_bos=options.prepend_bos, on_layer=watch)
    attribution = direct_logit_attribution(
        model, trace, position=options.token_index, target=target, contrast=contrast, granularity=options.granularity
    )
    if attribution.contrast is not None and attribution.contrast.id == attribution.target.id:
        raise HexRayError("target and contrast are the same token", hint="the explained value would be 0; give a different {field}", field="contrast")
    for a in analyses():
        if a.refine is not None and a.enabled(options):
            attribution = a.refine(model, trace, attribution, options)
    ctx = Context(model.spec, options, attribution)
    sections = {a.name: a.compute(model, trace, ctx) for a in analyses() if a.switch is not None and a.enabled(options)}
    return Report(spec=model.spec, options=options, attribution=attribution, sections=sections, trace=trace)
