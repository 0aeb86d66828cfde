"""Sparse dictionaries on the tiny models: exact feature attribution, features per token, training,
measuring, whole runs (atomic folder, checkpoint, resume) and feature ablation.

Every reference value here comes from a plain transformers forward pass of the untouched model
(``tiny_hf_model``) with raw torch hooks, and from the dictionary maths written out by hand
(``pre = (x - b_dec) @ W_enc + b_enc``, then TopK / JumpReLU / ReLU, ``out = a @ W_dec + b_dec
(+ x @ W_skip.T)``), never from ``hexray.features`` or ``hexray.analysis.features`` themselves.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution
from hexray.analysis.features import dictionary_hooks, feature_attribution, token_features
from hexray.errors import HexRayError
from hexray.features.build import Interrupted, checkpoint_path, train_dictionaries
from hexray.features.dictionary import Dictionary, DictSite, parse_site
from hexray.features.formats import load_dictionary, save_dictionary
from hexray.features.store import load_named, saved_dictionaries
from hexray.features.train import TrainOptions, evaluate, harvest, train_dictionary
from hexray.intervene.ablation import ablate
from hexray.tracing.engine import run_trace
from hexray.tracing.sites import Component
from tests.conftest import CORPUS

PROMPT = "When Mary and John went to the store, John gave a drink to"
REFERENCE = ["The cat sat on the mat.", "Paris is the capital of France."]
CTX = 16  # tokens per training context


# ---------------------------------------------------------------------------------------------
# the independent reference: a plain transformers forward with raw torch hooks
# ---------------------------------------------------------------------------------------------


class PlainModel:
    """The untouched HF model with raw hooks: what each site holds, and edits at the sites.

    Sites are named as dictionaries name them: ``resid.L`` (the stream entering block L; L =
    n_layers is the final norm's input), ``mlp_in.L`` (what the MLP reads, after its norm),
    ``mlp_out.L`` and ``attn_out.L`` (what they add to the stream).
    """

    def __init__(self, hf):
        self.hf = hf
        if hasattr(hf, "transformer"):  # GPT-2
            self.blocks, self.final = hf.transformer.h, hf.transformer.ln_f
            self.attn = [b.attn for b in self.blocks]
            self.attn_bias = [b.attn.c_proj.bias for b in self.blocks]
            self.mlp_bias = [b.mlp.c_proj.bias for b in self.blocks]
        else:  # Llama
            self.blocks, self.final = hf.model.layers, hf.model.norm
            self.attn = [b.self_attn for b in self.blocks]
            self.attn_bias = [b.self_attn.o_proj.bias for b in self.blocks]
            self.mlp_bias = [b.mlp.down_proj.bias for b in self.blocks]
        self.mlps = [b.mlp for b in self.blocks]
        self.n = len(self.blocks)

    def run(self, ids, *, resid_edits=None, mlp_edits=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ids [B, pos] (or one list) -> (logits [B, pos, vocab], site -> activation [B, pos, d]).

        ``resid_edits[L](x) -> x'`` replaces the stream entering block L (L = n: the final norm's
        input); ``mlp_edits[L](mlp_input, mlp_output) -> output'`` replaces MLP L's output. The
        activations recorded are what each site held before its own edit.
        """
        ids = torch.tensor([list(ids)]) if isinstance(ids, (list, tuple)) else ids
        resid_edits, mlp_edits = resid_edits or {}, mlp_edits or {}
        acts: dict[str, torch.Tensor] = {}
        handles = []

        def stream_hook(layer):
            def pre(module, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                acts[f"resid.{layer}"] = x.detach().clone()
                if layer in resid_edits:
                    x = resid_edits[layer](x)
                    if args:
                        return (x, *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": x}
                return None

            return pre

        def mlp_in_hook(layer):
            def pre(module, args, kwargs):
                acts[f"mlp_in.{layer}"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

            return pre

        def mlp_out_hook(layer):
            def post(module, args, output):
                acts[f"mlp_out.{layer}"] = output.detach().clone()
                if layer in mlp_edits:
                    return mlp_edits[layer](acts[f"mlp_in.{layer}"], output)
                return None

            return post

        def attn_out_hook(layer):
            def post(module, args, output):
                acts[f"attn_out.{layer}"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

            return post

        for layer, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(stream_hook(layer), with_kwargs=True))
            handles.append(self.mlps[layer].register_forward_pre_hook(mlp_in_hook(layer), with_kwargs=True))
            handles.append(self.mlps[layer].register_forward_hook(mlp_out_hook(layer)))
            handles.append(self.attn[layer].register_forward_hook(attn_out_hook(layer)))
        handles.append(self.final.register_forward_pre_hook(stream_hook(self.n), with_kwargs=True))
        try:
            with torch.no_grad():
                logits = self.hf(ids, use_cache=False).logits.float()
        finally:
            for h in handles:
                h.remove()
        return logits, acts

    def site_io(self, acts, site: DictSite) -> tuple[torch.Tensor, torch.Tensor]:
        """(what a dictionary at ``site`` reads, what it rebuilds)."""
        if site.kind == "mlp":
            return acts[f"mlp_in.{site.layer}"], acts[f"mlp_out.{site.layer}"]
        key = f"{site.kind}.{site.layer}"
        return acts[key], acts[key]

    def unembed(self, token: int) -> torch.Tensor:
        return self.hf.get_output_embeddings().weight[token].detach()

    def direction(self, final_in: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``d`` with ``x . d`` = x's share of the logit along ``u``, the final norm's scale at ``final_in`` frozen."""
        w = self.final.weight.detach()
        if isinstance(self.final, torch.nn.LayerNorm):
            d = w * u
            d = d - d.mean()
            scale = torch.sqrt(final_in.var(unbiased=False) + self.final.eps)
        else:  # RMSNorm
            d = w * u
            scale = torch.sqrt((final_in**2).mean() + self.final.variance_epsilon)
        return d / scale

    def final_bias(self, u: torch.Tensor) -> float:
        b = getattr(self.final, "bias", None)
        return 0.0 if b is None else float(b.detach() @ u)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only spins (tenfold slower on a busy two-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """A cache of this module's own: the corpus packs and example dictionaries it writes stay out of other tests' way."""
    import os

    before = os.environ.get("HEXRAY_CACHE")
    os.environ["HEXRAY_CACHE"] = str(tmp_path_factory.mktemp("features-cache"))
    yield
    if before is None:
        os.environ.pop("HEXRAY_CACHE", None)
    else:
        os.environ["HEXRAY_CACHE"] = before


@pytest.fixture(scope="module")
def plain(tiny_hf_model) -> PlainModel:
    return PlainModel(tiny_hf_model)


# ---------------------------------------------------------------------------------------------
# the dictionary maths, by hand
# ---------------------------------------------------------------------------------------------


def hand_encode(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    if d.apply_b_dec_to_input:
        x = x - d.b_dec.double()
    pre = x @ d.W_enc.double() + d.b_enc.double()
    if d.architecture == "topk":
        r = pre.clamp_min(0)
        kth = r.sort(dim=-1, descending=True).values[..., d.k - 1 : d.k]
        return torch.where(r >= kth, r, torch.zeros_like(r))
    if d.architecture in ("jumprelu", "batchtopk"):
        return torch.where(pre > d.threshold.double(), pre, torch.zeros_like(pre))
    return pre.clamp_min(0)


def hand_skip(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    if d.W_skip is None:
        return torch.zeros(*x.shape[:-1], d.W_dec.shape[1], dtype=torch.float64)
    return x.double() @ d.W_skip.double().T


def hand_reconstruct(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    return hand_encode(d, x) @ d.W_dec.double() + d.b_dec.double() + hand_skip(d, x)


def random_dictionary(model, sample: torch.Tensor, site: DictSite, arch: str, *, skip: bool = False, d_sae: int = 40, k: int = 6, seed: int = 0) -> Dictionary:
    """A random dictionary whose pre-activations have about unit spread on ``sample`` ([..., d]): some latents fire, not all."""
    g = torch.Generator().manual_seed(seed)
    width = model.spec.d_model
    x = sample.reshape(-1, width).float()
    b_dec = x.mean(0) + 0.1 * torch.randn(width, generator=g) * x.std()
    centred = x - b_dec if not site.transcoder else x
    W_enc = torch.randn(width, d_sae, generator=g)
    W_enc /= (centred @ W_enc).std(0, keepdim=True).clamp_min(1e-6)
    W_dec = torch.randn(d_sae, width, generator=g) * 0.3
    return Dictionary(
        site=site, architecture=arch, W_enc=W_enc, b_enc=0.2 * torch.randn(d_sae, generator=g), W_dec=W_dec, b_dec=b_dec,
        model_name=model.name, k=k if arch in ("topk", "batchtopk") else None,
        threshold=(0.3 + 0.4 * torch.rand(d_sae, generator=g)) if arch in ("jumprelu", "batchtopk") else None,
        W_skip=0.2 * torch.randn(width, width, generator=g) if skip else None,
        apply_b_dec_to_input=not site.transcoder, name=f"{site.label}-{arch}{'-skip' if skip else ''}",
    )


_SAMPLES: dict[str, dict[str, torch.Tensor]] = {}


def dictionary_at(model, plain: PlainModel, label: str, arch: str, skip: bool = False, seed: int = 0) -> Dictionary:
    """A random dictionary at ``label`` scaled to what the site holds on some corpus text."""
    site = parse_site(label, model.spec)
    if model.name not in _SAMPLES:
        _SAMPLES[model.name] = plain.run(model.encode(" ".join(CORPUS[:2] + CORPUS[5:7]))[:60])[1]
    x, _ = plain.site_io(_SAMPLES[model.name], site)
    return random_dictionary(model, x, site, arch, skip=skip, seed=seed)


# ---------------------------------------------------------------------------------------------
# sites
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "layer"),
    [("resid.1", "resid", 1), ("RESID_PRE.0", "resid", 0), ("resid.2", "resid", 2), ("mlp_out.1", "mlp_out", 1), ("attn_out:0", "attn_out", 0),
     ("mlp.1", "mlp", 1), ("blocks.1.hook_resid_pre", "resid", 1), ("blocks.1.hook_resid_post", "resid", 2),
     ("blocks.0.hook_mlp_out", "mlp_out", 0), ("blocks.1.mlp.hook_in", "mlp", 1)],
)
def test_parse_site_forms(tiny_gpt2, text, kind, layer):
    assert parse_site(text, tiny_gpt2.spec) == DictSite(kind, layer)


def test_sites_read_the_hooks_they_name(tiny_gpt2):
    spec = tiny_gpt2.spec  # two layers
    assert (DictSite("resid", 1).hook_in(spec), DictSite("resid", 1).hook_out(spec)) == ("blocks.1.hook_resid_pre",) * 2
    assert DictSite("resid", 2).hook_in(spec) == "blocks.1.hook_resid_post"  # after the last block
    assert (DictSite("mlp", 0).hook_in(spec), DictSite("mlp", 0).hook_out(spec)) == ("blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out")
    assert DictSite("attn_out", 1).hook_out(spec) == "blocks.1.hook_attn_out"


@pytest.mark.parametrize(("text", "fragment"), [("resid.3", "out of range"), ("mlp.2", "out of range"), ("mlp_out.2", "out of range"),
                                                ("blocks.0.attn.hook_z", "unknown site"), ("neurons.1", "unknown site")])
def test_parse_site_refuses(tiny_gpt2, text, fragment):
    with pytest.raises(HexRayError) as info:
        parse_site(text, tiny_gpt2.spec, field="site")
    assert fragment in info.value.message and info.value.field == "site" and info.value.hint
    assert info.value.message.startswith("site: ")  # the field is named, not a literal {field}


# ---------------------------------------------------------------------------------------------
# feature attribution: exact, against the plain forward
# ---------------------------------------------------------------------------------------------

# case -> dictionaries (site, architecture, skip)
ATTRIBUTION_CASES = {
    "resid1-topk-sae": [("resid.1", "topk", False)],
    "resid2-topk-sae": [("resid.2", "topk", False)],  # the stream after the last block
    "mlp1-transcoder": [("mlp.1", "relu", False)],
    "mlp0-skip-transcoder": [("mlp.0", "topk", True)],
    "attn_out1-jumprelu": [("attn_out.1", "jumprelu", False)],
    "mlp_out0-batchtopk": [("mlp_out.0", "batchtopk", False)],
    "resid1-and-mlp1": [("resid.1", "topk", False), ("mlp.1", "topk", True)],
    "mlp0-absorbed-by-resid2": [("mlp.0", "relu", True), ("resid.2", "topk", False)],
}


def replaced_by(component, site: DictSite) -> bool:
    """Whether a plain attribution row is part of what a dictionary at ``site`` rebuilds."""
    if site.kind == "resid":  # everything written before block L
        return component.kind == "embed" or (component.kind in ("attn", "head", "mlp", "neuron") and component.layer < site.layer)
    kinds = ("attn", "head") if site.kind == "attn_out" else ("mlp", "neuron")
    return component.kind in kinds and component.layer == site.layer


def absorbed(d: Dictionary, others) -> bool:
    """A non-stream dictionary before a stream dictionary's block is part of that stream."""
    return d.site.kind != "resid" and any(o.site.kind == "resid" and d.site.layer < o.site.layer for o in others)


ATTRIBUTION_RUNS = [(case, "head") for case in ATTRIBUTION_CASES] + [
    ("resid1-topk-sae", "layer"), ("resid1-topk-sae", "neuron"), ("mlp1-transcoder", "layer"), ("mlp1-transcoder", "neuron"), ("resid1-and-mlp1", "neuron"),
]


@pytest.mark.parametrize(("case", "granularity"), ATTRIBUTION_RUNS, ids=[f"{c}-{g}" for c, g in ATTRIBUTION_RUNS])
def test_feature_attribution_is_exact(tiny_model, plain, case, granularity):
    model, spec = tiny_model, tiny_model.spec
    dicts = [dictionary_at(model, plain, label, arch, skip, seed=i) for i, (label, arch, skip) in enumerate(ATTRIBUTION_CASES[case])]
    trace = run_trace(model, PROMPT, attribution_hooks(spec, granularity) | dictionary_hooks(spec, dicts))
    base = direct_logit_attribution(model, trace, granularity=granularity)
    attr = feature_attribution(model, trace, base, dicts)

    logits, acts = plain.run(model.encode(PROMPT))
    pos = len(trace.token_ids) - 1
    target = int(logits[0, pos].argmax())
    value = float(logits[0, pos, target])
    u = plain.unembed(target)
    d_hand = plain.direction(acts[f"resid.{plain.n}"][0, pos], u).double()

    # the table still sums to the target's real logit
    assert (attr.position, attr.target.id, attr.granularity) == (pos, target, granularity)
    assert attr.value == pytest.approx(value, abs=1e-4)
    scores = [c.score for c in attr.components]
    assert sum(scores) == pytest.approx(value, rel=1e-4, abs=1e-4)
    assert attr.reconstruction_error < 1e-3
    assert [abs(s) for s in scores] == sorted((abs(s) for s in scores), reverse=True)

    rows = {(c.component.kind, c.component.layer, c.component.head, c.component.neuron, c.component.feature, c.component.site): c.score for c in attr.components}
    assert len(rows) == len(attr.components)
    expected_rows = set()
    kept = [c for c in base.components if c.component.kind != "bias" and not any(replaced_by(c.component, d.site) for d in dicts)]
    for c in kept:  # every row no dictionary rebuilds is the plain table's
        key = (c.component.kind, c.component.layer, c.component.head, c.component.neuron, None, None)
        assert rows[key] == pytest.approx(c.score, abs=1e-6), c.component.name
        expected_rows.add(key)

    constant = plain.final_bias(u)
    for layer in range(plain.n):  # the biases of the parts still in the table
        if not any(replaced_by(Component("attn", layer), d.site) for d in dicts):
            constant += float(plain.attn_bias[layer].detach().double() @ d_hand)
        if not any(replaced_by(Component("mlp", layer), d.site) for d in dicts):
            constant += float(plain.mlp_bias[layer].detach().double() @ d_hand)
    for d in dicts:
        if absorbed(d, dicts):
            continue
        x, y = plain.site_io(acts, d.site)
        x, y = x[0, pos], y[0, pos].double()
        a = hand_encode(d, x)
        active = torch.nonzero(a).flatten().tolist()
        assert active, "the dictionary must fire for the check to mean something"
        w = d.W_dec.double() @ d_hand
        feature_sum = 0.0
        for f in active:
            key = ("feature", d.site.layer, None, None, f, d.site.kind)
            assert rows[key] == pytest.approx(float(a[f] * w[f]), rel=1e-3, abs=1e-5), f
            feature_sum += rows[key]
            expected_rows.add(key)
        err_key = ("error", d.site.layer, None, None, None, d.site.kind)
        recon = hand_reconstruct(d, x)
        assert rows[err_key] == pytest.approx(float((y - recon) @ d_hand), rel=1e-3, abs=1e-5)
        expected_rows.add(err_key)
        skip = 0.0
        if d.W_skip is not None:
            skip_key = ("skip", d.site.layer, None, None, None, d.site.kind)
            skip = rows[skip_key]
            assert skip == pytest.approx(float(hand_skip(d, x) @ d_hand), rel=1e-3, abs=1e-5)
            expected_rows.add(skip_key)
        b_dec = float(d.b_dec.double() @ d_hand)
        constant += b_dec
        # features + skip + error + b_dec is exactly what the site adds to the logit
        assert feature_sum + skip + rows[err_key] + b_dec == pytest.approx(float(y @ d_hand), rel=1e-4, abs=1e-5)
    bias_key = ("bias", None, None, None, None, None)
    assert rows[bias_key] == pytest.approx(constant, rel=1e-4, abs=1e-5)
    expected_rows.add(bias_key)
    assert set(rows) == expected_rows  # nothing rebuilt is left in, nothing else is added


def test_feature_attribution_with_a_contrast_conserves(tiny_model, plain):
    model, spec = tiny_model, tiny_model.spec
    d = dictionary_at(model, plain, "mlp.1", "topk", skip=True)
    trace = run_trace(model, PROMPT, attribution_hooks(spec, "head") | dictionary_hooks(spec, [d]))
    t, c = model.single_token(" Mary"), model.single_token(" John")
    attr = feature_attribution(model, trace, direct_logit_attribution(model, trace, target=t, contrast=c, granularity="head"), [d])
    logits, _ = plain.run(model.encode(PROMPT))
    assert sum(s.score for s in attr.components) == pytest.approx(float(logits[0, -1, t] - logits[0, -1, c]), rel=1e-4, abs=1e-4)


def test_two_dictionaries_at_one_site_are_refused(tiny_gpt2, plain_gpt2):
    model, spec = tiny_gpt2, tiny_gpt2.spec
    d1, d2 = (dictionary_at(model, plain_gpt2, "resid.1", "topk", seed=s) for s in (0, 1))
    trace = run_trace(model, PROMPT, attribution_hooks(spec, "layer") | dictionary_hooks(spec, [d1, d2]))
    with pytest.raises(HexRayError) as info:
        feature_attribution(model, trace, direct_logit_attribution(model, trace), [d1, d2])
    assert info.value.field == "dict" and "resid.1" in info.value.message


@pytest.fixture(scope="module")
def plain_gpt2(tiny_gpt2_case) -> PlainModel:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_case.folder), attn_implementation="eager", dtype=torch.float32, local_files_only=True)
    return PlainModel(hf.eval())


# ---------------------------------------------------------------------------------------------
# features per token
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("label", "arch", "skip", "prepend_bos"), [
    ("resid.1", "topk", False, None), ("resid.1", "topk", False, True), ("mlp_out.0", "batchtopk", False, None), ("attn_out.1", "jumprelu", False, True),
    ("mlp.0", "relu", True, True), ("resid.2", "relu", False, None),
])
def test_token_features_are_a_hand_encode(tiny_model, plain, label, arch, skip, prepend_bos):
    model = tiny_model
    d = dictionary_at(model, plain, label, arch, skip)
    trace = run_trace(model, PROMPT, dictionary_hooks(model.spec, [d]), prepend_bos=prepend_bos)
    ids = list(trace.token_ids)
    if prepend_bos:
        assert ids[0] == model.tokenizer.bos_token_id  # BOS is a position like any other: its features are shown too
    tf = token_features(model, trace, d, k=5)

    _, acts = plain.run(ids)
    x, y = plain.site_io(acts, d.site)
    a = hand_encode(d, x[0])  # [pos, d_sae]
    recon = hand_reconstruct(d, x[0])
    assert (tf.dictionary, tf.site) == (d.name, d.site.label)
    assert len(tf.top) == len(ids) and tf.l0.shape == tf.relative_error.shape == (len(ids),)
    for p in range(len(ids)):
        firing = [(float(a[p, f]), f) for f in torch.nonzero(a[p]).flatten().tolist()]
        want = sorted(firing, reverse=True)[:5]
        got = [(fa.activation, fa.feature) for fa in tf.top[p]]
        assert [f for _, f in got] == [f for _, f in want], p
        assert [v for v, _ in got] == pytest.approx([v for v, _ in want], rel=1e-4, abs=1e-5)
        assert all(fa.label == f"L{d.site.layer}F{fa.feature}" for fa in tf.top[p])
        assert int(tf.l0[p]) == len(firing)
        rel = float((y[0, p].double() - recon[p]).norm() / y[0, p].double().norm())
        assert float(tf.relative_error[p]) == pytest.approx(rel, rel=1e-3, abs=1e-5)
    if arch == "topk":
        assert (tf.l0 <= d.k).all()
    assert any(len(row) > 0 for row in tf.top)


def test_token_features_k_must_be_positive(tiny_gpt2, plain_gpt2):
    d = dictionary_at(tiny_gpt2, plain_gpt2, "resid.1", "topk")
    trace = run_trace(tiny_gpt2, PROMPT, dictionary_hooks(tiny_gpt2.spec, [d]))
    with pytest.raises(HexRayError) as info:
        token_features(tiny_gpt2, trace, d, k=0)
    assert info.value.field == "features_k"


# ---------------------------------------------------------------------------------------------
# harvest, training, measuring
# ---------------------------------------------------------------------------------------------


def corpus_contexts(model, copies: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiny corpus as BOS-separated sentences cut into contexts of CTX tokens; BOS is not counted."""
    bos = model.tokenizer.bos_token_id
    stream: list[int] = []
    for text in CORPUS * copies:
        stream += [bos, *model.encode(text, prepend_bos=False)]
    n = len(stream) // CTX
    tokens = torch.tensor(stream[: n * CTX]).view(n, CTX)
    return tokens, tokens != bos


def test_harvest_keeps_the_counted_positions_of_a_plain_forward(tiny_model, plain):
    tokens, counted = corpus_contexts(tiny_model, copies=1)
    tokens, counted = tokens[:10], counted[:10]
    assert not counted.all()  # some BOS to leave out
    wanted = [DictSite("resid", 0), DictSite("resid", 1), DictSite("resid", 2), DictSite("mlp", 0), DictSite("mlp_out", 1), DictSite("attn_out", 1)]
    got = harvest(tiny_model, wanted, tokens, counted, batch_contexts=3)
    _, acts = plain.run(tokens)
    for site, h in zip(wanted, got):
        x, y = plain.site_io(acts, site)
        assert h.n == int(counted.sum()) and h.x.dtype == torch.float32
        torch.testing.assert_close(h.x, x[counted], rtol=1e-4, atol=1e-5, msg=site.label)
        torch.testing.assert_close(h.y, y[counted], rtol=1e-4, atol=1e-5, msg=site.label)
    one = harvest(tiny_model, DictSite("mlp", 1), tokens, counted, batch_contexts=4, max_tokens=37)
    assert one.n == 37  # exactly max_tokens, the first ones in corpus order
    torch.testing.assert_close(one.x, acts["mlp_in.1"][counted][:37], rtol=1e-4, atol=1e-5)
    with pytest.raises(HexRayError) as info:
        harvest(tiny_model, DictSite("resid", 1), tokens, torch.zeros_like(counted))
    assert info.value.field == "corpus"


@pytest.fixture(scope="module")
def llama_contexts(tiny_llama):
    tokens, counted = corpus_contexts(tiny_llama)
    return (tokens[:-8], counted[:-8]), (tokens[-8:], counted[-8:])


# what is trained once per module: key -> (site, architecture)
TRAINED = {"sae": ("resid.1", "topk"), "batchtopk": ("mlp_out.1", "batchtopk"), "transcoder": ("mlp.0", "transcoder"), "skip-transcoder": ("mlp.1", "skip-transcoder")}


def train_options(model, label: str, arch: str, data=None, **changes) -> TrainOptions:
    fields = dict(latents=32, k=4, tokens=data.n if data is not None else 640, batch_tokens=64, epochs=6, lr=1e-2)
    return TrainOptions(parse_site(label, model.spec), arch, **{**fields, **changes})


@pytest.fixture(scope="module")
def trained(tiny_llama, llama_contexts):
    """key -> (options, harvest, trained dictionary, the same run's untrained initial dictionary)."""
    (tokens, counted), _ = llama_contexts
    sites = [parse_site(label, tiny_llama.spec) for label, _ in TRAINED.values()]
    data = harvest(tiny_llama, sites, tokens, counted)
    out = {}
    for (key, (label, arch)), h in zip(TRAINED.items(), data):
        opts = train_options(tiny_llama, label, arch, h)
        d, finished = train_dictionary(tiny_llama, opts, h)
        assert finished
        init, finished = train_dictionary(tiny_llama, opts, h, should_stop=lambda: True)
        assert not finished and init.meta["trained"]["steps"] == 0
        out[key] = (opts, h, d, init)
    return out


def hand_quality(plain: PlainModel, d: Dictionary, tokens: torch.Tensor, counted: torch.Tensor) -> dict:
    """FVU, L0, dead %, density and the three next-token losses, from plain forwards with raw hooks."""
    clean, acts = plain.run(tokens)
    x, y = plain.site_io(acts, d.site)
    a, recon = hand_encode(d, x), hand_reconstruct(d, x)
    ya, ra, aa = y[counted].double(), recon[counted], a[counted]
    L = d.site.layer

    def splice(fn):
        if d.site.kind == "resid":
            return plain.run(tokens, resid_edits={L: lambda s: fn(s, s).to(s.dtype)})[0]
        if d.site.kind == "mlp":
            return plain.run(tokens, mlp_edits={L: lambda i, o: fn(i, o).to(o.dtype)})[0]
        assert d.site.kind == "mlp_out"
        return plain.run(tokens, mlp_edits={L: lambda i, o: fn(o, o).to(o.dtype)})[0]

    spliced = splice(lambda inp, out: hand_reconstruct(d, inp))
    zero = splice(lambda inp, out: torch.zeros_like(out))

    def loss(logits):
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].double().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(tokens.shape[0], -1)
        return float(ce[counted[:, 1:]].mean())

    fired = aa > 0
    return {
        "tokens": int(counted.sum()), "fvu": float(((ya - ra) ** 2).sum() / ((ya - ya.mean(0)) ** 2).sum()),
        "l0": float(fired.sum(-1).double().mean()), "dead_pct": 100.0 * float((fired.sum(0) == 0).double().mean()),
        "density": fired.double().mean(0), "loss_clean": loss(clean), "loss_spliced": loss(spliced), "loss_zero": loss(zero),
    }


@pytest.mark.parametrize("key", ["sae", "transcoder", "skip-transcoder", "batchtopk"])
def test_evaluate_is_the_hand_measurement(tiny_llama, llama_contexts, trained, key):
    plain = PlainModel(tiny_llama_hf(tiny_llama))
    _, (tokens, counted) = llama_contexts
    _, _, d, _ = trained[key]
    q = evaluate(tiny_llama, d, tokens, counted, batch_contexts=3)
    want = hand_quality(plain, d, tokens, counted)
    assert q.tokens == want["tokens"]
    for name in ("fvu", "l0", "dead_pct", "loss_clean", "loss_spliced", "loss_zero"):
        assert getattr(q, name) == pytest.approx(want[name], rel=1e-3, abs=1e-4), name
    torch.testing.assert_close(q.density.double(), want["density"], rtol=0, atol=1e-6)
    gap = want["loss_zero"] - want["loss_clean"]
    assert q.loss_recovered == pytest.approx((want["loss_zero"] - want["loss_spliced"]) / gap, rel=1e-2, abs=1e-3)
    assert set(q.as_dict()) == {"tokens", "fvu", "l0", "dead_pct", "loss_clean", "loss_spliced", "loss_zero", "loss_recovered"}


_HF: dict[str, object] = {}


def tiny_llama_hf(tiny_llama):
    """An untouched transformers copy of the tiny Llama (its folder is the model's name)."""
    if tiny_llama.name not in _HF:
        from transformers import AutoModelForCausalLM

        _HF[tiny_llama.name] = AutoModelForCausalLM.from_pretrained(tiny_llama.name, attn_implementation="eager", dtype=torch.float32, local_files_only=True).eval()
    return _HF[tiny_llama.name]


@pytest.mark.parametrize("key", list(TRAINED))
def test_training_lowers_held_out_fvu(tiny_llama, llama_contexts, trained, key):
    _, (tokens, counted) = llama_contexts
    opts, _, d, init = trained[key]
    before, after = evaluate(tiny_llama, init, tokens, counted), evaluate(tiny_llama, d, tokens, counted)
    assert after.fvu < 0.6 * before.fvu, (before.fvu, after.fvu)
    if not opts.site.transcoder:  # a random tiny MLP is hard to transcode with 32 latents; a stream is easy to rebuild
        assert after.fvu < 0.5 and d.meta["trained"]["final_train_fvu"] < 0.5
    assert d.meta["trained"]["steps"] == opts.epochs * opts.tokens // opts.batch_tokens


def test_auxk_revives_dead_latents(tiny_llama, trained):
    """Few latents firing (k=2 of 64) leaves many dead; AuxK's pull towards the residual error brings most back."""
    _, h, _, _ = trained["sae"]
    dead = {}
    for alpha in (0.0, 1 / 32):
        opts = train_options(tiny_llama, "resid.1", "topk", h, latents=64, k=2, epochs=3, auxk_alpha=alpha, dead_tokens=256)
        d, _ = train_dictionary(tiny_llama, opts, h)
        dead[alpha] = int(((hand_encode(d, h.x) > 0).sum(0) == 0).sum())  # never fire on the training tokens
    assert dead[0.0] >= 8, dead
    assert dead[1 / 32] <= dead[0.0] // 2, dead


@pytest.mark.parametrize("key", list(TRAINED))
def test_trained_dictionaries_keep_their_shape_and_unit_decoder_rows(tiny_llama, trained, key):
    opts, h, d, init = trained[key]
    width = tiny_llama.spec.d_model
    assert (d.d_in, d.d_sae, d.d_out, d.k, d.site) == (width, opts.latents, width, opts.k, opts.site)
    torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(opts.latents), rtol=0, atol=1e-5)
    torch.testing.assert_close(init.W_dec.norm(dim=1), torch.ones(opts.latents), rtol=0, atol=1e-5)
    assert d.apply_b_dec_to_input == (not opts.site.transcoder)  # SAEs encode relative to b_dec; transcoders' b_dec is the output's
    assert d.kind == {"sae": "sae", "batchtopk": "sae", "transcoder": "transcoder", "skip-transcoder": "skip-transcoder"}[key]
    if key == "skip-transcoder":
        assert d.W_skip.abs().max() > 1e-3  # the skip connection learned something
    if key == "batchtopk":  # inference uses one learned threshold: positive, and about k latents fire per token on average
        assert d.architecture == "batchtopk" and d.threshold.shape == (opts.latents,) and float(d.threshold[0]) > 0
        assert torch.equal(d.threshold, d.threshold[0].expand(opts.latents))
        l0 = float((hand_encode(d, h.x) > 0).sum(-1).double().mean())
        assert 0.25 * opts.k < l0 < 4 * opts.k, l0
    else:
        assert d.architecture == "topk"
        assert ((hand_encode(d, h.x) > 0).sum(-1) <= opts.k).all()


# ---------------------------------------------------------------------------------------------
# checkpoints and resuming
# ---------------------------------------------------------------------------------------------

WEIGHT_FIELDS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")


def assert_same_weights(a: Dictionary, b: Dictionary) -> None:
    for name in WEIGHT_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


class StopAfter:
    """``progress`` / ``should_stop`` for train_dictionary: stop once ``steps`` steps are done (or raise, for a crash)."""

    def __init__(self, steps: int, crash: bool = False):
        self.steps, self.crash, self.seen = steps, crash, []

    def progress(self, step, steps, fvu):
        self.seen.append(step)

    def should_stop(self) -> bool:
        if self.seen and self.seen[-1] >= self.steps:
            if self.crash:
                raise KeyboardInterrupt
            return True
        return False


@pytest.mark.parametrize("key", ["batchtopk", "skip-transcoder"])
def test_a_stopped_run_resumes_to_the_uninterrupted_result(tiny_llama, trained, tmp_path, key):
    """Stopped after 7 steps, the checkpoint holds everything: resuming gives the uninterrupted run's weights."""
    opts, h, _, _ = trained[key]
    opts = dataclasses.replace(opts, epochs=1, dead_tokens=128)  # AuxK active: the dead-latent counters must survive too
    full, finished = train_dictionary(tiny_llama, opts, h)
    assert finished
    ckpt = tmp_path / "run" / "checkpoint.pt"
    stop = StopAfter(7)
    part, finished = train_dictionary(tiny_llama, opts, h, checkpoint=ckpt, progress=stop.progress, should_stop=stop.should_stop)
    assert not finished and ckpt.is_file() and part.meta["trained"]["steps"] == 7
    again = StopAfter(10**9)
    resumed, finished = train_dictionary(tiny_llama, opts, h, checkpoint=ckpt, progress=again.progress)
    assert finished and again.seen[0] == 8  # it continued, not started afresh
    assert_same_weights(resumed, full)
    assert resumed.meta["trained"] == full.meta["trained"]


def test_a_crashed_run_resumes_from_its_last_periodic_checkpoint(tiny_llama, trained, tmp_path):
    opts, h, _, _ = trained["sae"]
    opts = dataclasses.replace(opts, epochs=1, dead_tokens=128)
    full, _ = train_dictionary(tiny_llama, opts, h)
    ckpt = tmp_path / "checkpoint.pt"
    crash = StopAfter(6, crash=True)
    with pytest.raises(KeyboardInterrupt):
        train_dictionary(tiny_llama, opts, h, checkpoint=ckpt, checkpoint_every=4, progress=crash.progress, should_stop=crash.should_stop)
    assert torch.load(ckpt, weights_only=True)["step"] == 4  # the last periodic save, not the crash
    again = StopAfter(10**9)
    resumed, finished = train_dictionary(tiny_llama, opts, h, checkpoint=ckpt, progress=again.progress)
    assert finished and again.seen[0] == 5
    assert_same_weights(resumed, full)


def test_a_torn_checkpoint_is_one_clear_error(tiny_llama, trained, tmp_path):
    opts, h, _, _ = trained["sae"]
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(HexRayError) as info:
        train_dictionary(tiny_llama, opts, h, checkpoint=ckpt)
    assert "cannot be read" in info.value.message and str(ckpt) in info.value.message and info.value.hint


BASE_OPTIONS = dict(site=DictSite("resid", 1), arch="topk", latents=32, k=4, tokens=1024, batch_tokens=64)


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"k": 32}, "k", "between 1 and latents - 1 (31)"),
        ({"k": 40}, "k", "got 40"),
        ({"k": 0}, "k", "got 0"),
        ({"latents": 1, "k": 1}, "latents", "at least 2"),
        ({"tokens": 63}, "tokens", "at least the batch (64 tokens)"),
        ({"arch": "transcoder"}, "site", "its site is mlp.L, not resid.1"),
        ({"arch": "skip-transcoder", "site": DictSite("mlp_out", 1)}, "site", "not mlp_out.1"),
        ({"arch": "topk", "site": DictSite("mlp", 0)}, "arch", "needs --arch transcoder"),
        ({"arch": "batchtopk", "site": DictSite("mlp", 1)}, "arch", "needs --arch transcoder"),
        ({"arch": "jumprelu"}, "arch", "unknown architecture 'jumprelu'"),
    ],
)
def test_train_options_refuse_bad_runs(changes, field, fragment):
    opts = TrainOptions(**{**BASE_OPTIONS, **changes})
    with pytest.raises(HexRayError) as info:
        opts.validate()
    err = info.value
    assert err.field == field and fragment in err.message, err.message
    assert "{field}" not in err.one_line(lambda f: "--" + f)
    with pytest.raises(HexRayError):  # training checks them too, before any work
        train_dictionary(None, opts, None)


