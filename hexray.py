#!/usr/bin/env python3
"""`python hexray.py ...` at the repo root behaves like the `hexray` command."""

import sys
from pathlib import Path

try:
    from hexray.cli import main
except ImportError:  # not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from hexray.cli import main

if __name__ == "__main__":
    sys.exit(main())
