"""``hexray index build|search|info`` and ``hexray neuron|head|feature`` in-process on a tiny model.

The pages' numbers are checked against the library (tests/unit/test_neuroscope.py checks the
library against brute force); here: what the commands print, their JSON, and their mistakes.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import CORPUS
from tests.helpers import assert_one_line_error


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(CORPUS * 3), encoding="utf-8")
    return path


def run_json(cli, model, *args) -> dict:
    r = cli(model, *args, "--json")
    assert r.code == 0, r.err
    assert r.out.count("\n") == 1
    return json.loads(r.out)


def test_build_then_pages_search_and_info(cli, tiny_llama, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "cache"))
    built = run_json(cli, tiny_llama, "index", "build", "--corpus", corpus, "--tokens", "400", "--context-size", "16", "--top-k", "5")
    assert built["units"]["neuron"] == tiny_llama.spec.n_layers * tiny_llama.spec.d_mlp
    assert built["units"]["head"] == tiny_llama.spec.n_layers * tiny_llama.spec.n_heads
    assert 0 < built["tokens"] <= 400 and built["index"].endswith(".duckdb")

    page = run_json(cli, tiny_llama, "neuron", "L1N3")
    assert page["name"] == "L1N3" and page["unit"]["kind"] == "neuron" and 1 <= len(page["top"]) <= 5
    acts = [e["activation"] for e in page["top"]]
    assert acts == sorted(acts, reverse=True) and acts[0] == pytest.approx(page["max"], abs=1e-5)
    first = page["top"][0]
    assert first["token"] == first["tokens"][first["position"] - first["window_start"]]
    assert len(first["context_ids"]) == first["position"] + 1
    head = run_json(cli, tiny_llama, "head", "L0H1")
    assert head["name"] == "L0H1" and head["promoted"] == []

    shown = cli(tiny_llama, "neuron", "L1N3", "-n", "3")
    assert shown.code == 0 and "Top 3 of" in shown.out and "max" in shown.out

    found = run_json(cli, tiny_llama, "index", "search", "--prompt", "The capital of France is Paris.", "--position", "-2", "--limit", "5")
    assert len(found["hits"]) == 5 and found["search"]["token"]
    scores = [h["score"] for h in found["hits"]]
    assert scores == sorted(scores, reverse=True)
    info = run_json(cli, tiny_llama, "index", "info")
    assert info["tokens"] == built["tokens"] and info["top_k"] == 5


def test_mistakes_are_one_line(cli, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "cache"))
    assert_one_line_error(cli(tiny_llama, "neuron", "L1N3"), "")  # no index yet
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli(tiny_llama, "index", "build", "--corpus", empty), "")
    assert not (tmp_path / "cache" / "neuroscope").exists() or not any((tmp_path / "cache" / "neuroscope").glob("*.duckdb"))
    assert_one_line_error(cli(tiny_llama, "index", "search"), "--prompt")
    assert_one_line_error(cli(tiny_llama, "index", "build", "--tokens", "0"), "--tokens")
    bad = tmp_path / "bad.duckdb"
    bad.write_text("not a database")
    assert_one_line_error(cli(tiny_llama, "neuron", "L1N3", "--index", bad), "")
