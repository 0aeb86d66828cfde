"""Reading an index: unit pages, and the reverse look-ups (a prompt's token, a vocabulary token).

Units are :class:`~hexray.tracing.sites.Component` values; text (``L10N1234``, ``L9H6``,
``L10F123``, ``NAME:123``) is parsed once, at the boundary, by :func:`parse_unit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel
from hexray.neuroscope.index import Index, dequantised
from hexray.neuroscope.labels import Label
from hexray.tracing import sites
from hexray.tracing.sites import Component

_KINDS = ("neuron", "head", "feature")


@dataclass(frozen=True)
class UnitRef:
    """One indexed unit: its component, and its dictionary for features ("" otherwise)."""

    unit: Component
    dictionary: str = ""

    @property
    def name(self) -> str:
        return f"{self.dictionary}:{self.unit.feature}" if self.unit.kind == "feature" else self.unit.name


@dataclass(frozen=True)
class Example:
    """One stored example: the exact ids the model saw up to ``position``, and a window of activations around it."""

    context: int  # the context's index in the pack
    position: int  # the token's position in its context
    activation: float
    document: str | None
    context_ids: tuple[int, ...]  # the token ids of the context up to and including ``position``: what the activation depends on
    window_start: int  # the context position of the window's first token
    token_ids: tuple[int, ...]  # the window's tokens
    tokens: tuple[str, ...]  # ... decoded
    acts: tuple[float, ...]  # the unit's activation at each window token (nan: not counted, e.g. BOS), within 0.4% of the window's largest |act|; exact at ``position``
    band: tuple[float, float] | None = None  # quantile samples: the activation range it was drawn from

    @property
    def token(self) -> str:
        return self.tokens[self.position - self.window_start]


@dataclass(frozen=True)
class LogitEffect:
    token_id: int
    token: str
    value: float  # per unit of activation, before the final norm's per-token scale


@dataclass(frozen=True)
class HistogramBin:
    lower: float
    upper: float
    count: int  # positions of the sample (1 in ``sample_every`` counted positions)


@dataclass(frozen=True)
class UnitPage:
    """Everything the index knows about one unit."""

    unit: Component
    dictionary: str
    name: str  # L10N1234, L9H6, NAME:123
    max: float  # 0 when the unit never fires
    mean: float
    density: float  # fraction of counted positions with activation > 0
    fired: int
    counted: int
    top: tuple[Example, ...]  # best first (activation desc, then context, then position)
    samples: tuple[Example, ...]  # one per octave of activation, highest first
    histogram: tuple[HistogramBin, ...]  # non-empty bins of the positive activations, ascending
    nonpositive: int  # sampled positions at or below 0
    sampled: int  # positions the histogram counts
    promoted: tuple[LogitEffect, ...]  # empty for heads
    suppressed: tuple[LogitEffect, ...]
    labels: tuple[Label, ...] = ()  # the automatic label and any explainer's, best score first

    @property
    def label(self) -> Label | None:
        """The best-scoring label (None when the index has none for this unit)."""
        return self.labels[0] if self.labels else None


def parse_unit(index: Index, text: str) -> UnitRef:
    """``L10N1234``, ``L9H6``, ``L10F123`` (when one dictionary has layer 10) or ``NAME:123`` as an indexed unit."""
    raw = text.strip()
    if ":" in raw:  # NAME:123 (component labels never hold a colon; dictionary names may)
        name, _, number = (part.strip() for part in raw.rpartition(":"))
        known = _dictionaries(index)
        if name not in known:
            raise HexRayError(f"{{field}}: the index has no dictionary {name!r}", hint=_dictionary_hint(index), field="unit", http_status=404)
        if not number.isdigit():
            raise HexRayError(f"{{field}}: {raw!r} names no feature", hint=f"give {name}:123", field="unit")
        d = known[name]
        return _check(index, UnitRef(Component("feature", d["layer"], feature=int(number), site=d["site"]), name))
    c = sites.parse_component(raw, index.spec)
    if c.kind not in _KINDS:
        raise HexRayError(f"{{field}}: {raw} is not a unit the neuroscope indexes", hint="give a neuron (L10N1234), a head (L9H6) or a feature (NAME:123)", field="unit")
    return resolve(index, c)


def resolve(index: Index, unit: Component, dictionary: str | None = None) -> UnitRef:
    """``unit`` as an indexed unit; a feature without ``dictionary`` needs exactly one dictionary at its layer."""
    if unit.kind == "feature" and not dictionary:
        at = [n for n, d in _dictionaries(index).items() if d["layer"] == unit.layer and (unit.site is None or d["site"] == unit.site)]
        if len(at) != 1:
            raise HexRayError(f"{{field}}: {unit.name} is ambiguous" if at else f"{{field}}: the index has no dictionary at layer {unit.layer}",
                              hint=f"name the dictionary: NAME:{unit.feature} ({_dictionary_hint(index)})", field="unit", http_status=404 if not at else 422)
        dictionary = at[0]
    if unit.kind == "feature":
        known = _dictionaries(index).get(dictionary)
        if known is None:
            raise HexRayError(f"{{field}}: the index has no dictionary {dictionary!r}", hint=_dictionary_hint(index), field="unit", http_status=404)
        if unit.layer is not None and unit.layer != known["layer"]:
            raise HexRayError(f"{{field}}: dictionary {dictionary} is at layer {known['layer']}, not {unit.layer}", hint=f"give {dictionary}:{unit.feature}", field="unit")
        unit = Component("feature", known["layer"], feature=unit.feature, site=known["site"])
    return _check(index, UnitRef(unit, dictionary or ""))


def _check(index: Index, ref: UnitRef) -> UnitRef:
    if _unit_id(index, ref) is None:
        raise HexRayError(f"{{field}}: {ref.name} is not in the index", hint=f"the index holds {', '.join(f'{n} {k}s' for k, n in index.info.units.items())}", field="unit", http_status=404)
    return ref


def _dictionary_hint(index: Index) -> str:
    names = list(_dictionaries(index))
    return f"its dictionaries: {', '.join(names)}" if names else "it indexes no dictionary"


def _dictionaries(index: Index) -> dict[str, dict]:
    if "dicts" not in index._cache:
        rows = index.con.execute("SELECT DISTINCT dictionary, layer, site FROM units WHERE kind = 'feature'").fetchall()
        index._cache["dicts"] = {name: {"layer": int(layer), "site": site} for name, layer, site in rows}
    return index._cache["dicts"]


def _units(index: Index) -> dict[tuple, int]:
    """(kind, layer, unit, dictionary) -> unit_id, read once per open index."""
    if "units" not in index._cache:
        rows = index.con.execute("SELECT kind, layer, unit, dictionary, unit_id FROM units").fetchall()
        index._cache["units"] = {(k, int(layer), int(u), d): int(i) for k, layer, u, d, i in rows}
    return index._cache["units"]


def _unit_id(index: Index, ref: UnitRef) -> int | None:
    return _units(index).get((ref.unit.kind, ref.unit.layer, ref.unit.unit, ref.dictionary))


def _vocab(index: Index) -> dict[int, str]:
    if "vocab" not in index._cache:
        index._cache["vocab"] = dict(index.con.execute("SELECT token, text FROM vocab").fetchall())
    return index._cache["vocab"]


def _meta(index: Index, key: str):
    cache = index._cache.setdefault("meta", {})
    if key not in cache:
        import json

        row = index.con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        cache[key] = None if row is None else json.loads(row[0])
    return cache[key]


# The one query behind a page: the unit's row with its examples (and their contexts' ids) as a list.
_PAGE = """
SELECT u.max, u.mean, u.density, u.fired, u.histogram_start, u.histogram, u.promoted, u.promoted_logits, u.suppressed, u.suppressed_logits,
       (SELECT list({'sample': e.sample, 'rank': e.rank, 'context': e.context, 'position': e.position, 'activation': e.activation,
                     'acts': e.acts, 'scale': e.acts_scale, 'tokens': c.tokens, 'document': d.name} ORDER BY e.sample, e.rank)
          FROM examples e JOIN contexts c ON c.context = e.context LEFT JOIN documents d ON d.document = e.document
         WHERE e.unit_id = $id) AS examples,
       (SELECT list({'source': l.source, 'label': l.label, 'rule': l.rule, 'tokens': l.tokens, 'score': l.score} ORDER BY isnan(l.score), l.score DESC, l.source)
          FROM labels l WHERE l.unit_id = $id) AS labels
