"""Labels for every unit without an external service, each with a score that can be wrong.

The automatic label is a rule read off the unit's own top examples: *fires on* the tokens at their
centre (``" Paris" · " London"``), or *fires after* the tokens just before it (``after " the"``).
Each rule is scored on held-out text the index never read: the Pearson correlation, over every
counted held-out position, between the unit's activation and the rule's 0/1 prediction (the
"correlation scoring" of Bills et al. 2023, with the rule as the simulator). The better-scoring
rule is the label; a unit whose rules predict nothing gets a low score, not a flattering label.

A user's own explainer (an LLM they run) plugs in through :class:`Explainer`: ``explain(page)``
returns a label, ``simulate(label, tokens)`` predicts activations, and :func:`explain_units` scores
those predictions the same way, on held-out windows, without HexRay depending on any model service.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from hexray.corpus.packs import TokenPack
from hexray.models.loading import LoadedModel
from hexray.neuroscope import stream
from hexray.neuroscope.units import UnitGroup

MAX_RULE_TOKENS = 3  # a rule names at most this many tokens
COVERAGE = 0.5  # ... adding tokens until they cover this share of the unit's top examples
RULES = ("on", "after")


@dataclass(frozen=True)
class Label:
    """A unit's label: its text, the rule behind it, and how well it predicts held-out activations."""

    text: str  # '" Paris" · " London"', 'after " the"', or an explainer's words
    rule: str  # "on" | "after" | the explainer's name
    tokens: tuple[int, ...]  # the rule's token ids (empty for an explainer)
    score: float  # Pearson correlation with the unit's activations on held-out text (nan: not measurable)
    source: str = "auto"


@dataclass(frozen=True, eq=False)
class Rules:
    """One group's candidate rules: [U, MAX_RULE_TOKENS] token ids per rule kind, -1 padding (a unit without examples has none)."""

    on: torch.Tensor
    after: torch.Tensor


