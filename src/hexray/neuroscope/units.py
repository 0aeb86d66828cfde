"""What the neuroscope indexes: groups of units, the hook each reads, its activation and its logit effects.

A *unit* is one scalar per token: an MLP neuron (``L10N1234``, the MLP's post-activation), an
attention head (``L9H6``, the norm of the head's output ``|z_h W_O^h|``, what it writes to the
residual stream), or a latent of a sparse dictionary (``L10F123`` of dictionary ``NAME``). Units
come in :class:`UnitGroup` s, one per hook: a layer's neurons, a layer's heads, a dictionary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from hexray.errors import HexRayError
from hexray.features.dictionary import Dictionary
from hexray.models.loading import LoadedModel, ModelSpec
from hexray.tracing import sites
from hexray.tracing.sites import Component, Hook

UnitKind = Literal["neuron", "head", "feature"]
UNIT_FORMS = "neurons, heads, dict:NAME (a dictionary's latents), comma-separated"


@dataclass(frozen=True, eq=False)
class UnitGroup:
    """The units one hook's activation holds: a layer's neurons or heads, or one dictionary's latents."""

    kind: UnitKind
    layer: int  # the block (features: the dictionary's site layer)
    count: int  # units in the group
    hook: Hook  # where its activation is read
    dictionary: Dictionary | None = None

    @property
    def dictionary_name(self) -> str:
        return "" if self.dictionary is None else (self.dictionary.name or self.dictionary.site.label)

    @property
    def site(self) -> str:
        return "" if self.dictionary is None else self.dictionary.site.kind

    @property
    def last_layer(self) -> int:
        """The last block a pass must run for this group."""
        return self.hook.layer if self.hook.layer is not None else 0

    def component(self, unit: int) -> Component:
        if self.kind == "neuron":
            return Component("neuron", self.layer, neuron=unit)
        if self.kind == "head":
            return sites.head(self.layer, unit)
        return Component("feature", self.layer, feature=unit, site=self.site)


def parse_units(units: str | Sequence[str | Dictionary], model: LoadedModel) -> tuple[UnitGroup, ...]:
    """``"neurons,heads,dict:NAME"`` (or a list of such parts, or :class:`Dictionary` objects) as unit groups."""
    spec = model.spec
    parts: list[str | Dictionary] = [p.strip() for p in units.split(",")] if isinstance(units, str) else list(units)
    groups: list[UnitGroup] = []
    seen: set[str] = set()
    for part in parts:
        if isinstance(part, str) and not part:
            continue
        if isinstance(part, Dictionary):
            part.check_model(spec)
            dicts: tuple[Dictionary, ...] = (part,)
            key = f"dict:{part.name or part.site.label}"
        else:
            key = part.lower()
            if key in ("neurons", "neuron"):
                key = "neurons"
            elif key in ("heads", "head"):
                key = "heads"
            elif not key.startswith("dict:") or not part[5:].strip():
                raise HexRayError(f"{{field}}: unknown units {part!r}", hint=f"use {UNIT_FORMS}", field="units")
        if key in seen:
            raise HexRayError(f"{{field}}: {key} is named twice", field="units")
        seen.add(key)
        if key == "neurons":
            groups += [UnitGroup("neuron", layer, spec.d_mlp, sites.mlp_post(layer)) for layer in range(spec.n_layers)]
        elif key == "heads":
            groups += [UnitGroup("head", layer, spec.n_heads, sites.head_z(layer)) for layer in range(spec.n_layers)]
        else:
            if isinstance(part, str):
                from hexray.features.store import load_named

                dicts = load_named(part[5:].strip(), spec, field="units")
            for d in dicts:
                groups.append(UnitGroup("feature", d.site.layer, d.d_sae, _dictionary_hook(spec, d), d))
    if not groups:
        raise HexRayError("{field}: no units named", hint=f"use {UNIT_FORMS}", field="units")
    return tuple(groups)


def _dictionary_hook(spec: ModelSpec, d: Dictionary) -> Hook:
    """Where a dictionary's input is read; the stream entering block L is read as block L-1's output, so a pass may stop there."""
    if d.site.kind == "resid" and 0 < d.site.layer < spec.n_layers:
        return sites.resid_post(d.site.layer - 1)
    return d.site.hook_in(spec)


# -- activations -----------------------------------------------------------------------------
def head_grams(model: LoadedModel, layer: int) -> torch.Tensor:
    """[n_heads, d_head, d_head] W_O^h W_O^h^T: ``|z_h W_O^h|^2 = z_h G_h z_h``, 9x cheaper than forming z_h W_O^h."""
    W_O = model.W_O[layer]  # [n_heads, d_head, d_model]
    return W_O @ W_O.transpose(1, 2)


def head_norms(z: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``z`` [..., n_heads, d_head] -> [..., n_heads]: each head's output norm."""
    sq = (torch.einsum("...hd,hde->...he", z, gram) * z).sum(-1)
    return sq.clamp_min(0).sqrt()


def activation_fn(model: LoadedModel, group: UnitGroup):
    """``fn(x)``: the hook's activation [B, P, ...] (float32) -> the group's units [B, P, count]."""
    if group.kind == "neuron":
        return lambda x: x
    if group.kind == "head":
        gram = head_grams(model, group.layer)
        return lambda z: head_norms(z, gram.to(z.device))
    d = group.dictionary.to(model.device)
    return lambda x: d.encode(x)


# -- logit effects ---------------------------------------------------------------------------
def output_directions(model: LoadedModel, group: UnitGroup) -> torch.Tensor | None:
    """[count, d_model] what one unit of activation adds to the residual stream; None for heads (no single direction)."""
    if group.kind == "neuron":
        dirs = model.W_out[group.layer]  # [d_mlp, d_model]
        if model.spec.post_norms:  # Gemma: the MLP's output passes a norm's weight (its scale is per token, left out)
            dirs = dirs * model.post_norms[group.layer][1]
        return dirs
    if group.kind == "feature":
        return group.dictionary.W_dec.to(model.device, torch.float32)  # every dictionary writes the residual stream
    return None


def logit_effects(model: LoadedModel, dirs: torch.Tensor, n: int, *, chunk: int = 512) -> tuple[torch.Tensor, ...]:
    """Each direction through the final norm's weight and the unembedding: (top ids, top values, bottom ids, bottom values), each [count, n].

    The final norm's scale depends on the token, so values are per unit of activation *before* that
    scale: they rank tokens exactly, and compare units only roughly.
    """
    weight, _ = model.final_norm
    W = weight[:, None] * model.W_U  # [d_model, d_vocab]
    n = min(n, W.shape[1])
    out: list[list[torch.Tensor]] = [[], [], [], []]
    with torch.inference_mode():
        for lo in range(0, dirs.shape[0], chunk):
            v = dirs[lo : lo + chunk].to(W.device, torch.float32)
            if model.spec.norm == "layernorm":
                v = v - v.mean(-1, keepdim=True)  # LayerNorm centres what it reads; a direction's share is centred too
            eff = v @ W  # [chunk, d_vocab]
            top, bottom = eff.topk(n, dim=1), eff.topk(n, dim=1, largest=False)
            for i, t in enumerate((top.indices, top.values, bottom.indices, bottom.values)):
                out[i].append(t.cpu())
    return tuple(torch.cat(parts) for parts in out)