FROM units u WHERE u.unit_id = $id
"""


def unit_page(index: Index, unit: UnitRef | Component | str, *, dictionary: str | None = None) -> UnitPage:
    """The page of ``unit`` (a :class:`UnitRef`, a component, or text for :func:`parse_unit`)."""
    ref = parse_unit(index, unit) if isinstance(unit, str) else unit if isinstance(unit, UnitRef) else resolve(index, unit, dictionary)
    uid = _unit_id(index, ref)
    if uid is None:
        _check(index, ref)
    mx, mean, density, fired, hist_start, hist, promoted, promoted_v, suppressed, suppressed_v, examples, labels = index.con.execute(_PAGE, {"id": uid}).fetchone()
    vocab = _vocab(index)
    before, after = index.info.window
    bands = _meta(index, "band_edges") + [math.inf]
    top, samples = [], []
    for e in examples or ():
        pos, acts = int(e["position"]), dequantised(e["acts"], e["scale"])
        acts[before] = float(e["activation"])  # the example's own activation, exact
        start = pos - before
        lo, hi = max(0, start), min(len(e["tokens"]), pos + after + 1)  # the window clipped to the context
        ids = tuple(int(t) for t in e["tokens"][lo:hi])
        example = Example(
            context=int(e["context"]), position=pos, activation=float(e["activation"]), document=e["document"],
            context_ids=tuple(int(t) for t in e["tokens"][: pos + 1]), window_start=lo, token_ids=ids,
            tokens=tuple(vocab.get(t, "") for t in ids), acts=tuple(acts[lo - start : hi - start]),
            band=(bands[int(e["rank"])], bands[int(e["rank"]) + 1]) if e["sample"] else None,
        )
        (samples if e["sample"] else top).append(example)
    edges = _meta(index, "bin_edges") + [math.inf]
    counts = [0] * hist_start + list(hist)
    histogram = tuple(HistogramBin(edges[i], edges[i + 1], int(c)) for i, c in enumerate(counts) if i > 0 and c)

    def effects(ids, values):
        return tuple(LogitEffect(int(t), vocab.get(int(t), ""), float(v)) for t, v in zip(ids or (), values or ()))

    return UnitPage(
        unit=ref.unit, dictionary=ref.dictionary, name=ref.name, max=float(mx), mean=float(mean), density=float(density), fired=int(fired),
        counted=index.info.tokens, top=tuple(top), samples=tuple(reversed(samples)), histogram=histogram, nonpositive=counts[0] if counts else 0,
        sampled=int(sum(counts)), promoted=effects(promoted, promoted_v), suppressed=effects(suppressed, suppressed_v),
        labels=tuple(Label(row["label"], row["rule"], tuple(row["tokens"] or ()), float(row["score"]), row["source"]) for row in labels or ()),
    )


# ---------------------------------------------------------------------------------------------
# reverse look-ups
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitHit:
    """A unit a look-up found."""

    unit: UnitRef
    score: float  # search_position: activation / max; search_token: the share of its top examples centred on the token
    activation: float  # search_position: at the token; search_token: its best example's
    max: float


@dataclass(frozen=True)
class PositionSearch:
    prompt_ids: tuple[int, ...]  # what the model saw (with BOS when the index's contexts start with it)
    tokens: tuple[str, ...]
    position: int
    hits: tuple[UnitHit, ...]  # by score, highest first


def search_position(index: Index, model: LoadedModel, prompt: str, position: int, *, limit: int = 20, dictionaries=()) -> PositionSearch:
    """The units that fire most at ``prompt``'s token ``position`` relative to their own max in the index (one forward pass).

    ``position`` counts the tokens the model sees (BOS first when the index's contexts start with
    it; -1 is the last). The index's dictionaries are loaded by name unless ``dictionaries`` gives them.
    """
    from hexray.features.dictionary import model_key
    from hexray.features.store import load_named
    from hexray.features.tuned_lens import unembed_hash
    from hexray.neuroscope.units import UnitGroup, activation_fn, parse_units
    from hexray.tracing.engine import resolve_position, run_trace

    if model_key(model.name) != index.info.model_key or unembed_hash(model) != index.info.weights:
        raise HexRayError(f"the index {index.path} was built for another {index.info.model}" if model_key(model.name) == index.info.model_key
                          else f"the index {index.path} was built for {index.info.model}, not {model.name}", hint="build one for this model", field="index")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise HexRayError(f"{{field}} must be at least 1, got {limit!r}", field="limit")
    kinds = {k for k in index.info.units if k != "feature"}
    groups: list[UnitGroup] = list(parse_units(",".join(f"{k}s" for k in sorted(kinds)), model)) if kinds else []
    given = {d.name or d.site.label: d for d in dictionaries}
    for name in index.info.dictionaries:
        d = given.get(name) or load_named(name, model.spec, field="index")[0]
        group = parse_units([d], model)[0]
        known = _dictionaries(index)[name]
        if (group.layer, group.site) != (known["layer"], known["site"]) or (group.kind, group.layer, group.count - 1, name) not in _units(index):
            raise HexRayError(f"the dictionary {name} is not the one the index was built with", hint="build the index again", field="index")
        groups.append(group)
    trace = run_trace(model, prompt, sorted({g.hook for g in groups}), prepend_bos=True if index.info.bos else None)
    pos = resolve_position(position, trace.n_tokens, field_name="position")
    table, parts = _units(index), []
    for g in groups:
        with torch.inference_mode():
            a = activation_fn(model, g)(trace.acts[g.hook][pos : pos + 1])[0]  # [count]
        first = table[(g.kind, g.layer, 0, g.dictionary_name)]  # a group's units have consecutive ids
        parts.append((torch.arange(first, first + g.count), a.float().cpu()))
    uid, act = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    maxes = _maxima(index)[uid]
    score = torch.where(maxes > 0, act / maxes.clamp_min(1e-12), 0.0)
    order = torch.argsort(score, descending=True, stable=True)[:limit]
    hits = tuple(UnitHit(_ref(index, int(uid[i])), float(score[i]), float(act[i]), float(maxes[i])) for i in order)
    return PositionSearch(trace.token_ids, trace.tokens, pos, hits)


def _maxima(index: Index) -> torch.Tensor:
    if "max" not in index._cache:
        rows = index.con.execute("SELECT max FROM units ORDER BY unit_id").fetchnumpy()
        index._cache["max"] = torch.from_numpy(np.asarray(rows["max"], dtype=np.float32))
    return index._cache["max"]


def _ref(index: Index, uid: int) -> UnitRef:
    if "keys" not in index._cache:
        keys: list = [None] * len(_units(index))
        for key, i in _units(index).items():
            keys[i] = key
        index._cache["keys"] = keys
    kind, layer, unit, dictionary = index._cache["keys"][uid]
    if kind == "neuron":
        return UnitRef(Component("neuron", layer, neuron=unit))
    if kind == "head":
        return UnitRef(sites.head(layer, unit))
    return UnitRef(Component("feature", layer, feature=unit, site=_dictionaries(index)[dictionary]["site"]), dictionary)


_BY_TOKEN = """
SELECT e.unit_id, count(*) AS hits, max(e.activation) AS best, any_value(u.max) AS max
FROM examples e JOIN units u ON u.unit_id = e.unit_id
WHERE NOT e.sample AND e.token = $token
GROUP BY e.unit_id ORDER BY hits DESC, best / greatest(any_value(u.max), 1e-12) DESC, e.unit_id LIMIT $limit
"""


def search_token(index: Index, token_id: int, *, limit: int = 20) -> tuple[UnitHit, ...]:
    """Units whose top examples centre on ``token_id``: by how many of their top-k do, then by the best such example."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise HexRayError(f"{{field}} must be at least 1, got {limit!r}", field="limit")
    if not 0 <= int(token_id) < index.spec.d_vocab:
        raise HexRayError(f"{{field}}: token id {token_id} is out of range", hint=f"use 0..{index.spec.d_vocab - 1}", field="token")
    rows = index.con.execute(_BY_TOKEN, {"token": int(token_id), "limit": limit}).fetchall()
    k = index.info.top_k
    return tuple(UnitHit(_ref(index, int(uid)), hits / k, float(best), float(mx)) for uid, hits, best, mx in rows)
