"""``hexray index build|search|info`` and ``hexray neuron|head|feature`` in-process on a tiny model.

The pages' numbers are checked against the library (tests/unit/test_neuroscope.py checks the
library against brute force); here: what the commands print, their JSON, and their mistakes.
"""

from __future__ import annotations

import json
import re

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


def test_a_unit_page_as_one_self_contained_html_file(cli, tiny_llama, corpus, tmp_path, monkeypatch):
    """``--html FILE``: the page's examples (their tokens and activations), samples, histogram and effects; nothing fetched, no script."""
    from html import escape

    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "cache"))
    run_json(cli, tiny_llama, "index", "build", "--corpus", corpus, "--tokens", "300", "--context-size", "16", "--top-k", "4")
    page = run_json(cli, tiny_llama, "neuron", "L1N3")
    out = tmp_path / "pages" / "l1n3.html"
    assert_one_line_error(cli("no-load", "neuron", "L1N3", "--html", out), "--html")  # no such folder: said before the model loads
    out.parent.mkdir()
    shown = cli(tiny_llama, "neuron", "L1N3", "--html", out)
    assert shown.code == 0, shown.err
    assert "Top" in shown.out and str(out) in shown.out.replace("\n", "")
    html = out.read_text(encoding="utf-8")
    assert html.startswith("<!doctype html>") and "<h1>L1N3</h1>" in html
    contexts = [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r'<td class="ctx">(.*?)</td>', html)]  # each example's window, as text
    assert contexts == [escape("".join(e["tokens"]).replace("\n", "⏎")) for e in page["top"] + page["samples"]]
    assert all(f"<td>{e['activation']:.3f}</td>" in html for e in page["top"])
    marked = re.findall(r'<span class="here"[^>]*>([^<]*)</span>', html)  # each example's own token, in order
    assert marked == [escape(e["token"].replace("\n", "⏎")) for e in page["top"] + page["samples"]]
    assert "<svg" in html and html.count("<rect") == len(page["histogram"])
    assert all(escape(x["token"]) in html for x in page["promoted"][:3])
    lowered = html.lower()
    assert "<script" not in lowered and "<link" not in lowered and "src=" not in lowered and "href=" not in lowered
    assert "http://" not in lowered and "https://" not in lowered and "url(" not in lowered and "@import" not in lowered
    assert [p.name for p in out.parent.iterdir()] == ["l1n3.html"]  # written beside itself and moved in: no partial file left

    head_page = tmp_path / "head.html"
    doc = run_json(cli, tiny_llama, "head", "L0H1", "--html", head_page)
    assert doc["html_file"] == str(head_page) and "<h1>L0H1</h1>" in head_page.read_text(encoding="utf-8")
    assert_one_line_error(cli("no-load", "head", "L0H1", "--html", tmp_path), "--html")  # a folder, not a file
