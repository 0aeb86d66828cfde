"""The frozen result types every analysis returns.

Renderers (console, plots, HTML), ``--json`` and the server all consume these; none of them holds
a model reference. Arrays are numpy, on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from hexray.tracing.sites import Component

Granularity = Literal["layer", "head", "neuron"]
GRANULARITIES: tuple[str, ...] = ("layer", "head", "neuron")


@dataclass(frozen=True)
class TokenScore:
    """A token at a position with its logit and probability there."""

    token: str
    id: int
    logit: float
    prob: float


@dataclass(frozen=True)
class ComponentScore:
    component: Component
    score: float

    @property
    def name(self) -> str:
        return self.component.name


@dataclass(frozen=True)
class Attribution:
    """Direct logit attribution of ``value`` (a logit or logit difference) at one position.

    ``components`` is every component at ``granularity``, sorted by ``|score|`` descending, and
    their scores sum to ``value`` up to ``reconstruction_error`` (float rounding; ~1e-6 here).
    """

    model: str
    prompt: str
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    position: int
    target: TokenScore
    contrast: TokenScore | None
    value: float
    granularity: Granularity
    components: tuple[ComponentScore, ...]
    reconstruction_error: float

    def top(self, k: int) -> tuple[ComponentScore, ...]:
        return self.components[:k]

    def score_of(self, name: str) -> float:
        for c in self.components:
            if c.name == name:
                return c.score
        raise KeyError(name)

    def head_matrix(self, n_layers: int, n_heads: int) -> np.ndarray:
        """Per-head scores as [n_layers, n_heads] (NaN at layer granularity, which has no heads)."""
        out = np.full((n_layers, n_heads), np.nan)
        for c in self.components:
            if c.component.kind == "head":
                out[c.component.layer, c.component.head] = c.score
        return out

    def layer_totals(self, n_layers: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer (attention, MLP) totals, [n_layers] each, at any granularity."""
        attn, mlp = np.zeros(n_layers), np.zeros(n_layers)
        for c in self.components:
            kind = c.component.kind
            if kind in ("attn", "head"):
                attn[c.component.layer] += c.score
            elif kind in ("mlp", "neuron"):
                mlp[c.component.layer] += c.score
        return attn, mlp


@dataclass(frozen=True)
class LensRow:
    """The logit lens on the residual stream after ``label`` (``embed``, ``L0`` ...)."""

    label: str
    top: tuple[TokenScore, ...]
    target_rank: int  # 0 = top token
    target_prob: float


@dataclass(frozen=True)
class LogitLens:
    position: int
    target: TokenScore
    rows: tuple[LensRow, ...]  # n_layers + 1: embeddings, then after each block


@dataclass(frozen=True)
class ResidualTrace:
    """Per layer and position: how the residual stream grew and what it already predicts.

    Row ``r`` of the ``[n_layers + 1, pos]`` arrays is the stream after ``row_labels[r]``.
    """

    model: str
    tokens: tuple[str, ...]
    row_labels: tuple[str, ...]
    resid_norm: np.ndarray  # [n_layers + 1, pos]
    attn_delta_norm: np.ndarray  # [n_layers, pos]: |attention output| written by each block
    mlp_delta_norm: np.ndarray  # [n_layers, pos]
    lens_top_tokens: tuple[tuple[str, ...], ...]  # [n_layers + 1][lens position]
    lens_top_probs: np.ndarray  # [n_layers + 1, lens position]
    lens_positions: tuple[int, ...] = ()  # the positions the lens columns are at (default: every position)


@dataclass(frozen=True)
class ReasoningStep:
    index: int
    text: str
    char_span: tuple[int, int]
    token_span: tuple[int, int]  # [start, end) token positions
    attribution: Attribution  # at the step's last token, computed in the full context


@dataclass(frozen=True)
class StepAttribution:
    rule: str  # how the text was split: "step markers", "numbered lines", "lines", "sentences"
    steps: tuple[ReasoningStep, ...]


@dataclass(frozen=True)
class WeightView:
    """One weight matrix, split per head where it is per head."""

    spec: str  # as the user wrote it: attn.L10.W_Q
    layer: int
    weight: str  # W_Q, W_K, W_V, W_O, W_in, W_out, W_gate
    per_head: bool
    matrices: np.ndarray  # [n_heads or 1, rows, cols]
    row_axis: str  # e.g. d_model
    col_axis: str  # e.g. d_head
    norms: np.ndarray  # [n_heads or 1] Frobenius norms


@dataclass(frozen=True)
class GraphNode:
    id: str
    label: str
    kind: Literal["operand", "operator", "head", "mlp", "answer"]
    position: int | None = None
    value: float = 0.0


@dataclass(frozen=True)
class GraphEdge:
    source: str
    target: str
    kind: Literal["attends", "writes"]
    weight: float


@dataclass(frozen=True)
class ArithmeticGraph:
    """How the model computed an arithmetic answer, read from its own forward pass."""

    model: str
    prompt: str
    tokens: tuple[str, ...]
    position: int
    answer: TokenScore
    operand_positions: tuple[int, ...]
    operator_positions: tuple[int, ...]
    operand_attention: np.ndarray  # [n_layers, n_heads, n_operands]: answer position -> operand
    head_scores: np.ndarray  # [n_layers, n_heads]: direct attribution to the answer
    mlp_scores: np.ndarray  # [n_layers]
    answer_rank: np.ndarray  # [n_layers + 1]: the answer's logit-lens rank after each layer
    nodes: tuple[GraphNode, ...]
    edges: tuple[GraphEdge, ...]


HeadRole = Literal["previous_token", "duplicate_token", "induction", "bos"]
HEAD_ROLES: tuple[HeadRole, ...] = ("induction", "duplicate_token", "previous_token", "bos")  # tie order


@dataclass(frozen=True)
class HeadClassification:
    """Role scores of every head; ``scores[role]`` is [n_layers, n_heads], ``labels[layer][head]``."""

    model: str
    prompt: str  # the text behind the previous-token, duplicate-token and BOS scores
    tokens: tuple[str, ...]
    threshold: float
    seq_len: int  # induction: random sequences of this length, repeated once
    n_sequences: int
    seed: int
    scores: dict[str, np.ndarray]
    labels: tuple[tuple[str | None, ...], ...]

    def heads(self):
        """``(layer, head, {role: score}, label)`` for every head, layer by layer."""
        for layer, row in enumerate(self.labels):
            for head, label in enumerate(row):
                yield layer, head, {r: float(self.scores[r][layer, head]) for r in HEAD_ROLES}, label

    def top(self, role: str, k: int) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads for ``role``: (layer, head, score); undefined scores are left out."""
        s = self.scores[role]
        flat = [i for i in np.argsort(-np.nan_to_num(s, nan=-np.inf), axis=None) if np.isfinite(s.flat[i])][:k]
        return [(int(i // s.shape[1]), int(i % s.shape[1]), float(s.flat[i])) for i in flat]


@dataclass(frozen=True)
class HeadAttention:
    """One head's attention on a prompt, with its role scores (induction from random repeats)."""

    model: str
    prompt: str
    tokens: tuple[str, ...]
    layer: int
    head: int
    pattern: np.ndarray  # [q, k]: row q is where query position q attends
    scores: dict[str, float]  # role -> score, NaN where the prompt gives the role nothing to score
