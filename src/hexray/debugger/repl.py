"""The debugger's loops: a script (``-x FILE``, as ``gdb -x``), or an interactive prompt with history and completion."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from hexray.debugger.commands import as_json, completions, execute
from hexray.debugger.session import Session
from hexray.errors import HexRayError

PROMPT = "(hexray) "


def one(session: Session, line: str, out: TextIO, json_out: bool) -> tuple[bool, bool]:
    """Run one line; (ok, quit). A user's mistake is one line and the debugger goes on; Ctrl-C stops the command, not the debugger."""
    try:
        reply = execute(session, line)
    except HexRayError as exc:
        print(as_json(line, None, exc) if json_out else f"error: {exc.one_line()}", file=out, flush=True)
        return False, False
    except KeyboardInterrupt:
        print(as_json(line, None, HexRayError("interrupted")) if json_out else "interrupted", file=out, flush=True)
        return False, False
    print(as_json(line, reply, None) if json_out else reply.text, file=out, flush=True)
    return True, bool(reply.data.get("quit"))


def run_script(session: Session, lines: Iterable[str], out: TextIO | None = None, *, json_out: bool = False, echo: bool = True) -> int:
    """Each non-blank line that is not a ``#`` comment, in order; exit 0 when every command worked, else 2."""
    out = sys.stdout if out is None else out  # looked up now: a test or a pager may have replaced it
    failed = False
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if echo and not json_out:
            print(f"{PROMPT}{line}", file=out, flush=True)
        ok, quit_ = one(session, line, out, json_out)
        failed |= not ok
        if quit_:
            break
    return 2 if failed else 0


def interactive(session: Session, history: Path | None) -> int:
    """The REPL: prompt_toolkit on a terminal (history, completion of commands and component names); plain lines otherwise."""
    if not sys.stdin.isatty():
        return run_script(session, sys.stdin, echo=False)
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    words = completions(session)
    if history is not None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only cache: history for this session only
            history = None
    prompt = PromptSession(history=FileHistory(str(history)) if history else InMemoryHistory(),
                           completer=WordCompleter(words, WORD=True))
    print("HexRay debugger: help lists the commands, quit leaves.", flush=True)
    while True:
        try:
            line = prompt.prompt(PROMPT)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in gdb
            continue
        except EOFError:  # Ctrl-D
            return 0
        if line.strip():
            _, quit_ = one(session, line, sys.stdout, False)
            if quit_:
                return 0
