"""Training sparse dictionaries on harvested activations, and measuring them honestly.

- :func:`harvest` runs corpus contexts through the engine once, stopping after the last block the
  site needs, and keeps the site's activations at counted positions only (never BOS/separators).
- :func:`train_dictionary` fits TopK / BatchTopK SAEs and (skip-)transcoders with Adam: decoder
  rows unit-norm (and their gradient's parallel part removed, so Adam cannot grow them), the
  encoder initialised from the decoder's transpose, ``b_dec`` from the data's mean, and AuxK
  (Gao et al. 2024) pulling dead latents towards the residual error. Checkpoints let a run resume.
- :func:`evaluate` reports what users trust: held-out FVU, L0, dead latents, and the model's
  next-token loss with the dictionary spliced in, against clean and against zero-ablating the site.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from hexray.errors import HexRayError
from hexray.features.dictionary import Dictionary, DictSite
from hexray.models.loading import LoadedModel
from hexray.tracing import sites
from hexray.tracing.engine import run_reduced, run_rewritten

TrainArch = Literal["topk", "batchtopk", "transcoder", "skip-transcoder"]
TRAIN_ARCHS: tuple[str, ...] = ("topk", "batchtopk", "transcoder", "skip-transcoder")


@dataclass(frozen=True)
class TrainOptions:
    """One dictionary training run (``hexray dict train``)."""

    site: DictSite
    arch: TrainArch = "topk"
    latents: int = 4096
    k: int = 32
    tokens: int = 200_000  # training tokens (counted positions), harvested once
    batch_tokens: int = 1024  # tokens per optimiser step
    epochs: int = 1
    lr: float | None = None  # None: 2e-4 / sqrt(latents / 2^14), sparsify's scaling rule
    auxk_alpha: float = 1 / 32
    dead_tokens: int | None = None  # a latent unseen for this many tokens is dead (None: 1/4 of the budget, at most 10M)
    seed: int = 0

    def validate(self, d_in: int | None = None) -> TrainOptions:
        if self.arch not in TRAIN_ARCHS:
            raise HexRayError(f"unknown architecture {self.arch!r}", hint=f"use {', '.join(TRAIN_ARCHS)}", field="arch")
        if self.latents < 2:
            raise HexRayError(f"{{field}} must be at least 2, got {self.latents}", field="latents")
        if not 0 < self.k < self.latents:
            raise HexRayError(f"{{field}} must be between 1 and latents - 1 ({self.latents - 1}), got {self.k}", hint="k is how many latents fire per token", field="k")
        if self.tokens < self.batch_tokens:
            raise HexRayError(f"{{field}} must be at least the batch ({self.batch_tokens} tokens), got {self.tokens}", field="tokens")
        if self.arch in ("transcoder", "skip-transcoder") and self.site.kind != "mlp":
            raise HexRayError(f"a {self.arch} reads an MLP's input and rebuilds its output: its site is mlp.L, not {self.site.label}", hint="use --site mlp.10", field="site")
        if self.arch in ("topk", "batchtopk") and self.site.kind == "mlp":
            raise HexRayError(f"site {self.site.label} (MLP input -> output) needs --arch transcoder or skip-transcoder", field="arch")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.latents / 2**14)


# -- harvest -------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Harvest:
    """A site's activations at counted positions: inputs [n, d_in] and targets [n, d_out] (the same tensor for SAEs)."""

    x: torch.Tensor
    y: torch.Tensor
    seconds: float

    @property
    def n(self) -> int:
        return self.x.shape[0]


