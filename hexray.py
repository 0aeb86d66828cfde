#!/usr/bin/env python3
"""`python hexray.py ...` at the repo root behaves like the `hexray` command.

From the repo root, Python also finds this file for `import hexray`. Imported under that name it
stands in for the package in src/hexray (same __path__, same __init__), so both work.
"""

import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent / "src" / "hexray"

if __name__ == "__main__":
    try:
        from hexray.cli import main  # imports this file as `hexray`: the branch below
    except ModuleNotFoundError as exc:
        sys.exit(f"error: {exc.name} is not installed for {sys.executable} (run `make setup`, then `.venv/bin/python hexray.py ...`)")
    sys.exit(main())
else:
    __path__ = [str(_PACKAGE)]
    exec(compile((_PACKAGE / "__init__.py").read_text(), str(_PACKAGE / "__init__.py"), "exec"))
