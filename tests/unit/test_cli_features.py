"""``hexray dict train|list|defaults``, ``hexray lens train`` and ``hexray features`` in-process on the tiny models.

``hexray.cli.load_model`` hands back an already-loaded tiny model (the ``cli`` fixture); each test has
its own cache (``HEXRAY_CACHE``), so ``dict list`` shows exactly what the test saved. Expected
features and logits come from a plain transformers forward and the dictionary maths by hand
(tests/unit/test_features.py), not from HexRay.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import hexray.cli
from hexray.features.build import checkpoint_path
from hexray.features.formats import load_dictionary, save_dictionary
from tests.helpers import assert_one_line_error
from tests.unit.test_features import (  # noqa: F401 - _one_thread is an autouse fixture here too
    CTX,
    PlainModel,
    _one_thread,
    assert_same_weights,
    corpus_file,
    dictionary_at,
    hand_encode,
    tiny_llama_hf,
)

PROMPT = "When Mary and John went to the store, John gave a drink to"
TRAIN = ["--latents", "32", "--k", "4", "--tokens", "640", "--batch-tokens", "64", "--held-out", "64", "--context-size", str(CTX), "--epochs", "2"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("HEXRAY_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def plain(tiny_llama) -> PlainModel:
    return PlainModel(tiny_llama_hf(tiny_llama))


def run_json(cli, model, *args) -> dict:
    """One JSON line on stdout, nothing on stderr."""
    r = cli(model, *args, "--json")
    assert r.code == 0, r.err
    assert r.err == ""
    assert r.out.endswith("\n") and r.out.count("\n") == 1
    return json.loads(r.out)


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def dictionaries_in(cache: Path) -> set[str]:
    """Everything under the cache's dictionaries folder (the corpus cache aside)."""
    return tree(cache / "dictionaries")


QUALITY_KEYS = {"tokens", "fvu", "l0", "dead_pct", "loss_clean", "loss_spliced", "loss_zero", "loss_recovered"}


# ---------------------------------------------------------------------------------------------
# dict train, dict list, features: the happy path
# ---------------------------------------------------------------------------------------------


def test_dict_train_saves_into_the_cache_and_lists_it(cli, tiny_llama, cache, tmp_path):
    corpus = corpus_file(tmp_path)
    doc = run_json(cli, tiny_llama, "dict", "train", "--site", "resid.1", *TRAIN, "--corpus", corpus)
    folder = cache / "dictionaries" / "tiny-llama0" / "resid.1"  # <cache>/dictionaries/<model>/<site>
    assert set(doc) == {"dictionary", "site", "arch", "latents", "k", "quality", "seconds"}
    assert (doc["dictionary"], doc["site"], doc["arch"], doc["latents"], doc["k"]) == (str(folder), "resid.1", "topk", 32, 4)
    assert set(doc["quality"]) == QUALITY_KEYS and set(doc["seconds"]) == {"harvest", "train", "evaluate"}
    assert doc["quality"]["l0"] <= 4 and 0 < doc["quality"]["fvu"] < 1
    assert dictionaries_in(cache) == {"tiny-llama0", "tiny-llama0/resid.1", *(f"tiny-llama0/resid.1/{p.name}" for p in folder.iterdir())}
    d = load_dictionary(folder)
    assert (d.site.label, d.d_sae, d.k, d.model_name, d.kind) == ("resid.1", 32, 4, tiny_llama.name, "sae")
    assert d.meta["quality"] == pytest.approx(doc["quality"])

    listed = run_json(cli, None, "dict", "list")
    assert listed == {"dictionaries": [{"name": "tiny-llama0/resid.1", "model": tiny_llama.name, "site": "resid.1", "kind": "sae (topk)",
                                        "latents": 32, "k": 4, "quality": pytest.approx(doc["quality"])}]}
    table = cli(None, "dict", "list")
    assert table.code == 0 and table.err == ""
    row = next(line for line in table.out.splitlines() if "tiny-llama0/resid.1" in line)
    assert "sae (topk)" in row and f"{doc['quality']['fvu']:.3f}" in row


