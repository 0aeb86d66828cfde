"""Feature-training figures: harvest speed, dictionaries against sparsify, the tuned lens against
the tuned-lens package, and the shipped defaults' stored quality (run by hand:
`.venv/bin/python benchmarks/bench_features.py [--quick] [--variants]`). On two idle CPU cores the
full run takes about 8 minutes and ``--quick`` (a smoke run) under one; on this machine, while other
work shared it, everything ran up to seven times slower. ``--sae-tokens``, ``--epochs`` and
``--lens-steps`` change the budgets.

On the embedded model (SmolLM2-135M) and the default corpus, side by side in this one run:

(1) harvest tokens/s: HexRay's ``harvest`` for resid.6, and for resid.6+12+18 in one pass, against
    the loaded model's own HF module (``model.bridge.original_model``, eager attention) on the same
    contexts and batch size under ``torch.inference_mode``: a full forward with logits, the same
    forward with HF's default (sdpa) attention, and forward hooks that copy the same positions and
    stop after the last block needed (what a careful hand-written harvest does). Repeats run
    round-robin, so a busy machine slows every method alike; the figure is each one's median.
(2) a TopK SAE on resid.6 by HexRay (``train_dictionary``) and by EleutherAI's sparsify
    (eai-sparsify 1.3.3: ``SparseCoder`` driven step by step as its ``Trainer`` does by default:
    signum = schedule-free SignSGD at lr 5e-3 / sqrt(latents / 2^14), its loss fvu + auxk with
    AuxK off, b_dec from the first batch, unit-norm decoder, the averaged weights at the end) on
    the same cached activations (harvested once by HexRay, handed over in a .safetensors file),
    with the same latents, k, batch, token budget and batch order. sparsify's lr is sized for its
    default 65,536-token steps, so a second run scales it by sqrt(batch / 65,536) for this batch
    (``--variants`` adds one with AuxK on as well). All are scored by the same code: held-out
    FVU (1 - squared error / total variance around the held-out mean), dead latents (never firing
    on the held-out tokens), and the model's next-token loss with each spliced in.
(3) the tuned lens by HexRay (``train_tuned_lens``) and by the tuned-lens package (0.2.0: its
    ``TunedLens`` class and loss, with the body of its ``train_loop.py`` - the script itself does
    not import, see its output - including bf16 autocast; ``--variants`` adds an fp32 run) on the
    same contexts, positions and steps; held-out KL (bits) per layer measured by one function
    (``lens_kl``) for both, and the logit lens.
(4) the quality that the shipped default dictionaries and tuned lens stored when they were built.

The peers need pins that conflict with HexRay's, so each runs in its own virtualenv,
benchmarks/.venv-sparsify and benchmarks/.venv-tunedlens, created on first use (torch 2.13.0
first, and pinned while the rest installs, so no resolver brings another torch). They talk to
this process through files in a temporary folder: tensors in, results as JSON out. Peer times are
their training loops, measured inside the peer process (interpreter start, imports and model
loading excluded, as for HexRay). The trainings repeat round-robin too (3 rounds for the SAEs, 2
for the lenses; the scores come from the first, the time is the median), since this machine's
speed swings several-fold when other work runs; each run's time is printed beside the median.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TORCH_PIN = "torch==2.13.0"
PEERS = {"sparsify": ["eai-sparsify==1.3.3"], "tunedlens": ["tuned-lens==0.2.0"]}

# Sizes for two CPU cores. The SAE's shape and budget are the shipped defaults' (2048 latents, k 32, batch 1024, 64k tokens x
# 2 epochs); the lens's shape too (batches of 2 contexts, every 4th position) with a third of their 60 steps.
FULL = dict(speed_contexts=8, repeats=3, sae_tokens=64_000, held_out=8_192, eval_contexts=8, latents=2048, k=32, batch=1024, epochs=2,
            sae_peers=2, train_repeats=3, lens_steps=20, lens_batch=2, lens_stride=4, lens_eval_contexts=8, lens_peers=1, lens_repeats=2)
QUICK = dict(speed_contexts=8, repeats=1, sae_tokens=8_192, held_out=2_048, eval_contexts=1, latents=2048, k=32, batch=1024, epochs=1,
             sae_peers=1, train_repeats=1, lens_steps=2, lens_batch=2, lens_stride=4, lens_eval_contexts=1, lens_peers=1, lens_repeats=1)
SPEED_SITES = (("resid.6",), ("resid.6", "resid.12", "resid.18"))
SAE_SITE = "resid.6"
SPARSIFY_BATCH = 32 * 2048  # tokens a step of sparsify's Trainer at its defaults (batch_size 32 sequences of ctx_len 2048)
CONTEXT = 128
HARVEST_BATCH = 8  # contexts per forward, HexRay's default


_T0 = time.perf_counter()


def say(text: str) -> None:
    print(f"# [{time.perf_counter() - _T0:6.0f} s] {text}", file=sys.stderr, flush=True)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "| " + " | ".join("-" * w for w in widths) + " |", *(line(r) for r in cells)])


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


# -- peer virtualenvs ------------------------------------------------------------------------------
def peer_venv(name: str, packages: list[str]) -> Path:
    """The python of ``benchmarks/.venv-<name>``, creating it and installing ``packages`` when missing.

    torch goes in first, pinned (this machine serves that CPU build), and stays pinned through a
    constraints file while the packages install, so no resolver swaps it for another build.
    """
    folder = BENCH / f".venv-{name}"
    python = folder / "bin" / "python"
    stamp = folder / ".bench-installed"
    want = "\n".join([TORCH_PIN, *packages]) + "\n"
    if python.exists() and stamp.is_file() and stamp.read_text() == want:
        return python
    say(f"setting up {folder.relative_to(ROOT)} ({', '.join(packages)}) ...")
    if not python.exists():
        subprocess.run([shutil.which("python3") or "python3", "-m", "venv", str(folder)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write(TORCH_PIN + "\n")
    try:
        subprocess.run([*pip, TORCH_PIN], check=True)
        subprocess.run([*pip, "-c", pins.name, *packages], check=True)
    finally:
        os.unlink(pins.name)
    stamp.write_text(want)
    return python


def run_peer(name: str, script: str, work: Path, job: dict) -> dict:
    """Run ``script`` in peer ``name``'s venv on ``work`` (job.json in, result.json out); its result."""
    python = peer_venv(name, PEERS[name])
    (work / "job.json").write_text(json.dumps(job))
    (work / "peer.py").write_text(textwrap.dedent(script))
    result = work / "result.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONNOUSERSITE": "1", "TQDM_DISABLE": "1"}
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    done = subprocess.run([str(python), str(work / "peer.py"), str(work)], env=env, capture_output=True, text=True)
    if done.returncode != 0 or not result.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise RuntimeError(f"{name} peer exited {done.returncode}:\n{tail}")
    out = json.loads(result.read_text())
    out["process_seconds"] = time.perf_counter() - start
    return out