@pytest.mark.parametrize("changes", [{}, {"k": 31}, {"arch": "transcoder", "site": DictSite("mlp", 0)}, {"arch": "skip-transcoder", "site": DictSite("mlp", 1)},
                                     {"arch": "batchtopk", "site": DictSite("attn_out", 0)}, {"tokens": 64}])
def test_train_options_accept_good_runs(changes):
    opts = TrainOptions(**{**BASE_OPTIONS, **changes})
    assert opts.validate() is opts
    assert opts.learning_rate == pytest.approx(2e-4 / math.sqrt(opts.latents / 2**14))


# ---------------------------------------------------------------------------------------------
# whole runs: corpus -> saved, measured folder
# ---------------------------------------------------------------------------------------------


def corpus_file(folder: Path) -> Path:
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS * 2), encoding="utf-8")
    return path


def run(model, tmp_path, outs, *, options=None, **kwargs):
    options = options or [train_options(model, "resid.1", "topk", epochs=1)]
    return train_dictionaries(model, options, outs, corpus=corpus_file(tmp_path), context_size=CTX, held_out=64, **kwargs)


class Stages:
    """A ``stage`` callback recording what ran, and a ``should_stop`` that turns true at a chosen point."""

    def __init__(self, stop_at: tuple[str, int] | None = None):
        self.calls, self.stop_at, self.stopped = [], stop_at, False

    def __call__(self, name, done, total, detail):
        self.calls.append((name, done, total))
        if self.stop_at and name == self.stop_at[0] and done >= self.stop_at[1]:
            self.stopped = True

    def should_stop(self) -> bool:
        return self.stopped


