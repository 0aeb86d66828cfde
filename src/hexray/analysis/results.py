"""The frozen result types every analysis returns.

Renderers (console, plots, HTML), ``--json`` and the server all consume these; none of them holds
a model reference. Arrays are numpy, on the CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from hexray.tracing.sites import Component, head

Granularity = Literal["layer", "head", "neuron"]
GRANULARITIES: tuple[str, ...] = ("layer", "head", "neuron")


@dataclass(frozen=True)
class PromptRef:
    """The prompt a result is about: which model read which text as which tokens (shared by every result)."""

    model: str
    prompt: str
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]


class OnPrompt:
    """A result about one prompt: ``model``, ``prompt``, ``tokens`` and ``token_ids`` are its ``ref``'s."""

    ref: PromptRef

    @property
    def model(self) -> str:
        return self.ref.model

    @property
    def prompt(self) -> str:
        return self.ref.prompt

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.ref.tokens

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.ref.token_ids


def _value_key(v: Any) -> Any:
    """A hashable stand-in that is equal exactly when the values are (arrays by shape, dtype and content)."""
    if isinstance(v, np.ndarray):
        return ("ndarray", v.shape, v.dtype.str, v.tobytes())
    if isinstance(v, dict):
        return ("dict", tuple((k, _value_key(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_value_key(x) for x in v))
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return (type(v).__name__, tuple(_value_key(getattr(v, f.name)) for f in dataclasses.fields(v) if f.compare))
    return v


class ComparableResult:
    """Frozen results that hold arrays or dicts: ``==`` compares them by value, and they hash.

    Subclasses are ``@dataclass(frozen=True, eq=False)`` so these two methods are the ones used.
    """

    def _key(self) -> tuple:
        return tuple(_value_key(getattr(self, f.name)) for f in dataclasses.fields(self) if f.compare)  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))


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
class Attribution(OnPrompt):
    """Direct logit attribution of ``value`` (a logit or logit difference) at one position.

    ``components`` is every component at ``granularity``, sorted by ``|score|`` descending, and
    their scores sum to ``value`` up to ``reconstruction_error`` (float rounding; ~1e-6 here).
    """

    ref: PromptRef
    position: int
    target: TokenScore
    contrast: TokenScore | None
    value: float
    granularity: Granularity
    components: tuple[ComponentScore, ...]
    reconstruction_error: float

    def top(self, k: int) -> tuple[ComponentScore, ...]:
        return self.components[:k]

    def _repr_html_(self) -> str:
        from hexray.render.html import attribution_section

        return attribution_section(self, 10)

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
            kind, site = c.component.kind, c.component.site
            if kind in ("attn", "head") or site == "attn_out":
                attn[c.component.layer] += c.score
            elif kind in ("mlp", "neuron") or site in ("mlp", "mlp_out"):
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


@dataclass(frozen=True, eq=False)
class ResidualTrace(OnPrompt, ComparableResult):
    """Per layer and position: how the residual stream grew and what it already predicts.

    Row ``r`` of the ``[n_layers + 1, pos]`` arrays is the stream after ``row_labels[r]``.
    """

    ref: PromptRef
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


@dataclass(frozen=True, eq=False)
class WeightView(ComparableResult):
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
class ArithmeticNode:
    id: str
    label: str
    kind: Literal["operand", "operator", "head", "mlp", "answer"]
    position: int | None = None
    value: float = 0.0


@dataclass(frozen=True)
class ArithmeticEdge:
    source: str
    target: str
    kind: Literal["attends", "writes"]
    weight: float


@dataclass(frozen=True, eq=False)
class ArithmeticGraph(OnPrompt, ComparableResult):
    """How the model computed an arithmetic answer, read from its own forward pass."""

    ref: PromptRef
    position: int
    answer: TokenScore
    operand_positions: tuple[int, ...]
    operator_positions: tuple[int, ...]
    operand_attention: np.ndarray  # [n_layers, n_heads, n_operands]: answer position -> operand
    head_scores: np.ndarray  # [n_layers, n_heads]: direct attribution to the answer
    mlp_scores: np.ndarray  # [n_layers]
    answer_rank: np.ndarray  # [n_layers + 1]: the answer's logit-lens rank after each layer
    nodes: tuple[ArithmeticNode, ...]
    edges: tuple[ArithmeticEdge, ...]


HeadRole = Literal["previous_token", "duplicate_token", "induction", "bos"]
HEAD_ROLES: tuple[HeadRole, ...] = ("induction", "duplicate_token", "previous_token", "bos")  # tie order