def test_dict_list_with_nothing_saved(cli, cache):
    assert run_json(cli, None, "dict", "list") == {"dictionaries": []}
    r = cli(None, "dict", "list")
    assert r.code == 0 and "no dictionaries yet" in r.out


def test_dict_train_a_skip_transcoder_to_a_folder_and_refuse_to_overwrite_it(cli, tiny_llama, cache, tmp_path):
    corpus, out = corpus_file(tmp_path), tmp_path / "mine" / "tc"
    args = ("dict", "train", "--site", "mlp.1", "--arch", "skip-transcoder", *TRAIN, "--corpus", corpus, "--out", out)
    doc = run_json(cli, tiny_llama, *args)
    assert doc["dictionary"] == str(out) and doc["arch"] == "skip-transcoder"
    first = load_dictionary(out)
    assert first.kind == "skip-transcoder" and first.site.label == "mlp.1"
    assert dictionaries_in(cache) == set()  # nothing in the cache when --out is given

    again = cli(tiny_llama, *args, "--seed", "1")
    assert_one_line_error(again, "already holds a dictionary")
    assert "--force" in again.err
    assert_same_weights(load_dictionary(out), first)  # untouched
    forced = run_json(cli, tiny_llama, *args, "--seed", "1", "--force")
    assert forced["dictionary"] == str(out)
    assert not torch.equal(load_dictionary(out).W_dec, first.W_dec)  # replaced by the new run


def test_dict_train_text_output(cli, tiny_llama, cache, tmp_path):
    out = tmp_path / "d"
    r = cli(tiny_llama, "dict", "train", "--site", "mlp_out.0", "--arch", "batchtopk", *TRAIN, "--corpus", corpus_file(tmp_path), "--out", out, "-q")
    assert r.code == 0, r.err
    assert "Dictionary quality on held-out text" in r.out and f"Saved {out}/" in r.out.replace("\n", "")
    assert load_dictionary(out).architecture == "batchtopk"


def test_features_json_matches_a_hand_encode_and_conserves(cli, tiny_llama, plain, cache, tmp_path):
    d = dictionary_at(tiny_llama, plain, "resid.1", "topk")
    folder = save_dictionary(d, cache / "dictionaries" / "tiny-llama0" / "resid.1", spec=tiny_llama.spec)
    doc = run_json(cli, tiny_llama, "features", "--dict", "resid.1", "--prompt", PROMPT, "--k", "3", "-k", "100")  # a model default, by name
    by_folder = run_json(cli, tiny_llama, "features", "--dict", str(folder), "--prompt", PROMPT, "--k", "3", "-k", "100")  # or by folder
    assert by_folder["components"] == doc["components"] and by_folder["features"][0]["tokens"] == doc["features"][0]["tokens"]

    ids = tiny_llama.encode(PROMPT)
    logits, acts = plain.run(ids)
    a = hand_encode(d, acts["resid.1"][0])
    assert doc["token_ids"] == ids and doc["granularity"] == "head"
    (features,) = doc["features"]
    assert (features["dictionary"], features["site"]) == ("resid.1", "resid.1")
    assert [t["position"] for t in features["tokens"]] == list(range(len(ids)))
    for p, row in enumerate(features["tokens"]):
        want = sorted(((float(a[p, f]), f) for f in torch.nonzero(a[p]).flatten().tolist()), reverse=True)[:3]
        assert [(x["feature"], x["label"]) for x in row["features"]] == [(f, f"L1F{f}") for _, f in want]
        assert [x["activation"] for x in row["features"]] == pytest.approx([v for v, _ in want], abs=1e-5)
        assert row["l0"] == int((a[p] > 0).sum()) and set(row) == {"position", "token", "l0", "relative_error", "features"}

    # the attribution: the stream entering block 1 split into features and error; everything sums to the real logit
    target = int(logits[0, -1].argmax())
    assert doc["target"]["id"] == target and doc["value"] == pytest.approx(float(logits[0, -1, target]), abs=1e-4)
    names = {c["name"] for c in doc["components"]}
    assert "ERR1" in names and {f"L1F{f}" for f in torch.nonzero(a[-1]).flatten().tolist()} <= names
    assert not names & {"embed", "L0H0", "L0H1", "L0H2", "L0H3", "MLP0"}  # rebuilt by the dictionary
    assert sum(c["score"] for c in doc["components"]) == pytest.approx(doc["value"], abs=1e-4)
    assert all(c["site"] == "resid" for c in doc["components"] if c["kind"] in ("feature", "error"))