def harvest(
    model: LoadedModel,
    site: DictSite | Sequence[DictSite],
    tokens: torch.Tensor,
    counted: torch.Tensor,
    *,
    batch_contexts: int = 8,
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Harvest | list[Harvest]:
    """Run contexts ``tokens`` [n, ctx] through the model, keeping each site's activations where ``counted`` [n, ctx].

    One pass serves every site, and it stops after the deepest site's last block, so a site at
    layer 10 of 30 costs about a third of a full pass. Activations are float32 on the CPU. Given
    one site, one :class:`Harvest`; given a sequence, a list.
    """
    many = not isinstance(site, DictSite)
    wanted = list(site) if many else [site]
    spec = model.spec
    ends = [_harvest_hooks(spec, s) for s in wanted]
    hooks = sorted({h for pair in ends for h in pair})
    want = max_tokens or int(counted.sum())
    kept: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    got = 0
    start = time.perf_counter()
    stop_after = max(max(s.last_layer for s in wanted), 0)
    for lo in range(0, tokens.shape[0], batch_contexts):
        if got >= want or (should_stop is not None and should_stop()):
            break
        keep = counted[lo : lo + batch_contexts].to(model.device)

        def take(x: torch.Tensor, keep=keep) -> torch.Tensor:
            return x[keep].cpu()  # [counted tokens, d]

        acts = run_reduced(model, tokens[lo : lo + batch_contexts], {h: take for h in hooks}, stop_after_layer=stop_after)
        for h in hooks:
            kept[h].append(acts[h])
        got += int(keep.sum())
        if progress is not None:
            progress(min(got, want), want)
    if got == 0:
        raise HexRayError("the corpus gave no tokens to train on", hint="give a larger corpus or more tokens", field="corpus")
    seconds = time.perf_counter() - start
    joined = {h: torch.cat(v)[:want] for h, v in kept.items()}
    out = [Harvest(joined[h_in], joined[h_out], seconds) for h_in, h_out in ends]
    return out if many else out[0]


def _harvest_hooks(spec, site: DictSite) -> tuple[str, str]:
    """(input hook, target hook) to read ``site`` at, firing before a stop after its last block."""
    if site.kind == "resid" and 0 < site.layer < spec.n_layers:
        stream = sites.resid_post(site.layer - 1)  # the same stream as resid_pre(L); it fires before block L
        return stream, stream
    return site.hook_in(spec), site.hook_out(spec)


# -- training ------------------------------------------------------------------------------------
@dataclass
class _State:
    """What a checkpoint holds: the parameters, the optimiser, and where the run is."""

    params: dict[str, torch.Tensor]
    optimizer: dict
    step: int = 0
    since_fired: torch.Tensor | None = None  # [d_sae] tokens since each latent last fired
    threshold: float = 0.0  # BatchTopK: running mean of the smallest kept activation
    fvu: float = 1.0
    history: list[float] = field(default_factory=list)


def _init_params(opts: TrainOptions, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(opts.seed)
    d_in, d_out = x.shape[1], y.shape[1]
    W_dec = torch.randn(opts.latents, d_out, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    # an SAE's encoder starts as its decoder's transpose; a transcoder reads another space (the MLP's input)
    W_enc = W_dec.T.clone() if not opts.site.transcoder else torch.randn(d_in, opts.latents, generator=g) / math.sqrt(d_in)
    params = {"W_enc": W_enc, "b_enc": torch.zeros(opts.latents), "W_dec": W_dec, "b_dec": y[: 65536].mean(0)}
    if opts.arch == "skip-transcoder":
        params["W_skip"] = torch.zeros(d_out, d_in)
    return params


def _sae_input(opts: TrainOptions, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return x - p["b_dec"] if not opts.site.transcoder else x  # SAEs encode relative to b_dec; transcoders' b_dec is output-space


def _encode_train(opts: TrainOptions, p: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [B, d_sae], pre-activations [B, d_sae]) as training selects them."""
    pre = _sae_input(opts, p, x) @ p["W_enc"] + p["b_enc"]
    relu = pre.relu()
    if opts.arch == "batchtopk":  # the batch's B*k largest activations, wherever they are
        flat = relu.flatten()
        values, index = flat.topk(opts.k * x.shape[0])
        acts = torch.zeros_like(flat).scatter_(0, index, values).view_as(relu)
    else:
        values, index = relu.topk(opts.k, dim=-1)
        acts = torch.zeros_like(relu).scatter_(-1, index, values)
    return acts, pre


def _decode(p: dict[str, torch.Tensor], acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out = acts @ p["W_dec"] + p["b_dec"]
    return out + x @ p["W_skip"].T if "W_skip" in p else out


def train_dictionary(
    model: LoadedModel,
    opts: TrainOptions,
    data: Harvest,
    *,
    checkpoint: Path | None = None,
    checkpoint_every: int = 200,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Dictionary, bool]:
    """Fit a dictionary to ``data``; (the dictionary, whether it ran to the end).

    With ``checkpoint`` the state is saved there every ``checkpoint_every`` steps and when stopped,
    and a run finding one resumes from it (same options and data). ``progress(step, steps, fvu)``.
    """
    opts.validate()
    x_all, y_all = data.x, data.y
    n = x_all.shape[0]
    steps = max(1, (n * opts.epochs) // opts.batch_tokens)
    dead_after = opts.dead_tokens or min(10_000_000, max(opts.batch_tokens, n * opts.epochs // 4))
    k_aux = max(1, min(x_all.shape[1] // 2, opts.latents // 2))
    state = _load_checkpoint(checkpoint) if checkpoint is not None and checkpoint.exists() else None
    if state is None:
        params = _init_params(opts, x_all, y_all)
        for t in params.values():
            t.requires_grad_(True)
        optim = torch.optim.Adam(params.values(), lr=opts.learning_rate, eps=6.25e-10)
        state = _State(params, {}, since_fired=torch.zeros(opts.latents))
    else:
        params = state.params
        for t in params.values():
            t.requires_grad_(True)
        optim = torch.optim.Adam(params.values(), lr=opts.learning_rate, eps=6.25e-10)
        optim.load_state_dict(state.optimizer)
    y_var = ((y_all[:65536] - y_all[:65536].mean(0)) ** 2).sum(-1).mean()  # per-token variance, the FVU's denominator
    order = torch.randperm(n, generator=torch.Generator().manual_seed(opts.seed))
    finished = True
    while state.step < steps:
        if should_stop is not None and should_stop():
            finished = False
            break
        lo = (state.step * opts.batch_tokens) % max(1, n - opts.batch_tokens + 1)
        idx = order[lo : lo + opts.batch_tokens]
        x, y = x_all[idx], y_all[idx]
        acts, pre = _encode_train(opts, params, x)
        recon = _decode(params, acts, x)
        err = y - recon
        loss = (err**2).sum(-1).mean() / y_var
        fired = (acts > 0).any(0)
        state.since_fired = torch.where(fired, 0, state.since_fired + x.shape[0])
        dead = state.since_fired >= dead_after
        if dead.any():  # AuxK: dead latents' top activations rebuild the residual error
            dead_pre = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
            kk = min(k_aux, int(dead.sum()))
            values, index = dead_pre.topk(kk, dim=-1)
            aux = torch.zeros_like(pre).scatter_(-1, index, values.relu()) @ params["W_dec"]
            e = err.detach()
            aux_loss = ((e - aux) ** 2).sum(-1).mean() / ((e - e.mean(0)) ** 2).sum(-1).mean().clamp_min(1e-12)
            loss = loss + opts.auxk_alpha * aux_loss.nan_to_num(0.0)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec, g = params["W_dec"], params["W_dec"].grad
            g -= (g * W_dec).sum(-1, keepdim=True) * W_dec  # keep the step tangent to unit-norm rows
        optim.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True).clamp_min(1e-12)
            if opts.arch == "batchtopk":
                kept = acts[acts > 0]
                smallest = float(kept.min()) if kept.numel() else 0.0
                state.threshold = smallest if state.step == 0 else 0.99 * state.threshold + 0.01 * smallest
        state.step += 1
        state.fvu = float((err.detach() ** 2).sum(-1).mean() / y_var)
        state.history.append(state.fvu)
        if progress is not None:
            progress(state.step, steps, state.fvu)
        if checkpoint is not None and state.step % checkpoint_every == 0:
            _save_checkpoint(checkpoint, state, optim)
    if checkpoint is not None and not finished:
        _save_checkpoint(checkpoint, state, optim)
    return _dictionary(model, opts, params, state), finished


def _dictionary(model: LoadedModel, opts: TrainOptions, params: dict[str, torch.Tensor], state: _State) -> Dictionary:
    p = {k: v.detach().clone() for k, v in params.items()}
    arch = "batchtopk" if opts.arch == "batchtopk" else "topk"
    return Dictionary(
        site=opts.site, architecture=arch, W_enc=p["W_enc"], b_enc=p["b_enc"], W_dec=p["W_dec"], b_dec=p["b_dec"],
        model_name=model.name, k=opts.k, W_skip=p.get("W_skip"), apply_b_dec_to_input=not opts.site.transcoder,
        threshold=torch.full((opts.latents,), state.threshold) if arch == "batchtopk" else None,
        meta={"trained": {"arch": opts.arch, "latents": opts.latents, "k": opts.k, "tokens": opts.tokens, "steps": state.step,
                          "batch_tokens": opts.batch_tokens, "lr": opts.learning_rate, "seed": opts.seed, "final_train_fvu": state.fvu}},
    )


def _save_checkpoint(path: Path, state: _State, optim) -> None:
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": {k: v.detach() for k, v in state.params.items()}, "optimizer": optim.state_dict(), "step": state.step,
                "since_fired": state.since_fired, "threshold": state.threshold, "fvu": state.fvu, "history": state.history}, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path) -> _State:
    try:
        raw = torch.load(path, weights_only=True)
        return _State(raw["params"], raw["optimizer"], raw["step"], raw["since_fired"], raw["threshold"], raw["fvu"], list(raw["history"]))
    except Exception as exc:  # a torn or foreign file: say so instead of a pickle traceback
        raise HexRayError(f"the checkpoint {path} cannot be read ({type(exc).__name__})", hint="delete it to start afresh, or drop --resume") from None


# -- quality -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quality:
    """A dictionary's quality on held-out text: what ``hexray dict train`` stores beside it."""

    tokens: int
    fvu: float  # fraction of variance unexplained
    l0: float  # mean latents firing per token
    dead_pct: float  # latents that never fired on the held-out tokens, %
    loss_clean: float  # next-token loss (nats) of the model as it is
    loss_spliced: float  # ... with the site replaced by the dictionary's reconstruction
    loss_zero: float  # ... with the site zero-ablated
    density: torch.Tensor = field(repr=False, compare=False)  # [d_sae] fraction of tokens each latent fires on

    @property
    def loss_recovered(self) -> float:
        """(zero - spliced) / (zero - clean): 1 is a perfect splice, 0 no better than deleting the site."""
        gap = self.loss_zero - self.loss_clean
        return (self.loss_zero - self.loss_spliced) / gap if abs(gap) > 1e-9 else float("nan")

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "fvu": self.fvu, "l0": self.l0, "dead_pct": self.dead_pct, "loss_clean": self.loss_clean,
                "loss_spliced": self.loss_spliced, "loss_zero": self.loss_zero, "loss_recovered": self.loss_recovered}


def _batches(tokens: torch.Tensor, counted: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for lo in range(0, tokens.shape[0], size):
        yield tokens[lo : lo + size], counted[lo : lo + size]


def evaluate(model: LoadedModel, d: Dictionary, tokens: torch.Tensor, counted: torch.Tensor, *, batch_contexts: int = 8,
             should_stop: Callable[[], bool] | None = None) -> Quality:
    """Held-out quality of ``d`` on contexts ``tokens`` [n, ctx] (counted [n, ctx]); three passes per batch."""
    spec = model.spec
    hook_in, hook_out = d.site.hook_in(spec), d.site.hook_out(spec)
    dev = d.to(model.device)
    sq_err = sq_sum = l0_sum = 0.0
    y_sum: torch.Tensor | float = 0.0
    n_tok = 0
    fired = torch.zeros(d.d_sae)
    losses = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    n_loss = 0
    for batch, mask in _batches(tokens, counted, batch_contexts):
        if should_stop is not None and should_stop():
            break
        seen: dict[str, torch.Tensor] = {}
        keep = mask.to(model.device)

        def observe(x, name="in"):
            seen[name] = x
            return None

        def splice(y):
            x = seen.get("in", y)
            a = dev.encode(x)
            recon = dev.decode(a, x).to(y.dtype)
            seen["stats"] = (y[keep].float(), recon[keep].float(), a[keep])
            return recon

        if hook_in != hook_out:
            spliced = run_rewritten(model, batch, {hook_in: observe, hook_out: splice})
        else:
            spliced = run_rewritten(model, batch, {hook_out: splice})
        clean = run_rewritten(model, batch, {})
        zero = run_rewritten(model, batch, {hook_out: torch.zeros_like})
        ya, ra, a = seen["stats"]
        sq_err += float(((ya - ra) ** 2).sum())
        sq_sum += float((ya.double() ** 2).sum())
        y_sum = y_sum + ya.double().sum(0)
        l0_sum += float((a > 0).sum())
        fired += (a > 0).float().sum(0).cpu()
        n_tok += ya.shape[0]
        targets, target_mask = batch[:, 1:].to(model.device), keep[:, 1:]  # predict each counted next token
        for name, logits in (("clean", clean), ("spliced", spliced), ("zero", zero)):
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
            losses[name] += float(ce[target_mask].sum())
        n_loss += int(target_mask.sum())
    if n_tok == 0:
        raise HexRayError("no held-out tokens to measure the dictionary on", hint="give a larger corpus", field="corpus")
    var_sum = sq_sum - float((torch.as_tensor(y_sum) ** 2).sum()) / n_tok  # sum of squared deviations from the held-out mean
    return Quality(
        tokens=n_tok, fvu=sq_err / max(var_sum, 1e-12), l0=l0_sum / n_tok, dead_pct=100.0 * float((fired == 0).float().mean()),
        loss_clean=losses["clean"] / max(n_loss, 1), loss_spliced=losses["spliced"] / max(n_loss, 1), loss_zero=losses["zero"] / max(n_loss, 1),
        density=fired / n_tok,
    )
