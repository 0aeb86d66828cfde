"""The one error type HexRay raises for anything a user can get wrong.

The CLI prints ``message`` (and ``hint``) on one line and exits with ``exit_code``;
the server answers ``http_status`` with the same text as a JSON body.
"""

from __future__ import annotations


class HexRayError(Exception):
    """A user-facing failure: a bad prompt, an unknown model, an out-of-range index, a bad file."""

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int = 2, http_status: int = 422):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code
        self.http_status = http_status

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_dict(self) -> dict:
        return {"ok": False, "error": self.message, "hint": self.hint, "status": self.http_status}


def first_line(exc: BaseException, limit: int = 300) -> str:
    """A library exception's message cut to one line, for a HexRayError that wraps it."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
