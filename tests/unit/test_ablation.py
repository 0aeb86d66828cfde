"""Ablation: zero, mean and resample ablation against plain hooked forward passes, KL, positions, errors.

Every reference here is a plain ``model.bridge.run_with_hooks`` forward with a hook that overwrites
the ablated activation, reading the full logits; nothing goes through ``hexray.intervene``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hexray.errors import HexRayError
from hexray.intervene.ablation import ablate, default_reference_prompts, parse_sites, read_reference_prompts
from hexray.intervene.results import Site
from hexray.tracing.sites import Component

PROMPT = "When Mary and John went home, John gave a ball to"  # 18 tokens with the tiny tokenizer
OTHER = "Mary gave John a book, and John gave Mary a pen."  # >= 18 tokens: a resample source for every position
TOL = 1e-4

# component label -> (hook name, index into the [pos, ...] activation at every position); spelled here,
# independently of hexray.tracing.sites
COMPONENTS = {
    "L0H1": ("blocks.0.attn.hook_z", (slice(None), 1)),  # [pos, n_heads, d_head]
    "L1H3": ("blocks.1.attn.hook_z", (slice(None), 3)),
    "L0N3": ("blocks.0.mlp.hook_post", (slice(None), 3)),  # [pos, d_mlp]
    "MLP0": ("blocks.0.hook_mlp_out", (slice(None),)),  # [pos, d_model]
    "ATTN1": ("blocks.1.hook_attn_out", (slice(None),)),
    "RESID1": ("blocks.1.hook_resid_pre", (slice(None),)),
    "RESID0": ("blocks.0.hook_resid_pre", (slice(None),)),
}


# ---------------------------------------------------------------------------------------------
# the independent reference
# ---------------------------------------------------------------------------------------------


def plain_logits(model, ids, fwd_hooks=()) -> torch.Tensor:
    """Full logits of a plain bridge forward: [pos, vocab] in float64."""
    with torch.no_grad():
        return model.bridge.run_with_hooks(torch.tensor([list(ids)]), fwd_hooks=list(fwd_hooks))[0].double()


def replace_hook(index: tuple, values):
    """Hook setting ``x[0][index] = values(x[0])`` (values: a function of the [pos, ...] activation)."""

    def fn(x, hook=None):
        x = x.clone()
        x[0][index] = values(x[0])[index] if callable(values) else values
        return x

    return fn


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p.log() - q.log())).sum())


def assert_distribution(dist, logits: torch.Tensor, target: int):
    """``dist`` (a Distribution) matches reference ``logits`` [vocab]: target logit and every top prob."""
    probs = torch.softmax(logits, -1)
    assert dist.target.id == target
    assert dist.target.logit == pytest.approx(float(logits[target]), abs=TOL)
    assert dist.target.prob == pytest.approx(float(probs[target]), abs=TOL)
    for score in dist.top:
        assert score.prob == pytest.approx(float(probs[score.id]), abs=TOL), score.token
        assert score.logit == pytest.approx(float(logits[score.id]), abs=TOL), score.token
    # the top list is the reference's top-k (probabilities non-increasing, nothing larger left out)
    top_probs = [s.prob for s in dist.top]
    assert top_probs == sorted(top_probs, reverse=True)
    assert float(probs.sort(descending=True).values[len(dist.top) - 1]) == pytest.approx(top_probs[-1], abs=TOL)


@pytest.fixture(scope="module")
def case(tiny_model):
    model = tiny_model
    ids = model.encode(PROMPT)
    assert len(ids) == 18
    assert len(model.encode(OTHER)) >= len(ids)
    before = plain_logits(model, ids)  # [pos, vocab]
    return SimpleNamespace(model=model, ids=ids, n=len(ids), before=before, top=int(before[-1].argmax()))


# ---------------------------------------------------------------------------------------------
# zero ablation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["L0H1", "L1H3", "L0N3", "MLP0", "ATTN1", "RESID1"])
def test_zero_ablation_matches_reference(case, label):
    """Zeroing one component equals a plain run that zeroes it: before/after logits, every top prob, and KL."""
    model = case.model
    hook, index = COMPONENTS[label]
    after = plain_logits(model, case.ids, [(hook, replace_hook(index, 0.0))])[-1]  # [vocab]
    result = ablate(model, PROMPT, label, mode="zero", k=10)

    assert result.position == case.n - 1
    assert [s.label for s in result.sites] == [label]
    assert (result.mode, result.n_reference, result.samples) == ("zero", 0, 1)
    assert len(result.after.top) == 10
    assert_distribution(result.before, case.before[-1], case.top)
    assert_distribution(result.after, after, case.top)

    p, q = torch.softmax(case.before[-1], -1), torch.softmax(after, -1)
    expected_kl = kl(p, q)
    assert result.kl >= 0
    assert result.kl == pytest.approx(expected_kl, rel=1e-3, abs=1e-7)
    assert expected_kl > 1e-6  # the ablation does something, so the comparison means something


def test_zero_ablation_of_several_components_with_target_and_contrast(case):
    """Components ablate together; target/contrast are reported with the logit difference before and after."""
    model = case.model
    hooks = [(COMPONENTS[c][0], replace_hook(COMPONENTS[c][1], 0.0)) for c in ("L0H1", "MLP0", "L1H3")]
    after = plain_logits(model, case.ids, hooks)[-1]
    t, c = model.single_token(" Mary"), model.single_token(" John")
    result = ablate(model, PROMPT, "L0H1, MLP0 ,L1H3", target=" Mary", contrast=" John", k=5)
    assert [s.label for s in result.sites] == ["L0H1", "MLP0", "L1H3"]
    assert len(result.before.top) == 5
    assert_distribution(result.after, after, t)
    assert result.after.contrast.id == c
    assert result.after.logit_diff == pytest.approx(float(after[t] - after[c]), abs=TOL)
    assert result.before.logit_diff == pytest.approx(float(case.before[-1, t] - case.before[-1, c]), abs=TOL)
    assert result.kl == pytest.approx(kl(torch.softmax(case.before[-1], -1), torch.softmax(after, -1)), rel=1e-3, abs=1e-7)


def test_zero_ablation_at_one_position(case):
    """``L0H1@2`` and ``RESID0@-3`` zero only that position, like the reference; at another token_index too."""
    model = case.model
    hook, _ = COMPONENTS["L0H1"]
    after = plain_logits(model, case.ids, [(hook, replace_hook((2, 1), 0.0))])
    result = ablate(model, PROMPT, "L0H1@2")
    assert result.sites == (Site(Component("head", 0, head=1), 2),)
    assert_distribution(result.after, after[-1], case.top)

    hook, _ = COMPONENTS["RESID0"]
    after = plain_logits(model, case.ids, [(hook, replace_hook((case.n - 3,), 0.0))])
    result = ablate(model, PROMPT, "RESID0@-3", token_index=-2)
    assert result.position == case.n - 2
    assert_distribution(result.after, after[-2], int(case.before[-2].argmax()))
    assert_distribution(result.before, case.before[-2], int(case.before[-2].argmax()))


@pytest.mark.parametrize("label", ["L0H1", "RESID0", "MLP1", "L0N3"])
def test_ablation_after_the_read_position_changes_nothing(case, label):
    """Ablating at a position after ``token_index`` cannot reach it (causal attention): KL ~ 0, same distribution."""
    result = ablate(case.model, PROMPT, f"{label}@{case.n - 1}", token_index=5, mode="zero")
    assert result.position == 5
    assert result.kl == pytest.approx(0.0, abs=1e-9)
    assert result.after.target.logit == pytest.approx(result.before.target.logit, abs=1e-5)
    assert [s.id for s in result.after.top] == [s.id for s in result.before.top]
    for a, b in zip(result.after.top, result.before.top):
        assert a.prob == pytest.approx(b.prob, abs=1e-6)
    # while the same site at the read position itself does change it
    assert ablate(case.model, PROMPT, f"{label}@5", token_index=5).kl > 1e-7


# ---------------------------------------------------------------------------------------------
# mean and resample ablation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["L0H1", "MLP0", "L0N3", "RESID1"])
def test_mean_ablation_with_the_prompt_itself_as_reference(case, label):
    """Mean ablation with reference [PROMPT] replaces the activation with its mean over the prompt's positions."""
    model = case.model
    hook, index = COMPONENTS[label]

    def mean_over_positions(act):  # act [pos, ...] -> [pos, ...] of its positional mean
        return act.mean(0, keepdim=True).expand_as(act)

    after = plain_logits(model, case.ids, [(hook, replace_hook(index, mean_over_positions))])[-1]
    result = ablate(model, PROMPT, label, mode="mean", reference=[PROMPT])
    assert (result.mode, result.n_reference, result.samples) == ("mean", 1, 1)
    assert_distribution(result.after, after, case.top)
    assert result.kl == pytest.approx(kl(torch.softmax(case.before[-1], -1), torch.softmax(after, -1)), rel=1e-3, abs=1e-7)
    assert result.kl > 1e-7


