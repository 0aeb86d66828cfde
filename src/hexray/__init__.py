"""HexRay: a debugger and neuroscope for transformer language models.

    >>> import hexray
    >>> model = hexray.load_model()                      # embedded SmolLM2-135M-Instruct
    >>> report = hexray.analyze(model, "The capital of France is", hexray.AnalysisOptions(granularity="head"))
    >>> report.attribution.top(5)
"""

from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution
from hexray.analysis.lens import logit_lens, residual_trace
from hexray.analysis.report import AnalysisOptions, Report, analyze
from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel, load_model
from hexray.tracing.activations import load_activations, save_activations
from hexray.tracing.engine import Trace, run_trace

__version__ = "0.1.0"

__all__ = [
    "AnalysisOptions",
    "HexRayError",
    "LoadedModel",
    "Report",
    "Trace",
    "analyze",
    "attribution_hooks",
    "direct_logit_attribution",
    "load_activations",
    "load_model",
    "logit_lens",
    "residual_trace",
    "run_trace",
    "save_activations",
]
