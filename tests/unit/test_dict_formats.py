"""Dictionaries on disk: SAELens 6.x folders written and read back, sparsify folders read, the
registry of names, the atomic write, and one clear error per way a folder can be wrong.

The SAELens and sparsify layouts are spelled out here independently of the writer (from
SAELens 6.49.2's sae_lens/saes/*.py and sparsify's sparse_coder.py), so a writer that drifts from
them fails these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hexray.errors import HexRayError
from hexray.features import formats
from hexray.features.dictionary import Dictionary, DictSite
from hexray.features.formats import list_dictionaries, load_dictionary, resolve_dictionary, save_dictionary
from hexray.models.loading import ModelSpec

D_IN, D_SAE, K = 8, 32, 4

SPEC = ModelSpec(
    name="tiny-model",
    source="folder",
    architecture="LlamaForCausalLM",
    n_layers=4,
    n_heads=2,
    n_kv_heads=2,
    d_model=D_IN,
    d_head=4,
    d_mlp=16,
    d_vocab=50,
    n_ctx=64,
    norm="rmsnorm",
    gated_mlp=True,
)

# -- the SAELens 6.x layout, written out by hand ------------------------------------------------
# cfg.json keys every inference config has (SAEConfig.to_dict + "architecture")
SAELENS_COMMON = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations", "reshape_activations", "metadata", "architecture"}
SAELENS_EXTRA = {  # per architecture (TopKSAEConfig, TranscoderConfig; topk_* are HexRay's)
    "standard": set(),
    "topk": {"k", "rescale_acts_by_decoder_norm"},
    "jumprelu": set(),
    "transcoder": {"d_out"},
    "skip_transcoder": {"d_out"},
    "jumprelu_transcoder": {"d_out"},
    "jumprelu_skip_transcoder": {"d_out"},
    "topk_transcoder": {"d_out", "k", "rescale_acts_by_decoder_norm"},
    "topk_skip_transcoder": {"d_out", "k", "rescale_acts_by_decoder_norm"},
}
BASE_WEIGHTS = {"W_enc", "b_enc", "W_dec", "b_dec"}
SAELENS_WEIGHTS = {
    "standard": BASE_WEIGHTS,
    "topk": BASE_WEIGHTS,
    "jumprelu": BASE_WEIGHTS | {"threshold"},
    "transcoder": BASE_WEIGHTS,
    "skip_transcoder": BASE_WEIGHTS | {"W_skip"},
    "jumprelu_transcoder": BASE_WEIGHTS | {"threshold"},
    "jumprelu_skip_transcoder": BASE_WEIGHTS | {"threshold", "W_skip"},
    "topk_transcoder": BASE_WEIGHTS,
    "topk_skip_transcoder": BASE_WEIGHTS | {"W_skip"},
}
# metadata the SAELens runner records (llm_sae_training_runner._set_sae_metadata + SAEMetadata's versions)
SAELENS_METADATA = {
    "sae_lens_version", "sae_lens_training_version", "model_name", "hook_name", "hook_head_index", "context_size",
    "prepend_bos", "dataset_path", "model_class_name", "model_from_pretrained_kwargs", "seqpos_slice", "exclude_special_tokens",
}
TRANSCODER_METADATA = {"hook_name_out", "hook_head_index_out"}
BATCHTOPK_METADATA = {"training_architecture", "training_architecture_details"}

# (case id, HexRay architecture, site, skip) -> the SAELens architecture and hooks it must be written as
CASES = {
    "relu": ("relu", DictSite("resid", 3), False, "standard", "blocks.3.hook_resid_pre", None),
    "topk": ("topk", DictSite("resid", 3), False, "topk", "blocks.3.hook_resid_pre", None),
    "batchtopk": ("batchtopk", DictSite("mlp_out", 1), False, "jumprelu", "blocks.1.hook_mlp_out", None),
    "jumprelu": ("jumprelu", DictSite("attn_out", 2), False, "jumprelu", "blocks.2.hook_attn_out", None),
    "transcoder": ("relu", DictSite("mlp", 2), False, "transcoder", "blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out"),
    "skip-transcoder": ("relu", DictSite("mlp", 2), True, "skip_transcoder", "blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out"),
    "jumprelu-transcoder": ("jumprelu", DictSite("mlp", 0), False, "jumprelu_transcoder", "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"),
    "jumprelu-skip-transcoder": ("jumprelu", DictSite("mlp", 0), True, "jumprelu_skip_transcoder", "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"),
    "topk-transcoder": ("topk", DictSite("mlp", 1), False, "topk_transcoder", "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"),
    "topk-skip-transcoder": ("topk", DictSite("mlp", 1), True, "topk_skip_transcoder", "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"),
}


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make(arch: str = "topk", site: DictSite = DictSite("resid", 3), *, skip: bool = False, seed: int = 0, **changes) -> Dictionary:
    fields = dict(
        site=site,
        architecture=arch,
        W_enc=rand(D_IN, D_SAE, seed=seed),
        b_enc=rand(D_SAE, seed=seed + 1) * 0.1,
        W_dec=rand(D_SAE, D_IN, seed=seed + 2),
        b_dec=rand(D_IN, seed=seed + 3) * 0.1,
        model_name="tiny-model",
        k=K if arch in ("topk", "batchtopk") else None,
        threshold=rand(D_SAE, seed=seed + 4).abs() * 0.5 if arch in ("jumprelu", "batchtopk") else None,
        W_skip=rand(D_IN, D_IN, seed=seed + 5) * 0.1 if skip else None,
        apply_b_dec_to_input=not site.transcoder,
        name=f"test-{arch}",
        context_size=128,
        prepend_bos=True,
        meta={
            "density": torch.rand(D_SAE, generator=torch.Generator().manual_seed(seed + 6)) * 0.2,
            "training": {"dataset": "tiny-stories", "tokens": 123456, "steps": 10},
            "quality": {"fvu": 0.125, "l0": 3.5, "dead_pct": 6.25, "losses": [1.5, 1.25]},
        },
    )
    fields.update(changes)
    return Dictionary(**fields)


def make_case(case: str) -> Dictionary:
    arch, site, skip, *_ = CASES[case]
    return make(arch, site, skip=skip)


def raises(fn, *fragments: str) -> HexRayError:
    """The HexRayError ``fn`` raises: one line, with a hint, mentioning every fragment."""
    with pytest.raises(HexRayError) as info:
        fn()
    err = info.value
    line = err.one_line()
    assert "\n" not in line, line
    assert err.hint, f"no hint for: {err.message}"
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return err


def saved(tmp_path: Path, d: Dictionary | None = None, name: str = "dict") -> Path:
    return save_dictionary(d or make(), tmp_path / name)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


def rewrite_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        if key.startswith("metadata."):
            cfg["metadata"][key.removeprefix("metadata.")] = value
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))


def rewrite_weights(folder: Path, change) -> None:
    weights = read_weights(folder / "sae_weights.safetensors")
    change(weights)
    save_file(weights, str(folder / "sae_weights.safetensors"))


X = rand(5, D_IN, seed=99)


# ---------------------------------------------------------------------------------------------
# round trips and the SAELens layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_keeps_every_field(tmp_path, case):
    d = make_case(case)
    back = load_dictionary(save_dictionary(d, tmp_path / case))
    for field in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
        ours, theirs = getattr(d, field), getattr(back, field)
        assert (ours is None) == (theirs is None), field
        if ours is not None:
            assert theirs.dtype == torch.float32 and torch.equal(ours, theirs), field
    for field in ("site", "architecture", "k", "apply_b_dec_to_input", "name", "model_name", "context_size", "prepend_bos"):
        assert getattr(back, field) == getattr(d, field), field
    assert {k: v for k, v in back.meta.items() if k != "density"} == {k: v for k, v in d.meta.items() if k != "density"}
    torch.testing.assert_close(back.meta["density"], d.meta["density"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(back.reconstruct(X), d.reconstruct(X), rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_cfg_json_is_the_saelens_layout_field_by_field(tmp_path, case):
    arch, site, skip, saelens_arch, hook_in, hook_out = CASES[case]
    d = make_case(case)
    folder = save_dictionary(d, tmp_path / case)
    cfg = json.loads((folder / "cfg.json").read_text())

    assert set(cfg) == SAELENS_COMMON | SAELENS_EXTRA[saelens_arch]
    assert cfg["architecture"] == saelens_arch
    assert cfg["d_in"] == D_IN and type(cfg["d_in"]) is int
    assert cfg["d_sae"] == D_SAE and type(cfg["d_sae"]) is int
    assert cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["apply_b_dec_to_input"] is (not site.transcoder)  # SAELens transcoders refuse true
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    if "k" in cfg:
        assert cfg["k"] == K and type(cfg["k"]) is int
        assert cfg["rescale_acts_by_decoder_norm"] is False
    if "d_out" in cfg:
        assert cfg["d_out"] == D_IN and type(cfg["d_out"]) is int

    meta = cfg["metadata"]
    expected_meta = SAELENS_METADATA | (TRANSCODER_METADATA if site.transcoder else set()) | (BATCHTOPK_METADATA if arch == "batchtopk" else set())
    assert set(meta) == expected_meta
    major = int(meta["sae_lens_version"].split(".")[0])
    assert major >= 6  # SAELens converts anything older as a pre-6.0 config
    assert meta["sae_lens_training_version"] is None
    assert meta["model_name"] == "tiny-model"
    assert meta["hook_name"] == hook_in
    assert meta["hook_head_index"] is None
    assert meta["context_size"] == 128 and meta["prepend_bos"] is True
    assert meta["dataset_path"] == "tiny-stories"
    assert meta["model_class_name"] == "HookedTransformer"
    assert meta["model_from_pretrained_kwargs"] == {}
    assert meta["seqpos_slice"] == [None] and meta["exclude_special_tokens"] is False
    if site.transcoder:
        assert meta["hook_name_out"] == hook_out and meta["hook_head_index_out"] is None
    if arch == "batchtopk":
        assert meta["training_architecture"] == "batchtopk"
        assert meta["training_architecture_details"] == {"k": K}

    weights = read_weights(folder / "sae_weights.safetensors")
    assert set(weights) == SAELENS_WEIGHTS[saelens_arch]
    shapes = {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,), "threshold": (D_SAE,), "W_skip": (D_IN, D_IN)}
    for key, tensor in weights.items():
        assert tuple(tensor.shape) == shapes[key], key
        assert tensor.dtype == torch.float32, key

    sparsity = read_weights(folder / "sparsity.safetensors")
    assert set(sparsity) == {"sparsity"}
    torch.testing.assert_close(sparsity["sparsity"], torch.log10(d.meta["density"] + 1e-10))

    extras = json.loads((folder / "hexray.json").read_text())
    assert extras["site"] == site.label and extras["architecture"] == arch and extras["hexray_version"]
    assert "density" not in extras["meta"]


def test_the_last_residual_stream_is_named_after_the_last_block(tmp_path):
    d = make("topk", DictSite("resid", SPEC.n_layers))
    folder = save_dictionary(d, tmp_path / "final", spec=SPEC)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == f"blocks.{SPEC.n_layers - 1}.hook_resid_post"
    assert load_dictionary(folder).site == DictSite("resid", SPEC.n_layers)


def test_a_transcoder_subtracting_b_dec_is_folded_into_b_enc(tmp_path):
    d = make("relu", DictSite("mlp", 2), apply_b_dec_to_input=True)
    folder = save_dictionary(d, tmp_path / "t")
    assert json.loads((folder / "cfg.json").read_text())["apply_b_dec_to_input"] is False
    back = load_dictionary(folder)
    assert back.apply_b_dec_to_input is False
    torch.testing.assert_close(back.encode(X), d.encode(X))
    torch.testing.assert_close(back.reconstruct(X), d.reconstruct(X))


def test_save_checks_the_model_when_given_one(tmp_path):
    raises(lambda: save_dictionary(make(model_name="other-model"), tmp_path / "x", spec=SPEC), "other-model", "tiny-model")
    assert not (tmp_path / "x").exists()


def test_an_sae_with_a_skip_connection_has_no_saelens_layout(tmp_path):
    d = make("topk", DictSite("resid", 3), W_skip=rand(D_IN, D_IN, seed=7))
    raises(lambda: save_dictionary(d, tmp_path / "x"), "skip connection")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# folders SAELens wrote (by hand, as SAELens writes them) load with SAELens' maths
# ---------------------------------------------------------------------------------------------


def write_saelens(folder: Path, cfg: dict, weights: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def saelens_cfg(architecture: str, hook_name: str, **extra) -> dict:
    metadata = {"sae_lens_version": "6.12.0", "sae_lens_training_version": "6.12.0", "model_name": "gemma-3-1b", "hook_name": hook_name,
                "hook_head_index": None, "context_size": 1024, "prepend_bos": True, "dataset_path": "monology/pile-uncopyrighted"}
    metadata.update(extra.pop("metadata", {}))
    return {"d_in": D_IN, "d_sae": D_SAE, "dtype": "bfloat16", "device": "cuda", "apply_b_dec_to_input": False,
            "normalize_activations": "none", "reshape_activations": "none", "metadata": metadata, "architecture": architecture, **extra}


def test_a_saelens_jumprelu_skip_transcoder_in_bfloat16_loads_as_float32_with_its_maths(tmp_path):
    W_enc, b_enc, W_dec, b_dec = rand(D_IN, D_SAE, seed=1), rand(D_SAE, seed=2), rand(D_SAE, D_IN, seed=3), rand(D_IN, seed=4)
    threshold = rand(D_SAE, seed=5) * 0.5  # some negative: SAELens gates by pre > relu(threshold)... and relu(pre)
    W_skip = rand(D_IN, D_IN, seed=6)
    stored = {k: v.to(torch.bfloat16) for k, v in dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold, W_skip=W_skip).items()}
    cfg = saelens_cfg("jumprelu_skip_transcoder", "blocks.5.ln2.hook_normalized", d_out=D_IN, metadata={"hook_name_out": "blocks.5.hook_mlp_out"})
    d = load_dictionary(write_saelens(tmp_path / "gemmascope", cfg, stored))

    assert d.site == DictSite("mlp", 5) and d.architecture == "jumprelu" and d.W_skip is not None
    assert d.model_name == "gemma-3-1b" and d.context_size == 1024 and d.prepend_bos is True and d.name == "gemmascope"
    assert all(t.dtype == torch.float32 for t in (d.W_enc, d.b_enc, d.W_dec, d.b_dec, d.threshold, d.W_skip))
    assert d.meta["source"]["format"] == "saelens"
    w = {k: v.float() for k, v in stored.items()}
    pre = X @ w["W_enc"] + w["b_enc"]
    acts = pre.relu() * (pre > w["threshold"]).float()  # JumpReLUTranscoder.encode
    out = acts @ w["W_dec"] + w["b_dec"] + X @ w["W_skip"].T  # SkipTranscoder.forward
    torch.testing.assert_close(d.encode(X), acts)
    torch.testing.assert_close(d.reconstruct(X), out)


def test_a_saelens_rescaled_topk_sae_is_folded_exactly(tmp_path):
    W_enc, b_enc, W_dec, b_dec = rand(D_IN, D_SAE, seed=11), rand(D_SAE, seed=12), rand(D_SAE, D_IN, seed=13) * 3, rand(D_IN, seed=14)
    cfg = saelens_cfg("topk", "blocks.2.hook_resid_post", k=K, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=True)
    d = load_dictionary(write_saelens(tmp_path / "topk", cfg, dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)))
    assert d.site == DictSite("resid", 3) and d.k == K and d.apply_b_dec_to_input
    norm = W_dec.norm(dim=-1)
    hidden = ((X - b_dec) @ W_enc + b_enc) * norm  # TopKSAE.encode with rescale_acts_by_decoder_norm
    values, index = hidden.topk(K, dim=-1)
    acts = torch.zeros_like(hidden).scatter(-1, index, values.relu())
    out = (acts / norm) @ W_dec + b_dec  # TopKSAE.decode
    torch.testing.assert_close(d.reconstruct(X), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.encode(X) / norm, acts / norm, rtol=1e-5, atol=1e-5)


def test_a_saelens_batchtopk_saved_as_jumprelu_loads_as_batchtopk(tmp_path):
    weights = dict(W_enc=rand(D_IN, D_SAE, seed=21), b_enc=rand(D_SAE, seed=22), W_dec=rand(D_SAE, D_IN, seed=23), b_dec=rand(D_IN, seed=24),
                   threshold=torch.full((D_SAE,), 0.7))
    cfg = saelens_cfg("jumprelu", "blocks.1.hook_resid_pre", apply_b_dec_to_input=True,
                      metadata={"training_architecture": "batchtopk", "training_architecture_details": {"k": 16.0, "topk_threshold_lr": 0.01}})
    d = load_dictionary(write_saelens(tmp_path / "btk", cfg, weights))
    assert d.architecture == "batchtopk" and d.k == 16 and d.site == DictSite("resid", 1)
    pre = (X - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    torch.testing.assert_close(d.encode(X), pre.relu() * (pre > 0.7).float())


def test_a_pre_6_saelens_config_loads(tmp_path):
    weights = dict(W_enc=rand(D_IN, D_SAE, seed=31), b_enc=rand(D_SAE, seed=32), W_dec=rand(D_SAE, D_IN, seed=33), b_dec=rand(D_IN, seed=34))
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "normalize_activations": False, "sae_lens_version": "3.5.0"}
    d = load_dictionary(write_saelens(tmp_path / "old", cfg, weights))
    assert d.site == DictSite("resid", 8) and d.architecture == "topk" and d.k == K and d.apply_b_dec_to_input is True
    assert d.model_name == "gpt2-small"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load_as_float32(tmp_path, dtype):
    folder = saved(tmp_path, make("jumprelu", DictSite("mlp_out", 1)))
    rewrite_weights(folder, lambda w: w.update({k: v.to(dtype) for k, v in w.items()}))
    d = load_dictionary(folder)
    for t in (d.W_enc, d.b_enc, d.W_dec, d.b_dec, d.threshold):
        assert t.dtype == torch.float32
    torch.testing.assert_close(d.W_enc, make().W_enc.to(dtype).float())


# ---------------------------------------------------------------------------------------------
# sparsify
# ---------------------------------------------------------------------------------------------


def write_sparsify(folder: Path, *, transcode: bool = False, skip: bool = False, dtype=torch.float32, **cfg_changes) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    cfg = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": D_SAE, "k": K,
           "multi_topk": False, "skip_connection": skip, "transcode": transcode, "d_in": D_IN, **cfg_changes}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    weights = {"encoder.weight": rand(D_SAE, D_IN, seed=41), "encoder.bias": rand(D_SAE, seed=42) * 0.1,
               "W_dec": rand(D_SAE, D_IN, seed=43), "b_dec": rand(D_IN, seed=44) * 0.1}
    if skip:
        weights["W_skip"] = rand(D_IN, D_IN, seed=45) * 0.1
    weights = {k: v.to(dtype) for k, v in weights.items()}
    save_file(weights, str(folder / "sae.safetensors"))
    return {k: v.float() for k, v in weights.items()}


def sparsify_by_hand(w: dict[str, torch.Tensor], x: torch.Tensor, *, transcode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseCoder.encode / decode / forward, written out."""
    inp = x if transcode else x - w["b_dec"]
    pre = torch.relu(inp @ w["encoder.weight"].T + w["encoder.bias"])
    values, index = pre.topk(K, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, index, values)
    out = acts @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        out = out + x @ w["W_skip"].mT
    return acts, out