def folder_tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_a_run_saves_each_measured_dictionary(tiny_llama, tmp_path):
    outs = [tmp_path / "dicts" / "resid.1", tmp_path / "dicts" / "mlp.0"]
    options = [train_options(tiny_llama, "resid.1", "topk", epochs=1), train_options(tiny_llama, "mlp.0", "skip-transcoder", epochs=1)]
    stages = Stages()
    built = run(tiny_llama, tmp_path, outs, options=options, stage=stages)
    assert [b.folder for b in built] == outs
    assert [name for name, *_ in stages.calls if name != "corpus"][:1] == ["harvest"]
    assert {name for name, *_ in stages.calls} == {"corpus", "harvest", "train", "evaluate"}
    for b, out, opts in zip(built, outs, options):
        assert folder_tree(out.parent) >= {out.name} and not checkpoint_path(out).parent.exists()  # no checkpoint left
        back = load_dictionary(out)
        assert_same_weights(back, b.dictionary)
        assert (back.site, back.k, back.d_sae, back.name, back.context_size) == (opts.site, opts.k, opts.latents, out.name, CTX)
        assert back.model_name == tiny_llama.name
        quality = back.meta["quality"]
        assert set(quality) == set(b.quality.as_dict())
        for key, value in b.quality.as_dict().items():
            assert quality[key] == pytest.approx(value, rel=1e-6, nan_ok=True), key
        assert 0 < b.quality.tokens <= 64 + CTX and b.quality.l0 <= opts.k
        assert set(b.seconds) == {"harvest", "train", "evaluate"}
        assert back.meta["corpus"]["context_size"] == CTX and back.meta["trained"]["arch"] == opts.arch
    assert load_named(",".join(str(o) for o in outs), tiny_llama.spec)[1].kind == "skip-transcoder"


