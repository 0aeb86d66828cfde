"""Dataset-level runs (``--prompts FILE``, ``/api/*/set``): the mean over the set equals the mean of single runs.

The reference is each prompt run on its own through the single-prompt path (one unbatched
forward pass per prompt); the dataset path batches prompts of different lengths together.
"""

from __future__ import annotations

import json
import statistics

import pytest
from fastapi.testclient import TestClient

from hexray.analysis.dataset import dataset_attribution
from hexray.analysis.report import AnalysisOptions, analyze
from hexray.errors import HexRayError
from hexray.intervene.ablation import AblateOptions, ablate
from hexray.intervene.dataset import dataset_ablation, dataset_patching
from hexray.intervene.patching import PatchOptions, activation_patching
from hexray.server.app import create_app

PROMPTS = [  # different lengths, so the batch pads
    "When Mary and John went to the store, John gave a drink to",
    "The cat sat on the mat and the dog",
    "One two three four",
    "Mary said that John",
]
PAIRS = [
    {"clean": "John said that Mary", "corrupt": "Mary said that John"},
    {"clean": "Mary said that John", "corrupt": "John said that Mary"},  # one template: positions line up
]


def _tokens(model, k: int = 2) -> list[str]:
    return [t for t in (" Mary", " John", " the", " a", " dog", " cat") if len(model.encode(t)) == 1][:k]


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_trace_set_is_the_mean_of_single_runs(tiny_model, granularity):
    options = AnalysisOptions(granularity=granularity)
    got = dataset_attribution(tiny_model, [{"prompt": p} for p in PROMPTS], options, batch_size=3)  # chunks of 3 and 1
    singles = [analyze(tiny_model, p, options).attribution for p in PROMPTS]
    assert [o.target.id for o in got.prompts] == [a.target.id for a in singles]
    assert got.value.mean == pytest.approx(statistics.mean(a.value for a in singles), abs=1e-4)
    assert got.value.std == pytest.approx(statistics.stdev(a.value for a in singles), abs=1e-4)
    by_name = {c.name: c.score for c in got.components}
    assert len(by_name) == len(singles[0].components)
    for c in singles[0].components:
        values = [a.score_of(c.name) for a in singles]
        assert by_name[c.name].mean == pytest.approx(statistics.mean(values), abs=1e-4)
        assert by_name[c.name].std == pytest.approx(statistics.stdev(values), abs=1e-4)
        assert by_name[c.name].n == len(PROMPTS)
    means = [abs(c.score.mean) for c in got.components]
    assert means == sorted(means, reverse=True)


def test_trace_set_rows_override_target(tiny_model):
    target = _tokens(tiny_model, 1)[0]
    rows = [{"prompt": PROMPTS[0], "target": target}, {"prompt": PROMPTS[1]}]
    got = dataset_attribution(tiny_model, rows, AnalysisOptions())
    assert got.prompts[0].target.token == target
    assert got.prompts[1].target.id == analyze(tiny_model, PROMPTS[1]).attribution.target.id


def test_patch_set_is_the_mean_of_single_runs(tiny_model):
    target, contrast = _tokens(tiny_model)
    options = PatchOptions(target=target, contrast=contrast, sweeps="heads,resid")
    got = dataset_patching(tiny_model, PAIRS, options)
    singles = [activation_patching(tiny_model, r["clean"], r["corrupt"], target=target, contrast=contrast, sweeps="heads,resid") for r in PAIRS]
    assert len(got.sites) == len(singles[0].results)
    for spread, *rows in zip(got.sites, *(s.results for s in singles)):
        assert all(r.site == spread.site and r.sweep == spread.sweep for r in rows)
        assert spread.score.mean == pytest.approx(statistics.mean(r.score for r in rows), abs=1e-4)
        assert spread.score.std == pytest.approx(statistics.stdev(r.score for r in rows), abs=1e-4)


def test_patch_set_per_position_needs_one_length(tiny_model):
    target, contrast = _tokens(tiny_model)
    rows = [PAIRS[0], {"clean": "The cat saw the dog", "corrupt": "The dog saw the cat"}]
    if len(tiny_model.encode(rows[1]["clean"])) == len(tiny_model.encode(PAIRS[0]["clean"])):
        pytest.skip("the two templates tokenize to one length here")
    with pytest.raises(HexRayError, match="same length"):
        dataset_patching(tiny_model, rows, PatchOptions(target=target, contrast=contrast, sweeps="resid"))
    assert dataset_patching(tiny_model, rows, PatchOptions(target=target, contrast=contrast, sweeps="heads")).sites


