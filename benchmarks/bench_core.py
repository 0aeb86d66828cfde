"""Core speed figures for the closing note (run by hand: `make bench` or `python benchmarks/bench_core.py`).

(a) warm CLI wall time of `hexray --prompt IOI --top-k-attribution 10` against `python -c` that
    imports torch + transformers, loads the same cached weights and runs one plain HF forward;
(b) in process: one traced forward + head-level attribution + logit lens, against one plain HF
    forward of the same model on the same tokens;
(c) loading the embedded model from the safetensors cache against from the GGUF (fresh cache).

`python benchmarks/bench_core.py --model gemma3-270m` gives the same figures for Gemma 3 270M.

Every figure is a median over repeats measured in this one run; ratios compare figures from it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IOI = "When Mary and John went to the store, John gave a drink to"
MODEL = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else None
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(cmd: list[str], env: dict | None = None) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def main() -> None:
    import torch

    import hexray
    from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution
    from hexray.analysis.lens import lens_hooks, logit_lens

    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {sys.version.split()[0]}")
    model = hexray.load_model(MODEL)  # fills the cache if needed
    folder = Path(model.checkpoint)
    print(f"model {model.name}")

    # (b) in-process
    ids = torch.tensor([model.encode(IOI)])
    hf = model.bridge.original_model
    hooks = attribution_hooks(model.spec, "head") | lens_hooks(model.spec)

    def plain():
        with torch.inference_mode():
            hf(ids)

    def traced():
        trace = hexray.run_trace(model, IOI, hooks)
        direct_logit_attribution(model, trace, granularity="head")
        logit_lens(model, trace)

    for _ in range(3):  # warm up kernels and caches
        plain()
        traced()
    t_plain = median_time(plain, 15)
    t_traced = median_time(traced, 15)
    print(f"(b) plain HF forward            {1000 * t_plain:8.1f} ms")
    print(f"(b) trace + head DLA + lens     {1000 * t_traced:8.1f} ms   ratio {t_traced / t_plain:.2f}x")

    # (a) warm CLI against a bare python -c forward
    baseline = (
        "import torch, transformers; "
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}); "
        f"t = transformers.AutoTokenizer.from_pretrained({str(folder)!r}); "
        f"m(**t({IOI!r}, return_tensors='pt'))"
    )
    cli = [str(BIN / "hexray"), "--prompt", IOI, "--top-k-attribution", "10", *(["--model", MODEL] if MODEL else [])]
    run(cli)  # warm the OS file cache
    t_cli = median_time(lambda: run(cli), 3)
    t_base = median_time(lambda: run([sys.executable, "-c", baseline]), 3)
    print(f"(a) python -c import+load+forward {t_base:6.2f} s")
    print(f"(a) hexray --top-k-attribution 10 {t_cli:6.2f} s   ratio {t_cli / t_base:.2f}x")

    # (c) load from cache vs from GGUF
    t_cached = median_time(lambda: hexray.load_model(MODEL), 3)
    with tempfile.TemporaryDirectory() as fresh:
        env = {**os.environ, "HEXRAY_CACHE": fresh}
        code = f"import hexray, time; t = time.perf_counter(); hexray.load_model({MODEL!r}); print(time.perf_counter() - t)"
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
        t_gguf = float(out.stdout.strip().splitlines()[-1])
    print(f"(c) load from safetensors cache {t_cached:6.2f} s")
    print(f"(c) load from GGUF (fresh cache) {t_gguf:6.2f} s   ratio {t_gguf / t_cached:.1f}x")


if __name__ == "__main__":
    main()
