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


def tree(folder) -> dict:
    """Every path under ``folder`` with its bytes (None for folders): a snapshot to compare."""
    from pathlib import Path

    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def assert_one_line_error(r: CliRun, expected: str) -> None:
    """A user's mistake: exit 2, nothing on stdout, one ``error:`` line on stderr naming ``expected``."""
    assert r.code == 2, (r.code, r.out, r.err)
    assert r.out == ""
    assert "Traceback" not in r.err
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1, r.err
    assert lines[0].startswith("error: ")
    assert expected in lines[0], lines[0]