def test_ablate_set_is_the_mean_of_single_runs(tiny_model):
    target, contrast = _tokens(tiny_model)
    options = AblateOptions(target=target, contrast=contrast)
    got = dataset_ablation(tiny_model, [{"prompt": p} for p in PROMPTS], "L0H1,MLP1", options)
    singles = [ablate(tiny_model, p, "L0H1,MLP1", target=target, contrast=contrast) for p in PROMPTS]
    assert got.kl.mean == pytest.approx(statistics.mean(s.kl for s in singles), abs=1e-6)
    assert got.p_after.mean == pytest.approx(statistics.mean(s.after.target.prob for s in singles), abs=1e-6)
    changes = [s.after.logit_diff - s.before.logit_diff for s in singles]
    assert got.logit_diff_change.mean == pytest.approx(statistics.mean(changes), abs=1e-5)
    assert got.kl.max > 0


def test_cli_prompts_file(cli, tiny_model, tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("\n".join(PROMPTS[:3]) + "\n\n")
    r = cli(tiny_model, "trace", "--prompts", lines, "--granularity", "head", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["n_prompts"] == 3 and doc["granularity"] == "head"
    expected = dataset_attribution(tiny_model, [{"prompt": p} for p in PROMPTS[:3]], AnalysisOptions(granularity="head"))
    assert doc["value"]["mean"] == pytest.approx(expected.value.mean, abs=1e-5)
    pairs = tmp_path / "pairs.jsonl"
    target, contrast = _tokens(tiny_model)
    pairs.write_text("".join(json.dumps({**p, "target": target, "contrast": contrast}) + "\n" for p in PAIRS))
    r = cli(tiny_model, "patch", "--prompts", pairs, "--sweep", "heads", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["n_pairs"] == 2
    r = cli(tiny_model, "ablate", "--prompts", lines, "-c", "L0H1", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["n_prompts"] == 3
    r = cli(tiny_model, "trace", "--prompts", lines)
    assert r.code == 0 and "mean ± sample std" in r.out, r.err


@pytest.mark.parametrize(
    ("command", "content", "message"),
    [
        (["trace"], None, "no such file"),
        (["trace"], "", "has no prompts"),
        (["patch"], "just a line\n", "line 1 is not a JSON object"),
        (["patch"], '{"clean": "a b"}\n', "line 1 lacks corrupt"),
        (["trace"], '{"prompt": "a", "colour": "red"}\n', "unknown keys colour"),
        (["trace"], '{"prompt": "a", \n', "not valid JSON"),
    ],
)
def test_cli_bad_prompts_file_is_one_line_before_loading(cli, tmp_path, command, content, message):
    path = tmp_path / "set.jsonl"
    if content is not None:
        path.write_text(content)
    r = cli("no-load", *command, "--prompts", path, *(["-c", "L0H1"] if command == ["ablate"] else []))
    assert r.code == 2 and message in r.err and r.err.count("\n") == 1, r.err
    assert "--prompts" in r.err


def test_prompt_and_prompts_together_is_an_error(cli, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hi\n")
    r = cli("no-load", "trace", "--prompt", "hi", "--prompts", path)
    assert r.code == 2 and "not both" in r.err


def test_api_sets(tiny_llama):
    target, contrast = _tokens(tiny_llama)
    with TestClient(create_app(tiny_llama, time_limit=60), base_url="http://127.0.0.1") as client:
        r = client.post("/api/analyze/set", json={"prompts": PROMPTS, "granularity": "layer"})
        assert r.status_code == 200, r.text
        expected = dataset_attribution(tiny_llama, [{"prompt": p} for p in PROMPTS], AnalysisOptions(granularity="layer"))
        assert r.json()["value"]["mean"] == pytest.approx(expected.value.mean, abs=1e-5)
        r = client.post("/api/patch/set", json={"rows": PAIRS, "target": target, "contrast": contrast, "sweep": "heads"})
        assert r.status_code == 200, r.text
        assert r.json()["n_pairs"] == 2
        r = client.post("/api/ablate/set", json={"prompts": PROMPTS[:2], "components": "L0H1"})
        assert r.status_code == 200 and r.json()["n_prompts"] == 2, r.text
        r = client.post("/api/patch/set", json={"rows": [{"clean": "a"}]})
        assert r.status_code == 422 and r.json()["error"] == "rows[0] lacks corrupt", r.text
        r = client.post("/api/analyze/set", json={"prompts": ["ok", ""]})
        assert r.status_code == 422 and r.json()["error"].startswith("prompts[1]"), r.text


def test_dataset_errors_name_the_row(tiny_model):
    with pytest.raises(HexRayError) as info:
        dataset_attribution(tiny_model, [{"prompt": "fine"}, {"prompt": "   "}], AnalysisOptions())
    assert info.value.field == "prompts[1]" and "empty" in info.value.message