def test_mean_ablation_over_several_reference_prompts(case):
    """With two reference prompts of different lengths, the mean runs over every token of both (padding excluded)."""
    model = case.model
    refs = ["The cat sat on the mat.", OTHER]
    hook, index = COMPONENTS["MLP0"]
    acts = []
    for r in refs:
        _, cache = model.bridge.run_with_cache(torch.tensor([model.encode(r)]), names_filter=lambda n: n == hook)
        acts.append(cache[hook][0])  # [pos_r, d_model]
    mean = torch.cat(acts).mean(0)  # [d_model]
    after = plain_logits(model, case.ids, [(hook, replace_hook(index, mean))])[-1]
    result = ablate(model, PROMPT, "MLP0", mode="mean", reference=refs + ["   "])
    assert result.n_reference == 2  # blank lines are not prompts
    assert_distribution(result.after, after, case.top)


def test_mean_ablation_defaults_to_the_built_in_reference_set(case):
    """Without ``reference``, mean ablation uses default_reference_prompts()."""
    defaults = default_reference_prompts()
    assert len(defaults) >= 10 and all(p.strip() == p and p for p in defaults)
    implicit = ablate(case.model, PROMPT, "ATTN0", mode="mean")
    explicit = ablate(case.model, PROMPT, "ATTN0", mode="mean", reference=defaults)
    assert implicit.n_reference == len(defaults)
    assert implicit.after.target.logit == pytest.approx(explicit.after.target.logit, abs=1e-6)
    assert implicit.kl == pytest.approx(explicit.kl, abs=1e-9)


