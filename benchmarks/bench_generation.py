"""Traced generation speed for the closing note (run by hand: `python benchmarks/bench_generation.py`).

Tokens per second of greedy generation of 64 new tokens on the embedded model:
plain ``generate`` of the Hugging Face model against HexRay's traced generation (every token's
head-level attribution, routed attribution and attention by source), and the same through an
untraced bridge loop with the KV cache (what the bridge itself costs). Medians of 3 runs each.
"""

from __future__ import annotations

import statistics
import time

import torch

from hexray import load_model
from transformers import AutoModelForCausalLM

from hexray.generation.tracer import GenerationOptions, TracedGeneration
from hexray.tracing.engine import IncrementalRun

PROMPT = "Tom has 3 apples and buys 2 more. How many apples does he have now? Let's think step by step."
NEW = 64


def median(fn, repeats: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def traced(model, granularity: str = "head") -> list[int]:
    run = TracedGeneration(model, PROMPT, GenerationOptions(max_new_tokens=NEW, chat=True, stop_at_eos=False, granularity=granularity))
    return [r.id for r in run]


def bridge_loop(model, ids: list[int]) -> list[int]:
    """Greedy decoding through the bridge with its KV cache and no hooks."""
    out, run, tokens = [], IncrementalRun(model), torch.tensor([ids])
    for _ in range(NEW):
        logits, _ = run.step(tokens)
        out.append(int(logits[-1].argmax()))
        tokens = torch.tensor([[out[-1]]])
    return out


def main() -> None:
    model = load_model()
    ids = TracedGeneration(model, PROMPT, GenerationOptions(max_new_tokens=NEW, chat=True)).prompt_ids
    # a copy the bridge never wrapped: booting the bridge changes the HF model's own generate
    hf = AutoModelForCausalLM.from_pretrained(model.checkpoint, attn_implementation="eager", dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # generate all NEW tokens, like the traced run

    def plain():
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()

    plain()  # warm-up
    t_plain, plain_ids = median(plain)
    t_bridge, bridge_ids = median(lambda: bridge_loop(model, ids))
    t_traced, traced_ids = median(lambda: traced(model))
    print(f"prompt {len(ids)} tokens (chat template), {NEW} new tokens, greedy, {torch.get_num_threads()} threads")
    print(f"plain HF generate:       {t_plain:6.2f} s  {NEW / t_plain:6.1f} tok/s")
    print(f"bridge + KV cache loop:  {t_bridge:6.2f} s  {NEW / t_bridge:6.1f} tok/s  ({t_bridge / t_plain:.2f}x plain)")
    print(f"traced (head level):     {t_traced:6.2f} s  {NEW / t_traced:6.1f} tok/s  ({t_traced / t_plain:.2f}x plain)")
    print(f"same tokens: traced == plain {traced_ids == plain_ids}, bridge == plain {bridge_ids == plain_ids}")


if __name__ == "__main__":
    main()
