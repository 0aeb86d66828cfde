"""Weight matrices as heatmaps: ``attn.L10.W_Q``, ``mlp.L6.W_in`` and friends, per head where per head."""

from __future__ import annotations

import re

import numpy as np
import torch

from hexray.analysis.results import WeightView
from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel

_SPEC = re.compile(r"^(attn|mlp)\.L(\d+)\.(W_[A-Za-z]+)$")
_ATTN = {"W_Q": ("d_model", "d_head"), "W_K": ("d_model", "d_head"), "W_V": ("d_model", "d_head"), "W_O": ("d_head", "d_model")}
_MLP = {"W_in": ("d_model", "d_mlp"), "W_gate": ("d_model", "d_mlp"), "W_out": ("d_mlp", "d_model")}
SPEC_HELP = "use attn.L<layer>.W_Q|W_K|W_V|W_O or mlp.L<layer>.W_in|W_out|W_gate, e.g. attn.L10.W_Q"


def parse_weight_spec(spec: str, model: LoadedModel) -> tuple[str, int, str]:
    m = _SPEC.match(spec.strip())
    if not m:
        raise HexRayError(f"malformed {{field}} {spec!r}", hint=SPEC_HELP, field="weight_specs")
    module, layer, weight = m.group(1), int(m.group(2)), m.group(3)
    table = _ATTN if module == "attn" else _MLP
    if weight not in table:
        raise HexRayError(f"{spec}: {module} has no {weight}", hint=SPEC_HELP)
    if layer >= model.spec.n_layers:
        raise HexRayError(f"{spec}: layer {layer} is out of range", hint=f"{model.name} has layers 0..{model.spec.n_layers - 1}")
    if weight == "W_gate" and not model.spec.gated_mlp:
        raise HexRayError(f"{spec}: {model.name}'s MLP has no gate", hint="use W_in or W_out")
    return module, layer, weight


def weight_view(model: LoadedModel, spec: str) -> WeightView:
    """The weight named by ``spec``, shaped [heads, rows, cols] (one 'head' for MLP weights)."""
    module, layer, weight = parse_weight_spec(spec, model)
    tensor = model.block_weight(layer, module, weight)  # type: ignore[arg-type]
    if tensor is None:
        raise HexRayError(f"{spec}: {model.name} does not expose this weight")
    with torch.no_grad():
        mat = tensor.detach().float()
    rows, cols = (_ATTN if module == "attn" else _MLP)[weight]
    per_head = mat.dim() == 3
    if not per_head:
        mat = mat.unsqueeze(0)
    arr = mat.cpu().numpy().astype(np.float32)
    return WeightView(
        spec=spec.strip(), layer=layer, weight=weight, per_head=per_head, matrices=arr,
        row_axis=rows, col_axis=cols, norms=np.linalg.norm(arr.reshape(arr.shape[0], -1), axis=1),
    )
