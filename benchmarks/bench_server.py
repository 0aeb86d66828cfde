"""API server load figures (run by hand: `python benchmarks/bench_server.py [--quick] [--json PATH]`).

Starts a real `hexray serve` on 127.0.0.1 (a free port, HF_HUB_OFFLINE=1), waits for /api/health, then:
(a) one POST /api/analyze alone (after a warm-up), for comparison;
(b) load: 4 httpx clients send 20 full-page analyses (5 each, one thread per request) at once (granularity
    "head", logit lens and residual on), cycling through prompts with known answers on the embedded
    model (IOI -> " Mary", "The capital of France is" -> " Paris"); every answer must be HTTP 200 with
    that predicted token; per-request latency p50 / p95 / max and the wall time for all of them;
(c) health during a long sweep: a POST /api/patch (IOI clean/corrupt, exact) runs in the background
    while GET /api/health is polled every 50 ms; polls, how many said busy, health latency, sweep time.

(d) limits that stop work: on a second server with --time-limit 3, a long sweep answers 504; how long
    until /api/health says the model is free. Then the same sweep over /ws/patch, the socket closed
    after 2 s: how long until the model is free;
(e) the worst request the schema allows for memory, POST /api/heads {"seq_len": 512, "sequences": 32}
    (the induction data is 32 x 1024 tokens with every layer's patterns): the server's peak RSS
    (VmHWM) before and after, against the 1.5 GB activation budget.

The model serves one request at a time, so (b)'s latencies are mostly queueing; (c) shows whether the
event loop stays free while the model works. Every figure is measured once in this run; nothing is
asserted about timings. The exit code is 1 when the server does not start or an answer is wrong or
fails. The expected tokens are the embedded model's; with --model the "correct" count says how many
answers matched them. `--quick` is a smoke run: 8 analyses (2 per client) and the "heads" sweep.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"  # loopback only: the benchmark never talks to any other address
IOI = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
PROMPTS = [(IOI, " Mary"), ("The capital of France is", " Paris")]
ANALYZE = dict(granularity="head", logit_lens=True, residual=True, top_k=20, predictions_k=5, lens_window=48)  # what the lab asks for
CLIENTS = 4
POLL_S = 0.05


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command() -> list[str]:
    if importlib.util.find_spec("hexray.__main__") is not None:
        return [sys.executable, "-m", "hexray"]
    script = Path(sys.executable).parent / "hexray"
    if script.exists():
        return [str(script)]
    sys.exit("bench_server: cannot find `python -m hexray` or the hexray script next to the interpreter")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


class Server:
    """A `hexray serve` subprocess on a free loopback port; always stopped by ``stop``."""

    def __init__(self, model: str | None, time_limit: float, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = server_command() + ["serve", "--host", HOST, "--port", str(self.port), "--time-limit", str(time_limit)]
        if model:
            cmd += ["--model", model]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / "server.stderr"
        self.stdout_path = log_dir / "server.stdout"
        # files, not pipes: nobody reads a pipe while the benchmark runs, and a full pipe would block the server
        self._err = open(self.stderr_path, "wb")
        self._out = open(self.stdout_path, "wb")
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, env=env)

    def wait_ready(self, timeout: float) -> tuple[float, dict]:
        """Seconds until /api/health answers 200 (and its document); exits with the server's stderr tail on failure."""
        start = time.perf_counter()
        deadline = start + timeout
        with httpx.Client(timeout=5.0) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    self.fail(f"the server exited with code {self.proc.returncode} before it answered /api/health")
                try:
                    r = client.get(f"{self.url}/api/health")
                    if r.status_code == 200:
                        return time.perf_counter() - start, r.json()
                except httpx.TransportError:
                    pass  # not listening yet
                time.sleep(0.25)
        self.fail(f"/api/health did not answer within {timeout:.0f} s")
        raise AssertionError("unreachable")

    def fail(self, why: str) -> None:
        self.stop()
        print(f"bench_server: {why}\n  command: {' '.join(self.cmd)}\n  server stderr (tail):", file=sys.stderr)
        print("    " + tail(self.stderr_path).replace("\n", "\n    "), file=sys.stderr)
        raise SystemExit(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # a model call still running in a worker thread holds up a graceful exit
                self.proc.wait(timeout=15)
        for f in (self._err, self._out):
            f.close()


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation between closest ranks); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats(values: list[float]) -> dict:
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95), "max": max(values, default=float("nan")),
            "mean": statistics.fmean(values) if values else float("nan")}


