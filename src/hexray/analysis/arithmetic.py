"""The arithmetic graph: how the model's own forward pass reached an arithmetic answer.

Nothing here evaluates the prompt. Operands are the number tokens the model saw; the graph's
edges are measured: how strongly the answer position attends to each operand (per head), and
how much each head and MLP writes the answer's logit (direct attribution).
"""

from __future__ import annotations

import re

import numpy as np

from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution
from hexray.analysis.lens import lens_hooks, lens_logits, stacked_residual
from hexray.analysis.results import ArithmeticEdge, ArithmeticGraph, ArithmeticNode
from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel, ModelSpec
from hexray.tracing import sites
from hexray.tracing.engine import Trace, resolve_position

_OPERATORS = {"+", "-", "*", "/", "×", "÷", "x", "=", "plus", "minus", "times", "divided", "multiplied"}
_TOP_WRITERS = 5  # heads kept for writing the answer
_TOP_MOVERS = 3  # heads kept for attending to operands
_TOP_MLPS = 3
_MIN_ATTENTION = 0.05


def arithmetic_hooks(spec: ModelSpec) -> set[str]:
    return attribution_hooks(spec, "head") | lens_hooks(spec) | {sites.attn_pattern(layer) for layer in range(spec.n_layers)}


def find_operands(tokens) -> tuple[list[list[int]], list[int]]:
    """Numbers (runs of digit tokens, as tokenizers often split digits) and operator positions."""
    numbers: list[list[int]] = []
    operators: list[int] = []
    for pos, tok in enumerate(tokens):
        text = tok.strip()
        if re.fullmatch(r"\d+([.,]\d+)?", text):
            glued = numbers and numbers[-1][-1] == pos - 1 and not tok[:1].isspace()
            if glued:
                numbers[-1].append(pos)
            else:
                numbers.append([pos])
        elif text.lower() in _OPERATORS:
            operators.append(pos)
    return numbers, operators


def arithmetic_graph(model: LoadedModel, trace: Trace, *, position: int = -1) -> ArithmeticGraph:
    """Build the graph for the prediction at ``position`` (the answer's first token)."""
    spec = model.spec
    pos = resolve_position(position, trace.n_tokens)
    numbers, operators = find_operands(trace.tokens[: pos + 1])
    if not numbers:
        raise HexRayError("{field}: the prompt has no numbers before the answer position", hint='try e.g. "12 + 34 ="', field="arithmetic")
    attribution = direct_logit_attribution(model, trace, position=pos, granularity="head")
    head_scores = attribution.head_matrix(spec.n_layers, spec.n_heads)
    mlp_scores = attribution.layer_totals(spec.n_layers)[1]
    # attention from the answer position to each number's tokens: [layers, heads, numbers]
    attention = np.zeros((spec.n_layers, spec.n_heads, len(numbers)))
    for layer in range(spec.n_layers):
        pattern = trace.acts[sites.attn_pattern(layer)][:, pos, :]  # [heads, key_pos]
        for i, positions in enumerate(numbers):
            attention[layer, :, i] = pattern[:, positions].sum(-1).cpu().numpy()
    answer_id = attribution.target.id
    lens = lens_logits(model, stacked_residual(model, trace)[:, pos])  # [rows, d_vocab]
    answer_rank = (lens > lens[:, answer_id : answer_id + 1]).sum(-1).cpu().numpy()

    nodes = [ArithmeticNode(f"num{i}", "".join(trace.tokens[p] for p in ps).strip(), "operand", ps[0]) for i, ps in enumerate(numbers)]
    nodes += [ArithmeticNode(f"op{p}", trace.tokens[p].strip(), "operator", p) for p in operators]
    answer = ArithmeticNode("answer", attribution.target.token.strip() or repr(attribution.target.token), "answer", pos, attribution.value)
    edges: list[ArithmeticEdge] = []
    writers = _top_indices(np.abs(head_scores), _TOP_WRITERS)
    movers = _top_indices(attention.sum(-1), _TOP_MOVERS)
    for layer, head in dict.fromkeys(writers + movers):
        name = sites.head(layer, head).name
        node = ArithmeticNode(name, name, "head", None, float(head_scores[layer, head]))
        nodes.append(node)
        for i in range(len(numbers)):
            if attention[layer, head, i] >= _MIN_ATTENTION:
                edges.append(ArithmeticEdge(f"num{i}", node.id, "attends", float(attention[layer, head, i])))
        edges.append(ArithmeticEdge(node.id, "answer", "writes", float(head_scores[layer, head])))
    for layer in np.argsort(-np.abs(mlp_scores))[:_TOP_MLPS]:
        name = sites.Component("mlp", int(layer)).name
        nodes.append(ArithmeticNode(name, name, "mlp", None, float(mlp_scores[layer])))
        edges.append(ArithmeticEdge(name, "answer", "writes", float(mlp_scores[layer])))
    nodes.append(answer)
    return ArithmeticGraph(
        ref=trace.ref, position=pos, answer=attribution.target,
        operand_positions=tuple(p for ps in numbers for p in ps), operator_positions=tuple(operators),
        operand_attention=attention, head_scores=head_scores, mlp_scores=mlp_scores,
        answer_rank=answer_rank, nodes=tuple(nodes), edges=tuple(edges),
    )


def _top_indices(matrix: np.ndarray, k: int) -> list[tuple[int, int]]:
    flat = np.argsort(-matrix, axis=None)[:k]
    return [tuple(int(v) for v in np.unravel_index(i, matrix.shape)) for i in flat]  # type: ignore[misc]