def propose(top_gidx: torch.Tensor, context_tokens: Callable[[np.ndarray], np.ndarray], P: int) -> Rules:
    """Each unit's candidate rules from its top examples (``top_gidx`` [U, k], empty slots as in :mod:`.stream`)."""
    U = top_gidx.shape[0]
    filled = ~stream.is_empty(top_gidx)
    gidx = top_gidx[filled].numpy()
    contexts = np.unique(gidx // P)
    rows = {int(c): i for i, c in enumerate(contexts.tolist())}
    tokens = context_tokens(contexts) if contexts.size else np.zeros((0, P), dtype=np.int64)
    at = np.array([tokens[rows[int(g // P)], g % P] for g in gidx], dtype=np.int64)
    before = np.array([tokens[rows[int(g // P)], g % P - 1] if g % P > 0 else -1 for g in gidx], dtype=np.int64)
    unit = filled.nonzero()[:, 0].numpy()
    out = {kind: torch.full((U, MAX_RULE_TOKENS), -1, dtype=torch.int64) for kind in RULES}
    for kind, ids in (("on", at), ("after", before)):
        for u in np.unique(unit).tolist():
            seen = Counter(t for t in ids[unit == u].tolist() if t >= 0)
            n, covered = int((unit == u).sum()), 0
            for j, (t, c) in enumerate(seen.most_common(MAX_RULE_TOKENS)):
                if covered >= COVERAGE * n:
                    break
                out[kind][u, j] = t
                covered += c
    return Rules(out["on"], out["after"])


class Scorer:
    """Running sums over held-out positions for one group's rules: n, Σa, Σa², and per rule Σi, Σa·i."""

    def __init__(self, rules: Rules, vocab: int, device):
        self.n = 0
        self.kinds = {}
        self.sum_a = self.sum_aa = None
        for kind in RULES:
            ids = getattr(rules, kind)
            distinct = torch.unique(ids[ids >= 0])
            lookup = torch.full((vocab + 1,), len(distinct), dtype=torch.int64)  # the last row: no rule names this token (and id -1)
            lookup[distinct] = torch.arange(len(distinct))
            table = torch.zeros(len(distinct) + 1, ids.shape[0], dtype=torch.bool)  # [distinct tokens + 1, U]: does unit u's rule name it
            u, j = (ids >= 0).nonzero(as_tuple=True)
            table[lookup[ids[u, j]], u] = True
            self.kinds[kind] = {"lookup": lookup.to(device), "table": table.to(device), "sum_i": 0.0, "sum_ai": 0.0}

    def update(self, acts: torch.Tensor, tokens: torch.Tensor, counted: torch.Tensor) -> None:
        """``acts`` [B, P, U], ``tokens`` [B, P], ``counted`` [B, P]."""
        w = counted.reshape(-1).to(acts.dtype)  # [B*P]
        a = acts.reshape(-1, acts.shape[-1]).double()  # float64: sums over a whole corpus
        self.n += int(counted.sum())
        wa = w.double()[:, None] * a
        self.sum_a = wa.sum(0) if self.sum_a is None else self.sum_a + wa.sum(0)
        self.sum_aa = (wa * a).sum(0) if self.sum_aa is None else self.sum_aa + (wa * a).sum(0)
        previous = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], dim=1)  # the token before each position (-1 at a context's start)
        for kind, ids in (("on", tokens), ("after", previous)):
            k = self.kinds[kind]
            fires = k["table"][k["lookup"][ids.reshape(-1)]].to(torch.float64) * w.double()[:, None]  # [B*P, U]
            k["sum_i"] = k["sum_i"] + fires.sum(0)
            k["sum_ai"] = k["sum_ai"] + (fires * a).sum(0)

    def correlations(self) -> dict[str, torch.Tensor]:
        """Per rule kind, [U] the Pearson correlation (nan where the unit or the rule never varies)."""
        n = float(self.n)
        out = {}
        for kind, k in self.kinds.items():
            cov = n * k["sum_ai"] - self.sum_a * k["sum_i"]
            var_a = (n * self.sum_aa - self.sum_a**2).clamp_min(0)
            var_i = (n * k["sum_i"] - k["sum_i"] ** 2).clamp_min(0)
            den = (var_a * var_i).sqrt()
            out[kind] = torch.where(den > 0, cov / den.clamp_min(1e-300), torch.nan).float().cpu()
        return out


def score_rules(model: LoadedModel, held_out: TokenPack, groups: Sequence[UnitGroup], rules: Sequence[Rules], rows: int,
                before_batch: Callable[[int], None] | None = None) -> list[dict[str, torch.Tensor]]:
    """One pass over ``held_out``: each group's rules' correlations with its units' activations."""
    from hexray.neuroscope.index import each_batch

    scorers = [Scorer(r, model.spec.d_vocab, model.device) for r in rules]
    tokens = held_out.tokens.to(model.device)

    def consume(i: int, acts: torch.Tensor, lo: int, counted: torch.Tensor) -> None:
        scorers[i].update(acts, tokens[lo : lo + acts.shape[0]], counted)

    each_batch(model, held_out, groups, rows, consume, before_batch=before_batch)
    return [s.correlations() for s in scorers]


def choose(rules: Rules, scores: dict[str, torch.Tensor], token_text: Callable[[int], str]) -> list[Label | None]:
    """Per unit, the better-scoring of its rules as a label (None for a unit without examples)."""
    out: list[Label | None] = []
    for u in range(rules.on.shape[0]):
        best = None
        for kind in RULES:
            ids = tuple(int(t) for t in getattr(rules, kind)[u].tolist() if t >= 0)
            if not ids:
                continue
            score = float(scores[kind][u])
            if best is None or (not math.isnan(score) and (math.isnan(best.score) or score > best.score)):
                words = " · ".join(f'"{token_text(t)}"' for t in ids)
                best = Label(words if kind == "on" else f"after {words}", kind, ids, score)
        out.append(best)
    return out


# ---------------------------------------------------------------------------------------------
# a user's explainer
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class Explainer(Protocol):
    """What a user-supplied explainer provides (an LLM the user runs, a lookup table, a person).

    ``explain`` reads a unit's page (its top examples, samples, logit effects) and returns a short
    label. ``simulate`` predicts, from the label alone, the unit's activation at each token of a
    window of text; HexRay scores those predictions against the real activations on held-out text.
    """

    name: str

    def explain(self, page) -> str: ...

    def simulate(self, label: str, tokens: Sequence[str]) -> Sequence[float]: ...


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """The correlation of two equal-length sequences (nan when either is constant or empty)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 2 or a.shape != b.shape or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


WINDOWS = 10  # held-out contexts an explainer simulates per unit: the unit's most active half, then a random half


def explain_units(path, model: LoadedModel, explainer: Explainer, units: Sequence[str], held_out: TokenPack, *, windows: int = WINDOWS,
                  seed: int = 0, rows: int = 16) -> list[Label]:
    """``explainer``'s label for each of ``units`` (names as :func:`~hexray.neuroscope.pages.parse_unit` reads them), scored and stored.

    The score is the Pearson correlation between ``explainer.simulate(label, tokens)`` and the
    unit's real activations over ``windows`` held-out contexts (``held_out``: text the index did
    not read). The labels are written into the index (source: ``explainer.name``), replacing that
    explainer's earlier ones, in a copy moved into place when complete.
    """
    import os
    import shutil
    import uuid
    from pathlib import Path

    import duckdb

    from hexray.errors import HexRayError
    from hexray.neuroscope.index import _build_lock, each_batch, open_index
    from hexray.neuroscope.pages import _unit_id, parse_unit, unit_page
    from hexray.neuroscope.units import parse_units

    if not isinstance(explainer, Explainer):
        raise HexRayError(f"{{field}}: {explainer!r} has no name, explain() and simulate()", hint="see hexray.neuroscope.labels.Explainer", field="explainer")
    path = Path(path).expanduser()
    with open_index(path, model.spec) as index:
        refs = [parse_unit(index, name) for name in units]
        pages = [unit_page(index, ref) for ref in refs]
        ids = [_unit_id(index, ref) for ref in refs]
        dictionaries = {ref.dictionary for ref in refs if ref.dictionary}
    groups = [g for g in parse_units(["neurons", "heads", *(f"dict:{d}" for d in sorted(dictionaries))], model)
              if any((g.kind, g.layer, g.dictionary_name) == (r.unit.kind, r.unit.layer, r.dictionary) for r in refs)]
    wanted = {i: [(j, r.unit.unit) for j, r in enumerate(refs) if (r.unit.kind, r.unit.layer, r.dictionary) == (g.kind, g.layer, g.dictionary_name)] for i, g in enumerate(groups)}
    acts = torch.zeros(len(refs), held_out.n_contexts, held_out.context_size)

    def consume(i: int, a: torch.Tensor, lo: int, counted: torch.Tensor) -> None:
        for j, u in wanted[i]:
            acts[j, lo : lo + a.shape[0]] = a[..., u].float().cpu()

    each_batch(model, held_out, groups, rows, consume)
    rng = np.random.default_rng(seed)
    out = []
    for j, page in enumerate(pages):
        text = str(explainer.explain(page)).strip()
        peak = torch.where(held_out.counted, acts[j], -math.inf).amax(1)
        best = torch.argsort(peak, descending=True, stable=True)[: windows // 2].tolist()
        rest = [c for c in range(held_out.n_contexts) if c not in best]
        chosen = best + sorted(rng.choice(rest, size=min(len(rest), windows - len(best)), replace=False).tolist())
        predicted, actual = [], []
        for c in chosen:
            keep = held_out.counted[c]
            tokens = [model.token_str(int(t)) for t in held_out.tokens[c]]
            guess = list(explainer.simulate(text, tokens))
            if len(guess) != len(tokens):
                raise HexRayError(f"{{field}}: simulate() gave {len(guess)} values for {len(tokens)} tokens", field="explainer")
            predicted += [float(x) for x, k in zip(guess, keep.tolist()) if k]
            actual += acts[j, c][keep].tolist()
        out.append(Label(text, explainer.name, (), pearson(predicted, actual), explainer.name))

    with _build_lock(path):
        tmp = path.with_name(f".{path.name}.labels-{uuid.uuid4().hex[:12]}")
        try:
            shutil.copyfile(path, tmp)
            con = duckdb.connect(str(tmp))
            try:
                con.executemany("DELETE FROM labels WHERE unit_id = ? AND source = ?", [(i, explainer.name) for i in ids])
                con.executemany("INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?)", [(i, x.source, x.text, x.rule, [], x.score) for i, x in zip(ids, out)])
                con.execute("CHECKPOINT")
            finally:
                con.close()
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def load_explainer(spec: str) -> Explainer:
    """``module:attribute`` (a class or factory called with no arguments, or an object) as an :class:`Explainer`."""
    import importlib

    from hexray.errors import HexRayError

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise HexRayError(f"{{field}} must be module:attribute, got {spec!r}", hint="e.g. my_explainers:Claude", field="explainer")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise HexRayError(f"{{field}}: cannot load {spec} ({exc})", hint="the module must be importable (on PYTHONPATH)", field="explainer") from None
    explainer = target() if isinstance(target, type) or (callable(target) and not isinstance(target, Explainer)) else target
    if not isinstance(explainer, Explainer):
        raise HexRayError(f"{{field}}: {spec} gives no explainer (it needs name, explain() and simulate())", field="explainer")
    return explainer
