"""``hexray debug`` at a real terminal: the interactive REPL driven through a pseudo-terminal.

The child is ``python -m hexray debug --model <tiny folder>`` with a pty as its stdin, stdout and
stderr, so ``sys.stdin.isatty()`` holds and the prompt_toolkit REPL runs (history, completion, raw
keys), not the plain-lines fallback. The test types as a person would: whole lines ending in Enter
(``\\r``), Tab for completion (after the completion menu is up, as a person waits to see it), and
Ctrl-C (``\\x03``, a key in raw mode) at the prompt.

Output is read with ``select`` and stripped of terminal escapes; every wait has a generous timeout
(the child imports torch and loads the model: seconds on a slow machine). On a timeout or an early
exit the assertion shows the tail of what the terminal showed.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:  # POSIX only: no pty on Windows
    import fcntl
    import pty
    import struct
    import termios
except ImportError:  # pragma: no cover - platform without pty
    pty = None

pytestmark = pytest.mark.skipif(pty is None or not hasattr(os, "openpty"), reason="needs a POSIX pseudo-terminal (pty)")

STARTUP_S = 120.0  # importing torch and loading the model, on a loaded 2-core machine
COMMAND_S = 60.0
PROMPT = re.compile(r"\(hexray\)")
# CSI (colours, cursor moves, private modes), OSC, other two-byte escapes, then backspaces and carriage returns
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]|[\x08\r]")
# what prompt_toolkit prints when a key handler raises: the REPL is broken even though it goes on
_BROKEN = ("Traceback", "Unhandled exception", "Press ENTER to continue")


def _plain(raw: bytes) -> str:
    return _ESCAPES.sub("", raw.decode("utf-8", errors="replace"))


class Terminal:
    """One child process on a pty, and everything it has shown so far (``text``, escapes stripped)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # rows, cols: no wrapping
        try:
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                         start_new_session=True, close_fds=True)
        finally:
            os.close(slave)
        self.fd = master
        self.raw = b""
        self.mark = 0  # where the next expect starts looking, in ``text``
        self.eof = False

    @property
    def text(self) -> str:
        return _plain(self.raw)

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed its side (it exited)
            data = b""
        if data:
            self.raw += data
        else:
            self.eof = True

    def tail(self, n: int = 3000) -> str:
        return f"\n--- terminal (last {n} chars, escapes stripped) ---\n{self.text[-n:]}\n--- exit status: {self.proc.poll()} ---"

    def expect(self, pattern: str | re.Pattern, timeout: float = COMMAND_S) -> re.Match:
        """Wait for ``pattern`` after the mark; move the mark past it."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text, self.mark)
            if match:
                self.mark = match.end()
                return match
            if self.eof:
                raise AssertionError(f"the debugger ended before showing {regex.pattern!r}" + self.tail())
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {regex.pattern!r} within {timeout:.0f} s" + self.tail())
            self._read(min(left, 0.5))

    def settle(self, quiet: float = 0.3, timeout: float = 10.0) -> None:
        """Read until the terminal has been quiet for ``quiet`` seconds (prompt_toolkit finishing a redraw)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.eof:
            before = len(self.raw)
            self._read(quiet)
            if len(self.raw) == before:
                return

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def command(self, keys: str, reply: str, timeout: float = COMMAND_S, *, line: str | None = None) -> str:
        """Type ``keys`` and Enter; wait for ``reply`` (a regex) and the next prompt; return what the command printed.

        ``line`` is the line the prompt shows when Enter is pressed (``keys`` unless completion changed it).
        """
        start = self.mark
        self.send(keys + "\r")
        self.expect(reply, timeout)
        prompt = self.expect(PROMPT, timeout)
        shown = self.text[start:prompt.start()]
        echo = f"(hexray) {keys if line is None else line}"
        assert echo in shown, f"the line was not echoed as {echo!r}" + self.tail()
        return shown[shown.rindex(echo) + len(echo):].strip("\n")

    def wait(self, timeout: float = COMMAND_S) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)  # keep draining, so the child never blocks on a full pty
        if self.proc.poll() is None:
            raise AssertionError(f"the debugger did not exit within {timeout:.0f} s" + self.tail())
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session (start_new_session): only the child
            self.proc.wait(10)
        os.close(self.fd)