def test_resample_from_one_long_reference_is_that_prompts_activations(case):
    """Resampling from a single long-enough prompt copies its activation at each same position, for any seed."""
    model = case.model
    hook, index = COMPONENTS["L1H3"]
    _, cache = model.bridge.run_with_cache(torch.tensor([model.encode(OTHER)]), names_filter=lambda n: n == hook)
    other = cache[hook][0, : case.n]  # [pos, n_heads, d_head], OTHER's first n positions
    after = plain_logits(model, case.ids, [(hook, replace_hook(index, other[index]))])[-1]
    for seed, samples in ((0, 1), (5, 3)):
        result = ablate(model, PROMPT, "L1H3", mode="resample", reference=[OTHER], seed=seed, samples=samples)
        assert (result.n_reference, result.samples) == (1, samples)
        assert_distribution(result.after, after, case.top)


def test_resample_is_deterministic_per_seed_and_varies_with_it(case):
    """Same seed -> identical result; another seed -> a different one; probabilities are an average of draws."""
    refs = ["The cat sat on the mat.", "The dog ran in the park.", OTHER, "Paris is the capital of France.",
            "It was a cold day in the city."]
    run = lambda seed, samples=4: ablate(case.model, PROMPT, "L0H1,MLP0", mode="resample", reference=refs, seed=seed, samples=samples)
    a, b, c = run(0), run(0), run(1)
    assert a.samples == 4 and a.n_reference == len(refs)
    assert a.after == b.after and a.kl == b.kl
    assert abs(a.after.target.prob - c.after.target.prob) > 1e-6 or a.kl != pytest.approx(c.kl, abs=1e-9)
    assert a.kl >= 0 and c.kl >= 0
    assert sum(s.prob for s in a.after.top) <= 1 + 1e-9