def test_trace_dict_switch_adds_the_features_section(cli, tiny_llama, plain, cache, tmp_path):
    d = dictionary_at(tiny_llama, plain, "mlp.0", "relu", skip=True)
    folder = save_dictionary(d, tmp_path / "tc", spec=tiny_llama.spec)
    plain_doc = run_json(cli, tiny_llama, "trace", "--prompt", PROMPT, "-k", "100", "--granularity", "layer")
    doc = run_json(cli, tiny_llama, "trace", "--prompt", PROMPT, "-k", "100", "--granularity", "layer", "--dict", folder)
    assert "features" not in plain_doc and [f["site"] for f in doc["features"]] == ["mlp.0"]
    kinds = {(c["kind"], c["layer"]) for c in doc["components"]}
    assert ("mlp", 0) not in kinds and {("error", 0), ("skip", 0), ("mlp", 1)} <= kinds
    assert sum(c["score"] for c in doc["components"]) == pytest.approx(doc["value"], abs=1e-4)
    assert doc["value"] == pytest.approx(plain_doc["value"], abs=1e-6)
    text = cli(tiny_llama, "trace", "--prompt", PROMPT, "--dict", folder)
    assert text.code == 0 and "Top features per token" in text.out and "skip  L0" in text.out


# ---------------------------------------------------------------------------------------------
# interrupting and resuming a CLI run
# ---------------------------------------------------------------------------------------------


def test_an_interrupted_dict_train_writes_nothing_and_resumes(cli, tiny_llama, cache, tmp_path, monkeypatch):
    corpus, out = corpus_file(tmp_path), tmp_path / "dicts" / "resid.1"
    args = ("dict", "train", "--site", "resid.1", *TRAIN, "--corpus", corpus, "--out", out)
    real = hexray.cli._training_progress

    @contextmanager
    def ctrl_c_at_step_3(quiet):  # what the SIGINT handler does: ask the run to stop at the next step
        state = {"stop": False}

        def stage(name, done, total, detail):
            state["stop"] |= name == "train" and done >= 3

        yield stage, lambda: state["stop"]

    monkeypatch.setattr(hexray.cli, "_training_progress", ctrl_c_at_step_3)
    r = cli(tiny_llama, *args)
    assert r.code == 130 and r.out == "" and "Traceback" not in r.err
    assert f"--resume continues from {checkpoint_path(out)}" in r.err.replace("\n", "") and "nothing was written" in r.err
    assert tree(out.parent) == {".resid.1.partial", ".resid.1.partial/checkpoint.pt"}

    monkeypatch.setattr(hexray.cli, "_training_progress", real)
    resumed = run_json(cli, tiny_llama, *args, "--resume")
    assert resumed["dictionary"] == str(out) and not checkpoint_path(out).parent.exists()
    fresh = run_json(cli, tiny_llama, "dict", "train", "--site", "resid.1", *TRAIN, "--corpus", corpus, "--out", tmp_path / "fresh")
    assert_same_weights(load_dictionary(out), load_dictionary(fresh["dictionary"]))


# ---------------------------------------------------------------------------------------------
# lens train, dict defaults
# ---------------------------------------------------------------------------------------------