def _debugger(folder: Path, cache: Path, cwd: Path) -> Terminal:
    env = {k: v for k, v in os.environ.items() if k not in ("HEXRAY_MODEL", "HEXRAY_SERVER", "COLUMNS", "LINES", "NO_COLOR")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HEXRAY_CACHE=str(cache), TERM="xterm-256color",
               PROMPT_TOOLKIT_NO_CPR="1",  # no cursor-position request to answer
               PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    # cwd is a temporary folder: from the repository root, ``-m hexray`` would find the hexray.py launcher first
    return Terminal([sys.executable, "-m", "hexray", "debug", "--model", str(folder)], env, cwd)


@pytest.fixture
def terminal(tiny_gpt2_case, tmp_path):
    """The debugger on the tiny GPT-2 (2 layers x 4 heads) at a pty, its cache folder already there."""
    cache = tmp_path / "cache"
    cache.mkdir()
    term = _debugger(tiny_gpt2_case.folder, cache, tmp_path)
    try:
        yield term
    finally:
        term.close()


def _assert_not_broken(term: Terminal) -> None:
    for sign in _BROKEN:
        assert sign not in term.text, f"the terminal shows {sign!r}" + term.tail(6000)


def test_a_session_at_the_terminal(terminal):
    term = terminal
    term.expect("HexRay debugger: help lists the commands", STARTUP_S)
    term.expect(PROMPT, STARTUP_S)

    # a breakpoint, then run: it stops there (the line "breakpoint 1 at ..." is the break command's own)
    out = term.command("break L1H0", r"breakpoint 1 at L1H0")
    assert out.strip() == "breakpoint 1 at L1H0 (blocks.1.attn.hook_z)", out
    out = term.command("run When Mary and John went to the store", r"stopped at \S+")
    n_tokens = int(re.search(r"^running (\d+) tokens$", out, re.M).group(1))
    assert re.search(r"^breakpoint 1, L1H0 \(hit 1\)$", out, re.M), out
    assert re.search(r"^stopped at blocks\.1\.attn\.hook_z\b", out, re.M), out

    # step: the next hook point of block 1 (z -> attn_out); reverse-step: back to the breakpoint's stop
    out = term.command("step", r"stopped at \S+")
    assert re.search(r"^stopped at blocks\.1\.hook_attn_out\b", out, re.M), out
    out = term.command("reverse-step", r"stopped at \S+")
    assert re.search(r"^stopped at blocks\.1\.attn\.hook_z\b", out, re.M), out

    # a mistyped command: one error line with the hint, and the debugger goes on
    out = term.command("brek L1H0", r"error: [^\n]*\n")
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "unknown command 'brek'" in lines[0] and "did you mean break" in lines[0], lines[0]
    out = term.command("print L1H0", r"L1H0 at position")
    assert out.startswith(f"L1H0 at position {n_tokens - 1}: writes |"), out  # the last position, by default

    # Tab completion: a command (tbre -> tbreak, the only match) and a hook name (the only stop it starts)
    term.send("tbre")
    term.expect(r"tbreak")  # the completion menu, as the user sees it before pressing Tab
    term.settle()
    term.send("\t")
    term.settle()
    term.send(" blocks.1.attn.hook_pa")
    term.expect(r"blocks\.1\.attn\.hook_pattern")  # the menu again
    term.settle()
    out = term.command("\t", r"temporary breakpoint 2 at", line="tbreak blocks.1.attn.hook_pattern")  # Tab, then Enter
    assert out.strip().endswith("temporary breakpoint 2 at blocks.1.attn.hook_pattern (blocks.1.attn.hook_pattern)"), out

    # Ctrl-C at the prompt, with a half-typed line: a fresh, empty prompt, not an exit
    term.send("step")
    term.expect(r"step")
    term.settle()
    term.send("\x03")
    term.expect(PROMPT)
    term.settle()
    assert term.proc.poll() is None, "Ctrl-C at the prompt ended the debugger" + term.tail()
    out = term.command("info breakpoints", r"tbreak")  # "stepinfo breakpoints" would be an unknown command
    assert re.search(r"^\s*1\s+break\s+L1H0\s+blocks\.1\.attn\.hook_z", out, re.M), out
    assert re.search(r"^\s*2\s+tbreak\s+blocks\.1\.attn\.hook_pattern", out, re.M), out

    _assert_not_broken(term)
    term.send("quit\r")
    term.expect(r"\bbye\b")
    assert term.wait() == 0
    _assert_not_broken(term)


def test_ctrl_d_leaves_with_status_0(terminal):
    terminal.expect(PROMPT, STARTUP_S)
    terminal.settle()
    terminal.send("\x04")
    assert terminal.wait() == 0, terminal.tail()


def test_a_first_run_without_a_cache_folder(tiny_gpt2_case, tmp_path):
    """A user's first ``hexray debug --model FOLDER``: HEXRAY_CACHE (where the history goes) does not exist yet.

    Commands must still answer, with no prompt_toolkit traceback and no "Press ENTER to continue".
    """
    term = _debugger(tiny_gpt2_case.folder, tmp_path / "no-such-cache", tmp_path)
    try:
        term.expect(PROMPT, STARTUP_S)
        term.settle()
        term.send("break L1H0\r")
        term.expect(r"breakpoint 1 at L1H0")
        term.expect(PROMPT)
        term.settle()
        _assert_not_broken(term)
        term.send("quit\r")
        term.expect(r"\bbye\b")
        assert term.wait() == 0
        _assert_not_broken(term)
    finally:
        term.close()