@dataclass(frozen=True, eq=False)
class HeadClassification(OnPrompt, ComparableResult):
    """Role scores of every head; ``scores[role]`` is [n_layers, n_heads], ``labels[layer][head]``.

    ``ref`` is the text behind the previous-token, duplicate-token and BOS scores.
    """

    ref: PromptRef
    threshold: float
    seq_len: int  # induction: random sequences of this length, repeated once
    n_sequences: int
    seed: int
    scores: dict[str, np.ndarray]
    labels: tuple[tuple[str | None, ...], ...]

    def _repr_html_(self) -> str:
        from hexray.render.html import heads_html

        return heads_html(self, {})

    def heads(self):
        """``(layer, head, {role: score}, label)`` for every head, layer by layer."""
        for layer, row in enumerate(self.labels):
            for head, label in enumerate(row):
                yield layer, head, {r: float(self.scores[r][layer, head]) for r in HEAD_ROLES}, label

    def top(self, k: int, role: str = "induction") -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads for ``role``: (layer, head, score); undefined scores are left out."""
        s = self.scores[role]
        flat = [i for i in np.argsort(-np.nan_to_num(s, nan=-np.inf), axis=None) if np.isfinite(s.flat[i])][:k]
        return [(int(i // s.shape[1]), int(i % s.shape[1]), float(s.flat[i])) for i in flat]


@dataclass(frozen=True)
class TokenPair:
    """Query position ``query`` attending to key position ``key`` (``key <= query``), with both tokens."""

    query: int
    key: int
    query_token: str
    key_token: str
    weight: float  # the attention weight (a token flow: summed over heads, and over layers for its total)
    moved: float | None = None  # weight x ||v_key||: how much of the key's value the pair carries (head inspector only)


@dataclass(frozen=True, eq=False)
class HeadAttention(OnPrompt, ComparableResult):
    """One head's attention on a prompt: the pattern, inspector metrics and role scores (induction from random repeats).

    Means are over queries 1.. (query 0 can only attend to itself). The pair lists leave out query
    0, and key 0 when ``sink_excluded`` (it holds a special token: BOS or a chat marker).
    """

    ref: PromptRef
    layer: int
    head: int
    pattern: np.ndarray  # [q, k]: row q is where query position q attends
    scores: dict[str, float]  # role -> score, NaN where the prompt gives the role nothing to score
    entropy: np.ndarray  # [q]: -sum_k A log A, nats (0: one key; log(q + 1): uniform)
    mean_entropy: float  # over queries 1.. (NaN for one token)
    concentration: np.ndarray  # [q]: the largest weight of each query's row
    mean_concentration: float  # over queries 1..
    value_norm: np.ndarray  # [k]: ||v_k||, the head's value vector (grouped-query attention: its kv head's)
    output_norm: np.ndarray  # [q]: ||(sum_k A_qk v_k) W_O[h]||, what the head writes to the residual (no bias, before any post-norm)
    sink_excluded: bool  # key 0 is a special token, left out of the pair lists
    top_pairs: tuple[TokenPair, ...]  # the strongest pairs (k <= q) by weight, strongest first
    top_moved_pairs: tuple[TokenPair, ...]  # the strongest pairs by weight x ||v_k|| (``moved``), strongest first

    @property
    def name(self) -> str:
        return head(self.layer, self.head).name


@dataclass(frozen=True, eq=False)
class TokenFlow(OnPrompt, ComparableResult):
    """Attention between token pairs, summed over heads and layers (what the lab's arc diagram draws).

    Every head's row sums to 1, so a row of ``total`` sums to ``n_layers * n_heads`` and a row of
    ``layer_map`` to ``n_heads``. ``top_pairs`` ranks the map shown: ``layer_map`` when ``layer``
    is set, else ``total``.
    """

    ref: PromptRef
    n_heads: int
    total: np.ndarray  # [q, k]: sum over layers and heads of A_lhqk
    by_layer: np.ndarray  # [n_layers]: the share of queries 1..'s attention each layer puts off the diagonal (k < q)
    sink_by_layer: np.ndarray  # [n_layers]: the share each layer puts on key 0 (included in by_layer)
    layer: int | None  # the layer of ``layer_map`` (None: none asked for)
    layer_map: np.ndarray | None  # [q, k]: ``layer``'s pattern summed over heads
    sink_excluded: bool  # key 0 is a special token (BOS, a chat marker), left out of top_pairs
    top_pairs: tuple[TokenPair, ...]  # the strongest off-diagonal pairs (k < q) of the map shown, strongest first

    @property
    def n_layers(self) -> int:
        return int(self.by_layer.shape[0])

    @property
    def shown(self) -> np.ndarray:
        """The map ``top_pairs`` ranks, [q, k]: ``layer_map`` when a layer was asked for, else ``total``."""
        return self.total if self.layer_map is None else self.layer_map


@dataclass(frozen=True)
class CircuitEdge:
    """``source`` feeds ``destination`` (None: the explained logit) by ``score``.

    Into the logit, ``score`` is the source's exact direct attribution (``exact``); between
    components it is input × gradient, a first-order estimate (not ``exact``).
    """

    source: Component
    destination: Component | None
    score: float
    exact: bool


@dataclass(frozen=True)
class Circuit(OnPrompt):
    """The strongest contributors to ``value`` at ``position`` and, level by level, theirs.

    ``nodes``: every component on an edge, in the order found, each with its DLA score;
    ``edges``: the logit's top contributors first (by ``|score|``), then each expanded node's parents.
    """

    ref: PromptRef
    position: int
    target: TokenScore
    contrast: TokenScore | None
    value: float
    nodes: tuple[ComponentScore, ...]  # each with its DLA score (exact)
    edges: tuple[CircuitEdge, ...]
    head_write_norm: np.ndarray  # [n_layers, n_heads]: |z_h W_O[h]| at ``position``, every head (before any post-norm)
    mlp_write_norm: np.ndarray  # [n_layers]: |mlp_out| at ``position``
    method: str = "input × gradient (first order)"