def test_lens_train_json_and_refusal(cli, tiny_llama, cache, tmp_path):
    corpus, out = corpus_file(tmp_path), tmp_path / "lens"
    args = ("lens", "train", "--steps", "3", "--batch-contexts", "2", "--context-size", str(CTX), "--held-out", "32", "--corpus", corpus, "--out", out)
    doc = run_json(cli, tiny_llama, *args)
    assert set(doc) == {"model", "held_out_kl_bits", "seconds"} and doc["model"] == tiny_llama.name
    kl = doc["held_out_kl_bits"]
    assert set(kl) == {"tuned", "logit"} and len(kl["tuned"]) == len(kl["logit"]) == tiny_llama.spec.n_layers + 1
    assert kl["logit"][-1] == pytest.approx(0.0, abs=1e-6) and all(x >= 0 for x in kl["tuned"] + kl["logit"])
    assert out.is_dir() and any(out.iterdir())
    assert_one_line_error(cli(tiny_llama, *args), "already holds a tuned lens")
    assert_one_line_error(cli("no-load", "lens", "train", "--steps", "0"), "--steps must be at least 1")


def test_dict_defaults_needs_the_embedded_model(cli, tiny_llama, cache):
    assert_one_line_error(cli(tiny_llama, "dict", "defaults"), "has no default dictionaries")
    assert dictionaries_in(cache) == set()


# ---------------------------------------------------------------------------------------------
# mistakes: one line, exit 2, nothing left behind
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--site", "resid.1", "--latents", "32", "--k", "32"], "--k must be between 1 and --latents - 1 (31), got 32"),
        (["--site", "resid.1", "--latents", "32", "--k", "0"], "--k must be between 1"),
        (["--site", "resid.1", "--latents", "1", "--k", "1"], "--latents must be at least 2"),
        (["--site", "resid.1", "--arch", "jumprelu"], "unknown architecture 'jumprelu'"),
        (["--site", "resid.1", "--epochs", "0"], "--epochs must be at least 1"),
        (["--site", "resid.1", "--batch-tokens", "0"], "--batch-tokens must be at least 1"),
    ],
)
def test_dict_train_refuses_before_loading_the_model(cli, cache, tmp_path, args, expected):
    r = cli("no-load", "dict", "train", *args, "--out", tmp_path / "out")
    assert_one_line_error(r, expected)
    assert not (tmp_path / "out").exists() and dictionaries_in(cache) == set()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--site", "resid.1", "--arch", "transcoder"], "its site is mlp.L, not resid.1"),
        (["--site", "mlp.0", "--arch", "topk"], "needs --arch transcoder or skip-transcoder"),
        (["--site", "resid.7"], "--site: layer 7 is out of range"),
        (["--site", "blocks.0.attn.hook_z"], "--site: unknown site"),
        (["--site", "resid.1", "--latents", "32", "--k", "4", "--tokens", "10", "--batch-tokens", "64"], "--tokens must be at least the batch (64 tokens), got 10"),
    ],
)
def test_dict_train_refuses_a_bad_site_or_budget(cli, tiny_llama, cache, tmp_path, args, expected):
    out = tmp_path / "out"
    r = cli(tiny_llama, "dict", "train", *args, "--corpus", corpus_file(tmp_path), "--context-size", str(CTX), "--out", out)
    assert_one_line_error(r, expected)
    assert tree(tmp_path) == {"corpus.jsonl"} and dictionaries_in(cache) == set()


