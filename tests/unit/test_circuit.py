"""The first-order circuit: level 0 is DLA exactly; deeper edges match finite differences of a hand-made readout."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution
from hexray.analysis.circuit import MAX_DEPTH, MAX_K, circuit
from hexray.errors import HexRayError
from hexray.render.jsondoc import circuit_document
from hexray.tracing import sites
from hexray.tracing.engine import run_trace, run_with_gradients

PROMPT = "When Mary and John went to the store, John gave a drink to"
K, DEPTH = 3, 2
STEP = 2e-2
# The finite differences run on a float64 copy of the weights, but Llama's RMSNorm computes in
# float32 whatever the model's dtype, so the reference still rounds at ~1e-7 relative there: a tiny
# step would amplify that (1e-7 / step). Instead a central difference at STEP and STEP/2 is
# Richardson-extrapolated, whose truncation error is O(STEP^4) ~ 1e-7 and whose rounding stays
# ~1e-4 of the smallest edge checked. The circuit itself runs in float32 (every HexRay load is
# float32 or lower), its gradients good to ~1e-6 relative. 1e-3 relative (with an absolute floor
# far below the smallest edge) still fails on any wrong sign, head, hook, position or bias, each of
# which changes an edge by far more.
REL, ABS = 1e-3, 1e-7
N_LAYERS_DEEP = 4  # deep enough for level-2 edges (the shared tiny models have two layers)


@dataclass(frozen=True)
class DeepPair:
    """The same random weights loaded twice: as HexRay loads them (float32) and cast to float64 for references."""

    model: object
    model64: object


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def deep(request, tiny_tokenizer, tmp_path_factory) -> DeepPair:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from hexray.models.loading import load_model

    torch.manual_seed(10)
    ids = {"vocab_size": len(tiny_tokenizer), "bos_token_id": tiny_tokenizer.bos_token_id, "eos_token_id": tiny_tokenizer.eos_token_id}
    if request.param == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=N_LAYERS_DEEP, n_head=4, n_positions=64, **ids))
    else:
        hf = LlamaForCausalLM(LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=N_LAYERS_DEEP, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, attention_bias=True, mlp_bias=True, tie_word_embeddings=False, **ids,
        ))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # non-trivial norm weights and biases
        for param in hf.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    folder = tmp_path_factory.mktemp(f"deep-{request.param}")
    hf.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    model64 = load_model(str(folder))
    model64.bridge.to(torch.float64)
    return DeepPair(load_model(str(folder)), model64)


@pytest.fixture(scope="module")
def deep_ioi(deep):
    return circuit(deep.model, PROMPT, target=" Mary", contrast=" John", k=K, depth=DEPTH)


@pytest.fixture(scope="module")
def ioi(tiny_model):
    return circuit(tiny_model, PROMPT, target=" Mary", contrast=" John", k=K, depth=DEPTH)


@pytest.fixture(scope="module")
def reference_dla(tiny_model):
    """DLA at head granularity from its own trace: the level-0 reference."""
    model = tiny_model
    trace = run_trace(model, PROMPT, attribution_hooks(model.spec, "head"))
    return direct_logit_attribution(
        model, trace, target=model.single_token(" Mary"), contrast=model.single_token(" John"), granularity="head"
    )


def _dla_scores(attribution) -> dict:
    return {c.component: c.score for c in attribution.components if c.component.kind in ("head", "mlp")}


# ---------------------------------------------------------------------------------------------
# level 0: exactly DLA
# ---------------------------------------------------------------------------------------------


def test_level_zero_edges_are_the_top_k_dla_scores(ioi, reference_dla):
    scores = _dla_scores(reference_dla)
    top = sorted(scores, key=lambda c: -abs(scores[c]))[:K]
    into_logit = [e for e in ioi.edges if e.destination is None]
    assert [e.source for e in into_logit] == top
    for e in into_logit:
        assert e.exact and e.score == pytest.approx(scores[e.source], rel=1e-6, abs=1e-7)
    assert ioi.value == pytest.approx(reference_dla.value, rel=1e-6)
    assert ioi.target.token == " Mary" and ioi.contrast.token == " John"
    assert ioi.position == len(ioi.token_ids) - 1


def test_nodes_are_every_edge_end_with_its_dla_score(ioi, reference_dla):
    scores = _dla_scores(reference_dla)
    names = [n.component for n in ioi.nodes]
    assert len(names) == len(set(names))
    ends = {e.source for e in ioi.edges} | {e.destination for e in ioi.edges if e.destination is not None}
    assert set(names) == ends
    for n in ioi.nodes:
        assert n.score == pytest.approx(scores[n.component], rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# deeper levels: shape of the graph
# ---------------------------------------------------------------------------------------------


def _earlier(u, v) -> bool:
    return u.layer < v.layer or (u.layer == v.layer and u.kind == "head" and v.kind == "mlp")


def _levels(c) -> tuple[list, list]:
    """(the logit's contributors, then per expanded level the nodes expanded), read off the edges in order."""
    level0 = [e.source for e in c.edges if e.destination is None]
    levels, seen, previous = [], set(level0), set(level0)
    inner = [e for e in c.edges if e.destination is not None]
    while inner:
        expanded = list(dict.fromkeys(e.destination for e in inner if e.destination in previous))
        assert expanded, "an edge leads into a node no level put on the frontier"
        levels.append(expanded)
        parents = {e.source for e in inner if e.destination in previous}
        inner = [e for e in inner if e.destination not in previous]
        previous = parents - seen
        seen |= parents
    return level0, levels


def _check_edges_go_forward(c) -> None:
    inner = [e for e in c.edges if e.destination is not None]
    assert inner, "the circuit has no edges past level 0"
    for e in inner:
        assert not e.exact
        assert _earlier(e.source, e.destination), f"{e.source.name} -> {e.destination.name}"


def test_edges_only_go_from_earlier_to_later_components(deep_ioi):
    _check_edges_go_forward(deep_ioi)


def test_edges_of_the_shared_tiny_models_go_forward_too(ioi):
    _check_edges_go_forward(ioi)


def test_levels_keep_k_parents_each_and_expand_the_strongest_k(deep_ioi):
    level0, levels = _levels(deep_ioi)
    assert len(levels) == DEPTH, "the deep model must reach the last level"
    expanded: set = set()
    for i, nodes in enumerate(levels):
        assert len(nodes) <= K and not expanded & set(nodes)
        assert not any(c.kind == "head" and c.layer == 0 for c in nodes), "a layer-0 head has no parents to expand"
        edges_in = [[e for e in deep_ioi.edges if e.destination == v] for v in nodes]
        for edges in edges_in:
            assert len(edges) == min(K, len({e.source for e in edges}) if len(edges) < K else K)
            assert [abs(e.score) for e in edges] == sorted((abs(e.score) for e in edges), reverse=True)
        expanded |= set(nodes)
        if i + 1 < len(levels):  # the next frontier: the k strongest parents reaching this level, not yet expanded, that have parents
            reaching: dict = {}
            for edges in edges_in:
                for e in edges:
                    reaching[e.source] = max(reaching.get(e.source, 0.0), abs(e.score))
            candidates = [c for c in reaching if c not in expanded and (c.layer > 0 or c.kind == "mlp")]
            assert set(levels[i + 1]) == set(sorted(candidates, key=lambda c: -reaching[c])[:K])


def test_depth_one_expands_only_the_direct_contributors(tiny_model):
    c = circuit(tiny_model, PROMPT, k=2, depth=1)
    level0 = {e.source for e in c.edges if e.destination is None}
    assert len(level0) == 2
    assert {e.destination for e in c.edges if e.destination is not None} <= level0
    assert c.contrast is None and c.target.id == int(run_trace(tiny_model, PROMPT, ()).logits[-1].argmax())


# ---------------------------------------------------------------------------------------------
# deeper levels: each edge is the derivative of v's contribution in u's output scale
# ---------------------------------------------------------------------------------------------


def _readout_direction(model, ids, target: int, contrast: int, position: int) -> torch.Tensor:
    """d with ``output_p . d`` = a component's direct share, by hand from the weights, final scale frozen: [d_model] float64."""
    bridge = model.bridge
    with torch.no_grad():
        _, cache = bridge.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n == str(sites.FINAL_SCALE))
    scale = cache[str(sites.FINAL_SCALE)][0, position].double().reshape(-1)[0]
    u = (bridge.W_U[:, target] - bridge.W_U[:, contrast]).detach().double()
    d = bridge.ln_final.original_component.weight.detach().double() * u
    if model.spec.norm == "layernorm":
        d = d - d.mean()
    return d / scale


