"""Reliability and security: work that stops, a FIFO queue, a server only its user drives, bounded
input, the memory budget, files never lost, and a fuzz of every option and field."""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

import hexray.analysis.report as report_module
from hexray.errors import HexRayError
from hexray.models.loading import _boot_cached, _Placement, load_model
from hexray.server import schemas
from hexray.server.app import MAX_BODY_BYTES, create_app
from hexray.tracing import sites
from hexray.tracing.engine import cancellable, capture, check_stop
from tests.helpers import assert_one_line_error

LOCAL = "http://127.0.0.1"
PROMPT = "When Mary and John went to the store, John gave a drink to"


# ---------------------------------------------------------------------------------------------
# work that stops
# ---------------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def test_a_stop_check_ends_a_forward_pass_at_the_next_block(tiny_model):
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop), cancellable(check):
        capture(tiny_model, [tiny_model.encode(PROMPT)], {sites.resid_post(tiny_model.spec.n_layers - 1)})
    assert len(calls) == 2  # stopped before block 1: block 1 and later never ran
    capture(tiny_model, [tiny_model.encode(PROMPT)], set())  # outside the block nothing is checked
    assert len(calls) == 2


@pytest.fixture
def slow_work(monkeypatch):
    """Make every analysis a long loop that only a stop check ends (as a long forward pass would)."""
    order = []

    def slow_trace(model, prompt, hooks, **kwargs):
        order.append(prompt)
        deadline = time.monotonic() + float(prompt.split()[-1])
        while time.monotonic() < deadline:
            check_stop()
            time.sleep(0.01)
        raise HexRayError("done sleeping")

    monkeypatch.setattr(report_module, "run_trace", slow_trace)
    return order


def _busy(client) -> bool:
    return client.get("/api/health").json()["busy"]


def test_a_504_frees_the_model_within_a_second(tiny_llama, slow_work):
    with TestClient(create_app(tiny_llama, time_limit=1), base_url=LOCAL) as client:
        start = time.monotonic()
        r = client.post("/api/analyze", json={"prompt": "sleep for 30"})
        assert r.status_code == 504 and r.json()["status"] == 504
        answered = time.monotonic()
        while _busy(client):
            assert time.monotonic() - answered < 1.0, "the job still holds the model"
            time.sleep(0.02)
        assert answered - start < 2.0


def test_a_closed_socket_frees_the_model(tiny_llama, slow_work):
    with TestClient(create_app(tiny_llama, time_limit=60), base_url=LOCAL) as client:
        with client.websocket_connect("ws://127.0.0.1/ws/analyze") as ws:
            ws.send_text(json.dumps({"prompt": "sleep for 30"}))
            deadline = time.monotonic() + 5
            while not _busy(client):
                assert time.monotonic() < deadline
                time.sleep(0.02)
        closed = time.monotonic()
        while _busy(client):
            assert time.monotonic() - closed < 1.5, "a closed socket did not cancel its job"
            time.sleep(0.02)


def test_the_queue_is_first_come_first_served_and_counts_every_waiter(tiny_llama, slow_work):
    with TestClient(create_app(tiny_llama, time_limit=60), base_url=LOCAL) as client:
        n = 8
        with ThreadPoolExecutor(n + 1) as pool:
            futures = []
            for i in range(n):
                futures.append(pool.submit(client.post, "/api/analyze", json={"prompt": f"job {i} 0.3"}))
                time.sleep(0.05)  # arrival order
            time.sleep(0.2)
            queued = max(client.get("/api/health").json()["queued"] for _ in range(5))
            answers = [f.result() for f in futures]
    assert queued >= n - 3, queued  # every waiter is counted, not only the thread pool's
    assert all(a.status_code == 422 and a.json()["error"] == "done sleeping" for a in answers)
    assert slow_work == [f"job {i} 0.3" for i in range(n)]


# ---------------------------------------------------------------------------------------------
# only the user drives the server
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tiny_llama):
    with TestClient(create_app(tiny_llama, time_limit=60, allowed_hosts=("lab.internal",)), base_url=LOCAL) as c:
        yield c


