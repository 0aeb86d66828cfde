"""The causal commands ``hexray patch``, ``hexray ablate`` and ``hexray heads``, in-process on the tiny models.

As in ``test_cli.py``, ``hexray.cli.load_model`` is monkeypatched to hand back an already-loaded tiny
model, so the real argument parsing, analyses, renderers and file writers run without reloading.
Expected numbers come from the Python API (``activation_patching``) or from plain forward passes
through ``model.bridge.run_with_hooks`` / ``run_with_cache``, never from the CLI itself.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CliRun, assert_one_line_error, tree
import torch

import hexray.cli
from hexray.intervene.patching import activation_patching

REPO = Path(__file__).resolve().parents[2]
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
SHORTER = "When John went to the store, Mary gave a drink to"  # fewer tokens than CLEAN
XSS = "<img src=x onerror=alert(1)>"
PATCH = ["patch", "--clean", CLEAN, "--corrupt", CORRUPT, "--target", " Mary", "--contrast", " John"]
MULTI_TOKEN = " Eiffelzzq"  # ten pieces in the tiny tokenizer
ROLES = {"previous_token", "duplicate_token", "induction", "bos"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# heads' built-in text is ~100 tokens under the tiny tokenizer, past the tiny models' context of 64
HEADS_TEXT = "The cat sat on the mat. The dog sat on the mat. The cat ran."
HEADS = ["heads", "--prompt", HEADS_TEXT]


# ---------------------------------------------------------------------------------------------
# helpers (the same approach as test_cli.py)
# ---------------------------------------------------------------------------------------------


def run_json(cli, model, *args) -> dict:
    """CliRun with ``--json``; check stdout holds exactly one strict JSON document and stderr nothing."""
    r = cli(model, *args, "--json")
    assert r.code == 0, r.err
    assert r.err == ""
    assert r.out.endswith("\n") and r.out.count("\n") == 1, "stdout must be one JSON line and nothing else"

    def no_constants(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    return json.loads(r.out, parse_constant=no_constants)






def bad_run(cli, model, args, tmp_path) -> CliRun:
    """CliRun ``args`` (command first) with a --report folder unless it names one; nothing may be written."""
    (tmp_path / "a-file").write_text("keep me")
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    if "--report" not in args:
        args = [args[0], "--report", str(tmp_path / "report" / "nested"), *args[1:]]
    before = tree(tmp_path)
    r = cli(model, *args)
    assert tree(tmp_path) == before, "a failed run must not write anything"
    return r


def check_png(path: Path) -> bytes:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 1000, path
    return data


def check_html(path: Path, pngs: dict[str, bytes]) -> str:
    """Self-contained page with every PNG inlined and no markup smuggled in from the prompt."""
    html = path.read_text()
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert "<script" not in html.lower() and "http://" not in html and "https://" not in html
    images = re.findall(r'<img\b[^>]*\bsrc="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert {base64.b64decode(b) for b in images} == set(pngs.values())
    for tag in re.findall(r"<[^>]*>", html):
        assert "onerror" not in tag and "src=x" not in tag, f"unescaped markup from the prompt: {tag}"
    return html


def strip_report_files(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "report_files"}


def clean_logits(model, prompt: str, fwd_hooks=()) -> torch.Tensor:
    """Last-position logits from a plain bridge forward pass (optionally with hooks)."""
    tokens = torch.tensor([model.encode(prompt)])
    with torch.no_grad():
        return model.bridge.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))[0, -1].float()


# ---------------------------------------------------------------------------------------------
# hexray patch
# ---------------------------------------------------------------------------------------------


def test_patch_prompts_are_equal_length_single_token_pairs(tiny_model):
    assert len(tiny_model.encode(CLEAN)) == len(tiny_model.encode(CORRUPT))
    assert len(tiny_model.encode(SHORTER)) < len(tiny_model.encode(CLEAN))
    assert tiny_model.single_token(" Mary") != tiny_model.single_token(" John")  # each one token


def test_patch_json(cli, tiny_model):
    spec = tiny_model.spec
    doc = run_json(cli, tiny_model, *PATCH)
    n_tokens = len(tiny_model.encode(CORRUPT))

    for key in ["metric", "clean_value", "corrupt_value", "method", "clean_token_ids", "corrupt_token_ids", "target", "contrast", "results"]:
        assert key in doc, key
    assert doc["metric"] == "logit_diff"
    assert doc["method"] == "exact"
    assert doc["sweeps"] == ["heads", "resid"]
    assert doc["last_position_only"] is False
    assert doc["clean_token_ids"] == tiny_model.encode(CLEAN)
    assert doc["corrupt_token_ids"] == tiny_model.encode(CORRUPT)
    assert doc["target"]["token"] == " Mary" and doc["target"]["id"] == tiny_model.single_token(" Mary")
    assert doc["contrast"]["token"] == " John" and doc["contrast"]["id"] == tiny_model.single_token(" John")
    assert doc["correlation"] is None
    assert "report_files" not in doc

    # the metric values from a plain forward pass
    mary, john = tiny_model.single_token(" Mary"), tiny_model.single_token(" John")
    clean, corrupt = clean_logits(tiny_model, CLEAN), clean_logits(tiny_model, CORRUPT)
    assert doc["clean_value"] == pytest.approx(float(clean[mary] - clean[john]), abs=1e-4)
    assert doc["corrupt_value"] == pytest.approx(float(corrupt[mary] - corrupt[john]), abs=1e-4)

    results = doc["results"]
    assert len(results) == spec.n_layers * spec.n_heads + spec.n_layers * n_tokens
    for row in results:
        assert {"name", "kind", "layer", "head", "position", "score"} <= set(row)
        assert isinstance(row["score"], float) and math.isfinite(row["score"])
        assert "attribution" not in row
    heads = [r for r in results if r["kind"] == "head"]
    resid = [r for r in results if r["kind"] == "resid"]
    assert len(heads) + len(resid) == len(results)
    assert {(r["name"], r["layer"], r["head"], r["position"]) for r in heads} == {
        (f"L{layer}H{h}", layer, h, None) for layer in range(spec.n_layers) for h in range(spec.n_heads)
    }
    assert {(r["name"], r["layer"], r["head"], r["position"]) for r in resid} == {
        (f"RESID{layer}", layer, None, p) for layer in range(spec.n_layers) for p in range(n_tokens)
    }
    assert all(re.fullmatch(r"L\d+H\d+|RESID\d+", r["name"]) for r in results)

    # the same numbers as the Python API
    api = activation_patching(tiny_model, CLEAN, CORRUPT, target=" Mary", contrast=" John")
    assert len(api.results) == len(results)
    for row, p in zip(results, api.results):
        assert (row["name"], row["position"]) == (p.site.name, p.site.position)
        assert row["score"] == pytest.approx(p.score, abs=1e-6)
    assert doc["clean_value"] == pytest.approx(api.clean_value, abs=1e-6)
    assert doc["corrupt_value"] == pytest.approx(api.corrupt_value, abs=1e-6)

    # before block 0 the two runs differ only at the swapped name: patching RESID0 there turns the
    # corrupt run into the clean one (score 1), anywhere else it changes nothing (score 0)
    diff_pos = [i for i, (a, b) in enumerate(zip(doc["clean_token_ids"], doc["corrupt_token_ids"])) if a != b]
    assert len(diff_pos) == 1
    resid0 = {r["position"]: r["score"] for r in resid if r["layer"] == 0}
    assert resid0[diff_pos[0]] == pytest.approx(1.0, abs=1e-4)
    assert all(abs(s) < 1e-5 for p, s in resid0.items() if p != diff_pos[0])


def test_patch_batch_size_does_not_change_scores(cli, tiny_gpt2):
    default = run_json(cli, tiny_gpt2, *PATCH)
    small = run_json(cli, tiny_gpt2, *PATCH, "--batch-size", "3")
    assert [r["name"] for r in small["results"]] == [r["name"] for r in default["results"]]
    for a, b in zip(default["results"], small["results"]):
        assert a["score"] == pytest.approx(b["score"], abs=2e-6)


def test_patch_method_both(cli, tiny_model):
    doc = run_json(cli, tiny_model, *PATCH, "--method", "both")
    assert doc["method"] == "both"
    assert all(isinstance(r["attribution"], float) for r in doc["results"])
    corr = doc["correlation"]
    assert isinstance(corr, dict) and set(corr) == {"heads", "resid", "all"}
    assert all(v is None or -1.0 <= v <= 1.0 for v in corr.values())
    # the exact scores are the same as with --method exact
    exact = run_json(cli, tiny_model, *PATCH)
    for a, b in zip(exact["results"], doc["results"]):
        assert a["score"] == pytest.approx(b["score"], abs=2e-6)
    api = activation_patching(tiny_model, CLEAN, CORRUPT, target=" Mary", contrast=" John", method="both")
    for row, p in zip(doc["results"], api.results):
        assert row["attribution"] == pytest.approx(p.attribution, abs=1e-6)
    for key, value in api.correlation.items():
        assert corr[key] == pytest.approx(value, abs=1e-6)


def test_patch_attribution_neurons_lists_every_neuron(cli, tiny_model):
    spec = tiny_model.spec
    doc = run_json(cli, tiny_model, *PATCH, "--method", "attribution", "--sweep", "neurons")
    assert doc["method"] == "attribution" and doc["sweeps"] == ["neurons"]
    rows = doc["results"]
    assert len(rows) == spec.n_layers * spec.d_mlp
    assert {(r["name"], r["layer"], r["neuron"]) for r in rows} == {
        (f"L{layer}N{n}", layer, n) for layer in range(spec.n_layers) for n in range(spec.d_mlp)
    }
    assert all(r["kind"] == "neuron" and r["head"] is None and r["position"] is None for r in rows)
    assert all(isinstance(r["score"], float) for r in rows)
    api = activation_patching(tiny_model, CLEAN, CORRUPT, target=" Mary", contrast=" John", method="attribution", sweeps="neurons")
    for row, p in zip(rows, api.results):
        assert row["score"] == pytest.approx(p.score, abs=1e-6)


def test_patch_attribution_default_is_every_sweep(cli, tiny_gpt2):
    doc = run_json(cli, tiny_gpt2, *PATCH, "--method", "attribution")
    assert doc["sweeps"] == ["heads", "resid", "attn", "mlp", "neurons"]
    assert {r["kind"] for r in doc["results"]} == {"head", "resid", "attn", "mlp", "neuron"}


def test_patch_sweep_all_and_parsing(cli, tiny_gpt2):
    spec = tiny_gpt2.spec
    n = len(tiny_gpt2.encode(CORRUPT))
    doc = run_json(cli, tiny_gpt2, *PATCH, "--sweep", "all")
    assert doc["sweeps"] == ["heads", "heads-pos", "resid", "attn", "mlp"]
    expected = {
        "heads": spec.n_layers * spec.n_heads,
        "heads-pos": spec.n_layers * spec.n_heads * n,
        "resid": spec.n_layers * n,
        "attn": spec.n_layers * n,
        "mlp": spec.n_layers * n,
    }
    for sweep, count in expected.items():
        assert sum(r["sweep"] == sweep for r in doc["results"]) == count, sweep
    assert {r["name"] for r in doc["results"] if r["sweep"] == "attn"} == {f"ATTN{layer}" for layer in range(spec.n_layers)}
    assert {r["name"] for r in doc["results"] if r["sweep"] == "mlp"} == {f"MLP{layer}" for layer in range(spec.n_layers)}
    # attention is causal: before the swapped name both runs are identical, so patching there does nothing
    diff_pos = next(i for i, (a, b) in enumerate(zip(doc["clean_token_ids"], doc["corrupt_token_ids"])) if a != b)
    early = [r for r in doc["results"] if r["position"] is not None and r["position"] < diff_pos]
    assert len(early) == diff_pos * (spec.n_layers * spec.n_heads + 3 * spec.n_layers)
    assert all(abs(r["score"]) < 1e-5 for r in early)
    pos_heads = {(r["name"], r["position"]) for r in doc["results"] if r["sweep"] == "heads-pos"}
    assert pos_heads == {(f"L{layer}H{h}", p) for layer in range(spec.n_layers) for h in range(spec.n_heads) for p in range(n)}

    # case, spaces and repeats in --sweep
    again = run_json(cli, tiny_gpt2, *PATCH, "--sweep", " RESID, heads ,resid")
    assert again["sweeps"] == ["resid", "heads"]
    assert len(again["results"]) == expected["resid"] + expected["heads"]


def test_patch_last_position_allows_unequal_lengths(cli, tiny_model, tmp_path):
    spec = tiny_model.spec
    args = ["patch", "--clean", CLEAN, "--corrupt", SHORTER, "--target", " Mary", "--contrast", " John"]
    r = bad_run(cli, tiny_model, args, tmp_path)
    assert_one_line_error(r, "--last-position")
    assert f"the clean prompt is {len(tiny_model.encode(CLEAN))} tokens" in r.err

    doc = run_json(cli, tiny_model, *args, "--last-position")
    last = len(tiny_model.encode(SHORTER)) - 1
    assert doc["last_position_only"] is True
    assert len(doc["results"]) == spec.n_layers * spec.n_heads + spec.n_layers
    assert {r["position"] for r in doc["results"]} == {last}
    api = activation_patching(tiny_model, CLEAN, SHORTER, target=" Mary", contrast=" John", last_position_only=True)
    for row, p in zip(doc["results"], api.results):
        assert row["score"] == pytest.approx(p.score, abs=1e-6)


def test_patch_console(cli, tiny_model):
    r = cli(tiny_model, *PATCH, "--top-k", "3")
    assert r.code == 0, r.err
    assert r.err == ""
    doc = run_json(cli, tiny_model, *PATCH)
    assert "Metric logit(' Mary') - logit(' John')" in r.out
    assert f"clean {doc['clean_value']:+.3f}, corrupt {doc['corrupt_value']:+.3f}" in r.out
    assert "Method exact" in r.out
    n_heads = tiny_model.spec.n_layers * tiny_model.spec.n_heads
    assert f"Top 3 of {n_heads} sites: heads" in r.out
    assert "sites: resid" in r.out
    best = max(doc["results"], key=lambda row: abs(row["score"]) if row["kind"] == "head" else -1)
    assert best["name"] in r.out and f"{best['score']:+.3f}" in r.out

    both = cli(tiny_model, *PATCH, "--method", "both")
    assert both.code == 0, both.err
    assert "Exact vs attribution (Pearson r)" in both.out and "attribution" in both.out


def test_patch_report(cli, tiny_model, tmp_path):
    folder = tmp_path / "out" / "patch"
    doc = run_json(cli, tiny_model, *PATCH, "--method", "both", "--report", folder)
    names = {"patch_heads.png", "patch_resid.png", "exact_vs_attribution.png", "hexray.json", "index.html"}
    assert {p.name for p in folder.iterdir()} == names  # and no staging leftovers
    assert sorted(Path(p).name for p in doc["report_files"]) == sorted(names)
    pngs = {n: check_png(folder / n) for n in names if n.endswith(".png")}
    assert json.loads((folder / "hexray.json").read_text()) == strip_report_files(doc)
    html = check_html(folder / "index.html", pngs)
    assert "Activation patching" in html

    r = cli(tiny_model, *PATCH, "--report", tmp_path / "console")
    assert r.code == 0, r.err
    assert f"Report written to {tmp_path / 'console'}" in r.out
    assert {p.name for p in (tmp_path / "console").iterdir()} == {"patch_heads.png", "patch_resid.png", "hexray.json", "index.html"}


def test_patch_report_escapes_token_text(cli, tiny_gpt2, tmp_path):
    clean, corrupt = f"{XSS} {CLEAN}", f"{XSS} {CORRUPT}"
    assert len(tiny_gpt2.encode(clean)) == len(tiny_gpt2.encode(corrupt))
    folder = tmp_path / "xss"
    r = cli(tiny_gpt2, "patch", "--clean", clean, "--corrupt", corrupt, "--target", " Mary", "--contrast", " John", "--report", folder)
    assert r.code == 0, r.err
    pngs = {p.name: check_png(p) for p in folder.glob("*.png")}
    assert set(pngs) == {"patch_heads.png", "patch_resid.png"}
    html = check_html(folder / "index.html", pngs)
    assert "&lt;" in html and "&gt;" in html
    assert "'<'" not in html and "'>'" not in html  # each token is shown escaped
    assert XSS not in html


# ---------------------------------------------------------------------------------------------
# hexray ablate
# ---------------------------------------------------------------------------------------------


def _zero_hooks():
    """Forward hooks that zero L0H1 (hook_z head 1) and MLP1 (hook_mlp_out)."""

    def zero_head(x, hook):
        x = x.clone()
        x[:, :, 1] = 0
        return x

    def zero_all(x, hook):
        return torch.zeros_like(x)

    return [("blocks.0.attn.hook_z", zero_head), ("blocks.1.hook_mlp_out", zero_all)]


def test_ablate_json_zero(cli, tiny_model):
    doc = run_json(cli, tiny_model, "ablate", "-p", CLEAN, "-c", "L0H1,MLP1", "--target", " Mary", "--contrast", " John")
    for key in ["before", "after", "kl", "components", "mode"]:
        assert key in doc, key
    assert doc["mode"] == "zero" and doc["n_reference"] == 0 and doc["samples"] == 1
    assert doc["position"] == len(tiny_model.encode(CLEAN)) - 1
    assert [(c["name"], c["kind"], c["layer"], c["head"], c["position"]) for c in doc["components"]] == [
        ("L0H1", "head", 0, 1, None), ("MLP1", "mlp", 1, None, None),
    ]
    for side in ("before", "after"):
        assert set(doc[side]) == {"top", "target", "contrast", "logit_diff"}
        assert len(doc[side]["top"]) == 10
        assert doc[side]["target"]["token"] == " Mary" and doc[side]["contrast"]["token"] == " John"

    mary, john = tiny_model.single_token(" Mary"), tiny_model.single_token(" John")
    before = clean_logits(tiny_model, CLEAN)
    after = clean_logits(tiny_model, CLEAN, _zero_hooks())
    assert doc["before"]["logit_diff"] == pytest.approx(float(before[mary] - before[john]), abs=1e-4)
    assert doc["after"]["logit_diff"] == pytest.approx(float(after[mary] - after[john]), abs=1e-4)
    assert doc["after"]["target"]["logit"] == pytest.approx(float(after[mary]), abs=1e-4)
    assert doc["before"]["top"][0]["id"] == int(before.argmax())
    assert doc["after"]["top"][0]["id"] == int(after.argmax())
    p, q = torch.softmax(before.double(), -1), torch.softmax(after.double(), -1)
    assert doc["kl"] == pytest.approx(float((p * (p.log() - q.log())).sum()), abs=1e-5)
    assert doc["kl"] > 0

    # without --target/--contrast: the prediction, no logit difference
    plain = run_json(cli, tiny_model, "ablate", "-p", CLEAN, "-c", "L0H1,MLP1", "-k", "3")
    assert plain["before"]["contrast"] is None and plain["before"]["logit_diff"] is None
    assert plain["before"]["target"]["id"] == int(before.argmax())
    assert len(plain["before"]["top"]) == len(plain["after"]["top"]) == 3
    assert plain["kl"] == pytest.approx(doc["kl"], abs=1e-6)


def test_ablate_modes(cli, tiny_model, tmp_path):
    reference = tmp_path / "refs.txt"
    reference.write_text("The cat sat on the mat.\n\n  The dog ran in the park.  \nIt was a cold day.\n")
    mean = run_json(cli, tiny_model, "ablate", "-p", CLEAN, "-c", "L0H1,MLP1", "--mode", "mean", "--reference", reference)
    assert mean["mode"] == "mean" and mean["n_reference"] == 3 and mean["samples"] == 1
    assert mean["kl"] >= 0

    args = ["ablate", "-p", CLEAN, "-c", "L0H1,MLP1", "--mode", "resample", "--reference", reference]
    one = run_json(cli, tiny_model, *args, "--seed", "1")
    assert one["mode"] == "resample" and one["n_reference"] == 3 and one["samples"] == 8
    assert run_json(cli, tiny_model, *args, "--seed", "1") == one  # seeded: reproducible
    few = run_json(cli, tiny_model, *args, "--seed", "1", "--samples", "2")
    assert few["samples"] == 2

    # the built-in reference set
    builtin = run_json(cli, tiny_model, "ablate", "-p", CLEAN, "-c", "L0H1", "--mode", "mean")
    assert builtin["n_reference"] > 3

    # mean ablation of the whole residual stream before block 0 at every position: every position's
    # input is the same vector, so the result cannot depend on the prompt's tokens
    a = run_json(cli, tiny_model, "ablate", "-p", CLEAN, "-c", "RESID0", "--mode", "mean", "--reference", reference)
    b = run_json(cli, tiny_model, "ablate", "-p", CORRUPT, "-c", "RESID0", "--mode", "mean", "--reference", reference)
    assert [t["id"] for t in a["after"]["top"]] == [t["id"] for t in b["after"]["top"]]
    assert [t["prob"] for t in a["after"]["top"]] == pytest.approx([t["prob"] for t in b["after"]["top"]], abs=1e-5)


def test_ablate_console(cli, tiny_model):
    r = cli(tiny_model, "ablate", "-p", CLEAN, "-c", "L0H1,MLP1", "--target", " Mary", "--contrast", " John")
    assert r.code == 0, r.err
    assert r.err == ""
    assert "Ablated L0H1, MLP1 (zeroed)" in r.out
    assert "KL(before || after) =" in r.out and "nats" in r.out
    assert "logit(' Mary') - logit(' John'):" in r.out
    assert "Next-token distribution" in r.out


def test_ablate_report(cli, tiny_gpt2, tmp_path):
    folder = tmp_path / "ablate"
    prompt = f"{XSS} {CLEAN}"
    doc = run_json(cli, tiny_gpt2, "ablate", "-p", prompt, "-c", "L0H1@-1", "--report", folder)
    assert doc["components"][0]["position"] == -1
    names = {"ablation.png", "hexray.json", "index.html"}
    assert {p.name for p in folder.iterdir()} == names
    pngs = {"ablation.png": check_png(folder / "ablation.png")}
    assert json.loads((folder / "hexray.json").read_text()) == strip_report_files(doc)
    html = check_html(folder / "index.html", pngs)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


# ---------------------------------------------------------------------------------------------
# hexray heads
# ---------------------------------------------------------------------------------------------


def _expected_label(scores: dict, threshold: float):
    specific = {r: s for r, s in scores.items() if r != "bos" and s is not None}
    order = ["induction", "duplicate_token", "previous_token"]  # HexRay's tie order
    best = max(order, key=lambda r: (specific.get(r, -1.0), -order.index(r)))
    if specific.get(best, -1.0) >= threshold:
        return best
    return "bos" if (scores["bos"] or -1.0) >= threshold else None


def test_heads_json(cli, tiny_model):
    spec = tiny_model.spec
    prompt = "The cat sat on the mat. The cat sat on the mat."
    doc = run_json(cli, tiny_model, "heads", "--prompt", prompt, "--threshold", "0.3", "--seq-len", "10")
    assert doc["prompt"] == prompt and doc["threshold"] == 0.3
    assert doc["induction_data"] == {"seq_len": 10, "n_sequences": 4, "seed": 0}
    heads = doc["heads"]
    assert len(heads) == spec.n_layers * spec.n_heads
    assert [(h["layer"], h["head"]) for h in heads] == [(layer, h) for layer in range(spec.n_layers) for h in range(spec.n_heads)]
    for h in heads:
        assert set(h) == {"name", "layer", "head", "scores", "label"}
        assert h["name"] == f"L{h['layer']}H{h['head']}"
        assert set(h["scores"]) == ROLES
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 + 1e-6 for v in h["scores"].values())
        assert h["label"] in ROLES | {None}
        assert h["label"] == _expected_label(h["scores"], 0.3), h

    # previous-token and BOS scores from the attention patterns of a plain forward pass
    ids = torch.tensor([tiny_model.encode(prompt)])
    n = ids.shape[1]
    with torch.no_grad():
        _, cache = tiny_model.bridge.run_with_cache(ids)
    for h in heads:
        pattern = cache[f"blocks.{h['layer']}.attn.hook_pattern"][0, h["head"]].float()  # [q, k]
        previous = float(torch.stack([pattern[q, q - 1] for q in range(1, n)]).mean())
        bos = float(pattern[1:, 0].mean())
        assert h["scores"]["previous_token"] == pytest.approx(previous, abs=1e-5)
        assert h["scores"]["bos"] == pytest.approx(bos, abs=1e-5)

    # a threshold of 0 labels every head
    assert all(h["label"] is not None for h in run_json(cli, tiny_model, *HEADS, "--threshold", "0")["heads"])


def test_heads_console_and_report(cli, tiny_model, tmp_path):
    r = cli(tiny_model, *HEADS, "--top-k", "2")
    assert r.code == 0, r.err
    assert r.err == ""
    assert "Head roles (score >= 0.4)" in r.out
    assert "Top 2 heads per role" in r.out
    for role in ROLES:
        assert role in r.out
    for layer in range(tiny_model.spec.n_layers):
        assert re.search(rf"^│\s+{layer} │", r.out, re.M), layer
    assert "induction on 4 repeated random sequences of 25 tokens (seed 0)" in r.out

    folder = tmp_path / "heads"
    doc = run_json(cli, tiny_model, "heads", "--prompt", f"{XSS} The cat sat on the mat.", "--report", folder)
    assert {p.name for p in folder.iterdir()} == {"head_roles.png", "hexray.json", "index.html"}
    pngs = {"head_roles.png": check_png(folder / "head_roles.png")}
    assert json.loads((folder / "hexray.json").read_text()) == strip_report_files(doc)
    html = check_html(folder / "index.html", pngs)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("<tr>") == 1 + len(doc["heads"])  # header + one row per head


def test_heads_seed_changes_only_induction(cli, tiny_gpt2):
    a = run_json(cli, tiny_gpt2, *HEADS, "--seed", "0")["heads"]
    b = run_json(cli, tiny_gpt2, *HEADS, "--seed", "5")["heads"]
    assert [h["scores"]["previous_token"] for h in a] == [h["scores"]["previous_token"] for h in b]
    assert [h["scores"]["induction"] for h in a] != [h["scores"]["induction"] for h in b]


def test_heads_with_no_repeated_token(cli, tiny_gpt2):
    """A prompt without a repeated token has no duplicate-token target: the score is undefined (null)."""
    prompt = "The dog"
    ids = tiny_gpt2.encode(prompt)
    assert len(set(ids)) == len(ids) >= 2
    doc = run_json(cli, tiny_gpt2, "heads", "--prompt", prompt)
    assert all(h["scores"]["duplicate_token"] is None for h in doc["heads"])
    assert all(h["label"] != "duplicate_token" for h in doc["heads"])
    assert all(isinstance(h["scores"]["previous_token"], float) for h in doc["heads"])


def test_heads_console_does_not_show_undefined_scores_as_minus_one(cli, tiny_gpt2):
    r = cli(tiny_gpt2, "heads", "--prompt", "The dog")
    assert r.code == 0, r.err
    assert "duplicate_token" in r.out
    assert "-1.00" not in r.out  # scores are in [0, 1]; an undefined one is not -1


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line on stderr, empty stdout, nothing written
# ---------------------------------------------------------------------------------------------

ABL = ["ablate", "-p", CLEAN]

# (id, arguments, text the message must contain, fails before the model is loaded)
BAD_INPUT = [
    ("unknown-component", [*ABL, "-c", "X5"], "L9H6", False),
    ("unknown-component-word", [*ABL, "-c", "L0H1,banana"], "unknown component 'banana'", False),
    ("no-components", [*ABL, "-c", " , "], "no components given", False),
    ("layer-out-of-range", [*ABL, "-c", "L2H0"], "layer 2 is out of range", False),
    ("mlp-layer-out-of-range", [*ABL, "-c", "MLP9"], "layer 9 is out of range", False),
    ("head-out-of-range", [*ABL, "-c", "L0H4"], "head 4 is out of range", False),
    ("neuron-out-of-range", [*ABL, "-c", "L1N100000"], "neuron 100000 is out of range", False),
    ("resid-final", [*ABL, "-c", "RESID2"], "final residual stream", False),
    ("resid-past-the-end", [*ABL, "-c", "RESID3"], "layer 3 is out of range", False),
    ("embed", [*ABL, "-c", "embed"], "embed cannot be ablated", False),
    ("position-out-of-range", [*ABL, "-c", "L0H1@99"], "position 99 is out of range", False),
    ("position-not-a-number", [*ABL, "-c", "L0H1@x"], "is not a number", False),
    ("token-index-out-of-range", [*ABL, "-c", "L0H1", "--token-index", "99"], "out of range", False),
    ("ablate-multi-token-target", [*ABL, "-c", "L0H1", "--target", MULTI_TOKEN], "is 10 tokens, not one", False),
    ("unknown-mode", [*ABL, "-c", "L0H1", "--mode", "shuffle"], "unknown --mode 'shuffle'", True),
    ("ablate-top-k-zero", [*ABL, "-c", "L0H1", "--top-k", "0"], "--top-k must be positive", True),
    ("samples-zero", [*ABL, "-c", "L0H1", "--mode", "resample", "--samples", "0"], "--samples must be positive", True),
    ("empty-reference", [*ABL, "-c", "L0H1", "--mode", "mean", "--reference", "{tmp}/empty.txt"], "has no prompts", True),
    ("blank-reference", [*ABL, "-c", "L0H1", "--mode", "mean", "--reference", "{tmp}/blank.txt"], "has no prompts", True),
    ("missing-reference", [*ABL, "-c", "L0H1", "--mode", "mean", "--reference", "{tmp}/nope.txt"], "no such file", True),
    ("ablate-report-is-a-file", [*ABL, "-c", "L0H1", "--report", "{tmp}/a-file"], "is not a folder", True),
    ("patch-unequal-lengths", ["patch", "--clean", CLEAN, "--corrupt", SHORTER, "--target", " Mary", "--contrast", " John"], "--last-position", False),
    ("unknown-sweep", [*PATCH, "--sweep", "heads,blocks"], "unknown sweep 'blocks'", True),
    ("empty-sweep", [*PATCH, "--sweep", ","], "--sweep is empty", True),
    ("neurons-exact", [*PATCH, "--sweep", "neurons"], "attribution-only", True),
    ("neurons-both", [*PATCH, "--sweep", "heads,neurons", "--method", "both"], "attribution-only", True),
    ("unknown-method", [*PATCH, "--method", "gradient"], "unknown --method 'gradient'", True),
    ("batch-size-zero", [*PATCH, "--batch-size", "0"], "--batch-size must be positive", True),
    ("batch-size-negative", [*PATCH, "--batch-size", "-2"], "--batch-size must be positive", True),
    ("patch-top-k-zero", [*PATCH, "--top-k", "0"], "--top-k must be positive", True),
    ("patch-multi-token-target", ["patch", "--clean", CLEAN, "--corrupt", CORRUPT, "--target", MULTI_TOKEN, "--contrast", " John"], "is 10 tokens, not one", False),
    ("patch-multi-token-contrast", ["patch", "--clean", CLEAN, "--corrupt", CORRUPT, "--target", " Mary", "--contrast", MULTI_TOKEN], "--contrast", False),
    ("same-target-and-contrast", ["patch", "--clean", CLEAN, "--corrupt", CORRUPT, "--target", " Mary", "--contrast", " Mary"], "same token", False),
    ("identical-prompts", ["patch", "--clean", CLEAN, "--corrupt", CLEAN, "--target", " Mary", "--contrast", " John"], "nothing to restore", False),
    ("identical-prompts-no-target", ["patch", "--clean", CLEAN, "--corrupt", CLEAN], "both predict", False),
    ("patch-empty-clean", ["patch", "--clean", "", "--corrupt", CORRUPT, "--target", " Mary", "--contrast", " John"], "prompt is empty", False),
    ("patch-blank-corrupt", ["patch", "--clean", CLEAN, "--corrupt", " \n ", "--target", " Mary", "--contrast", " John"], "prompt is empty", False),
    ("patch-report-is-a-file", [*PATCH, "--report", "{tmp}/a-file"], "is not a folder", True),
    ("patch-missing-corrupt", ["patch", "--clean", CLEAN], "--corrupt", True),
    ("threshold-too-high", ["heads", "--threshold", "2"], "--threshold must be between 0 and 1, got 2", True),
    ("threshold-negative", ["heads", "--threshold", "-0.1"], "--threshold must be between 0 and 1", True),
    ("heads-top-k-zero", ["heads", "--top-k", "0"], "--top-k must be positive", True),
    ("seq-len-one", [*HEADS, "--seq-len", "1"], "--seq-len must be between 2 and 32, got 1", False),
    ("seq-len-past-context", [*HEADS, "--seq-len", "33"], "--seq-len must be between 2 and 32, got 33", False),
    ("sequences-zero", [*HEADS, "--sequences", "0"], "--sequences must be positive", False),
    ("heads-one-token-prompt", ["heads", "--prompt", "The"], "at least 2 tokens", False),
    ("heads-report-is-a-file", ["heads", "--report", "{tmp}/a-file"], "is not a folder", True),
]


@pytest.mark.parametrize(("args", "expected", "early"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input(cli, tiny_gpt2, tmp_path, args, expected, early):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n   \n\t\n")
    r = bad_run(cli, "no-load" if early else tiny_gpt2, args, tmp_path)
    assert_one_line_error(r, expected)


def test_patch_empty_prompt_names_the_right_flag(cli, tiny_gpt2):
    r = cli(tiny_gpt2, "patch", "--clean", CLEAN, "--corrupt", "", "--target", " Mary", "--contrast", " John")
    assert_one_line_error(r, "prompt is empty")
    assert "--prompt" not in r.err and "--corrupt" in r.err


def test_bad_input_on_llama(cli, tiny_llama, tmp_path):
    """Range checks follow the loaded model (Llama's d_mlp is 48, not GPT-2's 128)."""
    d_mlp = tiny_llama.spec.d_mlp
    assert_one_line_error(bad_run(cli, tiny_llama, [*ABL, "-c", f"L0N{d_mlp}"], tmp_path), f"neuron {d_mlp} is out of range")
    assert run_json(cli, tiny_llama, *ABL, "-c", f"L0N{d_mlp - 1}")["components"][0]["neuron"] == d_mlp - 1


def test_component_forms_are_listed(cli, tiny_gpt2):
    r = cli(tiny_gpt2, *ABL, "-c", "H9L6")
    assert_one_line_error(r, "unknown component 'H9L6'")
    for form in ["L9H6", "ATTN9", "MLP10", "L10N1234", "RESID12"]:
        assert form in r.err


# ---------------------------------------------------------------------------------------------
# python hexray.py at the repo root
# ---------------------------------------------------------------------------------------------


def test_hexray_py_patch_help_at_the_repo_root():
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "hexray.py", "patch", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: hexray patch" in proc.stdout
    for flag in ["--clean", "--corrupt", "--sweep", "--method", "--last-position", "--batch-size"]:
        assert flag in proc.stdout, flag
    assert "Traceback" not in proc.stderr
    # and a mistake caught before any model work is the same one-line error as in-process
    proc = subprocess.run([sys.executable, "hexray.py", "patch", "--clean", "a", "--corrupt", "b", "--method", "nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["error: unknown --method 'nope' (use exact, attribution or both)"]


@pytest.fixture(scope="module")
def feature_folder(tiny_model, tmp_path_factory):
    """A random topk dictionary at resid.1, saved as a folder (what --dict takes)."""
    from hexray.features.dictionary import DictSite, Dictionary
    from hexray.features.formats import save_dictionary

    width = tiny_model.spec.d_model
    g = torch.Generator().manual_seed(11)
    W_dec = torch.randn(12, width, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    d = Dictionary(DictSite("resid", 1), "topk", W_dec.T.clone(), torch.zeros(12), W_dec, torch.zeros(width), tiny_model.name, k=3)
    return str(save_dictionary(d, tmp_path_factory.mktemp("cli-dict") / "resid.1", spec=tiny_model.spec))


def test_ablate_features_zero_clamp_and_steer_in_json_and_console(cli, tiny_model, feature_folder):
    doc = run_json(cli, tiny_model, "ablate", "-p", CLEAN, "-c", "L1F2,L1F3=4@-1,L1F5+=2.5", "--dict", feature_folder)
    assert [(c["name"], c["label"], c["feature"], c["site"], c["clamp"], c["steer"], c["position"]) for c in doc["components"]] == [
        ("L1F2", "L1F2", 2, "resid", None, None, None), ("L1F3", "L1F3=4@-1", 3, "resid", 4.0, None, -1), ("L1F5", "L1F5+=2.5", 5, "resid", None, 2.5, None),
    ]
    assert doc["kl"] > 0
    r = cli(tiny_model, "ablate", "-p", CLEAN, "-c", "L1F5+=2.5", "--dict", feature_folder)
    assert r.code == 0 and "L1F5+=2.5" in r.out
    assert_one_line_error(cli(tiny_model, "ablate", "-p", CLEAN, "-c", "L1F5+=2.5"), "needs its dictionary")
    assert_one_line_error(cli(tiny_model, "ablate", "-p", CLEAN, "-c", "L1F99", "--dict", feature_folder), "out of range")


def test_patch_features_sweep_in_json_and_console(cli, tiny_model, feature_folder, tmp_path):
    doc = run_json(cli, tiny_model, *PATCH, "--sweep", "resid,features", "--method", "both", "--dict", feature_folder)
    rows = [r for r in doc["results"] if r["sweep"] == "features"]
    assert doc["sweeps"] == ["resid", "features"] and len(rows) == 12
    assert [(r["name"], r["feature"], r["site"], r["position"]) for r in rows[:2]] == [("L1F0", 0, "resid", None), ("L1F1", 1, "resid", None)]
    assert all("attribution" in r for r in rows) and "features" in doc["correlation"]
    r = cli(tiny_model, *PATCH, "--sweep", "features", "--method", "attribution", "--dict", feature_folder, "--report", tmp_path / "rep")
    assert r.code == 0 and "sites: features" in r.out
    assert (tmp_path / "rep" / "patch_features.png").stat().st_size > 1000
    assert_one_line_error(cli(tiny_model, *PATCH, "--sweep", "features"), "features sweep needs dictionaries")
