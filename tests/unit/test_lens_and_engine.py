"""The tracing engine (run_trace, positions, tokens) and the logit lens / residual trace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hexray.analysis.lens import (
    next_token_predictions,
    lens_hooks,
    lens_logits,
    logit_lens,
    residual_hooks,
    residual_trace,
    row_labels,
)
from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel
from hexray.tracing import sites
from hexray.tracing.engine import resolve_position, run_trace, tokenize_prompt

PROMPT = "The capital of France is Paris. When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def lens_trace(tiny_model):
    return run_trace(tiny_model, PROMPT, residual_hooks(tiny_model.spec))


# ---------------------------------------------------------------------------------------------
# prompts and positions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", " ", "   \n\t "])
def test_empty_prompt(tiny_model, prompt):
    with pytest.raises(HexRayError) as info:
        run_trace(tiny_model, prompt, [])
    assert "empty" in info.value.message
    assert info.value.hint


def test_too_long_prompt(tiny_model):
    n_ctx = tiny_model.spec.n_ctx
    assert n_ctx == 64
    prompt = "Mary and John went to the store. " * 20
    n = len(tiny_model.encode(prompt))
    assert n > n_ctx
    with pytest.raises(HexRayError) as info:
        run_trace(tiny_model, prompt, [])
    err = info.value
    assert f"{n} tokens" in err.message
    assert str(n_ctx) in err.message
    assert tiny_model.name in err.message
    assert "shorten" in err.hint


def test_context_boundary(tiny_model):
    """Exactly n_ctx tokens run; one more (here: a BOS in front) is refused."""
    n_ctx = tiny_model.spec.n_ctx
    prompt = " Mary" * n_ctx
    assert len(tiny_model.encode(prompt)) == n_ctx
    trace = run_trace(tiny_model, prompt, [])
    assert trace.n_tokens == n_ctx
    assert trace.logits.shape == (n_ctx, tiny_model.spec.d_vocab)
    with pytest.raises(HexRayError, match=f"{n_ctx + 1} tokens"):
        run_trace(tiny_model, prompt, [], prepend_bos=True)
    with pytest.raises(HexRayError, match=f"{n_ctx + 1} tokens"):
        tokenize_prompt(tiny_model, prompt + " Mary")


@pytest.mark.parametrize(("index", "n", "expected"), [(-1, 5, 4), (-5, 5, 0), (0, 5, 0), (4, 5, 4), (2, 5, 2), (0, 1, 0), (-1, 1, 0)])
def test_resolve_position(index, n, expected):
    assert resolve_position(index, n) == expected


@pytest.mark.parametrize(("index", "n"), [(5, 5), (100, 5), (-6, 5), (-100, 5), (1, 1), (-2, 1)])
def test_resolve_position_out_of_range(index, n):
    with pytest.raises(HexRayError) as info:
        resolve_position(index, n)
    err = info.value
    assert f"token_index {index}" in err.message
    assert f"{n} tokens" in err.message
    assert f"0..{n - 1}" in err.hint
    assert f"-1..-{n}" in err.hint


# ---------------------------------------------------------------------------------------------
# run_trace
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_hooks",
    [
        lambda spec: set(),
        lambda spec: {sites.resid_pre(0)},
        lambda spec: {sites.attn_pattern(spec.n_layers - 1), sites.mlp_post(0)},
        lambda spec: {sites.head_z(1), sites.EMBED, sites.FINAL_SCALE},
        lambda spec: set(sites.residual_stream(spec)),
    ],
    ids=["none", "resid_pre0", "pattern+post", "z+embed+scale", "stream"],
)
def test_run_trace_caches_only_requested_hooks(tiny_model, make_hooks):
    hooks = make_hooks(tiny_model.spec)
    trace = run_trace(tiny_model, PROMPT, hooks)
    assert set(trace.acts) == set(hooks) | {sites.FINAL_SCALE}


def test_run_trace_shapes_and_values(tiny_model):
    spec = tiny_model.spec
    hooks = {sites.attn_pattern(0), sites.head_z(0), sites.mlp_post(1), sites.resid_post(spec.n_layers - 1)}
    trace = run_trace(tiny_model, PROMPT, hooks)
    n = trace.n_tokens
    ids = tiny_model.tokenizer(PROMPT)["input_ids"]
    assert trace.token_ids == tuple(ids)
    assert n == len(ids)
    assert trace.prompt == PROMPT
    assert trace.model_name == tiny_model.name
    assert trace.tokens == tuple(tiny_model.token_str(i) for i in ids)
    assert "".join(trace.tokens) == PROMPT  # byte-level BPE round-trips
    assert len(trace.offsets) == n
    for (start, end), token in zip(trace.offsets, trace.tokens):
        assert PROMPT[start:end].strip() == token.strip()

    pattern = trace.acts[sites.attn_pattern(0)]
    assert pattern.shape == (spec.n_heads, n, n)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(spec.n_heads, n))
    assert torch.triu(pattern, diagonal=1).abs().max() == 0  # causal
    assert trace.acts[sites.head_z(0)].shape == (n, spec.n_heads, spec.d_head)
    assert trace.acts[sites.mlp_post(1)].shape == (n, spec.d_mlp)
    assert trace.acts[sites.FINAL_SCALE].reshape(n, -1).shape[1] == 1

    # the final-norm scale is the real one: norm(resid_final) * w (+ b) @ W_U + b_U == logits
    resid = trace.acts[sites.resid_post(spec.n_layers - 1)]
    scale = trace.acts[sites.FINAL_SCALE].reshape(n, 1)
    weight, bias = tiny_model.final_norm
    centred = resid - resid.mean(-1, keepdim=True) if spec.norm == "layernorm" else resid
    logits = (centred / scale * weight + bias) @ tiny_model.W_U + tiny_model.b_U
    torch.testing.assert_close(logits, trace.logits, rtol=1e-4, atol=1e-4)


def test_run_trace_matches_hf_hidden_states(tiny_model, tiny_hf_model):
    spec = tiny_model.spec
    trace = run_trace(tiny_model, PROMPT, sites.residual_stream(spec))
    with torch.no_grad():
        out = tiny_hf_model(torch.tensor([list(trace.token_ids)]), output_hidden_states=True)
    torch.testing.assert_close(trace.logits, out.logits[0], rtol=1e-4, atol=1e-5)
    for layer in range(spec.n_layers):  # HF hidden_states[l] is the stream before block l
        torch.testing.assert_close(trace.acts[sites.resid_pre(layer)], out.hidden_states[layer][0], rtol=1e-4, atol=1e-5)


def test_run_trace_prepend_bos(tiny_model):
    bos = tiny_model.tokenizer.bos_token_id
    plain = run_trace(tiny_model, PROMPT, [])
    with_bos = run_trace(tiny_model, PROMPT, [], prepend_bos=True)
    assert plain.token_ids[0] != bos
    assert with_bos.token_ids == (bos, *plain.token_ids)
    assert with_bos.offsets[0] == (0, 0)
    assert with_bos.offsets[1:] == plain.offsets
    assert with_bos.logits.shape[0] == plain.logits.shape[0] + 1


def test_run_trace_unknown_hook_is_a_bug(tiny_model):
    with pytest.raises(ValueError, match="blocks.99.hook_resid_pre"):
        run_trace(tiny_model, PROMPT, [sites.resid_pre(99)])


# ---------------------------------------------------------------------------------------------
# logit lens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", [-1, 0, 5])
def test_logit_lens_final_row_is_the_real_prediction(tiny_model, lens_trace, position):
    spec = tiny_model.spec
    lens = logit_lens(tiny_model, lens_trace, position=position)
    pos = position % lens_trace.n_tokens
    real = lens_trace.logits[pos].double()
    probs = torch.softmax(real, -1)
    predicted = int(real.argmax())

    assert lens.position == pos
    assert len(lens.rows) == spec.n_layers + 1
    assert tuple(r.label for r in lens.rows) == row_labels(spec) == ("embed", *(f"L{i}" for i in range(spec.n_layers)))
    assert lens.target.id == predicted
    assert lens.target.prob == pytest.approx(float(probs[predicted]), rel=1e-5)

    last = lens.rows[-1]
    assert last.top[0].id == predicted
    assert last.top[0].token == tiny_model.token_str(predicted)
    assert last.top[0].logit == pytest.approx(float(real[predicted]), abs=1e-4)
    assert last.top[0].prob == pytest.approx(float(probs[predicted]), rel=1e-4)
    assert last.target_rank == 0
    assert last.target_prob == pytest.approx(float(probs[predicted]), rel=1e-4)
    # the whole top-k of the last row is the model's own top-k
    assert [t.id for t in last.top] == real.topk(5).indices.tolist()
    for row in lens.rows:
        assert len(row.top) == 5
        ps = [t.prob for t in row.top]
        assert ps == sorted(ps, reverse=True)
        assert 0 <= row.target_rank < spec.d_vocab
        assert 0.0 < row.target_prob <= 1.0


def test_logit_lens_explicit_target_and_k(tiny_model, lens_trace):
    target = tiny_model.single_token(" John")
    lens = logit_lens(tiny_model, lens_trace, target=target, k=3)
    real = lens_trace.logits[-1].double()
    assert lens.target.id == target
    assert all(len(r.top) == 3 for r in lens.rows)
    last = lens.rows[-1]
    assert last.target_rank == int((real > real[target]).sum())
    assert last.target_prob == pytest.approx(float(torch.softmax(real, -1)[target]), rel=1e-4)


def test_logit_lens_intermediate_rows(tiny_model, tiny_hf_model, lens_trace):
    """Row r is the stream before block r read through the model's final norm and unembedding."""
    spec = tiny_model.spec
    lens = logit_lens(tiny_model, lens_trace, position=-1)
    hf = tiny_hf_model
    final_norm = hf.transformer.ln_f if spec.architecture.startswith("GPT2") else hf.model.norm
    for r, name in enumerate(sites.residual_stream(spec)):
        resid = lens_trace.acts[name][-1]
        with torch.no_grad():
            logits = hf.lm_head(final_norm(resid)).double()
        assert lens.rows[r].top[0].id == int(logits.argmax())
        assert lens.rows[r].top[0].logit == pytest.approx(float(logits.max()), abs=1e-4)
    # embeddings and final rows differ: the blocks do something
    assert not torch.allclose(lens_trace.acts[sites.resid_pre(0)], lens_trace.acts[sites.resid_post(spec.n_layers - 1)])


