"""Features and the tuned lens on the embedded SmolLM2 model: trained here on a slice of the default corpus.

Small budgets keep these quick; what they check does not depend on the budget: a trained lens beats
the logit lens on the early layers, training lowers the FVU on real activations, and a trained
dictionary's features (with its error and bias) still add up to the IOI logit.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import hexray
from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution
from hexray.analysis.features import dictionary_hooks, feature_attribution, token_features
from hexray.corpus.packs import token_pack
from hexray.features.dictionary import DictSite
from hexray.features.formats import save_dictionary
from hexray.features.train import Harvest, TrainOptions, evaluate, harvest, train_dictionary
from hexray.features.tuned_lens import lens_kl, train_tuned_lens

IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def pack(smol):
    """About 12k counted tokens of the default corpus in 64-token contexts: (train, 16 held-out contexts)."""
    full = token_pack(smol, None, context_size=64, max_tokens=12_000)
    return full.split(16)


def every(counted: torch.Tensor, stride: int) -> torch.Tensor:
    """``counted`` [n, ctx] kept at every ``stride``-th position: fewer vocabulary-sized products, the same contexts."""
    return counted & (torch.arange(counted.shape[1]) % stride == stride - 1)


def test_tuned_lens_beats_the_logit_lens_on_early_layers(smol, pack):
    """After 16 SGD steps, the held-out KL (bits) of the tuned lens is below the logit lens's at layers 0-9."""
    train, test = pack
    lens = train_tuned_lens(smol, train.tokens, every(train.counted, 8), steps=16, batch_contexts=4)
    tuned = lens_kl(smol, lens, test.tokens[:8], every(test.counted[:8], 4))
    logit = lens_kl(smol, None, test.tokens[:8], every(test.counted[:8], 4))
    assert tuned.shape == logit.shape == (smol.spec.n_layers + 1,)
    early = slice(0, 10)
    assert (tuned[early] < logit[early]).all(), (tuned[early], logit[early])
    assert logit[early].mean() > 5  # the logit lens reads little from the early stream; the comparison means something
    assert tuned[early].mean() < 0.8 * logit[early].mean()
    assert abs(tuned[-1]) < 1e-3 and abs(logit[-1]) < 1e-3  # the final stream read through the unembedding is the output


@pytest.fixture(scope="module")
def trained(smol, pack, tmp_path_factory):
    """A 512-latent topk SAE at resid.6, trained on the slice; (dictionary, its folder, quality, an untrained copy's quality)."""
    train, test = pack
    opts = TrainOptions(site=DictSite("resid", 6), arch="topk", latents=512, k=16, tokens=train.n_tokens, batch_tokens=256, epochs=4, seed=0)
    data = harvest(smol, opts.site, train.tokens, train.counted)
    one_batch = Harvest(data.x[:256], data.y[:256], 0.0)
    untrained, _ = train_dictionary(smol, replace(opts, epochs=1), one_batch)  # one step: barely past its initialisation
    d, finished = train_dictionary(smol, opts, data)
    assert finished
    folder = tmp_path_factory.mktemp("dicts") / "resid.6"
    save_dictionary(d, folder, spec=smol.spec)
    return d, folder, evaluate(smol, d, test.tokens, test.counted), evaluate(smol, untrained, test.tokens, test.counted)


def test_training_lowers_fvu_on_real_activations(trained):
    d, _, quality, before = trained
    assert quality.fvu < 0.5 * before.fvu, (quality.fvu, before.fvu)
    assert quality.fvu < 0.5
    assert quality.l0 == pytest.approx(16, abs=0.01)  # topk: exactly k active per token
    assert quality.loss_clean < quality.loss_spliced < quality.loss_zero  # splicing costs less than removing the site
    assert 0 < quality.loss_recovered <= 1
    norms = d.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-4, rtol=0)


def test_feature_attribution_on_ioi_adds_up(smol, trained):
    """The IOI logit of ' Mary' split with resid.6 replaced by features + error + bias: the parts sum to the logit."""
    d = trained[0]
    target = smol.single_token(" Mary")
    trace = hexray.run_trace(smol, IOI, attribution_hooks(smol.spec, "head") | dictionary_hooks(smol.spec, [d]))
    plain = direct_logit_attribution(smol, trace, target=target, granularity="head")
    split = feature_attribution(smol, trace, plain, [d])
    kinds = {c.component.kind for c in split.components}
    assert {"feature", "error", "bias"} <= kinds
    assert not any(c.component.kind == "head" and c.component.layer < 6 for c in split.components)  # everything before block 6 became features
    total = sum(c.score for c in split.components)
    assert total == pytest.approx(plain.value, abs=1e-3)
    assert split.value == pytest.approx(float(trace.logits[-1, target]), abs=1e-3)
    per_token = token_features(smol, trace, d, k=5)
    assert len(per_token.top) == trace.n_tokens
    assert all(len(row) <= 5 for row in per_token.top)


def test_cli_features_and_patching_with_a_trained_dictionary(cli_json, trained):
    """hexray features --dict FOLDER and hexray patch --dict FOLDER --method attribution on the IOI pair."""
    folder = trained[1]
    doc = cli_json("features", "--prompt", IOI, "--dict", folder)
    (f,) = doc["features"]
    assert len(f["tokens"]) == len(doc["tokens"])
    assert any(row["features"] for row in f["tokens"])
    patched = cli_json("patch", "--clean", IOI, "--corrupt", "When Mary and John went to the store, Mary gave a drink to",
                       "--method", "attribution", "--sweep", "resid,features", "--dict", folder)
    rows = [r for r in patched["results"] if r["sweep"] == "features"]
    assert len(rows) == 512 and {r["site"] for r in rows} == {"resid"}
    assert max(abs(r["score"]) for r in rows) > 0.01