def test_a_sparsify_sae_loads_and_encodes_like_sparsify(tmp_path):
    run = tmp_path / "run"
    w = write_sparsify(run / "layers.3", dtype=torch.bfloat16)
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "ctx_len": 2048}))
    d = load_dictionary(run / "layers.3")
    assert d.site == DictSite("resid", 4)  # layers.3's output is the stream entering block 4
    assert d.architecture == "topk" and d.k == K and d.apply_b_dec_to_input and d.W_skip is None
    assert d.model_name == "EleutherAI/pythia-70m" and d.context_size == 2048 and d.name == "layers.3"
    assert d.W_enc.dtype == torch.float32 and d.W_enc.shape == (D_IN, D_SAE)
    acts, out = sparsify_by_hand(w, X, transcode=False)
    torch.testing.assert_close(d.encode(X), acts)
    torch.testing.assert_close(d.reconstruct(X), out)


def test_a_sparsify_skip_transcoder_picked_from_its_run_by_hookpoint(tmp_path):
    run = tmp_path / "run"
    write_sparsify(run / "layers.0")
    w = write_sparsify(run / "layers.2.mlp", transcode=True, skip=True)
    raises(lambda: load_dictionary(run), "sparsify run", "layers.0", "layers.2.mlp")
    d = load_dictionary(run, hookpoint="layers.2.mlp", model_name="my-model")
    assert d.site == DictSite("mlp", 2) and d.kind == "skip-transcoder" and not d.apply_b_dec_to_input
    assert d.model_name == "my-model"  # given: the run names no model
    acts, out = sparsify_by_hand(w, X, transcode=True)
    torch.testing.assert_close(d.encode(X), acts)
    torch.testing.assert_close(d.reconstruct(X), out)
    raises(lambda: load_dictionary(run, hookpoint="layers.9"), "layers.9", "layers.0")


