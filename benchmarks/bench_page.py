"""How fast the lab's page draws a long prompt (run by hand: `python benchmarks/bench_page.py`).

Starts a real `hexray serve` (the embedded model, 127.0.0.1) and opens the lab in Debian's chromium
with a ~256-token prompt in the URL, three times. For each load it reports what the page measured:
the analysis round trip (request sent → final document received, the model's work included), the
time to the first layer drawn (the stream's first block, drawn while the forward pass still runs),
and the drawing of every panel after the document arrived, plus the document's size. Figures are
measured once in this run; nothing is asserted about them.

To compare with an older page, run it with that checkout's sources first on the path, e.g.
``PYTHONPATH=/tmp/old/src python benchmarks/bench_page.py`` (the server is a subprocess).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import urllib.parse
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from bench_server import Server

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
TEXT = ("The quick brown fox jumps over the lazy dog while Mary and John walk to the old market near the river, "
        "where traders sell apples, bread and cheese to visitors from distant towns. ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--loads", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(None, 600, Path(tmp))
        try:
            server.wait_ready(300)
            with httpx.Client(timeout=60) as client:  # a prompt of exactly --tokens tokens
                prompt = TEXT * 20
                while True:
                    n = len(client.post(f"{server.url}/api/analyze", json={"prompt": prompt, "residual": False, "logit_lens": False}).json()["tokens"])
                    if n <= args.tokens:
                        break
                    prompt = prompt[: int(len(prompt) * args.tokens / n) - 1]
            url = f"{server.url}/?" + urllib.parse.urlencode({"prompt": prompt})
            runs = []
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                for _ in range(args.loads):
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    page.goto(url)
                    page.wait_for_function("window.hexrayLab && window.hexrayLab.analyses > 0", timeout=120_000)
                    timing = page.evaluate("window.hexrayTimings")
                    size = page.evaluate("JSON.stringify(window.hexrayLab.docs['dla-panel']).length")
                    runs.append({**timing, "doc_bytes": size, "tokens": n})
                    page.close()
                browser.close()
        finally:
            server.stop()
    for r in runs:
        first = f"first layer drawn at {r['firstLayerMs']:6.0f} ms, " if r.get("firstLayerMs") is not None else "(no live layers), "
        print(f"{r['tokens']} tokens: {first}analysis round trip {r['analysisMs']:7.0f} ms, page drawn in {r['renderMs']:5.1f} ms, document {r['doc_bytes'] / 1024:.0f} KiB")
    firsts = [r["firstLayerMs"] for r in runs if r.get("firstLayerMs") is not None]
    print(f"median: analysis {statistics.median(r['analysisMs'] for r in runs):.0f} ms, drawing {statistics.median(r['renderMs'] for r in runs):.1f} ms"
          + (f", first layer {statistics.median(firsts):.0f} ms" if firsts else ""))
    print(json.dumps(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