def test_dict_train_on_an_empty_corpus_folder(cli, tiny_llama, cache, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "dicts" / "resid.1"
    r = cli(tiny_llama, "dict", "train", "--site", "resid.1", *TRAIN, "--corpus", tmp_path / "empty", "--out", out)
    assert_one_line_error(r, "--corpus")
    assert "holds no" in r.err
    assert not out.parent.exists() and dictionaries_in(cache) == set()  # no folder, no checkpoint


def test_dict_train_on_a_corpus_too_small_to_split(cli, tiny_llama, cache, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("The cat sat.", encoding="utf-8")
    out = tmp_path / "dicts" / "resid.1"
    r = cli(tiny_llama, "dict", "train", "--site", "resid.1", *TRAIN, "--corpus", tiny, "--out", out)
    assert_one_line_error(r, "too few to train and measure on")
    assert not out.parent.exists()


def test_dict_train_on_a_corpus_smaller_than_one_batch(cli, tiny_llama, cache, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("The cat sat on the mat. The dog ran in the park. " * 8, encoding="utf-8")
    out = tmp_path / "dicts" / "resid.1"
    r = cli(tiny_llama, "dict", "train", "--site", "resid.1", "--latents", "32", "--k", "4", "--context-size", str(CTX), "--held-out", "16",
            "--corpus", small, "--out", out)  # --tokens left at its default; --batch-tokens 1024 is more than the corpus holds
    assert r.code == 2 and r.out == "" and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
    assert not out.exists() and not checkpoint_path(out).parent.exists()


def test_a_corpus_smaller_than_one_batch_is_blamed_on_the_corpus(cli, tiny_llama, cache, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("The cat sat on the mat. The dog ran in the park. " * 8, encoding="utf-8")
    r = cli(tiny_llama, "dict", "train", "--site", "resid.1", "--latents", "32", "--k", "4", "--context-size", str(CTX), "--held-out", "16",
            "--corpus", small, "--out", tmp_path / "out")
    assert r.code == 2
    assert "--tokens" not in r.err and ("corpus" in r.err or "--batch-tokens" in r.err), r.err


def _saved(tiny_llama, plain, folder: Path, **changes) -> Path:
    import dataclasses

    d = dictionary_at(tiny_llama, plain, "resid.1", "topk")
    return save_dictionary(dataclasses.replace(d, **changes), folder)


def test_features_refuses_an_unknown_dictionary(cli, tiny_llama, cache):
    r = cli(tiny_llama, "features", "--dict", "no-such-dictionary", "--prompt", PROMPT)
    assert_one_line_error(r, "no dictionary 'no-such-dictionary'")


def test_features_refuses_a_dictionary_of_another_model(cli, tiny_llama, plain, cache, tmp_path):
    folder = _saved(tiny_llama, plain, tmp_path / "other", model_name="someone/another-model")
    assert_one_line_error(cli(tiny_llama, "features", "--dict", folder, "--prompt", PROMPT), "was trained for someone/another-model")


def test_features_refuses_a_dictionary_of_another_width(cli, tiny_llama, cache, tmp_path):
    from hexray.features.dictionary import Dictionary, DictSite

    g = torch.Generator().manual_seed(0)
    narrow = Dictionary(DictSite("resid", 1), "topk", torch.randn(16, 24, generator=g), torch.zeros(24), torch.randn(24, 16, generator=g), torch.zeros(16),
                        tiny_llama.name, k=4)
    folder = save_dictionary(narrow, tmp_path / "narrow")
    assert_one_line_error(cli(tiny_llama, "features", "--dict", folder, "--prompt", PROMPT), "16 -> 16 wide")


def test_features_refuses_a_truncated_weights_file(cli, tiny_llama, plain, cache, tmp_path):
    folder = _saved(tiny_llama, plain, tmp_path / "torn")
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = cli(tiny_llama, "features", "--dict", folder, "--prompt", PROMPT)
    assert_one_line_error(r, "sae_weights.safetensors")


def test_features_needs_a_prompt(cli, cache):
    assert_one_line_error(cli("no-load", "features", "--dict", "resid.1"), "--prompt")


def test_features_k_must_be_positive(cli, tiny_llama, plain, cache, tmp_path):
    folder = _saved(tiny_llama, plain, tmp_path / "d")
    assert_one_line_error(cli(tiny_llama, "features", "--dict", folder, "--prompt", PROMPT, "--k", "0"), "must be positive, got 0")


def test_features_k_error_names_the_flag_given(cli, tiny_llama, plain, cache, tmp_path):
    folder = _saved(tiny_llama, plain, tmp_path / "d")
    r = cli(tiny_llama, "features", "--dict", folder, "--prompt", PROMPT, "--k", "0")
    assert "--k must be" in r.err, r.err
