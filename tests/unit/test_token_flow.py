"""Token flow: attention summed over heads and layers, checked against plain transformers' own
attention weights, the per-layer shares, the ranked pairs, the one reduced pass, the layer check
and the JSON document."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import hexray.analysis.flow as flow_module
from hexray.analysis.flow import token_flow
from hexray.errors import HexRayError
from hexray.render.jsondoc import token_flow_document
from hexray.tracing import sites

PROMPT = "When Mary and John went to the store, John gave a drink to Mary."


def hf_patterns(hf, ids: list[int]) -> np.ndarray:
    """Every layer's attention weights from plain transformers (eager): [layers, heads, q, k]."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True)
    return np.stack([a[0].double().numpy() for a in out.attentions])


def brute_top(score: np.ndarray, allowed, n: int) -> list[tuple[int, int]]:
    cells = [(float(score[q, k]), q, k) for q in range(score.shape[0]) for k in range(score.shape[1]) if allowed(q, k)]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [(q, k) for _, q, k in cells[:n]]


@pytest.fixture(scope="module")
def with_bos(tiny_model):
    return token_flow(tiny_model, PROMPT, prepend_bos=True)


def test_total_is_the_sum_of_every_layers_head_summed_pattern(tiny_model, tiny_hf_model, with_bos):
    """total[q, k] = sum over layers and heads of HF's A[l, h, q, k]; rows sum to n_layers * n_heads."""
    A = hf_patterns(tiny_hf_model, list(with_bos.token_ids))  # [layers, heads, q, k]
    n_layers, n_heads, n, _ = A.shape
    np.testing.assert_allclose(with_bos.total, A.sum((0, 1)), atol=1e-5)
    np.testing.assert_allclose(with_bos.total.sum(-1), n_layers * n_heads, rtol=1e-5)
    assert not np.allclose(with_bos.total, A[-1].sum(0), atol=1e-3)  # every layer counts, not only the last
    assert with_bos.layer is None and with_bos.layer_map is None
    assert (with_bos.n_layers, with_bos.n_heads, with_bos.total.shape) == (n_layers, n_heads, (n, n))


def test_by_layer_shares(tiny_model, tiny_hf_model, with_bos):
    """Per layer: the share of queries 1..'s attention on earlier tokens (k < q), and on key 0."""
    A = hf_patterns(tiny_hf_model, list(with_bos.token_ids))
    n_heads, n = A.shape[1], A.shape[2]
    rows = n_heads * (n - 1)
    expected_off = [sum(A[layer, h, q, k] for h in range(n_heads) for q in range(1, n) for k in range(q)) / rows for layer in range(A.shape[0])]
    expected_sink = [A[layer, :, 1:, 0].sum() / rows for layer in range(A.shape[0])]
    np.testing.assert_allclose(with_bos.by_layer, expected_off, atol=1e-6)
    np.testing.assert_allclose(with_bos.sink_by_layer, expected_sink, atol=1e-6)
    assert ((0 < with_bos.by_layer) & (with_bos.by_layer < 1)).all() and (with_bos.sink_by_layer < with_bos.by_layer).all()


@pytest.mark.parametrize("layer", [0, 1])
def test_layer_map_is_that_layers_pattern_summed_over_heads(tiny_model, tiny_hf_model, layer):
    f = token_flow(tiny_model, PROMPT, layer=layer, prepend_bos=True)
    A = hf_patterns(tiny_hf_model, list(f.token_ids))
    np.testing.assert_allclose(f.layer_map, A[layer].sum(0), atol=1e-6)
    np.testing.assert_allclose(f.total, A.sum((0, 1)), atol=1e-5)  # total still over every layer
    assert f.layer == layer and f.shown is f.layer_map
    assert [(p.query, p.key) for p in f.top_pairs] == brute_top(A[layer].sum(0), lambda q, k: 1 <= k < q, 20)


