"""Reasoning steps of generated text, what each drew on, and the graph of those dependencies."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hexray.analysis.results import ComponentScore
from hexray.analysis.steps import split_steps, token_span
from hexray.generation.results import GenStep, StepEdge, ReasoningGraph, StepDependency, TokenRecord
from hexray.models.loading import LoadedModel
from hexray.tracing.sites import Component


def generated_offsets(model: LoadedModel, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Each generated token's character span in the decoded text (decoding prefixes keeps
    multi-byte characters that straddle tokens in the right place)."""
    spans, previous = [], 0
    for i in range(len(ids)):
        end = len(model.tokenizer.decode(list(ids[: i + 1])))
        spans.append((previous, max(previous, end)))
        previous = max(previous, end)
    return spans


def _top(values: np.ndarray, components: Sequence[Component], k: int) -> tuple[ComponentScore, ...]:
    order = np.argsort(-np.abs(values))[:k]
    return tuple(ComponentScore(components[i], float(values[i])) for i in order)


def reasoning_steps(
    model: LoadedModel,
    records: Sequence[TokenRecord],
    components: Sequence[Component],
    scores: np.ndarray,  # [n_generated, n_components]
    prompt_ids: Sequence[int],
    *,
    top_k: int = 5,
    graph_threshold: float = 0.1,
) -> tuple[str, tuple[GenStep, ...], ReasoningGraph]:
    """Split the generated text into steps and measure, per step, what it drew on."""
    prompt_len = len(prompt_ids)
    ids = [r.id for r in records]
    text = model.tokenizer.decode(ids) if ids else ""
    if not text.strip():
        return "none", (), ReasoningGraph(("prompt",), (), graph_threshold)
    rule, spans = split_steps(text)
    offsets = generated_offsets(model, ids)
    steps: list[GenStep] = []
    seq_spans: list[tuple[str, int, int]] = [("prompt", 0, prompt_len)]  # source name, [start, end) sequence positions
    previous_sum = None
    edges: list[StepEdge] = []
    for span in spans:
        t0, t1 = token_span(offsets, span)
        if t1 <= t0:
            continue
        index = len(steps) + 1
        summed = scores[t0:t1].sum(0) if len(components) else np.zeros(0)
        change = summed - previous_sum if previous_sum is not None else summed
        previous_sum = summed
        step_records = records[t0:t1]
        depends = []
        for name, a, b in seq_spans:
            dla = sum(float(r.source_dla[a : min(b, r.position + 1)].sum()) for r in step_records)
            attention = float(np.mean([r.source_attention[a : min(b, r.position + 1)].sum() for r in step_records]))
            depends.append(StepDependency(name, attention, dla))
        from_prompt = sum(r.source_dla[:prompt_len] for r in step_records)
        top_positions = np.argsort(-np.abs(from_prompt))[:top_k]
        prompt_tokens = tuple((int(p), model.token_str(prompt_ids[p]), float(from_prompt[p])) for p in top_positions) if prompt_len else ()
        steps.append(GenStep(
            index=index, text=text[span[0] : span[1]], char_span=span, token_span=(t0, t1),
            top=_top(summed, components, top_k), change=_top(change, components, top_k) if index > 1 else (),
            depends=tuple(depends), top_prompt_tokens=prompt_tokens,
        ))
        biggest = max((abs(d.dla) for d in depends), default=0.0)
        edges += [
            StepEdge(d.source, f"step {index}", d.dla, d.attention)
            for d in depends
            if biggest > 0 and abs(d.dla) >= graph_threshold * biggest
        ]
        seq_spans.append((f"step {index}", prompt_len + t0, prompt_len + t1))
    nodes = ("prompt", *(f"step {s.index}" for s in steps))
    return rule, tuple(steps), ReasoningGraph(nodes, tuple(edges), graph_threshold)