SPARSIFY_PEER = r'''
    import json, sys, time
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file

    work = Path(sys.argv[1])
    job = json.loads((work / "job.json").read_text())
    torch.set_num_threads(job["threads"])
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SaeConfig, SparseCoder
    from sparsify.sign_sgd import SignSGD

    acts = load_file(str(work / "acts.safetensors"))
    x_all, held = acts["train"], acts["held_out"]
    n, d = x_all.shape
    L, k, B, seed = job["latents"], job["k"], job["batch"], job["seed"]
    steps = max(1, n * job["epochs"] // B)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # HexRay's batch order

    start = time.perf_counter()
    torch.manual_seed(seed)  # as sparsify's Trainer, before building each coder
    sae = SparseCoder(d, SaeConfig(num_latents=L, k=k), "cpu", dtype=torch.float32)
    lr = job["lr_scale"] * 5e-3 / (sae.num_latents / 2**14) ** 0.5  # the Trainer's default ("signum") learning rate, lr_scale 1
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    auxk_alpha, dead_after = job["auxk_alpha"], job["dead_tokens"]
    since_fired = torch.zeros(L, dtype=torch.long)
    fvu_last = float("nan")
    for step in range(steps):
        lo = (step * B) % max(1, n - B + 1)
        x = x_all[order[lo : lo + B]]
        if step == 0:
            sae.b_dec.data = x.mean(0)  # the Trainer centres b_dec on the first batch
        sae.set_decoder_norm_to_unit_norm()  # the Trainer does this before every forward
        dead_mask = since_fired > dead_after if auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        fired = torch.zeros(L, dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
        since_fired += x.shape[0]
        since_fired[fired] = 0
        fvu_last = float(out.fvu.detach())
    opt.eval()  # schedule-free: the averaged weights, what the Trainer saves
    seconds = time.perf_counter() - start

    with torch.no_grad():
        own = float(sae(x=held, y=held).fvu)  # sparsify's own held-out FVU, a check on the hand-over
    save_file({"W_enc": sae.encoder.weight.detach().T.contiguous(), "b_enc": sae.encoder.bias.detach().contiguous(),
               "W_dec": sae.W_dec.detach().contiguous(), "b_dec": sae.b_dec.detach().contiguous()}, str(work / "sparsify_sae.safetensors"))
    import sparsify
    (work / "result.json").write_text(json.dumps({"seconds": seconds, "steps": steps, "lr": lr, "train_fvu_last": fvu_last,
                                                  "held_out_fvu_own": own, "version": getattr(sparsify, "__version__", "1.3.3")}))
'''

