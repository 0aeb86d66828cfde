"""Building an index in pieces gives the index of one build: a stopped build resumed, an index
extended with --add (the rest of its corpus, or another corpus), and the Ray engine's index, each
compared row for row with a single local build."""

from __future__ import annotations

import math

import duckdb
import pytest

from hexray.corpus.packs import token_pack
from hexray.errors import HexRayError
from hexray.neuroscope.index import IndexBuildStopped, build_index, indexed_tokens, open_index, read_info
from hexray.neuroscope.pages import unit_page
from hexray.tracing.engine import capture
from tests.conftest import CORPUS

CTX = 16
BATCH = 8
TOP_K = 5
WINDOW = (3, 2)
UNITS = "neurons,heads"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nsb-corpus")
    for i, text in enumerate(CORPUS * 2):
        (folder / f"{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nsb-other")
    for i, text in enumerate(reversed(CORPUS)):
        (folder / f"other-{i:03d}.txt").write_text(text.upper() + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def full(tiny_gpt2, corpus_dir):
    return token_pack(tiny_gpt2, corpus_dir, context_size=CTX)


@pytest.fixture(scope="module")
def reference(tiny_gpt2, full, tmp_path_factory):
    """One uninterrupted local build over the whole corpus."""
    out = tmp_path_factory.mktemp("nsb-ref") / "index.duckdb"
    build_index(tiny_gpt2, full, UNITS, out, top_k=TOP_K, window=WINDOW, batch_contexts=BATCH)
    return out


def tables(path, *, skip_acts_of: set[int] = frozenset()) -> dict:
    """Every table but meta, in a fixed order; means apart (a float64 sum in another order may differ in its last bits)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        out = {
            "units": con.execute("SELECT * EXCLUDE (mean) FROM units ORDER BY unit_id").fetchall(),
            "means": [r[0] for r in con.execute("SELECT mean FROM units ORDER BY unit_id").fetchall()],
            "examples": [r if r[3] not in skip_acts_of else r[:8] for r in con.execute("SELECT * FROM examples ORDER BY unit_id, sample, rank").fetchall()],
            "contexts": con.execute("SELECT * FROM contexts ORDER BY context").fetchall(),
            "documents": con.execute("SELECT * FROM documents ORDER BY document").fetchall(),
            "vocab": con.execute("SELECT * FROM vocab ORDER BY token").fetchall(),
        }
    finally:
        con.close()
    return out


def assert_same_index(a: dict, b: dict, *, mean_tol: float = 1e-12) -> None:
    """Equal tables; means to ``mean_tol`` (1e-12: the same float32 batch sums added in another order; other batches: float32 sums of other rows)."""
    assert len(a["examples"]) > 0
    for name in ("units", "examples", "contexts", "documents", "vocab"):
        assert a[name] == b[name], name
    worst = max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a["means"], b["means"], strict=True))
    assert worst <= mean_tol, worst


# ---------------------------------------------------------------------------------------------
# resuming a stopped build
# ---------------------------------------------------------------------------------------------


def test_a_stopped_build_resumes_where_it_stopped_and_gives_the_same_index(tiny_gpt2, full, reference, tmp_path):
    out = tmp_path / "index.duckdb"
    asked = []
    with pytest.raises(IndexBuildStopped, match="stopped after"):
        build_index(tiny_gpt2, full, UNITS, out, top_k=TOP_K, window=WINDOW, batch_contexts=BATCH, should_stop=lambda: asked.append(1) or len(asked) > 2)
    assert not out.exists() and (tmp_path / ".index.duckdb.resume").is_file()

    seen = []
    build_index(tiny_gpt2, full, UNITS, out, top_k=TOP_K, window=WINDOW, batch_contexts=BATCH, progress=lambda done, total: seen.append(done))
    stopped_at = int(full.counted[: 2 * BATCH].sum())  # two batches ran before the stop
    assert seen[0] == stopped_at and seen[-1] == full.n_tokens  # it started from the checkpoint, not from 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.duckdb"]
    assert_same_index(tables(out), tables(reference))


def test_a_checkpoint_of_another_build_is_not_resumed(tiny_gpt2, full, reference, tmp_path):
    out = tmp_path / "index.duckdb"
    asked = []
    with pytest.raises(IndexBuildStopped):
        build_index(tiny_gpt2, full, "heads", out, top_k=TOP_K, window=WINDOW, batch_contexts=BATCH, should_stop=lambda: asked.append(1) or len(asked) > 1)
    seen = []
    build_index(tiny_gpt2, full, UNITS, out, top_k=TOP_K, window=WINDOW, batch_contexts=BATCH, progress=lambda done, total: seen.append(done))
    assert seen[0] == 0  # other units: started over
    assert_same_index(tables(out), tables(reference))


# ---------------------------------------------------------------------------------------------
# --add
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["at a context boundary", "inside a context"])
def test_adding_the_rest_of_the_corpus_gives_the_index_of_the_whole_corpus(tiny_gpt2, corpus_dir, full, reference, tmp_path, cut):
    boundary = int(full.counted[:5].sum())  # the counted tokens of the first five contexts
    first = boundary if cut == "at a context boundary" else boundary - 4
    out = tmp_path / "index.duckdb"
    build_index(tiny_gpt2, token_pack(tiny_gpt2, corpus_dir, context_size=CTX, max_tokens=first), UNITS, out, top_k=TOP_K, window=WINDOW, batch_contexts=BATCH)
    assert indexed_tokens(out, tiny_gpt2, corpus_dir, CTX) == first

    info = build_index(tiny_gpt2, full, None, out, add=True, batch_contexts=BATCH)  # the whole pack: what the index holds is skipped
    assert info.tokens == full.n_tokens and info.contexts == full.n_contexts and len(info.sources) == 2
    assert [s["tokens"] for s in info.sources] == [first, full.n_tokens - first]
    # Inside a context, the first build saw that context only up to the cut: the activations after an
    # example near the cut (its window's right side) were unknown to it. Everything else is the same.
    overlap = set() if cut == "at a context boundary" else {4}
    assert_same_index(tables(out, skip_acts_of=overlap), tables(reference, skip_acts_of=overlap), mean_tol=1e-5)  # its batches hold other contexts


def test_adding_another_corpus_numbers_its_contexts_and_documents_after_the_index(tiny_gpt2, corpus_dir, other_dir, full, reference, tmp_path):
    out = tmp_path / "index.duckdb"
    out.write_bytes(reference.read_bytes())
    other = token_pack(tiny_gpt2, other_dir, context_size=CTX)
    info = build_index(tiny_gpt2, other, UNITS, out, add=True, batch_contexts=BATCH)
    assert info.tokens == full.n_tokens + other.n_tokens and info.contexts == full.n_contexts + other.n_contexts
    assert info.corpus == f"{full.source} + {other.source}"

    # every example, old or new, recomputes from the ids it records
    with open_index(out, tiny_gpt2.spec) as index:
        con = index.con
        newest = con.execute("SELECT max(context) FROM examples").fetchone()[0]
        assert newest >= full.n_contexts  # the new text made it into the top examples
        names = dict(con.execute("SELECT document, name FROM documents").fetchall())
        assert any("other-" in n for n in names.values()) and any("other-" not in n for n in names.values())
        for layer in range(tiny_gpt2.spec.n_layers):
            page = unit_page(index, f"L{layer}N0")
            for ex in page.top[:3]:
                _, acts = capture(tiny_gpt2, [list(ex.context_ids)], [f"blocks.{layer}.mlp.hook_post"])
                assert acts[0][f"blocks.{layer}.mlp.hook_post"][ex.position, 0].item() == pytest.approx(ex.activation, rel=1e-5, abs=1e-6)
                assert ("other-" in (ex.document or "")) == (ex.context >= full.n_contexts)

    # the union's top examples: each unit's best of the two indexes
    merged, ref_only = tables(out), tables(reference)
    assert max(r[7] for r in merged["examples"]) >= max(r[7] for r in ref_only["examples"])


def test_add_refusals(tiny_gpt2, tiny_llama, corpus_dir, full, reference, tmp_path):
    out = tmp_path / "index.duckdb"
    out.write_bytes(reference.read_bytes())
    before = out.read_bytes()
    with pytest.raises(HexRayError, match="already holds these"):
        build_index(tiny_gpt2, full, None, out, add=True)
    with pytest.raises(HexRayError, match="keeps the index's units"):
        build_index(tiny_gpt2, full, "heads", out, add=True)
    with pytest.raises(HexRayError, match="was built for"):
        build_index(tiny_llama, token_pack(tiny_llama, corpus_dir, context_size=CTX), None, out, add=True)
    with pytest.raises(HexRayError, match="contexts are 16 tokens"):
        build_index(tiny_gpt2, token_pack(tiny_gpt2, corpus_dir, context_size=CTX * 2), None, out, add=True)
    with pytest.raises(HexRayError, match="no index at"):
        build_index(tiny_gpt2, full, None, tmp_path / "missing.duckdb", add=True)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["index.duckdb"]


# ---------------------------------------------------------------------------------------------
# the Ray engine
# ---------------------------------------------------------------------------------------------


def test_the_ray_engine_builds_the_local_engines_index_row_for_row(tiny_gpt2, full, reference, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        seen = []
        info = build_index(tiny_gpt2, full, UNITS, tmp_path / "ray.duckdb", top_k=TOP_K, window=WINDOW, batch_contexts=BATCH,
                           engine="ray", workers=2, progress=lambda done, total: seen.append(done))
    finally:
        ray.shutdown()
    assert seen[-1] == full.n_tokens and len(seen) == 3  # the start, then one update per worker's slice
    assert info.tokens == read_info(reference).tokens
    assert_same_index(tables(tmp_path / "ray.duckdb"), tables(reference))


def test_ray_slices_are_cut_at_batch_boundaries():
    from hexray.neuroscope.scale import slices

    assert slices(37, 8, 2) == [(0, 24), (24, 37)]
    assert slices(5, 8, 4) == [(0, 5)]
    assert slices(32, 8, 4) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert all(lo % 8 == 0 for lo, _ in slices(1000, 8, 3))


def test_an_unknown_engine_is_refused(tiny_gpt2, full, tmp_path):
    with pytest.raises(HexRayError, match="engine"):
        build_index(tiny_gpt2, full, UNITS, tmp_path / "x.duckdb", engine="spark")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def test_index_build_add_extends_the_default_index_and_mistakes_are_one_line(cli, tiny_gpt2, corpus_dir, other_dir, tmp_path, monkeypatch):
    import json

    from tests.helpers import assert_one_line_error

    monkeypatch.setenv("HEXRAY_CACHE", str(tmp_path / "cache"))
    first = cli(tiny_gpt2, "index", "build", "--corpus", corpus_dir, "--tokens", "300", "--context-size", "16", "--top-k", "4", "--json")
    assert first.code == 0, first.err
    more = cli(tiny_gpt2, "index", "build", "--add", "--corpus", corpus_dir, "--tokens", "200", "--json")
    assert more.code == 0, more.err
    doc = json.loads(more.out)
    assert doc["tokens"] == json.loads(first.out)["tokens"] + 200
    other = cli(tiny_gpt2, "index", "build", "--add", "--corpus", other_dir, "--tokens", "100")
    assert other.code == 0 and "Added 100 tokens" in other.out, other.err
    info = json.loads(cli(tiny_gpt2, "index", "info", "--json").out)
    assert info["tokens"] == doc["tokens"] + 100 and info["top_k"] == 4

    assert_one_line_error(cli(tiny_gpt2, "index", "build", "--add", "--units", "heads", "--corpus", corpus_dir, "--tokens", "10"), "--units")
    assert_one_line_error(cli(tiny_gpt2, "index", "build", "--add", "--context-size", "32", "--corpus", corpus_dir), "--context-size")
    assert_one_line_error(cli(tiny_gpt2, "index", "build", "--engine", "spark", "--corpus", corpus_dir), "--engine")
    assert_one_line_error(cli(tiny_gpt2, "index", "build", "--add", "--out", tmp_path / "none.duckdb", "--corpus", corpus_dir), "no index")


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EROFS"])
def test_a_full_or_read_only_disk_during_a_build_is_one_line_and_keeps_the_previous_index(cli, tiny_gpt2, corpus_dir, reference, tmp_path, monkeypatch, errno_name):
    import errno
    import os

    from hexray.neuroscope import index as index_module
    from tests.helpers import assert_one_line_error

    out = tmp_path / "index.duckdb"
    out.write_bytes(reference.read_bytes())
    before = out.read_bytes()
    real = index_module._write

    def failing(tmp, *args, **kwargs):
        real(tmp, *args, **kwargs)  # the new file is complete; the disk fails as the build ends
        code = getattr(errno, errno_name)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(index_module, "_write", failing)
    r = cli(tiny_gpt2, "index", "build", "--out", out, "--corpus", corpus_dir, "--tokens", "100", "--context-size", "16")
    assert_one_line_error(r, os.strerror(getattr(errno, errno_name)))
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["index.duckdb"]


def test_a_rebuild_is_read_even_while_the_old_index_is_open(tiny_gpt2, full, reference, tmp_path):
    out = tmp_path / "index.duckdb"
    out.write_bytes(reference.read_bytes())
    with open_index(out, tiny_gpt2.spec) as old:  # a reader (the lab) holds the previous file
        info = build_index(tiny_gpt2, full[:4], "heads", out, top_k=TOP_K, window=WINDOW)
        assert info.units == {"head": 2 * tiny_gpt2.spec.n_heads} and info.tokens == full[:4].n_tokens
        assert old.info.units["neuron"] > 0 and old.con.execute("SELECT count(*) FROM units WHERE kind = 'neuron'").fetchone()[0] > 0
    with open_index(out, tiny_gpt2.spec) as new:
        assert new.con.execute("SELECT count(*) FROM units WHERE kind = 'neuron'").fetchone()[0] == 0
