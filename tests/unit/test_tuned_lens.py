"""The tuned lens: identity init, training, held-out KL (checked by hand), files and refusals."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import hexray.features.tuned_lens as tl
from hexray.analysis.lens import lens_hooks, lens_logits, logit_lens, stacked_residual
from hexray.errors import HexRayError
from hexray.features.tuned_lens import (
    TunedLens,
    default_tuned_lens_path,
    identity_tuned_lens,
    lens_kl,
    load_tuned_lens,
    save_tuned_lens,
    train_tuned_lens,
    tuned_lens_root,
    tuned_logits,
    unembed_hash,
)
from hexray.tracing import sites
from hexray.tracing.engine import capture, run_trace
from tests.conftest import CORPUS

PROMPT = "When Mary and John went to the store, John gave a drink to"
CTX = 16


def random_pack(model, n_contexts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts of random tokens, each opened by BOS (not counted)."""
    gen = torch.Generator().manual_seed(seed)
    bos = model.tokenizer.bos_token_id
    tokens = torch.randint(0, model.spec.d_vocab - 1, (n_contexts, CTX), generator=gen)
    tokens += (tokens >= bos).long()  # any token but BOS ...
    tokens[:, 0] = bos  # ... which opens each context
    return tokens, tokens != bos


def random_lens(model, scale: float = 0.3, seed: int = 0) -> TunedLens:
    gen = torch.Generator().manual_seed(seed)
    n, d = model.spec.n_layers, model.spec.d_model
    return dataclasses.replace(
        identity_tuned_lens(model),
        weight=torch.randn(n, d, d, generator=gen) * scale / math.sqrt(d),
        bias=torch.randn(n, d, generator=gen) * scale,
        meta={"note": "random"},
    )


@pytest.fixture(scope="module")
def trace(tiny_model):
    return run_trace(tiny_model, PROMPT, lens_hooks(tiny_model.spec))


@pytest.fixture(scope="module")
def trained(tiny_model):
    """A lens trained on random contexts, with its held-out evaluation."""
    train = random_pack(tiny_model, 48, seed=1)
    held = random_pack(tiny_model, 16, seed=2)
    return train_tuned_lens(tiny_model, *train, steps=20, batch_contexts=8, held_out=held)


# -- identity and rows ------------------------------------------------------------------------
def test_identity_is_exactly_the_logit_lens(tiny_model, trace):
    stack = stacked_residual(tiny_model, trace)  # [rows, pos, d_model]
    ident = identity_tuned_lens(tiny_model)
    assert torch.equal(tuned_logits(tiny_model, ident, stack), lens_logits(tiny_model, stack))
    assert logit_lens(tiny_model, trace, tuned=ident) == logit_lens(tiny_model, trace)


def test_tuned_rows_are_translated_by_hand_formula(tiny_model, trace):
    lens = random_lens(tiny_model)
    stack = stacked_residual(tiny_model, trace)
    got = tuned_logits(tiny_model, lens, stack)
    n = tiny_model.spec.n_layers
    for r in range(n):
        h = stack[r]
        by_hand = lens_logits(tiny_model, h + h @ lens.weight[r] + lens.bias[r])
        torch.testing.assert_close(got[r], by_hand)
    plain, tuned = logit_lens(tiny_model, trace), logit_lens(tiny_model, trace, tuned=lens)
    assert [row.label for row in plain.rows] == [row.label for row in tuned.rows]
    assert plain.rows[:n] != tuned.rows[:n]  # the translators change what early rows read
    assert tuned.rows[0].top[0].id == int(got[0, -1].argmax())


