"""The API on a tiny model: each endpoint answers the CLI's JSON document; bad requests answer 422;
the WebSockets stream the same documents; the lab page is served offline; prompts are bounded by
``max_tokens``, requests by ``time_limit``, and a closed socket or a timed-out request frees the model."""

from __future__ import annotations

import json
from pathlib import Path
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import hexray.render.jsondoc as jsondoc_module
import hexray.server.app as app_module
from hexray.analysis.heads import classify_heads
from hexray.analysis.report import AnalysisOptions, analyze
from hexray.render.jsondoc import report_document
from hexray.server.app import STATIC, Job, create_app

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
REPEATS = "The cat sat on the mat. The cat sat."  # repeated tokens: every prompt role has rows to score
ROLES = {"induction", "duplicate_token", "previous_token", "bos"}


@pytest.fixture(scope="module")
def client(tiny_llama):
    # a time limit well above any request here, so a socket that never finishes still ends the test
    with TestClient(create_app(tiny_llama, time_limit=60), base_url="http://127.0.0.1") as c:
        yield c


def _stream(ws, request, limit: int = 1000) -> list[dict]:
    """Send one request over ``ws`` and read its messages up to the ``done`` or ``error``."""
    ws.send_text(request if isinstance(request, str) else json.dumps(request))
    messages = []
    for _ in range(limit):
        messages.append(ws.receive_json())
        if messages[-1]["type"] in ("done", "error"):
            return messages
    raise AssertionError(f"no done/error in {limit} messages: {[m['type'] for m in messages]}")


def _health_until(client, predicate, tries: int = 500) -> dict:
    """Poll /api/health (a bounded number of times) until ``predicate(body)``; the last body."""
    for _ in range(tries):
        body = client.get("/api/health").json()
        if predicate(body):
            return body
        time.sleep(0.01)
    return body


def _without_type(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "type"}


def _one_token(model, candidates=(" Mary", " John", " the", " a", " to")):
    return [t for t in candidates if len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) == 1]


def test_health(client, tiny_llama):
    r = client.get("/api/health")
    assert r.status_code == 200
    body = r.json()
    assert body["ok"] is True and body["model"] == tiny_llama.name
    assert body["model_info"]["n_layers"] == tiny_llama.spec.n_layers
    assert body["busy"] is False and body["queued"] == 0 and isinstance(body["queued"], int)
    assert body["max_tokens"] == 1024 and body["time_limit"] == 60


def test_health_defaults(tiny_llama):
    body = TestClient(create_app(tiny_llama), base_url="http://127.0.0.1").get("/api/health").json()
    assert (body["max_tokens"], body["time_limit"], body["busy"], body["queued"]) == (1024, 300, False, 0)


def test_openapi_lists_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/health", "/api/analyze", "/api/attention", "/api/patch", "/api/ablate", "/api/heads", "/api/generate"} <= set(paths)


def test_analyze_is_the_cli_document(client, tiny_llama):
    """The same document `hexray --prompt ... --json` prints (same options), to the last digit."""
    r = client.post("/api/analyze", json={"prompt": CLEAN, "granularity": "head", "top_k": 5})
    assert r.status_code == 200, r.text
    # the API's head_scores (on by default) is the CLI's --logit-debug
    options = AnalysisOptions(granularity="head", top_k=5, logit_lens=True, residual=True, logit_debug=True)
    expected = report_document(analyze(tiny_llama, CLEAN, options))
    assert r.json() == json.loads(json.dumps(expected))
    assert len(r.json()["head_scores"]) == tiny_llama.spec.n_layers
    total = sum(c["score"] for c in r.json()["components"])
    assert total == pytest.approx(r.json()["value"], abs=1e-3)
    attn, mlp = r.json()["layer_totals"]["attn"], r.json()["layer_totals"]["mlp"]
    assert sum(attn) + sum(mlp) == pytest.approx(sum(c["score"] for c in r.json()["components"] if c["kind"] in ("head", "mlp")), abs=1e-4)

    r = client.post("/api/analyze", json={"prompt": CLEAN, "granularity": "layer", "head_scores": False, "predictions_k": 2})
    assert r.status_code == 200, r.text
    options = AnalysisOptions(granularity="layer", logit_lens=True, residual=True, predictions_k=2)
    assert r.json() == json.loads(json.dumps(report_document(analyze(tiny_llama, CLEAN, options))))
    assert "head_scores" not in r.json() and len(r.json()["predictions"]) == len(r.json()["tokens"])


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
    with client.websocket_connect("ws://127.0.0.1/ws/generate") as ws:
        ws.send_text(json.dumps({"prompt": "The cat", "max_new_tokens": 3}))
        messages = [ws.receive_json() for _ in range(4)]
    assert [m["type"] for m in messages] == ["token", "token", "token", "done"]
    assert messages[-1]["generated_ids"] == [m["id"] for m in messages[:3]]


