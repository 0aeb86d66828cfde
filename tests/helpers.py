"""Helpers shared by several test files."""

from dataclasses import dataclass


@dataclass
class CliRun:
    """What one in-process ``hexray`` run (the ``cli`` fixture) returned and printed."""

    code: int
    out: str
    err: str


def expected_names(spec, granularity: str) -> set[str]:
    """Every component name HexRay must report at ``granularity``, built independently of hexray.sites."""
    names = {"embed", "bias"}
    for layer in range(spec.n_layers):
        if granularity == "layer":
            names.add(f"ATTN{layer}")
        else:
            names |= {f"L{layer}H{h}" for h in range(spec.n_heads)}
        if granularity == "neuron":
            names |= {f"L{layer}N{n}" for n in range(spec.d_mlp)}
        else:
            names.add(f"MLP{layer}")
    return names
