"""The load-time architecture self-check: a short probe that every hook HexRay reads fires with the
shape it expects, and that the residual stream decomposes exactly as attribution assumes.

A model that fails is refused with one error naming what is unsupported, so no analysis can
print plausible but wrong numbers. The maths here is written out independently of
:mod:`hexray.analysis` (the check must not share the code it vouches for).
"""

from __future__ import annotations

import torch

from hexray.errors import HexRayError, first_line

# Relative tolerance of each reconstruction, by the dtype the model computes in.
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def probe_ids(tokenizer, n_ctx: int) -> list[int]:
    """A few real tokens (plus the model's BOS, if its tokenizer adds one)."""
    ids = list(tokenizer("Hello, world", add_special_tokens=True)["input_ids"])
    return (ids or [0])[: max(1, min(n_ctx, 8))]


def check_architecture(model) -> None:
    """Run the probe on ``model`` (a :class:`~hexray.models.loading.LoadedModel`); raise if unsupported."""
    from hexray.tracing import sites

    spec, bridge = model.spec, model.bridge
    name = f"{model.name} ({spec.architecture})"
    hooks = {sites.EMBED, sites.FINAL_SCALE, sites.resid_post(spec.n_layers - 1)}
    for layer in range(spec.n_layers):
        hooks |= {sites.resid_pre(layer), sites.attn_out(layer), sites.mlp_out(layer), sites.head_z(layer), sites.head_v(layer), sites.attn_pattern(layer), sites.mlp_post(layer)}
        if spec.post_norms:
            hooks |= {sites.post_norm_scale(layer, "attn"), sites.post_norm_scale(layer, "mlp")}
    missing = sorted(hooks - set(bridge.hook_dict))
    if missing:
        raise _refuse(name, f"it has no hook {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    ids = probe_ids(model.tokenizer, spec.n_ctx)
    wanted = hooks | ({sites.POS_EMBED} if spec.pos_embed else set())
    try:
        with torch.inference_mode():
            logits, cache = bridge.run_with_cache(torch.tensor([ids], device=model.device), names_filter=lambda n: n in wanted)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is an unsupported model
        raise _refuse(name, f"the probe forward pass failed ({first_line(exc, 200)})") from exc
    _check_batches(model, name, ids, cache[sites.resid_post(spec.n_layers - 1)][0], logits[0])
    silent = sorted(h for h in hooks if h not in cache)
    if silent:
        raise _refuse(name, f"hook {silent[0]} never fired")

    n = len(ids)
    acts = {h: cache[h][0].detach().double().cpu() for h in wanted if h in cache}
    shapes = {
        sites.head_z(0): (n, spec.n_heads, spec.d_head),
        sites.head_v(0): (n, spec.n_kv_heads, spec.d_head),
        sites.attn_pattern(0): (spec.n_heads, n, n),
        sites.mlp_post(0): (n, spec.d_mlp),
        sites.attn_out(0): (n, spec.d_model),
    }
    for hook, shape in shapes.items():
        if tuple(acts[hook].shape) != shape:
            raise _refuse(name, f"{hook} has shape {tuple(acts[hook].shape)}, not {shape}")

    tol = _TOLERANCE.get(model.dtype, 1e-3)
    final = acts[sites.resid_post(spec.n_layers - 1)]
    total = acts[sites.EMBED] + acts.get(sites.POS_EMBED, 0)
    for layer in range(spec.n_layers):
        total = total + acts[sites.attn_out(layer)] + acts[sites.mlp_out(layer)]
        attn, mlp = _head_sum(model, acts, layer), _neuron_sum(model, acts, layer)
        if spec.post_norms:
            attn = attn * model.post_norms[layer][0].double() / acts[sites.post_norm_scale(layer, "attn")]
            mlp = mlp * model.post_norms[layer][1].double() / acts[sites.post_norm_scale(layer, "mlp")]
        _expect(name, attn, acts[sites.attn_out(layer)], tol, f"the heads' outputs (z @ W_O) do not add up to layer {layer}'s attention output")
        _expect(name, mlp, acts[sites.mlp_out(layer)], tol, f"the neurons' outputs (post @ W_out) do not add up to layer {layer}'s MLP output")
    _expect(name, total, final, tol, "the embeddings and the attention and MLP outputs do not add up to the residual stream")

    weight, bias = (w.double() for w in model.final_norm)
    centred = final - final.mean(-1, keepdim=True) if spec.norm == "layernorm" else final
    normed = centred / acts[sites.FINAL_SCALE] * weight + bias
    rebuilt = normed @ model.W_U.double().cpu() + model.b_U.double().cpu()
    if spec.logit_softcap:
        rebuilt = spec.logit_softcap * torch.tanh(rebuilt / spec.logit_softcap)
    _expect(name, rebuilt, logits[0].detach().double().cpu(), tol, "the final norm and unembedding do not reproduce the logits")


def _check_batches(model, name: str, ids: list[int], final: torch.Tensor, logits: torch.Tensor) -> None:
    """Patching runs many variants as one batch that grows inside the pass (rows join at a block's input)."""
    from hexray.tracing import sites

    bridge, tol = model.bridge, _TOLERANCE.get(model.dtype, 1e-3)
    last = model.spec.n_layers - 1
    seen: dict[str, torch.Tensor] = {}

    def grow(x, hook=None):
        return torch.cat([x, x])

    def keep(x, hook=None):
        seen["final"] = x.detach().clone()

    try:
        with torch.inference_mode():
            batched = bridge(torch.tensor([ids, ids], device=model.device))
            bridge.run_with_hooks(torch.tensor([ids], device=model.device), fwd_hooks=[(sites.resid_pre(last), grow), (sites.resid_post(last), keep)])
    except Exception as exc:  # noqa: BLE001 - any failure here is an unsupported model
        raise _refuse(name, f"a batched forward pass failed ({first_line(exc, 200)})") from exc
    _expect(name, batched[1].double().cpu(), logits.double().cpu(), tol, "a batch of two prompts does not give each prompt its own logits")
    _expect(name, seen["final"][1].double().cpu(), final.double().cpu(), tol, "a batch that grows inside the forward pass does not give each row its own result")


def _head_sum(model, acts, layer: int) -> torch.Tensor:  # [pos, d_model]
    from hexray.tracing import sites

    z = acts[sites.head_z(layer)]
    return torch.einsum("phd,hdm->pm", z, model.W_O[layer].double().cpu()) + model.b_O[layer].double().cpu()


def _neuron_sum(model, acts, layer: int) -> torch.Tensor:  # [pos, d_model]
    from hexray.tracing import sites

    return acts[sites.mlp_post(layer)] @ model.W_out[layer].double().cpu() + model.b_out[layer].double().cpu()


def _expect(name: str, got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    err = float((got - want).abs().max())
    scale = float(want.abs().max()) + 1e-6
    if not err <= tol * scale:  # also catches NaN
        raise _refuse(name, f"{what} (error {err:.2g} against a scale of {scale:.2g})")


def _refuse(name: str, why: str) -> HexRayError:
    return HexRayError(
        f"HexRay does not support {name}: {why}",
        hint="its numbers would be wrong; the README lists the verified architectures",
    )
