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
from hexray.tracing import sites
from hexray.tracing.engine import check_stop, rows_per_chunk, run_reduced

FORMAT = 2  # bump when the schema or the meaning of a stored value changes
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
    sources: tuple[Mapping[str, Any], ...] = ()  # each text indexed (a build, then each --add): corpus, tokens, first context

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds.get("forward", 0.0), 1e-9)


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------


def build_index(
    model: LoadedModel,
    pack: TokenPack,
    units: str | Sequence[str | Dictionary] | None,
    out: str | Path,
    *,
    top_k: int = DEFAULT_TOP_K,
    window: tuple[int, int] = DEFAULT_WINDOW,
    logit_tokens: int = DEFAULT_LOGIT_TOKENS,
    batch_contexts: int | None = None,
    add: bool = False,
    engine: str = "local",
    workers: int | None = None,
    address: str | None = None,
    model_name: str | None = None,
    resume: bool = True,
    checkpoint_seconds: float = 120.0,
    held_out: TokenPack | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> IndexInfo:
    """Index ``units`` (``"neurons,heads,dict:NAME"``) over ``pack`` into the DuckDB file ``out``.

    ``add``: extend the index at ``out`` with the text of ``pack`` it does not hold yet (its units,
    top k and window; ``units`` None or the same). When the index already holds the start of
    ``pack``'s source, the tokens it holds are skipped, so ``pack`` may simply be a longer pack of
    the same corpus. ``engine``: ``"local"`` (this process) or ``"ray"`` (Ray Data, ``workers``
    actors, on the cluster at ``address`` or a local one; each loads ``model_name``, default the
    folder the model came from); both give the same index. ``should_stop()`` is asked before each
    batch; True stops the build with :class:`IndexBuildStopped`, leaving ``out`` as it was and a
    checkpoint beside it that the same call resumes from (``resume=False``: start over); local
    builds also checkpoint every ``checkpoint_seconds``. ``batch_contexts``: contexts per forward
    pass (default: what the memory budget allows, at most 64). ``held_out``: text the index does
    not read (e.g. the contexts that follow ``pack``) on which each unit's automatic label is scored
    (:mod:`hexray.neuroscope.labels`); None: no labels.
    """
    _check_options(pack, top_k, window, logit_tokens, batch_contexts)
    if engine not in ENGINES:
        raise HexRayError(f"{{field}} must be one of {', '.join(ENGINES)}, got {engine!r}", field="engine")
    if pack.context_size > model.spec.n_ctx:
        raise HexRayError(f"the pack's contexts of {pack.context_size} tokens are longer than {model.name}'s context of {model.spec.n_ctx}", field="corpus")
    out = _writable(out)
    with _build_lock(out):
        base = _read_base(out, model, pack, units, top_k, window) if add else None
        if base is not None:
            groups, top_k, window = base.groups, base.info.top_k, base.info.window
            placed = base.place(model, pack)
        else:
            groups = parse_units(units, model)
            window = (min(window[0], pack.context_size - 1), min(window[1], pack.context_size - 1))  # a window never reaches past its context
            placed = _Placed(pack, 0, 0)
        rows = batch_contexts or min(_MAX_BATCH_CONTEXTS, rows_per_chunk(model, pack.context_size, [groups[0].hook]))
        checkpoint = _Checkpoint(out, _fingerprint(model, placed, groups, top_k, window, base)) if engine == "local" else None
        tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:12]}")
        try:
            if engine == "ray":
                from hexray.neuroscope.scale import stream_on_ray

                runs, seconds = stream_on_ray(model, placed.pack, groups, top_k, window, rows, placed.first_context,
                                              workers=workers, address=address, model_name=model_name, progress=progress)
            else:
                runs, seconds = _stream(model, placed, groups, top_k, window, rows, checkpoint if resume else checkpoint.fresh(),
                                        checkpoint_seconds, progress, should_stop)
            if base is not None:
                runs = [stream.merge(old, new) for old, new in zip(base.runs, runs)]
            texts = _Texts(placed, base)
            labels = None
            if held_out is not None:
                start = time.perf_counter()
                labels = _labels(model, runs, groups, texts, held_out, rows, should_stop)
                seconds["labels"] = time.perf_counter() - start
            start = time.perf_counter()
            effects = [_effects(model, g, logit_tokens) for g in groups]
            seconds["logits"] = time.perf_counter() - start
            start = time.perf_counter()
            meta = _meta(model, placed, texts, groups, top_k, window, base)
            meta["label_tokens"] = 0 if held_out is None else held_out.n_tokens
            _write(tmp, model, texts, groups, [stream.finish(r) for r in runs], effects, labels, meta, seconds, start)
            os.replace(tmp, out)
            if checkpoint is not None:
                checkpoint.remove()
        except OSError as exc:
            raise HexRayError(f"cannot write the index {out}: {exc.strerror or first_line(exc)}", hint="check the disk has room and the folder is writable", field="out") from None
        except Exception as exc:
            if _is_duckdb_error(exc):
                raise HexRayError(f"cannot write the index {out}: {first_line(exc)}", hint="check the disk has room and the folder is writable", field="out") from None
            raise
        finally:
            if base is not None:
                base.close()
            for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                leftover.unlink(missing_ok=True)
    return read_info(out)


