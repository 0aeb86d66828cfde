"""The ``hexray`` command line, run in-process through ``hexray.cli.main`` on the tiny models.

``hexray.cli.load_model`` is monkeypatched to hand back an already-loaded tiny model, so every
test exercises the real argument parsing, analyses, renderers and file writers without reloading.
Expected numbers come from a plain Hugging Face forward pass (``tiny_hf_model``), not from HexRay.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CliRun, assert_one_line_error, expected_names, tree
import torch

import hexray
import hexray.cli
from hexray.tracing.engine import run_trace

REPO = Path(__file__).resolve().parents[2]
def shown_token(tokenizer, i: int) -> str:
    """How a token is shown: its text, or (a byte-level piece of a character) its bytes, from transformers' own byte table."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    text = tokenizer.decode([i])
    if "\ufffd" not in text:
        return text
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(byte_of[c] for c in tokenizer.convert_ids_to_tokens(i)).decode("utf-8", errors="backslashreplace")


IOI = "When Mary and John went to the store, John gave a drink to"
SENTENCES = ["The cat sat on the mat.", "The dog ran in the park.", "It was a cold day."]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MULTI_TOKEN = " Eiffelzzq"  # ten pieces in the tiny tokenizer


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def run_json(cli, model, *args) -> dict:
    """CliRun with ``--json``; check stdout holds exactly one JSON document and stderr nothing."""
    r = cli(model, *args, "--json")
    assert r.code == 0, r.err
    assert r.err == ""
    assert r.out.endswith("\n") and r.out.count("\n") == 1, "stdout must be one JSON line and nothing else"
    return json.loads(r.out)


def hf_logits(hf_model, model, prompt: str) -> torch.Tensor:
    """[pos, d_vocab] logits from a plain transformers forward pass, no HexRay or TransformerLens involved."""
    ids = torch.tensor([model.encode(prompt)])
    with torch.no_grad():
        return hf_model(ids).logits[0].float()


def assert_conserves(doc: dict) -> None:
    """Components sorted by |score| descending and summing to ``value`` (1e-3 relative; 1e-5 for JSON rounding)."""
    scores = [c["score"] for c in doc["components"]]
    assert all(isinstance(s, float) for s in scores)
    assert [abs(s) for s in scores] == sorted((abs(s) for s in scores), reverse=True)
    assert abs(sum(scores) - doc["value"]) <= 1e-3 * abs(doc["value"]) + 1e-5


