"""The engine: structured hooks, batched capture against single unbatched runs, early stop, streaming,
additive edits, comparable results, and the layering rules (checked on the source)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hexray.analysis.head_metrics import head_metrics
from hexray.analysis.heads import head_attention
from hexray.analysis.registry import Context
from hexray.analysis.report import AnalysisOptions, analyze
from hexray.tracing import sites
from hexray.tracing.edits import Edit, run_variants
from hexray.tracing.engine import capture, rows_per_chunk, run_trace, trace_prompts
from hexray.tracing.sites import Hook, parse_hook

SRC = Path(__file__).resolve().parents[2] / "src" / "hexray"
PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The cat sat", "One two three four five six", "Hi"]


def test_every_bridge_hook_parses_back_to_itself(tiny_model):
    for name in tiny_model.bridge.hook_dict:
        hook = parse_hook(name)
        assert hook == name and Hook(hook.point, hook.layer) == name
    assert sites.head_z(3) == "blocks.3.attn.hook_z" and sites.head_z(3).point == "z" and sites.head_z(3).layer == 3
    assert parse_hook("blocks.7.ln2_post.hook_scale") == sites.post_norm_scale(7, "mlp")
    assert sites.FINAL_SCALE.layer is None
    assert pickle.loads(pickle.dumps(sites.mlp_post(2))).point == "mlp_post"
    with pytest.raises(AttributeError):
        sites.resid_pre(0).layer = 5
    with pytest.raises(ValueError):
        Hook("z")  # a block point needs its layer


def test_component_table_gives_hooks_units_and_names():
    assert sites.Component("head", 4, head=2).hook == sites.head_z(4)
    assert sites.Component("neuron", 1, neuron=7).unit == 7 and sites.Component("neuron", 1, neuron=7).hook == sites.mlp_post(1)
    assert sites.Component("mlp", 3).unit is None and sites.Component("resid", 2).hook == sites.resid_pre(2)
    assert [sites.Component(k, 1, head=2, neuron=3).name for k in ("head", "neuron", "attn", "mlp", "resid")] == ["L1H2", "L1N3", "ATTN1", "MLP1", "RESID1"]


def test_batched_capture_equals_single_unbatched_runs(tiny_model):
    hooks = {sites.attn_pattern(0), sites.head_z(1), sites.resid_post(tiny_model.spec.n_layers - 1), sites.mlp_post(0)}
    rows = [tiny_model.encode(p) for p in PROMPTS]
    logits, acts = capture(tiny_model, rows, hooks)
    for ids, row_logits, row_acts in zip(rows, logits, acts):
        with torch.no_grad():  # the reference: the bridge alone, one prompt, no padding
            ref_logits, cache = tiny_model.bridge.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n in hooks)
        torch.testing.assert_close(row_logits, ref_logits[0].float(), atol=1e-4, rtol=1e-4)
        for h in hooks:
            assert row_acts[h].shape == cache[h][0].shape
            torch.testing.assert_close(row_acts[h], cache[h][0].float(), atol=1e-5, rtol=1e-4)


def test_early_stop_keeps_the_activations_and_drops_the_logits(tiny_model):
    rows = [tiny_model.encode(p) for p in PROMPTS[:2]]
    full = capture(tiny_model, rows, {sites.resid_pre(0), sites.attn_out(0)})
    stopped = capture(tiny_model, rows, {sites.resid_pre(0), sites.attn_out(0)}, stop_after_layer=0)
    assert stopped[0] is None and full[0] is not None
    for a, b in zip(full[1], stopped[1]):
        torch.testing.assert_close(a[sites.attn_out(0)], b[sites.attn_out(0)])


def test_trace_prompts_streams_in_chunks_and_matches_run_trace(tiny_model):
    taken = []

    def source():
        for p in PROMPTS:
            taken.append(p)
            yield p

    hooks = {sites.resid_pre(1)}
    stream = trace_prompts(tiny_model, source(), hooks, batch_size=2)
    first = next(stream)
    assert len(taken) == 2  # one chunk read, not the whole set
    traces = [first, *stream]
    assert [t.prompt for t in traces] == PROMPTS
    for t in traces:
        single = run_trace(tiny_model, t.prompt, hooks)
        assert t.token_ids == single.token_ids
        torch.testing.assert_close(t.logits, single.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(t.acts[sites.resid_pre(1)], single.acts[sites.resid_pre(1)], atol=1e-5, rtol=1e-4)


def test_memory_budget_shrinks_chunks(tiny_model):
    few = rows_per_chunk(tiny_model, 16, budget=1e6)
    assert rows_per_chunk(tiny_model, 64, budget=1e6) < few
    assert rows_per_chunk(tiny_model, 16, [sites.attn_pattern(layer) for layer in range(2)], budget=1e6) < few
    assert rows_per_chunk(tiny_model, 10**6, budget=1.0) == 1


def test_additive_edit_is_a_steering_vector(tiny_model):
    ids = tiny_model.encode(PROMPTS[0])
    spec = tiny_model.spec
    vector = torch.randn(1, spec.d_model, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(len(ids), 1, dtype=torch.bool)
    mask[3:] = True
    hook = sites.resid_pre(1)
    got = run_variants(tiny_model, ids, [(Edit(hook, mask, vector, op="add"),)])  # [1, d_model]
    final = sites.resid_post(spec.n_layers - 1)
    store = {}

    def add(x, hook=None):
        x = x.clone()
        x[0, 3:] += vector[0]
        return x

    def keep(x, hook=None):
        store["x"] = x

    with torch.no_grad():
        tiny_model.bridge.run_with_hooks(torch.tensor([ids]), fwd_hooks=[(hook, add), (final, keep)])
    torch.testing.assert_close(got[0], store["x"][0, -1].float(), atol=1e-5, rtol=1e-5)


def test_head_metrics_by_hand(tiny_model):
    report = analyze(tiny_model, PROMPTS[0], AnalysisOptions(head_metrics=True, token_index=-2))
    m = report.head_metrics
    q = m.position
    pattern = report.trace.acts[sites.attn_pattern(1)][2, q, : q + 1].double().cpu().numpy()  # L1H2's row
    assert m.entropy[1, 2] == pytest.approx(-(pattern * np.log(pattern)).sum(), abs=1e-6)
    assert m.max_weight[1, 2] == pytest.approx(pattern.max()) and m.argmax_key[1, 2] == pattern.argmax()
    assert m.first_token[1, 2] == pytest.approx(pattern[0]) and m.previous_token[1, 2] == pytest.approx(pattern[q - 1])
    assert m.mean_distance[1, 2] == pytest.approx(sum(w * (q - k) for k, w in enumerate(pattern)))
    first = head_metrics(tiny_model, run_trace(tiny_model, "Hi there", {sites.attn_pattern(0), sites.attn_pattern(1)}),
                         Context(tiny_model.spec, AnalysisOptions(), analyze(tiny_model, "Hi there", AnalysisOptions(token_index=0)).attribution))
    assert np.allclose(first.entropy, 0, atol=1e-6) and np.isnan(first.previous_token).all()  # position 0 sees one key


def test_results_compare_hash_and_share_the_prompt_reference(tiny_model):
    a = head_attention(tiny_model, PROMPTS[0], 1, 2)
    b = head_attention(tiny_model, PROMPTS[0], 1, 2)
    c = head_attention(tiny_model, PROMPTS[0], 1, 3)
    assert a == b and hash(a) == hash(b) and a != c and len({a, b, c}) == 2
    report = analyze(tiny_model, PROMPTS[0], AnalysisOptions(logit_lens=True, residual=True))
    assert report.attribution.ref == report.residual.ref == report.trace.ref
    assert report.attribution.tokens == report.trace.tokens and report.residual.model == tiny_model.name
    assert "<table>" in report.attribution._repr_html_() and "<html" in report._repr_html_()
    again = analyze(tiny_model, PROMPTS[0], AnalysisOptions(logit_lens=True, residual=True))
    assert again == report and hash(again) == hash(report)
    assert analyze(tiny_model, PROMPTS[1], AnalysisOptions(logit_lens=True, residual=True)) != report


def test_no_bridge_call_or_hook_name_parsing_outside_the_engine():
    """The layering rules, checked on the source: the bridge is driven from tracing/ and models/ only,
    and hook names are spelled and parsed in tracing/sites.py only."""
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        code = "\n".join(re.sub(r"(^|\s)#\s.*$", "", line) for line in path.read_text().splitlines())  # comments may name hooks
        code = re.sub(r'"""[\s\S]*?"""', "", code)
        if not rel.startswith(("tracing/", "models/")):
            assert ".bridge" not in code, f"{rel} drives the bridge"
            assert not re.search(r"\bhook_(z|v|pattern|resid_pre|resid_post|attn_out|mlp_out|post|embed|scale)\b|\bblocks\.\d", code), f"{rel} spells hook names"
        if rel != "tracing/sites.py":
            assert not re.search(r'endswith\("hook|\.split\("\."\)|blocks\\\.\(', code), f"{rel} parses hook names"


def test_run_recorded_from_a_block_is_the_full_pass_from_there(tiny_model, tiny_hf_model):
    """Starting at block L from the recorded stream gives the full pass's logits and later activations."""
    from hexray.tracing.engine import run_recorded, tokenize_prompt

    spec = tiny_model.spec
    ids, _ = tokenize_prompt(tiny_model, "When Mary and John went to the store, John gave a drink to")
    hooks = [sites.resid_pre(layer) for layer in range(spec.n_layers)] + [sites.head_z(layer) for layer in range(spec.n_layers)]
    logits, acts = run_recorded(tiny_model, ids, hooks)
    with torch.no_grad():
        torch.testing.assert_close(logits, tiny_hf_model(torch.tensor([ids])).logits[0].float(), rtol=1e-4, atol=1e-5)  # an untouched model
    last = spec.n_layers - 1
    again, later = run_recorded(tiny_model, ids, hooks, start_layer=last, resid=acts[sites.resid_pre(last)])
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(later[sites.head_z(last)], acts[sites.head_z(last)], rtol=1e-5, atol=1e-6)
    assert sites.head_z(0) not in later  # blocks before the start are not run


def test_run_recorded_applies_and_records_edits(tiny_model):
    from hexray.tracing.edits import Edit, site_mask
    from hexray.tracing.engine import run_recorded, tokenize_prompt

    ids, _ = tokenize_prompt(tiny_model, "When Mary and John went to the store")
    z = sites.head_z(1)
    _, plain = run_recorded(tiny_model, ids, [z])
    mask = site_mask(0, None, plain[z].shape)
    _, edited = run_recorded(tiny_model, ids, [z], edits=[Edit(z, mask, torch.zeros(plain[z].shape))])
    assert edited[z][:, 0].abs().max() == 0  # what is recorded is the edited value
    torch.testing.assert_close(edited[z][:, 1:], plain[z][:, 1:])  # and only the edited head changed
