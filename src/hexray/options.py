"""One declaration per option: the options dataclasses, the CLI flags and the API's request models all derive from it.

An :class:`Option` says a field's name, type, default, bounds and help once. A capability lists
its options and gets a frozen dataclass with ``validate()`` (:func:`options_class`); the CLI turns
the same list into flags and the server into pydantic fields, so defaults cannot drift. Errors
name the field (``top_k must be positive``); only the CLI spells a field as its flag.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hexray.errors import HexRayError, check_text

_SAME = object()  # api_default: the same as default
_REQUEST_NAMES: dict[str, str] = {}  # field -> API request field, where they differ (filled by options_class)


@dataclass(frozen=True)
class Option:
    """One option of a capability."""

    name: str  # the dataclass field and (unless api_name) the API request field
    type: Any  # int, float, str, bool, X | None, tuple[str, ...]
    default: Any
    help: str
    flag: str | None = None  # the CLI flag (default: --name-with-dashes); "" keeps it off the CLI
    short: str | None = None
    choices: tuple[str, ...] | None = None
    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    api_name: str | None = None  # where the API's field name differs from ``name``
    api_default: Any = _SAME  # the lab's default where it differs from the CLI's (declared here, once)
    api_le: float | None = None  # a server-side cap (work per request), on top of ``le``
    api: bool = True  # False keeps it out of the API (a local path, a CLI-only switch)
    cli_unset: bool = False
    unknown: str = "unknown {field} {value!r}"  # the message for a value outside ``choices``  # the CLI's default is None, so a command can tell "not given" from the default

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def request_field(self) -> str:
        return self.api_name or self.name

    @property
    def request_default(self) -> Any:
        return self.default if self.api_default is _SAME else self.api_default

    def check(self, value: Any) -> None:
        """The declared constraints; a HexRayError naming the field."""
        if value is None:
            return
        if self.choices is not None and value not in self.choices:
            raise HexRayError(self.unknown.replace("{value!r}", repr(value)), hint=f"use {spoken_list(self.choices)}", field=self.name)
        if isinstance(value, str):
            check_text(value, self.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise HexRayError(f"{{field}} must be a finite number, got {value}", field=self.name)
        if self.gt is not None and not value > self.gt:
            raise HexRayError(f"{{field}} must be {'positive' if self.gt == 0 else f'more than {self.gt:g}'}, got {value}", field=self.name)
        ge, le = _bound(self.ge), _bound(self.le)
        between = f"{{field}} must be between {ge} and {le}, got {value}" if self.ge is not None and self.le is not None else None
        if self.ge is not None and value < self.ge:
            raise HexRayError(between or f"{{field}} must be >= {ge}, got {value}", field=self.name)
        if self.le is not None and value > self.le:
            raise HexRayError(between or f"{{field}} must be <= {le}, got {value}", field=self.name)


def _bound(x: float | None) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}" if x is not None else ""


def options_class(name: str, options: Sequence[Option], *, check: Callable[[Any], None] | None = None, doc: str = "") -> type:
    """A frozen dataclass with one field per option (the declared defaults) and ``validate()``.

    ``validate()`` checks every option's declared constraints, then ``check(self)`` for the rules
    that involve several fields. It needs no model, so it runs before anything is loaded.
    """

    def validate(self) -> None:
        for option in options:
            option.check(getattr(self, option.name))
        if check is not None:
            check(self)

    _REQUEST_NAMES.update({o.name: o.api_name for o in options if o.api_name})
    fields = [(o.name, o.type, dataclasses.field(default=o.default)) for o in options]
    cls = dataclasses.make_dataclass(name, fields, frozen=True, namespace={"validate": validate, "OPTIONS": tuple(options), "__doc__": doc or f"The options of {name}."})
    cls.__module__ = _caller_module()
    return cls


def _caller_module() -> str:
    import sys

    return sys._getframe(2).f_globals.get("__name__", __name__)


def request_names() -> dict[str, str]:
    """Every option field whose API request field is spelled differently (``sweeps`` -> ``sweep``)."""
    return dict(_REQUEST_NAMES)


def values(options: Sequence[Option], source: Mapping[str, Any] | Any, *, api: bool = False) -> dict[str, Any]:
    """Field values for ``options`` read from a mapping or an object (a pydantic request: its API names)."""
    out = {}
    for o in options:
        key = o.request_field if api else o.name
        if isinstance(source, Mapping):
            if key in source:
                out[o.name] = source[key]
        elif hasattr(source, key):
            out[o.name] = getattr(source, key)
    return {o.name: _normal(o, out[o.name]) for o in options if o.name in out}


def _normal(option: Option, value: Any) -> Any:
    """Lists (and comma-separated strings) for tuple options become tuples of stripped parts."""
    if option.type == tuple[str, ...] and value is not None:
        parts = [value] if isinstance(value, str) else list(value)
        return tuple(p.strip() for part in parts for p in part.split(",") if p.strip())
    return () if option.type == tuple[str, ...] else value


def spoken_list(items: Sequence[str]) -> str:
    """``a, b or c``."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``tuple[str, ...]`` stays as it is."""
    if is_optional(tp):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp
