"""Neuroscope index figures (run by hand: `.venv/bin/python benchmarks/bench_index.py [--tokens N] [--ray-tokens N]`).

On the embedded model (SmolLM2-135M) and the default corpus, in one run:

(1) indexing tokens/s against a plain HF forward over the same batches (``bridge.original_model``
    under ``torch.inference_mode``, full forward with logits), for neurons + one dictionary
    (resid.12 when the defaults are built, else neurons alone), and where the time goes: the same
    passes through the engine with hooks that do nothing (the hook layer's cost) and with the
    statistics (the neuroscope's own cost). Repeats run round-robin; each figure is the median.
(2) Ray Data (local, 2 actors) against the local engine on a slice of the corpus: the ratio of
    their forward phases, and whether the two indexes are equal row for row.
(3) the index's size per million tokens, and the latency of a neuron page, a token look-up and a
    prompt-position look-up (median of repeated calls on the warm index).

Figures are ratios measured in this one run on this machine; nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens indexed for (1) and (3)")
    parser.add_argument("--ray-tokens", type=int, default=8_000, help="tokens for (2); 0 skips Ray")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from hexray.corpus.packs import token_pack
    from hexray.features.store import model_dictionaries_root
    from hexray.models.loading import load_model
    from hexray.neuroscope import build_index, open_index, search_position, search_token, unit_page
    from hexray.neuroscope.index import _MAX_BATCH_CONTEXTS, each_batch, fold_pack
    from hexray.neuroscope import stream
    from hexray.neuroscope.units import parse_units

    model = load_model()
    units = "neurons" + (",dict:resid.12" if (model_dictionaries_root(model.spec) / "resid.12").exists() else "")
    pack = token_pack(model, None, context_size=128, max_tokens=args.tokens)
    groups = parse_units(units, model)
    rows = _MAX_BATCH_CONTEXTS
    hf = model.bridge.original_model
    print(f"{model.name}, {pack.n_tokens:,} tokens in {pack.n_contexts} contexts of 128, {rows} a batch; units {units} "
          f"({sum(g.count for g in groups):,}); torch threads {torch.get_num_threads()}")

    def bare():
        with torch.inference_mode():
            for lo in range(0, pack.n_contexts, rows):
                hf(pack.tokens[lo : lo + rows])

    def hooks_only():
        each_batch(model, pack, groups, rows, lambda *a: None)

    def statistics_too():
        runs = [stream.new_running(g.count, 20, 128, 24, 8) for g in groups]
        fold_pack(model, pack, groups, runs, rows, 0)

    methods = {"plain HF forward": bare, "engine, hooks doing nothing": hooks_only, "engine + statistics (the index's pass)": statistics_too}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):  # round-robin: a busy machine slows every method alike
        for name, fn in methods.items():
            times[name].append(median_time(fn, 1)[0])
    base = statistics.median(times["plain HF forward"])
    print("\n(1) one pass over the same batches (median of round-robin repeats)")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:<40} {m:7.1f} s  {pack.n_tokens / m:7.0f} tokens/s  {m / base:5.2f}x plain   (runs: {', '.join(f'{t:.1f}' for t in ts)})")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "index.duckdb"
        info = build_index(model, pack, units, out)
        print(f"\n  build_index: forward {info.seconds['forward']:.1f} s ({info.tokens_per_second:.0f} tokens/s, "
              f"{info.seconds['forward'] / base:.2f}x plain), logit effects {info.seconds['logits']:.1f} s, write {info.seconds['write']:.1f} s")
        print(f"\n(3) size: {info.size_bytes / 1e6:.1f} MB for {info.tokens:,} tokens and {sum(info.units.values()):,} units "
              f"(the per-unit examples dominate; {info.size_bytes / info.tokens:.0f} bytes a token at this size)")
        with open_index(out, model.spec) as index:
            import random

            rng = random.Random(0)
            names = [f"L{rng.randrange(model.spec.n_layers)}N{rng.randrange(model.spec.d_mlp)}" for _ in range(50)]
            unit_page(index, names[0])  # warm the caches (vocabulary, unit ids)
            page_ms = statistics.median(median_time(lambda n=n: unit_page(index, n), 1)[0] for n in names) * 1e3
            paris = model.single_token(" Paris", role="token")
            token_ms = median_time(lambda: search_token(index, paris), 20)[0] * 1e3
            position_ms = median_time(lambda: search_position(index, model, "The capital of France is Paris", -1), 5)[0] * 1e3
        print(f"    latency (median): neuron page {page_ms:.1f} ms, token look-up {token_ms:.1f} ms, prompt-position look-up {position_ms:.1f} ms (one forward pass included)")

        if args.ray_tokens:
            import duckdb
            import ray

            small = pack[: max(1, -(-args.ray_tokens // 127))]
            local_out, ray_out = Path(tmp) / "local.duckdb", Path(tmp) / "ray.duckdb"
            local = build_index(model, small, units, local_out, batch_contexts=16)
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            try:
                start = time.perf_counter()
                remote = build_index(model, small, units, ray_out, batch_contexts=16, engine="ray", workers=2)
                ray_total = time.perf_counter() - start
            finally:
                ray.shutdown()

            def rows_of(path):
                con = duckdb.connect(str(path), read_only=True)
                try:
                    queries = ["SELECT * EXCLUDE (mean) FROM units ORDER BY unit_id"] + [f"SELECT * FROM {t} ORDER BY ALL" for t in ("examples", "contexts", "documents", "vocab")]
                    return [con.execute(q).fetchall() for q in queries]
                finally:
                    con.close()

            equal = rows_of(local_out) == rows_of(ray_out)
            print(f"\n(2) {small.n_tokens:,} tokens: local engine forward {local.seconds['forward']:.1f} s; Ray local (2 actors, 1 CPU and 1 torch thread each) "
                  f"forward {remote.seconds['forward']:.1f} s ({remote.seconds['forward'] / local.seconds['forward']:.2f}x local; "
                  f"{ray_total:.1f} s with Ray's start-up); indexes equal row for row (means apart): {equal}")


if __name__ == "__main__":
    main()
