"""Splitting text into reasoning steps, and attributing each step in the full context."""

from __future__ import annotations

import re

from hexray.analysis.attribution import direct_logit_attribution
from hexray.analysis.results import Granularity, ReasoningStep, StepAttribution
from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel
from hexray.tracing.engine import Trace

_NUMBERED = re.compile(r"(?m)^\s*\d+\s*[.)]\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=\S)")


def split_steps(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Split ``text`` into steps; returns the rule used and each step's (start, end) char span.

    Rules, first that applies: explicit ``Step N:`` markers, numbered lines, lines, sentences.
    """
    if not text.strip():
        raise HexRayError("the text to split into steps is empty")
    markers = [m.start() for m in re.finditer(r"(?i)\bstep\s*\d+\s*[:.)]", text)]
    if len(markers) >= 2:
        return "step markers", _spans_from_starts(text, markers)
    numbered = [m.start() for m in _NUMBERED.finditer(text)]
    if len(numbered) >= 2:
        return "numbered lines", _spans_from_starts(text, numbered)
    lines = [m.start() for m in re.finditer(r"(?m)^(?=.*\S)", text)]
    if len(lines) >= 2:
        return "lines", _spans_from_starts(text, lines)
    starts = [0] + [m.end() for m in _SENTENCE_END.finditer(text)]
    return "sentences", _spans_from_starts(text, starts)


def _spans_from_starts(text: str, starts: list[int]) -> list[tuple[int, int]]:
    """Spans between consecutive starts, whitespace-trimmed; text before the first start joins it."""
    starts = sorted(set([0] + starts))
    spans = []
    for begin, end in zip(starts, starts[1:] + [len(text)]):
        chunk = text[begin:end]
        left = len(chunk) - len(chunk.lstrip())
        right = len(chunk.rstrip())
        if right > left:
            spans.append((begin + left, begin + right))
    return spans


def token_span(offsets, char_span: tuple[int, int]) -> tuple[int, int]:
    """The [start, end) token positions whose characters overlap ``char_span``."""
    begin, end = char_span
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > begin]
    if not inside:
        return (0, 0)
    return inside[0], inside[-1] + 1


def step_attribution(
    model: LoadedModel, trace: Trace, *, granularity: Granularity = "layer", text: str | None = None
) -> StepAttribution:
    """Each step's attribution at its last token, all from the one forward pass in ``trace``.

    The prediction explained at a step's last token is the model's own next-token prediction
    there, computed with the whole preceding prompt in context (never the step re-run alone).
    """
    rule, spans = split_steps(text if text is not None else trace.prompt)
    steps = []
    for span in spans:
        t0, t1 = token_span(trace.offsets, span)
        if t1 <= t0:
            continue
        attribution = direct_logit_attribution(model, trace, position=t1 - 1, granularity=granularity)
        steps.append(ReasoningStep(len(steps) + 1, trace.prompt[span[0] : span[1]], span, (t0, t1), attribution))
    return StepAttribution(rule=rule, steps=tuple(steps))
