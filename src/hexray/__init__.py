"""HexRay: a debugger and neuroscope for transformer language models.

    >>> import hexray
    >>> model = hexray.load_model()                      # embedded SmolLM2-135M-Instruct
    >>> report = hexray.analyze(model, "The capital of France is", hexray.AnalysisOptions(granularity="head"))
    >>> report.attribution.top(5)
"""

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

__version__ = "0.1.0"

__all__ = [
    "AnalysisOptions",
    "GenerationOptions",
    "HexRayError",
    "LoadedModel",
    "Report",
    "Trace",
    "TracedGeneration",
    "ablate",
    "activation_patching",
    "analyze",
    "attribution_hooks",
    "classify_heads",
    "direct_logit_attribution",
    "generate_traced",
    "load_activations",
    "load_model",
    "logit_lens",
    "residual_trace",
    "run_trace",
    "save_activations",
]