def table_rows(text: str) -> list[list[str]]:
    """Cells of the numbered rows of rich tables in ``text``."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) >= 4 and cells[0].isdigit():
            rows.append(cells)
    return rows


def last_token_positions(model, prompt: str, pieces: list[str]) -> list[int]:
    """Each piece's last token position, from the tokenizer's own character offsets."""
    offsets = model.tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    out = []
    for piece in pieces:
        end = prompt.index(piece) + len(piece)
        out.append(max(i for i, (s, e) in enumerate(offsets) if e > s and s < end))
    return out




# ---------------------------------------------------------------------------------------------
# every flag does what it says
# ---------------------------------------------------------------------------------------------


def test_default_run_shows_the_residual_trace(cli, tiny_model, tiny_hf_model):
    r = cli(tiny_model, "--prompt", IOI)
    assert r.code == 0, r.err
    assert r.err == ""
    n = len(tiny_model.encode(IOI))
    prediction = tiny_model.token_str(int(hf_logits(tiny_hf_model, tiny_model, IOI)[-1].argmax()))
    assert f"Position {n - 1} " in r.out
    assert f"-> {prediction!r}" in r.out
    assert f"Residual stream at position {n - 1}" in r.out
    assert "Logit-lens top-1 by layer and position" in r.out
    for label in ["embed", *(f"L{layer}" for layer in range(tiny_model.spec.n_layers))]:
        assert re.search(rf"^│ {label} +│", r.out, re.M), label
    # the default attribution table has every layer-granularity component (2 + 2 * n_layers < 10)
    assert len(table_rows(r.out)) == 2 + 2 * tiny_model.spec.n_layers


def test_residual_trace_is_hidden_when_another_analysis_is_asked_for(cli, tiny_gpt2):
    assert "Residual stream" not in cli(tiny_gpt2, "--prompt", IOI, "-k", "3").out
    assert "Residual stream" in cli(tiny_gpt2, "--prompt", IOI, "-k", "3", "--residual").out


@pytest.mark.parametrize("granularity", ["layer", "head", "neuron"])
def test_top_k_attribution_table(cli, tiny_model, granularity):
    r = cli(tiny_model, "--prompt", IOI, "--top-k-attribution", "3", "--granularity", granularity)
    assert r.code == 0, r.err
    assert re.search(rf"Top 3 contributors to .* \({granularity}\)", r.out)
    rows = table_rows(r.out)
    assert [row[0] for row in rows] == ["1", "2", "3"]
    doc = run_json(cli, tiny_model, "--prompt", IOI, "--granularity", granularity)
    assert [row[2] for row in rows] == [f"{c['score']:+.3f}" for c in doc["components"][:3]]


def _prefix_with_tokens(model, text: str, n: int) -> str:
    """The shortest prefix of ``text`` that is exactly ``n`` tokens."""
    for end in range(1, len(text) + 1):
        if len(model.encode(text[:end])) == n:
            return text[:end]
    raise AssertionError(f"no prefix of {n} tokens")


def test_prompt_length_boundary_is_the_context(cli, tiny_gpt2):
    n_ctx = tiny_gpt2.spec.n_ctx
    fits = _prefix_with_tokens(tiny_gpt2, TOO_LONG, n_ctx)
    doc = run_json(cli, tiny_gpt2, "--prompt", fits)
    assert len(doc["token_ids"]) == n_ctx and doc["position"] == n_ctx - 1
    assert_one_line_error(cli(tiny_gpt2, "--prompt", _prefix_with_tokens(tiny_gpt2, TOO_LONG, n_ctx + 1)), f"is {n_ctx + 1} tokens")
    # a forced BOS is one more token
    assert_one_line_error(cli(tiny_gpt2, "--prompt", fits, "--prepend-bos"), f"is {n_ctx + 1} tokens")


def test_prepend_bos(cli, tiny_model, tiny_hf_model):
    bos = tiny_model.tokenizer.bos_token_id
    plain = run_json(cli, tiny_model, "--prompt", IOI)
    assert plain["token_ids"][0] != bos
    assert run_json(cli, tiny_model, "--prompt", IOI, "--no-prepend-bos")["token_ids"] == plain["token_ids"]
    doc = run_json(cli, tiny_model, "--prompt", IOI, "--prepend-bos")
    assert doc["token_ids"] == [bos, *plain["token_ids"]]
    assert doc["position"] == plain["position"] + 1
    with torch.no_grad():
        logits = tiny_hf_model(torch.tensor([doc["token_ids"]])).logits[0, -1]
    assert doc["target"]["id"] == int(logits.argmax())
    assert doc["value"] == pytest.approx(float(logits.max()), abs=1e-4)
    assert_conserves(doc)
    # step positions shift by the BOS token too
    prompt = " ".join(SENTENCES[:2])
    steps = run_json(cli, tiny_model, "--prompt", prompt, "--cot-debug", "--prepend-bos")["cot"]["steps"]
    assert [s["position"] for s in steps] == [p + 1 for p in last_token_positions(tiny_model, prompt, SENTENCES[:2])]


def test_short_flag_k_and_granularity_head_shows_head_labels(cli, tiny_gpt2):
    r = cli(tiny_gpt2, "-p", IOI, "-k", "12", "--granularity", "head")
    assert r.code == 0, r.err
    labels = [row[1] for row in table_rows(r.out)]
    assert len(labels) == 12  # embed, bias, 2 MLPs, 8 heads
    assert sum(bool(re.fullmatch(r"L\dH\d", lab)) for lab in labels) == 8


@pytest.mark.parametrize("granularity", ["layer", "head", "neuron"])
def test_json_document(cli, tiny_model, tiny_hf_model, granularity):
    doc = run_json(cli, tiny_model, "--prompt", IOI, "--granularity", granularity)
    spec = tiny_model.spec
    ids = tiny_model.encode(IOI)
    logits = hf_logits(tiny_hf_model, tiny_model, IOI)[-1]
    probs = torch.softmax(logits.double(), -1)
    top = int(logits.argmax())

    for key in ["model", "prompt", "tokens", "token_ids", "position", "target", "contrast", "value", "granularity", "components"]:
        assert key in doc, key
    assert "logit_lens" not in doc
    assert doc["model"] == tiny_model.name
    assert doc["prompt"] == IOI
    assert doc["token_ids"] == ids
    assert doc["tokens"] == [shown_token(tiny_model.tokenizer, i) for i in ids]
    assert doc["position"] == len(ids) - 1
    assert doc["granularity"] == granularity
    assert doc["contrast"] is None
    assert set(doc["target"]) == {"token", "id", "logit", "prob"}
    assert doc["target"]["id"] == top
    assert doc["target"]["token"] == shown_token(tiny_model.tokenizer, top)
    assert doc["target"]["logit"] == pytest.approx(float(logits[top]), abs=1e-4)
    assert doc["target"]["prob"] == pytest.approx(float(probs[top]), abs=1e-5)
    assert doc["value"] == pytest.approx(float(logits[top]), abs=1e-4)

    components = doc["components"]
    assert {c["name"] for c in components} == expected_names(spec, granularity)
    assert len(components) == len(expected_names(spec, granularity))
    for c in components:
        assert set(c) == {"name", "kind", "layer", "head", "neuron", "score"}
        kind = c["kind"]
        assert (c["layer"] is None) == (kind in {"embed", "bias"})
        assert (c["head"] is not None) == (kind == "head")
        assert (c["neuron"] is not None) == (kind == "neuron")
        if kind == "head":
            assert c["name"] == f"L{c['layer']}H{c['head']}"
        if kind == "neuron":
            assert c["name"] == f"L{c['layer']}N{c['neuron']}"
    assert_conserves(doc)


def test_target_contrast_and_token_index(cli, tiny_model, tiny_hf_model):
    logits = hf_logits(tiny_hf_model, tiny_model, IOI)
    n = logits.shape[0]
    mary, john = tiny_model.single_token(" Mary"), tiny_model.single_token(" John")

    doc = run_json(cli, tiny_model, "--prompt", IOI, "--target", " Mary", "--contrast", " John")
    assert doc["target"]["token"] == " Mary" and doc["target"]["id"] == mary
    assert doc["contrast"]["token"] == " John" and doc["contrast"]["id"] == john
    assert doc["contrast"]["logit"] == pytest.approx(float(logits[-1, john]), abs=1e-4)
    assert doc["value"] == pytest.approx(float(logits[-1, mary] - logits[-1, john]), abs=1e-4)
    assert_conserves(doc)

    doc = run_json(cli, tiny_model, "--prompt", IOI, "--target", " Mary")
    assert doc["contrast"] is None
    assert doc["value"] == pytest.approx(float(logits[-1, mary]), abs=1e-4)

    for index, position in [(3, 3), (0, 0), (-2, n - 2), (-n, 0)]:
        doc = run_json(cli, tiny_model, "--prompt", IOI, "--token-index", index)
        assert doc["position"] == position
        assert doc["target"]["id"] == int(logits[position].argmax())
        assert doc["value"] == pytest.approx(float(logits[position].max()), abs=1e-4)
        assert_conserves(doc)


def test_logit_lens(cli, tiny_model):
    n_rows = tiny_model.spec.n_layers + 1
    r = cli(tiny_model, "--prompt", IOI, "--logit-lens")
    assert r.code == 0, r.err
    assert "Logit lens at position" in r.out

    doc = run_json(cli, tiny_model, "--prompt", IOI, "--logit-lens")
    lens = doc["logit_lens"]
    assert lens["position"] == doc["position"]
    assert len(lens["layers"]) == n_rows
    assert all(len(row["top"]) == 5 for row in lens["layers"])
    final = lens["layers"][-1]
    assert final["top"][0]["token"] == doc["target"]["token"]
    assert final["top"][0]["prob"] == pytest.approx(doc["target"]["prob"], abs=1e-5)
    assert final["target_rank"] == 0

    doc = run_json(cli, tiny_model, "--prompt", IOI, "--logit-lens", "--lens-k", "3", "--target", " Mary")
    assert all(len(row["top"]) == 3 for row in doc["logit_lens"]["layers"])
    assert doc["logit_lens"]["target"]["token"] == " Mary"


@pytest.mark.parametrize("n_sentences", [2, 3])
def test_cot_debug_steps_end_at_each_sentence(cli, tiny_model, tiny_hf_model, n_sentences):
    pieces = SENTENCES[:n_sentences]
    prompt = " ".join(pieces)
    logits = hf_logits(tiny_hf_model, tiny_model, prompt)

    doc = run_json(cli, tiny_model, "--prompt", prompt, "--cot-debug")
    cot = doc["cot"]
    assert cot["rule"] == "sentences"
    assert [s["text"] for s in cot["steps"]] == pieces
    assert [s["index"] for s in cot["steps"]] == list(range(1, n_sentences + 1))
    positions = last_token_positions(tiny_model, prompt, pieces)
    assert [s["position"] for s in cot["steps"]] == positions
    for step, pos in zip(cot["steps"], positions):
        assert step["token_span"][1] - 1 == pos
        # the step's prediction is the model's own, with the whole preceding prompt in context
        assert step["target"]["id"] == int(logits[pos].argmax())
        assert step["components"]

    r = cli(tiny_model, "--prompt", prompt, "--cot-debug")
    assert r.code == 0, r.err
    assert f"Chain-of-thought attribution ({n_sentences} steps, split by sentences" in r.out
    for i, piece in enumerate(pieces, 1):
        assert f"Step {i}: {piece}" in r.out


def test_cot_debug_step_markers(cli, tiny_gpt2):
    doc = run_json(cli, tiny_gpt2, "--prompt", "Step 1: add the numbers. Step 2: write the answer.", "--cot-debug")
    assert doc["cot"]["rule"] == "step markers"
    assert [s["text"] for s in doc["cot"]["steps"]] == ["Step 1: add the numbers.", "Step 2: write the answer."]


def _check_png(path: Path) -> bytes:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 1000, path
    return data


def test_logit_debug_report(cli, tiny_model, tmp_path):
    folder = tmp_path / "out" / "report"  # parents do not exist yet
    r = cli(tiny_model, "--prompt", IOI, "--logit-debug", "--report", folder)
    assert r.code == 0, r.err
    assert f"Report written to {folder}" in r.out
    names = {"head_attribution.png", "layer_attribution.png", "hexray.json", "index.html"}
    assert {p.name for p in folder.iterdir()} == names  # and no staging leftovers
    pngs = {name: _check_png(folder / name) for name in names if name.endswith(".png")}

    spec = tiny_model.spec
    report_doc = json.loads((folder / "hexray.json").read_text())
    heads = run_json(cli, tiny_model, "--prompt", IOI, "--granularity", "head")
    by_name = {c["name"]: c["score"] for c in heads["components"]}
    assert len(report_doc["head_scores"]) == spec.n_layers
    for layer, row in enumerate(report_doc["head_scores"]):
        assert len(row) == spec.n_heads
        for head, score in enumerate(row):
            assert score == pytest.approx(by_name[f"L{layer}H{head}"], abs=1e-6)
    assert report_doc["granularity"] == "layer"
    assert_conserves(report_doc)

    html = (folder / "index.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I), "external resource in the report"
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "<link" not in html.lower()
    images = re.findall(r'<img\b[^>]*\bsrc="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == len(pngs)
    assert {base64.b64decode(b) for b in images} == set(pngs.values())


def test_logit_debug_without_report_writes_the_default_folder(cli, tiny_gpt2, tmp_path):
    r = cli(tiny_gpt2, "--prompt", IOI, "--logit-debug")
    assert r.code == 0, r.err
    folder = tmp_path / "hexray-report"
    assert (folder / "head_attribution.png").is_file() and (folder / "index.html").is_file()


def test_json_with_report_lists_the_files(cli, tiny_gpt2, tmp_path):
    doc = run_json(cli, tiny_gpt2, "--prompt", IOI, "--logit-debug", "--report", tmp_path / "r")
    assert sorted(Path(p).name for p in doc["report_files"]) == ["head_attribution.png", "hexray.json", "index.html", "layer_attribution.png"]
    assert all(Path(p).is_file() for p in doc["report_files"])
    assert len(doc["head_scores"]) == tiny_gpt2.spec.n_layers


def _hf_weight_norms(hf_model, kind: str, spec, name: str, layer: int) -> list[float]:
    """Frobenius norms straight from the HF checkpoint: per head for W_Q, whole matrix for MLP weights."""
    dh = spec.d_head
    if kind == "gpt2":
        block = hf_model.transformer.h[layer]
        if name == "W_Q":
            w = block.attn.c_attn.weight[:, : spec.d_model]  # Conv1D: [d_model, 3 * d_model]
            return [float(w[:, h * dh : (h + 1) * dh].norm()) for h in range(spec.n_heads)]
        return [float({"W_in": block.mlp.c_fc.weight, "W_out": block.mlp.c_proj.weight}[name].norm())]
    block = hf_model.model.layers[layer]
    if name == "W_Q":
        w = block.self_attn.q_proj.weight  # [n_heads * d_head, d_model]
        return [float(w[h * dh : (h + 1) * dh].norm()) for h in range(spec.n_heads)]
    return [float({"W_in": block.mlp.up_proj.weight, "W_gate": block.mlp.gate_proj.weight, "W_out": block.mlp.down_proj.weight}[name].norm())]


def test_weight_heatmap(cli, tiny_model_case, tiny_hf_model, tmp_path):
    model, spec = tiny_model_case.model, tiny_model_case.model.spec
    specs = ["attn.L1.W_Q", "mlp.L0.W_in"] + (["mlp.L0.W_gate"] if tiny_model_case.kind == "llama" else [])
    args = [a for s in specs for a in ("--weight-heatmap", s)]
    doc = run_json(cli, model, "--prompt", IOI, *args, "--report", tmp_path / "w")

    views = {w["spec"]: w for w in doc["weights"]}
    assert list(views) == specs
    q = views["attn.L1.W_Q"]
    assert q["per_head"] is True and q["layer"] == 1 and q["weight"] == "W_Q"
    assert q["shape"] == [spec.n_heads, spec.d_model, spec.d_head]
    w_in = views["mlp.L0.W_in"]
    assert w_in["per_head"] is False and w_in["shape"] == [1, spec.d_model, spec.d_mlp]
    for s, view in views.items():
        expected = _hf_weight_norms(tiny_hf_model, tiny_model_case.kind, spec, view["weight"], view["layer"])
        assert view["norms"] == pytest.approx(expected, rel=1e-4), s
        _check_png(tmp_path / "w" / f"weights_{s.replace('.', '_')}.png")
    if "mlp.L0.W_gate" in views:
        assert views["mlp.L0.W_gate"]["norms"] != pytest.approx(w_in["norms"], rel=1e-3)  # gate is not up_proj

    r = cli(model, "--prompt", IOI, *args, "--report", tmp_path / "w2")
    assert r.code == 0, r.err
    assert f"attn.L1.W_Q: per head, (d_model x d_head) = {spec.d_model}x{spec.d_head}" in r.out
    assert f"mlp.L0.W_in: (d_model x d_mlp) = {spec.d_model}x{spec.d_mlp}" in r.out


def test_arithmetic_graph(cli, tiny_model, tmp_path):
    folder = tmp_path / "arith"
    doc = run_json(cli, tiny_model, "--prompt", "2 + 3 =", "--arithmetic-graph", "--report", folder)
    _check_png(folder / "arithmetic_graph.png")
    svg = (folder / "arithmetic_graph.svg").read_text()
    assert "<svg" in svg and "</svg>" in svg

    g = doc["arithmetic"]
    ids = {n["id"] for n in g["nodes"]}
    assert sorted(n["label"] for n in g["nodes"] if n["kind"] == "operand") == ["2", "3"]
    assert [n["label"] for n in g["nodes"] if n["kind"] == "operator"] == ["+", "="]
    answer = [n for n in g["nodes"] if n["kind"] == "answer"]
    assert len(answer) == 1 and g["answer"]["id"] == doc["target"]["id"]
    assert g["edges"] and all(e["source"] in ids and e["target"] in ids for e in g["edges"])
    assert any(e["kind"] == "writes" and e["target"] == "answer" for e in g["edges"])
    assert len(g["answer_rank_by_layer"]) == tiny_model.spec.n_layers + 1
    assert g["answer_rank_by_layer"][-1] == 0  # the answer is the final prediction

    r = cli(tiny_model, "--prompt", "2 + 3 =", "--arithmetic-graph", "--report", tmp_path / "arith2")
    assert r.code == 0, r.err
    assert "Arithmetic graph: answer" in r.out and "operands: 2@0, 3@" in r.out


def test_save_activations_round_trip(cli, tiny_model, tiny_hf_model, tmp_path):
    folder = tmp_path / "acts"
    r = cli(tiny_model, "--prompt", IOI, "--save-activations", folder)
    assert r.code == 0, r.err
    assert {p.name for p in folder.iterdir()} == {"manifest.json", "activations.safetensors"}
    spec = tiny_model.spec
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(spec.n_layers)] + [f"blocks.{spec.n_layers - 1}.hook_resid_post"]
    ids = tiny_model.encode(IOI)

    saved = hexray.load_activations(folder)
    assert saved.model == tiny_model.name
    assert saved.prompt == IOI
    assert list(saved.token_ids) == ids
    assert list(saved.tokens) == [shown_token(tiny_model.tokenizer, i) for i in ids]
    assert list(saved.hooks) == hooks
    assert saved.shapes == {h: (len(ids), spec.d_model) for h in hooks}
    assert set(saved.tensors) == set(hooks)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["hooks"] == hooks and manifest["token_ids"] == ids and manifest["model"] == tiny_model.name

    fresh = run_trace(tiny_model, IOI, hooks)
    for h in hooks:
        assert saved.tensors[h].shape == fresh.acts[h].shape
        torch.testing.assert_close(saved.tensors[h], fresh.acts[h].float(), rtol=0, atol=1e-6)
    # and against plain transformers: hidden_states[l] is the residual stream entering block l
    with torch.no_grad():
        hidden = tiny_hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for layer in range(spec.n_layers):
        torch.testing.assert_close(saved.tensors[f"blocks.{layer}.hook_resid_pre"], hidden[layer][0], rtol=1e-4, atol=1e-5)


def test_save_hooks_globs(cli, tiny_model, tmp_path):
    spec = tiny_model.spec
    folder = tmp_path / "z"
    doc = run_json(cli, tiny_model, "--prompt", IOI, "--save-activations", folder, "--save-hooks", "blocks.*.attn.hook_z")
    hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(spec.n_layers)]
    assert doc["activations"] == {"folder": str(folder), "hooks": hooks}
    saved = hexray.load_activations(folder)
    n = len(tiny_model.encode(IOI))
    assert list(saved.hooks) == hooks
    assert saved.shapes == {h: (n, spec.n_heads, spec.d_head) for h in hooks}
    fresh = run_trace(tiny_model, IOI, hooks)
    for h in hooks:
        torch.testing.assert_close(saved.tensors[h], fresh.acts[h].float(), rtol=0, atol=1e-6)

    # several comma-separated globs, in order, without duplicates
    folder = tmp_path / "multi"
    r = cli(tiny_model, "--prompt", IOI, "--save-activations", folder, "--save-hooks", "blocks.0.hook_resid_pre, blocks.*.mlp.hook_post,blocks.0.hook_resid_pre")
    assert r.code == 0, r.err
    assert list(hexray.load_activations(folder).hooks) == ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.mlp.hook_post" for layer in range(spec.n_layers)]


def test_model_option_and_env_reach_the_loader(cli, monkeypatch, tiny_gpt2):
    asked = []

    placed = []

    def fake_load(name, progress=None, device="cpu", dtype="float32"):
        asked.append(name)
        placed.append((device, dtype))
        return tiny_gpt2

    monkeypatch.setattr(hexray.cli, "load_model", fake_load)
    assert cli(None, "--prompt", "The cat", "--model", "some/model", "-k", "1").code == 0
    monkeypatch.setenv("HEXRAY_MODEL", "from-env")
    assert cli(None, "--prompt", "The cat", "-k", "1").code == 0
    monkeypatch.delenv("HEXRAY_MODEL")
    assert cli(None, "trace", "--prompt", "The cat", "-k", "1").code == 0
    assert asked == ["some/model", "from-env", None]
    assert cli(None, "trace", "--prompt", "The cat", "-k", "1", "--device", "auto", "--dtype", "bfloat16").code == 0
    assert placed == [("cpu", "float32")] * 3 + [("auto", "bfloat16")]


def test_version(cli):
    r = cli(None, "--version")
    assert r.code == 0
    assert r.out.strip() == f"hexray {hexray.__version__}"


def test_hexray_py_help_at_the_repo_root():
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "hexray.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: hexray" in proc.stdout
    assert "trace" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_hexray_py_traces_a_local_model_folder(tiny_gpt2_case):
    """The root shim runs a whole trace (real loading, no monkeypatching) and --json stays clean."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "hexray.py", "--prompt", IOI, "--model", str(tiny_gpt2_case.folder), "-k", "3", "--json"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["model"] == str(tiny_gpt2_case.folder)
    assert doc["token_ids"] == tiny_gpt2_case.model.encode(IOI)
    assert_conserves(doc)


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line on stderr, nothing written
# ---------------------------------------------------------------------------------------------