def _contribution(model, v, activation: torch.Tensor, d: torch.Tensor, position: int) -> float:
    """v's direct share at ``position`` from its raw hook activation [pos, ...] (constants left out)."""
    a = activation[position].double()
    if v.kind == "head":
        return float(a[v.head] @ model.bridge.blocks[v.layer].attn.W_O[v.head].detach().double() @ d)
    return float(a @ d)


def _contribution_with_scaled(model, ids, u, v, factor: float, d, position: int) -> float:
    """Run with u's output (bias excluded for an MLP) times ``factor``; v's contribution in that run."""
    seen = {}

    def scale_u(x, hook):
        x = x.clone()
        if u.kind == "head":
            x[:, :, u.head] *= factor
        else:
            bias = model.bridge.blocks[u.layer].mlp.b_out.detach()
            x = bias + (x - bias) * factor
        return x

    def keep_v(x, hook):
        seen["v"] = x[0].detach()

    with torch.no_grad():
        model.bridge.run_with_hooks(torch.tensor([ids]), fwd_hooks=[(str(u.hook), scale_u), (str(v.hook), keep_v)])
    return _contribution(model, v, seen["v"], d, position)


def _finite_difference(model, ids, u, v, d, position: int) -> float:
    """d(v's contribution) / d(scale of u's output) at 1: central differences at STEP and STEP / 2, Richardson-extrapolated."""

    def central(step: float) -> float:
        plus = _contribution_with_scaled(model, ids, u, v, 1 + step, d, position)
        minus = _contribution_with_scaled(model, ids, u, v, 1 - step, d, position)
        return (plus - minus) / (2 * step)

    return (4 * central(STEP / 2) - central(STEP)) / 3


