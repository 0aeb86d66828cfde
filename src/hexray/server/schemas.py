"""Typed requests of the HexRay API, derived from each capability's options (``hexray.options``).

The answers are the CLI's ``--json`` documents (render/jsondoc.py). A field's default and bounds
come from the same :class:`~hexray.options.Option` as the CLI flag's, so the two cannot drift.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from hexray.options import Option, base_type, is_optional

MAX_PROMPT_CHARS = 20_000
MAX_PROMPTS = 256  # rows of a dataset-level request


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored


def _field(o: Option) -> tuple[Any, Any]:
    """A pydantic field for ``o``: its type (choices as a Literal), its API default and its bounds."""
    tp = base_type(o.type)
    if o.type == tuple[str, ...]:
        tp = list[str] | str  # a list, or one comma-separated string
    elif o.choices is not None:
        tp = Literal[o.choices]  # type: ignore[valid-type]
    if is_optional(o.type) or o.type == tuple[str, ...]:
        tp = tp | None
    default = o.request_default
    if isinstance(default, tuple):
        default = list(default)
    le = min(x for x in (o.le, o.api_le) if x is not None) if o.le is not None or o.api_le is not None else None
    return tp, Field(default, gt=o.gt, ge=o.ge, le=le, description=o.help)


def request_model(name: str, options: tuple[Option, ...], **fixed: tuple[Any, Any]) -> type[BaseModel]:
    """A request model with ``fixed`` fields (the prompts) and one field per API option."""
    fields = {**fixed, **{o.request_field: _field(o) for o in options if o.api}}
    return create_model(name, __base__=_Request, **fields)


class Terminal(_Request):
    """How the client's console draws (``hexray.warm.terminal``): the server renders the command's output the same way."""

    width: int = Field(80, ge=1, le=10_000)
    height: int = Field(25, ge=1, le=10_000)
    color_system: Literal["standard", "256", "truecolor", "windows"] | None = None
    terminal: bool = False
    no_color: bool = False
    encoding: str = Field("utf-8", max_length=40)
    legacy_windows: bool = False


class CliRequest(_Request):
    """``POST /api/cli``: one ``hexray`` command (``argv``), run as in the client's ``cwd`` (``hexray --server``)."""

    argv: list[str] = Field(max_length=1000)
    cwd: str = Field(min_length=1, max_length=4096)
    token: str = Field("", max_length=200)
    env: dict[str, str] = Field(default_factory=dict, description="The client's HEXRAY_MODEL, HEXRAY_DEVICE, HEXRAY_DTYPE, HEXRAY_MEMORY_BUDGET (others are ignored).")
    stdout: Terminal = Field(default_factory=Terminal)
    stderr: Terminal = Field(default_factory=Terminal)


class UnitSearchRequest(_Request):
    """``GET /api/units``: the neuroscope's reverse look-ups (``hexray index search``): a prompt's token, or a vocabulary token."""

    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS, description="Look up the units firing most at one of this prompt's tokens.")
    position: int = Field(-1, description="That token: its position among the tokens the model sees (BOS first when the index's contexts start with it); negative counts from the end.")
    token: str | None = Field(None, min_length=1, max_length=200, description="Instead: units whose top examples centre on this vocabulary token (e.g. ' Paris').")
    limit: int = Field(20, ge=1, le=200, description="Units returned.")


def _prompt(required: bool = True):
    return (str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)) if required else (str | None, Field(None, min_length=1, max_length=MAX_PROMPT_CHARS))


def _models() -> dict[str, type[BaseModel]]:
    from hexray.analysis.circuit import MAX_DEPTH, MAX_K
    from hexray.analysis.heads import HEADS_OPTIONS
    from hexray.analysis.report import trace_options
    from hexray.generation.tracer import GENERATION_OPTIONS
    from hexray.intervene.ablation import ABLATE_OPTIONS
    from hexray.intervene.patching import PATCH_OPTIONS

    induction = tuple(o for o in HEADS_OPTIONS if o.name in ("seq_len", "n_sequences", "seed"))
    return {
        "AnalyzeRequest": request_model("AnalyzeRequest", trace_options(), prompt=_prompt()),
        "AnalyzeSetRequest": request_model("AnalyzeSetRequest", trace_options(), prompts=(list[str], Field(min_length=1, max_length=MAX_PROMPTS))),
        "AttentionRequest": request_model(
            "AttentionRequest", induction, prompt=_prompt(), layer=(int, Field(ge=0)), head=(int, Field(ge=0)),
            exclude_first_key=(bool | None, Field(None, description="Leave the first token (the attention sink) out of the top pairs; default: when it is BOS.")),
        ),
        "PatchRequest": request_model("PatchRequest", PATCH_OPTIONS, clean=_prompt(), corrupt=_prompt()),
        "PatchSetRequest": request_model("PatchSetRequest", PATCH_OPTIONS, rows=(list[dict[str, str]], Field(min_length=1, max_length=MAX_PROMPTS))),
        "AblateRequest": request_model(
            "AblateRequest", ABLATE_OPTIONS, prompt=_prompt(), components=(str, Field(min_length=1, max_length=2000)),
            reference=(list[str] | None, Field(None, max_length=256)),
        ),
        "AblateSetRequest": request_model(
            "AblateSetRequest", ABLATE_OPTIONS, prompts=(list[str], Field(min_length=1, max_length=MAX_PROMPTS)),
            components=(str, Field(min_length=1, max_length=2000)), reference=(list[str] | None, Field(None, max_length=256)),
        ),
        "HeadsRequest": request_model("HeadsRequest", HEADS_OPTIONS, prompt=_prompt(required=False)),
        "GenerateRequest": request_model("GenerateRequest", GENERATION_OPTIONS, prompt=_prompt()),
        "FlowRequest": request_model("FlowRequest", (), prompt=_prompt(), layer=(int | None, Field(None, ge=0)), exclude_first_key=(bool | None, Field(None, description="Leave the first token (the attention sink) out of the top pairs; default: when it is BOS."))),
        "CircuitRequest": request_model(
            "CircuitRequest", tuple(o for o in trace_options() if o.name in ("target", "contrast", "token_index")), prompt=_prompt(),
            k=(int, Field(5, ge=1, le=MAX_K, description="Parents kept per node (and nodes expanded per level).")),
            depth=(int, Field(2, ge=1, le=MAX_DEPTH, description="Levels back from the prediction.")),
        ),
    }


_MODELS: dict[str, type[BaseModel]] = {}


def __getattr__(name: str) -> type[BaseModel]:
    """The request models, built on first use (building them imports every capability's options)."""
    if not _MODELS:
        _MODELS.update(_models())
    try:
        return _MODELS[name]
    except KeyError:
        raise AttributeError(name) from None
