"""Activation patching, ablation and head classification on the real embedded SmolLM2-135M-Instruct.

The IOI pair below differs in one token (the second name); the clean prompt predicts " Mary" over
" John" and the corrupt one the reverse. Expected numbers come from plain forward passes through
``model.bridge.run_with_hooks`` (one per patched head, full logits), not from HexRay's batching.
The model and the heads sweep are computed once for the module.
"""

from __future__ import annotations

import json

import pytest
import torch

import hexray.cli
from hexray.analysis.heads import classify_heads
from hexray.intervene.patching import activation_patching

pytestmark = pytest.mark.integration

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
TARGET, CONTRAST = " Mary", " John"



@pytest.fixture(scope="module")
def heads_sweep(smol):
    """The exact heads sweep, with the attribution estimates alongside (method="both": one extra backward pass)."""
    return activation_patching(smol, CLEAN, CORRUPT, target=TARGET, contrast=CONTRAST, sweeps="heads", method="both")


def _ids(smol, prompt: str) -> torch.Tensor:
    return torch.tensor([smol.encode(prompt)])


def _logit_diff(smol, logits: torch.Tensor) -> float:
    last = logits[0, -1].float()
    return float(last[smol.single_token(TARGET)] - last[smol.single_token(CONTRAST)])


def test_ioi_pair(smol, heads_sweep):
    spec = smol.spec
    assert (spec.n_layers, spec.n_heads) == (30, 9)
    assert len(smol.encode(CLEAN)) == len(smol.encode(CORRUPT)) == 14
    r = heads_sweep
    assert r.clean_token_ids == tuple(smol.encode(CLEAN)) and r.corrupt_token_ids == tuple(smol.encode(CORRUPT))
    assert r.clean_value > 0 > r.corrupt_value
    assert len(r.results) == spec.n_layers * spec.n_heads
    assert all(p.site.position is None for p in r.results)
    with torch.no_grad():
        assert r.clean_value == pytest.approx(_logit_diff(smol, smol.bridge(_ids(smol, CLEAN))), abs=1e-3)
        assert r.corrupt_value == pytest.approx(_logit_diff(smol, smol.bridge(_ids(smol, CORRUPT))), abs=1e-3)


def test_batched_head_patching_matches_one_forward_per_head(smol, heads_sweep):
    r = heads_sweep
    by_score = sorted(r.results, key=lambda p: -p.score)
    top3 = [(p.site.component.layer, p.site.component.head) for p in by_score[:3]]
    spread = [(0, 0), (3, 4), (6, 8), (9, 2), (12, 5), (15, 1), (18, 7), (21, 3), (25, 5), (27, 6), (29, 8), (1, 1)]
    chosen = list(dict.fromkeys(top3 + spread))[:12]  # the top 3 and 9 more, layers 0..29

    clean_ids, corrupt_ids = _ids(smol, CLEAN), _ids(smol, CORRUPT)
    hooks = {f"blocks.{layer}.attn.hook_z" for layer, _ in chosen}
    with torch.no_grad():
        _, clean_cache = smol.bridge.run_with_cache(clean_ids, names_filter=lambda name: name in hooks)
        clean_value = _logit_diff(smol, smol.bridge(clean_ids))
        corrupt_value = _logit_diff(smol, smol.bridge(corrupt_ids))
    scores = {(p.site.component.layer, p.site.component.head): p.score for p in r.results}
    for layer, head in chosen:
        name = f"blocks.{layer}.attn.hook_z"
        source = clean_cache[name]

        def patch(z, hook, head=head, source=source):
            z = z.clone()
            z[:, :, head] = source[:, :, head].to(z.dtype)
            return z

        with torch.no_grad():
            patched = _logit_diff(smol, smol.bridge.run_with_hooks(corrupt_ids, fwd_hooks=[(name, patch)]))
        expected = (patched - corrupt_value) / (clean_value - corrupt_value)
        assert scores[(layer, head)] == pytest.approx(expected, abs=1e-4), f"L{layer}H{head}"


def test_ablating_the_top_heads_lowers_the_logit_difference(smol, heads_sweep, monkeypatch, capfd, tmp_path):
    top3 = sorted(heads_sweep.results, key=lambda p: -p.score)[:3]
    assert all(p.score > 0.1 for p in top3)
    names = ",".join(p.site.name for p in top3)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hexray.cli, "load_model", lambda name, progress=None, **placement: smol)
    capfd.readouterr()
    code = hexray.cli.main(["ablate", "-p", CLEAN, "-c", names, "--target", TARGET, "--contrast", CONTRAST, "--json"])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert err == "" and out.count("\n") == 1
    doc = json.loads(out)
    assert [c["name"] for c in doc["components"]] == names.split(",")
    before, after = doc["before"]["logit_diff"], doc["after"]["logit_diff"]
    assert before == pytest.approx(heads_sweep.clean_value, abs=1e-3)
    assert after < before - 1.0, (before, after)
    assert doc["kl"] > 0

    # the same ablation as a plain forward pass with the heads' hook_z zeroed
    def zero(heads):
        def fn(z, hook):
            z = z.clone()
            z[:, :, heads] = 0
            return z

        return fn

    per_layer: dict[int, list[int]] = {}
    for p in top3:
        per_layer.setdefault(p.site.component.layer, []).append(p.site.component.head)
    with torch.no_grad():
        logits = smol.bridge.run_with_hooks(_ids(smol, CLEAN), fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero(h)) for layer, h in per_layer.items()])
    assert after == pytest.approx(_logit_diff(smol, logits), abs=1e-3)


def test_attribution_patching_correlates_with_exact(heads_sweep):
    r = heads_sweep
    assert r.method == "both"
    assert all(p.attribution is not None for p in r.results)
    assert r.correlation["heads"] > 0.8
    assert r.correlation["all"] == pytest.approx(r.correlation["heads"])
    # the estimate ranks the strongest head first too
    assert max(r.results, key=lambda p: p.attribution).site == max(r.results, key=lambda p: p.score).site


def test_classify_heads_finds_induction_and_previous_token_heads(smol):
    h = classify_heads(smol)
    labels = [label for row in h.labels for label in row]
    assert len(labels) == 30 * 9
    assert "induction" in labels
    assert "previous_token" in labels
    for role in ("induction", "previous_token"):
        layer, head, score = h.top(1, role)[0]
        assert score >= h.threshold
        assert float(h.scores[role][layer, head]) == pytest.approx(score)
