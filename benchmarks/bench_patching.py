"""Causal-tool speed figures for the closing note (run by hand: `python benchmarks/bench_patching.py`).

On the embedded model (30 layers x 9 heads) and the IOI clean/corrupt pair (14 tokens):
(a) exact all-heads sweep, batched (default chunking), against one forward pass per head through
    the same hooks (``batch_size=1``), and against a plain loop of full forwards with one hook;
(b) attribution patching for every head and neuron: wall time, and its ratio to (a);
(c) the peer figure: TransformerLens's ``get_act_patch_attn_head_out_all_pos`` on the bridge.

Each figure is measured once in this run (the sweeps are long); a warm-up run comes first.
Set BENCH_SKIP_TL=1 to skip (c).
"""

from __future__ import annotations

import os
import time

import torch

from hexray import load_model, run_trace
from hexray.intervene.patching import activation_patching
from hexray.tracing import sites

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def plain_loop(model, target: int, contrast: int) -> list[float]:
    """What a hand-written sweep does: one full forward (all logits) per head, hook on hook_z."""
    spec = model.spec
    clean = run_trace(model, CLEAN, {sites.head_z(layer) for layer in range(spec.n_layers)})
    tokens = torch.tensor([model.encode(CORRUPT)])
    out = []
    for layer in range(spec.n_layers):
        source = clean.acts[sites.head_z(layer)]
        for head in range(spec.n_heads):
            def patch(z, hook, head=head, source=source):
                z = z.clone()
                z[0, :, head] = source[:, head]
                return z

            with torch.inference_mode():
                logits = model.bridge.run_with_hooks(tokens, fwd_hooks=[(sites.head_z(layer), patch)])
            out.append(float(logits[0, -1, target] - logits[0, -1, contrast]))
    return out


def main() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's helper draws a progress bar
    torch.manual_seed(0)
    model = load_model()
    kw = dict(target=" Mary", contrast=" John")
    activation_patching(model, CLEAN, CORRUPT, sweeps="heads", **kw)  # warm-up
    t_batched, batched = timed(lambda: activation_patching(model, CLEAN, CORRUPT, sweeps="heads", **kw))
    t_single, single = timed(lambda: activation_patching(model, CLEAN, CORRUPT, sweeps="heads", batch_size=1, **kw))
    target, contrast = batched.target.id, batched.contrast.id
    t_plain, plain = timed(lambda: plain_loop(model, target, contrast))
    plain_scores = [(v - batched.corrupt_value) / (batched.clean_value - batched.corrupt_value) for v in plain]
    err_single = max(abs(a.score - b.score) for a, b in zip(batched.results, single.results))
    err_plain = max(abs(a.score - b) for a, b in zip(batched.results, plain_scores))
    print(f"threads: {torch.get_num_threads()}; heads: {len(batched.results)}")
    print(f"(a) exact all-heads sweep, batched:               {t_batched:6.2f} s")
    print(f"    one forward per head, same hooks (batch 1):   {t_single:6.2f} s  -> batched is {t_single / t_batched:.1f}x faster (max |diff| {err_single:.1e})")
    print(f"    plain loop, full forward per head:            {t_plain:6.2f} s  -> batched is {t_plain / t_batched:.1f}x faster (max |diff| {err_plain:.1e})")

    activation_patching(model, CLEAN, CORRUPT, sweeps="heads,neurons", method="attribution", **kw)  # warm-up
    t_attr, attr = timed(lambda: activation_patching(model, CLEAN, CORRUPT, sweeps="heads,neurons", method="attribution", **kw))
    print(f"(b) attribution patching, {len(attr.results)} sites (heads + neurons): {t_attr:6.2f} s  ({t_batched / t_attr:.1f}x faster than (a))")
    t_both, both = timed(lambda: activation_patching(model, CLEAN, CORRUPT, sweeps="heads", method="both", **kw))
    print(f"    exact vs attribution on heads: Pearson r = {both.correlation['heads']:.3f}")

    if os.environ.get("BENCH_SKIP_TL"):
        return
    try:
        from transformer_lens import patching

        hooks = {sites.head_z(layer) for layer in range(model.spec.n_layers)}
        with torch.inference_mode():
            _, clean_cache = model.bridge.run_with_cache(torch.tensor([model.encode(CLEAN)]), names_filter=lambda n: n in hooks)
        tokens = torch.tensor([model.encode(CORRUPT)])

        def metric(logits):
            return logits[0, -1, target] - logits[0, -1, contrast]

        with torch.inference_mode():
            t_tl, tl = timed(lambda: patching.get_act_patch_attn_head_out_all_pos(model.bridge, tokens, clean_cache, metric))
        tl_scores = (tl.flatten() - batched.corrupt_value) / (batched.clean_value - batched.corrupt_value)
        err_tl = max(abs(a.score - float(b)) for a, b in zip(batched.results, tl_scores))
        print(f"(c) TransformerLens get_act_patch_attn_head_out_all_pos: {t_tl:6.2f} s  -> batched is {t_tl / t_batched:.1f}x faster (max |diff| {err_tl:.1e})")
    except Exception as exc:  # the peer helper may not support the bridge; say so
        print(f"(c) TransformerLens patching helper did not run on the bridge: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
