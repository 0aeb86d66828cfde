"""Automatic labels: rules read off the top examples, scored by their correlation with held-out
activations, checked against numpy on the same numbers and against a brute-force capture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hexray.corpus.packs import token_pack
from hexray.neuroscope import labels
from hexray.neuroscope.index import build_index, open_index, split_held_out
from hexray.neuroscope.pages import unit_page
from hexray.tracing.engine import capture
from tests.conftest import CORPUS

CTX = 16


def test_the_scorer_equals_numpy_correlations():
    g = torch.Generator().manual_seed(0)
    B, P, U, V = 3, 7, 5, 11
    tokens = torch.randint(0, V, (B, P), generator=g)
    acts = torch.randn(B, P, U, generator=g).relu()
    counted = torch.rand(B, P, generator=g) > 0.2
    on = torch.tensor([[1, 2, -1], [3, -1, -1], [4, 5, 6], [-1, -1, -1], [0, -1, -1]])
    after = torch.tensor([[7, -1, -1], [8, 9, -1], [-1, -1, -1], [10, -1, -1], [1, 2, 3]])
    scorer = labels.Scorer(labels.Rules(on, after), V, "cpu")
    scorer.update(acts[:2], tokens[:2], counted[:2])
    scorer.update(acts[2:], tokens[2:], counted[2:])  # two batches sum as one
    got = scorer.correlations()

    previous = np.concatenate([np.full((B, 1), -1), tokens[:, :-1].numpy()], axis=1)
    mask = counted.numpy()
    for kind, ids, seen in (("on", on, tokens.numpy()), ("after", after, previous)):
        for u in range(U):
            rule = [t for t in ids[u].tolist() if t >= 0]
            fires = np.isin(seen, rule)[mask].astype(float)
            a = acts[..., u].numpy()[mask]
            want = math.nan if fires.std() == 0 or a.std() == 0 else np.corrcoef(a, fires)[0, 1]
            if math.isnan(want):
                assert math.isnan(got[kind][u])
            else:
                assert got[kind][u].item() == pytest.approx(want, abs=1e-5)


def test_rules_name_the_tokens_covering_half_the_top_examples():
    P = 4
    contexts = np.array([[0, 5, 6, 5], [0, 7, 5, 8], [0, 9, 9, 9]])  # context -> token ids

    def gidx(c, p):
        return c * P + p

    top = torch.tensor([
        [gidx(0, 1), gidx(0, 3), gidx(1, 2), gidx(1, 3)],  # tokens 5, 5, 5, 8: 5 alone covers 3 of 4
        [gidx(1, 1), gidx(2, 1), gidx(2, 2), gidx(2, 3)],  # tokens 7, 9, 9, 9: 9 covers 3 of 4; previous tokens 0, 0, 9, 9 (0 seen first)
        [torch.iinfo(torch.int64).max] * 4,  # a unit that never fired
    ])
    rules = labels.propose(top, lambda cs: contexts[cs], P)
    assert rules.on[0].tolist() == [5, -1, -1] and rules.on[1].tolist() == [9, -1, -1]
    assert rules.after[1].tolist() == [0, -1, -1]  # 0 (ahead of 9 in a tie) already covers half
    assert rules.on[2].tolist() == [-1, -1, -1]
    chosen = labels.choose(rules, {"on": torch.tensor([0.9, 0.1, math.nan]), "after": torch.tensor([0.2, 0.5, math.nan])}, lambda t: f"t{t}")
    assert chosen[0].text == '"t5"' and chosen[0].rule == "on" and chosen[0].score == pytest.approx(0.9)
    assert chosen[1].rule == "after" and chosen[1].score == pytest.approx(0.5)
    assert chosen[2] is None


def test_every_stored_label_scores_as_a_brute_force_correlation_on_the_held_out_text(tiny_gpt2, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(CORPUS * 3):
        (folder / f"{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    both = token_pack(tiny_gpt2, folder, context_size=CTX)
    pack, held_out = split_held_out(both, int(both.n_tokens * 0.7))
    assert held_out is not None and pack.n_tokens == int(both.n_tokens * 0.7)
    out = tmp_path / "index.duckdb"
    build_index(tiny_gpt2, pack, "neurons", out, top_k=5, window=(2, 1), batch_contexts=8, held_out=held_out)

    layer = 1
    hook = f"blocks.{layer}.mlp.hook_post"
    _, acts = capture(tiny_gpt2, held_out.tokens.tolist(), [hook])
    a = torch.stack([row[hook] for row in acts]).numpy()  # [n, P, d_mlp]
    mask = held_out.counted.numpy()
    tokens = held_out.tokens.numpy()
    previous = np.concatenate([np.full((tokens.shape[0], 1), -1), tokens[:, :-1]], axis=1)
    checked = 0
    with open_index(out, tiny_gpt2.spec) as index:
        for n in range(0, tiny_gpt2.spec.d_mlp, 7):
            page = unit_page(index, f"L{layer}N{n}")
            if not page.top:
                assert page.label is None
                continue
            label = page.label
            centre = {e.token_ids[e.position - e.window_start] for e in page.top}
            if label.rule == "on":
                assert set(label.tokens) <= centre
            fires = np.isin(tokens if label.rule == "on" else previous, list(label.tokens))[mask].astype(float)
            unit = a[..., n][mask]
            if fires.std() == 0 or unit.std() == 0:
                assert math.isnan(label.score)
                continue
            assert label.score == pytest.approx(np.corrcoef(unit, fires)[0, 1], abs=1e-4)
            checked += 1
    assert checked >= 5


class RecordingExplainer:
    """Labels a unit by its top example's token, predicts 1.0 on that token: and records what it was asked."""

    name = "recorder"

    def __init__(self):
        self.asked = []

    def explain(self, page) -> str:
        return page.top[0].token if page.top else "nothing"

    def simulate(self, label: str, tokens):
        self.asked.append((label, list(tokens)))
        return [1.0 if t == label else 0.0 for t in tokens]