TUNEDLENS_PEER = r'''
    import json, sys, time
    from pathlib import Path

    import torch as th
    from safetensors.torch import load_file, save_file

    work = Path(sys.argv[1])
    job = json.loads((work / "job.json").read_text())
    th.set_num_threads(job["threads"])
    import transformers
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

    import tuned_lens
    from tuned_lens import TunedLens

    try:  # the package's own training script; on transformers 5 / torchdata >= 0.10 it does not import
        import tuned_lens.scripts.train_loop  # noqa: F401
        script_error = None
    except Exception as exc:
        script_error = f"{type(exc).__name__}: {exc}"

    data = load_file(str(work / "lens_data.safetensors"))
    tokens, mask = data["tokens"], data["mask"]
    model = AutoModelForCausalLM.from_pretrained(job["checkpoint"], dtype=th.float32, low_cpu_mem_usage=True)
    model.eval()
    model.requires_grad_(False)

    start = time.perf_counter()
    lens = TunedLens.from_model(model)
    params = [p for p in lens.parameters() if p.requires_grad]
    beta = 0.9  # ingredients.Optimizer defaults: SGD, lr_scale 1.0, momentum 0.9, weight decay 1e-3, no warmup
    opt = th.optim.SGD(params, lr=1.0 * (1 - beta), momentum=beta, nesterov=True, weight_decay=1e-3)
    scheduler = get_linear_schedule_with_warmup(opt, 0, job["steps"])
    autocast = job["autocast"]
    last = []
    for index in job["schedule"]:  # train_loop.Train.execute, one batch a step (grad_acc_steps 1)
        batch, keep = tokens[index], mask[index]
        with th.no_grad():
            output = model(input_ids=batch, output_hidden_states=True)
        final_logits = output.logits
        hidden_states = output.hidden_states[:-1]
        labels = final_logits.float().log_softmax(dim=-1)[keep]  # KL loss, shift 0; the positions HexRay trains on
        last = []
        for i, h in enumerate(hidden_states):
            with th.autocast("cpu", dtype=th.bfloat16, enabled=autocast):
                logits = lens(h[keep], idx=i)
                loss = th.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
            loss.backward()
            last.append(float(loss.detach()))
        th.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        scheduler.step()
    seconds = time.perf_counter() - start

    weight = th.stack([t.weight.detach().float().T for t in lens.layer_translators])  # h + h @ W.T + b
    bias = th.stack([t.bias.detach().float() for t in lens.layer_translators])
    save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, str(work / "tunedlens_params.safetensors"))
    (work / "result.json").write_text(json.dumps({"seconds": seconds, "script_error": script_error, "transformers": transformers.__version__,
                                                  "version": getattr(tuned_lens, "__version__", "0.2.0"),
                                                  "train_kl_bits_last_step": [v / 0.6931471805599453 for v in last]}))
'''


