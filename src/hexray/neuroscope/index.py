"""Building and opening a neuroscope index: one pass of a token pack, kept in one DuckDB file.

:func:`build_index` runs a :class:`~hexray.corpus.packs.TokenPack` through the tracing engine in
batches (:func:`~hexray.tracing.engine.run_reduced`: each layer's activation is folded into the
running statistics inside the pass and dropped, so memory holds one layer at a time), keeps for
every unit what :mod:`hexray.neuroscope.stream` describes, adds each neuron's and feature's static
logit effects, and writes the file. It builds into a hidden temporary file beside ``out`` and
moves it into place only when complete: an interrupted build (``should_stop``, an exception, a
full disk) leaves the previous index untouched and no temporary file behind. DuckDB allows one
writer or many read-only readers of a file; readers of the old index keep reading it while a new
one builds.

The schema (one row per unit, one per stored example, token ids stored once per context)::

    meta      (key VARCHAR PRIMARY KEY, value VARCHAR)          -- JSON values: model, corpus, sizes, bins
    units     (unit_id INTEGER PRIMARY KEY, kind, layer, unit, dictionary, site, name,
               max, mean, density, fired, histogram_start SMALLINT, histogram INTEGER[],
               promoted INTEGER[], promoted_logits FLOAT[], suppressed INTEGER[], suppressed_logits FLOAT[])
    examples  (unit_id, sample BOOLEAN, rank, context, position, token, document, activation FLOAT,
               acts TINYINT[W], acts_scale FLOAT)                -- sorted by (unit_id, sample, rank)
    contexts  (context INTEGER PRIMARY KEY, tokens INTEGER[])   -- every context an example is in
    documents (document INTEGER PRIMARY KEY, name VARCHAR)
    vocab     (token INTEGER PRIMARY KEY, text VARCHAR)         -- decoded text of every token stored

``examples.acts`` is the unit's activation over the window ``position - before .. position + after``
as ``round(127 * act / acts_scale)``, ``acts_scale`` being the window's largest ``|act|`` (-128:
outside the context or not counted, e.g. BOS): what shading needs, at a quarter of the size of
floats (the window is for reading; ``activation``, ``position`` and the context's ids are exact,
for recomputing). ``histogram`` holds the bins ``histogram_start ..`` up to the last non-empty one.
``sample`` rows are the quantile samples, their ``rank`` the band. A unit page is one query on ``unit_id`` (the examples are stored in its
order, so DuckDB's zone maps skip all other row groups).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hexray.corpus.packs import TokenPack
from hexray.errors import HexRayError, first_line
from hexray.features.dictionary import Dictionary, model_key
from hexray.models.loading import LoadedModel, ModelSpec
from hexray.neuroscope import stream
from hexray.neuroscope.units import UnitGroup, activation_fn, logit_effects, output_directions, parse_units
from hexray.tracing.engine import check_stop, rows_per_chunk, run_reduced

FORMAT = 1  # bump when the schema or the meaning of a stored value changes
DEFAULT_TOP_K = 20
DEFAULT_WINDOW = (24, 8)  # tokens kept before and after each example's position
DEFAULT_LOGIT_TOKENS = 10  # promoted and suppressed tokens kept per unit
_MAX_BATCH_CONTEXTS = 64

Progress = Callable[[int, int], None]  # (counted tokens done, counted tokens in the pack)


class IndexBuildStopped(HexRayError):
    """``should_stop`` asked the build to stop; the previous index (if any) is unchanged."""


@dataclass(frozen=True)
class IndexInfo:
    """What an index holds and how it was built (its ``meta`` table)."""

    path: Path
    model: str
    model_key: str
    weights: str  # a hash of the unembedding (what logit effects and search_position read through)
    corpus: str
    corpus_key: str
    tokens: int  # counted tokens indexed
    contexts: int
    context_size: int
    bos: bool  # every context starts with the BOS token (prompts are searched with one too)
    top_k: int
    window: tuple[int, int]  # tokens before and after each example
    units: Mapping[str, int]  # kind -> units indexed
    dictionaries: tuple[str, ...]
    hexray_version: str
    created: str
    seconds: Mapping[str, float]  # build time by phase: forward (with the statistics), logits, write
    size_bytes: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds.get("forward", 0.0), 1e-9)


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------


def build_index(
    model: LoadedModel,
    pack: TokenPack,
    units: str | Sequence[str | Dictionary],
    out: str | Path,
    *,
    top_k: int = DEFAULT_TOP_K,
    window: tuple[int, int] = DEFAULT_WINDOW,
    logit_tokens: int = DEFAULT_LOGIT_TOKENS,
    batch_contexts: int | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> IndexInfo:
    """Index ``units`` (``"neurons,heads,dict:NAME"``) over ``pack`` into the DuckDB file ``out``.

    ``should_stop()`` is asked before each batch; True stops the build with
    :class:`IndexBuildStopped`, leaving ``out`` as it was. ``batch_contexts``: contexts per forward
    pass (default: what the memory budget allows, at most 64).
    """
    _check_options(pack, top_k, window, logit_tokens, batch_contexts)
    if pack.context_size > model.spec.n_ctx:
        raise HexRayError(f"the pack's contexts of {pack.context_size} tokens are longer than {model.name}'s context of {model.spec.n_ctx}", field="corpus")
    groups = parse_units(units, model)
    window = (min(window[0], pack.context_size - 1), min(window[1], pack.context_size - 1))  # a window never reaches past its context
    out = Path(out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HexRayError(f"cannot create {out.parent}: {exc.strerror}", hint="give --out a writable place", field="out") from None
    if out.is_dir():
        raise HexRayError(f"{out} is a folder", hint="give --out a file name such as index.duckdb", field="out")
    with _build_lock(out):
        tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:12]}")
        try:
            runs, seconds = _stream(model, pack, groups, top_k, window, batch_contexts, progress, should_stop)
            start = time.perf_counter()
            effects = [_effects(model, g, logit_tokens) for g in groups]
            seconds["logits"] = time.perf_counter() - start
            start = time.perf_counter()
            meta = _meta(model, pack, groups, top_k, window)
            _write(tmp, model, pack, groups, [stream.finish(r) for r in runs], effects, meta, seconds, start)
            os.replace(tmp, out)
        except OSError as exc:
            raise HexRayError(f"cannot write the index {out}: {exc.strerror or first_line(exc)}", hint="check the disk has room and the folder is writable", field="out") from None
        except Exception as exc:
            if _is_duckdb_error(exc):
                raise HexRayError(f"cannot write the index {out}: {first_line(exc)}", hint="check the disk has room and the folder is writable", field="out") from None
            raise
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                leftover.unlink(missing_ok=True)
    return read_info(out)


def _check_options(pack: TokenPack, top_k: int, window: tuple[int, int], logit_tokens: int, batch_contexts: int | None) -> None:
    if pack.n_contexts == 0 or pack.n_tokens == 0:
        raise HexRayError("{field} has no counted tokens to index", hint="give a corpus with some text", field="corpus")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 1000:
        raise HexRayError(f"{{field}} must be between 1 and 1000, got {top_k!r}", field="top_k")
    if len(window) != 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in window):
        raise HexRayError(f"{{field}} must be two token counts (before, after), got {window!r}", field="window")
    if isinstance(logit_tokens, bool) or not isinstance(logit_tokens, int) or logit_tokens < 0:
        raise HexRayError(f"{{field}} must be a number of tokens (0: none), got {logit_tokens!r}", field="logit_tokens")
    if batch_contexts is not None and (isinstance(batch_contexts, bool) or not isinstance(batch_contexts, int) or batch_contexts < 1):
        raise HexRayError(f"{{field}} must be at least 1, got {batch_contexts!r}", field="batch_contexts")


def _stream(model, pack, groups, top_k, window, batch_contexts, progress, should_stop) -> tuple[list[stream.Running], dict[str, float]]:
    """The one pass: every batch through the engine, each hook's activation folded into its groups' statistics."""
    P, device = pack.context_size, model.device
    runs = [stream.new_running(g.count, top_k, P, window[0], window[1], device) for g in groups]
    by_hook: dict[str, list[tuple[Callable, stream.Running]]] = {}
    for g, run in zip(groups, runs):
        by_hook.setdefault(g.hook, []).append((activation_fn(model, g), run))
    batch: dict[str, Any] = {}  # what the reducers read about the current batch

    def reducer(folds):
        def reduce(x: torch.Tensor) -> None:
            for fn, run in folds:
                stream.update(run, fn(x), batch["counted"], batch["first"])

        return reduce

    reducers = {h: reducer(folds) for h, folds in by_hook.items()}
    rows = batch_contexts or min(_MAX_BATCH_CONTEXTS, rows_per_chunk(model, P, [groups[0].hook]))
    stop_after = max(g.last_layer for g in groups)
    total, done = pack.n_tokens, 0
    start = time.perf_counter()
    for lo in range(0, pack.n_contexts, rows):
        if should_stop is not None and should_stop():
            raise IndexBuildStopped("the index build was stopped before it finished", hint="the previous index, if any, is unchanged")
        check_stop()
        batch["counted"] = pack.counted[lo : lo + rows].to(device)
        batch["first"] = lo
        with torch.inference_mode():
            run_reduced(model, pack.tokens[lo : lo + rows], reducers, stop_after_layer=stop_after)
        done += int(batch["counted"].sum())
        if progress is not None:
            progress(done, total)
    return runs, {"forward": time.perf_counter() - start}


def _effects(model: LoadedModel, group: UnitGroup, n: int):
    dirs = output_directions(model, group) if n > 0 else None
    return None if dirs is None else logit_effects(model, dirs, n)


def _meta(model: LoadedModel, pack: TokenPack, groups: Sequence[UnitGroup], top_k: int, window: tuple[int, int]) -> dict[str, Any]:
    from hexray import __version__
    from hexray.features.tuned_lens import unembed_hash

    counts: dict[str, int] = {}
    for g in groups:
        counts[g.kind] = counts.get(g.kind, 0) + g.count
    bos = model.tokenizer.bos_token_id
    return {
        "format": FORMAT,
        "model": model.name,
        "model_key": model_key(model.name),
        "weights": unembed_hash(model),
        "spec": dataclasses.asdict(model.spec),
        "corpus": pack.source,
        "corpus_key": pack.key,
        "tokens": pack.n_tokens,
        "contexts": pack.n_contexts,
        "context_size": pack.context_size,
        "bos": bool(bos is not None and bool((pack.tokens[:, 0] == bos).all())),
        "top_k": top_k,
        "window": list(window),
        "units": counts,
        "dictionaries": [{"name": g.dictionary_name, "site": g.dictionary.site.label, "latents": g.count} for g in groups if g.kind == "feature"],
        "sample_every": stream.SAMPLE_EVERY,
        "bin_edges": stream.bin_edges(),
        "band_edges": stream.band_edges(),
        "hexray_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE units (
    unit_id INTEGER PRIMARY KEY, kind VARCHAR, layer SMALLINT, unit INTEGER, dictionary VARCHAR, site VARCHAR, name VARCHAR,
    max FLOAT, mean DOUBLE, density DOUBLE, fired BIGINT, histogram_start SMALLINT, histogram INTEGER[],
    promoted INTEGER[], promoted_logits FLOAT[], suppressed INTEGER[], suppressed_logits FLOAT[]
);
CREATE TABLE examples (
    unit_id INTEGER, sample BOOLEAN, rank SMALLINT, context INTEGER, position SMALLINT, token INTEGER, document INTEGER,
    activation FLOAT, acts TINYINT[{width}], acts_scale FLOAT
);
CREATE TABLE contexts (context INTEGER PRIMARY KEY, tokens INTEGER[]);
CREATE TABLE documents (document INTEGER PRIMARY KEY, name VARCHAR);
CREATE TABLE vocab (token INTEGER PRIMARY KEY, text VARCHAR);
"""