def test_a_users_explainer_is_scored_on_held_out_windows_and_stored(tiny_gpt2, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(CORPUS * 3):
        (folder / f"{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    pack, held_out = split_held_out(token_pack(tiny_gpt2, folder, context_size=CTX), 700)
    out = tmp_path / "index.duckdb"
    build_index(tiny_gpt2, pack, "neurons", out, top_k=5, window=(2, 1), batch_contexts=8, held_out=held_out)
    explainer = RecordingExplainer()
    names = ["L0N3", "L1N5", "L1N9"]
    got = labels.explain_units(out, tiny_gpt2, explainer, names, held_out, windows=6)
    assert len(explainer.asked) == 3 * 6

    # the reference: each window's real activations, captured again, against what simulate() said
    strings = {tuple(tiny_gpt2.token_str(int(t)) for t in row): c for c, row in enumerate(held_out.tokens)}
    for n, (name, label) in enumerate(zip(names, got)):
        layer, neuron = int(name[1]), int(name.split("N")[1])
        hook = f"blocks.{layer}.mlp.hook_post"
        predicted, actual = [], []
        for said, tokens in explainer.asked[6 * n : 6 * n + 6]:
            c = strings[tuple(tokens)]
            _, acts = capture(tiny_gpt2, [held_out.tokens[c].tolist()], [hook])
            keep = held_out.counted[c].tolist()
            predicted += [1.0 if t == said else 0.0 for t, k in zip(tokens, keep) if k]
            actual += [float(v) for v, k in zip(acts[0][hook][:, neuron].tolist(), keep) if k]
        want = labels.pearson(predicted, actual)
        assert (math.isnan(label.score) and math.isnan(want)) or label.score == pytest.approx(want, abs=1e-5)
        assert label.source == "recorder"

    with open_index(out, tiny_gpt2.spec) as index:
        page = unit_page(index, "L1N5")
        assert {x.source for x in page.labels} == {"auto", "recorder"}
    labels.explain_units(out, tiny_gpt2, explainer, ["L1N5"], held_out, windows=6)  # again: replaces its own label, keeps the automatic one
    with open_index(out, tiny_gpt2.spec) as index:
        assert sorted(x.source for x in unit_page(index, "L1N5").labels) == ["auto", "recorder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "index.duckdb"]


def test_hexray_index_label_runs_a_users_explainer_module(cli, tiny_gpt2, tmp_path, monkeypatch):
    import json
    import sys

    from tests.helpers import assert_one_line_error

    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "my_explainers.py").write_text(
        "class Echo:\n    name = 'echo'\n    def explain(self, page):\n        return page.top[0].token if page.top else '-'\n"
        "    def simulate(self, label, tokens):\n        return [float(t == label) for t in tokens]\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 4), encoding="utf-8")
    built = cli(tiny_gpt2, "index", "build", "--corpus", corpus, "--tokens", "300", "--context-size", "16", "--label-tokens", "0")
    assert built.code == 0, built.err
    r = cli(tiny_gpt2, "index", "label", "--explainer", "my_explainers:Echo", "--units", "L0N1,L1N2", "--corpus", corpus, "--held-out-tokens", "200", "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)["labels"]
    assert [x["unit"] for x in rows] == ["L0N1", "L1N2"] and all(x["source"] == "echo" for x in rows)
    page = json.loads(cli(tiny_gpt2, "neuron", "L1N2", "--json").out)
    assert [x["source"] for x in page["labels"]] == ["echo"]  # --label-tokens 0: no automatic label
    assert_one_line_error(cli(tiny_gpt2, "index", "label", "--explainer", "nowhere:Nothing", "--units", "L0N1"), "--explainer")
    assert_one_line_error(cli(tiny_gpt2, "index", "label", "--explainer", "my_explainers:Echo", "--units", "L0N9999", "--corpus", corpus), "L0N9999")
    del sys.modules["my_explainers"]
