"""Direct logit attribution: the parts sum to the real logit (difference), at every granularity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hexray.analysis.attribution import (
    attribution_hooks,
    check_granularity,
    direct_logit_attribution,
)
from hexray.analysis.results import GRANULARITIES
from hexray.errors import HexRayError
from hexray.tracing import sites
from hexray.tracing.engine import run_trace
from tests.helpers import expected_names

PROMPT = "When Mary and John went to the store, John gave a drink to"
POSITIONS = ("last", "first", "middle")
# (case id, target text or None for the model's own prediction, contrast text or None)
CASES = [
    ("default", None, None),
    ("target", " Mary", None),
    ("contrast", " Mary", " John"),
    ("default-vs-contrast", None, " John"),
]

REL = 1e-3


def _close(a: float, b: float, rel: float = REL, abs_: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


# ---------------------------------------------------------------------------------------------
# fixtures: one trace per (model, granularity), one plain HF forward per model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traces(tiny_model):
    """granularity -> trace of PROMPT holding exactly that granularity's hooks."""
    return {g: run_trace(tiny_model, PROMPT, attribution_hooks(tiny_model.spec, g)) for g in GRANULARITIES}


@pytest.fixture(scope="module")
def hf_logits(tiny_model, tiny_hf_model):
    """Logits of a plain Hugging Face forward on PROMPT's token ids: [pos, vocab].

    Both the bridge's ``original_model`` and an untouched copy loaded straight from the folder
    must give them.
    """
    ids = torch.tensor([tiny_model.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        wrapped = tiny_model.bridge.original_model(ids).logits[0].double()
        plain = tiny_hf_model(ids).logits[0].double()
    torch.testing.assert_close(wrapped, plain, rtol=1e-5, atol=1e-6)
    return plain


def _position(which: str, n_tokens: int) -> int:
    return {"last": -1, "first": 0, "middle": n_tokens // 2}[which]


def _ids(model, target, contrast):
    t = None if target is None else model.single_token(target)
    c = None if contrast is None else model.single_token(contrast)
    return t, c


def expected_count(spec, granularity: str) -> int:
    per_layer = {
        "layer": 2,
        "head": spec.n_heads + 1,
        "neuron": spec.n_heads + spec.d_mlp,
    }[granularity]
    return 2 + spec.n_layers * per_layer


# ---------------------------------------------------------------------------------------------
# conservation and the independent value check
# ---------------------------------------------------------------------------------------------


def test_prompt_tokens_and_trace_logits_match_hf(tiny_model, traces, hf_logits):
    ids = tuple(tiny_model.tokenizer(PROMPT)["input_ids"])
    assert len(ids) >= 5
    for trace in traces.values():
        assert trace.token_ids == ids
        assert trace.logits.shape == (len(ids), tiny_model.spec.d_vocab)
        torch.testing.assert_close(trace.logits.double(), hf_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("where", POSITIONS)
@pytest.mark.parametrize(("case", "target", "contrast"), CASES, ids=[c[0] for c in CASES])
def test_scores_sum_to_the_real_logit(tiny_model, traces, hf_logits, granularity, where, case, target, contrast):
    trace = traces[granularity]
    position = _position(where, trace.n_tokens)
    pos = position % trace.n_tokens
    target_id, contrast_id = _ids(tiny_model, target, contrast)

    attr = direct_logit_attribution(
        tiny_model, trace, position=position, target=target_id, contrast=contrast_id, granularity=granularity
    )

    # independent: the value is the real logit (difference) of a plain HF forward
    real = hf_logits[pos]
    expected_target = int(real.argmax()) if target_id is None else target_id
    expected_value = float(real[expected_target] - (real[contrast_id] if contrast_id is not None else 0.0))
    assert attr.position == pos
    assert attr.granularity == granularity
    assert attr.target.id == expected_target
    assert attr.target.token == tiny_model.token_str(expected_target)
    assert _close(attr.target.logit, float(real[expected_target]))
    assert _close(attr.target.prob, float(torch.softmax(real, -1)[expected_target]))
    if contrast_id is None:
        assert attr.contrast is None
    else:
        assert attr.contrast.id == contrast_id
        assert _close(attr.contrast.logit, float(real[contrast_id]))
    assert _close(attr.value, expected_value), (attr.value, expected_value)

    # conservation: the parts sum to the value
    total = sum(c.score for c in attr.components)
    assert _close(total, attr.value), (total, attr.value)
    assert _close(total, expected_value), (total, expected_value)
    assert attr.reconstruction_error == pytest.approx(abs(total - attr.value), abs=1e-9)
    assert attr.reconstruction_error < 1e-4

    # the bookkeeping fields come from the trace
    assert attr.prompt == PROMPT
    assert attr.token_ids == trace.token_ids
    assert attr.tokens == trace.tokens
    assert attr.model == tiny_model.name


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_component_names_count_and_order(tiny_model, traces, granularity):
    spec = tiny_model.spec
    attr = direct_logit_attribution(tiny_model, traces[granularity], granularity=granularity)
    names = [c.name for c in attr.components]
    assert len(names) == expected_count(spec, granularity)
    assert len(set(names)) == len(names), "duplicate components"
    assert set(names) == expected_names(spec, granularity)
    magnitudes = [abs(c.score) for c in attr.components]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert all(math.isfinite(c.score) for c in attr.components)
    # the components are real Component values whose kinds match the granularity
    kinds = {c.component.kind for c in attr.components}
    assert kinds == {
        "layer": {"embed", "bias", "attn", "mlp"},
        "head": {"embed", "bias", "head", "mlp"},
        "neuron": {"embed", "bias", "head", "neuron"},
    }[granularity]
    assert attr.top(3) == attr.components[:3]
    assert attr.score_of(names[-1]) == attr.components[-1].score
    with pytest.raises(KeyError):
        attr.score_of("L99H99")


@pytest.mark.parametrize("granularity", ["head", "neuron"])
def test_per_head_scores_differ(tiny_model, traces, granularity):
    spec = tiny_model.spec
    attr = direct_logit_attribution(tiny_model, traces[granularity], granularity=granularity)
    for layer in range(spec.n_layers):
        heads = [attr.score_of(f"L{layer}H{h}") for h in range(spec.n_heads)]
        assert max(heads) - min(heads) > 1e-6, heads
        assert any(abs(s) > 1e-6 for s in heads)


def test_neuron_scores_differ(tiny_model, traces):
    spec = tiny_model.spec
    attr = direct_logit_attribution(tiny_model, traces["neuron"], granularity="neuron")
    for layer in range(spec.n_layers):
        neurons = np.array([attr.score_of(f"L{layer}N{n}") for n in range(spec.d_mlp)])
        assert neurons.std() > 1e-6


@pytest.mark.parametrize("where", POSITIONS)
@pytest.mark.parametrize(("case", "target", "contrast"), CASES, ids=[c[0] for c in CASES])
def test_granularities_agree(tiny_model, traces, where, case, target, contrast):
    spec = tiny_model.spec
    position = _position(where, traces["layer"].n_tokens)
    target_id, contrast_id = _ids(tiny_model, target, contrast)
    attrs = {
        g: direct_logit_attribution(tiny_model, traces[g], position=position, target=target_id, contrast=contrast_id, granularity=g)
        for g in GRANULARITIES
    }
    layer, head, neuron = attrs["layer"], attrs["head"], attrs["neuron"]
    assert layer.value == head.value == neuron.value
    assert layer.target.id == head.target.id == neuron.target.id

    for lyr in range(spec.n_layers):
        heads_sum = sum(head.score_of(f"L{lyr}H{h}") for h in range(spec.n_heads))
        assert layer.score_of(f"ATTN{lyr}") == pytest.approx(heads_sum, abs=1e-4)
        neurons_sum = sum(neuron.score_of(f"L{lyr}N{n}") for n in range(spec.d_mlp))
        assert layer.score_of(f"MLP{lyr}") == pytest.approx(neurons_sum, abs=1e-4)
        # the same hook read the same way at two granularities
        assert layer.score_of(f"MLP{lyr}") == pytest.approx(head.score_of(f"MLP{lyr}"), abs=1e-6)
        for h in range(spec.n_heads):
            assert head.score_of(f"L{lyr}H{h}") == pytest.approx(neuron.score_of(f"L{lyr}H{h}"), abs=1e-6)

    assert layer.score_of("bias") == pytest.approx(head.score_of("bias"), abs=1e-7)
    assert layer.score_of("bias") == pytest.approx(neuron.score_of("bias"), abs=1e-7)
    assert layer.score_of("embed") == pytest.approx(head.score_of("embed"), abs=1e-6)
    assert layer.score_of("embed") == pytest.approx(neuron.score_of("embed"), abs=1e-6)


def test_bias_component_is_exercised(tiny_model, traces):
    """The noisy init gives every bias a non-zero share, so a dropped bias would break conservation."""
    attr = direct_logit_attribution(tiny_model, traces["head"], granularity="head")
    assert abs(attr.score_of("bias")) > 1e-3
    for layer in range(tiny_model.spec.n_layers):
        assert float(tiny_model.b_O[layer].abs().max()) > 1e-3
        assert float(tiny_model.b_out[layer].abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------
# an independent re-derivation from the plain HF model (layer granularity)
# ---------------------------------------------------------------------------------------------


def _hf_parts(model, hf, ids):
    """From the plain HF model alone: per-block residual writes, embeddings, final-norm input and params."""
    if model.spec.architecture.startswith("GPT2"):
        final_norm = hf.transformer.ln_f
        blocks = hf.transformer.h
        b_attn = [blk.attn.c_proj.bias for blk in blocks]
        b_mlp = [blk.mlp.c_proj.bias for blk in blocks]
        eps = final_norm.eps
        norm_bias = final_norm.bias
    else:
        final_norm = hf.model.norm
        blocks = hf.model.layers
        b_attn = [blk.self_attn.o_proj.bias for blk in blocks]
        b_mlp = [blk.mlp.down_proj.bias for blk in blocks]
        eps = final_norm.variance_epsilon
        norm_bias = None
    captured = {}
    handle = final_norm.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0].detach()))
    try:
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_hidden_states=True)
    finally:
        handle.remove()
    hidden = [h[0].double() for h in out.hidden_states[: model.spec.n_layers]] + [captured["x"][0].double()]
    lm_bias = hf.lm_head.bias
    return {
        "resid": hidden,  # n_layers + 1 entries: before each block, then the final norm's input
        "norm_weight": final_norm.weight.detach().double(),
        "norm_bias": None if norm_bias is None else norm_bias.detach().double(),
        "eps": eps,
        "b_layer": [(a.detach() + m.detach()).double() for a, m in zip(b_attn, b_mlp)],
        "W_U": hf.lm_head.weight.detach().double(),  # [vocab, d_model]
        "b_U": None if lm_bias is None else lm_bias.detach().double(),
        "logits": out.logits[0].double(),
    }


@pytest.mark.parametrize("where", POSITIONS)
def test_matches_an_independent_derivation(tiny_model, tiny_hf_model, traces, where):
    trace = traces["layer"]
    ids = list(trace.token_ids)
    pos = _position(where, len(ids)) % len(ids)
    target, contrast = tiny_model.single_token(" Mary"), tiny_model.single_token(" John")
    parts = _hf_parts(tiny_model, tiny_hf_model, ids)

    x = parts["resid"][-1][pos]
    if tiny_model.spec.norm == "layernorm":
        scale = torch.sqrt(x.var(unbiased=False) + parts["eps"])
    else:
        scale = torch.sqrt(x.pow(2).mean() + parts["eps"])
    u = parts["W_U"][target] - parts["W_U"][contrast]
    d = parts["norm_weight"] * u
    if tiny_model.spec.norm == "layernorm":
        d = d - d.mean()
    d = d / scale

    attr = direct_logit_attribution(tiny_model, trace, position=pos, target=target, contrast=contrast, granularity="layer")
    assert attr.score_of("embed") == pytest.approx(float(parts["resid"][0][pos] @ d), abs=1e-4)
    bias = sum(float(b @ d) for b in parts["b_layer"])
    if parts["norm_bias"] is not None:
        bias += float(parts["norm_bias"] @ u)
    if parts["b_U"] is not None:
        bias += float(parts["b_U"][target] - parts["b_U"][contrast])
    assert attr.score_of("bias") == pytest.approx(bias, abs=1e-4)
    for layer in range(tiny_model.spec.n_layers):
        write = parts["resid"][layer + 1][pos] - parts["resid"][layer][pos]
        expected = float(write @ d) - float(parts["b_layer"][layer] @ d)
        got = attr.score_of(f"ATTN{layer}") + attr.score_of(f"MLP{layer}")
        assert got == pytest.approx(expected, abs=1e-4)
    real = parts["logits"][pos]
    assert attr.value == pytest.approx(float(real[target] - real[contrast]), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# head_matrix / layer_totals
# ---------------------------------------------------------------------------------------------


def test_head_matrix(tiny_model, traces):
    spec = tiny_model.spec
    layer_attr = direct_logit_attribution(tiny_model, traces["layer"], granularity="layer")
    assert layer_attr.head_matrix(spec.n_layers, spec.n_heads).shape == (spec.n_layers, spec.n_heads)
    assert np.isnan(layer_attr.head_matrix(spec.n_layers, spec.n_heads)).all()

    for granularity in ("head", "neuron"):
        attr = direct_logit_attribution(tiny_model, traces[granularity], granularity=granularity)
        matrix = attr.head_matrix(spec.n_layers, spec.n_heads)
        assert matrix.shape == (spec.n_layers, spec.n_heads)
        assert not np.isnan(matrix).any()
        for layer in range(spec.n_layers):
            for h in range(spec.n_heads):
                assert matrix[layer, h] == attr.score_of(f"L{layer}H{h}")
            assert matrix[layer].sum() == pytest.approx(layer_attr.score_of(f"ATTN{layer}"), abs=1e-4)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_layer_totals(tiny_model, traces, granularity):
    spec = tiny_model.spec
    reference = direct_logit_attribution(tiny_model, traces["layer"], granularity="layer")
    attr = direct_logit_attribution(tiny_model, traces[granularity], granularity=granularity)
    attn, mlp = attr.layer_totals(spec.n_layers)
    assert attn.shape == mlp.shape == (spec.n_layers,)
    for layer in range(spec.n_layers):
        assert attn[layer] == pytest.approx(reference.score_of(f"ATTN{layer}"), abs=1e-4)
        assert mlp[layer] == pytest.approx(reference.score_of(f"MLP{layer}"), abs=1e-4)
    rebuilt = attn.sum() + mlp.sum() + attr.score_of("embed") + attr.score_of("bias")
    assert rebuilt == pytest.approx(attr.value, rel=REL, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# hooks and argument checks
# ---------------------------------------------------------------------------------------------


def test_attribution_hooks(tiny_model):
    spec = tiny_model.spec
    L = range(spec.n_layers)
    base = {sites.EMBED, sites.POS_EMBED, sites.FINAL_SCALE}
    assert attribution_hooks(spec, "layer") == base | {sites.attn_out(i) for i in L} | {sites.mlp_out(i) for i in L}
    assert attribution_hooks(spec, "head") == base | {sites.head_z(i) for i in L} | {sites.mlp_out(i) for i in L}
    assert attribution_hooks(spec, "neuron") == base | {sites.head_z(i) for i in L} | {sites.mlp_post(i) for i in L}


def test_unknown_granularity(tiny_model, traces):
    with pytest.raises(HexRayError) as info:
        check_granularity("token")
    assert "'token'" in info.value.message
    assert "layer, head or neuron" in info.value.hint
    with pytest.raises(HexRayError):
        attribution_hooks(tiny_model.spec, "heads")  # type: ignore[arg-type]
    with pytest.raises(HexRayError):
        direct_logit_attribution(tiny_model, traces["layer"], granularity="block")  # type: ignore[arg-type]


def test_position_out_of_range(tiny_model, traces):
    trace = traces["layer"]
    with pytest.raises(HexRayError, match="out of range"):
        direct_logit_attribution(tiny_model, trace, position=trace.n_tokens)
    with pytest.raises(HexRayError, match="out of range"):
        direct_logit_attribution(tiny_model, trace, position=-trace.n_tokens - 1)