def test_top_pairs_of_the_total_leave_out_the_diagonal_and_the_bos_key(tiny_model, tiny_hf_model, with_bos):
    A = hf_patterns(tiny_hf_model, list(with_bos.token_ids)).sum((0, 1))  # [q, k]
    assert with_bos.sink_excluded and with_bos.token_ids[0] == tiny_model.tokenizer.bos_token_id
    pairs = with_bos.top_pairs
    assert len(pairs) == 20
    assert [(p.query, p.key) for p in pairs] == brute_top(A, lambda q, k: 1 <= k < q, 20)
    weights = [p.weight for p in pairs]
    assert weights == sorted(weights, reverse=True)
    for p in pairs:
        assert p.key < p.query and p.key >= 1 and p.moved is None
        assert (p.query_token, p.key_token) == (with_bos.tokens[p.query], with_bos.tokens[p.key])
        assert p.weight == pytest.approx(A[p.query, p.key], abs=1e-5)


def test_without_bos_key_0_is_an_ordinary_token(tiny_model, tiny_hf_model):
    f = token_flow(tiny_model, PROMPT, prepend_bos=False)
    assert not f.sink_excluded
    A = hf_patterns(tiny_hf_model, list(f.token_ids)).sum((0, 1))
    assert [(p.query, p.key) for p in f.top_pairs] == brute_top(A, lambda q, k: k < q, 20)
    assert any(p.key == 0 for p in f.top_pairs)  # so leaving it out would show
    forced = token_flow(tiny_model, PROMPT, prepend_bos=False, exclude_first_key=True)
    assert forced.sink_excluded and [(p.query, p.key) for p in forced.top_pairs] == brute_top(A, lambda q, k: 1 <= k < q, 20)
    kept = token_flow(tiny_model, PROMPT, prepend_bos=True, exclude_first_key=False)
    assert not kept.sink_excluded and any(p.key == 0 for p in kept.top_pairs)


def test_one_reduced_pass_keeps_no_layer_maps(tiny_model, monkeypatch):
    """One run_reduced over every layer's pattern, each reduced to two numbers inside the pass."""
    calls = []
    real = flow_module.run_reduced

    def watching(model, batch, reducers, **kwargs):
        out = real(model, batch, reducers, **kwargs)
        calls.append((set(reducers), {name: tuple(v.shape) for name, v in out.items()}))
        return out

    monkeypatch.setattr(flow_module, "run_reduced", watching)
    token_flow(tiny_model, PROMPT, layer=1)
    layers = {sites.attn_pattern(layer) for layer in range(tiny_model.spec.n_layers)}
    assert calls == [(layers, {name: (2,) for name in layers})]


@pytest.mark.parametrize("layer", [2, -1, 99])
def test_layer_out_of_range_is_refused(tiny_model, layer):
    with pytest.raises(HexRayError, match=f"layer {layer} is out of range") as err:
        token_flow(tiny_model, PROMPT, layer=layer)
    assert err.value.hint == "use 0..1"


def test_document(tiny_model, with_bos):
    doc = json.loads(json.dumps(token_flow_document(with_bos), allow_nan=False))
    n = len(with_bos.tokens)
    assert (doc["n_layers"], doc["n_heads"], doc["layer"], doc["layer_map"]) == (2, 4, None, None)
    assert doc["row_sum"] == 8 and doc["sink_excluded"] is True and doc["tokens"] == list(with_bos.tokens)
    assert len(doc["total"]) == n and doc["total"][3] == pytest.approx(with_bos.total[3].tolist(), abs=5e-5)
    assert doc["by_layer"] == pytest.approx(with_bos.by_layer.tolist(), abs=1e-6)
    p = with_bos.top_pairs[0]
    assert doc["top_pairs"][0] == {"query": p.query, "key": p.key, "query_token": p.query_token, "key_token": p.key_token, "weight": round(p.weight, 6)}
    one = token_flow_document(token_flow(tiny_model, PROMPT, layer=0))
    assert one["row_sum"] == 4 and one["layer"] == 0 and len(one["layer_map"]) == len(one["tokens"])


def test_one_token_prompt(tiny_model):
    """Nothing to look back at: the shares are undefined (null), no pairs."""
    f = token_flow(tiny_model, "Mary", prepend_bos=False)
    assert f.total.shape == (1, 1) and f.total[0, 0] == pytest.approx(8) and np.isnan(f.by_layer).all() and f.top_pairs == ()
    doc = json.loads(json.dumps(token_flow_document(f), allow_nan=False))
    assert doc["by_layer"] == [None, None] and doc["top_pairs"] == []