def _write(tmp: Path, model, pack: TokenPack, groups, finished: list[stream.Finished], effects, meta: dict, seconds: dict, start: float) -> None:
    import duckdb
    import pyarrow as pa

    width = meta["window"][0] + 1 + meta["window"][1]
    units_tbl = _units_table(groups, finished, effects)
    examples_tbl = _examples_table(pack, groups, finished, width)
    tokens = pack.tokens.numpy()
    used = np.unique(examples_tbl["context"].to_numpy())
    doc_of = examples_tbl["document"].to_numpy()
    used_docs = np.unique(doc_of[doc_of >= 0])
    vocab_ids = set(np.unique(tokens[used]).tolist())
    for e in effects:
        if e is not None:
            vocab_ids |= set(torch.unique(e[0]).tolist()) | set(torch.unique(e[2]).tolist())
    vocab_ids = sorted(vocab_ids)
    contexts_tbl = pa.table({"context": used.astype(np.int32), "tokens": pa.array(list(tokens[used].astype(np.int32)), type=pa.list_(pa.int32()))})
    documents_tbl = pa.table({"document": used_docs.astype(np.int32), "name": [pack.documents[i] for i in used_docs]})
    vocab_tbl = pa.table({"token": np.asarray(vocab_ids, dtype=np.int32), "text": [model.token_str(i) for i in vocab_ids]})

    con = duckdb.connect(str(tmp))
    try:
        con.execute(_SCHEMA.format(width=width))
        for name, tbl in (("units", units_tbl), ("examples", examples_tbl), ("contexts", contexts_tbl), ("documents", documents_tbl), ("vocab", vocab_tbl)):
            con.register("incoming", tbl)
            con.execute(f"INSERT INTO {name} SELECT * FROM incoming")
            con.unregister("incoming")
        seconds["write"] = time.perf_counter() - start
        meta["seconds"] = seconds
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        con.execute("CHECKPOINT")
    finally:
        con.close()