@pytest.mark.parametrize(
    "path, body, needle",
    [
        ("/api/analyze", {"prompt": ""}, "prompt"),
        ("/api/analyze", {"prompt": CLEAN, "granularity": "atoms"}, "granularity"),
        ("/api/analyze", {"prompt": CLEAN, "token_index": 999}, "token_index 999"),
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
        ("/api/attention", {"prompt": CLEAN, "layer": 99, "head": 0}, "layer 99"),
        ("/api/attention", {"prompt": CLEAN, "layer": 0, "head": 99}, "head 99"),
        ("/api/attention", {"prompt": CLEAN, "layer": -1, "head": 0}, "layer"),
        ("/api/attention", {"prompt": CLEAN, "layer": 0}, "head"),
        ("/api/attention", {"prompt": "", "layer": 0, "head": 0}, "prompt"),
        ("/api/attention", {"prompt": "   ", "layer": 0, "head": 0}, "empty"),
        ("/api/attention", {"prompt": CLEAN, "layer": 0, "head": 0, "seq_len": 40}, "seq_len"),
    ],
)
def test_bad_requests_answer_422_with_a_message(client, path, body, needle):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    doc = r.json()
    assert doc["ok"] is False and needle in doc["error"] + " " + str(doc.get("hint"))


def test_websocket_bad_request_is_an_error_message(client):
    with client.websocket_connect("ws://127.0.0.1/ws/generate") as ws:
        ws.send_text(json.dumps({"prompt": "The cat", "max_new_tokens": 0}))
        message = ws.receive_json()
    assert message["type"] == "error" and message["status"] == 422


def test_token_text_comes_back_as_data(client):
    """A prompt with markup is echoed as plain JSON strings (the page must insert it as text)."""
    r = client.post("/api/analyze", json={"prompt": "<img src=x onerror=alert(1)> hi", "top_k": 3})
    assert r.status_code == 200
    assert "".join(r.json()["tokens"]).startswith("<img")


def _scripts() -> dict[str, str]:
    """Every page module, by its path under /static/ (``js/main.js``, ``js/panels/dla.js`` ...)."""
    return {f.relative_to(STATIC).as_posix(): f.read_text(encoding="utf-8") for f in sorted(STATIC.rglob("*.js"))}


def test_lab_page_and_its_assets_are_served_offline(client):
    """``/`` is the lab (one ES module, /static/js/main.js, importing the rest); every asset is local; no CDN-backed /docs."""
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == (STATIC / "index.html").read_text(encoding="utf-8")
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", page.text)
    assert "/static/js/main.js" in refs and "/static/lab.css" in refs and "/static/favicon.svg" in refs
    assert re.search(r"""<script\b[^>]*\btype=["']module["'][^>]*\bsrc=["']/static/js/main\.js["']""", page.text)
    for ref in refs:  # relative or same-origin: no scheme (http:, data:, javascript: ...) and no //host
        assert not re.match(r"^([a-z][a-z0-9+.-]*:|//)", ref, re.IGNORECASE), ref
        if ref.startswith("/static/"):
            assert client.get(ref).status_code == 200, ref
    scripts = _scripts()
    assert {"js/main.js", "js/api.js", "js/store.js", "js/draw.js", "js/panels/index.js"} <= set(scripts)
    for path, text in scripts.items():  # every import is a relative module that is served
        for target in re.findall(r"""^import [^;]*? from ["']([^"']+)["'];""", text, re.M):
            assert target.startswith("./") or target.startswith("../"), (path, target)
            resolved = (Path("/static") / path).parent.joinpath(target).resolve().as_posix()
            r = client.get(resolved)
            assert r.status_code == 200 and "javascript" in r.headers["content-type"], (path, target, resolved)
    for name, kind in [("js/main.js", "javascript"), ("lab.css", "text/css"), ("favicon.svg", "image/svg+xml")]:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"], (name, r.headers["content-type"])
        assert r.content == (STATIC / name).read_bytes()
    assert client.get("/static/nothing-here.js").status_code == 404
    assert client.get("/docs").status_code == 404  # swagger UI would pull scripts from a CDN
    assert client.get("/redoc").status_code == 404


def test_no_static_asset_references_an_external_url():
    files = [f for f in STATIC.rglob("*") if f.is_file()]
    assert {"index.html", "main.js", "lab.css", "favicon.svg"} <= {f.name for f in files}
    for f in files:
        text = f.read_text(encoding="utf-8")
        if f.name.endswith(".svg"):  # an XML namespace is a name, never fetched
            text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        lowered = text.lower()
        assert "http://" not in lowered and "https://" not in lowered and "//cdn" not in lowered, f.name
        assert "@import" not in lowered and "url(http" not in lowered, f.name


def test_the_page_script_only_calls_endpoints_that_exist(client):
    """Every /api/... and /ws/... path a page module names is a route of the app."""
    called = {path for text in _scripts().values() for path in re.findall(r"""["'`](/(?:api|ws)/[a-z_]+)""", text)}
    assert {"/ws/analyze", "/ws/patch", "/ws/generate", "/ws/attention", "/ws/flow", "/ws/circuit", "/api/health", "/api/presets"} <= called
    routes = {route.path for route in client.app.routes}
    assert called <= routes, called - routes


def test_the_lab_has_a_panel_for_every_registered_analysis():
    """The page's panel registry mirrors the server's: each analysis's ``lab_panel`` is a panel module's id."""
    from hexray.analysis.registry import analyses

    scripts = _scripts()
    listed = re.findall(r"""^import (\w+) from "\./(\w+)\.js";""", scripts["js/panels/index.js"], re.M)
    order = re.search(r"PANELS = \[([^\]]*)\]", scripts["js/panels/index.js"]).group(1).replace(" ", "").split(",")
    assert sorted(order) == sorted(name for name, _ in listed)  # every imported panel is registered
    ids = {re.search(r"""\bid: "([a-z]+)",""", scripts[f"js/panels/{module}.js"]).group(1) + "-panel" for _, module in listed}
    assert {a.lab_panel for a in analyses()} <= ids