def test_inner_edges_match_central_finite_differences(deep, deep_ioi):
    model64, c = deep.model64, deep_ioi
    ids, pos = list(c.token_ids), c.position
    d = _readout_direction(model64, ids, c.target.id, c.contrast.id, pos)
    inner = [e for e in c.edges if e.destination is not None]
    assert any(e.source.kind == "mlp" for e in inner) and any(e.source.kind == "head" for e in inner)
    assert any(e.destination.kind == "mlp" and e.source.layer == e.destination.layer for e in inner) or deep.model.spec.n_layers < 2
    for e in inner:
        reference = _finite_difference(model64, ids, e.source, e.destination, d, pos)
        assert math.isclose(e.score, reference, rel_tol=REL, abs_tol=ABS), f"{e.source.name} -> {e.destination.name}: {e.score} vs {reference}"
    assert sum(abs(e.score) > 1e-3 for e in inner) >= K, "too few edges large enough for the check to mean anything"


def test_inner_edges_of_the_shared_tiny_models_match_too(tiny_model_folder, ioi):
    from hexray.models.loading import load_model

    model64 = load_model(str(tiny_model_folder))
    model64.bridge.to(torch.float64)
    ids, pos = list(ioi.token_ids), ioi.position
    d = _readout_direction(model64, ids, ioi.target.id, ioi.contrast.id, pos)
    for e in (e for e in ioi.edges if e.destination is not None):
        reference = _finite_difference(model64, ids, e.source, e.destination, d, pos)
        assert math.isclose(e.score, reference, rel_tol=REL, abs_tol=ABS), f"{e.source.name} -> {e.destination.name}: {e.score} vs {reference}"


