"""The head inspector (``head_attention``): entropy, concentration, value and output norms and the
strongest pairs of one head, checked against plain transformers (no bridge, no HexRay), its one
forward pass, its input checks and its JSON document."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import hexray.analysis.heads as heads_module
from hexray.analysis.heads import head_attention, pair_mask, strongest_pairs
from hexray.errors import HexRayError
from hexray.render.jsondoc import head_attention_document
from hexray.tracing import sites

PROMPT = "The cat sat on the mat. The cat sat on the mat."
FAST = dict(seq_len=4, n_sequences=1)  # the induction pass is not under test here


def hf_head(hf, ids: list[int], layer: int, head: int) -> dict[str, np.ndarray]:
    """From plain transformers: the head's pattern [q, k], values [k, d_head] and what it writes [q, d_model].

    Values are read off the value projection, the write from the output projection's input (every
    head's z side by side) times that head's rows of the output weight.
    """
    cfg = hf.config
    n_heads = cfg.num_attention_heads
    d_head = cfg.hidden_size // n_heads
    seen = {}
    if cfg.model_type == "gpt2":
        attn = hf.transformer.h[layer].attn
        v_module, o_module = attn.c_attn, attn.c_proj
        take_v = lambda out: out[0, :, 2 * cfg.hidden_size :].reshape(len(ids), n_heads, d_head)[:, head]  # noqa: E731
        W_O = o_module.weight.detach()  # Conv1D: [in, out]
    else:
        attn = hf.model.layers[layer].self_attn
        v_module, o_module = attn.v_proj, attn.o_proj
        n_kv = cfg.num_key_value_heads
        take_v = lambda out: out[0].reshape(len(ids), n_kv, d_head)[:, head // (n_heads // n_kv)]  # noqa: E731
        W_O = o_module.weight.detach().T  # Linear: [out, in]
    handles = [
        v_module.register_forward_hook(lambda m, i, o: seen.__setitem__("v", take_v(o).detach())),
        o_module.register_forward_hook(lambda m, i, o: seen.__setitem__("z", i[0][0].detach())),
    ]
    try:
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    z = seen["z"][:, head * d_head : (head + 1) * d_head]  # [q, d_head]
    return {
        "pattern": out.attentions[layer][0, head].double().numpy(),
        "v": seen["v"].double().numpy(),
        "write": (z @ W_O[head * d_head : (head + 1) * d_head]).double().numpy(),
    }


def brute_top(score: np.ndarray, allowed, n: int) -> list[tuple[int, int]]:
    """The n allowed (q, k) cells with the largest score, by sorting every cell in Python."""
    cells = [(float(score[q, k]), q, k) for q in range(score.shape[0]) for k in range(score.shape[1]) if allowed(q, k)]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [(q, k) for _, q, k in cells[:n]]


@pytest.mark.parametrize(("layer", "head"), [(1, 2), (0, 1)])
def test_metrics_match_plain_transformers(tiny_model, tiny_hf_model, layer, head):
    """Pattern, entropy, max weight, ||v_k|| and ||z_q W_O[h]|| equal numpy on HF's own tensors (both kv groups on llama)."""
    a = head_attention(tiny_model, PROMPT, layer, head, prepend_bos=True, **FAST)
    ids = list(a.token_ids)
    assert ids[0] == tiny_model.tokenizer.bos_token_id and len(ids) > 20
    ref = hf_head(tiny_hf_model, ids, layer, head)
    A = ref["pattern"]  # [q, k]
    np.testing.assert_allclose(a.pattern, A, atol=1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(A > 0, A * np.log(A), 0.0).sum(-1)
    np.testing.assert_allclose(a.entropy, entropy, atol=1e-5)
    assert a.entropy[0] == pytest.approx(0, abs=1e-6)  # query 0 sees one key
    assert a.mean_entropy == pytest.approx(entropy[1:].mean(), abs=1e-5)
    assert a.mean_entropy > 0.1  # a random head spreads its attention: a real comparison
    np.testing.assert_allclose(a.concentration, A.max(-1), atol=1e-6)
    assert a.mean_concentration == pytest.approx(A.max(-1)[1:].mean(), abs=1e-6)
    np.testing.assert_allclose(a.value_norm, np.linalg.norm(ref["v"], axis=-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.output_norm, np.linalg.norm(ref["write"], axis=-1), rtol=1e-4, atol=1e-6)
    assert a.entropy.shape == a.concentration.shape == a.output_norm.shape == a.value_norm.shape == (len(ids),)
    # the role scores are still there, from the same pattern
    assert a.scores["previous_token"] == pytest.approx(np.mean([A[q, q - 1] for q in range(1, len(ids))]), abs=1e-6)
    assert a.scores["bos"] == pytest.approx(A[1:, 0].mean(), abs=1e-6)
    assert np.isfinite(a.scores["induction"])


def test_grouped_query_heads_share_values_and_differ_in_output(tiny_llama):
    """Llama's heads 0 and 1 read kv head 0, heads 2 and 3 kv head 1: equal value norms within a group only."""
    assert tiny_llama.spec.n_kv_heads == 2 and tiny_llama.spec.n_heads == 4
    by_head = [head_attention(tiny_llama, PROMPT, 1, h, **FAST) for h in range(4)]
    np.testing.assert_array_equal(by_head[0].value_norm, by_head[1].value_norm)
    np.testing.assert_array_equal(by_head[2].value_norm, by_head[3].value_norm)
    assert not np.allclose(by_head[0].value_norm, by_head[2].value_norm)
    assert not np.allclose(by_head[0].output_norm, by_head[1].output_norm)


def test_top_pairs_with_bos_leave_out_query_0_and_the_bos_key(tiny_model, tiny_hf_model):
    """Top 10 by weight and by weight x ||v_k||, strongest first, equal to a brute-force ranking of HF's pattern."""
    a = head_attention(tiny_model, PROMPT, 1, 2, prepend_bos=True, **FAST)
    ref = hf_head(tiny_hf_model, list(a.token_ids), 1, 2)
    A, v_norm = ref["pattern"], np.linalg.norm(ref["v"], axis=-1)
    assert a.sink_excluded
    allowed = lambda q, k: 1 <= q and 1 <= k <= q  # noqa: E731
    assert len(a.top_pairs) == len(a.top_moved_pairs) == 10
    assert [(p.query, p.key) for p in a.top_pairs] == brute_top(A, allowed, 10)
    assert [(p.query, p.key) for p in a.top_moved_pairs] == brute_top(A * v_norm[None, :], allowed, 10)
    for pairs, key in ((a.top_pairs, "weight"), (a.top_moved_pairs, "moved")):
        ranked = [getattr(p, key) for p in pairs]
        assert ranked == sorted(ranked, reverse=True)
        for p in pairs:
            assert p.query >= 1 and p.key >= 1 and p.key <= p.query
            assert (p.query_token, p.key_token) == (a.tokens[p.query], a.tokens[p.key])
            assert p.weight == pytest.approx(A[p.query, p.key], abs=1e-6)
            assert p.moved == pytest.approx(A[p.query, p.key] * v_norm[p.key], rel=1e-5)
    assert [(p.query, p.key) for p in a.top_pairs] != [(p.query, p.key) for p in a.top_moved_pairs]  # value norms matter


def test_top_pairs_without_bos_keep_key_0(tiny_model, tiny_hf_model):
    """With no special token in front, position 0 is an ordinary token and may be ranked (query 0 still never is)."""
    a = head_attention(tiny_model, PROMPT, 0, 0, prepend_bos=False, **FAST)
    assert a.token_ids[0] != tiny_model.tokenizer.bos_token_id and not a.sink_excluded
    A = hf_head(tiny_hf_model, list(a.token_ids), 0, 0)["pattern"]
    expected = brute_top(A, lambda q, k: 1 <= q and k <= q, 10)
    assert [(p.query, p.key) for p in a.top_pairs] == expected
    assert any(p.key == 0 for p in a.top_pairs)  # so leaving it out would show
    assert all(p.query >= 1 for p in a.top_pairs + a.top_moved_pairs)
    forced = head_attention(tiny_model, PROMPT, 0, 0, prepend_bos=False, exclude_first_key=True, **FAST)  # the first token as the sink
    assert forced.sink_excluded and [(p.query, p.key) for p in forced.top_pairs] == brute_top(A, lambda q, k: 1 <= q and 1 <= k <= q, 10)


def test_strongest_pairs_on_a_hand_made_map():
    """Causal, no query 0, no key 0 when asked; ties by earlier query then key; fewer pairs than asked when few exist."""
    tokens = ("<s>", "a", "b", "c")
    m = torch.tensor([[1.0, 0, 0, 0], [0.6, 0.4, 0, 0], [0.5, 0.1, 0.4, 0], [0.2, 0.4, 0.0, 0.4]], dtype=torch.float64)  # [q, k]
    got = strongest_pairs(m, pair_mask(4, False, diagonal=True), tokens, 4)
    assert [(p.query, p.key, p.weight) for p in got] == [(1, 0, 0.6), (2, 0, 0.5), (1, 1, 0.4), (2, 2, 0.4)]  # the 0.4 ties at (3, 1), (3, 3) come later
    got = strongest_pairs(m, pair_mask(4, True, diagonal=False), tokens, 10)  # k < q, k >= 1: (2,1), (3,1), (3,2)
    assert [(p.query, p.key) for p in got] == [(3, 1), (2, 1), (3, 2)]
    assert (got[0].query_token, got[0].key_token, got[0].moved) == ("c", "a", None)
    mask = pair_mask(3, True, diagonal=True)
    assert mask.tolist() == [[False, False, False], [False, True, False], [False, True, True]]


def test_one_forward_pass_for_the_prompt(tiny_model, monkeypatch):
    """Every new metric comes from the prompt's one capture of layer's pattern and values, stopping after the layer."""
    calls = []
    real = heads_module.capture

    def counting(model, batch, hooks, **kwargs):
        calls.append((len(batch), set(hooks), kwargs))
        return real(model, batch, hooks, **kwargs)

    monkeypatch.setattr(heads_module, "capture", counting)
    head_attention(tiny_model, PROMPT, 0, 1, **FAST)
    assert calls == [(1, {sites.attn_pattern(0), sites.head_v(0)}, {"stop_after_layer": 0})]


@pytest.mark.parametrize(("layer", "head", "match", "hint"), [(2, 0, "layer 2 is out of range", "0..1"), (-1, 0, "layer -1", "0..1"), (0, 4, "head 4 is out of range", "0..3")])
def test_out_of_range_heads_are_refused(tiny_model, layer, head, match, hint):
    with pytest.raises(HexRayError, match=match) as err:
        head_attention(tiny_model, PROMPT, layer, head, **FAST)
    assert hint in err.value.hint


def test_document_carries_every_metric_as_strict_json(tiny_model):
    a = head_attention(tiny_model, PROMPT, 1, 0, prepend_bos=True, **FAST)
    doc = json.loads(json.dumps(head_attention_document(a), allow_nan=False))
    n = len(a.tokens)
    for key in ("entropy", "concentration", "value_norm", "output_norm"):
        assert len(doc[key]) == n and doc[key] == pytest.approx(getattr(a, key).tolist(), abs=1e-6), key
    assert doc["mean_entropy"] == pytest.approx(a.mean_entropy, abs=1e-6) and doc["mean_concentration"] == pytest.approx(a.mean_concentration, abs=1e-6)
    assert doc["sink_excluded"] is True and len(doc["top_pairs"]) == len(doc["top_moved_pairs"]) == 10
    first = a.top_pairs[0]
    assert doc["top_pairs"][0] == {"query": first.query, "key": first.key, "query_token": first.query_token, "key_token": first.key_token,
                                   "weight": round(first.weight, 6), "moved": round(first.moved, 6)}
    assert set(doc["scores"]) == {"induction", "duplicate_token", "previous_token", "bos"} and len(doc["pattern"]) == n


def test_one_token_prompt_has_null_means_and_no_pairs(tiny_model):
    """One token: entropy 0 at its one query, the means undefined (null in the document), nothing to rank."""
    a = head_attention(tiny_model, "Mary", 0, 0, prepend_bos=False, **FAST)
    assert len(a.tokens) == 1 and a.entropy.tolist() == [pytest.approx(0, abs=1e-6)] and np.isnan(a.mean_entropy)
    assert a.top_pairs == () and a.top_moved_pairs == ()
    doc = json.loads(json.dumps(head_attention_document(a), allow_nan=False))
    assert doc["mean_entropy"] is None and doc["mean_concentration"] is None and doc["top_pairs"] == []
