"""The neuroscope: top-activating examples and statistics of every neuron, head and feature, in one DuckDB file.

    >>> from hexray.neuroscope import build_index, open_index, unit_page
    >>> info = build_index(model, token_pack(model, max_tokens=200_000), "neurons,heads", "index.duckdb")
    >>> with open_index("index.duckdb", model.spec) as index:
    ...     page = unit_page(index, "L10N1234")

- :mod:`.stream`: the exact, order-free streaming statistics (top-k, histogram, samples);
- :mod:`.units`: unit groups, their activations and logit effects;
- :mod:`.index`: building (atomically) and opening an index, and its schema;
- :mod:`.pages`: unit pages and the reverse look-ups.

The names below are imported on first use (PEP 562), so importing the package costs nothing.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Index": "hexray.neuroscope.index",
    "IndexBuildStopped": "hexray.neuroscope.index",
    "IndexInfo": "hexray.neuroscope.index",
    "build_index": "hexray.neuroscope.index",
    "open_index": "hexray.neuroscope.index",
    "read_info": "hexray.neuroscope.index",
    "default_index_path": "hexray.neuroscope.index",
    "Example": "hexray.neuroscope.pages",
    "HistogramBin": "hexray.neuroscope.pages",
    "LogitEffect": "hexray.neuroscope.pages",
    "PositionSearch": "hexray.neuroscope.pages",
    "UnitHit": "hexray.neuroscope.pages",
    "UnitPage": "hexray.neuroscope.pages",
    "UnitRef": "hexray.neuroscope.pages",
    "parse_unit": "hexray.neuroscope.pages",
    "search_position": "hexray.neuroscope.pages",
    "search_token": "hexray.neuroscope.pages",
    "unit_page": "hexray.neuroscope.pages",
    "UnitGroup": "hexray.neuroscope.units",
    "parse_units": "hexray.neuroscope.units",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