def test_the_hand_made_readout_is_dla(deep, deep_ioi):
    """Unscaled, the reference's readout gives each head's DLA score: the finite differences differentiate the right thing."""
    ids, pos = list(deep_ioi.token_ids), deep_ioi.position
    d = _readout_direction(deep.model64, ids, deep_ioi.target.id, deep_ioi.contrast.id, pos)
    heads = [n for n in deep_ioi.nodes if n.component.kind == "head"]
    other = next(n.component for n in deep_ioi.nodes if n.component.kind == "mlp")
    assert heads
    for n in heads:
        by_hand = _contribution_with_scaled(deep.model64, ids, other, n.component, 1.0, d, pos)
        assert by_hand == pytest.approx(n.score, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# the engine's extension, validation, the document
# ---------------------------------------------------------------------------------------------


def test_run_with_gradients_differentiates_a_function_of_activations(tiny_model):
    ids = tiny_model.encode(PROMPT)
    hook = sites.mlp_out(0)
    _, acts, grads = run_with_gradients(tiny_model, ids, [hook], lambda logits, acts: (acts[hook] ** 2).sum() / 2, metric_reads_acts=True)
    torch.testing.assert_close(grads[hook], acts[hook])  # d/dx x^2/2 = x: the gradient of the activations' own function
    _, _, plain = run_with_gradients(tiny_model, ids, [hook], lambda logits: logits[-1, 0])  # the logits-only form still works
    assert plain[hook].shape == acts[hook].shape and plain[hook].abs().sum() > 0


@pytest.mark.parametrize("k, depth", [(0, 2), (-1, 2), (MAX_K + 1, 2), (2.5, 2), (True, 2), ("3", 2), (3, 0), (3, -2), (3, MAX_DEPTH + 1), (3, 1.0)])
def test_bad_k_or_depth_is_a_hexray_error_with_a_hint(tiny_gpt2, k, depth):
    with pytest.raises(HexRayError) as info:
        circuit(tiny_gpt2, PROMPT, k=k, depth=depth)
    assert info.value.field == ("k" if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_K) else "depth")
    assert info.value.hint and "1 to" in info.value.message


def test_circuit_document_is_strict_json_with_grid_positions(ioi):
    doc = circuit_document(ioi)
    json.dumps(doc, allow_nan=False)
    assert set(doc) >= {"model", "tokens", "position", "target", "contrast", "value", "method", "nodes", "edges"}
    assert doc["method"] == "input × gradient (first order)"
    names = {n["name"] for n in doc["nodes"]}
    for n in doc["nodes"]:
        assert (n["kind"], n["name"]) in {("head", f"L{n['layer']}H{n['head']}"), ("mlp", f"MLP{n['layer']}")}
        assert (n["head"] is None) == (n["kind"] == "mlp")
    for e in doc["edges"]:
        assert e["source"] in names and (e["destination"] is None or e["destination"] in names)
        assert e["exact"] == (e["destination"] is None)


def test_write_norms_are_what_each_head_and_mlp_writes_at_the_position(tiny_model):
    """The view's brightness: |z_h W_O[h]| agrees with the head inspector's output norm (pattern @ values, another path)."""
    from hexray.analysis.heads import head_attention

    c = circuit(tiny_model, PROMPT, k=2, depth=1)
    spec = tiny_model.spec
    assert c.head_write_norm.shape == (spec.n_layers, spec.n_heads) and c.mlp_write_norm.shape == (spec.n_layers,)
    for layer in range(spec.n_layers):
        for h in range(spec.n_heads):
            inspected = head_attention(tiny_model, PROMPT, layer, h, seq_len=4, n_sequences=1)
            assert c.head_write_norm[layer, h] == pytest.approx(inspected.output_norm[c.position], rel=1e-4)
    trace = run_trace(tiny_model, PROMPT, {sites.mlp_out(layer) for layer in range(spec.n_layers)})
    for layer in range(spec.n_layers):
        assert c.mlp_write_norm[layer] == pytest.approx(float(trace.acts[sites.mlp_out(layer)][c.position].norm()), rel=1e-5)
    doc = circuit_document(c)
    assert len(doc["output_norm"]) == spec.n_layers and len(doc["mlp_norm"]) == spec.n_layers
