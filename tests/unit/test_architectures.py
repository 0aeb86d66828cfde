"""The load-time self-check over a table of architectures, each a tiny random model built from its HF config.

Every architecture either loads (and then conserves attribution, patches exactly and generates
what an untouched copy of the model generates) or is refused with one clear error. References
are independent of HexRay: a copy of the model loaded by plain transformers (never wrapped by
the bridge), and plain ``run_with_hooks`` loops written out here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution
from hexray.errors import HexRayError
from hexray.intervene.patching import activation_patching
from hexray.models.loading import load_model
from hexray.models.selfcheck import check_architecture
from hexray.tracing.engine import run_trace
from hexray.generation.tracer import GenerationOptions, TracedGeneration, plain_greedy

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

# model_type -> (config keyword arguments, expected outcome: "verified" or a phrase of the refusal)
ARCHITECTURES = {
    "gpt2": (dict(n_embd=32, n_layer=2, n_head=4, n_positions=64), "verified"),
    "llama": (dict(SMALL, attention_bias=True, mlp_bias=True), "verified"),
    "mistral": (dict(SMALL, sliding_window=4), "verified"),
    "qwen2": (dict(SMALL), "verified"),
    "qwen3": (dict(SMALL, head_dim=8), "verified"),
    "gemma3_text": (dict(SMALL, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8), "verified"),
    "gemma2": (dict(SMALL, head_dim=8, sliding_window=4, query_pre_attn_scalar=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0), "verified"),
    "gpt_neox": (dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5), "verified"),
    "phi": (dict(SMALL, partial_rotary_factor=0.5), "verified"),
    "falcon": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4), "verified"),
    "olmo2": (dict(SMALL), "verified"),
    "granite": (dict(SMALL, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0), "do not add up"),  # its multipliers
    "bloom": (dict(hidden_size=32, n_layer=2, n_head=4), "a batched forward pass failed"),  # ALiBi sized to the batch at entry
    # refused, each for the reason the probe found:
    "cohere": (dict(SMALL), "the final norm and unembedding do not reproduce the logits"),  # its logit_scale
    "opt": (dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32), "has shape"),
    "mamba": (dict(hidden_size=32, num_hidden_layers=2, state_size=4), "it has no hook"),
}

PROMPT = "John said that Mary"
CORRUPT = "Mary said that John"


def _build(model_type: str, tokenizer, folder):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs, _ = ARCHITECTURES[model_type]
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, **kwargs
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norm weights and biases everywhere
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


VERIFIED = sorted(t for t, (_, outcome) in ARCHITECTURES.items() if outcome == "verified")


@pytest.fixture(scope="module")
def built(tiny_tokenizer, tmp_path_factory):
    """model_type -> (folder, LoadedModel or the HexRayError that refused it), each built once."""
    cache: dict = {}

    def get(model_type: str):
        if model_type not in cache:
            folder = tmp_path_factory.mktemp(model_type)
            _build(model_type, tiny_tokenizer, folder)
            try:
                cache[model_type] = folder, load_model(str(folder))
            except HexRayError as exc:
                cache[model_type] = folder, exc
        return cache[model_type]

    return get


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request, built):
    return request.param, *built(request.param)


@pytest.fixture(scope="module", params=VERIFIED)
def verified(request, built):
    """(LoadedModel, the same weights loaded by plain transformers, never bridged)."""
    from transformers import AutoModelForCausalLM

    folder, loaded = built(request.param)
    assert not isinstance(loaded, HexRayError), loaded.one_line()
    untouched = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()
    return loaded, untouched


def test_each_architecture_is_verified_or_refused_clearly(arch):
    model_type, _, loaded = arch
    expected = ARCHITECTURES[model_type][1]
    if expected == "verified":
        assert not isinstance(loaded, HexRayError), f"{model_type} was refused: {getattr(loaded, 'message', '')}"
    else:
        assert isinstance(loaded, HexRayError)
        assert "does not support" in loaded.message and expected in loaded.message
        assert "\n" not in loaded.one_line()


def test_logits_equal_an_untouched_copy(verified):
    loaded, untouched = verified
    ids = loaded.encode(PROMPT)
    trace = run_trace(loaded, PROMPT, ())
    with torch.no_grad():
        reference = untouched(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(trace.logits, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("granularity", ["layer", "head", "neuron"])
def test_attribution_conserves_the_logit(verified, granularity):
    loaded, untouched = verified
    trace = run_trace(loaded, PROMPT, attribution_hooks(loaded.spec, granularity))
    target, contrast = loaded.encode(" Mary", prepend_bos=False)[0], loaded.encode(" John", prepend_bos=False)[0]
    a = direct_logit_attribution(loaded, trace, target=target, contrast=contrast, granularity=granularity)
    with torch.no_grad():
        logits = untouched(torch.tensor([loaded.encode(PROMPT)])).logits[0, -1].double()
    cap = loaded.spec.logit_softcap
    if cap:  # the explained value is the pre-cap logit difference
        logits = cap * torch.atanh(logits / cap)
    assert a.value == pytest.approx(float(logits[target] - logits[contrast]), abs=1e-4)
    assert sum(c.score for c in a.components) == pytest.approx(a.value, abs=1e-4)
    assert a.reconstruction_error < 1e-4


def test_exact_head_patching_equals_a_one_at_a_time_loop(verified):
    loaded, _ = verified
    spec = loaded.spec
    clean, corrupt = loaded.encode(PROMPT), loaded.encode(CORRUPT)
    t, c = loaded.encode(" Mary", prepend_bos=False)[0], loaded.encode(" John", prepend_bos=False)[0]
    result = activation_patching(loaded, PROMPT, CORRUPT, target=" Mary", contrast=" John", sweeps="heads")
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(spec.n_layers)]
    with torch.no_grad():
        _, clean_cache = loaded.bridge.run_with_cache(torch.tensor([clean]), names_filter=lambda n: n in z_names)

    def metric(hooks):
        with torch.no_grad():
            logits = loaded.bridge.run_with_hooks(torch.tensor([corrupt]), fwd_hooks=hooks)[0, -1]
        return float(logits[t] - logits[c])

    base, span = metric([]), result.clean_value - result.corrupt_value
    assert base == pytest.approx(result.corrupt_value, abs=1e-5)
    for row in result.results:
        layer, head = row.site.component.layer, row.site.component.head

        def copy(x, hook=None, layer=layer, head=head):
            x = x.clone()
            x[0, :, head] = clean_cache[z_names[layer]][0, :, head]
            return x

        assert row.score == pytest.approx((metric([(z_names[layer], copy)]) - base) / span, abs=1e-4)


def test_traced_generation_equals_untouched_greedy(verified):
    loaded, untouched = verified
    run = TracedGeneration(loaded, PROMPT, GenerationOptions(max_new_tokens=8, stop_at_eos=False))
    ids = [r.id for r in run]
    untouched.generation_config.eos_token_id = None  # all 8 tokens, like the traced run
    assert ids == plain_greedy(untouched, run.prompt_ids, 8)


def test_the_self_check_refuses_a_model_whose_maths_does_not_add_up(tiny_llama, monkeypatch):
    """Break one assumption (what the heads write) and the probe must name it."""
    broken = [w * 1.5 for w in tiny_llama.W_O]
    monkeypatch.setitem(tiny_llama.__dict__, "W_O", tuple(broken))
    with pytest.raises(HexRayError, match="heads' outputs"):
        check_architecture(tiny_llama)


def test_the_self_check_refuses_a_model_without_a_hook(tiny_gpt2, monkeypatch):
    hooks = dict(tiny_gpt2.bridge.hook_dict)
    hooks.pop("blocks.1.attn.hook_z")
    monkeypatch.setattr(type(tiny_gpt2.bridge), "hook_dict", property(lambda self: hooks), raising=True)
    with pytest.raises(HexRayError, match="no hook blocks.1.attn.hook_z"):
        check_architecture(tiny_gpt2)


def test_the_self_check_passes_the_tiny_models(tiny_model):
    check_architecture(tiny_model)
    assert dataclasses.is_dataclass(tiny_model.spec)
