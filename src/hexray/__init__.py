"""HexRay: a debugger and neuroscope for transformer language models.

    >>> import hexray
    >>> model = hexray.load_model()                      # embedded SmolLM2-135M-Instruct
    >>> report = hexray.analyze(model, "The capital of France is", hexray.AnalysisOptions(granularity="head"))
    >>> report.attribution.top(5)

The names below are imported on first use (PEP 562), so ``import hexray.warm`` (the CLI's warm
path) and ``hexray --version`` never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "attribution_hooks": "hexray.analysis.attribution",
    "direct_logit_attribution": "hexray.analysis.attribution",
    "classify_heads": "hexray.analysis.heads",
    "logit_lens": "hexray.analysis.lens",
    "residual_trace": "hexray.analysis.lens",
    "AnalysisOptions": "hexray.analysis.report",
    "Report": "hexray.analysis.report",
    "analyze": "hexray.analysis.report",
    "HexRayError": "hexray.errors",
    "GenerationOptions": "hexray.generation.tracer",
    "TracedGeneration": "hexray.generation.tracer",
    "generate_traced": "hexray.generation.tracer",
    "ablate": "hexray.intervene.ablation",
    "activation_patching": "hexray.intervene.patching",
    "LoadedModel": "hexray.models.loading",
    "load_model": "hexray.models.loading",
    "load_activations": "hexray.tracing.activations",
    "save_activations": "hexray.tracing.activations",
    "Trace": "hexray.tracing.engine",
    "run_trace": "hexray.tracing.engine",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution
    from hexray.analysis.heads import classify_heads
    from hexray.analysis.lens import logit_lens, residual_trace
    from hexray.analysis.report import AnalysisOptions, Report, analyze
    from hexray.errors import HexRayError
    from hexray.generation.tracer import GenerationOptions, TracedGeneration, generate_traced
    from hexray.intervene.ablation import ablate
    from hexray.intervene.patching import activation_patching
    from hexray.models.loading import LoadedModel, load_model
    from hexray.tracing.activations import load_activations, save_activations
    from hexray.tracing.engine import Trace, run_trace


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_"):
        try:  # a subpackage not imported yet (hexray.models after a bare `import hexray`)
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