def analyze(client: httpx.Client, url: str, prompt: str, expected: str) -> dict:
    """One POST /api/analyze: latency, status, predicted token, and whether it is ``expected``."""
    start = time.perf_counter()
    try:
        r = client.post(f"{url}/api/analyze", json={"prompt": prompt, **ANALYZE})
        latency = time.perf_counter() - start
        status = r.status_code
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        token = (body.get("target") or {}).get("token") if status == 200 else None
        error = None if status == 200 else str(body.get("error") or r.text[:200])
    except httpx.HTTPError as exc:
        latency, status, token, error = time.perf_counter() - start, None, None, f"{type(exc).__name__}: {exc}"
    return {"prompt": prompt, "expected": expected, "token": token, "status": status, "latency_s": latency,
            "correct": status == 200 and token == expected, "error": error}


def single_request(url: str, timeout: float) -> dict:
    with httpx.Client(timeout=timeout) as client:
        warm = analyze(client, url, *PROMPTS[0])
        timed = analyze(client, url, *PROMPTS[0])
    return {"warmup": warm, "timed": timed}


def load_phase(url: str, per_client: int, timeout: float) -> dict:
    """CLIENTS httpx clients; every request gets its own thread on its client's pool, all released at once."""
    n = CLIENTS * per_client
    results: list[dict | None] = [None] * n
    barrier = threading.Barrier(n + 1)
    clients = [httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=per_client)) for _ in range(CLIENTS)]

    def send(i: int) -> None:
        prompt, expected = PROMPTS[i % len(PROMPTS)]
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            return
        results[i] = analyze(clients[i // per_client], url, prompt, expected)

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(n)]
    try:
        for t in threads:
            t.start()
        barrier.wait(timeout=60)
        start = time.perf_counter()
        deadline = start + timeout + 60  # every request is in flight at once, so one timeout bounds them all
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.perf_counter()))
        wall = time.perf_counter() - start
    finally:
        for c in clients:
            c.close()
    flat = [r for r in results if r is not None]
    return {"clients": CLIENTS, "requests": n, "answered": len(flat), "hung": sum(t.is_alive() for t in threads),
            "ok": sum(r["status"] == 200 for r in flat), "correct": sum(r["correct"] for r in flat), "wall_s": wall,
            "latency_s": stats([r["latency_s"] for r in flat]), "results": flat}


