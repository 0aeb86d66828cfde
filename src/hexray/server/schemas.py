"""Typed requests of the HexRay API; the answers are the CLI's ``--json`` documents (render/jsondoc.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPT_CHARS = 20_000


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored


class AnalyzeRequest(_Request):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    granularity: Literal["layer", "head", "neuron"] = "head"
    target: str | None = None
    contrast: str | None = None
    token_index: int = -1
    top_k: int = Field(10, ge=1, le=1000)
    logit_lens: bool = True
    lens_k: int = Field(5, ge=1, le=50)
    residual: bool = True
    lens_window: int = Field(0, ge=0, le=4096)  # > 0: the residual lens only at this many positions up to token_index
    head_scores: bool = True  # the layers x heads map at any granularity (the CLI's --logit-debug)
    predictions_k: int = Field(0, ge=0, le=50)  # > 0: top next tokens at every position (the token strip)


class AttentionRequest(_Request):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    layer: int = Field(ge=0)
    head: int = Field(ge=0)
    seq_len: int = Field(25, ge=2, le=512)
    sequences: int = Field(4, ge=1, le=32)
    seed: int = 0


class PatchRequest(_Request):
    clean: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    corrupt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    target: str | None = None
    contrast: str | None = None
    sweep: str | None = None  # "heads,resid", "all", ...
    method: Literal["exact", "attribution", "both"] = "exact"
    last_position: bool = False
    batch_size: int | None = Field(None, ge=1, le=4096)


class AblateRequest(_Request):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    components: str = Field(min_length=1, max_length=2000)
    mode: Literal["zero", "mean", "resample"] = "zero"
    reference: list[str] | None = Field(None, max_length=256)
    samples: int = Field(8, ge=1, le=64)
    seed: int = 0
    target: str | None = None
    contrast: str | None = None
    token_index: int = -1
    top_k: int = Field(10, ge=1, le=1000)


class HeadsRequest(_Request):
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    threshold: float = Field(0.4, ge=0, le=1)
    seq_len: int = Field(25, ge=2, le=512)
    sequences: int = Field(4, ge=1, le=32)
    seed: int = 0


class GenerateRequest(_Request):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(32, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0)
    seed: int | None = None
    chat: bool = False
    text: str | None = None
    granularity: Literal["layer", "head", "neuron"] = "head"
    top_k: int = Field(3, ge=1, le=100)
    watch: str | None = None
    watch_threshold: float | None = None