def _lists(values, dtype):
    """A pyarrow list column from per-row arrays (None: NULL)."""
    import pyarrow as pa

    return pa.array([None if v is None else np.asarray(v, dtype=dtype) for v in values], type=pa.list_(pa.from_numpy_dtype(dtype)))


def _units_table(groups: Sequence[UnitGroup], finished: Sequence[stream.Finished], effects):
    """One row per unit, ``unit_id`` counting through the groups in order (a group's units are consecutive)."""
    import pyarrow as pa

    cols: dict[str, list] = {c: [] for c in ("unit_id", "kind", "layer", "unit", "dictionary", "site", "name", "max", "mean", "density", "fired")}
    hist, logits = [], {c: [] for c in ("promoted", "promoted_logits", "suppressed", "suppressed_logits")}
    offset = 0
    for g, fin, eff in zip(groups, finished, effects):
        n = g.count
        cols["unit_id"].append(np.arange(offset, offset + n, dtype=np.int32))
        cols["kind"].append(np.full(n, g.kind, dtype=object))
        cols["layer"].append(np.full(n, g.layer, dtype=np.int16))
        cols["unit"].append(np.arange(n, dtype=np.int32))
        cols["dictionary"].append(np.full(n, g.dictionary_name, dtype=object))
        cols["site"].append(np.full(n, g.site, dtype=object))
        cols["name"].append(np.asarray([g.component(u).name for u in range(n)], dtype=object))
        for c in ("max", "mean", "density", "fired"):
            cols[c].append(getattr(fin, c).numpy())
        hist += _trimmed(fin.hist.numpy().astype(np.int32))
        for i, c in enumerate(logits):  # (top ids, top values, bottom ids, bottom values); heads have none
            logits[c] += [None] * n if eff is None else list(eff[i].numpy())
        offset += n
    return pa.table({
        **{c: pa.array(np.concatenate(parts)) for c, parts in cols.items()},
        "histogram_start": np.asarray([h[0] for h in hist], dtype=np.int16), "histogram": _lists([h[1] for h in hist], np.int32),
        "promoted": _lists(logits["promoted"], np.int32), "promoted_logits": _lists(logits["promoted_logits"], np.float32),
        "suppressed": _lists(logits["suppressed"], np.int32), "suppressed_logits": _lists(logits["suppressed_logits"], np.float32),
    })


