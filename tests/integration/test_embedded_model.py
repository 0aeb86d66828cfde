"""End to end on the real embedded SmolLM2-135M-Instruct (converted from its GGUF into $HEXRAY_CACHE once).

The model is loaded once for the module; CLI runs are in-process with ``hexray.cli.load_model``
monkeypatched to return it, except one real subprocess run of the installed console script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hexray
import hexray.cli
from hexray.models.loading import cache_root

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
IOI = "When Mary and John went to the store, John gave a drink to"
ARITHMETIC = "Q: What is 3 + 4? A: 3 + 4 = "
STEPS = "Mary went to the market. She bought three apples. Then she walked home."


def hf_last_logits(smol, prompt: str) -> torch.Tensor:
    ids = torch.tensor([smol.encode(prompt)])
    with torch.no_grad():
        return smol.bridge.original_model(ids).logits[0, -1].float()


def assert_conserves(doc: dict) -> None:
    scores = [c["score"] for c in doc["components"]]
    assert [abs(s) for s in scores] == sorted((abs(s) for s in scores), reverse=True)
    assert abs(sum(scores) - doc["value"]) <= 1e-3 * abs(doc["value"])


def test_ioi_head_attribution(cli_json, smol):
    doc = cli_json("--prompt", IOI, "--granularity", "head")
    assert doc["target"]["token"] == " Mary"
    spec = smol.spec
    heads = [c["score"] for c in doc["components"] if c["kind"] == "head"]
    assert len(heads) == spec.n_layers * spec.n_heads
    assert len(set(heads)) > 0.9 * len(heads), "per-head scores should differ from head to head"
    assert max(heads) - min(heads) > 0.1
    assert_conserves(doc)
    logits = hf_last_logits(smol, IOI)
    assert doc["value"] == pytest.approx(float(logits[smol.single_token(" Mary")]), abs=1e-3)


@pytest.mark.parametrize("granularity", ["layer", "neuron"])
def test_ioi_conservation(cli_json, smol, granularity):
    doc = cli_json("--prompt", IOI, "--granularity", granularity)
    spec = smol.spec
    assert doc["target"]["token"] == " Mary"
    expected = 2 + spec.n_layers * (2 if granularity == "layer" else spec.n_heads + spec.d_mlp)
    assert len(doc["components"]) == expected
    assert_conserves(doc)


def test_ioi_contrast_matches_a_plain_forward_pass(cli_json, smol):
    doc = cli_json("--prompt", IOI, "--target", " Mary", "--contrast", " John", "--granularity", "head")
    logits = hf_last_logits(smol, IOI)
    mary, john = smol.single_token(" Mary"), smol.single_token(" John")
    expected = float(logits[mary] - logits[john])
    assert expected > 1  # the model prefers the indirect object
    assert doc["value"] == pytest.approx(expected, rel=1e-3)
    assert doc["contrast"]["token"] == " John"
    assert_conserves(doc)


def test_capital_of_france_and_the_logit_lens(cli_json, smol):
    doc = cli_json("--prompt", "The capital of France is", "--logit-lens")
    assert doc["target"]["token"] == " Paris"
    assert int(hf_last_logits(smol, "The capital of France is").argmax()) == doc["target"]["id"]
    rows = doc["logit_lens"]["layers"]
    assert len(rows) == smol.spec.n_layers + 1
    assert rows[-1]["top"][0]["token"] == " Paris"
    assert rows[-1]["target_rank"] == 0
    assert rows[0]["target_rank"] > 0  # the embeddings alone do not predict it


def test_cot_steps_come_from_one_forward_pass(smol, monkeypatch):
    calls = []
    real = smol.bridge.run_with_cache

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(smol.bridge, "run_with_cache", counting)
    report = hexray.analyze(smol, STEPS, hexray.AnalysisOptions(cot=True))
    assert len(calls) == 1
    steps = report.steps.steps
    assert report.steps.rule == "sentences"
    assert [s.text for s in steps] == ["Mary went to the market.", "She bought three apples.", "Then she walked home."]
    trace = report.trace
    for step in steps:
        pos = step.attribution.position
        assert pos == step.token_span[1] - 1
        assert trace.tokens[pos] == "."  # each sentence's last token
        assert step.attribution.target.id == int(trace.logits[pos].argmax())
        assert step.attribution.reconstruction_error < 1e-3 * abs(step.attribution.value)
    assert steps[-1].attribution.position == trace.n_tokens - 1


def test_arithmetic_graph(cli_json, tmp_path):
    doc = cli_json("--prompt", ARITHMETIC, "--arithmetic-graph", "--report", tmp_path / "arith")
    assert doc["target"]["token"].strip() == "7"
    g = doc["arithmetic"]
    operands = [n["label"] for n in g["nodes"] if n["kind"] == "operand"]
    assert {"3", "4"} <= set(operands)
    ids = {n["id"] for n in g["nodes"]}
    assert g["edges"] and all(e["source"] in ids and e["target"] in ids for e in g["edges"])
    assert any(e["kind"] == "attends" for e in g["edges"]) and any(e["kind"] == "writes" for e in g["edges"])
    assert (tmp_path / "arith" / "arithmetic_graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "arith" / "arithmetic_graph.svg").read_text()


def test_console_script_end_to_end(smol, tmp_path):
    script = REPO / ".venv" / "bin" / "hexray"
    if not script.exists():
        script = Path(shutil.which("hexray") or Path(sys.executable).parent / "hexray")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # HEXRAY_CACHE (already filled by `smol`) is inherited
    proc = subprocess.run(
        [str(script), "--prompt", IOI, "--top-k-attribution", "5", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["model"] == smol.name
    assert doc["target"]["token"] == " Mary"
    assert_conserves(doc)


def test_second_load_uses_the_safetensors_cache(smol, monkeypatch):
    models = cache_root() / "models"
    folders = [p for p in models.glob("SmolLM2-135M-Instruct*") if (p / "hexray-source.json").is_file()]
    assert len(folders) == 1
    folder = folders[0]
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / "hexray-source.json").read_text())["gguf"].endswith(".gguf")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained
    loads = []

    def spy(*args, **kwargs):
        loads.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    messages = []
    again = hexray.load_model(progress=messages.append)
    assert len(loads) == 1, "the second load must read the cache only, not the GGUF"
    args, kwargs = loads[0]
    assert Path(args[0]) == folder and "gguf_file" not in kwargs
    assert not any("Dequantizing" in m for m in messages)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.spec == smol.spec
    torch.testing.assert_close(hf_last_logits(again, IOI), hf_last_logits(smol, IOI))