def test_final_row_is_the_models_logits(tiny_model, trace):
    lens = random_lens(tiny_model)
    last = tuned_logits(tiny_model, lens, stacked_residual(tiny_model, trace))[-1]
    torch.testing.assert_close(last, trace.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(lens.translate(tiny_model.spec.n_layers, trace.logits[:, :4]), trace.logits[:, :4])
    with pytest.raises(HexRayError):
        lens.translate(tiny_model.spec.n_layers + 1, trace.logits)


# -- KL ---------------------------------------------------------------------------------------
def _kl_bits_by_hand(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per token KL(p || q) in bits, softmax written out: [n, vocab] -> [n]."""
    p_logits, q_logits = p_logits.double(), q_logits.double()
    ep = torch.exp(p_logits - p_logits.max(-1, keepdim=True).values)
    eq = torch.exp(q_logits - q_logits.max(-1, keepdim=True).values)
    p, q = ep / ep.sum(-1, keepdim=True), eq / eq.sum(-1, keepdim=True)
    return (p * (torch.log2(p) - torch.log2(q))).sum(-1)


@pytest.mark.parametrize("kind", ["logit", "tuned"])
def test_lens_kl_matches_a_hand_computation(tiny_model, kind):
    lens = None if kind == "logit" else random_lens(tiny_model, scale=0.5, seed=3)
    tokens, counted = random_pack(tiny_model, 3, seed=4)
    counted[1, 5:9] = False  # some uncounted tokens mid-context too
    got = lens_kl(tiny_model, lens, tokens, counted, batch_contexts=2)
    hooks = sites.residual_stream(tiny_model.spec)
    n_rows = tiny_model.spec.n_layers + 1
    total, count = torch.zeros(n_rows, dtype=torch.float64), 0
    for i in range(tokens.shape[0]):
        logits, acts = capture(tiny_model, [tokens[i].tolist()], hooks)
        keep = counted[i]
        for r, hook in enumerate(hooks):
            h = acts[0][hook][keep]
            if lens is not None and r < n_rows - 1:
                h = h + h @ lens.weight[r] + lens.bias[r]
            q = tiny_model.apply_final_norm(h) @ tiny_model.W_U + tiny_model.b_U
            total[r] += _kl_bits_by_hand(logits[0][keep], q).sum()
        count += int(keep.sum())
    want = (total / count).numpy()
    assert got.shape == (n_rows,)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert want[: n_rows - 1].min() > 0.01  # a case where the lens is visibly off
    assert abs(got[-1]) < 1e-4  # the final stream read through the unembedding is the output


def test_training_lowers_held_out_kl(tiny_model, trained):
    held = trained.meta["held_out"]
    tuned, logit = np.array(held["kl_bits_tuned"]), np.array(held["kl_bits_logit"])
    n = tiny_model.spec.n_layers
    assert tuned.shape == logit.shape == (n + 1,)
    assert np.all(tuned[:n] < 0.6 * logit[:n]), (tuned, logit)
    assert abs(tuned[n]) < 1e-4 and abs(logit[n]) < 1e-4
    # the record's numbers are what lens_kl says about the returned lens
    again = lens_kl(tiny_model, trained, *random_pack(tiny_model, 16, seed=2))
    np.testing.assert_allclose(again, tuned, rtol=1e-5, atol=1e-7)
    assert trained.meta["steps"] == 20 and not trained.meta["stopped_early"]
    assert trained.meta["tokens"] == 20 * 8 * (CTX - 1)


def test_training_on_corpus_text_generalises(tiny_model):
    """A small pack of real (tiny-corpus) text: BOS-separated sentences cut into contexts."""
    bos = tiny_model.tokenizer.bos_token_id
    stream = []
    for text in CORPUS:
        stream += [bos, *tiny_model.encode(text, prepend_bos=False)]
    n = len(stream) // CTX
    tokens = torch.tensor(stream[: n * CTX]).view(n, CTX)
    counted = tokens != bos
    split = n * 3 // 4
    lens = train_tuned_lens(tiny_model, tokens[:split], counted[:split], steps=40, batch_contexts=4)
    tuned = lens_kl(tiny_model, lens, tokens[split:], counted[split:])
    logit = lens_kl(tiny_model, None, tokens[split:], counted[split:])
    assert tuned[:-1].mean() < 0.8 * logit[:-1].mean(), (tuned, logit)


def test_uncounted_tokens_are_left_out_of_the_loss(tiny_model):
    tokens, counted = random_pack(tiny_model, 4, seed=5)
    counted[:, -1] = False  # the last token reaches no other position (causal attention) ...
    other = tokens.clone()
    other[:, -1] = (tokens[:, -1] + 7) % tiny_model.spec.d_vocab  # ... so changing it must change nothing
    a = train_tuned_lens(tiny_model, tokens, counted, steps=3, batch_contexts=4)
    b = train_tuned_lens(tiny_model, other, counted, steps=3, batch_contexts=4)
    assert a.meta["tokens"] == 3 * int(counted.sum())
    torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=1e-5)
    c = train_tuned_lens(tiny_model, other, torch.ones_like(counted), steps=3, batch_contexts=4)
    assert not torch.allclose(a.weight, c.weight, atol=1e-6, rtol=1e-5)  # counted, the same token does matter
    with pytest.raises(HexRayError, match="no token is counted"):
        train_tuned_lens(tiny_model, tokens, torch.zeros_like(counted), steps=1)


# -- caching and stopping ---------------------------------------------------------------------
def test_cached_residuals_train_the_same_lens(tiny_model, monkeypatch):
    tokens, counted = random_pack(tiny_model, 6, seed=6)
    calls = []
    real = tl.capture
    monkeypatch.setattr(tl, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    cached = train_tuned_lens(tiny_model, tokens, counted, steps=9, batch_contexts=3)
    forwards_cached = len(calls)
    fresh = train_tuned_lens(tiny_model, tokens, counted, steps=9, batch_contexts=3, max_cache_bytes=0)
    assert cached.meta["cached_residuals"] and not fresh.meta["cached_residuals"]
    assert forwards_cached == 2 and len(calls) - forwards_cached == 9  # each context run once when cached
    torch.testing.assert_close(cached.weight, fresh.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached.bias, fresh.bias, atol=1e-5, rtol=1e-4)
    assert cached.weight.abs().max() > 0


def test_should_stop_returns_the_lens_so_far(tiny_model, trace):
    tokens, counted = random_pack(tiny_model, 8, seed=7)
    asked, seen = [], []

    def stop() -> bool:
        asked.append(1)
        return len(asked) >= 3  # two steps run, then stop

    held = random_pack(tiny_model, 2, seed=8)
    lens = train_tuned_lens(tiny_model, tokens, counted, steps=50, batch_contexts=2, held_out=held,
                            should_stop=stop, progress=lambda s, total, kl: seen.append((s, total, kl)))
    assert lens.meta["stopped_early"] and lens.meta["steps"] == 2 and "held_out" not in lens.meta
    assert [s for s, _, _ in seen] == [1, 2] and all(total == 50 and kl > 0 for _, total, kl in seen)
    assert lens.weight.abs().max() > 0  # it did learn in those two steps
    kl = lens_kl(tiny_model, lens, *held)
    assert np.isfinite(kl).all()
    logit_lens(tiny_model, trace, tuned=lens)  # usable as it is


# -- files ------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tiny_model, trained, tmp_path):
    folder = save_tuned_lens(trained, tmp_path / "lens")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "params.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["lens"]  # no temporary leftovers
    back = load_tuned_lens(folder, tiny_model)
    assert torch.equal(back.weight.cpu(), trained.weight.cpu()) and torch.equal(back.bias.cpu(), trained.bias.cpu())
    assert (back.model_name, back.unembed_hash, back.n_layers, back.d_model) == (trained.model_name, trained.unembed_hash, trained.n_layers, trained.d_model)
    assert back.meta == json.loads(json.dumps(trained.meta))
    # saving again replaces the old lens in place
    other = random_lens(tiny_model)
    save_tuned_lens(other, folder)
    assert torch.equal(load_tuned_lens(folder / "config.json", tiny_model).weight.cpu(), other.weight.cpu())
    assert [p.name for p in tmp_path.iterdir()] == ["lens"]


def test_default_path_is_per_model_and_checkpoint(tiny_gpt2, tiny_llama):
    a, b = default_tuned_lens_path(tiny_gpt2), default_tuned_lens_path(tiny_llama)
    assert a.parent == b.parent == tuned_lens_root() and a != b
    assert unembed_hash(tiny_gpt2)[:12] in a.name and "/" not in a.name


def test_a_lens_from_another_model_is_refused(tiny_gpt2, tiny_llama, tmp_path):
    lens = random_lens(tiny_gpt2)
    assert (tiny_gpt2.spec.n_layers, tiny_gpt2.spec.d_model) == (tiny_llama.spec.n_layers, tiny_llama.spec.d_model)
    folder = save_tuned_lens(lens, tmp_path / "gpt2-lens")
    with pytest.raises(HexRayError, match="unembedding") as info:
        load_tuned_lens(folder, tiny_llama)  # same shapes: only the hash tells them apart
    assert "\n" not in info.value.one_line()
    with pytest.raises(HexRayError, match="unembedding"):
        tuned_logits(tiny_llama, lens, torch.zeros(tiny_llama.spec.n_layers + 1, 2, tiny_llama.spec.d_model))
    load_tuned_lens(folder, tiny_gpt2)  # its own model takes it


def test_a_lens_of_another_width_is_refused(tiny_model, tmp_path):
    folder = save_tuned_lens(random_lens(tiny_model), tmp_path / "lens")
    config = json.loads((folder / "config.json").read_text())
    config["d_model"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(HexRayError, match="d_model 64"):
        load_tuned_lens(folder, tiny_model)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage-config", "no-config", "no-params", "missing"])
def test_damaged_files_are_refused(tiny_model, tmp_path, damage):
    folder = save_tuned_lens(random_lens(tiny_model), tmp_path / "lens")
    params, config = folder / "params.safetensors", folder / "config.json"
    data = params.read_bytes()
    if damage == "truncate":
        params.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        params.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    elif damage == "garbage-config":
        config.write_text('{"format": "hexray-tuned-lens", "n_lay')
    elif damage == "no-config":
        config.unlink()
    elif damage == "no-params":
        params.unlink()
    else:
        folder = tmp_path / "nowhere"
    with pytest.raises(HexRayError) as info:
        load_tuned_lens(folder, tiny_model)
    assert "\n" not in info.value.one_line()


def test_bad_training_input_is_refused(tiny_model):
    tokens, counted = random_pack(tiny_model, 2, seed=9)
    for args, kwargs, match in [
        ((tokens[0], counted[0]), {}, "contexts, positions"),
        ((tokens, counted[:, :4]), {}, "counted mask"),
        ((tokens, counted.int()), {}, "bool"),
        ((tokens + tiny_model.spec.d_vocab, counted), {}, "vocabulary"),
        ((tokens, counted), {"steps": 0}, "steps"),
        ((tokens, counted), {"warmup": 5, "steps": 5}, "warmup"),
    ]:
        with pytest.raises(HexRayError, match=match):
            train_tuned_lens(tiny_model, *args, **kwargs)
