"""Component labels: parsing, range checks and round trips (no model needed)."""

from __future__ import annotations

import pytest

from hexray.errors import HexRayError
from hexray.models.loading import ModelSpec
from hexray.tracing import sites
from hexray.tracing.sites import Component, parse_component, parse_components

# GPT-2 small's sizes: 12 layers, 12 heads, 3072 neurons per MLP.
SPEC = ModelSpec(
    name="gpt2-like",
    source="folder",
    architecture="GPT2LMHeadModel",
    n_layers=12,
    n_heads=12,
    n_kv_heads=12,
    d_model=768,
    d_head=64,
    d_mlp=3072,
    d_vocab=50257,
    n_ctx=1024,
    norm="layernorm",
    gated_mlp=False,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("L9H6", Component("head", 9, head=6)),
        ("l9h6", Component("head", 9, head=6)),
        ("  L9H6 ", Component("head", 9, head=6)),
        ("L0H0", Component("head", 0, head=0)),
        ("L11H11", Component("head", 11, head=11)),
        ("MLP10", Component("mlp", 10)),
        ("mlp10", Component("mlp", 10)),
        ("M3", Component("mlp", 3)),
        ("ATTN3", Component("attn", 3)),
        ("attn3", Component("attn", 3)),
        ("A7", Component("attn", 7)),
        ("L10N1234", Component("neuron", 10, neuron=1234)),
        ("l10n1234", Component("neuron", 10, neuron=1234)),
        ("L11N3071", Component("neuron", 11, neuron=3071)),
        ("RESID2", Component("resid", 2)),
        ("resid12", Component("resid", 12)),  # n_layers + 1 residual sites: 0..12
        ("embed", Component("embed")),
        ("EMBED", Component("embed")),
        ("bias", Component("bias")),
    ],
)
def test_parse_component(text, expected):
    got = parse_component(text, SPEC)
    assert got == expected
    assert got.kind == expected.kind
    assert (got.layer, got.head, got.neuron) == (expected.layer, expected.head, expected.neuron)


def test_parse_components_list():
    got = parse_components("L9H6, MLP10,,l10n1234 , embed", SPEC)
    assert got == (
        Component("head", 9, head=6),
        Component("mlp", 10),
        Component("neuron", 10, neuron=1234),
        Component("embed"),
    )
    assert [c.name for c in got] == ["L9H6", "MLP10", "L10N1234", "embed"]


@pytest.mark.parametrize("text", ["", "  ", ",", " , ,"])
def test_parse_components_empty(text):
    with pytest.raises(HexRayError) as info:
        parse_components(text, SPEC)
    assert "no components" in info.value.message
    assert "L9H6" in info.value.hint


@pytest.mark.parametrize("text", ["L9", "H6", "foo", "L9H", "LxH6", "MLP", "L9H6X", "L-1H2", "MLP-1", "N1234", "9H6", "embedding"])
def test_unknown_component(text):
    with pytest.raises(HexRayError) as info:
        parse_component(text, SPEC)
    err = info.value
    assert "unknown component" in err.message
    assert repr(text.strip()) in err.message
    # the hint lists the accepted forms
    for form in ("L9H6", "ATTN9", "MLP10", "L10N1234", "RESID12", "embed"):
        assert form in err.hint


def test_parse_components_reports_the_bad_item():
    with pytest.raises(HexRayError) as info:
        parse_components("L9H6, bogus", SPEC)
    assert "'bogus'" in info.value.message


@pytest.mark.parametrize(
    ("text", "bad", "valid"),
    [
        ("L12H0", "layer 12", "layers 0..11"),
        ("L99H0", "layer 99", "layers 0..11"),
        ("MLP12", "layer 12", "layers 0..11"),
        ("ATTN12", "layer 12", "layers 0..11"),
        ("L12N0", "layer 12", "layers 0..11"),
        ("RESID13", "layer 13", "layers 0..12"),
        ("L9H12", "head 12", "heads 0..11"),
        ("L0H100", "head 100", "heads 0..11"),
        ("L10N3072", "neuron 3072", "neurons 0..3071"),
        ("L10N99999", "neuron 99999", "neurons 0..3071"),
    ],
)
def test_out_of_range(text, bad, valid):
    with pytest.raises(HexRayError) as info:
        parse_component(text, SPEC)
    err = info.value
    assert text in err.message
    assert bad in err.message
    assert "out of range" in err.message
    assert valid in err.hint
    assert SPEC.name in err.hint
    assert err.one_line() == f"{err.message} ({err.hint})"


def test_ranges_follow_the_spec(tiny_model):
    spec = tiny_model.spec
    last = spec.n_layers - 1
    assert parse_component(f"L{last}H{spec.n_heads - 1}", spec) == Component("head", last, head=spec.n_heads - 1)
    assert parse_component(f"L{last}N{spec.d_mlp - 1}", spec) == Component("neuron", last, neuron=spec.d_mlp - 1)
    with pytest.raises(HexRayError, match=f"head {spec.n_heads}"):
        parse_component(f"L0H{spec.n_heads}", spec)
    with pytest.raises(HexRayError, match=f"neuron {spec.d_mlp}"):
        parse_component(f"L0N{spec.d_mlp}", spec)
    with pytest.raises(HexRayError, match=f"layer {spec.n_layers}"):
        parse_component(f"MLP{spec.n_layers}", spec)


@pytest.mark.parametrize(
    ("component", "name", "label"),
    [
        (Component("head", 9, head=6), "L9H6", "L9H6"),
        (Component("attn", 3), "ATTN3", "Attn L3"),
        (Component("mlp", 10), "MLP10", "MLP  L10"),
        (Component("neuron", 10, neuron=1234), "L10N1234", "L10N1234"),
        (Component("resid", 2), "RESID2", "RESID2"),
        (Component("embed"), "embed", "embed"),
        (Component("bias"), "bias", "bias"),
    ],
)
def test_name_round_trip(component, name, label):
    assert component.name == name
    assert component.label == label
    assert parse_component(component.name, SPEC) == component
    assert parse_component(component.name.lower(), SPEC) == component


def test_unknown_kind_has_no_name():
    with pytest.raises(ValueError):
        _ = Component("bogus").name  # type: ignore[arg-type]


def test_hook_names():
    assert sites.resid_pre(3) == "blocks.3.hook_resid_pre"
    assert sites.resid_post(3) == "blocks.3.hook_resid_post"
    assert sites.attn_out(1) == "blocks.1.hook_attn_out"
    assert sites.mlp_out(1) == "blocks.1.hook_mlp_out"
    assert sites.head_z(0) == "blocks.0.attn.hook_z"
    assert sites.attn_pattern(0) == "blocks.0.attn.hook_pattern"
    assert sites.mlp_post(2) == "blocks.2.mlp.hook_post"
    stream = sites.residual_stream(SPEC)
    assert len(stream) == SPEC.n_layers + 1
    assert stream[0] == "blocks.0.hook_resid_pre"
    assert stream[-2] == "blocks.11.hook_resid_pre"
    assert stream[-1] == "blocks.11.hook_resid_post"


def test_hook_names_exist_in_the_bridge(tiny_model):
    spec = tiny_model.spec
    names = set(tiny_model.bridge.hook_dict)
    wanted = {sites.EMBED, sites.FINAL_SCALE, *sites.residual_stream(spec)}
    for layer in range(spec.n_layers):
        wanted |= {
            sites.attn_out(layer),
            sites.mlp_out(layer),
            sites.head_z(layer),
            sites.attn_pattern(layer),
            sites.mlp_post(layer),
        }
    assert wanted <= names, sorted(wanted - names)