def test_api_page_lists_the_endpoints(client, tiny_llama):
    r = client.get("/api")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for path in ("/api/health", "/api/analyze", "/api/attention", "/api/patch", "/api/generate", "/ws/analyze", "/ws/patch", "/ws/generate"):
        assert path in r.text, path
    assert "cdn" not in r.text.lower()


# ---------------------------------------------------------------------------------------------
# /api/attention
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classified(tiny_llama):
    return classify_heads(tiny_llama, REPEATS)  # the request's defaults: seq_len 25, 4 sequences, seed 0


def _bridge_pattern(model, prompt: str, layer: int, head: int) -> np.ndarray:
    ids = model.encode(prompt)
    name = f"blocks.{layer}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n == name)
    return cache[name][0, head].float().numpy()


@pytest.mark.parametrize("layer, head", [(0, 1), (1, 3)])
def test_attention_is_the_bridge_pattern_and_the_heads_role_scores(client, tiny_llama, classified, layer, head):
    spec = tiny_llama.spec
    assert layer < spec.n_layers and head < spec.n_heads
    r = client.post("/api/attention", json={"prompt": REPEATS, "layer": layer, "head": head})
    assert r.status_code == 200, r.text
    doc = r.json()
    ids = tiny_llama.encode(REPEATS)
    assert (doc["model"], doc["prompt"], doc["layer"], doc["head"], doc["name"]) == (tiny_llama.name, REPEATS, layer, head, f"L{layer}H{head}")
    assert doc["tokens"] == list(tiny_llama.token_strs(ids))
    pattern = np.array(doc["pattern"], dtype=float)
    assert pattern.shape == (len(ids), len(ids))
    expected = _bridge_pattern(tiny_llama, REPEATS, layer, head)
    np.testing.assert_allclose(pattern, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(pattern.sum(axis=1), 1.0, atol=len(ids) * 5e-5 + 1e-6)
    assert not np.triu(pattern, k=1).any()  # causal: nothing above the diagonal
    assert set(doc["scores"]) == ROLES
    for role in ROLES:
        want = float(classified.scores[role][layer, head])
        assert np.isfinite(want) and doc["scores"][role] == pytest.approx(want, abs=1e-5), role


def test_attention_passes_the_induction_options_through(client, tiny_llama):
    r = client.post("/api/attention", json={"prompt": REPEATS, "layer": 1, "head": 0, "seq_len": 10, "sequences": 2, "seed": 3})
    assert r.status_code == 200, r.text
    theirs = classify_heads(tiny_llama, REPEATS, seq_len=10, n_sequences=2, seed=3).scores["induction"][1, 0]
    default = classify_heads(tiny_llama, REPEATS).scores["induction"][1, 0]
    assert r.json()["scores"]["induction"] == pytest.approx(float(theirs), abs=1e-5)
    assert abs(float(theirs) - float(default)) > 1e-5  # the options change the answer: a real check


def test_attention_on_a_prompt_without_repeats_gives_null_scores(client):
    """A role the prompt has no rows for is null (strict JSON), not NaN."""
    r = client.post("/api/attention", json={"prompt": "hi", "layer": 0, "head": 0})
    assert r.status_code == 200, r.text
    assert r.json()["scores"]["duplicate_token"] is None
    assert isinstance(r.json()["scores"]["induction"], float)
    assert len(r.json()["pattern"]) == len(r.json()["tokens"])


def test_attention_tokens_come_back_as_data(client):
    prompt = "<script>alert(1)</script>"
    r = client.post("/api/attention", json={"prompt": prompt, "layer": 0, "head": 0})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json()["prompt"] == prompt
    assert "".join(r.json()["tokens"]) == prompt


# ---------------------------------------------------------------------------------------------
# WebSockets: /ws/analyze and /ws/patch stream, then end with the POST document
# ---------------------------------------------------------------------------------------------


def test_ws_analyze_streams_layers_then_the_post_document(client, tiny_llama):
    spec = tiny_llama.spec
    request = {"prompt": CLEAN, "granularity": "head", "predictions_k": 3}
    with client.websocket_connect("ws://127.0.0.1/ws/analyze") as ws:
        messages = _stream(ws, request)
    assert [m["type"] for m in messages] == ["layer"] * spec.n_layers + ["attribution"] * spec.n_layers + ["done"]
    done = _without_type(messages[-1])
    r = client.post("/api/analyze", json=request)
    assert r.status_code == 200, r.text
    assert done == r.json()
    n_tokens = len(done["tokens"])
    live, rows = messages[: spec.n_layers], messages[spec.n_layers : -1]
    for layer, m in enumerate(live):  # read during the pass: they agree with the finished analysis
        assert m["layer"] == layer and m["n_layers"] == spec.n_layers and m["position"] == n_tokens - 1
        assert [t["id"] for t in m["lens"]] == [t["id"] for t in done["logit_lens"]["layers"][layer + 1]["top"]]  # row 0 is the embeddings
        assert m["target_rank"] is None  # the default target is known only after the last layer
        assert len(m["resid_norm"]) == n_tokens and m["resid_norm"] == done["residual"]["resid_norm"][layer + 1]
        assert m["attn_norm"] == done["residual"]["attn_delta_norm"][layer] and m["mlp_norm"] == done["residual"]["mlp_delta_norm"][layer]
    for layer, m in enumerate(rows):
        assert m["layer"] == layer and len(m["heads"]) == spec.n_heads and m["heads"] == done["head_scores"][layer]
        assert m["attn"] == done["layer_totals"]["attn"][layer] and m["mlp"] == done["layer_totals"]["mlp"][layer]
    predictions = done["predictions"]
    assert len(predictions) == n_tokens
    for row in predictions:
        assert len(row) == 3 and all(set(t) == {"token", "id", "logit", "prob"} for t in row)
        probs = [t["prob"] for t in row]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert predictions[-1][0]["token"] == done["target"]["token"]  # no target given: the prediction


@pytest.mark.parametrize(
    "path, request_, needle",
    [
        ("/ws/analyze", {"prompt": CLEAN, "token_index": 999}, "token_index 999"),  # found while working
        ("/ws/analyze", {"prompt": CLEAN, "granularity": "atoms"}, "granularity"),  # found reading the request
        ("/ws/analyze", "not json", ""),
        ("/ws/patch", {"clean": CLEAN, "corrupt": "When John went to the store, Mary gave a drink to"}, "equal lengths"),
        ("/ws/patch", {"clean": CLEAN, "corrupt": CORRUPT, "bogus": 1}, "bogus"),
    ],
)
def test_ws_bad_request_is_one_error_message(client, path, request_, needle):
    with client.websocket_connect("ws://127.0.0.1" + path) as ws:
        ws.send_text(request_ if isinstance(request_, str) else json.dumps(request_))
        message = ws.receive_json()
        closing = ws.receive()
    assert message["type"] == "error" and message["status"] == 422 and message["ok"] is False, message
    assert message["error"] and needle in message["error"] + " " + str(message.get("hint"))
    assert closing["type"] == "websocket.close"  # nothing after the error


def test_ws_patch_reports_progress_then_the_post_document(client, tiny_llama):
    spec = tiny_llama.spec
    tokens = _one_token(tiny_llama)
    request = {"clean": CLEAN, "corrupt": CORRUPT, "target": tokens[0], "contrast": tokens[1], "sweep": "heads", "batch_size": 3}
    with client.websocket_connect("ws://127.0.0.1/ws/patch") as ws:
        messages = _stream(ws, request)
    types = [m["type"] for m in messages]
    assert types[-1] == "done" and set(types[:-1]) == {"progress"}, types
    progress = messages[:-1]
    total = spec.n_layers * spec.n_heads
    assert len(progress) == -(-total // 3) >= 2  # one message per chunk of 3 variants
    dones = [m["done"] for m in progress]
    assert all(m["total"] == total for m in progress)
    assert all(a < b for a, b in zip(dones, dones[1:])) and dones[-1] == total
    r = client.post("/api/patch", json=request)
    assert r.status_code == 200, r.text
    assert _without_type(messages[-1]) == r.json()
    assert len(r.json()["results"]) == total


# ---------------------------------------------------------------------------------------------
# max_tokens
# ---------------------------------------------------------------------------------------------


def _prefix_of_length(model, text: str, n: int) -> str:
    """The shortest prefix of ``text`` that is exactly ``n`` tokens."""
    for end in range(1, len(text) + 1):
        if len(model.encode(text[:end])) == n:
            return text[:end]
    raise AssertionError(f"no prefix of {text!r} is {n} tokens")


@pytest.fixture(scope="module")
def small_client(tiny_llama):
    with TestClient(create_app(tiny_llama, max_tokens=8, time_limit=60), base_url="http://127.0.0.1") as c:
        yield c


def test_max_tokens_bounds_every_prompt(small_client, tiny_llama):
    n = len(tiny_llama.encode(CLEAN))
    assert n > 8
    assert small_client.get("/api/health").json()["max_tokens"] == 8

    r = small_client.post("/api/analyze", json={"prompt": CLEAN})
    assert r.status_code == 422, r.text
    assert f"{n} tokens" in r.json()["error"] and re.search(r"\b8\b", r.json()["error"]), r.json()

    for path, body, field in [
        ("/api/attention", {"prompt": CLEAN, "layer": 0, "head": 0}, "prompt"),
        ("/api/patch", {"clean": CLEAN, "corrupt": CORRUPT}, "clean"),
        ("/api/patch", {"clean": "The cat", "corrupt": CORRUPT}, "corrupt"),
        ("/api/ablate", {"prompt": CLEAN, "components": "L0H1"}, "prompt"),
        ("/api/heads", {"prompt": CLEAN}, "prompt"),
        ("/api/generate", {"prompt": CLEAN, "max_new_tokens": 1}, "prompt"),
    ]:
        r = small_client.post(path, json=body)
        assert r.status_code == 422 and r.json()["error"].startswith(field) and "at most 8" in r.json()["error"], (path, r.text)

    with small_client.websocket_connect("ws://127.0.0.1/ws/generate") as ws:
        messages = _stream(ws, {"prompt": CLEAN, "max_new_tokens": 2})
    assert len(messages) == 1
    message = messages[0]
    assert message["type"] == "error" and message["status"] == 422
    assert f"{n} tokens" in message["error"] and re.search(r"\b8\b", message["error"])


def test_max_tokens_takes_a_prompt_of_exactly_the_limit(small_client, tiny_llama):
    eight, nine = _prefix_of_length(tiny_llama, CLEAN, 8), _prefix_of_length(tiny_llama, CLEAN, 9)
    r = small_client.post("/api/analyze", json={"prompt": eight})
    assert r.status_code == 200, r.text
    assert len(r.json()["tokens"]) == 8
    r = small_client.post("/api/analyze", json={"prompt": nine})
    assert r.status_code == 422 and "9 tokens" in r.json()["error"], r.text
    with small_client.websocket_connect("ws://127.0.0.1/ws/generate") as ws:
        messages = _stream(ws, {"prompt": "The cat", "max_new_tokens": 2})
    assert [m["type"] for m in messages] == ["token", "token", "done"]


# ---------------------------------------------------------------------------------------------
# cancelling: a closed socket or the time limit stops the work and frees the model
# ---------------------------------------------------------------------------------------------


def _slow_token_docs(monkeypatch, seconds: float) -> list:
    """Make every generated token take at least ``seconds`` (real generation, throttled); count them."""
    made = []
    real = jsondoc_module.token_record_doc

    def slow(record):
        made.append(record.index)
        time.sleep(seconds)
        return real(record)

    monkeypatch.setattr(jsondoc_module, "token_record_doc", slow)
    return made


def test_closing_the_socket_cancels_generation(client, tiny_llama, monkeypatch):
    made = _slow_token_docs(monkeypatch, 0.02)
    max_new = tiny_llama.spec.n_ctx - len(tiny_llama.encode("The cat"))  # as many as the context allows
    with client.websocket_connect("ws://127.0.0.1/ws/generate") as ws:
        ws.send_text(json.dumps({"prompt": "The cat", "max_new_tokens": max_new}))
        assert [ws.receive_json()["type"] for _ in range(2)] == ["token", "token"]
    # leaving the block closed the socket: the model is free for the next request
    r = client.post("/api/analyze", json={"prompt": "The cat", "top_k": 2})
    assert r.status_code == 200, r.text
    health = _health_until(client, lambda h: not h["busy"])
    assert health["busy"] is False and health["queued"] == 0
    stopped_at = len(made)
    assert 2 <= stopped_at < max_new  # stopped at a token, long before the end
    time.sleep(0.05)
    assert len(made) == stopped_at  # and stays stopped


@pytest.fixture()
def held(monkeypatch):
    """An analysis of "The cat" holds the model until ``release`` is set: (started, release) events."""
    release, started = threading.Event(), threading.Event()
    real = app_module._analysis_job

    def gated(model, req, job):
        if req.prompt == "The cat":
            started.set()
            assert release.wait(30)
        return real(model, req, job)

    monkeypatch.setattr(app_module, "_analysis_job", gated)
    yield started, release
    release.set()


def test_health_counts_queued_jobs(client, held):
    """A job waiting for the model shows in ``queued``; the model is ``busy`` while one runs."""
    started, release = held
    with ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(client.post, "/api/analyze", json={"prompt": "The cat", "top_k": 2})
            assert started.wait(30)
            second = pool.submit(client.post, "/api/analyze", json={"prompt": "The dog", "top_k": 2})
            health = _health_until(client, lambda h: h["queued"] == 1)
            assert health["busy"] is True and health["queued"] == 1
        finally:
            release.set()
        assert first.result(timeout=60).status_code == 200 and second.result(timeout=60).status_code == 200
    health = _health_until(client, lambda h: not h["busy"])
    assert health["busy"] is False and health["queued"] == 0


def test_a_queued_socket_hears_its_place_and_leaving_frees_it(client, held):
    """Behind a running job, a socket is told how many jobs are ahead, then ``running``; one that closes while queued leaves the queue."""
    started, release = held
    with ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(client.post, "/api/analyze", json={"prompt": "The cat", "top_k": 2})
            assert started.wait(30)
            with client.websocket_connect("ws://127.0.0.1/ws/analyze") as leaver:  # queued, then gone
                leaver.send_text(json.dumps({"prompt": "The bird", "top_k": 2}))
                assert leaver.receive_json() == {"type": "queued", "ahead": 1}
            _health_until(client, lambda h: h["queued"] == 0)
            with client.websocket_connect("ws://127.0.0.1/ws/analyze") as ws:
                ws.send_text(json.dumps({"prompt": "The dog", "top_k": 2}))
                assert ws.receive_json() == {"type": "queued", "ahead": 1}
                release.set()
                messages = []
                while not messages or messages[-1]["type"] not in ("done", "error"):
                    messages.append(ws.receive_json())
        finally:
            release.set()
        assert first.result(timeout=60).status_code == 200
    assert messages[0] == {"type": "running"} and messages[-1]["type"] == "done" and messages[-1]["prompt"] == "The dog"


@pytest.fixture()
def slow_steps(monkeypatch):
    """Each step of streamed/checked work (Job.emit: a patching chunk, a token) takes at least 50 ms; counted."""
    steps = []
    real = Job.emit

    def slow(self, message):
        steps.append(message.get("type"))
        time.sleep(0.05)
        real(self, message)

    monkeypatch.setattr(Job, "emit", slow)
    return steps


@pytest.fixture(scope="module")
def hasty_client(tiny_llama):
    # 2 s: far above a small request (even a cold one), far below the slowed sweep below
    with TestClient(create_app(tiny_llama, time_limit=2), base_url="http://127.0.0.1") as c:
        yield c


def _patch_everything(model) -> dict:
    """Real patching work of hundreds of chunks: >= 15 s at 50 ms a step, far past a 2 s limit."""
    tokens = _one_token(model)
    return {"clean": CLEAN, "corrupt": CORRUPT, "target": tokens[0], "contrast": tokens[1], "sweep": "all", "batch_size": 1}


def test_time_limit_answers_504_and_frees_the_model(hasty_client, tiny_llama, slow_steps):
    r = hasty_client.post("/api/patch", json=_patch_everything(tiny_llama))
    assert r.status_code == 504, r.text
    doc = r.json()
    assert doc["ok"] is False and doc["status"] == 504 and "longer than 2 s" in doc["error"] and "time-limit" in str(doc["hint"])
    health = _health_until(hasty_client, lambda h: not h["busy"])
    assert health["busy"] is False
    n = len(slow_steps)
    assert 0 < n < 100  # the job stopped at a chunk, not at the end of the sweep
    r = hasty_client.post("/api/attention", json={"prompt": "The cat", "layer": 0, "head": 0})  # small work still runs
    assert r.status_code == 200, r.text


def test_ws_time_limit_is_an_error_message_and_frees_the_model(hasty_client, tiny_llama, slow_steps):
    with hasty_client.websocket_connect("ws://127.0.0.1/ws/patch") as ws:
        messages = _stream(ws, _patch_everything(tiny_llama))
    assert messages[-1]["type"] == "error" and messages[-1]["status"] == 504 and "longer than 2 s" in messages[-1]["error"]
    assert {m["type"] for m in messages[:-1]} <= {"progress"}
    health = _health_until(hasty_client, lambda h: not h["busy"])
    assert health["busy"] is False and 0 < len(slow_steps) < 100
    with hasty_client.websocket_connect("ws://127.0.0.1/ws/generate") as ws:
        messages = _stream(ws, {"prompt": "The cat", "max_new_tokens": 1})
    assert [m["type"] for m in messages] == ["token", "done"]


def test_serve_rejects_a_bad_port_before_loading(cli):
    r = cli("no-load", "serve", "--port", "70000")
    assert r.code == 2 and r.out == "" and r.err.count("\n") == 1 and "--port 70000" in r.err


# ---------------------------------------------------------------------------------------------
# a departed client, a HexRay bug inside a socket job, and every prompt-like input bounded
# ---------------------------------------------------------------------------------------------


def test_a_close_frame_from_the_client_cancels_the_work(client, tiny_llama, monkeypatch):
    made = _slow_token_docs(monkeypatch, 0.02)
    max_new = 20
    with client.websocket_connect("ws://127.0.0.1/ws/generate") as ws:
        ws.send_text(json.dumps({"prompt": "The cat", "max_new_tokens": max_new}))
        assert [ws.receive_json()["type"] for _ in range(2)] == ["token", "token"]
        ws.close()  # the client says goodbye; TestClient only cancels the app task when the block ends
        health = _health_until(client, lambda h: not h["busy"])
        generated = len(made)
    assert health["busy"] is False
    assert generated < max_new  # the goodbye stopped the generation


def test_ws_unexpected_failure_is_a_prompt_500_message(tiny_llama, monkeypatch):
    def broken(model, req, job):
        raise RuntimeError("boom")

    monkeypatch.setattr(app_module, "_analysis_job", broken)
    messages = []
    with TestClient(create_app(tiny_llama, time_limit=1), base_url="http://127.0.0.1") as c:
        with c.websocket_connect("ws://127.0.0.1/ws/analyze") as ws:
            messages = _stream(ws, {"prompt": "The cat"})
    assert messages and messages[-1]["type"] == "error" and messages[-1]["status"] == 500, messages


@pytest.mark.parametrize(
    "path, body",
    [
        ("/api/generate", {"prompt": "The", "text": CLEAN}),
        ("/api/ablate", {"prompt": "The cat", "components": "L0H1", "mode": "mean", "reference": [CLEAN]}),
    ],
)
def test_max_tokens_bounds_forced_text_and_reference_prompts(small_client, tiny_llama, path, body):
    assert len(tiny_llama.encode(CLEAN)) > 8
    r = small_client.post(path, json=body)
    assert r.status_code == 422 and "at most 8" in r.json()["error"], r.text


def test_serve_refuses_a_taken_port_and_bad_limits_before_loading(cli):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = cli("no-load", "serve", "--port", str(port))
    assert r.code == 2 and r.err.count("\n") == 1 and f"127.0.0.1:{port}" in r.err and "--port" in r.err
    r = cli("no-load", "serve", "--max-tokens", "0")
    assert r.code == 2 and "--max-tokens" in r.err


def test_open_waits_for_the_server_then_opens_the_lab(monkeypatch):
    import socket
    import webbrowser

    from hexray import cli as cli_module

    opened = []
    monkeypatch.setattr(webbrowser, "open", opened.append)
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        cli_module._open_when_listening("127.0.0.1", port, f"http://127.0.0.1:{port}/", wait=5)
    assert opened == [f"http://127.0.0.1:{port}/"]


# ---------------------------------------------------------------------------------------------
# the lab's views: presets, token flow, the circuit; every job over a socket too
# ---------------------------------------------------------------------------------------------


def test_presets_are_served_with_their_expected_circuits(client):
    from hexray.presets import PRESETS

    r = client.get("/api/presets")
    assert r.status_code == 200
    served = r.json()["presets"]
    assert [p["name"] for p in served] == [p.name for p in PRESETS]
    assert {"ioi", "induction", "factual", "greater-than", "duplicate-token"} <= {p["name"] for p in served}
    assert all(p["expected"] and "\n" not in p["expected"] for p in served)


def test_flow_is_the_token_flow_document(client, tiny_llama):
    from hexray.analysis.flow import token_flow
    from hexray.render.jsondoc import token_flow_document

    r = client.post("/api/flow", json={"prompt": CLEAN, "layer": 1, "exclude_first_key": True})
    assert r.status_code == 200, r.text
    assert r.json() == json.loads(json.dumps(token_flow_document(token_flow(tiny_llama, CLEAN, layer=1, exclude_first_key=True))))
    assert r.json()["sink_excluded"] is True and all(p["key"] > 0 for p in r.json()["top_pairs"])
    bad = client.post("/api/flow", json={"prompt": CLEAN, "layer": 99})
    assert bad.status_code == 422 and "layer 99" in bad.json()["error"] and "\n" not in bad.json()["error"]


def test_circuit_is_the_circuit_document(client, tiny_llama):
    from hexray.analysis.circuit import circuit
    from hexray.render.jsondoc import circuit_document

    request = {"prompt": CLEAN, "target": " Mary", "k": 2, "depth": 1}
    with client.websocket_connect("ws://127.0.0.1/ws/circuit") as ws:
        messages = _stream(ws, request)
    assert [m["type"] for m in messages] == ["done"]
    expected = json.loads(json.dumps(circuit_document(circuit(tiny_llama, CLEAN, target=" Mary", k=2, depth=1))))
    assert _without_type(messages[-1]) == expected == client.post("/api/circuit", json=request).json()
    for bad, field in (({"k": 0}, "k"), ({"depth": 9}, "depth"), ({"target": " Mary had"}, "target")):
        r = client.post("/api/circuit", json={**request, **bad})
        assert r.status_code == 422 and field in r.json()["error"], r.json()


def test_every_job_is_served_over_a_socket_too(client):
    """The lab runs every job over a socket (so a newer request can stop it): each POST endpoint has its /ws twin."""
    routes = {route.path for route in client.app.routes}
    # /api/cli is no lab job: hexray --server's one-shot commands (tests/unit/test_warm.py); GET reads (units, their look-ups) answer at once
    gets = ("/api/health", "/api/analyses", "/api/options", "/api/presets", "/api/dictionaries", "/api/units/{name}", "/api/units")
    posts = {p.removeprefix("/api/") for p in routes if p.startswith("/api/") and p not in (*gets, "/api/cli")}
    assert {"analyze", "attention", "flow", "circuit", "patch", "ablate", "heads", "generate", "analyze/set", "patch/set", "ablate/set"} <= posts
    assert {f"/ws/{name}" for name in posts} <= routes
    with client.websocket_connect("ws://127.0.0.1/ws/attention") as ws:
        messages = _stream(ws, {"prompt": CLEAN, "layer": 1, "head": 0})
    assert [m["type"] for m in messages] == ["done"] and messages[-1]["name"] == "L1H0"


# ---------------------------------------------------------------------------------------------
# the neuroscope: GET /api/units/{name}
# ---------------------------------------------------------------------------------------------


def test_unit_pages_come_from_the_models_index_and_follow_a_rebuild(tiny_llama, tmp_path, monkeypatch):
    """No index: 404. After a build: the page (as hexray neuron --json); after a rebuild into place: the new index's."""
    from hexray.corpus.packs import token_pack
    from hexray.neuroscope import build_index, default_index_path

    from tests.conftest import CORPUS

    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 2), encoding="utf-8")
    with TestClient(create_app(tiny_llama, time_limit=60), base_url="http://127.0.0.1") as c:
        missing = c.get("/api/units/L1N3")
        assert missing.status_code == 404 and "hexray index build" in missing.json()["hint"]
        path = default_index_path(tiny_llama.spec)
        build_index(tiny_llama, token_pack(tiny_llama, corpus, context_size=16, max_tokens=200), "neurons,heads", path, top_k=3)
        page = c.get("/api/units/L1N3")
        assert page.status_code == 200, page.text
        doc = page.json()
        assert doc["name"] == "L1N3" and len(doc["top"]) <= 3 and doc["index"]["tokens"] <= 200
        assert c.get("/api/units/L0H1").json()["name"] == "L0H1"
        assert c.get("/api/units/L9N3").status_code in (404, 422)
        for bad in ("bogus", "L" * 300):
            r = c.get("/api/units/" + bad)
            assert 400 <= r.status_code < 500 and r.json()["ok"] is False and "\n" not in r.json()["error"]
        build_index(tiny_llama, token_pack(tiny_llama, corpus, context_size=16, max_tokens=120), "neurons,heads", path, top_k=2)
        assert len(c.get("/api/units/L1N3").json()["top"]) <= 2  # the rebuilt index, not the old connection


