"""The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens").

The logit lens reads a layer's residual stream through the final norm and unembedding as if it
were the last layer's. Early layers are not in the last layer's basis, so it reads them badly
(for some models, not at all). The tuned lens learns, per layer, an affine *translator* into that
basis, trained so the lens's distribution matches the model's final one::

    translate_l(h) = h + h @ weight[l] + bias[l]          # weight [d_model, d_model], zero-initialised
    lens_l(h)      = unembed(final_norm(translate_l(h)))

As in the ``tuned-lens`` package (``tuned_lens/nn/lenses.py``) the translator is residual, so
zero parameters are the identity (the logit lens) and weight decay pulls towards it; the final
stream gets no translator (it *is* the output). Training follows ``tuned_lens/scripts/train_loop.py``
and ``ingredients.py``: loss = KL(final || lens) at the same position (no shift), per layer, mean
over tokens, summed over layers; SGD with Nesterov momentum 0.9, lr 1.0 scaled by (1 - momentum),
weight decay 1e-3, no warmup by default, linear decay to zero, gradient norm clipped to 1.

Rows everywhere are the logit lens's rows: the stream entering each block (row 0 = after the
embeddings), then the final stream.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hexray.analysis.lens import lens_logits
from hexray.errors import HexRayError, first_line
from hexray.models.loading import LoadedModel, cache_root
from hexray.tracing import sites
from hexray.tracing.engine import capture

FORMAT = "hexray-tuned-lens"
FORMAT_VERSION = 1
PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
CACHE_BYTES = 2e9  # harvested residuals kept for revisited contexts, at most
GRAD_CLIP = 1.0  # the package's clip_grad_norm_ threshold
_BLOCK_ELEMENTS = 2**25  # a [tokens, d_vocab] block of this many floats (128 MB) at a time
_LN2 = math.log(2.0)

_hashes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> unembed hash (hashing W_U takes a while)


@dataclass(frozen=True, eq=False)
class TunedLens:
    """Per-layer affine translators for one model's residual stream (see the module docstring)."""

    model_name: str
    unembed_hash: str  # of W_U, b_U and the final norm: a lens only fits the unembedding it was trained through
    n_layers: int
    d_model: int
    weight: torch.Tensor  # [n_layers, d_model, d_model]: row l is h -> h + h @ weight[l] + bias[l]
    bias: torch.Tensor  # [n_layers, d_model]
    meta: dict[str, Any] = field(default_factory=dict)  # the training record (JSON-able)

    def __post_init__(self):
        if tuple(self.weight.shape) != (self.n_layers, self.d_model, self.d_model) or tuple(self.bias.shape) != (self.n_layers, self.d_model):
            raise ValueError(f"tuned lens parameters have shapes {tuple(self.weight.shape)}, {tuple(self.bias.shape)} for {self.n_layers} layers of {self.d_model}")

    @property
    def n_rows(self) -> int:
        return self.n_layers + 1

    def translate(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """Row ``layer``'s stream ``resid`` [..., d_model] in the final layer's basis (row n_layers: unchanged)."""
        if not 0 <= layer <= self.n_layers:
            raise HexRayError(f"tuned lens row {layer} is out of range", hint=f"use 0..{self.n_layers} (row {self.n_layers} is the final stream)")
        if layer == self.n_layers:
            return resid
        w = self.weight[layer].to(resid.device, resid.dtype)
        b = self.bias[layer].to(resid.device, resid.dtype)
        return resid + resid @ w + b

    def translate_stack(self, resid_stack: torch.Tensor) -> torch.Tensor:
        """Every row at once: [n_layers + 1, ..., d_model] -> the same shape."""
        if resid_stack.shape[0] != self.n_rows:
            raise ValueError(f"a residual stack of {resid_stack.shape[0]} rows, not {self.n_rows}")
        return torch.stack([self.translate(r, resid_stack[r]) for r in range(self.n_rows)])


# -- identity, hashing and checks ----------------------------------------------------------------
def unembed_hash(model: LoadedModel) -> str:
    """A short sha256 of what a lens reads through: W_U, b_U and the final norm's weights."""
    cached = _hashes.get(model)
    if cached is not None:
        return cached
    digest = hashlib.sha256(b"hexray-unembed-v1")
    weight, bias = model.final_norm
    for t in (model.W_U, model.b_U, weight, bias):
        arr = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
        digest.update(repr(arr.shape).encode())
        digest.update(arr.data)
    digest.update(repr(model.spec.logit_softcap).encode())
    _hashes[model] = value = digest.hexdigest()[:16]
    return value


def identity_tuned_lens(model: LoadedModel) -> TunedLens:
    """The untrained lens: every translator zero, so it reads exactly as the logit lens."""
    n, d = model.spec.n_layers, model.spec.d_model
    return TunedLens(
        model.name, unembed_hash(model), n, d,
        torch.zeros(n, d, d, device=model.device), torch.zeros(n, d, device=model.device),
    )


def check_lens(model: LoadedModel, lens: TunedLens, *, where: str = "the tuned lens") -> None:
    """A HexRayError when ``lens`` was not trained for this model (other width, depth or unembedding)."""
    spec = model.spec
    if (lens.n_layers, lens.d_model) != (spec.n_layers, spec.d_model):
        raise HexRayError(
            f"{where} is for {lens.model_name} ({lens.n_layers} layers, d_model {lens.d_model}), not {model.name} ({spec.n_layers} layers, d_model {spec.d_model})",
            hint="train a tuned lens for this model",
        )
    mine = unembed_hash(model)
    if lens.unembed_hash != mine:
        raise HexRayError(
            f"{where} was trained on {lens.model_name} (unembedding {lens.unembed_hash}), not this {model.name} (unembedding {mine})",
            hint="another model or checkpoint: train a tuned lens for this one",
        )


def tuned_logits(model: LoadedModel, lens: TunedLens, resid_stack: torch.Tensor) -> torch.Tensor:
    """The tuned lens's logits at every row: [n_layers + 1, ..., d_model] -> [n_layers + 1, ..., d_vocab].

    The logit lens's rows and form (:func:`hexray.analysis.lens.lens_logits`); the last row, the
    final stream, is untranslated and so gives the model's own logits.
    """
    check_lens(model, lens)
    with torch.inference_mode():
        return lens_logits(model, lens.translate_stack(resid_stack))


# -- data -------------------------------------------------------------------------------------
def _check_data(model: LoadedModel, tokens, counted, name: str = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` [n, ctx] int and ``counted`` [n, ctx] bool, checked against the model."""
    tokens, counted = torch.as_tensor(tokens), torch.as_tensor(counted)
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise HexRayError(f"{{field}} must be [contexts, positions], got shape {tuple(tokens.shape)}", field=name)
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise HexRayError(f"{{field}} must hold integer token ids, not {tokens.dtype}", field=name)
    if tuple(counted.shape) != tuple(tokens.shape):
        raise HexRayError(f"the counted mask is {tuple(counted.shape)}, the {{field}} {tuple(tokens.shape)}", hint="give one flag per token", field=name)
    if counted.dtype != torch.bool:
        raise HexRayError(f"the counted mask must be bool, not {counted.dtype}", field=name)
    if tokens.shape[1] > model.spec.n_ctx:
        raise HexRayError(f"{{field}}: contexts of {tokens.shape[1]} tokens are longer than {model.name}'s context of {model.spec.n_ctx}", hint="use shorter contexts", field=name)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= model.spec.d_vocab:
        raise HexRayError(f"{{field}}: token id {lo if lo < 0 else hi} is outside {model.name}'s vocabulary of {model.spec.d_vocab}", field=name)
    if not bool(counted.any()):
        raise HexRayError("{field}: no token is counted", hint="every position is masked out (BOS or separators only)", field=name)
    return tokens.long().cpu(), counted.cpu()


def _harvest(model: LoadedModel, tokens: torch.Tensor, counted: torch.Tensor, index: list[int], *, logits: bool = False):
    """One forward over contexts ``index``: the stream at every row, counted positions only.

    Returns ([n_layers + 1, n, d_model], [n, d_vocab] model logits or None), float32 on the model's device.
    """
    hooks = sites.residual_stream(model.spec)
    out, acts = capture(model, [tokens[i].tolist() for i in index], hooks)
    stacks, finals = [], []
    for row, i in enumerate(index):
        keep = counted[i].to(model.device)
        stacks.append(torch.stack([acts[row][h] for h in hooks])[:, keep])  # outside inference mode: a plain tensor
        if logits:
            finals.append(out[row][keep].clone())
    return torch.cat(stacks, dim=1), (torch.cat(finals) if logits else None)


def _batches(n_contexts: int, size: int, seed: int) -> Iterator[list[int]]:
    """Context indices, ``size`` at a time, a fresh shuffle every epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n_contexts, generator=gen).tolist()
        for lo in range(0, n_contexts, size):
            yield order[lo : lo + size]


def _unembedder(model: LoadedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """``h`` [n, d_model] -> logits [n, d_vocab] through the model's own final norm, differentiable in ``h``.

    ``LoadedModel.apply_final_norm`` runs in inference mode (no gradient); here the norm module runs
    with detached float32 copies of its parameters, so the gradient reaches ``h`` and never the model.
    """
    norm = model.final_norm_module
    params = {name: p.detach().float() for name, p in norm.named_parameters()}
    w_u, b_u, cap = model.W_U, model.b_U, model.spec.logit_softcap

    def unembed(h: torch.Tensor) -> torch.Tensor:
        z = torch.func.functional_call(norm, params, (h,)) @ w_u + b_u
        return cap * torch.tanh(z / cap) if cap else z  # the distribution the model samples from

    return unembed


def _block(model: LoadedModel) -> int:
    return max(1, _BLOCK_ELEMENTS // model.spec.d_vocab)  # tokens per [tokens, d_vocab] block


# -- training -----------------------------------------------------------------------------------
def train_tuned_lens(
    model: LoadedModel,
    tokens: torch.Tensor,
    counted: torch.Tensor,
    *,
    steps: int = 250,
    batch_contexts: int = 8,
    lr: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    warmup: int = 0,
    seed: int = 0,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_cache_bytes: float = CACHE_BYTES,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TunedLens:
    """Train every layer's translator together against the model's final distribution.

    ``tokens`` [n_contexts, ctx] (int64) and ``counted`` [n_contexts, ctx] (bool; False at BOS and
    separators, which the loss skips). Each step takes ``batch_contexts`` contexts (reshuffled every
    epoch), runs them through the model once, and takes one SGD step on the summed per-layer KL.
    When steps revisit contexts and their residuals fit ``max_cache_bytes``, each context's
    residuals are kept from its first forward instead of recomputed.

    ``lr`` is the package's ``lr_scale``: PyTorch's momentum makes the step 1 / (1 - momentum) times
    larger, so the optimiser gets ``lr * (1 - momentum)``. ``held_out`` (tokens, counted): after
    training, the held-out KL of the tuned and the logit lens go into ``meta``.
    ``progress(step, steps, kl_bits)``, after each step, with the step's mean KL over layers.
    ``should_stop()`` is asked before each step; True ends training with the lens so far
    (``meta["stopped_early"]``; no held-out evaluation then).
    """
    tokens, counted = _check_data(model, tokens, counted)
    if held_out is not None:
        held_out = _check_data(model, *held_out, name="held_out")
    for name, value, least in (("steps", steps, 1), ("batch_contexts", batch_contexts, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or value < least:
            raise HexRayError(f"{{field}} must be an integer of at least {least}, got {value!r}", field=name)
    if warmup >= steps:
        raise HexRayError(f"{{field}} ({warmup}) must be fewer than the steps ({steps})", field="warmup")
    if not lr > 0 or not 0 <= momentum < 1 or not weight_decay >= 0:
        raise HexRayError(f"need lr > 0, 0 <= momentum < 1 and weight_decay >= 0; got {lr}, {momentum}, {weight_decay}", field="lr")

    spec, device = model.spec, model.device
    n, d = spec.n_layers, spec.d_model
    start = time.monotonic()
    # One tensor per layer, so a layer's backward touches only its own translator.
    weights = [torch.zeros(d, d, device=device, requires_grad=True) for _ in range(n)]
    biases = [torch.zeros(d, device=device, requires_grad=True) for _ in range(n)]
    params = weights + biases
    opt = torch.optim.SGD(params, lr=lr * (1 - momentum), momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)

    def schedule(step: int) -> float:  # linear warmup, then linear decay to zero at ``steps``
        return step / warmup if step < warmup else (steps - step) / (steps - warmup)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    unembed, block = _unembedder(model), _block(model)

    n_contexts = tokens.shape[0]
    need = int(counted.sum()) * (n + 1) * d * 4  # bytes: every context's counted residuals
    use_cache = steps * batch_contexts > n_contexts and need <= max_cache_bytes
    cache: dict[int, torch.Tensor] = {}
    batches = _batches(n_contexts, batch_contexts, seed)

    done, seen, stopped, forwards = 0, 0, False, 0
    last_kl = [math.nan] * n
    for step in range(steps):
        if should_stop is not None and should_stop():
            stopped = True
            break
        index = next(batches)
        if use_cache:
            missing = [i for i in index if i not in cache]
            if missing:
                stack, _ = _harvest(model, tokens, counted, missing)
                forwards += 1
                sizes = counted[missing].sum(1).tolist()
                for i, part in zip(missing, stack.split(sizes, dim=1)):
                    cache[i] = part
            stack = torch.cat([cache[i] for i in index], dim=1)
        else:
            stack, _ = _harvest(model, tokens, counted, index)
            forwards += 1
        n_tok = stack.shape[1]  # [n + 1, n_tok, d]
        opt.zero_grad(set_to_none=False)
        kl_sum = torch.zeros(n, dtype=torch.float64)
        for lo in range(0, n_tok, block):
            with torch.no_grad():  # the target: the model's own distribution, from the final stream
                logp = torch.log_softmax(unembed(stack[n, lo : lo + block]), dim=-1)  # [b, d_vocab]
                p = logp.exp()
                neg_entropy = (p * logp).sum(-1)  # [b]
            for layer in range(n):
                h = stack[layer, lo : lo + block]
                z = unembed(h + h @ weights[layer] + biases[layer])
                kl = F.cross_entropy(z, p, reduction="none") + neg_entropy  # [b] nats: CE(p, q) - H(p)
                (kl.sum() / n_tok).backward()  # a layer at a time keeps one [b, d_vocab] graph alive
                kl_sum[layer] += float(kl.detach().sum())
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        sched.step()
        done, seen = step + 1, seen + n_tok
        last_kl = (kl_sum / n_tok / _LN2).tolist()
        if progress is not None:
            progress(done, steps, float(np.mean(last_kl)))

    lens = TunedLens(
        model.name, unembed_hash(model), n, d,
        torch.stack([w.detach() for w in weights]), torch.stack([b.detach() for b in biases]),
    )
    meta: dict[str, Any] = {
        "steps": done, "steps_planned": steps, "stopped_early": stopped,
        "contexts": n_contexts, "context_tokens": int(tokens.shape[1]), "batch_contexts": batch_contexts,
        "tokens": seen, "forwards": forwards, "cached_residuals": use_cache,
        "optimizer": "SGD, Nesterov momentum", "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
        "warmup": warmup, "schedule": "linear decay to 0", "grad_clip": GRAD_CLIP, "seed": seed,
        "train_kl_bits_last_step": last_kl, "train_seconds": round(time.monotonic() - start, 3),
    }
    if held_out is not None and not stopped:
        meta["held_out"] = {
            "tokens": int(held_out[1].sum()),
            "kl_bits_tuned": lens_kl(model, lens, *held_out).tolist(),
            "kl_bits_logit": lens_kl(model, None, *held_out).tolist(),
        }
    meta["wall_seconds"] = round(time.monotonic() - start, 3)
    return TunedLens(lens.model_name, lens.unembed_hash, n, d, lens.weight, lens.bias, meta)


def lens_kl(model: LoadedModel, lens: TunedLens | None, tokens: torch.Tensor, counted: torch.Tensor, *, batch_contexts: int = 8) -> np.ndarray:
    """Per row ([n_layers + 1]), KL(model's final distribution || the lens's) in bits, averaged over counted tokens.

    ``lens=None`` measures the logit lens. The target is the model's actual output logits; the
    final row is the lens reading the final stream, so its KL is rounding error (about 0).
    """
    tokens, counted = _check_data(model, tokens, counted)
    if lens is not None:
        check_lens(model, lens)
    n_rows, block = model.spec.n_layers + 1, _block(model)
    unembed = _unembedder(model)
    total, count = np.zeros(n_rows), 0
    with torch.no_grad():
        for lo in range(0, tokens.shape[0], batch_contexts):
            stack, final = _harvest(model, tokens, counted, list(range(lo, min(lo + batch_contexts, tokens.shape[0]))), logits=True)
            for t in range(0, final.shape[0], block):
                logp = torch.log_softmax(final[t : t + block], dim=-1)  # [b, d_vocab]
                p = logp.exp()
                for r in range(n_rows):
                    h = stack[r, t : t + block]
                    logq = torch.log_softmax(unembed(h if lens is None else lens.translate(r, h)), dim=-1)
                    total[r] += float((p * (logp - logq)).sum(-1).double().sum())
            count += final.shape[0]
    return total / count / _LN2


# -- files --------------------------------------------------------------------------------------
def tuned_lens_root() -> Path:
    return cache_root() / "tuned-lens"


def default_tuned_lens_path(model: LoadedModel) -> Path:
    """``<cache>/tuned-lens/<model name>-<unembed hash>``: a folder per model and checkpoint."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.name).strip("-.")[-60:] or "model"
    return tuned_lens_root() / f"{slug}-{unembed_hash(model)[:12]}"


def save_tuned_lens(lens: TunedLens, folder: str | Path) -> Path:
    """Write ``folder/params.safetensors`` + ``folder/config.json``; the folder appears only when complete.

    Written into a temporary sibling and renamed into place (an existing lens there is replaced).
    """
    from safetensors.torch import save

    folder = Path(folder).expanduser()
    data = save({"weight": lens.weight.detach().to("cpu", torch.float32).contiguous(), "bias": lens.bias.detach().to("cpu", torch.float32).contiguous()})
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model_name": lens.model_name, "unembed_hash": lens.unembed_hash,
        "n_layers": lens.n_layers, "d_model": lens.d_model,
        "params_sha256": hashlib.sha256(data).hexdigest(),  # catches a truncated or corrupted params file
        "meta": lens.meta,
    }
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            for name, payload in ((PARAMS_FILE, data), (CONFIG_FILE, json.dumps(config, indent=1).encode())):
                with open(tmp / name, "wb") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
            if folder.exists():  # a directory cannot be renamed over a non-empty one: move the old one aside first
                old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
                os.replace(folder, old)
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise HexRayError(f"cannot save the tuned lens to {folder}: {exc.strerror or first_line(exc)}", hint="choose a folder you can write") from None
    return folder


def load_tuned_lens(path: str | Path, model: LoadedModel) -> TunedLens:
    """Read a lens saved by :func:`save_tuned_lens`, refusing one that does not fit ``model`` or is damaged."""
    from safetensors.torch import load

    folder = Path(path).expanduser()
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise HexRayError(f"no tuned lens at {path}", hint="train one first, or check the path")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HexRayError(f"{folder} holds no {CONFIG_FILE}: not a tuned lens", hint="train one first, or check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HexRayError(f"{folder / CONFIG_FILE} is unreadable or corrupt ({first_line(exc)})", hint="train the lens again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise HexRayError(f"{folder / CONFIG_FILE} is not a HexRay tuned-lens config", hint="train the lens again")
    if config.get("format_version") != FORMAT_VERSION:
        raise HexRayError(f"{folder} is tuned-lens format version {config.get('format_version')!r}; this HexRay reads version {FORMAT_VERSION}", hint="train the lens again")
    try:
        header = TunedLens(
            str(config["model_name"]), str(config["unembed_hash"]), int(config["n_layers"]), int(config["d_model"]),
            torch.zeros(int(config["n_layers"]), int(config["d_model"]), int(config["d_model"]), device="meta"),
            torch.zeros(int(config["n_layers"]), int(config["d_model"]), device="meta"),
        )
        expected_sha = str(config["params_sha256"])
        meta = dict(config.get("meta") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise HexRayError(f"{folder / CONFIG_FILE} is incomplete or corrupt ({first_line(exc)})", hint="train the lens again") from None
    check_lens(model, header, where=f"the tuned lens at {folder}")  # before reading megabytes of parameters
    try:
        data = (folder / PARAMS_FILE).read_bytes()
    except OSError as exc:
        raise HexRayError(f"cannot read {folder / PARAMS_FILE}: {exc.strerror or first_line(exc)}", hint="train the lens again") from None
    if hashlib.sha256(data).hexdigest() != expected_sha:
        raise HexRayError(f"{folder / PARAMS_FILE} is truncated or corrupt ({len(data)} bytes, checksum mismatch)", hint="train the lens again")
    try:
        tensors = load(data)
        weight, bias = tensors["weight"], tensors["bias"]
        lens = TunedLens(header.model_name, header.unembed_hash, header.n_layers, header.d_model, weight.float().to(model.device), bias.float().to(model.device), meta)
    except Exception as exc:  # safetensors raises its own error types
        raise HexRayError(f"{folder / PARAMS_FILE} does not hold this lens's parameters ({first_line(exc)})", hint="train the lens again") from None
    if not (torch.isfinite(lens.weight).all() and torch.isfinite(lens.bias).all()):
        raise HexRayError(f"{folder / PARAMS_FILE} holds non-finite parameters", hint="train the lens again")
    return lens