def test_resample_from_the_prompt_itself_changes_nothing(case):
    """Resampling every position from the prompt itself copies each activation onto itself: KL 0."""
    result = ablate(case.model, PROMPT, "RESID0,L0H2", mode="resample", reference=[PROMPT], samples=2)
    assert result.kl == pytest.approx(0.0, abs=1e-9)


def test_resample_from_the_prompt_itself_changes_nothing_with_prepend_bos(case):
    """The same with prepend_bos=True: prompt and reference must be tokenized alike, so KL is still 0."""
    result = ablate(case.model, PROMPT, "RESID0", mode="resample", reference=[PROMPT], samples=1, prepend_bos=True)
    assert result.tokens[0] == case.model.tokenizer.bos_token
    assert result.kl == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# parse_sites and bad input
# ---------------------------------------------------------------------------------------------


def test_parse_sites_reads_every_form(tiny_model):
    """Every component form parses, case-insensitively, with optional @position."""
    spec = tiny_model.spec
    got = parse_sites("l1h2, MLP0, L0N3@3, resid1@-1, A1, m1, ATTN0@0", spec)
    assert got == (
        Site(Component("head", 1, head=2)),
        Site(Component("mlp", 0)),
        Site(Component("neuron", 0, neuron=3), 3),
        Site(Component("resid", 1), -1),
        Site(Component("attn", 1)),
        Site(Component("mlp", 1)),
        Site(Component("attn", 0), 0),
    )
    assert [s.label for s in got] == ["L1H2", "MLP0", "L0N3@3", "RESID1@-1", "ATTN1", "MLP1", "ATTN0@0"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("X9", "unknown component 'X9'"),
        ("L2H0", "layer 2 is out of range"),
        ("L0H4", "head 4 is out of range"),
        ("MLP2", "layer 2 is out of range"),
        ("RESID2", "final residual stream"),
        ("RESID3", "layer 3 is out of range"),
        ("embed", "embed cannot be ablated"),
        ("bias", "bias cannot be ablated"),
        ("L0H1@x", "position 'x' is not a number"),
        ("L0H1@1.5", "not a number"),
        ("L0H1@", "no position after @"),
        ("", "no components given"),
        (" , ", "no components given"),
    ],
)
def test_parse_sites_rejects_bad_components(tiny_model, text, match):
    """Bad component text raises a HexRayError naming the problem."""
    with pytest.raises(HexRayError, match=match):
        parse_sites(text, tiny_model.spec)


def test_unknown_component_lists_the_forms(tiny_model):
    """The unknown-component error shows every accepted form (in its hint)."""
    with pytest.raises(HexRayError) as info:
        parse_sites("L0H1,head7", tiny_model.spec)
    line = info.value.one_line()
    for form in ("L9H6", "ATTN9", "MLP10", "L10N1234", "RESID12"):
        assert form in line


def test_neuron_out_of_range(tiny_model):
    """A neuron index equal to d_mlp is out of range; d_mlp - 1 is fine."""
    d_mlp = tiny_model.spec.d_mlp
    with pytest.raises(HexRayError, match=f"neuron {d_mlp} is out of range"):
        parse_sites(f"L0N{d_mlp}", tiny_model.spec)
    assert parse_sites(f"L1N{d_mlp - 1}", tiny_model.spec)[0].component.neuron == d_mlp - 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(components="L0H1@18"), "position 18 is out of range for a prompt of 18 tokens"),
        (dict(components="L0H1@-19"), "position -19 is out of range"),
        (dict(token_index=18), "token_index 18 is out of range"),
        (dict(mode="mean", reference=[]), "reference set is empty"),
        (dict(mode="resample", reference=["  ", ""]), "reference set is empty"),
        (dict(mode="median"), "unknown mode 'median'"),
        (dict(mode="resample", samples=0), "samples must be positive"),
        (dict(k=0), "top_k must be positive"),
        (dict(target=" Berlin"), "target ' Berlin' is 5 tokens"),
        (dict(components="RESID2"), "final residual stream"),
        (dict(components="embed"), "cannot be ablated"),
    ],
    ids=["pos-high", "pos-low", "token-index", "empty-refs", "blank-refs", "mode", "samples-0", "k-0",
         "multi-token-target", "resid-final", "embed"],
)
def test_ablate_rejects_bad_input(case, kwargs, match):
    """Bad arguments to ablate raise a HexRayError (never another exception type)."""
    args = dict(components="L0H1")
    args.update(kwargs)
    components = args.pop("components")
    with pytest.raises(HexRayError, match=match):
        ablate(case.model, PROMPT, components, **args)


