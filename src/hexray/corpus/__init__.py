"""Prompt sets from files: one prompt a line, or JSONL with named fields per row."""

from __future__ import annotations

import json
from pathlib import Path

from hexray.errors import HexRayError


def read_rows(path: str | Path, *, required: tuple[str, ...], optional: tuple[str, ...] = (), field: str = "prompts") -> list[dict[str, str]]:
    """Rows of ``path``: JSONL objects (``{"clean": ..., "corrupt": ...}``), or plain lines when ``required`` is one field.

    Blank lines are skipped; a malformed row fails naming its line.
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HexRayError(f"{{field}} {path}: no such file", field=field) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HexRayError(f"{{field}} {path} cannot be read: {getattr(exc, 'strerror', None) or exc}", field=field) from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HexRayError(f"{{field}} {path} line {number} is not valid JSON: {exc.msg}", field=field) from None
        elif len(required) == 1:
            row = {required[0]: line.strip()}
        else:
            raise HexRayError(f"{{field}} {path} line {number} is not a JSON object", hint=f"write one {{{', '.join(map(repr, required))}: ...}} a line", field=field)
        missing = [k for k in required if not isinstance(row.get(k), str) or not row[k].strip()]
        unknown = sorted(set(row) - set(required) - set(optional))
        if missing or unknown:
            what = f"lacks {', '.join(missing)}" if missing else f"has unknown keys {', '.join(unknown)}"
            raise HexRayError(f"{{field}} {path} line {number} {what}", hint=f"keys: {', '.join(required + optional)}", field=field)
        rows.append({k: row[k] for k in required + optional if row.get(k) is not None})
    if not rows:
        raise HexRayError(f"{{field}} {path} has no prompts", hint="give one prompt a line (or one JSON object a line)", field=field)
    return rows