def test_an_interrupted_run_leaves_only_its_checkpoint_and_resumes(tiny_llama, tmp_path, monkeypatch):
    from hexray.features.formats import dictionaries_root

    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "cache"))
    root = dictionaries_root() / "tiny"
    out = root / "resid.1"
    stages = Stages(stop_at=("train", 3))
    with pytest.raises(Interrupted) as info:
        run(tiny_llama, tmp_path, [out], stage=stages, should_stop=stages.should_stop)
    assert info.value.checkpoint == checkpoint_path(out)
    assert not out.exists()  # the folder appears only when complete
    assert folder_tree(root) == {".resid.1.partial", ".resid.1.partial/checkpoint.pt"}
    assert torch.load(info.value.checkpoint, weights_only=True)["step"] == 3
    assert saved_dictionaries() == []  # a run in progress is not a dictionary

    again = Stages()
    resumed = run(tiny_llama, tmp_path, [out], resume=True, stage=again)[0]
    assert [done for name, done, _ in again.calls if name == "train"][0] == 4  # from the checkpoint, not from step 1
    assert folder_tree(root) == {"resid.1", *(f"resid.1/{f.name}" for f in out.iterdir())}  # the checkpoint is gone
    assert [(r["name"], r["site"], r["kind"]) for r in saved_dictionaries()] == [("tiny/resid.1", "resid.1", "sae (topk)")]
    fresh = run(tiny_llama, tmp_path, [tmp_path / "other" / "resid.1"])[0]
    assert_same_weights(load_dictionary(out), fresh.dictionary)
    assert resumed.quality.fvu == pytest.approx(fresh.quality.fvu, rel=1e-6)


