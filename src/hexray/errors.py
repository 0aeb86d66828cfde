"""The one error type HexRay raises for anything a user can get wrong.

The CLI prints ``message`` (and ``hint``) on one line and exits with ``exit_code``;
the server answers ``http_status`` with the same text as a JSON body.

An error about one option names its *field* (``token_index``, ``prompts[3]``): message and hint
may hold ``{field}``, which the API shows as the field name and only the CLI spells as its flag.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_INDEXED = re.compile(r"^(\w+)\[(\d+)\]$")


class HexRayError(Exception):
    """A user-facing failure: a bad prompt, an unknown model, an out-of-range index, a bad file."""

    def __init__(self, message: str, hint: str | None = None, *, field: str | None = None, exit_code: int = 2, http_status: int = 422):
        super().__init__(message)
        self._message, self._hint = message, hint
        self.field = field
        self.exit_code = exit_code
        self.http_status = http_status

    def _fill(self, text: str | None, name: str | None) -> str | None:
        return text if text is None or name is None else text.replace("{field}", name)

    @property
    def message(self) -> str:
        return self._fill(self._message, self.field)

    @property
    def hint(self) -> str | None:
        return self._fill(self._hint, self.field)

    def __str__(self) -> str:
        return self.message

    def spelled(self, spell: Callable[[str], str] | None = None) -> tuple[str, str | None]:
        """(message, hint) with the field as ``spell`` writes it (the CLI: its flag; the API: its request field)."""
        name = spell(self.field) if spell and self.field else self.field
        return self._fill(self._message, name), self._fill(self._hint, name)

    def one_line(self, spell: Callable[[str], str] | None = None) -> str:
        message, hint = self.spelled(spell)
        return f"{message} ({hint})" if hint else message

    def to_dict(self, spell: Callable[[str], str] | None = None) -> dict:
        message, hint = self.spelled(spell)
        field = spell(self.field) if spell and self.field else self.field
        return {"ok": False, "error": message, "hint": hint, "status": self.http_status, "field": field}


def spell_indexed(field: str, flag_of: Callable[[str], str]) -> str:
    """``prompts[3]`` -> ``--prompts line 4``; plain fields go to ``flag_of``."""
    m = _INDEXED.match(field)
    return f"{flag_of(m.group(1))} line {int(m.group(2)) + 1}" if m else flag_of(field)


def check_text(text: str, field: str) -> None:
    """A HexRayError when ``text`` cannot be encoded (a lone surrogate from a bad terminal or JSON ``\\ud800``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HexRayError(f"{{field}} is not valid Unicode text (a lone surrogate at character {exc.start})", hint="check the terminal's encoding, or remove the broken character", field=field) from None


def first_line(exc: BaseException, limit: int = 300) -> str:
    """A library exception's message cut to one line, for a HexRayError that wraps it."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
