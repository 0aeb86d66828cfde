"""The frozen results of traced generation; the CLI, reports and the web lab render these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from hexray.analysis.results import ComparableResult, ComponentScore, Granularity, PromptRef
from hexray.tracing.sites import Component

StopReason = Literal["eos", "max_new_tokens", "interrupted", "text_end"]


@dataclass(frozen=True, eq=False)
class TokenRecord(ComparableResult):
    """One generated token, traced at the position that predicted it."""

    index: int  # among generated tokens, from 0
    position: int  # the sequence position whose output predicted this token
    id: int
    token: str
    prob: float  # the model's probability of this token (temperature 1)
    logit: float
    top: tuple[ComponentScore, ...]  # top components of this token's own logit
    reconstruction_error: float  # |sum of all components - logit|
    source_dla: np.ndarray = field(repr=False)  # [position + 1] logit the heads moved from each source position
    source_attention: np.ndarray = field(repr=False)  # [position + 1] attention mass, mean over layers and heads
    watch: dict[str, float] = field(default_factory=dict)
    crossed: tuple[str, ...] = ()  # watched components at or over the threshold here
    features: tuple[TokenFeature, ...] = ()  # with --features: the predicting position's top features, strongest first


@dataclass(frozen=True)
class TokenFeature:
    """A dictionary latent active where a generated token was predicted, and its exact share of that token's logit."""

    dictionary: str
    label: str  # L10F123
    feature: int
    activation: float
    attribution: float  # its direct contribution to the generated token's logit (the dictionary's site split exactly)


@dataclass(frozen=True)
class StepDependency:
    """How much a step drew on one earlier segment (the prompt, or an earlier step)."""

    source: str  # "prompt" or "step N"
    attention: float  # mean attention mass from the step's predicting positions onto the source's tokens
    dla: float  # logit moved by heads from the source's tokens into the step's tokens (sum over tokens)


@dataclass(frozen=True)
class GenStep:
    index: int  # from 1
    text: str
    char_span: tuple[int, int]  # in the generated text
    token_span: tuple[int, int]  # [start, end) in generated-token indices
    top: tuple[ComponentScore, ...]  # components summed over the step's tokens
    change: tuple[ComponentScore, ...]  # biggest changes from the previous step's sums
    depends: tuple[StepDependency, ...]  # on the prompt and every earlier step
    top_prompt_tokens: tuple[tuple[int, str, float], ...]  # (position, token, dla) most drawn on


@dataclass(frozen=True)
class StepEdge:
    source: str
    target: str
    weight: float  # logit units
    attention: float


@dataclass(frozen=True)
class ReasoningGraph:
    nodes: tuple[str, ...]  # "prompt", "step 1", ...
    edges: tuple[StepEdge, ...]
    threshold: float  # an edge is kept when |weight| >= threshold * the target's largest |weight|


@dataclass(frozen=True, eq=False)
class GenerationResult(ComparableResult):
    ref: PromptRef  # the prompt as the model read it (after any chat template)
    chat: bool
    generated_ids: tuple[int, ...]
    text: str
    granularity: Granularity
    records: tuple[TokenRecord, ...]
    components: tuple[Component, ...] = field(repr=False)  # column order of ``scores``
    scores: np.ndarray = field(repr=False)  # [n_generated, n_components] each token's attribution
    stop_reason: StopReason = "max_new_tokens"
    rule: str = ""  # how the text was split into steps
    steps: tuple[GenStep, ...] = ()
    graph: ReasoningGraph | None = None
    watch_threshold: float | None = None

    model = property(lambda self: self.ref.model)
    prompt = property(lambda self: self.ref.prompt)
    prompt_token_ids = property(lambda self: self.ref.token_ids)
    prompt_tokens = property(lambda self: self.ref.tokens)

    def _repr_html_(self) -> str:
        from hexray.render.html import generation_html

        return generation_html(self, {})