def test_without_resume_a_stale_checkpoint_is_dropped(tiny_llama, tmp_path):
    out = tmp_path / "dicts" / "resid.1"
    checkpoint_path(out).parent.mkdir(parents=True)
    checkpoint_path(out).write_bytes(b"stale")  # unreadable: resuming from it would fail
    run(tiny_llama, tmp_path, [out])
    assert load_dictionary(out).site == DictSite("resid", 1) and not checkpoint_path(out).parent.exists()


def test_a_run_stopped_while_reading_activations_writes_nothing(tiny_llama, tmp_path):
    root = tmp_path / "dicts"
    stages = Stages(stop_at=("harvest", 1))
    with pytest.raises(Interrupted) as info:
        run(tiny_llama, tmp_path, [root / "resid.1"], stage=stages, should_stop=stages.should_stop)
    assert info.value.checkpoint is None
    assert not root.exists() or folder_tree(root) == set()


def test_a_run_stopped_before_the_first_batch_is_interrupted(tiny_llama, tmp_path):
    with pytest.raises(Interrupted):
        run(tiny_llama, tmp_path, [tmp_path / "dicts" / "resid.1"], should_stop=lambda: True)


def test_an_existing_dictionary_is_kept_unless_overwritten(tiny_llama, tmp_path):
    out = tmp_path / "resid.1"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    stages = Stages()
    with pytest.raises(HexRayError) as info:
        run(tiny_llama, tmp_path, [out], stage=stages)
    assert info.value.field == "out" and str(out) in info.value.message and info.value.hint
    assert stages.calls == []  # refused before any work
    assert folder_tree(out) == {"notes.txt"}
    run(tiny_llama, tmp_path, [out], overwrite=True)
    assert load_dictionary(out).d_sae == 32 and not (out / "notes.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    run(tiny_llama, tmp_path, [empty])  # an empty folder is not a dictionary to protect
    assert load_dictionary(empty).d_sae == 32


# ---------------------------------------------------------------------------------------------
# dictionaries by name
# ---------------------------------------------------------------------------------------------


def test_load_named_checks_the_model(tiny_gpt2, plain_gpt2, tmp_path):
    spec = tiny_gpt2.spec
    d = dictionary_at(tiny_gpt2, plain_gpt2, "resid.1", "topk")
    good = save_dictionary(d, tmp_path / "good", spec=spec)
    other = save_dictionary(dataclasses.replace(d, model_name="someone/other-model"), tmp_path / "other")
    g = torch.Generator().manual_seed(0)
    narrow = save_dictionary(Dictionary(DictSite("resid", 1), "relu", torch.randn(16, 8, generator=g), torch.zeros(8), torch.randn(8, 16, generator=g),
                                        torch.zeros(16), tiny_gpt2.name), tmp_path / "narrow")
    (loaded,) = load_named(str(good), spec)
    assert_same_weights(loaded, d)
    assert load_named(f" {good} ", spec)[0] is loaded  # read once per file version
    for text, fragment in [(str(other), "was trained for someone/other-model"), (str(narrow), "16 -> 16 wide"),
                           ("no-such-dictionary", "no dictionary 'no-such-dictionary'"), (" , ", "no dictionary named")]:
        with pytest.raises(HexRayError) as info:
            load_named(text, spec)
        assert fragment in info.value.message and info.value.hint, (text, info.value.message)
    with pytest.raises(HexRayError) as info:
        load_named("no-such-dictionary", spec)
    assert info.value.field == "dict"


def test_load_named_labels_a_dictionary_with_the_name_asked_for(tiny_gpt2, plain_gpt2, tmp_path):
    folder = save_dictionary(dictionary_at(tiny_gpt2, plain_gpt2, "resid.1", "topk"), tmp_path / "d")
    assert load_named(str(folder), tiny_gpt2.spec)[0].name == str(folder)
    assert load_named(f"{tmp_path}/./d", tiny_gpt2.spec)[0].name == f"{tmp_path}/./d"


# ---------------------------------------------------------------------------------------------
# feature ablation and clamping
# ---------------------------------------------------------------------------------------------

TOL = 1e-4


def assert_distribution(dist, logits: torch.Tensor, target: int) -> None:
    """``dist`` matches reference ``logits`` [vocab] (the ablation tests' check, on float64 logits)."""
    from tests.unit.test_ablation import assert_distribution as matches

    matches(dist, logits.double(), target)


def feature_edit(d: Dictionary, f: int, value, positions=slice(None)):
    """What ablating feature ``f`` adds to the dictionary's output: ``(value - a_f) W_dec[f]`` at ``positions``."""

    def delta(x):  # x: the dictionary's input [1, pos, d_in]
        a_f = hand_encode(d, x[0])[:, f]
        target = value(a_f) if callable(value) else torch.full_like(a_f, float(value))
        change = torch.zeros_like(a_f)
        change[positions] = (target - a_f)[positions]
        return (change[:, None] * d.W_dec[f].double())[None].float()

    if d.site.kind == "resid":
        return {"resid_edits": {d.site.layer: lambda x: x + delta(x)}}
    if d.site.kind == "mlp":
        return {"mlp_edits": {d.site.layer: lambda inp, out: out + delta(inp)}}
    return {"mlp_edits": {d.site.layer: lambda inp, out: out + delta(out)}}  # mlp_out


ABLATIONS = [("resid.1", "topk", False), ("mlp.0", "relu", True), ("resid.2", "topk", False), ("mlp_out.1", "jumprelu", False)]


@pytest.mark.parametrize("how", ["zero", "clamp", "zero-last-position"])
@pytest.mark.parametrize(("label", "arch", "skip"), ABLATIONS)
def test_feature_ablation_is_a_hand_made_edit(tiny_model, plain, tmp_path, label, arch, skip, how):
    model = tiny_model
    d = dictionary_at(model, plain, label, arch, skip)
    folder = save_dictionary(d, tmp_path / "dict", spec=model.spec)
    ids = model.encode(PROMPT)
    before, acts = plain.run(ids)
    x, _ = plain.site_io(acts, d.site)
    f = int(hand_encode(d, x[0])[-1].argmax())  # fires at the last position
    value, positions, suffix = {"zero": (0.0, slice(None), ""), "clamp": (5.0, slice(None), "=5"), "zero-last-position": (0.0, slice(-1, None), "@-1")}[how]
    after, _ = plain.run(ids, **feature_edit(d, f, value, positions))
    top = int(before[0, -1].argmax())

    result = ablate(model, PROMPT, f"L{d.site.layer}F{f}{suffix}", dict=str(folder), k=8)
    assert [s.component.kind for s in result.sites] == ["feature"] and result.sites[0].component.feature == f
    assert result.sites[0].value == (5.0 if how == "clamp" else None)
    assert_distribution(result.before, before[0, -1], top)
    assert_distribution(result.after, after[0, -1], top)
    p, q = torch.softmax(before[0, -1].double(), -1), torch.softmax(after[0, -1].double(), -1)
    expected_kl = float((p * (p.log() - q.log())).sum())
    assert expected_kl > 1e-9  # the edit does something, so the comparison means something
    assert result.kl == pytest.approx(expected_kl, rel=1e-2, abs=1e-7)


def test_feature_mean_ablation_uses_the_reference_mean(tiny_llama, plain_llama, tmp_path):
    model = tiny_llama
    d = dictionary_at(model, plain_llama, "resid.1", "relu")
    folder = save_dictionary(d, tmp_path / "dict", spec=model.spec)
    ids = model.encode(PROMPT)
    before, acts = plain_llama.run(ids)
    f = int(hand_encode(d, acts["resid.1"][0])[-1].argmax())
    mean = torch.cat([hand_encode(d, plain_llama.run(model.encode(r))[1]["resid.1"][0])[:, f] for r in REFERENCE]).mean()
    assert mean > 0
    after, _ = plain_llama.run(ids, **feature_edit(d, f, lambda a_f: mean.expand_as(a_f)))
    result = ablate(model, PROMPT, f"L1F{f}", mode="mean", reference=REFERENCE, dict=str(folder), k=8)
    assert result.n_reference == len(REFERENCE)
    assert_distribution(result.after, after[0, -1], int(before[0, -1].argmax()))


@pytest.fixture(scope="module")
def plain_llama(tiny_llama) -> PlainModel:
    return PlainModel(tiny_llama_hf(tiny_llama))


def test_feature_ablation_refusals(tiny_gpt2, plain_gpt2, tmp_path):
    model = tiny_gpt2
    d = dictionary_at(model, plain_gpt2, "resid.1", "topk")
    folder = str(save_dictionary(d, tmp_path / "dict", spec=model.spec))
    for components, kwargs, fragment in [
        ("L1F3", {}, "a feature needs its dictionary"),
        (f"L1F{d.d_sae}", {"dict": folder}, f"feature {d.d_sae} is out of range"),
        ("L0F3", {"dict": folder}, "no dictionary at layer 0"),
        ("MLP0=5", {"dict": folder}, "only a feature can be clamped"),
        ("L1F3=five", {"dict": folder}, "is not a number"),
    ]:
        with pytest.raises(HexRayError) as info:
            ablate(model, PROMPT, components, **kwargs)
        assert fragment in info.value.message, (components, info.value.message)


def test_the_registry_entry_is_switched_by_dict(tiny_gpt2, plain_gpt2, tmp_path):
    from hexray.analysis.registry import get

    entry = get("features")
    assert entry.switch.name == "dict" and entry.json_key == "features" and entry.refine is not None
    d = dictionary_at(tiny_gpt2, plain_gpt2, "mlp.1", "topk")
    folder = str(save_dictionary(d, tmp_path / "d", spec=tiny_gpt2.spec))
    options = type("Options", (), {"dict": folder, "features_k": 2})()
    assert entry.hooks(tiny_gpt2.spec, options) == {"ln_final.hook_scale", "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"}
    example = entry.example(tiny_gpt2)  # a folder a user can pass to --dict
    (loaded,) = load_named(example, tiny_gpt2.spec)
    assert loaded.site == DictSite("resid", 1) and loaded.d_in == tiny_gpt2.spec.d_model