def test_read_reference_prompts(tmp_path):
    """One prompt a line, blanks skipped and stripped; a missing, empty or undecodable file is a HexRayError."""
    good = tmp_path / "refs.txt"
    good.write_text("  first prompt \n\n\tsecond one\n   \n", encoding="utf-8")
    assert read_reference_prompts(good) == ["first prompt", "second one"]
    assert read_reference_prompts(str(good)) == ["first prompt", "second one"]

    with pytest.raises(HexRayError, match="no such file"):
        read_reference_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(HexRayError, match="has no prompts"):
        read_reference_prompts(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\t\n", encoding="utf-8")
    with pytest.raises(HexRayError, match="has no prompts"):
        read_reference_prompts(blank)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\xfa\x00bad")
    with pytest.raises(HexRayError, match="cannot be read"):
        read_reference_prompts(binary)
    with pytest.raises(HexRayError, match="cannot be read"):
        read_reference_prompts(tmp_path)  # a folder


# ---------------------------------------------------------------------------------------------
# steering a feature: + alpha W_dec[f]
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def steer_dictionary(case, tmp_path_factory):
    """A random topk dictionary at resid.1 (the residual stream before block 1), saved as a folder."""
    from hexray.features.dictionary import DictSite, Dictionary
    from hexray.features.formats import save_dictionary

    d_model = case.model.spec.d_model
    g = torch.Generator().manual_seed(5)
    W_dec = torch.randn(16, d_model, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    d = Dictionary(DictSite("resid", 1), "topk", W_dec.T.clone(), torch.zeros(16), W_dec, torch.zeros(d_model), case.model.name, k=4)
    folder = tmp_path_factory.mktemp("steer") / "resid.1"
    save_dictionary(d, folder, spec=case.model.spec)
    return SimpleNamespace(folder=str(folder), W_dec=W_dec)


def test_steering_a_feature_adds_its_decoder_row(case, steer_dictionary):
    """L1F3+=4 adds 4 W_dec[3] to the residual stream before block 1 (every position, or @P), whatever the feature's activation."""
    model, W_dec = case.model, steer_dictionary.W_dec

    def add(rows):
        def fn(x, hook=None):
            x = x.clone()
            x[0][rows] += 4.0 * W_dec[3].to(x.dtype)
            return x
        return fn

    for text, rows in (("L1F3+=4", slice(None)), ("L1F3+=4@2", 2)):
        after = plain_logits(model, case.ids, [("blocks.1.hook_resid_pre", add(rows))])[-1]
        result = ablate(model, PROMPT, text, dict=steer_dictionary.folder)
        assert [s.label for s in result.sites] == [text]
        assert result.sites[0].steer == 4.0 and result.sites[0].value is None
        assert_distribution(result.after, after, case.top)
        assert result.kl == pytest.approx(kl(torch.softmax(case.before[-1], -1), torch.softmax(after, -1)), rel=1e-3, abs=1e-7)
        assert result.kl > 1e-6


@pytest.mark.parametrize(("text", "match"), [
    ("L1H0+=2", "only a feature can be steered"),
    ("MLP0=2", "only a feature can be clamped"),
    ("L1F3+=x", "'x' is not a number"),
    ("L1F3+=nan", "not a finite number"),
    ("L1F3=inf", "not a finite number"),
])
def test_bad_steering_and_clamping(tiny_model, text, match):
    with pytest.raises(HexRayError, match=match):
        parse_sites(text, tiny_model.spec)
