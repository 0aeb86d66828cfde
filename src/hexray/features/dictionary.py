"""A sparse dictionary over one site of the model: an SAE (reads and rebuilds one activation) or a
transcoder (reads the MLP's input, rebuilds the MLP's output), with or without a skip connection.

The maths, for an input ``x`` ([..., d_in]) and latents ``a`` ([..., d_sae])::

    pre = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc
    a   = topk(relu(pre), k)          # "topk"
        = pre * (pre > threshold)     # "jumprelu", and "batchtopk" at inference (its learned threshold)
        = relu(pre)                   # "relu"
    out = a @ W_dec + b_dec (+ x @ W_skip.T)

so ``out = sum_f a_f W_dec[f] + b_dec (+ skip)``: what lets a site's output split exactly into
features, the dictionary's bias, the skip term and the reconstruction error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from hexray.errors import HexRayError
from hexray.models.loading import ModelSpec
from hexray.tracing import sites
from hexray.tracing.sites import Hook

Architecture = Literal["topk", "batchtopk", "jumprelu", "relu"]
ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", "jumprelu", "relu")
SiteKind = Literal["resid", "mlp_out", "attn_out", "mlp"]
SITE_FORMS = "resid.10 (residual stream before block 10), mlp_out.10, attn_out.10, mlp.10 (MLP input -> output, for transcoders)"
_SITE = re.compile(r"^(?P<kind>resid|resid_pre|mlp_out|attn_out|mlp)[.:@ ]?(?P<layer>\d+)$", re.I)
_TL_SITES = {"resid_pre": "resid", "mlp_out": "mlp_out", "attn_out": "attn_out", "mlp_in": "mlp"}


@dataclass(frozen=True)
class DictSite:
    """Where a dictionary reads and writes: ``resid`` L is the residual stream entering block L
    (L = n_layers: after the last block); ``mlp`` L reads MLP L's input and rebuilds its output."""

    kind: SiteKind
    layer: int

    @property
    def label(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def transcoder(self) -> bool:
        return self.kind == "mlp"

    def hook_in(self, spec: ModelSpec) -> Hook:
        if self.kind == "resid":
            return sites.resid_pre(self.layer) if self.layer < spec.n_layers else sites.resid_post(spec.n_layers - 1)
        return {"mlp_out": sites.mlp_out, "attn_out": sites.attn_out, "mlp": sites.mlp_in}[self.kind](self.layer)

    def hook_out(self, spec: ModelSpec) -> Hook:
        """The activation the dictionary rebuilds (its input's hook, except for transcoders)."""
        return sites.mlp_out(self.layer) if self.kind == "mlp" else self.hook_in(spec)

    @property
    def last_layer(self) -> int:
        """The last block a harvest of this site must run (-1: none, the embeddings suffice)."""
        return self.layer - 1 if self.kind == "resid" else self.layer


def parse_site(text: str, spec: ModelSpec, *, field: str = "site") -> DictSite:
    """``resid.10``, ``mlp_out.10``, ``mlp.10`` or a TransformerLens hook name (``blocks.10.hook_resid_pre``)."""
    raw = text.strip()
    m = _SITE.match(raw)
    if m:
        kind, layer = m.group("kind").lower(), int(m.group("layer"))
        kind = "resid" if kind == "resid_pre" else kind
    else:
        hook = sites.parse_hook(raw)
        if hook.layer is None or hook.point not in _TL_SITES and hook.point != "resid_post":
            raise HexRayError(f"{{field}}: unknown site {raw!r}", hint=f"use {SITE_FORMS}", field=field)
        kind, layer = ("resid", hook.layer + 1) if hook.point == "resid_post" else (_TL_SITES[hook.point], hook.layer)
    limit = spec.n_layers + (1 if kind == "resid" else 0)
    if layer >= limit:
        raise HexRayError(f"{{field}}: layer {layer} is out of range", hint=f"{spec.name} has {kind} sites 0..{limit - 1}", field=field)
    return DictSite(kind, layer)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class Dictionary:
    """A trained sparse dictionary: weights (float32, CPU or the model's device) and what it was trained on."""

    site: DictSite
    architecture: Architecture
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_out]
    b_dec: torch.Tensor  # [d_out]
    model_name: str
    k: int | None = None  # topk / batchtopk: latents kept per token (batchtopk: on average)
    threshold: torch.Tensor | None = None  # [d_sae] jumprelu / batchtopk
    W_skip: torch.Tensor | None = None  # [d_out, d_in] skip-transcoders
    apply_b_dec_to_input: bool = False
    name: str = ""
    context_size: int = 0
    prepend_bos: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)  # training record and quality (fvu, l0, dead_pct, losses)

    def __post_init__(self):
        d_in, d_sae = self.W_enc.shape
        if self.W_dec.shape[0] != d_sae or self.b_enc.shape != (d_sae,) or self.b_dec.shape != (self.W_dec.shape[1],):
            raise HexRayError(
                f"dictionary {self.name or self.site.label} has inconsistent shapes: W_enc {tuple(self.W_enc.shape)}, "
                f"W_dec {tuple(self.W_dec.shape)}, b_enc {tuple(self.b_enc.shape)}, b_dec {tuple(self.b_dec.shape)}",
                hint="the file is corrupt or not a dictionary",
            )
        if self.architecture not in ARCHITECTURES:
            raise HexRayError(f"dictionary {self.name}: unknown architecture {self.architecture!r}", hint=f"HexRay reads {', '.join(ARCHITECTURES)}")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= d_sae):
            raise HexRayError(f"dictionary {self.name}: a topk dictionary needs k in 1..{d_sae}, got {self.k}")
        if self.architecture in ("jumprelu", "batchtopk") and (self.threshold is None or self.threshold.shape != (d_sae,)):
            raise HexRayError(f"dictionary {self.name}: a {self.architecture} dictionary needs a threshold of shape ({d_sae},)")
        if self.W_skip is not None and self.W_skip.shape != (self.d_out, d_in):
            raise HexRayError(f"dictionary {self.name}: W_skip is {tuple(self.W_skip.shape)}, expected ({self.d_out}, {d_in})")

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def kind(self) -> str:
        """``sae``, ``transcoder`` or ``skip-transcoder``."""
        if not self.site.transcoder:
            return "sae"
        return "skip-transcoder" if self.W_skip is not None else "transcoder"

    def feature_label(self, feature: int) -> str:
        return f"L{self.site.layer}F{feature}"

    # -- maths -----------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> Dictionary:
        """The same dictionary with its tensors on ``device``."""
        move = {f: getattr(self, f).to(device) for f in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip") if getattr(self, f) is not None}
        return _replace(self, **move)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [..., d_in] -> [..., d_sae]."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations, ``x``: [..., d_in] -> [..., d_sae] (non-negative, sparse)."""
        pre = self.pre_activations(x)
        if self.architecture == "topk":
            values, index = pre.relu().topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, index, values)
        if self.architecture in ("jumprelu", "batchtopk"):
            return pre * (pre > self.threshold)
        return pre.relu()

    def decode(self, a: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``a``: [..., d_sae] -> [..., d_out]; ``x`` (the input) is needed for the skip term."""
        out = a @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a skip-transcoder decodes with its input")  # a HexRay bug
            out = out + self.skip(x)
        return out

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The skip connection's share of the output ([..., d_out]); zeros without one."""
        if self.W_skip is None:
            return torch.zeros(*x.shape[:-1], self.d_out, dtype=self.W_dec.dtype, device=x.device)
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    def check_model(self, spec: ModelSpec) -> None:
        """A HexRayError unless this dictionary fits ``spec``'s model (name and width)."""
        width = spec.d_model
        if self.d_in != width or self.d_out != width:
            raise HexRayError(
                f"dictionary {self.name or self.site.label} is {self.d_in} -> {self.d_out} wide; {spec.name}'s {self.site.label} is {width} wide",
                hint=f"it was trained for {self.model_name or 'another model'}",
            )
        if self.model_name and model_key(self.model_name) != model_key(spec.name):
            raise HexRayError(f"dictionary {self.name or self.site.label} was trained for {self.model_name}, not {spec.name}", hint="train one for this model: hexray dict train")
        if self.site.layer >= spec.n_layers + (1 if self.site.kind == "resid" else 0):
            raise HexRayError(f"dictionary {self.name}: site {self.site.label} is past {spec.name}'s {spec.n_layers} layers")


def model_key(name: str) -> str:
    """``HuggingFaceTB/SmolLM2-135M-Instruct`` and ``smollm2-135m-instruct`` name the same model."""
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def _replace(d: Dictionary, **changes) -> Dictionary:
    import dataclasses

    return dataclasses.replace(d, **changes)
