"""Warm runs (``hexray --server URL|auto``) on the tiny Llama: the command runs on a server's loaded
model and prints what a cold run prints (the JSON document, the console view at the client's
width and colours, the exit code); relative paths are the client's; the token guards /api/cli;
``auto`` finds a live local server through its discovery file and otherwise runs cold."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

import hexray.cli
from hexray import warm
from hexray.server.app import create_app
from tests.helpers import assert_one_line_error

PROMPT = "When Mary and John went to the store, John gave a drink to"
TOKEN = "token-of-the-tests"
PORT = 8765  # only named in discovery files: requests go through a TestClient


class ClientTransport:
    """``hexray.warm.transport`` over a TestClient (records what was asked)."""

    def __init__(self, client: TestClient):
        self.client, self.calls = client, []

    def request(self, method, url, payload=None, timeout=None):
        self.calls.append((method, url.split("/", 3)[-1]))
        r = self.client.request(method, url, json=payload)
        return r.status_code, (r.json() if r.content else {})


class NoServer:
    """A transport for tests where no server may be asked anything."""

    def request(self, method, url, payload=None, timeout=None):
        raise AssertionError(f"a server was asked: {method} {url}")


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """A private HEXRAY_CACHE (so no real server of this machine is found), and no HEXRAY_SERVER."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("HEXRAY_CACHE", str(folder))
    monkeypatch.delenv("HEXRAY_SERVER", raising=False)
    return folder


@pytest.fixture
def served(tiny_llama_case, cache, monkeypatch):
    """The lab on the tiny Llama, taking CLI commands with TOKEN, advertised as a live server on PORT."""
    app = create_app(tiny_llama_case.model, time_limit=60, cli_token=TOKEN)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        transport = ClientTransport(client)
        monkeypatch.setattr(warm, "transport", transport)
        with warm.advertise("127.0.0.1", PORT, tiny_llama_case.model.name, TOKEN) as path:
            assert isinstance(path, Path)
            yield SimpleNamespace(client=client, transport=transport, url=f"http://127.0.0.1:{PORT}",
                                  model=tiny_llama_case.model, folder=str(tiny_llama_case.folder))


def _posted(served) -> int:
    return sum(1 for method, path in served.transport.calls if (method, path) == ("POST", "api/cli"))