@pytest.mark.parametrize(
    ("hookpoint", "transcode", "site"),
    [("layers.5", False, DictSite("resid", 6)), ("h.5", False, DictSite("resid", 6)), ("layers.5.mlp", False, DictSite("mlp_out", 5)),
     ("layers.5.self_attn", False, DictSite("attn_out", 5)), ("h.5.attn", False, DictSite("attn_out", 5)), ("h.5.mlp", True, DictSite("mlp", 5))],
)
def test_sparsify_hookpoints_name_sites(tmp_path, hookpoint, transcode, site):
    write_sparsify(tmp_path / hookpoint, transcode=transcode)
    assert load_dictionary(tmp_path / hookpoint).site == site


def test_sparsify_seed_folders(tmp_path):
    write_sparsify(tmp_path / "run" / "layers.1" / "seed0")
    assert formats._sparsify_hookpoints(tmp_path / "run") == ["layers.1/seed0"]
    d = load_dictionary(tmp_path / "run", hookpoint="layers.1/seed0")
    assert d.site == DictSite("resid", 2) and d.name == "layers.1/seed0"


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [({"signed": True}, "signed"), ({"activation": "groupmax"}, "groupmax"), ({"d_in": 0}, "d_in"), ({"k": 64}, "k 64")],
)
def test_unsupported_sparsify_configs(tmp_path, changes, fragment):
    write_sparsify(tmp_path / "layers.1", **changes)
    raises(lambda: load_dictionary(tmp_path / "layers.1"), fragment)