def _examples_table(pack: TokenPack, groups: Sequence[UnitGroup], finished: Sequence[stream.Finished], width: int):
    """One row per stored example (top k, then quantile samples), sorted by (unit_id, sample, rank)."""
    import pyarrow as pa

    P = pack.context_size
    ex: dict[str, list[np.ndarray]] = {c: [] for c in ("unit_id", "sample", "rank", "gidx", "activation", "acts")}
    offset = 0
    for g, fin in zip(groups, finished):
        for sample, (gidx, val, win) in ((False, (fin.top_gidx, fin.top_val, fin.top_win)), (True, (fin.samp_gidx, fin.samp_val, fin.samp_win))):
            filled = ~stream.is_empty(gidx)  # [U, slots]
            unit, rank = filled.nonzero(as_tuple=True)
            ex["unit_id"].append(offset + unit.numpy().astype(np.int32))
            ex["sample"].append(np.full(unit.numel(), sample))
            ex["rank"].append(rank.numpy().astype(np.int16))
            ex["gidx"].append(gidx[filled].numpy())
            ex["activation"].append(val[filled].numpy().astype(np.float32))
            ex["acts"].append(win[filled].numpy().astype(np.float32).reshape(-1, width))
        offset += g.count
    cat = {c: np.concatenate(v) for c, v in ex.items()}
    order = np.lexsort((cat["rank"], cat["sample"], cat["unit_id"]))  # a unit's rows together: one zone-mapped range per page
    gidx = cat["gidx"][order]
    context, position = (gidx // P).astype(np.int32), (gidx % P).astype(np.int16)
    acts, scale = _quantised(cat["acts"][order])
    return pa.table({
        "unit_id": cat["unit_id"][order], "sample": cat["sample"][order], "rank": cat["rank"][order], "context": context, "position": position,
        "token": pack.tokens.numpy()[context, position].astype(np.int32), "document": pack.doc.numpy()[context, position].astype(np.int32),
        "activation": cat["activation"][order], "acts": pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), width), "acts_scale": scale,
    })


