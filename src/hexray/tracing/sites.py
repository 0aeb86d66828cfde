"""Component labels (``L9H6``, ``MLP10``, ``L10N1234``) and the TransformerLens hook names behind them.

This module is the only place that spells hook names; analyses ask it for them. Strings are
parsed here, at the boundary, into :class:`Component` values the rest of HexRay passes around.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from hexray.errors import HexRayError
from hexray.models.loading import ModelSpec

ComponentKind = Literal["embed", "bias", "head", "attn", "mlp", "neuron", "resid"]

# -- hook names --------------------------------------------------------------------------------
EMBED = "hook_embed"
POS_EMBED = "hook_pos_embed"
FINAL_SCALE = "ln_final.hook_scale"


def resid_pre(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def attn_out(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


def mlp_out(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def head_z(layer: int) -> str:  # [pos, n_heads, d_head]
    return f"blocks.{layer}.attn.hook_z"


def head_v(layer: int) -> str:  # [pos, n_kv_heads, d_head]
    return f"blocks.{layer}.attn.hook_v"


def attn_pattern(layer: int) -> str:  # [n_heads, query_pos, key_pos]
    return f"blocks.{layer}.attn.hook_pattern"


def mlp_post(layer: int) -> str:  # [pos, d_mlp]
    return f"blocks.{layer}.mlp.hook_post"


def post_norm_scale(layer: int, part: Literal["attn", "mlp"]) -> str:  # [pos, 1]
    """The scale of the norm applied to attention's / the MLP's output before it joins the residual (Gemma 2/3)."""
    return f"blocks.{layer}.{'ln1_post' if part == 'attn' else 'ln2_post'}.hook_scale"


def residual_stream(spec: ModelSpec) -> list[str]:
    """The residual stream before every block and after the last: n_layers + 1 hook names."""
    return [resid_pre(layer) for layer in range(spec.n_layers)] + [resid_post(spec.n_layers - 1)]


# -- components --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Component:
    """One thing that writes to the residual stream (or a residual-stream site)."""

    kind: ComponentKind
    layer: int | None = None
    head: int | None = None
    neuron: int | None = None

    @property
    def name(self) -> str:
        match self.kind:
            case "embed" | "bias":
                return self.kind
            case "head":
                return f"L{self.layer}H{self.head}"
            case "attn":
                return f"ATTN{self.layer}"
            case "mlp":
                return f"MLP{self.layer}"
            case "neuron":
                return f"L{self.layer}N{self.neuron}"
            case "resid":
                return f"RESID{self.layer}"
        raise ValueError(self.kind)

    @property
    def label(self) -> str:
        """The reference tool's console label: ``Attn L9``, ``MLP  L10``, ``L9H6``."""
        match self.kind:
            case "attn":
                return f"Attn L{self.layer}"
            case "mlp":
                return f"MLP  L{self.layer}"
        return self.name


def component_hook(c: Component) -> str:
    """The hook holding component ``c``'s activation: hook_z (head), attn/mlp out, hook_post (neuron), resid_pre."""
    return {"head": head_z, "attn": attn_out, "mlp": mlp_out, "neuron": mlp_post, "resid": resid_pre}[c.kind](c.layer)


_PATTERNS: list[tuple[re.Pattern, ComponentKind]] = [
    (re.compile(r"^L(\d+)H(\d+)$", re.I), "head"),
    (re.compile(r"^L(\d+)N(\d+)$", re.I), "neuron"),
    (re.compile(r"^(?:ATTN|A)(\d+)$", re.I), "attn"),
    (re.compile(r"^(?:MLP|M)(\d+)$", re.I), "mlp"),
    (re.compile(r"^RESID(\d+)$", re.I), "resid"),
]

COMPONENT_FORMS = "L9H6 (head), ATTN9 (attention layer), MLP10 (MLP layer), L10N1234 (neuron), RESID12 (residual stream), embed"


def parse_component(text: str, spec: ModelSpec) -> Component:
    """Parse one component label and check it exists in ``spec``'s model."""
    raw = text.strip()
    if raw.lower() in {"embed", "bias"}:
        return Component(raw.lower())  # type: ignore[arg-type]
    for pattern, kind in _PATTERNS:
        m = pattern.match(raw)
        if not m:
            continue
        layer = int(m.group(1))
        limit = spec.n_layers + (1 if kind == "resid" else 0)
        if layer >= limit:
            raise HexRayError(f"{raw}: layer {layer} is out of range", hint=f"{spec.name} has layers 0..{limit - 1}")
        if kind == "head":
            head = int(m.group(2))
            if head >= spec.n_heads:
                raise HexRayError(f"{raw}: head {head} is out of range", hint=f"{spec.name} has heads 0..{spec.n_heads - 1} per layer")
            return Component(kind, layer, head=head)
        if kind == "neuron":
            neuron = int(m.group(2))
            if neuron >= spec.d_mlp:
                raise HexRayError(f"{raw}: neuron {neuron} is out of range", hint=f"{spec.name} has neurons 0..{spec.d_mlp - 1} per MLP")
            return Component(kind, layer, neuron=neuron)
        return Component(kind, layer)
    raise HexRayError(f"unknown component {raw!r}", hint=f"use {COMPONENT_FORMS}")


def parse_components(text: str, spec: ModelSpec) -> tuple[Component, ...]:
    parts = [p for p in (s.strip() for s in text.split(",")) if p]
    if not parts:
        raise HexRayError("no components given", hint=f"use {COMPONENT_FORMS}")
    return tuple(parse_component(p, spec) for p in parts)
