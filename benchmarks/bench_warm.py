"""Cold vs warm one-shot CLI calls (run by hand: `python benchmarks/bench_warm.py [--n 5] [--model M] [--json PATH]`).

Times N cold `hexray trace -p PROMPT --json` subprocesses (each imports torch and loads the model),
then starts a `hexray serve` (bench_server.Server: a free loopback port, HF_HUB_OFFLINE=1) and
times N warm ones with `--server URL`, N with `--server auto` (the discovery file) and N warm
`presets --json` (no model work: what a warm call costs by itself), each a fresh
subprocess as a user's shell would start it. Every call must exit 0 and print the cold run's
document byte for byte. Prints each call's seconds, the medians and the cold/warm ratio; after the
server stops, checks that its discovery file is gone. Every figure is measured once in this run;
nothing is asserted about timings. Exit code 1 when a call fails or a warm document differs.

The subprocesses run in a temporary folder: from the repository root `python -m hexray` would find
the hexray.py launcher before the package (and import the full CLI, torch included, on every call).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import Server, server_command  # noqa: E402

from hexray.warm import discovery_dir  # noqa: E402  (light: no torch)

PROMPT = "When Mary and John went to the store, John gave a drink to"


def timed(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench_warm: {' '.join(cmd)} exited {done.returncode}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def series(label: str, cmd: list[str], n: int, env: dict[str, str], cwd: str, expected: str | None) -> tuple[list[float], str, bool]:
    times, same, out = [], True, ""
    for i in range(n):
        seconds, out = timed(cmd, env, cwd)
        times.append(seconds)
        if expected is not None and out != expected:
            same = False
        print(f"  {label:<14} call {i + 1}: {seconds:6.2f} s", flush=True)
    return times, out, same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5, help="calls of each kind (default 5)")
    parser.add_argument("--model", default=None, help="model to trace and serve (default: the embedded one)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--json", dest="json_path", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if k not in ("HEXRAY_SERVER", "HEXRAY_MODEL", "COLUMNS")}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    trace = ["trace", "-p", args.prompt, "--json"] + (["--model", args.model] if args.model else [])
    work = tempfile.mkdtemp(prefix="bench-warm-")
    os.chdir(work)  # the server inherits it too
    hexray = server_command()
    print(f"bench_warm: {' '.join(hexray)} (cwd {work}), {args.n} calls each, prompt {args.prompt!r}")

    print("cold (a fresh process loads the model every time):")
    cold, expected, _ = series("cold", hexray + trace, args.n, env, work, None)

    server = Server(args.model, 600.0, Path(work) / "server-logs")
    try:
        startup, health = server.wait_ready(args.startup_timeout)
        print(f"server: {health['model']} ready on {server.url} after {startup:.2f} s")
        advert = discovery_dir() / f"{server.port}.json"
        print(f"discovery file {advert}: {'present' if advert.is_file() else 'MISSING'}")
        print("warm (--server URL):")
        warm, _, warm_same = series("warm URL", hexray + ["--server", server.url] + trace, args.n, env, work, expected)
        print("warm (--server auto):")
        auto, _, auto_same = series("warm auto", hexray + ["--server", "auto"] + trace, args.n, env, work, expected)
        print("warm presets (--server URL; no model work: the client's and the round trip's share):")
        floor, _, _ = series("warm presets", hexray + ["--server", server.url, "presets", "--json"], args.n, env, work, None)
    finally:
        server.stop()
    gone = not advert.exists()

    med = {k: statistics.median(v) for k, v in (("cold", cold), ("warm", warm), ("auto", auto))}
    print(f"\nmedian: cold {med['cold']:.2f} s, warm --server URL {med['warm']:.2f} s, warm --server auto {med['auto']:.2f} s")
    print(f"ratio cold/warm: {med['cold'] / med['warm']:.1f}x (URL), {med['cold'] / med['auto']:.1f}x (auto)")
    print(f"a warm call with no model work (presets): median {statistics.median(floor):.2f} s")
    print(f"warm documents identical to the cold one: URL {'yes' if warm_same else 'NO'}, auto {'yes' if auto_same else 'NO'}")
    print(f"discovery file removed when the server stopped: {'yes' if gone else 'NO'}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"cold_s": cold, "warm_url_s": warm, "warm_auto_s": auto, "warm_presets_s": floor, "median_s": med,
                                                    "server_startup_s": startup, "identical": warm_same and auto_same, "discovery_removed": gone}, indent=2))
    return 0 if warm_same and auto_same else 1


if __name__ == "__main__":
    sys.exit(main())
