"""Warm runs: ``hexray --server URL|auto ...`` runs a one-shot command on a ``hexray serve`` that has the model loaded.

The client half (:func:`main`, :func:`dispatch`) runs before the CLI is imported and imports
neither torch nor typer: a warm call costs an interpreter start and one HTTP round trip. It sends
the arguments, the working directory, the ``HEXRAY_*`` variables a command reads and how this
terminal's consoles look (width, colour system, encoding) to ``POST /api/cli``, then prints the
answer's stdout and stderr verbatim and exits with its exit code.

The server half (:func:`run_cli`) runs in the server's model thread, one job at a time, so it may
change what is process-wide for the job's length: the working directory (relative paths in the
arguments, and the paths the command prints, are the client's), those variables and
``sys.stdout``/``sys.stderr``. ``hexray.cli`` asks :data:`SERVED` for the model and its consoles.

``hexray serve`` advertises itself in ``<cache>/serve/<port>.json`` (``url``, ``pid``, ``model``,
``token``; mode 0600) while it runs. The token proves a caller is a process of the user who
started the server (a web page cannot read the file); ``auto`` looks for a live server there.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any

SERVER_ENV = "HEXRAY_SERVER"
COMMANDS = ("trace", "patch", "ablate", "heads", "generate", "presets")  # what a server runs (not serve or debug)
CLI_ENV = ("HEXRAY_MODEL", "HEXRAY_DEVICE", "HEXRAY_DTYPE", "HEXRAY_MEMORY_BUDGET")  # read by the commands
HEALTH_TIMEOUT_S = 0.3  # auto: a server that does not answer /api/health this fast is not used
CONNECT_TIMEOUT_S = 5.0
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_OFF = {"", "off", "no", "none", "0"}
_LOCAL = {"--help", "-h", "--version"}  # answered here, never sent

SERVED: ContextVar[Served | None] = ContextVar("hexray_served", default=None)


# ---------------------------------------------------------------------------------------------
# discovery files
# ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``hexray.models.loading.cache_root`` without importing torch (tests/unit/test_warm.py holds them equal)."""
    if os.environ.get("HEXRAY_CACHE"):
        return Path(os.environ["HEXRAY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "hexray"


def discovery_dir() -> Path:
    return cache_root() / "serve"


def client_url(host: str, port: int) -> str:
    """The URL a local client reaches a server bound to ``host`` at (a wildcard bind is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def new_token() -> str:
    import secrets

    return secrets.token_urlsafe(32)


@contextlib.contextmanager
def advertise(host: str, port: int, model: str, token: str):
    """Write ``<cache>/serve/<port>.json`` (mode 0600) for the block's length; yields its path, or the OSError that stopped it."""
    path = (discovery_dir() / f"{port}.json").absolute()  # removed after the jobs, which change the working directory
    doc = {"url": client_url(host, port), "pid": os.getpid(), "model": model, "token": token}
    tmp = path.with_name(f".{port}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        os.chmod(tmp, 0o600)  # O_CREAT's mode only applies to a new file
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        yield exc
        return
    try:
        with _exit_on_sigterm():
            yield path
    finally:
        with contextlib.suppress(OSError):
            if _read(path).get("token") == token:  # not a newer server's file
                path.unlink()


@contextlib.contextmanager
def _exit_on_sigterm():
    """SIGTERM raises SystemExit(143) in the block, so ``finally`` clauses run.

    uvicorn shuts down gracefully on SIGTERM, puts back the handler it found and raises the signal
    again; with the default handler the process would die there, leaving its discovery file.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there; the health check decides
        return True
    try:
        os.kill(pid, 0)
    except OSError:  # gone, or (PermissionError) another user's process took the pid: not our server
        return False
    return True


def live_servers() -> list[dict]:
    """Discovery files of servers whose process is alive and whose /api/health answers quickly, newest first."""
    try:
        paths = sorted(discovery_dir().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return []
    found = []
    for path in paths:
        doc = _read(path)
        if not (isinstance(doc.get("url"), str) and isinstance(doc.get("token"), str) and _alive(doc.get("pid"))):
            continue
        try:
            status, body = transport.request("GET", doc["url"].rstrip("/") + "/api/health", timeout=HEALTH_TIMEOUT_S)
        except OSError:
            continue
        if status == 200 and body.get("ok"):
            found.append(doc)
    return found


def _token_for(url: str) -> str | None:
    """The token in the discovery file of the server at ``url`` (same port, and the same host or both loopback)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        port = parts.port or 80
    except ValueError:
        return None
    doc = _read(discovery_dir() / f"{port}.json")
    theirs = urlsplit(doc.get("url", "")) if isinstance(doc.get("url"), str) else None
    if theirs is None or not isinstance(doc.get("token"), str):
        return None
    mine, their_host = (parts.hostname or "").lower(), (theirs.hostname or "").lower()
    if mine == their_host or (mine in _LOOPBACK and their_host in _LOOPBACK):
        return doc["token"]
    return None  # never send a local server's token to another address


# ---------------------------------------------------------------------------------------------
# HTTP (the standard library's: httpx is only a test dependency; tests swap `transport`)
# ---------------------------------------------------------------------------------------------


class _Http:
    def request(self, method: str, url: str, payload: dict | None = None, timeout: float | None = None) -> tuple[int, dict]:
        """(status, JSON body) of one request; OSError when the server cannot be reached. ``timeout=None`` waits for the answer."""
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        try:
            port = parts.port or 80
        except ValueError:
            raise OSError(f"no port in {url}") from None
        if parts.scheme != "http" or not parts.hostname:
            raise OSError(f"not an http:// URL: {url}")
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout or CONNECT_TIMEOUT_S)
        try:
            conn.connect()
            conn.sock.settimeout(timeout)
            body = None if payload is None else json.dumps(payload).encode()
            conn.request(method, parts.path or "/", body=body, headers={"Content-Type": "application/json"} if body is not None else {})
            response = conn.getresponse()
            data = response.read()
        except http.client.HTTPException as exc:
            raise OSError(f"bad answer: {type(exc).__name__}") from exc
        finally:
            conn.close()
        try:
            doc = json.loads(data or b"{}")
        except ValueError:
            doc = {}
        return response.status, doc if isinstance(doc, dict) else {}


transport = _Http()


# ---------------------------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The ``hexray`` console script: a warm run when a server is asked for (and found), else the CLI here."""
    args = list(sys.argv[1:] if argv is None else argv)
    code, args = dispatch(args)
    if code is not None:
        return code
    if args[:1] == ["--version"]:  # as hexray.cli.main answers it, without importing the CLI
        from hexray import __version__

        print(f"hexray {__version__}")
        return 0
    from hexray.cli import main as cold_main

    return cold_main(args, warm=False)


def command_of(args: list[str]) -> str | None:
    """The subcommand ``hexray.cli.main`` would run (``hexray --prompt ...`` is ``trace``); None for help and --version."""
    if not args or args[0] in _LOCAL:
        return None
    return "trace" if args[0].startswith("-") else args[0]


def _take_server(args: list[str]) -> tuple[str | None, bool, list[str]]:
    """(the --server value or $HEXRAY_SERVER, whether it was a flag, the arguments without it)."""
    for i, arg in enumerate(args):
        if arg == "--server":
            if i + 1 >= len(args):
                raise _Usage("--server needs a URL or auto", "e.g. --server http://127.0.0.1:8000, or --server auto for a local hexray serve")
            return args[i + 1], True, args[:i] + args[i + 2:]
        if arg.startswith("--server="):
            return arg.split("=", 1)[1], True, args[:i] + args[i + 1:]
    return os.environ.get(SERVER_ENV), False, args


class _Usage(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(f"{message} ({hint})" if hint else message)


def dispatch(args: list[str]) -> tuple[int | None, list[str]]:
    """(exit code, []) when a server ran the command; (None, the arguments without --server) to run it here."""
    try:
        server, flagged, rest = _take_server(args)
    except _Usage as exc:
        return _error(str(exc)), []
    if server is None or server.strip().lower() in _OFF:
        return None, rest
    command = command_of(rest)
    if command not in COMMANDS or any(a in ("--help", "-h") for a in rest):
        if flagged and command in ("serve", "debug"):
            return _error(f"hexray {command} does not run through a server (--server takes {', '.join(COMMANDS)})", "drop --server"), []
        return None, rest  # help, --version, serve, debug, a typo: here, as without a server
    if server.strip().lower() == "auto":
        for doc in live_servers():
            code = _send(doc["url"], doc["token"], rest, fallback=True)
            if code is not None:
                return code, []
        return None, rest  # no server (or none with this command's model): a cold run
    url = _normalise(server)
    token = _token_for(url)
    if token is None:
        return _error(f"no hexray serve of yours is advertised at {url}", f"start one with hexray serve, or use --server auto; servers write {discovery_dir()}/PORT.json"), []
    return _send(url, token, rest, fallback=False), []


def _normalise(server: str) -> str:
    """``8000`` -> ``http://127.0.0.1:8000``; ``localhost:8000`` -> ``http://localhost:8000``; no trailing slash."""
    server = server.strip()
    if server.isdigit():
        server = f"127.0.0.1:{server}"
    if "://" not in server:
        server = "http://" + server
    return server.rstrip("/")


def _send(url: str, token: str, args: list[str], *, fallback: bool) -> int | None:
    """Run ``args`` on the server at ``url`` and print its output; None (``fallback``) when it cannot or will not run them."""
    payload = {"argv": args, "cwd": os.getcwd(), "token": token,
               "env": {k: os.environ[k] for k in CLI_ENV if k in os.environ},
               "stdout": terminal(stderr=False), "stderr": terminal(stderr=True)}
    try:
        status, body = transport.request("POST", url + "/api/cli", payload, timeout=None)
    except KeyboardInterrupt:  # the server stops the job when the connection closes
        sys.stderr.write("interrupted\n")
        return 130
    except OSError as exc:
        return None if fallback else _error(f"cannot reach the HexRay server at {url}: {_reason(exc)}", "is hexray serve running? drop --server to run here")
    if status == 200 and isinstance(body.get("exit_code"), int):
        if fallback and body.get("refused"):
            return None
        sys.stdout.write(body.get("stdout", ""))
        sys.stdout.flush()
        sys.stderr.write(body.get("stderr", ""))
        sys.stderr.flush()
        return body["exit_code"]
    if fallback and status in (403, 404, 405):  # not ours after all (or too old to take commands)
        return None
    error = body.get("error") or f"the server at {url} answered HTTP {status}"
    return _error(f"{error} ({body['hint']})" if body.get("hint") else error)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _error(line: str, hint: str | None = None) -> int:
    """One ``error:`` line on stderr, like the CLI's; exit code 2."""
    from rich.console import Console
    from rich.markup import escape

    text = f"{line} ({hint})" if hint else line
    Console(stderr=True).print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
    return 2


def terminal(stderr: bool) -> dict:
    """How a cold run's rich console would draw on this process's stdout (or stderr)."""
    from rich.console import Console

    c = Console(stderr=stderr)
    return {"width": c.width, "height": c.height, "color_system": c.color_system, "terminal": c.is_terminal,
            "no_color": bool(c.no_color), "encoding": c.encoding, "legacy_windows": bool(c.legacy_windows)}


# ---------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------


class _Captured(io.StringIO):
    """A captured stream that reports the client's encoding (rich draws ASCII boxes for a non-UTF one)."""

    def __init__(self, encoding: str):
        super().__init__()
        self._encoding = encoding

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding


class Served:
    """What ``hexray.cli`` sees during a warm run: the served model and consoles on the client's terms."""

    def __init__(self, model, key: str, streams: dict[bool, tuple[io.StringIO, dict]]):
        self.model, self.key, self.streams = model, key, streams
        self.refused = False  # the command asked for another model, device or dtype

    def console(self, stderr: bool = False):
        from rich.console import Console

        stream, look = self.streams[stderr]
        return Console(file=stream, width=look["width"], height=look["height"], color_system=look["color_system"],
                       force_terminal=look["terminal"], force_interactive=False, force_jupyter=False,
                       no_color=look["no_color"], legacy_windows=look["legacy_windows"], _environ={})

    def model_for(self, name: str | None, device: str | None, dtype: str | None):
        """The served model when the command asks for it (as a cold run would load it); else a one-line refusal."""
        import torch

        from hexray.errors import HexRayError
        from hexray.models.loading import model_key, resolve_device, resolve_dtype

        want_key, want_device, want_dtype = model_key(name), torch.device(resolve_device(device)), resolve_dtype(dtype)
        have_device, have_dtype = torch.device(self.model.device), self.model.dtype
        same_device = want_device.type == have_device.type and (want_device.index or 0) == (have_device.index or 0)
        spell = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        if want_key != self.key:
            problem = f"this server has {self.model.name} loaded, not {name or 'the default model'}"
            hint = f"add --model {self.key} to use it, or drop --server to load {name or 'the default model'} here"
        elif not same_device or want_dtype != have_dtype:
            problem = f"this server runs {self.model.name} on {have_device} in {spell(have_dtype)}, not on {want_device} in {spell(want_dtype)}"
            hint = f"add --device {have_device} --dtype {spell(have_dtype)} to use it, or drop --server to run here"
        else:
            return self.model
        self.refused = True
        raise HexRayError(problem, hint=hint)


def run_cli(model, key: str, request, reraise: tuple[type[BaseException], ...] = ()) -> dict:
    """``hexray <request.argv>`` on the served model, as if run in ``request.cwd``: {exit_code, stdout, stderr, refused}.

    For the server's model thread: it changes the working directory, ``HEXRAY_*`` variables and
    ``sys.stdout``/``sys.stderr`` for the job's length (the queue runs one job at a time) and puts
    them back. Exceptions in ``reraise`` (the server's cancellation) pass through; any other is the
    traceback a cold run would print, exit code 1.
    """
    import traceback

    streams = {False: (_Captured(request.stdout.encoding), request.stdout.model_dump()),
               True: (_Captured(request.stderr.encoding), request.stderr.model_dump())}
    served = Served(model, key, streams)
    command = command_of(list(request.argv))
    if command is not None and command not in COMMANDS:
        _say(served, f"hexray {command} does not run through a server (it takes {', '.join(COMMANDS)})")
        return _answer(served, 2, refused=True)
    try:
        previous = os.getcwd()
    except OSError:
        previous = None
    try:
        os.chdir(request.cwd)
    except OSError as exc:
        _say(served, f"cannot run in {request.cwd}: {exc.strerror or exc} (is the server on another machine, or another user's?)")
        return _answer(served, 2, refused=True)
    saved = {k: os.environ.get(k) for k in CLI_ENV}
    token = SERVED.set(served)
    try:
        for k in CLI_ENV:
            _setenv(k, request.env.get(k))
        with contextlib.redirect_stdout(streams[False][0]), contextlib.redirect_stderr(streams[True][0]):
            from hexray.cli import main as cli_main

            try:
                code = cli_main(list(request.argv), warm=False)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            except reraise:
                raise
            except Exception:  # a HexRay bug: what a cold run shows
                traceback.print_exc()
                code = 1
    finally:
        SERVED.reset(token)
        for k, v in saved.items():
            _setenv(k, v)
        if previous is not None:
            with contextlib.suppress(OSError):
                os.chdir(previous)
    return _answer(served, code, refused=served.refused)


def _say(served: Served, line: str) -> None:
    """One ``error:`` line on the captured stderr, as ``hexray.cli.main`` prints a HexRayError."""
    from rich.markup import escape

    served.console(True).print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


def _setenv(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _answer(served: Served, code: int, refused: bool = False) -> dict:
    return {"exit_code": code, "stdout": served.streams[False][0].getvalue(), "stderr": served.streams[True][0].getvalue(), "refused": refused}