# -- (1) harvest speed -------------------------------------------------------------------------------
def harvest_speed(model, tokens, counted, cfg) -> list[list]:
    import torch
    from transformers import AutoModelForCausalLM

    from hexray.features.dictionary import parse_site
    from hexray.features.train import harvest

    hf = model.bridge.original_model
    sdpa = AutoModelForCausalLM.from_pretrained(model.checkpoint, dtype=torch.float32).eval()  # HF's default attention
    layers = hf.model.layers
    n_tok = int(counted.sum())

    class Stop(Exception):
        pass

    def plain(module):
        def run(tokens=tokens, counted=counted):
            with torch.inference_mode():
                for lo in range(0, tokens.shape[0], HARVEST_BATCH):
                    module(tokens[lo : lo + HARVEST_BATCH])
        return run

    def hooked(names):
        ids = [parse_site(s, model.spec).layer - 1 for s in names]  # resid.L enters block L: block L-1's output

        def run(tokens=tokens, counted=counted):
            kept = {i: [] for i in ids}
            with torch.inference_mode():
                for lo in range(0, tokens.shape[0], HARVEST_BATCH):
                    keep = counted[lo : lo + HARVEST_BATCH]

                    def grab(i, keep=keep):
                        def hook(mod, args, out):
                            out = out[0] if isinstance(out, tuple) else out
                            kept[i].append(out[keep].float().cpu())
                            if i == max(ids):
                                raise Stop
                        return hook

                    handles = [layers[i].register_forward_hook(grab(i)) for i in ids]
                    try:
                        hf(tokens[lo : lo + HARVEST_BATCH])
                    except Stop:
                        pass
                    finally:
                        for h in handles:
                            h.remove()
            return {i: torch.cat(v) for i, v in kept.items()}
        return run

    def hexray_harvest(names):
        sites = [parse_site(s, model.spec) for s in names]
        return lambda tokens=tokens, counted=counted: harvest(model, sites, tokens, counted, batch_contexts=HARVEST_BATCH)

    methods = [
        ("plain HF forward (logits), eager attention: the loaded model", "all 30 blocks + logits", plain(hf)),
        ("plain HF forward (logits), sdpa attention (HF's default)", "all 30 blocks + logits", plain(sdpa)),
    ]
    for names in SPEED_SITES:
        label = "+".join(n.split(".")[1] for n in names)
        methods.append((f"HF forward hooks + early stop, resid.{label}", f"blocks 0..{parse_site(names[-1], model.spec).layer - 1}", hooked(names)))
        methods.append((f"HexRay harvest, resid.{label}", f"blocks 0..{parse_site(names[-1], model.spec).layer - 1}", hexray_harvest(names)))

    for _, _, fn in methods:  # warm-up: one context each
        fn(tokens[:1], counted[:1])
    times: dict[str, list[float]] = {m[0]: [] for m in methods}
    outputs = {}
    for r in range(cfg["repeats"]):
        for name, _, fn in methods:
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
        say(f"harvest speed: round {r + 1} of {cfg['repeats']} done")
    # the hand-written harvest must read what HexRay's does
    label = "+".join(n.split(".")[1] for n in SPEED_SITES[1])
    mine, theirs = outputs[f"HexRay harvest, resid.{label}"], outputs[f"HF forward hooks + early stop, resid.{label}"]
    diff = max(float((a.x - theirs[parse_site(s, model.spec).layer - 1]).abs().max()) for a, s in zip(mine, SPEED_SITES[1]))
    base = statistics.median(times[methods[0][0]])
    rows = []
    for name, runs, _ in methods:
        t = statistics.median(times[name])
        rows.append([name, runs, f"{n_tok / t:,.0f}", f"{base / t:.2f}x"])
    return rows, n_tok, diff


# -- (2) dictionaries ---------------------------------------------------------------------------------
def held_out_scores(d, x) -> dict:
    import torch

    with torch.no_grad():
        a = d.encode(x)
        recon = d.decode(a, x)
        var = float(((x - x.mean(0)) ** 2).sum())
        return {"fvu": float(((x - recon) ** 2).sum()) / var, "l0": float((a > 0).sum(-1).float().mean()),
                "dead_pct": 100.0 * float(((a > 0).sum(0) == 0).float().mean())}