def _request(served, argv, **fields) -> dict:
    body = {"argv": [str(a) for a in argv], "cwd": os.getcwd(), "token": TOKEN, **fields}
    r = served.client.post("/api/cli", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------------------------
# the same output as a cold run
# ---------------------------------------------------------------------------------------------


def test_trace_json_is_the_cold_document(cli, served):
    args = ("trace", "-p", PROMPT, "--model", served.folder, "--json")
    cold = cli(served.model, *args)
    hot = cli("no-load", "--server", served.url, *args)  # loading a model here fails the test
    assert _posted(served) == 1
    assert (hot.code, hot.err) == (0, "")
    assert cold.code == 0 and cold.out.count("\n") == 1
    assert hot.out == cold.out  # byte for byte


def test_the_reference_form_and_env_var(cli, served, monkeypatch):
    """``hexray --prompt ...`` is trace; HEXRAY_SERVER=URL works like --server; HEXRAY_MODEL is the client's."""
    cold = cli(served.model, "--prompt", PROMPT, "--model", served.folder, "--json", "-k", "3")
    monkeypatch.setenv("HEXRAY_SERVER", served.url)
    monkeypatch.setenv("HEXRAY_MODEL", served.folder)
    hot = cli("no-load", "--prompt", PROMPT, "--json", "-k", "3")
    assert _posted(served) == 1 and hot.code == 0
    assert hot.out == cold.out


@pytest.mark.parametrize("columns", [200, 64])
def test_console_view_is_the_cold_text(cli, served, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    args = ("trace", "-p", PROMPT, "--model", served.folder, "--logit-lens")
    cold = cli(served.model, *args)
    hot = cli("no-load", "--server", served.url, *args)
    assert _posted(served) == 1
    assert (hot.code, hot.err) == (0, "") and cold.code == 0
    assert hot.out == cold.out
    assert max(len(line) for line in hot.out.splitlines()) <= columns
    assert "\x1b[" not in hot.out  # not a terminal here: no colour, as cold


CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


@pytest.mark.parametrize("args", [
    ("patch", "--clean", PROMPT, "--corrupt", CORRUPT, "--target", " Mary", "--contrast", " John"),
    ("ablate", "-p", PROMPT, "-c", "L0H1,MLP1", "--target", " Mary"),
    ("heads", "--prompt", "The cat sat on the mat. The cat sat."),
    ("generate", "-p", PROMPT, "-n", "3"),
], ids=lambda a: a[0])
@pytest.mark.parametrize("json_out", [True, False], ids=["json", "console"])
def test_every_command_prints_the_cold_output(cli, served, args, json_out):
    args = (*args, "--model", served.folder) + (("--json",) if json_out else ())
    cold = cli(served.model, *args)
    hot = cli("no-load", "--server", served.url, *args)
    assert _posted(served) == 1 and cold.code == 0, cold.err
    assert (hot.code, hot.out, hot.err) == (cold.code, cold.out, cold.err)


def test_width_reaches_the_server(served):
    """The server draws at the width the client sends (so the test above cannot pass by accident)."""
    wide = _request(served, ["trace", "-p", PROMPT, "--model", served.folder], stdout={"width": 200})
    narrow = _request(served, ["trace", "-p", PROMPT, "--model", served.folder], stdout={"width": 50})
    assert wide["exit_code"] == narrow["exit_code"] == 0
    assert wide["stdout"] != narrow["stdout"]
    assert max(len(line) for line in narrow["stdout"].splitlines()) <= 50 < max(len(line) for line in wide["stdout"].splitlines())


def test_colours_follow_the_client(cli, served, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "120")
    args = ("trace", "-p", PROMPT, "--model", served.folder)
    cold = cli(served.model, *args)
    hot = cli("no-load", "--server", served.url, *args)
    assert hot.code == cold.code == 0
    assert "\x1b[" in hot.out
    assert hot.out == cold.out  # (the cold run's stderr has its spinner; a warm run shows none)
    monkeypatch.setenv("NO_COLOR", "1")  # NO_COLOR keeps bold and the like, drops colours
    assert cli("no-load", "--server", served.url, *args).out == cli(served.model, *args).out


def test_errors_and_exit_codes_are_the_cold_ones(cli, served):
    cold = cli("no-load", "trace", "--model", served.folder)  # no prompt
    hot = cli("no-load", "--server", served.url, "trace", "--model", served.folder)
    assert _posted(served) == 1
    assert_one_line_error(hot, "missing option --prompt")
    assert (hot.code, hot.out, hot.err) == (cold.code, cold.out, cold.err)
    cold = cli("no-load", "trace", "-p", PROMPT, "-k", "0")
    hot = cli("no-load", "--server", served.url, "trace", "-p", PROMPT, "-k", "0")
    assert (hot.code, hot.out, hot.err) == (cold.code, cold.out, cold.err) and hot.code == 2


def test_presets_through_the_server(cli, served):
    cold = cli("no-load", "presets", "--json")
    hot = cli("no-load", "--server", served.url, "presets", "--json")
    assert _posted(served) == 1 and hot.code == 0 and hot.out == cold.out


def test_relative_report_lands_in_the_client_cwd(cli, served, tmp_path):
    args = ("trace", "-p", PROMPT, "--model", served.folder, "--logit-debug", "--report", "out")
    cold = cli(served.model, *args)
    assert cold.code == 0 and (tmp_path / "out" / "hexray.json").is_file()
    (tmp_path / "out").rename(tmp_path / "cold")
    hot = cli("no-load", "--server", served.url, *args)
    assert hot.code == 0 and hot.out == cold.out  # "Report written to out/ (...)"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in (tmp_path / "cold").iterdir())
    assert (tmp_path / "out" / "hexray.json").read_text() == (tmp_path / "cold" / "hexray.json").read_text()


def test_cwd_is_the_requests_and_is_restored(served, tmp_path):
    """The server runs in the client's directory (which here differs from the server's) and goes back."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "prompts.txt").write_text(PROMPT + "\nThe capital of France is\n")
    before = os.getcwd()
    answer = _request(served, ["trace", "--prompts", "prompts.txt", "--model", served.folder, "--json", "--report", "set"], cwd=str(elsewhere))
    assert answer["exit_code"] == 0, answer["stderr"]
    assert os.getcwd() == before
    assert (elsewhere / "set").is_dir() and not (Path(before) / "set").exists()
    assert json.loads(answer["stdout"])["report_files"][0].startswith("set" + os.sep)  # printed as the client wrote it
    answer = _request(served, ["trace", "-p", PROMPT], cwd=str(tmp_path / "missing"))
    assert answer["exit_code"] == 2 and answer["refused"] and "cannot run in" in answer["stderr"]
    assert os.getcwd() == before


def test_env_is_the_requests_and_is_restored(served, monkeypatch):
    monkeypatch.delenv("HEXRAY_MODEL", raising=False)
    answer = _request(served, ["trace", "-p", PROMPT, "--json"], env={"HEXRAY_MODEL": served.folder, "PATH": "/nowhere"})
    assert answer["exit_code"] == 0, answer["stderr"]
    assert "HEXRAY_MODEL" not in os.environ and os.environ.get("PATH") != "/nowhere"
    answer = _request(served, ["trace", "-p", PROMPT, "--json"])  # the client has no HEXRAY_MODEL: the default model
    assert answer["exit_code"] == 2 and answer["refused"]


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------


def _request_raw(client, **body):
    return client.post("/api/cli", json={"argv": ["presets"], "cwd": os.getcwd(), **body})


def test_wrong_or_missing_token_is_403(served, tiny_llama):
    for body in ({"token": "wrong"}, {}, {"token": TOKEN[:-1]}):
        r = _request_raw(served.client, **body)
        assert r.status_code == 403
        doc = r.json()
        assert doc["ok"] is False and doc["status"] == 403 and "token" in doc["error"] and doc["hint"]
    with TestClient(create_app(tiny_llama), base_url="http://127.0.0.1") as client:  # no token at all
        assert _request_raw(client, token="").status_code == 403
        assert _request_raw(client, token="anything").status_code == 403
    assert _request_raw(served.client, token=TOKEN).status_code == 200


def test_another_page_cannot_post(served):
    r = served.client.post("/api/cli", json={"argv": ["presets"], "cwd": os.getcwd(), "token": TOKEN}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403


def test_another_model_is_refused_in_one_line(cli, served):
    hot = cli("no-load", "--server", served.url, "trace", "-p", PROMPT, "--model", "gpt2-small")
    assert_one_line_error(hot, f"this server has {served.model.name} loaded, not gpt2-small")
    assert f"--model {served.folder}" in hot.err  # the hint names the spelling that works
    hot = cli("no-load", "--server", served.url, "trace", "-p", PROMPT)  # the default model is another model too
    assert_one_line_error(hot, "not the default model")
    hot = cli("no-load", "--server", served.url, "trace", "-p", PROMPT, "--model", served.folder, "--dtype", "bfloat16")
    assert_one_line_error(hot, "in float32, not on cpu in bfloat16")


@pytest.mark.parametrize("argv", [["serve"], ["serve", "--port", "9"], ["debug"], ["nonsense"]])
def test_serve_and_debug_are_refused(served, argv):
    answer = _request(served, argv)
    assert answer["exit_code"] == 2 and answer["refused"] and answer["stdout"] == ""
    assert answer["stderr"].count("\n") == 1 and "does not run through a server" in answer["stderr"]


def test_server_flag_with_serve_is_a_mistake(cli, cache):
    r = cli("no-load", "--server", "http://127.0.0.1:9", "serve")
    assert_one_line_error(r, "hexray serve does not run through a server")
    assert_one_line_error(cli("no-load", "trace", "--server"), "--server needs a URL or auto")


# ---------------------------------------------------------------------------------------------
# finding a server
# ---------------------------------------------------------------------------------------------


def test_auto_finds_the_live_server(cli, served, monkeypatch):
    monkeypatch.setenv("HEXRAY_SERVER", "auto")
    args = ("trace", "-p", PROMPT, "--model", served.folder, "--json")
    hot = cli("no-load", *args)
    assert ("GET", "api/health") in served.transport.calls and _posted(served) == 1
    assert hot.code == 0 and hot.out == cli(served.model, "--server", "off", *args).out


def test_auto_without_a_discovery_file_runs_cold(cli, tiny_llama, cache, monkeypatch):
    monkeypatch.setattr(warm, "transport", NoServer())
    args = ("trace", "-p", PROMPT, "--json")
    cold = cli(tiny_llama, *args)
    for how in (("--server", "auto"), ("--server=auto",)):
        hot = cli(tiny_llama, *how, *args)
        assert (hot.code, hot.out, hot.err) == (cold.code, cold.out, cold.err)
    monkeypatch.setenv("HEXRAY_SERVER", "auto")
    assert cli(tiny_llama, *args).out == cold.out


def _write_discovery(cache: Path, port: int, pid: int, token: str = TOKEN) -> Path:
    (cache / "serve").mkdir(parents=True, exist_ok=True)
    path = cache / "serve" / f"{port}.json"
    path.write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "pid": pid, "model": "x", "token": token}))
    return path


def test_a_stale_discovery_file_is_ignored(cli, tiny_llama, cache, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_discovery(cache, PORT, dead.pid)
    monkeypatch.setattr(warm, "transport", NoServer())  # a dead pid is not even asked
    cold = cli(tiny_llama, "trace", "-p", PROMPT, "--json")
    assert cli(tiny_llama, "--server", "auto", "trace", "-p", PROMPT, "--json").out == cold.out
    (cache / "serve" / "oops.json").write_text("{not json")
    assert cli(tiny_llama, "--server", "auto", "trace", "-p", PROMPT, "--json").out == cold.out


def test_a_live_pid_that_does_not_answer_runs_cold(cli, tiny_llama, cache):
    _write_discovery(cache, _free_port(), os.getpid())  # our own pid, but nothing listens on the port
    r = cli(tiny_llama, "--server", "auto", "trace", "-p", PROMPT, "--json")
    assert r.code == 0 and r.out == cli(tiny_llama, "trace", "-p", PROMPT, "--json").out


def test_auto_runs_cold_when_the_server_has_another_model(cli, served, tiny_gpt2):
    hot = cli(tiny_gpt2, "--server", "auto", "trace", "-p", PROMPT, "--model", "gpt2-small", "--json")
    assert _posted(served) == 1  # asked, refused, then loaded here
    assert hot.code == 0 and hot.err == ""
    assert hot.out == cli(tiny_gpt2, "trace", "-p", PROMPT, "--model", "gpt2-small", "--json").out


def test_an_unreachable_server_is_one_line(cli, cache):
    port = _free_port()
    _write_discovery(cache, port, os.getpid())
    r = cli("no-load", "--server", f"http://127.0.0.1:{port}", "trace", "-p", PROMPT)
    assert_one_line_error(r, f"cannot reach the HexRay server at http://127.0.0.1:{port}")
    r = cli("no-load", "--server", str(_free_port()), "trace", "-p", PROMPT)  # no discovery file: no token to send
    assert_one_line_error(r, "no hexray serve of yours is advertised at http://127.0.0.1:")


def test_a_token_is_never_sent_to_another_host(cache):
    _write_discovery(cache, PORT, os.getpid())
    assert warm._token_for(f"http://localhost:{PORT}") == TOKEN
    assert warm._token_for(f"http://192.0.2.7:{PORT}") is None
    assert warm._token_for(f"http://127.0.0.1:{PORT + 1}") is None


# ---------------------------------------------------------------------------------------------
# hexray serve's discovery file; the client's imports
# ---------------------------------------------------------------------------------------------


def test_serve_advertises_itself_and_cleans_up(cli, tiny_llama, tiny_llama_case, cache, monkeypatch):
    import uvicorn

    port = _free_port()
    seen = {}

    def fake_run(app, host, port, log_level):  # instead of listening: the discovery file, and a CLI command on the app
        path = cache / "serve" / f"{port}.json"
        doc = json.loads(path.read_text())
        seen.update(doc, mode=path.stat().st_mode & 0o777, dir_mode=path.parent.stat().st_mode & 0o777)
        with TestClient(app, base_url="http://127.0.0.1") as client:
            r = client.post("/api/cli", json={"argv": ["trace", "-p", PROMPT, "--model", str(tiny_llama_case.folder), "--json"], "cwd": os.getcwd(), "token": doc["token"]})
            seen["answer"] = r.json()
            seen["wrong"] = client.post("/api/cli", json={"argv": ["presets"], "cwd": os.getcwd(), "token": "x"}).status_code

    monkeypatch.setattr(uvicorn, "run", fake_run)
    r = cli(tiny_llama, "serve", "--port", port, "--model", tiny_llama_case.folder)
    assert r.code == 0, r.err
    assert seen["url"] == f"http://127.0.0.1:{port}" and seen["pid"] == os.getpid() and seen["model"] == tiny_llama.name
    assert len(seen["token"]) >= 40 and seen["mode"] == 0o600 and seen["dir_mode"] == 0o700
    assert seen["answer"]["exit_code"] == 0 and json.loads(seen["answer"]["stdout"])["model"] == tiny_llama.name
    assert seen["wrong"] == 403
    assert not (cache / "serve" / f"{port}.json").exists()  # removed on shutdown


def test_serve_without_a_writable_cache_only_warns(cli, tiny_llama, tmp_path, monkeypatch):
    import uvicorn

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "a-file"))  # no folder can be made under it
    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.append(kw))
    r = cli(tiny_llama, "serve", "--port", _free_port())
    assert r.code == 0 and len(ran) == 1
    assert "warning:" in r.err and "hexray --server cannot find this server" in r.err
    assert not list(tmp_path.glob(".*.tmp"))


def test_advertise_leaves_a_newer_servers_file(cache):
    with warm.advertise("0.0.0.0", PORT, "m", "mine") as path:
        assert json.loads(path.read_text())["url"] == f"http://127.0.0.1:{PORT}"  # a wildcard bind is reached on loopback
        _write_discovery(cache, PORT, os.getpid(), token="newer")
    assert json.loads(path.read_text())["token"] == "newer"


def test_cache_root_is_the_loaders(monkeypatch, tmp_path):
    from hexray.models.loading import cache_root

    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "c"))
    assert warm.cache_root() == cache_root()
    monkeypatch.delenv("HEXRAY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert warm.cache_root() == cache_root() == tmp_path / "xdg" / "hexray"


def test_the_warm_path_imports_neither_torch_nor_the_cli():
    code = "import sys, hexray.warm, hexray; print(sorted(m for m in ('torch', 'transformers', 'typer', 'hexray.cli', 'fastapi') if m in sys.modules))"
    src = str(Path(hexray.cli.__file__).parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=src, env={**os.environ, "PYTHONPATH": src}).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# a real server over HTTP
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def real_server(tiny_llama_case, cache):
    """uvicorn on a free loopback port in a thread, advertised in the private cache."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(tiny_llama_case.model, time_limit=60, cli_token=TOKEN), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        with warm.advertise("127.0.0.1", port, tiny_llama_case.model.name, TOKEN):
            yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, folder=str(tiny_llama_case.folder), model=tiny_llama_case.model)
    finally:
        server.should_exit = True
        thread.join(10)


def test_over_real_http(cli, real_server):
    args = ("trace", "-p", PROMPT, "--model", real_server.folder, "--json")
    cold = cli(real_server.model, *args)
    for how in (("--server", real_server.url), ("--server", "auto"), ("--server", f"localhost:{real_server.port}")):
        hot = cli("no-load", *how, *args)
        assert (hot.code, hot.out, hot.err) == (0, cold.out, "")


def test_a_client_that_hangs_up_frees_the_model(real_server, monkeypatch):
    from hexray.tracing.engine import check_stop

    stopped = threading.Event()

    def endless(model, key, request, reraise=()):
        try:
            while True:
                check_stop()  # what every forward pass does before each block
                time.sleep(0.01)
        finally:
            stopped.set()

    monkeypatch.setattr(warm, "run_cli", endless)
    conn = http.client.HTTPConnection("127.0.0.1", real_server.port, timeout=5)
    conn.request("POST", "/api/cli", body=json.dumps({"argv": ["presets"], "cwd": os.getcwd(), "token": TOKEN}), headers={"Content-Type": "application/json"})
    _, health = warm.transport.request("GET", real_server.url + "/api/health", timeout=2)
    deadline = time.monotonic() + 5
    while not health["busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
        _, health = warm.transport.request("GET", real_server.url + "/api/health", timeout=2)
    assert health["busy"]
    conn.close()  # Ctrl-C on the client
    assert stopped.wait(5)
    deadline = time.monotonic() + 5
    while warm.transport.request("GET", real_server.url + "/api/health", timeout=2)[1]["busy"]:
        assert time.monotonic() < deadline, "the job outlived its client"
        time.sleep(0.02)


def test_sigterm_still_removes_the_discovery_file(cache):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        with warm.advertise("127.0.0.1", PORT, "m", TOKEN) as path:
            assert path.is_file()
            signal.raise_signal(signal.SIGTERM)  # what uvicorn does after its graceful shutdown
    assert stopped.value.code == 143
    assert not path.exists()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_real_hexray_serve(cli, tiny_llama_case, cache, tmp_path):
    """``hexray serve`` in its own process, ``hexray --server auto`` in another: the cold document; SIGTERM removes the advert."""
    src = str(Path(hexray.cli.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1", "HEXRAY_CACHE": str(cache)}
    env.pop("COLUMNS", None)
    port = _free_port()
    serve = subprocess.Popen([sys.executable, "-m", "hexray", "serve", "--model", str(tiny_llama_case.folder), "--port", str(port)],
                             cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    advert = cache / "serve" / f"{port}.json"
    try:
        deadline = time.monotonic() + 120
        while not warm.live_servers():
            assert serve.poll() is None, serve.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "hexray serve did not come up"
            time.sleep(0.2)
        assert advert.is_file()
        client_dir = tmp_path / "client"
        client_dir.mkdir()
        args = ["trace", "-p", PROMPT, "--model", str(tiny_llama_case.folder), "--json", "--logit-debug", "--report", "out"]
        hot = subprocess.run([sys.executable, "-m", "hexray", "--server", "auto", *args], cwd=client_dir, env=env, capture_output=True, text=True, timeout=60)
        assert (hot.returncode, hot.stderr) == (0, "")
        assert (client_dir / "out" / "hexray.json").is_file() and not (tmp_path / "out").exists()
        cold = cli(tiny_llama_case.model, *args)  # in tmp_path
        assert hot.stdout == cold.out
    finally:
        serve.terminate()
        code = serve.wait(30)
    assert code == 143 and not advert.exists()