def sweep_phase(url: str, sweep: str, timeout: float) -> dict:
    """A patching sweep in the background; /api/health polled every POLL_S until it ends (bounded)."""
    out: dict = {}
    body = {"clean": IOI, "corrupt": IOI_CORRUPT, "target": " Mary", "contrast": " John", "sweep": sweep, "method": "exact"}

    def run_sweep() -> None:
        start = time.perf_counter()
        try:
            with httpx.Client(timeout=timeout) as client:
                r = client.post(f"{url}/api/patch", json=body)
            out["status"] = r.status_code
            doc = r.json()
            out["sites"] = len(doc.get("results", [])) if r.status_code == 200 else None
            out["error"] = None if r.status_code == 200 else doc.get("error")
        except (httpx.HTTPError, ValueError) as exc:
            out["status"], out["sites"], out["error"] = None, None, f"{type(exc).__name__}: {exc}"
        out["duration_s"] = time.perf_counter() - start

    thread = threading.Thread(target=run_sweep, daemon=True)
    latencies: list[float] = []
    busy = errors = 0
    deadline = time.perf_counter() + timeout + 30
    max_polls = int((timeout + 30) / POLL_S) + 1
    with httpx.Client(timeout=10.0) as client:
        thread.start()
        polls = 0
        while thread.is_alive() and polls < max_polls and time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                r = client.get(f"{url}/api/health")
                latencies.append(time.perf_counter() - start)
                if r.status_code == 200:
                    busy += bool(r.json().get("busy"))
                else:
                    errors += 1
            except (httpx.HTTPError, ValueError):
                errors += 1
            polls += 1
            time.sleep(max(0.0, POLL_S - (time.perf_counter() - start)))
    thread.join(timeout=5)
    return {"sweep": sweep, "status": out.get("status"), "sites": out.get("sites"), "error": out.get("error"),
            "duration_s": out.get("duration_s"), "finished": not thread.is_alive(), "polls": polls, "busy": busy,
            "health_errors": errors, "health_latency_s": stats(latencies)}


def until_free(client: httpx.Client, url: str, since: float, limit: float = 60.0) -> float:
    """Seconds from ``since`` until /api/health says the model is no longer busy."""
    while time.perf_counter() - since < limit:
        if not client.get(f"{url}/api/health").json()["busy"]:
            return time.perf_counter() - since
        time.sleep(0.02)
    return float("nan")


def stop_phase(url: str) -> dict:
    """(d): a 504, then a closed socket, each during a long sweep; seconds until the model is free."""
    import websockets.sync.client as ws_client

    body = {"clean": IOI, "corrupt": IOI_CORRUPT, "sweep": "heads-pos,resid,attn,mlp", "method": "exact"}
    with httpx.Client(timeout=120.0) as client:
        start = time.perf_counter()
        r = client.post(f"{url}/api/patch", json=body)
        answered = time.perf_counter()
        after_504 = until_free(client, url, answered)
        with ws_client.connect(url.replace("http", "ws") + "/ws/patch", origin=url) as ws:
            ws.send(json.dumps(body))
            time.sleep(2.0)
            busy = client.get(f"{url}/api/health").json()["busy"]
        closed = time.perf_counter()
        after_close = until_free(client, url, closed)
    return {"status": r.status_code, "answered_after_s": answered - start, "free_after_504_s": after_504, "busy_before_close": busy, "free_after_close_s": after_close}


def peak_rss(pid: int) -> float:
    """The process's peak resident memory (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) * 1024
    return float("nan")


def memory_phase(url: str, pid: int, timeout: float) -> dict:
    """(e): the worst request for memory the schema allows; the server's peak RSS before and after."""
    before = peak_rss(pid)
    with httpx.Client(timeout=timeout) as client:
        start = time.perf_counter()
        r = client.post(f"{url}/api/heads", json={"seq_len": 512, "sequences": 32})
    return {"status": r.status_code, "seconds": time.perf_counter() - start, "peak_before": before, "peak_after": peak_rss(pid)}