def _trimmed(hist: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Per unit, (first non-empty bin, the bins from it to the last non-empty one): ``hist`` [U, N_BINS]."""
    out = []
    for row in hist:
        nz = np.flatnonzero(row)
        out.append((0, row[:0]) if nz.size == 0 else (int(nz[0]), row[nz[0] : nz[-1] + 1]))
    return out


def _quantised(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Windows [n, W] (nan: not counted) as int8 of ``127 * act / scale`` (-128 for nan) and each window's scale [n]."""
    scale = np.nanmax(np.abs(acts), axis=1, initial=0.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    q = np.where(np.isnan(acts), -128, np.clip(np.rint(127 * np.nan_to_num(acts) / safe), -127, 127))
    return q.astype(np.int8), scale


def dequantised(acts, scale: float) -> list[float]:
    """A stored window back as floats (nan where not counted)."""
    return [math.nan if q is None or q == -128 else q * scale / 127 for q in acts]


def _is_duckdb_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("_duckdb") or type(exc).__module__.startswith("duckdb")


class _build_lock:
    """``out.lock`` held for the build: a second build into the same path is refused (a stale lock, whose process is gone, is taken over)."""

    def __init__(self, out: Path):
        self.path = out.with_name(f".{out.name}.lock")

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = _lock_owner(self.path)
                if pid is not None and _alive(pid):
                    raise HexRayError(f"another build (process {pid}) is writing {self.path.name[1:-5]}", hint="wait for it to finish, or build into another --out", field="out") from None
                self.path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                raise HexRayError(f"cannot write beside {self.path.parent}: {exc.strerror}", hint="give --out a writable place", field="out") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise HexRayError(f"cannot take the build lock {self.path}", field="out")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _lock_owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# opening
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Index:
    """An open, read-only index: its file, what it holds, and the connection pages query."""

    path: Path
    info: IndexInfo
    spec: ModelSpec  # of the model it was built for
    con: Any = field(repr=False)  # duckdb.DuckDBPyConnection
    _cache: dict = field(default_factory=dict, repr=False)  # units by identity, vocabulary, bins

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_index(path: str | Path, model_spec: ModelSpec) -> Index:
    """``path`` opened read-only, refused (HexRayError) when missing, not an index, or built for another model."""
    path = Path(path).expanduser()
    con = _connect(path)
    try:
        meta = _read_meta(con, path)
        info = _info(path, meta)
        if info.model_key != model_key(model_spec.name):
            raise HexRayError(f"the index {path} was built for {info.model}, not {model_spec.name}", hint="build one for this model (hexray index build), or load the model it was built for", field="index")
        spec = ModelSpec(**meta["spec"])
        if (spec.n_layers, spec.n_heads, spec.d_mlp, spec.d_vocab) != (model_spec.n_layers, model_spec.n_heads, model_spec.d_mlp, model_spec.d_vocab):
            raise HexRayError(f"the index {path} was built for a {info.model} of another shape", hint="build it again for this model", field="index")
    except BaseException:
        con.close()
        raise
    return Index(path, info, model_spec, con)


def read_info(path: str | Path) -> IndexInfo:
    """What the index at ``path`` holds, without checking its model."""
    path = Path(path).expanduser()
    con = _connect(path)
    try:
        return _info(path, _read_meta(con, path))
    finally:
        con.close()


def _connect(path: Path):
    import duckdb

    if not path.is_file():
        raise HexRayError(f"no neuroscope index at {path}", hint="build one with hexray index build", field="index", http_status=404)
    try:
        return duckdb.connect(str(path), read_only=True)
    except Exception as exc:
        if _is_duckdb_error(exc) or isinstance(exc, OSError):
            raise HexRayError(f"{path} is not a readable neuroscope index ({first_line(exc, 160)})", hint="build it again with hexray index build", field="index") from None
        raise


def _read_meta(con, path: Path) -> dict[str, Any]:
    try:
        rows = con.execute("SELECT key, value FROM meta").fetchall()
        meta = {k: json.loads(v) for k, v in rows}
    except Exception as exc:
        if _is_duckdb_error(exc) or isinstance(exc, ValueError):
            raise HexRayError(f"{path} is not a neuroscope index (no readable meta table)", hint="build it again with hexray index build", field="index") from None
        raise
    if meta.get("format") != FORMAT:
        raise HexRayError(f"{path} is a neuroscope index of format {meta.get('format')}, this HexRay reads format {FORMAT}", hint="build it again with hexray index build", field="index")
    return meta


def _info(path: Path, meta: dict[str, Any]) -> IndexInfo:
    try:
        return IndexInfo(
            path=path, model=meta["model"], model_key=meta["model_key"], weights=meta["weights"], corpus=meta["corpus"], corpus_key=meta["corpus_key"],
            tokens=int(meta["tokens"]), contexts=int(meta["contexts"]), context_size=int(meta["context_size"]), bos=bool(meta["bos"]),
            top_k=int(meta["top_k"]), window=tuple(meta["window"]), units=dict(meta["units"]), dictionaries=tuple(d["name"] for d in meta["dictionaries"]),
            hexray_version=meta["hexray_version"], created=meta["created"], seconds=dict(meta.get("seconds", {})), size_bytes=path.stat().st_size,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise HexRayError(f"{path}: the index's meta table is incomplete ({first_line(exc, 80)})", hint="build it again with hexray index build", field="index") from None


def default_index_path(spec: ModelSpec) -> Path:
    """Where ``hexray index build`` writes, and unit pages read, by default: ``<cache>/neuroscope/<model>.duckdb``."""
    from hexray.models.loading import cache_root

    return cache_root() / "neuroscope" / f"{model_key(spec.name)}.duckdb"