def test_lens_logits_of_final_residual_are_the_logits(tiny_model, lens_trace):
    resid = lens_trace.acts[sites.resid_post(tiny_model.spec.n_layers - 1)]
    torch.testing.assert_close(lens_logits(tiny_model, resid), lens_trace.logits, rtol=1e-4, atol=1e-4)


def test_logit_lens_position_out_of_range(tiny_model, lens_trace):
    with pytest.raises(HexRayError, match="out of range"):
        logit_lens(tiny_model, lens_trace, position=lens_trace.n_tokens)


def test_lens_hooks(tiny_model):
    spec = tiny_model.spec
    assert lens_hooks(spec) == set(sites.residual_stream(spec))
    expected = lens_hooks(spec) | {sites.attn_out(i) for i in range(spec.n_layers)} | {sites.mlp_out(i) for i in range(spec.n_layers)}
    assert residual_hooks(spec) == expected


# ---------------------------------------------------------------------------------------------
# residual trace
# ---------------------------------------------------------------------------------------------


def test_residual_trace(tiny_model, lens_trace):
    spec = tiny_model.spec
    n = lens_trace.n_tokens
    rt = residual_trace(tiny_model, lens_trace)
    L = spec.n_layers
    assert rt.model == tiny_model.name
    assert rt.tokens == lens_trace.tokens
    assert rt.row_labels == row_labels(spec)
    assert rt.resid_norm.shape == (L + 1, n)
    assert rt.attn_delta_norm.shape == (L, n)
    assert rt.mlp_delta_norm.shape == (L, n)
    assert rt.lens_top_probs.shape == (L + 1, n)
    assert len(rt.lens_top_tokens) == L + 1
    assert all(len(row) == n for row in rt.lens_top_tokens)

    acts = lens_trace.acts
    final = acts[sites.resid_post(L - 1)]
    np.testing.assert_allclose(rt.resid_norm[-1], final.norm(dim=-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(rt.resid_norm[0], acts[sites.resid_pre(0)].norm(dim=-1).numpy(), rtol=1e-5)
    for layer in range(L):
        np.testing.assert_allclose(rt.attn_delta_norm[layer], acts[sites.attn_out(layer)].norm(dim=-1).numpy(), rtol=1e-5)
        np.testing.assert_allclose(rt.mlp_delta_norm[layer], acts[sites.mlp_out(layer)].norm(dim=-1).numpy(), rtol=1e-5)
        # each block adds exactly its attention and MLP writes to the stream
        after = acts[sites.resid_pre(layer + 1)] if layer + 1 < L else final
        torch.testing.assert_close(after, acts[sites.resid_pre(layer)] + acts[sites.attn_out(layer)] + acts[sites.mlp_out(layer)], rtol=1e-4, atol=1e-5)
    assert (rt.attn_delta_norm > 0).all() and (rt.mlp_delta_norm > 0).all()

    # the last row's lens is the model's own prediction at every position
    probs = torch.softmax(lens_trace.logits.double(), -1)
    assert rt.lens_top_tokens[-1] == tuple(tiny_model.token_str(i) for i in lens_trace.logits.argmax(-1).tolist())
    np.testing.assert_allclose(rt.lens_top_probs[-1], probs.max(-1).values.numpy(), rtol=1e-4)
    assert ((rt.lens_top_probs > 0) & (rt.lens_top_probs <= 1)).all()
    assert rt.lens_positions == tuple(range(n))


def test_residual_trace_lens_at_some_positions_is_those_columns(tiny_model, lens_trace):
    """The lab's lens window computes only some columns, and they are the full trace's columns."""
    full = residual_trace(tiny_model, lens_trace)
    some = (1, lens_trace.n_tokens - 1)
    part = residual_trace(tiny_model, lens_trace, lens_positions=some)
    assert part.lens_positions == some and part.lens_top_probs.shape == (tiny_model.spec.n_layers + 1, 2)
    for row_full, row_part in zip(full.lens_top_tokens, part.lens_top_tokens):
        assert row_part == tuple(row_full[p] for p in some)
    np.testing.assert_allclose(part.lens_top_probs, full.lens_top_probs[:, list(some)], rtol=1e-6)
    np.testing.assert_array_equal(part.resid_norm, full.resid_norm)  # the norms still cover every position


def test_next_token_predictions_are_the_final_distribution(tiny_model, lens_trace):
    top = next_token_predictions(tiny_model, lens_trace, k=3)
    probs = torch.softmax(lens_trace.logits.double(), -1)
    assert len(top) == lens_trace.n_tokens and all(len(row) == 3 for row in top)
    for pos, row in enumerate(top):
        assert [t.id for t in row] == probs[pos].topk(3).indices.tolist()
        assert row[0].prob == pytest.approx(float(probs[pos].max()), rel=1e-9)
        assert row[0].prob >= row[1].prob >= row[2].prob


# ---------------------------------------------------------------------------------------------
# tokens: single_token, encode
# ---------------------------------------------------------------------------------------------


def test_single_token(tiny_model):
    ids = tiny_model.tokenizer(" Mary", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    assert tiny_model.single_token(" Mary") == ids[0]
    assert tiny_model.token_str(ids[0]) == " Mary"


def test_single_token_missing_space_hint(tiny_model):
    # " gave" is one token in the tiny vocabulary, "gave" is not
    pieces = tiny_model.tokenizer("gave", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1
    assert len(tiny_model.tokenizer(" gave", add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(HexRayError) as info:
        tiny_model.single_token("gave")
    err = info.value
    assert "target 'gave'" in err.message
    assert f"is {len(pieces)} tokens, not one" in err.message
    assert ", ".join(repr(tiny_model.token_str(i)) for i in pieces) in err.message
    assert "' gave'" in err.hint and "leading space" in err.hint


def test_single_token_lists_the_split(tiny_model):
    text = " Mary gave"
    pieces = tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(pieces) == 2
    with pytest.raises(HexRayError) as info:
        tiny_model.single_token(text, role="contrast")
    err = info.value
    assert err.message.startswith("contrast ' Mary gave' is 2 tokens, not one: ")
    assert "' Mary', ' gave'" in err.message
    assert err.hint == "give exactly one token"


def test_single_token_empty(tiny_model):
    with pytest.raises(HexRayError, match="target is empty"):
        tiny_model.single_token("")


def test_encode_prepend_bos(tiny_model):
    tok = tiny_model.tokenizer
    bos = tok.bos_token_id
    assert bos is not None
    raw = tok("Mary and John")["input_ids"]
    assert raw and raw[0] != bos  # this tokenizer adds nothing by itself
    assert tiny_model.encode("Mary and John") == raw
    assert tiny_model.encode("Mary and John", prepend_bos=None) == raw
    assert tiny_model.encode("Mary and John", prepend_bos=False) == raw
    assert tiny_model.encode("Mary and John", prepend_bos=True) == [bos, *raw]
    assert tiny_model.encode("", prepend_bos=True) == [bos]
    ids, offsets = tiny_model.encode_with_offsets("Mary and John", prepend_bos=True)
    assert ids == [bos, *raw]
    assert offsets[0] == (0, 0) and len(offsets) == len(ids)


@pytest.fixture(scope="module")
def bos_adding_model(tiny_model):
    """The tiny tokenizer with a post-processor that puts BOS in front, as Llama's does."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    src = tiny_model.tokenizer
    backend = Tokenizer.from_str(src.backend_tokenizer.to_str())
    bos = src.bos_token
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, src.bos_token_id)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=bos)
    return LoadedModel(bridge=None, tokenizer=tok, spec=tiny_model.spec)


def test_encode_with_a_bos_adding_tokenizer(tiny_model, bos_adding_model):
    bos = bos_adding_model.tokenizer.bos_token_id
    raw = tiny_model.tokenizer("Mary and John")["input_ids"]
    assert bos_adding_model.tokenizer("Mary and John")["input_ids"] == [bos, *raw]
    assert bos_adding_model.encode("Mary and John") == [bos, *raw]
    assert bos_adding_model.encode("Mary and John", prepend_bos=True) == [bos, *raw]  # not doubled
    assert bos_adding_model.encode("Mary and John", prepend_bos=False) == raw
    ids, offsets = bos_adding_model.encode_with_offsets("Mary and John", prepend_bos=False)
    assert ids == raw and len(offsets) == len(raw)


# ---------------------------------------------------------------------------------------------
# live layers: what the server streams while the pass runs
# ---------------------------------------------------------------------------------------------


def test_layer_snapshots_arrive_during_the_pass_and_match_hf(tiny_model, tiny_hf_model):
    """Each block is reported before the next one starts, with the values HF's own forward gives."""
    from hexray.analysis.report import AnalysisOptions, analyze

    spec = tiny_model.spec
    started: list[int] = []  # blocks begun, counted by a hook of the test's own
    seen = []

    def count(x, hook=None):
        started.append(1)

    def on_layer(snapshot):
        seen.append((snapshot, len(started)))

    with tiny_model.bridge.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", count) for layer in range(spec.n_layers)]):
        report = analyze(tiny_model, PROMPT, AnalysisOptions(target=" Mary", residual=True, logit_lens=True), on_layer=on_layer)
    assert [s.layer for s, _ in seen] == list(range(spec.n_layers))
    assert [begun for _, begun in seen] == list(range(1, spec.n_layers + 1))  # block L reported before block L+1 began
    ids = torch.tensor([list(report.trace.token_ids)])
    with torch.no_grad():
        hidden = tiny_hf_model(ids, output_hidden_states=True).hidden_states  # [n_layers + 1] of [1, pos, d]
    mary = tiny_model.single_token(" Mary")
    for snapshot, _ in seen:
        after = hidden[snapshot.layer + 1][0] if snapshot.layer + 1 < spec.n_layers else None
        if after is not None:  # HF's last hidden state is after the final norm; the others are the raw stream
            np.testing.assert_allclose(snapshot.resid_norm, after.norm(dim=-1).numpy(), rtol=1e-4)
        row = report.logit_lens.rows[snapshot.layer + 1]
        assert [t.id for t in snapshot.lens] == [t.id for t in row.top]
        assert snapshot.target_rank == row.target_rank and snapshot.target_prob == pytest.approx(row.target_prob, rel=1e-5)
        assert snapshot.position == ids.shape[1] - 1 and report.attribution.target.id == mary


def test_a_failing_layer_callback_stops_the_pass(tiny_model):
    """The callback runs inside the pass: what it raises ends the analysis there (the server's stop)."""
    from hexray.analysis.report import analyze

    class Stop(Exception):
        pass

    def on_layer(snapshot):
        if snapshot.layer == 0:
            raise Stop

    with pytest.raises(Stop):
        analyze(tiny_model, PROMPT, on_layer=on_layer)