def ms(x: float | None) -> str:
    return "    -" if x is None or x != x else f"{x * 1000:7.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model to serve (default: the embedded one)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 analyses per client and the 'heads' sweep")
    parser.add_argument("--sweep", default=None, help="patching sweep for the health phase (default: heads-pos; --quick: heads)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /api/health")
    parser.add_argument("--time-limit", type=float, default=600.0, help="the server's --time-limit, and the client timeout")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    per_client = 2 if args.quick else 5
    sweep = args.sweep or ("heads" if args.quick else "heads-pos")

    with tempfile.TemporaryDirectory(prefix="bench_server_") as tmp:
        server = Server(args.model, args.time_limit, Path(tmp))
        try:
            startup, health = server.wait_ready(args.startup_timeout)
            info = health.get("model_info", {})
            print(f"server: {health.get('model')} ({info.get('n_layers')} layers x {info.get('n_heads')} heads) "
                  f"on {server.url}, ready in {startup:.1f} s")
            single = single_request(server.url, args.time_limit)
            load = load_phase(server.url, per_client, args.time_limit)
            sweeping = sweep_phase(server.url, sweep, args.time_limit)
            memory = None if args.quick else memory_phase(server.url, server.proc.pid, args.time_limit)
        except KeyboardInterrupt:
            server.stop()
            raise
        finally:
            server.stop()
        server_errors = [line for line in tail(server.stderr_path, 200).splitlines() if "Traceback" in line or "ERROR" in line]
        stopping = None
        if not args.quick:
            limited = Server(args.model, 3.0, Path(tmp) / "limited")
            try:
                limited.wait_ready(args.startup_timeout)
                stopping = stop_phase(limited.url)
            finally:
                limited.stop()

    alone = single["timed"]
    lat = load["latency_s"]
    h = sweeping["health_latency_s"]
    print(f"(a) one analysis alone (after warm-up): {ms(alone['latency_s'])}  -> {alone['token']!r} "
          f"({'correct' if alone['correct'] else 'WRONG: ' + str(alone['error'] or alone['expected'])})")
    print(f"(b) {load['requests']} analyses from {load['clients']} clients at once: wall {load['wall_s']:.2f} s; "
          f"HTTP 200: {load['ok']}/{load['requests']}, correct token: {load['correct']}/{load['requests']}")
    print(f"    latency p50 {ms(lat['p50'])}  p95 {ms(lat['p95'])}  max {ms(lat['max'])}  "
          f"(max / alone: {lat['max'] / alone['latency_s']:.1f}x)")
    for r in load["results"]:
        if not r["correct"]:
            print(f"    failed: {r['prompt']!r} -> status {r['status']}, token {r['token']!r}, {r['error']}")
    dur = sweeping["duration_s"]
    print(f"(c) patch sweep {sweeping['sweep']!r} (exact, {sweeping['sites']} sites): "
          f"{'-' if dur is None else f'{dur:.2f} s'}, status {sweeping['status']}"
          + ("" if sweeping["finished"] else " (NOT finished by the deadline)")
          + (f", error: {sweeping['error']}" if sweeping["error"] else ""))
    print(f"    health polls: {sweeping['polls']} (busy=true: {sweeping['busy']}, failed: {sweeping['health_errors']}); "
          f"latency p50 {ms(h['p50'])}  p95 {ms(h['p95'])}  max {ms(h['max'])}")
    if stopping is not None:
        print(f"(d) a sweep past --time-limit 3: HTTP {stopping['status']} after {stopping['answered_after_s']:.2f} s; "
              f"the model free {stopping['free_after_504_s']:.2f} s after the 504; a /ws/patch closed mid-sweep "
              f"(busy then: {stopping['busy_before_close']}): free {stopping['free_after_close_s']:.2f} s after the close")
    if memory is not None:
        print(f"(e) POST /api/heads seq_len 512, 32 sequences: HTTP {memory['status']} in {memory['seconds']:.1f} s; "
              f"server peak RSS {memory['peak_before'] / 1e9:.2f} GB before, {memory['peak_after'] / 1e9:.2f} GB after")
    if server_errors:
        print(f"server stderr had {len(server_errors)} error line(s), e.g. {server_errors[0]!r}")

    if args.json_path:
        figures = {"model": health.get("model"), "quick": args.quick, "startup_s": startup, "single": single,
                   "load": load, "sweep": sweeping, "stop": stopping, "memory": memory, "server_error_lines": server_errors}
        Path(args.json_path).write_text(json.dumps(figures, indent=2, allow_nan=True) + "\n")
        print(f"figures written to {args.json_path}")

    ok = (alone["correct"] and load["correct"] == load["requests"] and sweeping["status"] == 200 and sweeping["finished"]
          and not sweeping["health_errors"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