TOO_LONG = " ".join(SENTENCES * 3)  # > 64 tokens

# (id, arguments, text the message must contain). Every case also gets --report and --save-activations
# folders (unless it names its own), which must not exist afterwards.
BAD_INPUT = [
    ("empty-prompt", ["--prompt", ""], "prompt is empty"),
    ("whitespace-prompt", ["--prompt", "  \n\t  "], "prompt is empty"),
    ("prompt-too-long", ["--prompt", TOO_LONG], "context of 64"),
    ("token-index-past-end", ["--prompt", IOI, "--token-index", "24"], "--token-index 24 is out of range"),
    ("token-index-far", ["--prompt", IOI, "--token-index", "1000"], "--token-index 1000 is out of range"),
    ("token-index-negative", ["--prompt", IOI, "--token-index", "-25"], "--token-index -25 is out of range"),
    ("token-index-very-negative", ["--prompt", IOI, "--token-index", "-1000"], "out of range"),
    ("multi-token-target", ["--prompt", IOI, "--target", MULTI_TOKEN], "is 10 tokens, not one"),
    ("multi-token-contrast", ["--prompt", IOI, "--target", " Mary", "--contrast", MULTI_TOKEN], "--contrast"),
    ("empty-target", ["--prompt", IOI, "--target", ""], "--target is empty"),
    ("malformed-weight", ["--prompt", IOI, "--weight-heatmap", "attn.10.W_Q"], "malformed --weight-heatmap"),
    ("malformed-weight-word", ["--prompt", IOI, "--weight-heatmap", "banana"], "malformed --weight-heatmap"),
    ("unknown-weight", ["--prompt", IOI, "--weight-heatmap", "attn.L0.W_in"], "attn has no W_in"),
    ("weight-layer-out-of-range", ["--prompt", IOI, "--weight-heatmap", "attn.L2.W_Q"], "layer 2 is out of range"),
    ("weight-layer-far-out-of-range", ["--prompt", IOI, "--weight-heatmap", "mlp.L99.W_in"], "layer 99 is out of range"),
    ("w-gate-on-gpt2", ["--prompt", IOI, "--weight-heatmap", "mlp.L0.W_gate"], "has no gate"),
    ("report-under-proc", ["--prompt", IOI, "--report", "/proc/hexray-test/report"], "not writable"),
    ("report-parent-is-a-file", ["--prompt", IOI, "--report", "{tmp}/a-file/report"], "--report"),
    ("report-is-a-file", ["--prompt", IOI, "--report", "{tmp}/a-file"], "is not a folder"),
    ("activations-under-proc", ["--prompt", IOI, "--save-activations", "/proc/hexray-test/acts"], "--save-activations"),
    ("activations-parent-is-a-file", ["--prompt", IOI, "--save-activations", "{tmp}/a-file/acts"], "--save-activations"),
    ("k-zero", ["--prompt", IOI, "-k", "0"], "must be positive"),
    ("k-negative", ["--prompt", IOI, "-k", "-3"], "must be positive"),
    ("k-long-negative", ["--prompt", IOI, "--top-k-attribution", "-3"], "must be positive"),
    ("k-not-a-number", ["--prompt", IOI, "-k", "three"], "valid integer"),
    ("lens-k-zero", ["--prompt", IOI, "--logit-lens", "--lens-k", "0"], "--lens-k must be positive"),
    ("unknown-granularity", ["--prompt", IOI, "--granularity", "block"], "unknown granularity 'block'"),
    ("arithmetic-without-digits", ["--prompt", IOI, "--arithmetic-graph"], "no numbers"),
    ("bad-save-hooks", ["--prompt", IOI, "--save-hooks", "blocks.*.nope"], "matches no hook point"),
    ("unknown-option", ["--prompt", IOI, "--bogus"], "No such option: --bogus"),
    ("missing-prompt", ["--logit-lens"], "--prompt"),
    ("prompt-without-value", ["--prompt"], "--prompt"),
]
REAL_LOADER = [
    ("unknown-hub-model", ["--prompt", IOI, "--model", "no-such-org/nope"], "not available offline"),
    ("missing-model-folder", ["--prompt", IOI, "--model", "./does-not-exist"], "no model folder at ./does-not-exist"),
    ("missing-gguf", ["--prompt", IOI, "--model", "./nope.gguf"], "no GGUF file"),
]




