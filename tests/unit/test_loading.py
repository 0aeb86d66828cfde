"""Model loading: sources, errors, the cache location and what LoadedModel exposes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hexray.errors import HexRayError
from hexray.models.loading import cache_root, load_model

# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_nonexistent_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HexRayError) as info:
        load_model("./nope")
    assert "./nope" in info.value.message
    assert "no model folder" in info.value.message
    assert info.value.hint


@pytest.mark.parametrize("name", ["missing.gguf", "missing.GGUF"])
def test_missing_gguf(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(HexRayError) as info:
        load_model(str(path))
    assert "no GGUF file" in info.value.message
    assert str(path) in info.value.message


def test_unreadable_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(HexRayError) as info:
        load_model(str(path))
    assert "could not read GGUF file" in info.value.message
    assert "junk.gguf" in info.value.message


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HexRayError) as info:
        load_model("no-such-org/no-such-model")
    err = info.value
    assert "no-such-org/no-such-model" in err.message
    assert "not available offline" in err.message
    assert "local Hugging Face cache" in err.message
    assert "no-such-org/no-such-model" in err.hint


def test_folder_without_a_model(tmp_path):
    (tmp_path / "README.md").write_text("no weights here")
    with pytest.raises(HexRayError) as info:
        load_model(str(tmp_path))
    assert "could not load model from" in info.value.message
    assert str(tmp_path) in info.value.message


# ---------------------------------------------------------------------------------------------
# cache location
# ---------------------------------------------------------------------------------------------


def test_cache_root_hexray_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "hx"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "hx"


def test_cache_root_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HEXRAY_CACHE", "~/hx-cache")
    assert cache_root() == tmp_path / "hx-cache"


@pytest.mark.parametrize("hexray_cache", [None, ""])
def test_cache_root_xdg(monkeypatch, tmp_path, hexray_cache):
    if hexray_cache is None:
        monkeypatch.delenv("HEXRAY_CACHE", raising=False)
    else:
        monkeypatch.setenv("HEXRAY_CACHE", hexray_cache)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "hexray"


def test_cache_root_default(monkeypatch, tmp_path):
    monkeypatch.delenv("HEXRAY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "hexray"


def test_session_cache_is_isolated(_hexray_cache):
    assert cache_root() == Path(_hexray_cache)


# ---------------------------------------------------------------------------------------------
# loading a folder
# ---------------------------------------------------------------------------------------------


def test_folder_spec(tiny_model_case):
    model, folder = tiny_model_case.model, tiny_model_case.folder
    spec = model.spec
    assert spec.source == "folder"
    assert spec.name == model.name == str(folder)
    assert (spec.n_layers, spec.n_heads, spec.d_model, spec.d_head, spec.n_ctx) == (2, 4, 32, 8, 64)
    assert spec.d_vocab == len(model.tokenizer) == 300
    if tiny_model_case.kind == "gpt2":
        assert spec.architecture == "GPT2LMHeadModel"
        assert (spec.n_kv_heads, spec.d_mlp, spec.norm, spec.gated_mlp) == (4, 128, "layernorm", False)
    else:
        assert spec.architecture == "LlamaForCausalLM"
        assert (spec.n_kv_heads, spec.d_mlp, spec.norm, spec.gated_mlp) == (2, 48, "rmsnorm", True)


def test_reload_folder_reports_progress(tiny_model_folder, tiny_model):
    messages = []
    again = load_model(str(tiny_model_folder), progress=messages.append)
    assert messages and any(str(tiny_model_folder) in m for m in messages)
    assert again.spec == tiny_model.spec
    ids = torch.tensor([tiny_model.encode("Mary and John")])
    with torch.no_grad():
        a = again.bridge.original_model(ids).logits
        b = tiny_model.bridge.original_model(ids).logits
    torch.testing.assert_close(a, b)


def test_weights(tiny_model_case, tiny_hf_model):
    """LoadedModel's weight views equal the plain HF checkpoint's parameters."""
    model, spec = tiny_model_case.model, tiny_model_case.model.spec
    hf = tiny_hf_model
    assert model.W_U.shape == (spec.d_model, spec.d_vocab)
    torch.testing.assert_close(model.W_U, hf.lm_head.weight.detach().T)
    assert model.b_U.shape == (spec.d_vocab,)
    assert hf.lm_head.bias is None and torch.count_nonzero(model.b_U) == 0  # neither model has an unembedding bias
    assert len(model.W_O) == len(model.b_O) == len(model.W_out) == len(model.b_out) == spec.n_layers
    for layer in range(spec.n_layers):
        assert model.W_O[layer].shape == (spec.n_heads, spec.d_head, spec.d_model)
        assert model.b_O[layer].shape == (spec.d_model,)
        assert model.W_out[layer].shape == (spec.d_mlp, spec.d_model)
        assert model.b_out[layer].shape == (spec.d_model,)
    weight, bias = model.final_norm
    if tiny_model_case.kind == "gpt2":
        blocks = hf.transformer.h
        torch.testing.assert_close(weight, hf.transformer.ln_f.weight.detach())
        torch.testing.assert_close(bias, hf.transformer.ln_f.bias.detach())
        for layer in range(spec.n_layers):
            torch.testing.assert_close(model.b_O[layer], blocks[layer].attn.c_proj.bias.detach())
            torch.testing.assert_close(model.b_out[layer], blocks[layer].mlp.c_proj.bias.detach())
            # GPT-2's Conv1D weights are stored [in, out]
            c_proj = blocks[layer].attn.c_proj.weight.detach()  # [n_heads * d_head, d_model]
            torch.testing.assert_close(model.W_O[layer], c_proj.reshape(spec.n_heads, spec.d_head, spec.d_model))
            torch.testing.assert_close(model.W_out[layer], blocks[layer].mlp.c_proj.weight.detach())
    else:
        blocks = hf.model.layers
        torch.testing.assert_close(weight, hf.model.norm.weight.detach())
        assert torch.count_nonzero(bias) == 0
        for layer in range(spec.n_layers):
            torch.testing.assert_close(model.b_O[layer], blocks[layer].self_attn.o_proj.bias.detach())
            torch.testing.assert_close(model.b_out[layer], blocks[layer].mlp.down_proj.bias.detach())
            # W_O per head is o_proj's input columns for that head
            o_proj = blocks[layer].self_attn.o_proj.weight.detach()  # [d_model, n_heads * d_head]
            torch.testing.assert_close(model.W_O[layer], o_proj.T.reshape(spec.n_heads, spec.d_head, spec.d_model))
            torch.testing.assert_close(model.W_out[layer], blocks[layer].mlp.down_proj.weight.detach().T)
