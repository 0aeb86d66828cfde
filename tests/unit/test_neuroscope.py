"""The neuroscope index: top-k, statistics, histogram and samples against a brute-force computation
(neurons, heads, a dictionary's latents), BOS never counted, atomic builds, refusals, look-ups."""

from __future__ import annotations

import math

import pytest
import torch

from hexray.corpus.packs import token_pack
from hexray.errors import HexRayError
from hexray.features.dictionary import Dictionary, DictSite
from hexray.features.formats import save_dictionary
from hexray.neuroscope import stream
from hexray.neuroscope.index import IndexBuildStopped, build_index, open_index, read_info
from hexray.neuroscope.pages import parse_unit, search_position, search_token, unit_page
from hexray.neuroscope.units import activation_fn, head_norms, parse_units
from hexray.tracing import sites
from hexray.tracing.engine import capture
from tests.conftest import CORPUS

CTX = 16
BATCH = 16  # contexts per forward pass: several batches, the last one short
TOP_K = 6
WINDOW = (4, 2)


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """The tiny corpus three times over (repeats give exact ties), one document a file."""
    folder = tmp_path_factory.mktemp("ns-corpus")
    for i, text in enumerate(CORPUS * 3):
        (folder / f"{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def pack(tiny_model, corpus_dir):
    return token_pack(tiny_model, corpus_dir, context_size=CTX)


@pytest.fixture(scope="module")
def gpt2_pack(tiny_gpt2, corpus_dir):
    """For the tests that are about files, not architectures: one model is enough."""
    return token_pack(tiny_gpt2, corpus_dir, context_size=CTX)


@pytest.fixture(scope="module")
def dictionary(tiny_model, tmp_path_factory):
    """A random topk SAE at resid.1, saved so the build loads it by folder name like a user's."""
    g = torch.Generator().manual_seed(0)
    d_model, n = tiny_model.spec.d_model, 48
    W_dec = torch.randn(n, d_model, generator=g)
    d = Dictionary(DictSite("resid", 1), "topk", torch.randn(d_model, n, generator=g) / d_model**0.5, torch.randn(n, generator=g) * 0.1,
                   W_dec, torch.zeros(d_model), tiny_model.name, k=6, name="test-sae")
    return str(save_dictionary(d, tmp_path_factory.mktemp("ns-dict") / "sae", spec=tiny_model.spec))


@pytest.fixture(scope="module")
def built(tiny_model, pack, dictionary, tmp_path_factory):
    out = tmp_path_factory.mktemp("ns-index") / "index.duckdb"
    seen = []
    info = build_index(tiny_model, pack, f"neurons,heads,dict:{dictionary}", out, top_k=TOP_K, window=WINDOW, batch_contexts=BATCH,
                       progress=lambda done, total: seen.append((done, total)))
    return out, info, seen


@pytest.fixture(scope="module")
def brute(tiny_model, pack, dictionary):
    """Every unit's activation at every position [n_contexts, P, units], captured in the build's batches."""
    groups = parse_units(f"neurons,heads,dict:{dictionary}", tiny_model)
    hooks = sorted({g.hook for g in groups})
    per_group = [[] for _ in groups]
    for lo in range(0, pack.n_contexts, BATCH):
        _, acts = capture(tiny_model, pack.tokens[lo : lo + BATCH].tolist(), hooks)
        for i, g in enumerate(groups):
            fn = activation_fn(tiny_model, g)
            with torch.inference_mode():
                per_group[i].append(fn(torch.stack([row[g.hook] for row in acts])))
    return groups, [torch.cat(parts) for parts in per_group]


def expected_unit(acts: torch.Tensor, counted: torch.Tensor, k: int) -> dict:
    """One unit by brute force: acts [n_contexts, P] (a plain sort and plain loops, no streaming)."""
    n, P = acts.shape
    gidx = torch.arange(n * P)
    sampled, priority = stream.is_sampled(gidx).tolist(), stream.priority(gidx).tolist()
    rows = [(v, g) for g, (v, c) in enumerate(zip(acts.reshape(-1).tolist(), counted.reshape(-1).tolist())) if c]
    firing = sorted([r for r in rows if r[0] > 0], key=lambda r: (-r[0], r[1]))
    values = [r[0] for r in rows]
    in_sample = [(v, g) for v, g in rows if sampled[g]]
    bins = stream.histogram_bins(torch.tensor([v for v, _ in in_sample], dtype=torch.float32))
    samples = {}
    for (v, g), b in zip(in_sample, stream.sample_bands(bins).tolist()):
        if b >= 0 and (b not in samples or priority[g] < samples[b][0]):
            samples[b] = (priority[g], g, v)
    return {
        "top": [(g // P, g % P, v) for v, g in firing[:k]],
        "max": firing[0][0] if firing else 0.0,
        "mean": sum(values) / len(values),
        "density": len(firing) / len(values),
        "hist": torch.bincount(bins, minlength=stream.N_BINS).tolist(),
        "samples": {b: (g // P, g % P, v) for b, (_, g, v) in samples.items()},
    }


# ---------------------------------------------------------------------------------------------
# the index equals brute force
# ---------------------------------------------------------------------------------------------


def test_every_unit_equals_a_brute_force_computation(tiny_model, pack, built, brute):
    out, info, _ = built
    groups, acts = brute
    bos = tiny_model.tokenizer.bos_token_id
    assert info.tokens == pack.n_tokens and info.units == {"neuron": 2 * tiny_model.spec.d_mlp, "head": 2 * tiny_model.spec.n_heads, "feature": 48}
    kinds_seen = set()
    with open_index(out, tiny_model.spec) as index:
        for g, a in zip(groups, acts):
            for u in range(g.count):
                page = unit_page(index, g.component(u), dictionary=g.dictionary_name or None)
                want = expected_unit(a[:, :, u], pack.counted, TOP_K)
                assert [(e.context, e.position) for e in page.top] == [t[:2] for t in want["top"]], (page.name, page.top, want["top"])
                assert [e.activation for e in page.top] == [t[2] for t in want["top"]]  # bit for bit: the same activations, in the same order
                assert page.max == pytest.approx(want["max"], abs=0) and page.fired == round(want["density"] * pack.n_tokens)
                assert page.mean == pytest.approx(want["mean"], rel=1e-5, abs=1e-6) and page.density == pytest.approx(want["density"])
                hist = [0] * stream.N_BINS
                hist[0] = page.nonpositive
                for b in page.histogram:
                    hist[stream.bin_edges().index(b.lower)] = b.count
                assert hist == want["hist"]
                got_samples = {int(round(math.log2(e.band[0]))) + 9 if e.band[0] > 0 else 0: (e.context, e.position, e.activation) for e in page.samples}
                assert got_samples == want["samples"]
                for e in (*page.top, *page.samples):
                    assert e.token_ids[e.position - e.window_start] != bos and pack.counted[e.context, e.position]  # BOS never counted
                    assert list(e.context_ids) == pack.tokens[e.context, : e.position + 1].tolist()
                    assert e.acts[e.position - e.window_start] == e.activation
                    window = [float(a[e.context, e.window_start + i, u]) for i in range(len(e.acts)) if pack.counted[e.context, e.window_start + i]]
                    scale = max(abs(v) for v in window)
                    for i, act in enumerate(e.acts):  # the window: the unit's activation at each token (to 1/254 of its largest), nan where not counted
                        p = e.window_start + i
                        assert math.isnan(act) if not pack.counted[e.context, p] else abs(act - float(a[e.context, p, u])) <= scale / 254 + 1e-6
                kinds_seen.add(g.kind)
    assert kinds_seen == {"neuron", "head", "feature"}


def test_head_norms_are_the_norms_of_each_heads_output(tiny_model, pack):
    layer = 1
    _, acts = capture(tiny_model, pack.tokens[:2].tolist(), [sites.head_z(layer)])
    z = acts[0][sites.head_z(layer)]  # [pos, n_heads, d_head]
    direct = torch.einsum("phd,hde->phe", z, tiny_model.W_O[layer]).norm(dim=-1)
    group = parse_units("heads", tiny_model)[layer]
    torch.testing.assert_close(activation_fn(tiny_model, group)(z), direct, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head_norms(z, tiny_model.W_O[layer] @ tiny_model.W_O[layer].transpose(1, 2)), direct, rtol=1e-4, atol=1e-5)


def test_streaming_is_exact_under_ties_batching_and_merging():
    """Model-free: quantised activations full of exact ties; any batching, and merging two halves, give the same result."""
    gen = torch.Generator().manual_seed(0)
    n, P, U, k = 23, 16, 6, 5
    acts = (torch.randn(n, P, U, generator=gen) * 2).round() / 2
    acts[:, :, 3] = torch.where(torch.rand(n, P, generator=gen) < 0.05, 1.5, 0.0)  # sparse, all ties
    acts[:, :, 4] = 0.0  # never fires
    counted = torch.rand(n, P, generator=gen) > 0.1
    counted[:, 0] = False

    def run(parts):
        out = stream.new_running(U, k, P, 3, 2)
        for lo, hi in parts:
            stream.update(out, acts[lo:hi], counted[lo:hi], lo)
        return out

    whole = stream.finish(run([(lo, min(lo + 4, n)) for lo in range(0, n, 4)]))
    for other in (run([(0, n)]), run([(i, i + 1) for i in range(n)]), stream.merge(run([(0, 9)]), run([(9, 15), (15, n)])),
                  stream.merge(run([(9, 15), (15, n)]), run([(0, 9)]))):
        fin = stream.finish(other)
        for f in ("top_val", "top_gidx", "top_win", "hist", "samp_gidx", "samp_val", "samp_win", "fired"):
            assert torch.equal(getattr(fin, f).nan_to_num(-7), getattr(whole, f).nan_to_num(-7)), f
    for u in range(U):
        want = expected_unit(acts[:, :, u], counted, k)
        got = [(int(g) // P, int(g) % P, float(v)) for v, g in zip(whole.top_val[u], whole.top_gidx[u]) if not stream.is_empty(g)]
        assert got == want["top"] and whole.hist[u].tolist() == want["hist"]
    assert whole.max[4] == 0 and whole.density[4] == 0 and stream.is_empty(whole.top_gidx[4]).all()


# ---------------------------------------------------------------------------------------------
# the file: metadata, pages, look-ups
# ---------------------------------------------------------------------------------------------


def test_metadata_progress_and_pages(tiny_model, pack, built, dictionary):
    from hexray import __version__
    from hexray.features.dictionary import model_key

    out, info, seen = built
    assert info.model == tiny_model.name and info.model_key == model_key(tiny_model.name) and info.hexray_version == __version__
    assert info.corpus == pack.source and info.corpus_key == pack.key and info.bos
    assert info.dictionaries == (dictionary,) and info.top_k == TOP_K and info.window == WINDOW
    assert seen[-1] == (pack.n_tokens, pack.n_tokens) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert read_info(out) == info
    with open_index(out, tiny_model.spec) as index:
        for name in ("L1N3", "L0H1", f"{dictionary}:5", "L1F7"):
            page = unit_page(index, name)
            assert page.name in (name, f"{dictionary}:7")
        assert unit_page(index, "L0H1").promoted == ()  # heads have no single output direction
        page = unit_page(index, "L1N3")
        effects = (tiny_model.W_out[1][3] * tiny_model.final_norm[0]) @ tiny_model.W_U
        if tiny_model.spec.norm == "layernorm":
            w = tiny_model.W_out[1][3]
            effects = ((w - w.mean()) * tiny_model.final_norm[0]) @ tiny_model.W_U
        assert [e.token_id for e in page.promoted] == effects.topk(10).indices.tolist()
        assert [e.token_id for e in page.suppressed] == effects.topk(10, largest=False).indices.tolist()
        assert page.promoted[0].token == tiny_model.token_str(page.promoted[0].token_id)


def test_reverse_lookups(tiny_model, pack, built, brute):
    out, _, _ = built
    groups, acts = brute
    with open_index(out, tiny_model.spec) as index:
        prompt = CORPUS[5]
        found = search_position(index, tiny_model, prompt, -1, limit=5)
        assert found.prompt_ids[0] == tiny_model.tokenizer.bos_token_id and found.position == len(found.prompt_ids) - 1
        ratios = [h.score for h in found.hits]
        assert ratios == sorted(ratios, reverse=True) and all(h.score == pytest.approx(h.activation / h.max) for h in found.hits)
        best = found.hits[0]
        page = unit_page(index, best.unit)
        assert page.max == best.max
        # the token at the top example of some neuron: that neuron is among the units centred on it
        page = unit_page(index, "L0N0")
        token = page.top[0].token_ids[page.top[0].position - page.top[0].window_start]
        hits = search_token(index, token, limit=1000)
        assert any(h.unit.unit == page.unit for h in hits)
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        with pytest.raises(HexRayError, match="out of range"):
            search_token(index, 10**9)


def test_unit_names_at_the_boundary(tiny_model, built, dictionary):
    out, _, _ = built
    with open_index(out, tiny_model.spec) as index:
        assert parse_unit(index, "L1N3").unit == sites.Component("neuron", 1, neuron=3)
        assert parse_unit(index, "L0H2").unit == sites.head(0, 2)
        assert parse_unit(index, f"{dictionary}:7") == parse_unit(index, "L1F7")
        for text, fragment in (("L9N1", "out of range"), ("MLP1", "not a unit"), ("nope:3", "no dictionary"), ("L1F999", "not in the index"), ("L0F1", "no dictionary at layer 0")):
            with pytest.raises(HexRayError, match=fragment):
                unit_page(index, text)


# ---------------------------------------------------------------------------------------------
# atomic builds and refusals
# ---------------------------------------------------------------------------------------------


def test_an_interrupted_build_leaves_the_previous_index_and_no_temporary_file(tiny_gpt2, gpt2_pack, tmp_path, monkeypatch):
    tiny_model, pack = tiny_gpt2, gpt2_pack
    out = tmp_path / "index.duckdb"
    build_index(tiny_model, pack, "heads", out, top_k=3, window=(2, 1), logit_tokens=0)
    before = out.read_bytes()
    calls = []
    with pytest.raises(IndexBuildStopped):
        build_index(tiny_model, pack, "neurons", out, batch_contexts=BATCH, should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [".index.duckdb.resume", "index.duckdb"]  # a checkpoint to resume from

    real = stream.update

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(stream, "update", failing)
    with pytest.raises(RuntimeError, match="boom"):
        build_index(tiny_model, pack, "neurons", out, batch_contexts=BATCH, resume=False)
    monkeypatch.setattr(stream, "update", real)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["index.duckdb"]
    with open_index(out, tiny_model.spec) as index:
        assert index.info.units == {"head": 2 * tiny_model.spec.n_heads}


def test_a_second_build_into_the_same_path_is_refused(tiny_gpt2, gpt2_pack, tmp_path):
    tiny_model, pack = tiny_gpt2, gpt2_pack
    out = tmp_path / "index.duckdb"
    lock = tmp_path / ".index.duckdb.lock"
    lock.write_text("1")  # pid 1 is always alive
    with pytest.raises(HexRayError, match="another build"):
        build_index(tiny_model, pack, "heads", out)
    lock.write_text("999999999")  # a stale lock is taken over
    build_index(tiny_model, pack, "heads", out, logit_tokens=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.duckdb"]


def test_refusals(tiny_gpt2, tiny_llama, tiny_model, pack, built, tmp_path):
    out, _, _ = built
    other = tiny_llama if tiny_model is tiny_gpt2 else tiny_gpt2
    with pytest.raises(HexRayError, match="was built for"):
        open_index(out, other.spec)
    with pytest.raises(HexRayError, match="no neuroscope index"):
        open_index(tmp_path / "missing.duckdb", tiny_model.spec)
    (tmp_path / "junk.duckdb").write_bytes(b"not a database" * 100)
    with pytest.raises(HexRayError, match="not a readable neuroscope index"):
        open_index(tmp_path / "junk.duckdb", tiny_model.spec)
    for units, fragment in (("neurons,bogus", "unknown units"), ("neurons,neurons", "named twice"), ("", "no units")):
        with pytest.raises(HexRayError, match=fragment):
            build_index(tiny_model, pack, units, tmp_path / "x.duckdb")
    with pytest.raises(HexRayError, match="top_k"):
        build_index(tiny_model, pack, "heads", tmp_path / "x.duckdb", top_k=0)
    assert not (tmp_path / "x.duckdb").exists()