ENGINES = ("local", "ray")


def _writable(out: str | Path) -> Path:
    out = Path(out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HexRayError(f"cannot create {out.parent}: {exc.strerror}", hint="give --out a writable place", field="out") from None
    if out.is_dir():
        raise HexRayError(f"{out} is a folder", hint="give --out a file name such as index.duckdb", field="out")
    if not os.access(out.parent, os.W_OK):
        raise HexRayError(f"cannot write in {out.parent}: the folder is read-only", hint="give --out a writable place", field="out")
    return out


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


@dataclass(frozen=True, eq=False)
class _Placed:
    """The text a build folds in: ``pack`` (only its counted positions), its first context's and document's numbers in the index."""

    pack: TokenPack
    first_context: int
    first_document: int


def each_batch(model: LoadedModel, pack: TokenPack, groups: Sequence[UnitGroup], rows: int, consume: Callable[[int, torch.Tensor, int, torch.Tensor], None],
               *, start_row: int = 0, before_batch: Callable[[int], None] | None = None, after_batch: Callable[[int, int], None] | None = None) -> None:
    """Every batch of ``pack``'s contexts ``start_row..`` through the engine, ``rows`` contexts a forward pass, stopping after the last layer a group reads.

    ``consume(group index, activations [B, P, units], first row, counted [B, P])`` gets each group's
    units inside the pass (the hook's tensor is dropped after); ``before_batch(row)`` runs before each
    batch (it may raise to stop), ``after_batch(next row, counted tokens)`` after it.
    """
    by_hook: dict[str, list[tuple[int, Callable]]] = {}
    for i, g in enumerate(groups):
        by_hook.setdefault(g.hook, []).append((i, activation_fn(model, g)))
    batch: dict[str, Any] = {}  # what the reducers read about the current batch

    def reducer(folds):
        def reduce(x: torch.Tensor) -> None:
            for i, fn in folds:
                consume(i, fn(x), batch["lo"], batch["counted"])

        return reduce

    reducers = {h: reducer(folds) for h, folds in by_hook.items()}
    stop_after = max(g.last_layer for g in groups)
    for lo in range(start_row, pack.n_contexts, rows):
        if before_batch is not None:
            before_batch(lo)
        batch["counted"], batch["lo"] = pack.counted[lo : lo + rows].to(model.device), lo
        if batch["counted"].any():
            with torch.inference_mode():
                run_reduced(model, pack.tokens[lo : lo + rows], reducers, stop_after_layer=stop_after)
        if after_batch is not None:
            after_batch(min(lo + rows, pack.n_contexts), int(batch["counted"].sum()))


def fold_pack(model: LoadedModel, pack: TokenPack, groups: Sequence[UnitGroup], runs: Sequence[stream.Running], rows: int, first_context: int, **batches) -> None:
    """Fold ``pack``'s contexts into ``runs`` (:func:`each_batch`'s options); context ``i`` is number ``first_context + i``."""
    each_batch(model, pack, groups, rows, lambda i, acts, lo, counted: stream.update(runs[i], acts, counted, first_context + lo), **batches)


def _stream(model, placed: _Placed, groups, top_k, window, rows, checkpoint: _Checkpoint, every: float, progress, should_stop) -> tuple[list[stream.Running], dict[str, float]]:
    """The local engine: one pass, resumed from ``checkpoint`` when it holds a stopped build of the same text and units."""
    pack, device = placed.pack, model.device
    saved = checkpoint.load(device)
    if saved is not None:
        runs, state = saved
    else:
        runs = [stream.new_running(g.count, top_k, pack.context_size, window[0], window[1], device) for g in groups]
        state = {"row": 0, "done": 0, "forward": 0.0}
    total = pack.n_tokens
    if progress is not None:
        progress(state["done"], total)
    start, last_save = time.perf_counter() - state["forward"], time.perf_counter()

    def before_batch(row: int) -> None:
        nonlocal last_save
        stopping = should_stop is not None and should_stop()
        try:
            check_stop()
        except BaseException:
            stopping = True
            raise
        finally:
            if stopping or time.perf_counter() - last_save >= every:
                checkpoint.save(runs, {**state, "row": row, "forward": time.perf_counter() - start})
                last_save = time.perf_counter()
        if stopping:
            raise IndexBuildStopped(f"the index build was stopped after {state['done']:,} of {total:,} tokens",
                                    hint="run the same command again to resume; the previous index, if any, is unchanged")

    def after_batch(row: int, tokens: int) -> None:
        state["done"] += tokens
        if progress is not None:
            progress(state["done"], total)

    fold_pack(model, pack, groups, runs, rows, placed.first_context, start_row=state["row"], before_batch=before_batch, after_batch=after_batch)
    return runs, {"forward": time.perf_counter() - start}


class _Checkpoint:
    """A stopped build's statistics beside ``out`` (``.NAME.resume``), kept only for a build of the same model, text, units and options."""

    def __init__(self, out: Path, fingerprint: str):
        self.path = out.with_name(f".{out.name}.resume")
        self.fingerprint = fingerprint

    def fresh(self) -> _Checkpoint:
        self.remove()
        return self

    def load(self, device) -> tuple[list[stream.Running], dict] | None:
        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a truncated or foreign file: start over
            return None
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            return None
        return [stream.from_state(s, device) for s in saved["runs"]], saved["state"]

    def save(self, runs: Sequence[stream.Running], state: dict) -> None:
        tmp = self.path.with_name(self.path.name + f".{uuid.uuid4().hex[:8]}")
        try:
            torch.save({"fingerprint": self.fingerprint, "state": state, "runs": [stream.state_of(r) for r in runs]}, tmp)
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)  # a checkpoint is a convenience: a full disk only loses it

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _fingerprint(model: LoadedModel, placed: _Placed, groups: Sequence[UnitGroup], top_k: int, window: tuple[int, int], base) -> str:
    """What a checkpoint must match to be resumed: the model's weights, the text, the units and every option that changes the result."""
    import hashlib

    from hexray.features.tuned_lens import unembed_hash

    def weights(t: torch.Tensor) -> str:
        return hashlib.sha256(np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy()).data).hexdigest()[:16]

    parts = [FORMAT, model_key(model.name), unembed_hash(model), weights(model.W_out[0]), placed.pack.key, placed.first_context,
             weights(placed.pack.counted.to(torch.float32)), top_k, list(window),
             [(g.kind, g.layer, g.count, "" if g.dictionary is None else weights(g.dictionary.W_enc)) for g in groups],
             None if base is None else [base.info.created, base.info.tokens]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _labels(model: LoadedModel, runs, groups, texts: _Texts, held_out: TokenPack, rows: int, should_stop) -> list[list]:
    """Each unit's automatic label: rules from its top examples, scored on ``held_out`` (one more pass)."""
    from hexray.neuroscope import labels

    if held_out.context_size != texts.placed.pack.context_size:
        raise HexRayError("the held-out text's contexts are not the index's size", field="held_out")  # a HexRay bug

    def before_batch(_row: int) -> None:
        if should_stop is not None and should_stop():
            raise IndexBuildStopped("the index build was stopped while scoring its labels", hint="run the same command again to resume")
        check_stop()

    rules = [labels.propose(r.top_gidx.cpu(), texts.tokens, held_out.context_size) for r in runs]
    scores = labels.score_rules(model, held_out, groups, rules, rows, before_batch=before_batch)
    return [labels.choose(r, sc, model.token_str) for r, sc in zip(rules, scores)]


def _effects(model: LoadedModel, group: UnitGroup, n: int):
    dirs = output_directions(model, group) if n > 0 else None
    return None if dirs is None else logit_effects(model, dirs, n)


def _meta(model: LoadedModel, placed: _Placed, texts: _Texts, groups: Sequence[UnitGroup], top_k: int, window: tuple[int, int], base: _Base | None) -> dict[str, Any]:
    from hexray import __version__
    from hexray.features.tuned_lens import unembed_hash

    pack = placed.pack
    counts: dict[str, int] = {}
    for g in groups:
        counts[g.kind] = counts.get(g.kind, 0) + g.count
    bos = model.tokenizer.bos_token_id
    sources = ([] if base is None else list(base.meta["sources"])) + [{
        "corpus": pack.source, "source_key": source_key(model, pack.source, pack.context_size), "pack_key": pack.key, "tokens": pack.n_tokens,
        "first_context": placed.first_context, "contexts": pack.n_contexts, "first_document": placed.first_document, "documents": len(pack.documents),
    }]
    labels = list(dict.fromkeys(s["corpus"] for s in sources))
    return {
        "format": FORMAT,
        "model": model.name,
        "model_key": model_key(model.name),
        "weights": unembed_hash(model),
        "spec": dataclasses.asdict(model.spec),
        "corpus": " + ".join(labels),
        "corpus_key": pack.key if len(sources) == 1 else "+".join(s["pack_key"] for s in sources),
        "sources": sources,
        "tokens": sum(s["tokens"] for s in sources),
        "contexts": max(s["first_context"] + s["contexts"] for s in sources),  # context numbers in use: 0 ..
        "documents": max(s["first_document"] + s["documents"] for s in sources),
        "context_size": pack.context_size,
        "bos": bool(bos is not None and bool((pack.tokens[:, 0] == bos).all())) and (base is None or base.info.bos),
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


def source_key(model: LoadedModel, source: str | Path | None, context_size: int) -> str:
    """What identifies a source's packed text (the corpus's files and the packing, not how many tokens were taken)."""
    from hexray.corpus.packs import pack_key

    return pack_key(model, None if source in (None, "default") else source, context_size=context_size, max_tokens=None)


def indexed_tokens(path: str | Path, model: LoadedModel, source: str | Path | None, context_size: int) -> int:
    """How many counted tokens of ``source`` (packed in contexts of ``context_size``) the index at ``path`` holds from its start (0: none, or no index)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return 0
    con = _connect(path)
    try:
        meta = _read_meta(con, path)
    finally:
        con.close()
    key = source_key(model, source, context_size)
    return sum(int(s["tokens"]) for s in meta.get("sources", ()) if s["source_key"] == key)


def split_held_out(pack: TokenPack, tokens: int) -> tuple[TokenPack, TokenPack | None]:
    """(``pack``'s first ``tokens`` counted tokens, the contexts after the one where they end, or None): text to index, and held-out text for labels."""
    keep = pack.counted & (pack.counted.reshape(-1).cumsum(0).view_as(pack.counted) <= tokens)
    rows = int(keep.any(1).nonzero().max()) + 1 if keep.any() else 0
    head = TokenPack(pack.tokens[:rows], keep[:rows].clone(), torch.where(keep, pack.doc, -1)[:rows], pack.documents, pack.source,
                     pack.key if bool((keep == pack.counted).all()) else f"{pack.key}[:{tokens} tokens]")
    rest = pack[rows:] if rows < pack.n_contexts else None
    return head, rest if rest is not None and rest.n_tokens else None


# ---------------------------------------------------------------------------------------------
# extending (--add)
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Base:
    """The index ``--add`` extends: its units, its statistics as running ones, and what its examples' rows hold."""

    info: IndexInfo
    meta: dict[str, Any]
    groups: tuple[UnitGroup, ...]
    runs: list[stream.Running]
    contexts: dict[int, np.ndarray]  # context -> its token ids
    documents: dict[int, str]  # document -> name
    example_rows: dict[int, tuple[int, int]]  # global token index -> (token, document) of every stored example
    labels: list[tuple] = field(default_factory=list)  # its labels' rows (unit_id, source, label, rule, tokens, score)

    def place(self, model: LoadedModel, pack: TokenPack) -> _Placed:
        """Where ``pack``'s text goes: after the index's own text of the same source (skipping what it holds), else after everything."""
        if pack.context_size != self.info.context_size:
            raise HexRayError(f"the index's contexts are {self.info.context_size} tokens, not {pack.context_size}", hint=f"add with --context-size {self.info.context_size}", field="context_size")
        key = source_key(model, pack.source, pack.context_size)
        held = [s for s in self.meta["sources"] if s["source_key"] == key]
        if not held:
            return _Placed(pack, int(self.meta["contexts"]), int(self.meta["documents"]))
        have, first_context = sum(int(s["tokens"]) for s in held), int(held[0]["first_context"])
        flat = pack.counted.reshape(-1)
        new = flat & (flat.cumsum(0) > have)
        if not bool(new.any()):
            raise HexRayError(f"the index already holds these {pack.n_tokens:,} tokens of {pack.source} (it has {have:,})",
                              hint=f"ask for more than {have:,} tokens, or add another --corpus", field="corpus")
        P = pack.context_size
        first_row = int(new.nonzero()[0, 0]) // P
        old = (flat & ~new).view_as(pack.counted)  # positions the index already read
        for row in range(first_row + 1):
            stored = self.contexts.get(first_context + row)
            if stored is not None and not np.array_equal(stored[old[row].numpy()], pack.tokens[row].numpy()[old[row].numpy()]):
                raise HexRayError(f"the index's text of {pack.source} is not the start of this {pack.source}", hint="the corpus changed since the index was built: build a new index", field="corpus")
        counted = new.view_as(pack.counted)[first_row:]
        placed = TokenPack(pack.tokens[first_row:], counted.clone(), torch.where(counted, pack.doc[first_row:], -1), pack.documents, pack.source, f"{pack.key}[after {have}]")
        return _Placed(placed, first_context + first_row, int(held[0]["first_document"]))

    def close(self) -> None:
        self.runs, self.contexts, self.example_rows = [], {}, {}


def _read_base(out: Path, model: LoadedModel, pack: TokenPack, units, top_k: int, window: tuple[int, int]) -> _Base:
    from hexray.features.store import load_named
    from hexray.features.tuned_lens import unembed_hash

    if not out.is_file():
        raise HexRayError(f"no index at {out} to add to", hint="build one first (without --add)", field="out")
    con = _connect(out)
    try:
        meta = _read_meta(con, out)
        info = _info(out, meta)
        if info.model_key != model_key(model.name) or info.weights != unembed_hash(model):
            raise HexRayError(f"the index {out} was built for {'another ' if info.model_key == model_key(model.name) else ''}{info.model}",
                              hint="add to an index of this model, or build a new one", field="out")
        rows = con.execute("SELECT kind, layer, dictionary, site, count(*), min(unit_id) FROM units GROUP BY ALL ORDER BY min(unit_id)").fetchall()
        spec, groups = model.spec, []
        for kind, layer, dictionary, site, count, _ in rows:
            if kind == "neuron":
                groups.append(UnitGroup("neuron", int(layer), int(count), sites.mlp_post(int(layer))))
            elif kind == "head":
                groups.append(UnitGroup("head", int(layer), int(count), sites.head_z(int(layer))))
            else:
                d = load_named(dictionary, spec, field="units")[0]
                if (d.d_sae, d.site.layer, d.site.kind) != (count, layer, site):
                    raise HexRayError(f"the dictionary {dictionary} is not the one the index was built with", hint="build a new index", field="units")
                groups.append(parse_units([d], model)[0])
        if units is not None:
            wanted = [(g.kind, g.layer, g.count, g.dictionary_name) for g in parse_units(units, model)]
            if wanted != [(g.kind, g.layer, g.count, g.dictionary_name) for g in groups]:
                raise HexRayError("--add keeps the index's units", hint="leave out --units, or build a new index", field="units")
        runs, example_rows = _runs_from(con, meta, groups, model.device)
        contexts = {int(c): np.asarray(t, dtype=np.int64) for c, t in con.execute("SELECT context, tokens FROM contexts").fetchall()}
        documents = dict(con.execute("SELECT document, name FROM documents").fetchall())
        kept = con.execute("SELECT unit_id, source, label, rule, tokens, score FROM labels").fetchall()
    finally:
        con.close()
    return _Base(info, meta, tuple(groups), runs, contexts, documents, example_rows, kept)


def _runs_from(con, meta: dict, groups: Sequence[UnitGroup], device) -> tuple[list[stream.Running], dict[int, tuple[int, int]]]:
    """The stored statistics as :class:`~hexray.neuroscope.stream.Running` ones (what the build would hold had it read the index's text)."""
    P, k = int(meta["context_size"]), int(meta["top_k"])
    before, after = meta["window"]
    width = before + 1 + after
    units = con.execute("SELECT unit_id, mean, fired, histogram_start, histogram FROM units ORDER BY unit_id").to_arrow_table()
    ex = con.execute("SELECT unit_id, sample, rank, context, position, token, document, activation, acts, acts_scale FROM examples").to_arrow_table()
    uid = ex["unit_id"].to_numpy()
    gidx = ex["context"].to_numpy().astype(np.int64) * P + ex["position"].to_numpy().astype(np.int64)
    acts = ex["acts"].combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int8).reshape(-1, width)
    win = np.where(acts == -128, np.nan, acts * (ex["acts_scale"].to_numpy()[:, None] / 127)).astype(np.float32)
    value = ex["activation"].to_numpy().astype(np.float32)
    win[:, before] = np.where(np.isnan(win[:, before]), np.nan, value)  # the example's own activation, exact
    sample, rank = ex["sample"].to_numpy(zero_copy_only=False), ex["rank"].to_numpy().astype(np.int64)
    example_rows = dict(zip(gidx.tolist(), zip(ex["token"].to_numpy().tolist(), ex["document"].to_numpy().tolist())))
    mean, fired = units["mean"].to_numpy(), units["fired"].to_numpy()
    starts, hists = units["histogram_start"].to_numpy(), units["histogram"].to_pylist()
    counted = int(meta["tokens"])
    runs, offset = [], 0
    for g in groups:
        run = stream.new_running(g.count, k, P, before, after, "cpu")
        sel = (uid >= offset) & (uid < offset + g.count)
        top, smp = sel & ~sample, sel & sample
        u, r = torch.from_numpy(uid[top] - offset).long(), torch.from_numpy(rank[top])
        run.top_val[u, r] = torch.from_numpy(value[top])
        run.top_gidx[u, r] = torch.from_numpy(gidx[top])
        run.top_win[u, r] = torch.from_numpy(win[top])
        u, b, g_s = torch.from_numpy(uid[smp] - offset).long(), torch.from_numpy(rank[smp]), torch.from_numpy(gidx[smp])
        run.samp_key[b, u] = stream.priority(g_s) << 32 | g_s
        run.samp_val[b, u] = torch.from_numpy(value[smp])
        run.samp_win[b, u] = torch.from_numpy(win[smp])
        run.total = torch.from_numpy(mean[offset : offset + g.count] * counted).double()
        run.fired = torch.from_numpy(fired[offset : offset + g.count]).long()
        run.counted = counted
        for i in range(g.count):
            h = hists[offset + i] or []
            run.hist[int(starts[offset + i]) : int(starts[offset + i]) + len(h), i] = torch.tensor(h, dtype=torch.int64)
        run.sampled = int(run.hist[:, 0].sum()) if g.count else 0
        runs.append(stream.from_state(stream.state_of(run), device))
        offset += g.count
    return runs, example_rows


@dataclass(eq=False)
class _Texts:
    """Where the written index reads token ids and document names: the new text, else (``--add``) the previous index."""

    placed: _Placed
    base: _Base | None

    def tokens(self, contexts: np.ndarray) -> np.ndarray:
        """[n, P] the ids of ``contexts`` (the new pack's when it holds them: a continued context only grows)."""
        pack, first = self.placed.pack, self.placed.first_context
        rows = []
        for c in contexts.tolist():
            rows.append(pack.tokens[c - first].numpy() if 0 <= c - first < pack.n_contexts else self.base.contexts[c])
        return np.stack(rows) if rows else np.zeros((0, pack.context_size), dtype=np.int64)

    def examples(self, gidx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The token and document at each of ``gidx`` (global token indices of examples)."""
        pack, first, P = self.placed.pack, self.placed.first_context, self.placed.pack.context_size
        row, pos = gidx // P - first, gidx % P
        inside = (row >= 0) & (row < pack.n_contexts)
        r, p = np.where(inside, row, 0), pos
        new = inside & pack.counted.numpy()[r, p]
        token = np.where(new, pack.tokens.numpy()[r, p], -1)
        document = np.where(new, pack.doc.numpy()[r, p].astype(np.int64) + self.placed.first_document, -1)
        for i in np.flatnonzero(~new):
            token[i], document[i] = self.base.example_rows[int(gidx[i])]
        return token.astype(np.int32), document.astype(np.int32)

    def document_names(self, documents: np.ndarray) -> list[str]:
        pack, first = self.placed.pack, self.placed.first_document
        return [pack.documents[d - first] if 0 <= d - first < len(pack.documents) else self.base.documents[d] for d in documents.tolist()]


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
CREATE TABLE labels (unit_id INTEGER, source VARCHAR, label VARCHAR, rule VARCHAR, tokens INTEGER[], score FLOAT, PRIMARY KEY (unit_id, source));
"""


def _write(tmp: Path, model, texts: _Texts, groups, finished: list[stream.Finished], effects, labels, meta: dict, seconds: dict, start: float) -> None:
    import duckdb
    import pyarrow as pa

    width = meta["window"][0] + 1 + meta["window"][1]
    units_tbl = _units_table(groups, finished, effects)
    examples_tbl = _examples_table(texts, meta["context_size"], groups, finished, width)
    used = np.unique(examples_tbl["context"].to_numpy())
    tokens = texts.tokens(used)
    doc_of = examples_tbl["document"].to_numpy()
    used_docs = np.unique(doc_of[doc_of >= 0])
    vocab_ids = set(np.unique(tokens).tolist())
    for e in effects:
        if e is not None:
            vocab_ids |= set(torch.unique(e[0]).tolist()) | set(torch.unique(e[2]).tolist())
    kept = [] if texts.base is None else [r for r in texts.base.labels if labels is None or r[1] != "auto"]  # new automatic labels replace the old
    labels_tbl = _labels_table(groups, labels, kept)
    vocab_ids |= set(labels_tbl["tokens"].combine_chunks().flatten().to_numpy().tolist())
    vocab_ids = sorted(vocab_ids)
    contexts_tbl = pa.table({"context": used.astype(np.int32), "tokens": pa.array(list(tokens.astype(np.int32)), type=pa.list_(pa.int32()))})
    documents_tbl = pa.table({"document": used_docs.astype(np.int32), "name": texts.document_names(used_docs)})
    vocab_tbl = pa.table({"token": np.asarray(vocab_ids, dtype=np.int32), "text": [model.token_str(i) for i in vocab_ids]})

    con = duckdb.connect(str(tmp))
    try:
        con.execute(_SCHEMA.format(width=width))
        for name, tbl in (("units", units_tbl), ("examples", examples_tbl), ("contexts", contexts_tbl), ("documents", documents_tbl), ("vocab", vocab_tbl),
                          ("labels", labels_tbl)):
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


def _labels_table(groups: Sequence[UnitGroup], labels, kept: Sequence[tuple] = ()):
    """One row per label: the automatic ones (``labels``, per group and unit), and rows ``kept`` from the previous index."""
    import pyarrow as pa

    rows = {c: [] for c in ("unit_id", "source", "label", "rule", "tokens", "score")}
    for row in kept:
        for c, v in zip(rows, row):
            rows[c].append(v)
    offset = 0
    for g, group_labels in zip(groups, labels or [None] * len(groups)):
        for u, label in enumerate(group_labels or ()):
            if label is not None:
                for c, v in (("unit_id", offset + u), ("source", label.source), ("label", label.text), ("rule", label.rule), ("tokens", list(label.tokens)), ("score", label.score)):
                    rows[c].append(v)
        offset += g.count
    return pa.table({"unit_id": pa.array(rows["unit_id"], pa.int32()), "source": pa.array(rows["source"], pa.string()), "label": pa.array(rows["label"], pa.string()),
                     "rule": pa.array(rows["rule"], pa.string()), "tokens": pa.array(rows["tokens"], pa.list_(pa.int32())), "score": pa.array(rows["score"], pa.float32())})


def _examples_table(texts: _Texts, P: int, groups: Sequence[UnitGroup], finished: Sequence[stream.Finished], width: int):
    """One row per stored example (top k, then quantile samples), sorted by (unit_id, sample, rank)."""
    import pyarrow as pa

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
    token, document = texts.examples(gidx)
    acts, scale = _quantised(cat["acts"][order])
    return pa.table({
        "unit_id": cat["unit_id"][order], "sample": cat["sample"][order], "rank": cat["rank"][order],
        "context": (gidx // P).astype(np.int32), "position": (gidx % P).astype(np.int16), "token": token, "document": document,
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
    # DuckDB keeps one database per path and process: connect() would hand back the file a rebuild
    # replaced while any connection to it is open. Attaching into a fresh in-memory one reads the file now.
    con = duckdb.connect(":memory:")
    try:
        quoted = str(path).replace("'", "''")
        con.execute(f"ATTACH '{quoted}' AS neuroscope (READ_ONLY)")
        con.execute("USE neuroscope")
        return con
    except Exception as exc:
        con.close()
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
            sources=tuple(meta.get("sources", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise HexRayError(f"{path}: the index's meta table is incomplete ({first_line(exc, 80)})", hint="build it again with hexray index build", field="index") from None


def default_index_path(spec: ModelSpec) -> Path:
    """Where ``hexray index build`` writes, and unit pages read, by default: ``<cache>/neuroscope/<model>.duckdb``."""
    from hexray.models.loading import cache_root

    return cache_root() / "neuroscope" / f"{model_key(spec.name)}.duckdb"