def test_a_foreign_host_is_refused(client):
    r = client.get("/api/health", headers={"host": "evil.example"})
    assert r.status_code == 421 and "evil.example" in r.json()["error"] and r.json()["ok"] is False
    assert client.get("/api/health", headers={"host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/api/health", headers={"host": "[::1]:8000"}).status_code == 200
    assert client.get("/api/health", headers={"host": "lab.internal:8000"}).status_code == 200  # --allow-host


def test_a_foreign_origin_cannot_post_or_open_a_socket(client):
    r = client.post("/api/analyze", json={"prompt": "The cat"}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["status"] == 403
    assert client.post("/api/analyze", json={"prompt": "The cat"}, headers={"origin": "http://127.0.0.1:8000"}).status_code == 200
    assert client.get("/api/health", headers={"origin": "http://evil.example"}).status_code == 200  # a GET changes nothing
    with pytest.raises(Exception), client.websocket_connect("ws://127.0.0.1/ws/analyze", headers={"origin": "http://localhost.evil.example:8000"}) as ws:
        ws.send_text(json.dumps({"prompt": "The cat"}))
        ws.receive_json()


def test_framework_errors_and_oversized_bodies_answer_in_the_error_shape(client):
    for method, path, status in (("get", "/api/nothing", 404), ("get", "/api/analyze", 405)):
        r = getattr(client, method)(path)
        assert r.status_code == status and set(r.json()) >= {"ok", "error", "hint", "status"} and r.json()["status"] == status
    r = client.post("/api/analyze", content=b"\xff\xfe not json", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and r.json()["ok"] is False
    r = client.post("/api/analyze", content=b"x" * (MAX_BODY_BYTES + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["ok"] is False


def test_deep_json_and_a_missing_content_type_answer_4xx_with_a_hint(client):
    r = client.post("/api/analyze", content=("[" * 5000 + "]" * 5000).encode(), headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and r.json()["ok"] is False
    r = client.post("/api/analyze", content=json.dumps({"prompt": "The cat"}).encode())  # no Content-Type
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["hint"]


def test_a_report_name_too_long_for_the_file_system_is_one_line(cli, tiny_llama, tmp_path):
    r = cli(tiny_llama, "trace", "--prompt", PROMPT, "--report", tmp_path / ("r" * 300))
    assert_one_line_error(r, "--report")


def test_an_unwritable_cache_is_one_clear_error(monkeypatch):
    import hexray.models.loading as loading

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(loading, "_cached_from_gguf", refuse)
    monkeypatch.setattr(loading, "_embedded_gguf_path", lambda: None)
    with pytest.raises(HexRayError) as info:
        load_model()
    assert "cannot use the model cache" in info.value.message and "HEXRAY_CACHE" in info.value.hint


def test_a_binary_first_frame_gets_an_error_message(client):
    with client.websocket_connect("ws://127.0.0.1/ws/analyze") as ws:
        ws.send_bytes(b"\x00\x01")
        message = ws.receive_json()
    assert message["type"] == "error" and "text frame" in message["error"]


# ---------------------------------------------------------------------------------------------
# bounded input and one clear error for every mistake
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/api/analyze", {"prompt": "The cat\ud800"}, "unicode"),  # refused as the JSON is read
        ("/api/analyze", {"prompt": "The cat", "target": "\udcff"}, "lone surrogate"),
        ("/api/analyze", {"prompt": "The cat", "target": "x" * 5000}, "not one token"),
        ("/api/ablate", {"prompt": "The cat", "components": "L0H1", "mode": "mean", "reference": ["ok", "bad\ud800"]}, "reference[1]"),
        ("/api/generate", {"prompt": "The cat", "text": "go\ud800"}, "lone surrogate"),
        ("/api/ablate", {"prompt": "The cat", "components": "L0H1", "seed": 2**64}, "seed"),
        ("/api/heads", {"seed": -1}, "seed"),
        ("/api/generate", {"prompt": "The cat", "temperature": 1e-320}, "temperature"),
        ("/api/generate", {"prompt": "The cat", "watch": "L0H1", "watch_threshold": "NaN"}, "watch_threshold"),
        ("/api/analyze", {"prompt": "The cat", "target": " the", "contrast": " the"}, "same token"),
    ],
)
def test_bad_values_answer_422_with_one_short_line(client, path, body, needle):
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    doc = r.json()
    assert doc["ok"] is False and needle.lower() in (doc["error"] + " " + str(doc["hint"])).lower() and len(doc["error"]) < 300, doc


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["trace", "--prompt", "The cat\udcff"], "--prompt is not valid Unicode"),
        (["trace", "--prompt", "The cat", "--target", "\udcff"], "--target is not valid Unicode"),
        (["generate", "--prompt", "The cat", "--text", "a\udcff"], "--text is not valid Unicode"),
        (["ablate", "--prompt", "The cat", "-c", "L0H1", "--seed", str(2**64)], "--seed"),
        (["heads", "--seed", str(2**64)], "--seed"),
        (["generate", "--prompt", "The cat", "--seed", str(2**64)], "--seed"),
        (["generate", "--prompt", "The cat", "--temperature", "nan"], "--temperature must be a finite number"),
        (["generate", "--prompt", "The cat", "--temperature", "1e-320"], "--temperature must be 0 (greedy) or at least 0.001"),
        (["generate", "--prompt", "The cat", "--watch", "L0H1", "--watch-threshold", "nan"], "--watch-threshold"),
        (["trace", "--prompt", "The cat", "--report", ""], "--report is empty"),
        (["trace", "--prompt", "The cat", "--save-activations", "out", "--save-hooks", ",,,"], "--save-hooks is empty"),
        (["serve", "--time-limit", "nan"], "--time-limit must be a positive number"),
        (["serve", "--host", "203.0.113.7", "--port", "8765"], "check --host"),
    ],
)
def test_cli_mistakes_are_one_line(cli, tiny_llama, args, needle):
    assert_one_line_error(cli(tiny_llama, *args), needle)


def test_target_equal_to_contrast_is_refused(cli, tiny_llama):
    assert_one_line_error(cli(tiny_llama, "trace", "--prompt", PROMPT, "--target", " the", "--contrast", " the"), "same token")


# ---------------------------------------------------------------------------------------------
# the memory budget lives in the runners
# ---------------------------------------------------------------------------------------------
def test_a_request_over_the_budget_is_413_before_any_work(client, monkeypatch):
    monkeypatch.setenv("HEXRAY_MEMORY_BUDGET", "1e5")
    r = client.post("/api/analyze", json={"prompt": PROMPT})
    assert r.status_code == 413 and "budget" in r.json()["error"], r.text


def test_batch_size_never_passes_the_budget(tiny_llama, monkeypatch):
    import hexray.tracing.edits as edits
    from hexray.intervene.patching import activation_patching

    monkeypatch.setenv("HEXRAY_MEMORY_BUDGET", "2e6")
    sizes = []
    real = edits._run_chunk
    monkeypatch.setattr(edits, "_run_chunk", lambda model, tokens, chunk, pos: (sizes.append(len(chunk)), real(model, tokens, chunk, pos))[1])
    fits = edits.rows_per_chunk(tiny_llama, len(tiny_llama.encode("John said that Mary")))
    ids = tiny_llama.encode
    target, contrast = next(t for t in (" Mary", " the") if len(ids(t)) == 1), next(t for t in (" John", " a") if len(ids(t)) == 1)
    activation_patching(tiny_llama, "John said that Mary", "Mary said that John", target=target, contrast=contrast, sweeps="heads", batch_size=4096)
    assert sizes and max(sizes) <= fits < 4096


def test_induction_data_runs_in_chunks_within_the_budget(tiny_llama, monkeypatch):
    from hexray.analysis import heads

    from hexray.tracing.engine import row_bytes

    monkeypatch.setenv("HEXRAY_MEMORY_BUDGET", str(3 * row_bytes(tiny_llama, 32, [sites.attn_pattern(0)])))  # one layer's patterns at a time
    rows = []
    real = heads.run_reduced
    monkeypatch.setattr(heads, "run_reduced", lambda model, batch, *a, **k: (rows.append(len(batch)), real(model, batch, *a, **k))[1])
    chunked = heads.classify_heads(tiny_llama, "The cat sat on the mat. The cat", n_sequences=8, seq_len=16)
    monkeypatch.setenv("HEXRAY_MEMORY_BUDGET", "1e12")
    rows_before = len(rows)
    whole = heads.classify_heads(tiny_llama, "The cat sat on the mat. The cat", n_sequences=8, seq_len=16)
    assert rows[:rows_before] == [1, 3, 3, 2] and rows[rows_before:] == [1, 8]  # the prompt, then the induction data
    torch.testing.assert_close(torch.tensor(chunked.scores["induction"]), torch.tensor(whole.scores["induction"]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# nothing lost, nothing stale
# ---------------------------------------------------------------------------------------------
def test_a_report_never_overwrites_a_users_file_and_leaves_nothing_stale(cli, tiny_llama, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my own page")
    r = cli(tiny_llama, "trace", "--prompt", PROMPT, "--report", mine)
    assert_one_line_error(r, "which HexRay did not write")
    assert (mine / "index.html").read_text() == "my own page"
    report = tmp_path / "report"
    assert cli(tiny_llama, "trace", "--prompt", PROMPT, "--logit-lens", "--report", report).code == 0
    assert (report / "logit_lens.png").is_file()
    assert cli(tiny_llama, "trace", "--prompt", PROMPT, "--report", report).code == 0  # the same folder, fewer figures
    assert not (report / "logit_lens.png").exists(), "a stale figure survived beside the new hexray.json"
    assert (report / "hexray.json").is_file() and (report / "index.html").is_file()


def test_a_damaged_cache_copy_is_rebuilt_once(tiny_model_folder, tmp_path):
    cached = tmp_path / "cached"
    shutil.copytree(tiny_model_folder, cached)
    weights = next(cached.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as an interrupted write leaves it
    built = []

    def folder_of():
        if not cached.exists():  # the rebuild
            built.append(1)
            shutil.copytree(tiny_model_folder, cached)
        return cached

    with pytest.warns(UserWarning, match="damaged"):
        model = _boot_cached(folder_of, "tiny", "gguf", lambda _m: None, _Placement("cpu", torch.float32), weights="test")
    assert built == [1] and model.spec.n_layers >= 1
    assert load_model(str(cached)).spec.n_layers == model.spec.n_layers


# ---------------------------------------------------------------------------------------------
# fuzz: every API field and CLI option, hostile values; never a 500 or a traceback
# ---------------------------------------------------------------------------------------------
HOSTILE_TEXT = ["", " ", "\ud800", "a\udcffb", "\x00\x01\x7f", "\u202e\u2066evil", "🙂" * 3, "L99H99", "x" * 3000]
HOSTILE_NUMBERS = [float("nan"), float("inf"), -float("inf"), 2**64, -(2**64), -1, 0, 1e-320, 1e308]


def _hostile(rng: random.Random):
    return rng.choice(HOSTILE_TEXT + HOSTILE_NUMBERS + [None, True, [], ["\ud800"], {"a": 1}])


def _valid(name: str) -> dict:
    return {"AnalyzeRequest": {"prompt": "The cat sat"}, "AttentionRequest": {"prompt": "The cat sat", "layer": 0, "head": 0},
            "PatchRequest": {"clean": "John said that Mary", "corrupt": "Mary said that John"},
            "AblateRequest": {"prompt": "The cat sat", "components": "L0H1"}, "HeadsRequest": {},
            "GenerateRequest": {"prompt": "The cat", "max_new_tokens": 2}}[name]


ENDPOINTS = {"AnalyzeRequest": "/api/analyze", "AttentionRequest": "/api/attention", "PatchRequest": "/api/patch",
             "AblateRequest": "/api/ablate", "HeadsRequest": "/api/heads", "GenerateRequest": "/api/generate"}


@pytest.mark.parametrize("request_name", list(ENDPOINTS))
def test_fuzz_every_api_field(client, request_name):
    rng = random.Random(request_name)
    fields = list(getattr(schemas, request_name).model_fields)
    for field in fields:
        for _ in range(3):
            body = {**_valid(request_name), field: _hostile(rng)}
            text = json.dumps(body, allow_nan=True)
            r = client.post(ENDPOINTS[request_name], content=text, headers={"content-type": "application/json"})
            assert r.status_code < 500, (field, body, r.text[:300])
            if r.status_code >= 400:
                doc = r.json()
                assert doc["ok"] is False and isinstance(doc["error"], str) and len(doc["error"]) < 400, (field, doc)


@pytest.mark.parametrize("command", ["trace", "patch", "ablate", "heads", "generate"])
def test_fuzz_every_cli_option(cli, tiny_llama, command):
    import typer.main

    from hexray import cli as cli_module

    click_command = typer.main.get_command(cli_module.app).commands[command]
    base = {"trace": ["--prompt", "The cat sat"], "patch": ["--clean", "John said that Mary", "--corrupt", "Mary said that John"],
            "ablate": ["--prompt", "The cat sat", "-c", "L0H1"], "heads": [], "generate": ["--prompt", "The cat", "-n", "2"]}[command]
    rng = random.Random(command)
    skip = {"--help", "--report", "--save-activations", "--model", "--json", "--prompts", "--reference", "--device", "--dtype"}
    for param in click_command.params:
        flag = max(param.opts, key=len)
        if flag in skip or param.is_flag:
            continue
        for _ in range(2):
            value = str(_hostile(rng))
            r = cli(tiny_llama, command, *base, flag, value, "--json")
            assert r.code in (0, 2), (flag, value, r.code, r.err[-500:])
            assert "Traceback" not in r.err, (flag, value, r.err[-500:])
            if r.code == 2:
                assert len([line for line in r.err.splitlines() if line.strip()]) == 1, (flag, value, r.err)


def test_an_earlier_activation_dump_is_replaced_only_with_force(cli, tiny_llama, tmp_path):
    out = tmp_path / "acts"
    assert cli(tiny_llama, "trace", "--prompt", PROMPT, "--save-activations", out).code == 0
    before = (out / "manifest.json").read_text()
    assert_one_line_error(cli(tiny_llama, "trace", "--prompt", "The cat sat", "--save-activations", out), "already holds a dump")
    assert (out / "manifest.json").read_text() == before
    assert cli(tiny_llama, "trace", "--prompt", "The cat sat", "--save-activations", out, "--force").code == 0
    assert json.loads((out / "manifest.json").read_text())["prompt"] == "The cat sat"


def test_two_reports_written_at_once_into_one_folder_do_not_mix(tmp_path):
    from hexray.render.files import write_files

    folder = tmp_path / "shared"
    a = {"hexray.json": b'{"run": "a"}', "index.html": b"a", "a.png": b"a"}
    b = {"hexray.json": b'{"run": "b"}', "index.html": b"b", "b.png": b"b"}
    for _ in range(10):
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda files: write_files(folder, files), [a, b]))
        run = json.loads((folder / "hexray.json").read_text())["run"]
        assert (folder / "index.html").read_bytes() == run.encode()
        assert sorted(p.name for p in folder.iterdir()) == sorted({"a": a, "b": b}[run])  # the other run's figure is gone


def test_a_large_reference_set_runs_in_chunks_with_the_same_answer(tiny_llama, monkeypatch):
    from hexray.intervene import ablation
    from hexray.tracing.engine import row_bytes

    refs = [f"The cat number {i} sat on the mat and looked at the dog" for i in range(12)]
    whole = ablation.ablate(tiny_llama, PROMPT, "L0H1,MLP1", mode="mean", reference=refs)
    rows = []
    real = ablation.capture
    monkeypatch.setattr(ablation, "capture", lambda model, batch, *a, **k: (rows.append(len(batch)), real(model, batch, *a, **k))[1])
    hooks = {sites.head_z(0), sites.mlp_out(1)}
    monkeypatch.setenv("HEXRAY_MEMORY_BUDGET", str(5 * row_bytes(tiny_llama, max(len(tiny_llama.encode(r)) for r in refs), hooks)))
    chunked = ablation.ablate(tiny_llama, PROMPT, "L0H1,MLP1", mode="mean", reference=refs)
    assert rows == [5, 5, 2]
    assert chunked.after.target.prob == pytest.approx(whole.after.target.prob, abs=1e-6) and chunked.kl == pytest.approx(whole.kl, abs=1e-7)
