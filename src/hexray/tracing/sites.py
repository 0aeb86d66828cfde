"""Hook points and components as values, and the only place their names are spelled or parsed.

A :class:`Hook` is a TransformerLens hook point (``Hook("z", 9)`` is ``blocks.9.attn.hook_z``);
a :class:`Component` is a unit that writes to the residual stream (``L9H6``, ``MLP10``,
``L10N1234``). Both derive their names from their fields; strings coming from users are parsed
here, at the boundary, and nowhere else. :data:`KINDS` is the one table from a component kind
to the hook holding its activation, the index that picks a unit, and its label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from hexray.errors import HexRayError
from hexray.models.loading import ModelSpec

ComponentKind = Literal["embed", "bias", "head", "attn", "mlp", "neuron", "resid", "feature", "error", "skip"]


# -- hook points -------------------------------------------------------------------------------
_POINTS: dict[str, str] = {  # point -> TransformerLens name ({layer} for per-block points)
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "final_scale": "ln_final.hook_scale",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "z": "blocks.{layer}.attn.hook_z",  # [pos, n_heads, d_head]
    "v": "blocks.{layer}.attn.hook_v",  # [pos, n_kv_heads, d_head]
    "pattern": "blocks.{layer}.attn.hook_pattern",  # [n_heads, query_pos, key_pos]
    "mlp_post": "blocks.{layer}.mlp.hook_post",  # [pos, d_mlp]
    "mlp_in": "blocks.{layer}.mlp.hook_in",  # [pos, d_model]: what the MLP reads (after its norm); transcoders' input
    "attn_post_scale": "blocks.{layer}.ln1_post.hook_scale",  # [pos, 1] (Gemma 2/3 post-norms)
    "mlp_post_scale": "blocks.{layer}.ln2_post.hook_scale",
}
_BY_NAME = {template.removeprefix("blocks.{layer}."): point for point, template in _POINTS.items()}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class Hook(str):
    """A hook point: ``point`` (``"z"``, ``"resid_pre"``, ...) at ``layer`` (None outside the blocks).

    It *is* its TransformerLens name (a ``str``), so it keys caches and filters directly; the
    name is derived from the fields, never the other way round except in :func:`parse_hook`.
    Points outside the table (``attn.hook_q``) keep their own suffix as the point.
    """

    point: str
    layer: int | None

    def __new__(cls, point: str, layer: int | None = None) -> Hook:
        template = _POINTS.get(point)
        if template is None:
            name = point if layer is None else f"blocks.{layer}.{point}"
        elif ("{layer}" in template) != (layer is not None):
            raise ValueError(f"hook point {point!r} {'needs' if layer is None else 'takes no'} layer")  # a HexRay bug
        else:
            name = template.format(layer=layer)
        self = super().__new__(cls, name)
        object.__setattr__(self, "point", point)
        object.__setattr__(self, "layer", layer)
        return self

    def __setattr__(self, name, value):
        raise AttributeError("a Hook is immutable")

    def __repr__(self) -> str:
        return f"Hook({self.point!r}{'' if self.layer is None else f', {self.layer}'})"

    def __reduce__(self):
        return (Hook, (self.point, self.layer))


def parse_hook(name: str) -> Hook:
    """A TransformerLens hook name (from the bridge, a cache or a user's glob) as a :class:`Hook`."""
    if isinstance(name, Hook):
        return name
    m = _BLOCK.match(name)
    if m is None:
        return Hook(_BY_NAME.get(name, name))
    return Hook(_BY_NAME.get(m.group(2), m.group(2)), int(m.group(1)))


EMBED = Hook("embed")
POS_EMBED = Hook("pos_embed")
FINAL_SCALE = Hook("final_scale")


def resid_pre(layer: int) -> Hook:
    return Hook("resid_pre", layer)


def resid_post(layer: int) -> Hook:
    return Hook("resid_post", layer)


def attn_out(layer: int) -> Hook:
    return Hook("attn_out", layer)


def mlp_out(layer: int) -> Hook:
    return Hook("mlp_out", layer)


def head_z(layer: int) -> Hook:  # [pos, n_heads, d_head]
    return Hook("z", layer)


def head_v(layer: int) -> Hook:  # [pos, n_kv_heads, d_head]
    return Hook("v", layer)


def attn_pattern(layer: int) -> Hook:  # [n_heads, query_pos, key_pos]
    return Hook("pattern", layer)


def mlp_post(layer: int) -> Hook:  # [pos, d_mlp]
    return Hook("mlp_post", layer)


def mlp_in(layer: int) -> Hook:  # [pos, d_model], the MLP's normalised input
    return Hook("mlp_in", layer)


def post_norm_scale(layer: int, part: Literal["attn", "mlp"]) -> Hook:  # [pos, 1]
    """The scale of the norm applied to attention's / the MLP's output before it joins the residual (Gemma 2/3)."""
    return Hook(f"{part}_post_scale", layer)


def residual_stream(spec: ModelSpec) -> list[Hook]:
    """The residual stream before every block and after the last: n_layers + 1 hook points."""
    return [resid_pre(layer) for layer in range(spec.n_layers)] + [resid_post(spec.n_layers - 1)]


# -- components --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """One row of :data:`KINDS`: how a component kind is stored, indexed, named and parsed."""

    point: str | None  # the hook point holding its activation (None: embed and bias are not sites)
    unit: Literal["head", "neuron", "feature"] | None  # the field picking one unit along the activation's axis 1
    unit_count: str | None  # the ModelSpec field bounding that unit
    name: str  # how the component is written: "L{layer}H{head}"
    pattern: str  # what parse_component accepts (named groups: layer, head, neuron, feature)
    label: str | None = None  # the reference tool's console label, where it differs from the name
    layer_limit: int = 0  # extra layers past n_layers (RESID<n_layers> is the final stream)


KINDS: dict[str, Kind] = {
    "embed": Kind(None, None, None, "embed", r"embed"),
    "bias": Kind(None, None, None, "bias", r"bias"),
    "head": Kind("z", "head", "n_heads", "L{layer}H{head}", r"L(?P<layer>\d+)H(?P<head>\d+)"),
    "neuron": Kind("mlp_post", "neuron", "d_mlp", "L{layer}N{neuron}", r"L(?P<layer>\d+)N(?P<neuron>\d+)"),
    "attn": Kind("attn_out", None, None, "ATTN{layer}", r"(?:ATTN|A)(?P<layer>\d+)", label="Attn L{layer}"),
    "mlp": Kind("mlp_out", None, None, "MLP{layer}", r"(?:MLP|M)(?P<layer>\d+)", label="MLP  L{layer}"),
    "resid": Kind("resid_pre", None, None, "RESID{layer}", r"RESID(?P<layer>\d+)", layer_limit=1),
    # a dictionary's parts at a site (hexray.features): its latents, its reconstruction error, its skip term
    "feature": Kind(None, "feature", None, "L{layer}F{feature}", r"L(?P<layer>\d+)F(?P<feature>\d+)", layer_limit=1),
    "error": Kind(None, None, None, "ERR{layer}", r"ERR(?P<layer>\d+)", label="error L{layer}", layer_limit=1),
    "skip": Kind(None, None, None, "SKIP{layer}", r"SKIP(?P<layer>\d+)", label="skip  L{layer}"),
}
_UNIT_NOUN = {"head": "heads", "neuron": "neurons", "feature": "features"}
_PARSERS = [(re.compile(f"^{row.pattern}$", re.I), kind) for kind, row in KINDS.items()]


@dataclass(frozen=True)
class Component:
    """One thing that writes to the residual stream (or a residual-stream site)."""

    kind: ComponentKind
    layer: int | None = None
    head: int | None = None
    neuron: int | None = None
    feature: int | None = None
    site: str | None = None  # features, errors, skips: the dictionary's site kind (resid, mlp, mlp_out, attn_out)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown component kind {self.kind!r}")  # a HexRay bug: users' text goes through parse_component

    @property
    def unit(self) -> int | None:
        """The index along the activation's unit axis (head, neuron, feature), None for whole vectors."""
        field = KINDS[self.kind].unit
        return None if field is None else getattr(self, field)

    @property
    def hook(self) -> Hook:
        point = KINDS[self.kind].point
        if point is None:
            raise ValueError(f"{self.kind} has no hook of its own")  # a HexRay bug
        return Hook(point, self.layer)

    @property
    def name(self) -> str:
        return KINDS[self.kind].name.format(layer=self.layer, head=self.head, neuron=self.neuron, feature=self.feature)

    @property
    def label(self) -> str:
        """The reference tool's console label: ``Attn L9``, ``MLP  L10``, ``L9H6``."""
        row = KINDS[self.kind]
        return row.label.format(layer=self.layer) if row.label else self.name


def head(layer: int, index: int) -> Component:
    return Component("head", layer, head=index)


def component_hook(c: Component) -> Hook:
    """The hook holding component ``c``'s activation: hook_z (head), attn/mlp out, hook_post (neuron), resid_pre."""
    return c.hook


COMPONENT_FORMS = "L9H6 (head), ATTN9 (attention layer), MLP10 (MLP layer), L10N1234 (neuron), RESID12 (residual stream), embed"


def parse_component(text: str, spec: ModelSpec) -> Component:
    """Parse one component label and check it exists in ``spec``'s model."""
    raw = text.strip()
    for pattern, kind in _PARSERS:
        m = pattern.match(raw)
        if not m:
            continue
        row, groups = KINDS[kind], {k: int(v) for k, v in m.groupdict().items()}
        if "layer" in groups:
            layer, limit = groups["layer"], spec.n_layers + row.layer_limit
            if layer >= limit:
                raise HexRayError(f"{raw}: layer {layer} is out of range", hint=f"{spec.name} has layers 0..{limit - 1}")
        if row.unit is not None and row.unit_count is not None:  # a feature's bound is its dictionary's, checked there
            unit, count = groups[row.unit], getattr(spec, row.unit_count)
            if unit >= count:
                raise HexRayError(f"{raw}: {row.unit} {unit} is out of range", hint=f"{spec.name} has {_UNIT_NOUN[row.unit]} 0..{count - 1} per {'layer' if row.unit == 'head' else 'MLP'}")
        return Component(kind, **groups)  # type: ignore[arg-type]
    raise HexRayError(f"unknown component {raw!r}", hint=f"use {COMPONENT_FORMS}")


def parse_components(text: str, spec: ModelSpec) -> tuple[Component, ...]:
    parts = [p for p in (s.strip() for s in text.split(",")) if p]
    if not parts:
        raise HexRayError("no components given", hint=f"use {COMPONENT_FORMS}")
    return tuple(parse_component(p, spec) for p in parts)