def test_sparsify_unknown_hookpoint_and_block_transcoder(tmp_path):
    write_sparsify(tmp_path / "embed_tokens")
    raises(lambda: load_dictionary(tmp_path / "embed_tokens"), "embed_tokens")
    write_sparsify(tmp_path / "layers.2", transcode=True)
    raises(lambda: load_dictionary(tmp_path / "layers.2"), "transcoder over layers.2")


def test_sparsify_missing_and_misshapen_tensors(tmp_path):
    write_sparsify(tmp_path / "layers.1")
    path = tmp_path / "layers.1" / "sae.safetensors"
    weights = read_weights(path)
    save_file({k: v for k, v in weights.items() if k != "W_dec"}, str(path))
    raises(lambda: load_dictionary(tmp_path / "layers.1"), "lacks W_dec")
    save_file({**weights, "encoder.weight": torch.zeros(D_SAE, D_IN + 1)}, str(path))
    raises(lambda: load_dictionary(tmp_path / "layers.1"), "encoder.weight is (32, 9), expected (32, 8)")


# ---------------------------------------------------------------------------------------------
# the atomic write
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_on_call", [1, 2])  # the weights, then the sparsity file
def test_a_failed_save_leaves_no_folder(tmp_path, monkeypatch, fail_on_call):
    real, calls = formats.save_file, []

    def flaky(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == fail_on_call:
            raise RuntimeError("disk fell off")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(formats, "save_file", flaky)
    parent = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk fell off"):
        save_dictionary(make(), parent / "dict")
    assert len(calls) == fail_on_call
    assert not (parent / "dict").exists()
    assert list(parent.iterdir()) == []  # no temp folder left behind either


def test_an_os_error_mid_save_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(formats, "save_file", full)
    raises(lambda: save_dictionary(make(), tmp_path / "dict"), "No space left")
    assert list(tmp_path.iterdir()) == []


def test_existing_folders_are_kept_unless_overwrite(tmp_path, monkeypatch):
    folder = saved(tmp_path, make(seed=0))
    raises(lambda: save_dictionary(make(seed=10), folder), "not empty")
    assert torch.equal(load_dictionary(folder).W_enc, make(seed=0).W_enc)

    monkeypatch.setattr(formats, "save_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        save_dictionary(make(seed=10), folder, overwrite=True)
    assert torch.equal(load_dictionary(folder).W_enc, make(seed=0).W_enc)  # a failed overwrite keeps the old one
    monkeypatch.undo()

    save_dictionary(make(seed=10), folder, overwrite=True)
    assert torch.equal(load_dictionary(folder).W_enc, make(seed=10).W_enc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dict"]

    empty = tmp_path / "empty"
    empty.mkdir()
    save_dictionary(make(), empty)  # an empty folder is filled without overwrite
    assert (empty / "cfg.json").is_file()
    (tmp_path / "file").write_text("x")
    raises(lambda: save_dictionary(make(), tmp_path / "file"), "is a file")


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------


def test_names_under_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "cache"))
    root = formats.dictionaries_root()
    assert root == tmp_path / "cache" / "dictionaries"
    assert list_dictionaries() == []
    raises(lambda: resolve_dictionary("nope"), "no dictionary 'nope'", "no dictionaries are saved")

    save_dictionary(make("topk"), root / "b-topk")
    save_dictionary(make("jumprelu"), root / "a-jump")
    write_sparsify(root / "c-run" / "layers.1")
    (root / ".half-written.tmp-x").mkdir()
    (root / "junk").mkdir()
    assert list_dictionaries() == [("a-jump", root / "a-jump"), ("b-topk", root / "b-topk"), ("c-run", root / "c-run")]
    assert resolve_dictionary("b-topk") == root / "b-topk"
    assert load_dictionary("a-jump").architecture == "jumprelu"
    assert load_dictionary("c-run", hookpoint="layers.1").site == DictSite("resid", 2)
    assert load_dictionary("b-topk", name="renamed").name == "renamed"
    raises(lambda: resolve_dictionary("missing"), "no dictionary 'missing'", "a-jump, b-topk, c-run")
    assert resolve_dictionary(tmp_path) == tmp_path  # a folder is itself


# ---------------------------------------------------------------------------------------------
# errors, one line each
# ---------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "cache"))
    raises(lambda: load_dictionary(tmp_path / "nowhere"), "no dictionary", "nowhere")
    (tmp_path / "a-file").write_text("x")
    raises(lambda: load_dictionary(tmp_path / "a-file"), "is a file")


def test_a_folder_with_neither_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    raises(lambda: load_dictionary(tmp_path), "holds no dictionary")
    (tmp_path / "cfg.json").write_text("{}")
    raises(lambda: load_dictionary(tmp_path), "no weights")


def test_a_truncated_safetensors_file(tmp_path):
    folder = saved(tmp_path)
    path = folder / "sae_weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    raises(lambda: load_dictionary(folder), "corrupt or truncated", "sae_weights.safetensors")
    path.write_bytes(data[:4])
    raises(lambda: load_dictionary(folder), "corrupt or truncated")


def test_a_corrupt_sparsity_file(tmp_path):
    folder = saved(tmp_path)
    (folder / "sparsity.safetensors").write_bytes(b"\x00" * 3)
    raises(lambda: load_dictionary(folder), "sparsity.safetensors", "corrupt")
    save_file({"sparsity": torch.zeros(3)}, str(folder / "sparsity.safetensors"))
    raises(lambda: load_dictionary(folder), "shape (32,)")


def test_a_corrupt_cfg_json(tmp_path):
    folder = saved(tmp_path)
    (folder / "cfg.json").write_text('{"d_in": 8, ')
    raises(lambda: load_dictionary(folder), "not valid JSON")
    (folder / "cfg.json").write_text("[1, 2]")
    raises(lambda: load_dictionary(folder), "not a JSON object")


@pytest.mark.parametrize("key", ["W_enc", "b_enc", "W_dec", "b_dec"])
def test_missing_weights(tmp_path, key):
    folder = saved(tmp_path)
    rewrite_weights(folder, lambda w: w.pop(key))
    raises(lambda: load_dictionary(folder), f"lacks {key}")


def test_a_jumprelu_without_its_threshold(tmp_path):
    folder = saved(tmp_path, make("jumprelu"))
    rewrite_weights(folder, lambda w: w.pop("threshold"))
    raises(lambda: load_dictionary(folder), "lacks threshold")


def test_unexpected_tensors(tmp_path):
    folder = saved(tmp_path)
    rewrite_weights(folder, lambda w: w.update(b_gate=torch.zeros(D_SAE)))
    raises(lambda: load_dictionary(folder), "unexpected tensors b_gate")


@pytest.mark.parametrize(
    ("key", "tensor", "message"),
    [("W_enc", torch.zeros(D_SAE, D_IN), "W_enc is (32, 8), expected (8, 32)"),
     ("W_dec", torch.zeros(D_SAE, D_IN + 2), "W_dec is (32, 10), expected (32, 8)"),
     ("b_enc", torch.zeros(D_SAE + 1), "b_enc is (33,), expected (32,)"),
     ("b_dec", torch.zeros(1, D_IN), "b_dec is (1, 8), expected (8,)"),
     ("W_enc", torch.zeros(D_IN, D_SAE, dtype=torch.int32), "W_enc holds int32")],
)
def test_wrong_shapes_say_which(tmp_path, key, tensor, message):
    folder = saved(tmp_path)
    rewrite_weights(folder, lambda w: w.update({key: tensor}))
    raises(lambda: load_dictionary(folder), message)


def test_missing_or_bad_config_fields(tmp_path):
    folder = saved(tmp_path)
    for changes, message in [
        ({"d_sae": 0}, "d_sae is 0"),
        ({"d_in": "eight"}, "d_in is 'eight'"),
        ({"k": None}, "k is None"),
        ({"apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input"),
        ({"metadata.hook_name": None}, "missing metadata.hook_name"),
        ({"metadata": "nope"}, "metadata is not a JSON object"),
    ]:
        saved_cfg = (folder / "cfg.json").read_text()
        rewrite_cfg(folder, **changes)
        raises(lambda: load_dictionary(folder), message)
        (folder / "cfg.json").write_text(saved_cfg)
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["architecture"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    raises(lambda: load_dictionary(folder), "missing architecture")


@pytest.mark.parametrize("mode", ["expected_average_only_in", "layer_norm", "constant_norm_rescale"])
def test_unsupported_normalisation(tmp_path, mode):
    folder = saved(tmp_path)
    rewrite_cfg(folder, normalize_activations=mode)
    raises(lambda: load_dictionary(folder), f"normalize_activations {mode!r}", )


def test_hook_z_dictionaries_are_refused(tmp_path):
    folder = saved(tmp_path)
    rewrite_cfg(folder, reshape_activations="hook_z")
    raises(lambda: load_dictionary(folder), "hook_z")


def test_unknown_architecture(tmp_path):
    folder = saved(tmp_path)
    rewrite_cfg(folder, architecture="wavelet")
    raises(lambda: load_dictionary(folder), "unknown architecture 'wavelet'", )


@pytest.mark.parametrize(("architecture", "fragment"), [("gated", "gated SAE"), ("temporal", "temporal SAE"), ("matching_pursuit", "matching-pursuit"), ("batchtopk", "training checkpoint")])
def test_unsupported_architectures(tmp_path, architecture, fragment):
    folder = saved(tmp_path)
    rewrite_cfg(folder, architecture=architecture)
    raises(lambda: load_dictionary(folder), fragment, "not supported")


@pytest.mark.parametrize(
    ("case", "hook", "fragment"),
    [("relu", "hook_embed", "not inside a block"), ("relu", "blocks.2.attn.hook_z", "SAE on hook blocks.2.attn.hook_z"),
     ("transcoder", "blocks.2.hook_mlp_in", "before the MLP's norm"), ("transcoder", "blocks.2.hook_resid_pre", "transcoder reading"),
     ("relu", "blocks.2.mlp.hook_in", "SAE on hook")],
)
def test_unsupported_hooks(tmp_path, case, hook, fragment):
    folder = saved(tmp_path, make_case(case))
    rewrite_cfg(folder, **{"metadata.hook_name": hook})
    raises(lambda: load_dictionary(folder), fragment)


def test_saelens_hook_variants(tmp_path):
    folder = saved(tmp_path, make_case("transcoder"))
    rewrite_cfg(folder, **{"metadata.hook_name": "blocks.2.ln2.hook_normalized"})
    assert load_dictionary(folder).site == DictSite("mlp", 2)
    rewrite_cfg(folder, **{"metadata.hook_name_out": "blocks.3.hook_mlp_out"})
    raises(lambda: load_dictionary(folder), "blocks.3.hook_mlp_out")
    sae = saved(tmp_path, make("relu", DictSite("mlp_out", 1)), name="sae")
    for hook, site in [("blocks.1.mlp.hook_out", DictSite("mlp_out", 1)), ("blocks.1.attn.hook_out", DictSite("attn_out", 1)), ("blocks.6.hook_resid_post", DictSite("resid", 7))]:
        rewrite_cfg(sae, **{"metadata.hook_name": hook})
        assert load_dictionary(sae).site == site


def test_a_transcoder_config_subtracting_b_dec_is_refused(tmp_path):
    folder = saved(tmp_path, make_case("transcoder"))
    rewrite_cfg(folder, apply_b_dec_to_input=True)
    raises(lambda: load_dictionary(folder), "apply_b_dec_to_input")


def test_a_finetuning_scale_other_than_one_is_refused(tmp_path):
    folder = saved(tmp_path)
    rewrite_weights(folder, lambda w: w.update(scaling_factor=torch.ones(D_SAE)))
    assert load_dictionary(folder).d_sae == D_SAE  # all ones: harmless, dropped
    rewrite_weights(folder, lambda w: w.update(scaling_factor=torch.full((D_SAE,), 2.0)))
    raises(lambda: load_dictionary(folder), "scaling_factor")


def test_a_corrupt_hexray_json(tmp_path):
    folder = saved(tmp_path)
    (folder / "hexray.json").write_text("{oops")
    raises(lambda: load_dictionary(folder), "hexray.json", "not valid JSON")
    (folder / "hexray.json").unlink()
    d = load_dictionary(folder)  # without it the folder is a plain SAELens dictionary
    assert d.architecture == "topk" and d.meta["source"]["format"] == "saelens" and "density" in d.meta


def test_unsaveable_meta(tmp_path):
    raises(lambda: save_dictionary(make(meta={"model": object()}), tmp_path / "x"), "object")
    raises(lambda: save_dictionary(make(meta={"density": torch.zeros(3)}), tmp_path / "x"), "density has shape (3,)")
    assert not (tmp_path / "x").exists()