def bench_dictionaries(model, train, test, cfg, work: Path, threads: int) -> dict:
    from safetensors.torch import load_file, save_file

    from hexray.features.dictionary import Dictionary, parse_site
    from hexray.features.train import TrainOptions, evaluate, harvest, train_dictionary

    site = parse_site(SAE_SITE, model.spec)
    say(f"harvesting {SAE_SITE}: {cfg['sae_tokens']:,} training + {cfg['held_out']:,} held-out tokens ...")
    data = harvest(model, site, train.tokens, train.counted, max_tokens=cfg["sae_tokens"])
    held = harvest(model, site, test.tokens, test.counted, max_tokens=cfg["held_out"])
    save_file({"train": data.x.contiguous(), "held_out": held.x.contiguous()}, str(work / "acts.safetensors"))
    opts = TrainOptions(site, "topk", cfg["latents"], cfg["k"], tokens=data.n, batch_tokens=cfg["batch"], epochs=cfg["epochs"])
    dead_tokens = opts.dead_tokens or min(10_000_000, max(opts.batch_tokens, data.n * opts.epochs // 4))  # HexRay's rule
    scale = (cfg["batch"] / SPARSIFY_BATCH) ** 0.5
    peers = [("sparsify SparseCoder, its Trainer's defaults (signum, AuxK off)", 1.0, 0.0, 10_000_000),
             (f"sparsify, signum lr x {scale:.3g} (sqrt of batch / its default batch)", scale, 0.0, 10_000_000),
             (f"sparsify, signum lr x {scale:.3g} + AuxK 1/32, dead after HexRay's", scale, 1 / 32, dead_tokens)][: cfg["sae_peers"]]
    hexray_label = "HexRay train_dictionary (Adam, AuxK 1/32)"

    trained: dict[str, tuple] = {}  # label -> (dictionary, peer result or None), from the first round
    times: dict[str, list[float]] = {}
    peer_error = None
    for r in range(cfg["train_repeats"]):  # round-robin, like (1): a swing in the machine's speed hits every trainer
        say(f"training HexRay's topk SAE ({cfg['latents']} latents, k {cfg['k']}, {data.n:,} tokens, batch {cfg['batch']}), round {r + 1} ...")
        start = time.perf_counter()
        mine, _ = train_dictionary(model, opts, data)
        times.setdefault(hexray_label, []).append(time.perf_counter() - start)
        trained.setdefault(hexray_label, (mine, None))
        for label, lr_scale, auxk, dead in peers if peer_error is None else []:
            say(f"training {label}, round {r + 1} ...")
            job = {"threads": threads, "latents": cfg["latents"], "k": cfg["k"], "batch": cfg["batch"], "epochs": cfg["epochs"], "seed": opts.seed,
                   "lr_scale": lr_scale, "auxk_alpha": auxk, "dead_tokens": dead}
            try:
                res = run_peer("sparsify", SPARSIFY_PEER, work, job)
            except Exception as exc:  # noqa: BLE001 - report a failed peer, keep measuring the rest
                peer_error = f"{type(exc).__name__}: {exc}"
                say(f"sparsify failed: {peer_error}")
                break
            times.setdefault(label, []).append(res["seconds"])
            if label not in trained:
                w = load_file(str(work / "sparsify_sae.safetensors"))
                d = Dictionary(site=site, architecture="topk", W_enc=w["W_enc"], b_enc=w["b_enc"], W_dec=w["W_dec"], b_dec=w["b_dec"],
                               model_name=model.name, k=cfg["k"], apply_b_dec_to_input=True)
                trained[label] = (d, res)

    say("scoring the dictionaries on held-out text ...")
    ev_tokens, ev_counted = test.tokens[: cfg["eval_contexts"]], test.counted[: cfg["eval_contexts"]]
    t_mine = statistics.median(times[hexray_label])
    rows, checks, ref = [], [], None
    for label, (d, res) in trained.items():
        s = held_out_scores(d, held.x)
        q = evaluate(model, d, ev_tokens, ev_counted)
        ref = ref or q
        last = res["train_fvu_last"] if res else d.meta["trained"]["final_train_fvu"]
        t = statistics.median(times[label])
        rows.append([label, fmt(s["fvu"], 4), fmt(last, 3), fmt(s["l0"], 1), fmt(s["dead_pct"], 1), fmt(q.loss_spliced), fmt(q.loss_recovered),
                     fmt(t, 1), " / ".join(f"{x:.1f}" for x in times[label]), f"{t / t_mine:.2f}x"])
        if res:
            checks.append((label, s["fvu"], res["held_out_fvu_own"]))
    return {"rows": rows, "train_tokens": data.n, "held_tokens": held.n, "harvest_seconds": data.seconds, "steps": max(1, data.n * cfg["epochs"] // cfg["batch"]),
            "checks": checks, "loss_clean": ref.loss_clean, "loss_zero": ref.loss_zero, "loss_tokens": ref.tokens, "peer_error": peer_error, "lr": opts.learning_rate}


# -- (3) tuned lens --------------------------------------------------------------------------------
def bench_lens(model, train, test, cfg, work: Path, threads: int) -> dict:
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from hexray.features.tuned_lens import TunedLens, _batches, lens_kl, train_tuned_lens, unembed_hash

    n_ctx = cfg["lens_steps"] * cfg["lens_batch"]  # as `hexray lens train`: each context seen once
    tokens, counted = train.tokens[:n_ctx], train.counted[:n_ctx]
    positions = torch.arange(tokens.shape[1])
    thinned = counted & (positions % cfg["lens_stride"] == cfg["lens_stride"] - 1)
    ev_tokens = test.tokens[: cfg["lens_eval_contexts"]]
    ev_counted = test.counted[: cfg["lens_eval_contexts"]] & (positions % cfg["lens_stride"] == cfg["lens_stride"] - 1)
    batches = _batches(tokens.shape[0], cfg["lens_batch"], 0)
    schedule = [next(batches) for _ in range(cfg["lens_steps"])]  # the contexts HexRay's steps take, in order
    save_file({"tokens": tokens.contiguous(), "mask": thinned.contiguous()}, str(work / "lens_data.safetensors"))
    variants = [("tuned-lens", True), ("tuned-lens fp32", False)][: cfg["lens_peers"]]  # bf16 autocast as its train_loop.py; then without

    lenses: dict[str, tuple] = {}  # name -> (lens, peer result or None), from the first round
    times: dict[str, list[float]] = {}
    peer_error = None
    for r in range(cfg["lens_repeats"]):
        say(f"training HexRay's tuned lens ({cfg['lens_steps']} steps x {cfg['lens_batch']} contexts, every {cfg['lens_stride']}th position), round {r + 1} ...")
        start = time.perf_counter()
        mine = train_tuned_lens(model, tokens, thinned, steps=cfg["lens_steps"], batch_contexts=cfg["lens_batch"])
        times.setdefault("HexRay", []).append(time.perf_counter() - start)
        lenses.setdefault("HexRay", (mine, None))
        for name, autocast in variants if peer_error is None else []:
            say(f"training the tuned-lens package's TunedLens on the same steps ({'bf16 autocast' if autocast else 'fp32'}), round {r + 1} ...")
            try:
                res = run_peer("tunedlens", TUNEDLENS_PEER, work, {"threads": threads, "checkpoint": str(model.checkpoint), "steps": cfg["lens_steps"],
                                                                   "schedule": schedule, "autocast": autocast})
            except Exception as exc:  # noqa: BLE001 - report a failed peer, keep measuring the rest
                peer_error = f"{type(exc).__name__}: {exc}"
                say(f"tuned-lens failed: {peer_error}")
                break
            times.setdefault(name, []).append(res["seconds"])
            if name not in lenses:
                p = load_file(str(work / "tunedlens_params.safetensors"))
                spec = model.spec
                lenses[name] = (TunedLens(model.name, unembed_hash(model), spec.n_layers, spec.d_model, p["weight"], p["bias"]), res)

    say("held-out KL of each lens ...")
    kl = {name: lens_kl(model, lens, ev_tokens, ev_counted) for name, (lens, _) in lenses.items()}
    kl["logit lens"] = lens_kl(model, None, ev_tokens, ev_counted)
    names = list(kl)
    rows = [[str(r), *(fmt(float(kl[n][r])) for n in names)] for r in range(model.spec.n_layers + 1)]
    rows.append(["mean", *(f"**{fmt(float(np.mean(kl[n])))}**" for n in names)])
    peer = next((res for _, res in lenses.values() if res), None)
    return {"rows": rows, "names": names, "times": times, "peer": peer, "peer_error": peer_error,
            "held_positions": int(ev_counted.sum()), "train_positions": int(thinned.sum()), "contexts": n_ctx}


# -- (4) the shipped defaults -----------------------------------------------------------------------
def defaults_quality(model) -> str:
    from hexray.features.build import DEFAULT_SITES
    from hexray.features.dictionary import model_key
    from hexray.features.formats import dictionaries_root
    from hexray.features.store import saved_dictionaries
    from hexray.features.tuned_lens import default_tuned_lens_path, load_tuned_lens
    from hexray.models.loading import cache_root

    out = [f"cache: {cache_root()}"]
    saved = {row["name"]: row for row in saved_dictionaries()}
    rows, missing = [], []
    for site in DEFAULT_SITES:
        row = saved.get(f"{model_key(model.name)}/{site}")
        q = row.get("quality") if row else None
        if not q:
            missing.append(site)
            continue
        rows.append([site, row["latents"], row["k"], q.get("tokens"), fmt(q.get("fvu"), 4), fmt(q.get("l0"), 1), fmt(q.get("dead_pct"), 1),
                     fmt(q.get("loss_clean")), fmt(q.get("loss_spliced")), fmt(q.get("loss_zero")), fmt(q.get("loss_recovered"))])
    if rows:
        out.append(table(["site", "latents", "k", "held-out tokens", "FVU", "L0", "dead %", "loss clean", "loss spliced", "loss zero", "loss recovered"], rows))
    if missing:
        out.append(f"default dictionaries not built: {', '.join(missing)} (none under {dictionaries_root() / model_key(model.name)}); "
                   "build them with `hexray dict defaults`")
    folder = default_tuned_lens_path(model)
    if not folder.exists():
        out.append(f"default tuned lens not built (no {folder}); build it with `hexray dict defaults`")
        return "\n\n".join(out)
    meta = load_tuned_lens(folder, model).meta
    kl = meta.get("held_out_kl_bits") or {}
    tuned, logit = kl.get("tuned") or [], kl.get("logit") or []
    if not tuned:
        out.append(f"the default tuned lens at {folder} stored no held-out KL")
        return "\n\n".join(out)
    lens_rows = [[str(r), fmt(t), fmt(lg)] for r, (t, lg) in enumerate(zip(tuned, logit))]
    lens_rows.append(["mean", fmt(statistics.mean(tuned)), fmt(statistics.mean(logit))])
    held = (meta.get("corpus") or {}).get("held_out_tokens")
    out.append(f"default tuned lens: {meta.get('steps')} steps, {meta.get('tokens')} training positions, held-out KL (bits) on {held} tokens")
    out.append(table(["row", "tuned lens", "logit lens"], lens_rows))
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about two minutes")
    parser.add_argument("--sae-tokens", type=int, help=f"SAE training tokens (full run {FULL['sae_tokens']:,})")
    parser.add_argument("--epochs", type=int, help=f"SAE epochs (full run {FULL['epochs']})")
    parser.add_argument("--lens-steps", type=int, help=f"tuned-lens steps (full run {FULL['lens_steps']})")
    parser.add_argument("--variants", action="store_true", help="also sparsify with AuxK on, and tuned-lens in fp32")
    args = parser.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.variants:
        cfg.update(sae_peers=3, lens_peers=2)
    for key in ("sae_tokens", "epochs", "lens_steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch

    import hexray
    from hexray.features.build import corpus_split

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    model = hexray.load_model()
    print(f"torch {torch.__version__}, {threads} threads, python {sys.version.split()[0]}; model {model.name}; {'quick' if args.quick else 'full'} run")
    train, test = corpus_split(model, None, tokens=cfg["sae_tokens"], held_out=cfg["held_out"], context_size=CONTEXT)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hexray-bench-features-") as tmp:
        work = Path(tmp)
        n_speed = cfg["speed_contexts"]
        say(f"(1) harvest speed on {n_speed} contexts ...")
        speed_rows, speed_tokens, speed_diff = harvest_speed(model, train.tokens[:n_speed], train.counted[:n_speed], cfg)
        sae = bench_dictionaries(model, train, test, cfg, work, threads)
        lens = bench_lens(model, train, test, cfg, work, threads)

    print(f"\n## (1) Activation harvest ({speed_tokens:,} counted tokens, {HARVEST_BATCH} contexts of {CONTEXT} a forward; median of {cfg['repeats']}, round-robin)\n")
    print(table(["method", "runs", "tokens/s", "vs plain HF (eager)"], speed_rows))
    print(f"\nHexRay's harvest of the SAE's training set ({SAE_SITE}, {sae['train_tokens']:,} tokens): {sae['train_tokens'] / sae['harvest_seconds']:,.0f} tokens/s. "
          f"HexRay and the hand-written hooks read the same activations (max |diff| {speed_diff:.1e}).")

    print(f"\n## (2) TopK SAE on {SAE_SITE}: {cfg['latents']} latents, k {cfg['k']}, {sae['train_tokens']:,} tokens x {cfg['epochs']} epoch, "
          f"batch {cfg['batch']} ({sae['steps']} steps), same activations and batch order\n")
    print(table(["trainer", "held-out FVU", "last batch FVU", "L0", "dead %", "loss spliced", "loss recovered", "train s", "each run (s)",
                 "time / HexRay's"], sae["rows"]))
    print(f"\nFVU, L0 and dead % on {sae['held_tokens']:,} held-out tokens; next-token loss (nats) on {sae['loss_tokens']} held-out tokens: "
          f"clean {sae['loss_clean']:.3f}, site zero-ablated {sae['loss_zero']:.3f}. HexRay lr {sae['lr']:.2e}; sparsify's signum lr "
          f"{5e-3 / (cfg['latents'] / 2**14) ** 0.5:.2e} is sized for its default {SPARSIFY_BATCH:,}-token steps.")
    for label, ours, own in sae["checks"]:
        print(f"check: {label.split(',')[0]}'s own forward gives held-out FVU {own:.4f} (scored here: {ours:.4f}).")
    if sae["peer_error"]:
        print(f"\nsparsify did not run: {sae['peer_error']}")

    print(f"\n## (3) Tuned lens: {cfg['lens_steps']} steps x {cfg['lens_batch']} contexts ({lens['contexts']} contexts, {lens['train_positions']} training positions), "
          f"same contexts, positions and order; held-out KL (bits) on {lens['held_positions']} positions\n")
    print(table(["row", *lens["names"]], lens["rows"]))
    t = lens["times"]
    t0 = statistics.median(t["HexRay"])
    print()
    print(table(["trainer", "train s", "each run (s)", "time / HexRay's"],
                [[name, fmt(statistics.median(v), 1), " / ".join(f"{x:.1f}" for x in v), f"{statistics.median(v) / t0:.2f}x"] for name, v in t.items()]))
    if lens["peer"]:
        p = lens["peer"]
        fp32 = ', "tuned-lens fp32" without it (HexRay trains in fp32)' if "tuned-lens fp32" in t else " (HexRay trains in fp32)"
        print(f"\ntuned-lens {p['version']} on transformers {p['transformers']}: its TunedLens, Unembed and loss run; \"tuned-lens\" runs the "
              f"translators and loss under bf16 autocast as its train_loop.py does{fp32}.")
        if p.get("script_error"):
            print(f"its training script (tuned_lens.scripts.train_loop) cannot be imported: {p['script_error']}; its loop body is copied here.")
    if lens["peer_error"]:
        print(f"\ntuned-lens did not run: {lens['peer_error']}")

    print("\n## (4) Shipped defaults: stored quality\n")
    print(defaults_quality(model))
    print(f"\n(benchmark sections 1-3: {time.perf_counter() - wall:.0f} s)")


if __name__ == "__main__":
    main()
