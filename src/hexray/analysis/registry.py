"""The registry of per-prompt analyses: each one is one :class:`Analysis` value.

An entry declares the options that switch it on and tune it, the hooks it reads, its compute
function, its section of the JSON document, and its console, figure, HTML and lab views.
``hexray trace``'s flags, the API's ``/api/analyze`` fields, ``--report``, the JSON document and
the lab's panels are all built from :data:`ANALYSES`; ``tests/unit/test_registry.py`` fails when
an entry is missing from any of them.

Adding an analysis: write one module that defines ``ANALYSIS = Analysis(...)`` (its result type,
compute function and renderers), and add its module path to :data:`MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hexray.analysis.results import Attribution
from hexray.models.loading import LoadedModel, ModelSpec
from hexray.options import Option
from hexray.tracing.engine import Trace


@dataclass(frozen=True)
class Context:
    """What every analysis and renderer gets besides its own result."""

    spec: ModelSpec
    options: Any  # the AnalysisOptions of the request
    attribution: Attribution  # the core attribution at the explained position


@dataclass(frozen=True)
class View:
    """A plain table (title, columns, rows of strings or numbers): the console, HTML and lab draw it the same way."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    note: str = ""


@dataclass(frozen=True)
class Analysis:
    name: str  # the Report attribute, the registry key
    title: str
    compute: Callable[[LoadedModel, Trace, Context], Any]
    switch: Option | None = None  # the option that turns it on (truthy); None: always computed
    options: tuple[Option, ...] = ()  # options that tune it
    hooks: Callable[[ModelSpec, Any], set[str]] = lambda spec, options: set()
    json_key: str | None = None  # its section of the document; None: merged into the top level
    document: Callable[[Any, Context], Any] = lambda result, ctx: None
    console: Callable[[Any, Context], Any] | None = None  # a rich renderable (or None to show nothing)
    figures: Callable[[Any, Context], dict[str, bytes]] | None = None  # file name -> PNG/SVG bytes
    html: Callable[[Any, Context], str] | None = None  # a section of the report page
    table: Callable[[Any, Context], View] | None = None  # the default console/HTML/lab view
    lab_panel: str = "analyses-panel"  # the lab panel that draws it (the generic one draws ``table``)
    absent: Any = None  # the Report attribute when it is not computed
    report_by_default: bool = False  # a figure is the point: the CLI writes --report hexray-report/ unless told where
    # rewrites the core attribution before any analysis sees it (a dictionary splits its sites into features)
    refine: Callable[[LoadedModel, Trace, Attribution, Any], Attribution] | None = None
    # a value of ``switch`` that turns it on for ``model`` (making what it reads, e.g. a small random
    # dictionary in the cache): the drift test and the docs' examples; None: any truthy value does
    example: Callable[[LoadedModel], Any] | None = None

    @property
    def all_options(self) -> tuple[Option, ...]:
        return ((self.switch,) if self.switch else ()) + self.options

    def enabled(self, options: Any) -> bool:
        return self.switch is None or bool(getattr(options, self.switch.name))


def lazy(path: str) -> Callable:
    """``"hexray.render.console:lens_table"`` as a callable that imports on first call (renderers sit above analyses)."""
    module, _, attr = path.partition(":")
    return lambda *args, **kwargs: getattr(importlib.import_module(module), attr)(*args, **kwargs)


# the analyses, in the order the console, the report and the document show them
MODULES: tuple[str, ...] = (
    "hexray.analysis.sections",
    "hexray.analysis.head_metrics",
    "hexray.analysis.features",
)


def _load() -> tuple[Analysis, ...]:
    out: list[Analysis] = []
    for path in MODULES:
        module = importlib.import_module(path)
        out.extend(getattr(module, "ANALYSES", None) or (module.ANALYSIS,))
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two analyses share a name: {names}")  # a HexRay bug
    return tuple(out)


ANALYSES: tuple[Analysis, ...] = ()  # filled on first use by :func:`analyses`


def analyses() -> tuple[Analysis, ...]:
    """Every registered analysis (imported once)."""
    global ANALYSES
    if not ANALYSES:
        ANALYSES = _load()
    return ANALYSES


def get(name: str) -> Analysis:
    for a in analyses():
        if a.name == name:
            return a
    raise KeyError(name)