def _index_corpus(tmp_path) -> Path:
    from tests.conftest import CORPUS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 2), encoding="utf-8")
    return corpus


def _hit_names(doc: dict) -> list[tuple[str, float]]:
    return [(h["name"], h["score"]) for h in doc["hits"]]


def test_reverse_look_ups_answer_what_the_library_does(tiny_llama, tmp_path, monkeypatch):
    """GET /api/units?prompt=&position= and ?token= are search_position and search_token on the served index (404 without one)."""
    from hexray.corpus.packs import token_pack
    from hexray.neuroscope import build_index, default_index_path, open_index, search_position, search_token
    from hexray.render.jsondoc import unit_hits_doc

    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "cache"))
    token = _one_token(tiny_llama)[0]
    with TestClient(create_app(tiny_llama, time_limit=60), base_url="http://127.0.0.1") as c:
        for query in ({"token": token}, {"prompt": CLEAN, "position": -1}):
            missing = c.get("/api/units", params=query)
            assert missing.status_code == 404 and "hexray index build" in missing.json()["hint"], missing.json()
        path = default_index_path(tiny_llama.spec)
        build_index(tiny_llama, token_pack(tiny_llama, _index_corpus(tmp_path), context_size=16, max_tokens=300), "neurons,heads", path, top_k=4)

        at = c.get("/api/units", params={"prompt": CLEAN, "position": -2, "limit": 7})
        on = c.get("/api/units", params={"token": token, "limit": 5})
        assert at.status_code == 200 and on.status_code == 200, (at.text, on.text)
        with open_index(path, tiny_llama.spec) as index:
            found = search_position(index, tiny_llama, CLEAN, -2, limit=7)
            expected_at = unit_hits_doc(found.hits, search={"prompt": CLEAN, "position": found.position, "token": found.tokens[found.position]})
            expected_on = unit_hits_doc(search_token(index, tiny_llama.single_token(token, role="token"), limit=5), search={"token": token})
        assert at.json() == expected_at and len(at.json()["hits"]) == 7
        assert at.json()["search"]["position"] == len(found.tokens) - 2
        assert on.json() == expected_on and on.json()["hits"], on.json()  # the corpus repeats the names: some top examples centre on them
        assert c.get("/api/units", params={"prompt": CLEAN, "position": len(found.tokens) - 2, "limit": 7}).json() == expected_at  # the same token, counted from the start

        for query, field in (({"prompt": CLEAN, "position": 999}, "position"), ({"token": " Mary had"}, "token"), ({"token": token, "limit": 0}, "limit"),
                             ({"token": token, "limit": "many"}, "limit"), ({}, "prompt"), ({"prompt": CLEAN, "token": token}, "prompt"),
                             ({"token": token, "bogus": 1}, "bogus")):
            r = c.get("/api/units", params=query)
            body = r.json()
            assert r.status_code == 422 and body["ok"] is False and field in body["error"] and "\n" not in body["error"], (query, body)
        assert c.get("/api/health").json()["busy"] is False  # the prompt's forward pass took its turn and gave it back


