"""The API on a tiny model: each endpoint answers the CLI's JSON document; bad requests answer 422."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from hexray.analysis.report import AnalysisOptions, analyze
from hexray.render.jsondoc import report_document
from hexray.server.app import create_app

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(scope="module")
def client(tiny_llama):
    with TestClient(create_app(tiny_llama)) as c:
        yield c


def _one_token(model, candidates=(" Mary", " John", " the", " a", " to")):
    return [t for t in candidates if len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) == 1]


def test_health(client, tiny_llama):
    r = client.get("/api/health")
    assert r.status_code == 200
    body = r.json()
    assert body["ok"] is True and body["model"] == tiny_llama.name
    assert body["model_info"]["n_layers"] == tiny_llama.spec.n_layers


def test_openapi_lists_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/health", "/api/analyze", "/api/patch", "/api/ablate", "/api/heads", "/api/generate"} <= set(paths)


def test_analyze_is_the_cli_document(client, tiny_llama):
    """The same document `hexray --prompt ... --json` prints (same options), to the last digit."""
    r = client.post("/api/analyze", json={"prompt": CLEAN, "granularity": "head", "top_k": 5})
    assert r.status_code == 200, r.text
    expected = report_document(analyze(tiny_llama, CLEAN, AnalysisOptions(granularity="head", top_k=5, logit_lens=True, residual=True)))
    assert r.json() == json.loads(json.dumps(expected))
    total = sum(c["score"] for c in r.json()["components"])
    assert total == pytest.approx(r.json()["value"], abs=1e-3)


def test_patch_ablate_heads_generate(client, tiny_llama):
    tokens = _one_token(tiny_llama)
    target, contrast = tokens[0], tokens[1]
    r = client.post("/api/patch", json={"clean": CLEAN, "corrupt": CORRUPT, "target": target, "contrast": contrast, "sweep": "heads"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["metric"] == "logit_diff" and len(doc["results"]) == tiny_llama.spec.n_layers * tiny_llama.spec.n_heads

    r = client.post("/api/ablate", json={"prompt": CLEAN, "components": "L0H1,MLP1"})
    assert r.status_code == 200, r.text
    assert r.json()["kl"] >= 0 and r.json()["after"]["top"]

    r = client.post("/api/heads", json={"prompt": "The cat sat on the mat. The cat sat."})
    assert r.status_code == 200, r.text
    assert len(r.json()["heads"]) == tiny_llama.spec.n_layers * tiny_llama.spec.n_heads

    r = client.post("/api/generate", json={"prompt": "The cat", "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["done"] is True and [t["id"] for t in r.json()["tokens"]] == r.json()["generated_ids"]


def test_websocket_streams_tokens_then_done(client):
    with client.websocket_connect("/ws/generate") as ws:
        ws.send_text(json.dumps({"prompt": "The cat", "max_new_tokens": 3}))
        messages = [ws.receive_json() for _ in range(4)]
    assert [m["type"] for m in messages] == ["token", "token", "token", "done"]
    assert messages[-1]["generated_ids"] == [m["id"] for m in messages[:3]]


@pytest.mark.parametrize(
    "path, body, needle",
    [
        ("/api/analyze", {"prompt": ""}, "prompt"),
        ("/api/analyze", {"prompt": CLEAN, "granularity": "atoms"}, "granularity"),
        ("/api/analyze", {"prompt": CLEAN, "token_index": 999}, "--token-index 999"),
        ("/api/analyze", {"prompt": CLEAN, "target": " Eiffelzzq"}, "not one"),
        ("/api/analyze", {"prompt": CLEAN, "top_k": 0}, "top_k"),
        ("/api/analyze", {"prompt": CLEAN, "bogus": 1}, "bogus"),
        ("/api/patch", {"clean": CLEAN, "corrupt": "When John went to the store, Mary gave a drink to"}, "equal lengths"),
        ("/api/patch", {"clean": CLEAN, "corrupt": CORRUPT, "sweep": "atoms"}, "unknown sweep"),
        ("/api/ablate", {"prompt": CLEAN, "components": "L99H0"}, "out of range"),
        ("/api/ablate", {"prompt": CLEAN, "components": "L0H1", "mode": "resample", "reference": []}, "empty"),
        ("/api/heads", {"threshold": 2}, "threshold"),
        ("/api/generate", {"prompt": "The cat", "max_new_tokens": 0}, "max_new_tokens"),
        ("/api/generate", {"prompt": "The cat", "watch": "L99N0"}, "out of range"),
    ],
)
def test_bad_requests_answer_422_with_a_message(client, path, body, needle):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    doc = r.json()
    assert doc["ok"] is False and needle in doc["error"] + " " + str(doc.get("hint"))


def test_websocket_bad_request_is_an_error_message(client):
    with client.websocket_connect("/ws/generate") as ws:
        ws.send_text(json.dumps({"prompt": "The cat", "max_new_tokens": 0}))
        message = ws.receive_json()
    assert message["type"] == "error" and message["status"] == 422


def test_token_text_comes_back_as_data(client):
    """A prompt with markup is echoed as plain JSON strings (the page must insert it as text)."""
    r = client.post("/api/analyze", json={"prompt": "<img src=x onerror=alert(1)> hi", "top_k": 3})
    assert r.status_code == 200
    assert "".join(r.json()["tokens"]).startswith("<img")


def test_index_page_and_no_cdn_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and "/api/analyze" in page.text
    assert "cdn" not in page.text.lower()
    assert client.get("/docs").status_code == 404  # swagger UI would pull scripts from a CDN


def test_serve_rejects_a_bad_port_before_loading(cli):
    r = cli("no-load", "serve", "--port", "70000")
    assert r.code == 2 and r.out == "" and r.err.count("\n") == 1 and "--port 70000" in r.err