def _bad_run(cli, model, args, tmp_path):
    (tmp_path / "a-file").write_text("keep me")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    # in front, so that a trailing option without its value stays the last argument
    if "--save-activations" not in args:
        args = ["--save-activations", str(tmp_path / "acts"), *args]
    if "--report" not in args:
        args = ["--report", str(tmp_path / "report" / "nested"), *args]
    before = tree(tmp_path)
    r = cli(model, *args)
    assert tree(tmp_path) == before, "a failed run must not write anything"
    assert not Path("/proc/hexray-test").exists()
    return r


@pytest.mark.parametrize(("args", "expected"), [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input(cli, tiny_gpt2, tmp_path, args, expected):
    assert_one_line_error(_bad_run(cli, tiny_gpt2, args, tmp_path), expected)


def test_multi_token_target_lists_the_pieces(cli, tiny_gpt2):
    r = cli(tiny_gpt2, "--prompt", IOI, "--target", MULTI_TOKEN)
    pieces = [tiny_gpt2.token_str(i) for i in tiny_gpt2.tokenizer(MULTI_TOKEN, add_special_tokens=False)["input_ids"]]
    assert len(pieces) > 1
    assert_one_line_error(r, ": " + ", ".join(repr(p) for p in pieces))


def test_w_gate_works_on_llama_but_is_an_error_on_gpt2(cli, tiny_llama, tiny_gpt2, tmp_path):
    assert cli(tiny_llama, "--prompt", IOI, "--weight-heatmap", "mlp.L0.W_gate", "--report", tmp_path / "ok").code == 0
    assert_one_line_error(cli(tiny_gpt2, "--prompt", IOI, "--weight-heatmap", "mlp.L0.W_gate", "--report", tmp_path / "no"), "has no gate")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize(("args", "expected"), [case[1:] for case in REAL_LOADER], ids=[case[0] for case in REAL_LOADER])
def test_bad_model(cli, monkeypatch, tmp_path, args, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hexray.cli.load_model is hexray.models.loading.load_model  # the real loader
    assert_one_line_error(_bad_run(cli, None, args, tmp_path), expected)


def test_unfired_save_hook_writes_nothing(cli, tiny_llama, tmp_path):
    # Llama has rotary embeddings: hook_pos_embed exists in hook_dict but never fires.
    r = _bad_run(cli, tiny_llama, ["--prompt", IOI, "--logit-debug", "--save-hooks", "hook_pos_embed"], tmp_path)
    assert_one_line_error(r, "did not fire")


def test_lens_k_above_the_vocabulary_lists_the_whole_vocabulary(cli, tiny_gpt2):
    r = cli(tiny_gpt2, "--prompt", IOI, "--logit-lens", "--lens-k", "100000", "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)["logit_lens"]["layers"]
    assert all(len(row["top"]) == tiny_gpt2.spec.d_vocab for row in rows)


def test_save_hooks_without_save_activations_is_an_error(cli, tiny_gpt2, tmp_path):
    before = tree(tmp_path)
    r = cli(tiny_gpt2, "--prompt", IOI, "--save-hooks", "blocks.*.attn.hook_z")
    assert_one_line_error(r, "--save-activations")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", ["out[x]", "out[/]"])
def test_folder_names_with_brackets_are_reported_verbatim(cli, tiny_gpt2, tmp_path, name):
    r = cli(tiny_gpt2, "--prompt", IOI, "--logit-debug", "--report", name, "--save-activations", name + "-acts")
    assert r.code == 0, r.err
    assert f"Report written to {name}/" in r.out
    assert f"to {name}-acts/" in r.out
    assert (tmp_path / name / "index.html").is_file()