def test_unit_pages_are_served_while_a_build_replaces_the_index(tiny_llama, tmp_path, monkeypatch):
    """A build into the served index's path leaves the old file in place until it is complete: pages keep coming from it, then from the new one."""
    from hexray.corpus.packs import token_pack
    from hexray.neuroscope import build_index, default_index_path

    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "cache"))
    corpus, path = _index_corpus(tmp_path), default_index_path(tiny_llama.spec)
    build_index(tiny_llama, token_pack(tiny_llama, corpus, context_size=16, max_tokens=120), "neurons,heads", path, top_k=2)
    building, fetched = threading.Event(), threading.Event()

    def hold_once() -> bool:  # asked before each batch: the first time, wait until the test has read a page mid-build
        if not building.is_set():
            building.set()
            assert fetched.wait(60), "the test never read a page during the build"
        return False

    with TestClient(create_app(tiny_llama, time_limit=60), base_url="http://127.0.0.1") as c:
        before = c.get("/api/units/L1N3").json()
        assert before["index"]["tokens"] <= 120 and len(before["top"]) <= 2
        bigger = token_pack(tiny_llama, corpus, context_size=16, max_tokens=300)
        with ThreadPoolExecutor(1) as pool:
            build = pool.submit(build_index, tiny_llama, bigger, "neurons,heads", path, top_k=4, should_stop=hold_once)
            assert building.wait(60), build.exception(0) if build.done() else "the build never started"
            try:
                during = c.get("/api/units/L1N3")
                head = c.get("/api/units/L0H1")
                hits = c.get("/api/units", params={"token": _one_token(tiny_llama)[0]})
            finally:
                fetched.set()
            build.result(120)
        assert during.status_code == 200 and during.json() == before  # the previous index, whole
        assert head.status_code == 200 and hits.status_code == 200
        after = c.get("/api/units/L1N3").json()
        assert after["index"]["tokens"] == bigger.n_tokens > before["index"]["tokens"]  # the new file, once moved into place
        assert len(after["top"]) > len(before["top"])
