"""The HexRay lab: one model, many clients; every answer is the CLI's ``--json`` document.

Every job is one entry of :func:`_jobs` and is served twice: ``POST /api/NAME`` answers its
document, ``/ws/NAME`` streams its messages and ends with the same document. Model work runs in a
worker thread, one job at a time, first come first served (waiting sockets hear their place), so
the event loop stays free for ``/api/health``, the page and other connections. Every forward pass
checks its job's stop flag before each block, so a closed WebSocket (the lab closes a superseded
request's) or the time limit frees the model there. A user's mistake answers 422 with
``{"ok": false, "error", "hint"}``; a request over the time limit answers 504.
"""


import asyncio
import dataclasses
import json
import logging
import mimetypes
import os
import secrets
import threading
from collections.abc import Callable
from html import escape
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel

from hexray.errors import HexRayError, check_text
from hexray.models.loading import LoadedModel
from hexray.render import jsondoc
from hexray.tracing.engine import cancellable
from hexray.server import schemas

STATIC = resources.files("hexray.server") / "static"
mimetypes.add_type("text/javascript", ".js")  # some systems map .js to text/plain, which module scripts refuse
log = logging.getLogger("hexray.server")


class Cancelled(Exception):
    """The client went away or the time limit passed; the job stops at its next step."""


class Job:
    """What model work sees from its thread: a way to send a message and a flag to stop at."""

    def __init__(self, send: Callable[[dict], None] | None = None):
        self.stop = threading.Event()
        self.told_queued = False  # it heard its place in the queue, so it hears when its turn starts
        self._send = send

    @property
    def streaming(self) -> bool:
        """Whether anyone reads this job's messages (a socket does; a POST waits for the document)."""
        return self._send is not None

    def emit(self, message: dict) -> None:
        self.check()
        if self._send is not None:
            self._send(message)

    def tell(self, message: dict) -> None:
        """A message about the job rather than from it (its place in the queue): sent even once stopped."""
        if self._send is not None:
            self._send(message)

    def check(self) -> None:
        if self.stop.is_set():
            raise Cancelled


class ModelQueue:
    """One job at a time on the model, first come first served.

    A job's turn starts when it reaches the head of the queue and ends when its worker thread
    ends, not when its client stops waiting: a job past its deadline is told to stop (its forward
    passes check at every block) and the next job starts once it has.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()  # FIFO: waiters are served in arrival order
        self._queue: list[Job] = []  # jobs waiting for their turn, in arrival order
        self.busy = False

    @property
    def waiting(self) -> int:
        """Jobs queued for their turn (every one of them: counted here, not in a thread pool)."""
        return len(self._queue)

    def _announce(self) -> None:
        """Tell each waiting job how many jobs are ahead of it (the running one included)."""
        for i, waiting in enumerate(self._queue):
            waiting.told_queued = True
            waiting.tell({"type": "queued", "ahead": i + 1})

    async def run(self, job: Job, work: Callable[[Job], dict], deadline: float) -> dict:
        loop = asyncio.get_running_loop()
        self._queue.append(job)
        if self._lock.locked() or len(self._queue) > 1:
            self._announce()
        try:
            await asyncio.wait_for(self._lock.acquire(), timeout=max(deadline - loop.time(), 0.001))
        finally:
            self._queue.remove(job)
            self._announce()
        try:
            if job.told_queued:
                job.tell({"type": "running"})
            self.busy = True
            thread = asyncio.ensure_future(asyncio.to_thread(self._turn, job, work))
            thread.add_done_callback(self._release)
        except BaseException:  # the turn never started: give it back
            self.busy = False
            self._lock.release()
            raise
        try:
            return await asyncio.wait_for(asyncio.shield(thread), timeout=max(deadline - loop.time(), 0.001))
        except BaseException:
            job.stop.set()  # a deadline or a cancelled caller: the thread stops at its next block
            raise

    @staticmethod
    def _turn(job: Job, work: Callable[[Job], dict]) -> dict:
        job.check()  # the client may have left while this job waited its turn
        with cancellable(job.check):
            return work(job)

    def _release(self, thread: asyncio.Future) -> None:
        if not thread.cancelled():
            thread.exception()  # retrieved here, so an abandoned job's error is not reported as unhandled
        self.busy = False
        self._lock.release()


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_BODY_BYTES = 2_000_000  # a request body; the largest valid request (256 prompts of 20k chars) is smaller


class Guard:
    """ASGI middleware: only the local user drives the server, and no request is unbounded.

    - ``Host`` must be a loopback name or address, or one given with ``--allow-host`` (DNS rebinding);
    - a WebSocket, or a POST, whose ``Origin`` is not this server's is refused (another page in the
      user's browser must not read results or queue work);
    - a body over :data:`MAX_BODY_BYTES` answers 413 before it is read in full.
    """

    def __init__(self, app, allowed_hosts: tuple[str, ...]):
        self.app, self.allowed = app, {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = _hostname(headers.get("host", ""))
        refusal = None
        if host not in self.allowed:
            refusal = (421 if scope["type"] == "http" else 1008, f"Host {host or '(none)'!r} is not this server's", "open the lab at http://127.0.0.1:PORT/, or restart with --allow-host NAME")
        elif "origin" in headers and (scope["type"] == "websocket" or scope.get("method") not in ("GET", "HEAD", "OPTIONS")):
            origin = headers["origin"]
            if origin == "null" or _hostname(origin.split("://", 1)[-1]) not in self.allowed:
                refusal = (403 if scope["type"] == "http" else 1008, f"requests from another site ({origin[:80]}) are refused", "use the lab this server serves")
        if refusal is not None:
            status, message, hint = refusal
            if scope["type"] == "websocket":
                await receive()  # websocket.connect
                return await send({"type": "websocket.close", "code": status, "reason": message[:120]})
            return await _answer(send, status if status != 421 else 421, {"ok": False, "error": message, "hint": hint, "status": status})
        if scope["type"] == "http" and int(headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return await _answer(send, 413, {"ok": False, "error": f"the request body is over {MAX_BODY_BYTES // 1_000_000} MB", "hint": "send less", "status": 413})
        seen = [0]

        async def bounded_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > MAX_BODY_BYTES:
                    raise HexRayError(f"the request body is over {MAX_BODY_BYTES // 1_000_000} MB", hint="send less", http_status=413)
            return message

        return await self.app(scope, bounded_receive if scope["type"] == "http" else receive, send)


def _hostname(netloc: str) -> str:
    """``127.0.0.1:8000`` -> ``127.0.0.1``; ``[::1]:8000`` -> ``::1``; lower-cased."""
    netloc = netloc.strip().lower().split("/", 1)[0]
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


async def _answer(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(model: LoadedModel, *, time_limit: float = 300.0, max_tokens: int = 1024, allowed_hosts: tuple[str, ...] = (),
               cli_token: str | None = None, model_key: str | None = None) -> FastAPI:
    """The lab serving ``model`` (already loaded; the server loads it once).

    ``max_tokens`` bounds every prompt the server takes (the page stays responsive and the
    patching batch stays in memory); ``time_limit`` bounds each request's seconds;
    ``allowed_hosts`` are names besides the loopback ones that ``Host`` may carry.
    ``cli_token``: the secret ``POST /api/cli`` (warm ``hexray --server`` runs) asks for; without
    one that endpoint refuses everything. ``model_key``: what ``--model`` spelling the served model
    answers to (``hexray.models.loading.model_key``; default: from its name).
    """
    # no /docs or /redoc: their pages load scripts from a CDN, and the lab runs offline
    app = FastAPI(title="HexRay", version="0.1.0", description="A debugger for transformer language models.", docs_url=None, redoc_url=None)
    turns = ModelQueue()  # the model serves one job at a time, first come first served

    def check_length(text: str | None, field: str) -> None:
        if text is not None:
            check_text(text, field)  # before the tokenizer sees it
        n = 0 if text is None else len(model.encode(text))
        if n > max_tokens:
            raise HexRayError(f"{field} is {n} tokens; this server takes at most {max_tokens}", hint="shorten it, or restart with a larger --max-tokens")

    def check_request(req: BaseModel) -> None:
        """Every prompt-like input within ``max_tokens``, before the request queues for the model."""
        for field in ("prompt", "clean", "corrupt", "text"):
            check_length(getattr(req, field, None), field)
        for i, reference in enumerate(getattr(req, "reference", None) or ()):
            check_length(reference, f"reference[{i}]")
        for i, prompt in enumerate(getattr(req, "prompts", None) or ()):
            check_length(prompt, f"prompts[{i}]")
        for i, row in enumerate(getattr(req, "rows", None) or ()):
            for key, text in row.items():
                check_length(text, f"rows[{i}].{key}")

    async def on_model(req: BaseModel, work: Callable[[Job], dict]) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit
        await asyncio.to_thread(check_request, req)  # tokenizing a long text must not hold the event loop
        try:
            return await turns.run(Job(), work, deadline)
        except TimeoutError:
            raise _timeout() from None

    def _timeout() -> HexRayError:
        return HexRayError(f"the request took longer than {time_limit:g} s", hint="ask for less, or restart with a larger --time-limit", http_status=504)

    async def stream(ws: WebSocket, request_type: type[BaseModel], work: Callable[[BaseModel, Job], dict]) -> None:
        """Read one request, run ``work`` on it, forward its messages, end with ``done`` or ``error``."""
        await ws.accept()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit
        try:
            first = await ws.receive()
            if first["type"] == "websocket.disconnect":
                return
            if first.get("text") is None:
                raise HexRayError("the request must be a JSON text frame, not binary", hint='send e.g. {"prompt": "..."} as text')
            req = request_type.model_validate_json(first["text"])
            await asyncio.to_thread(check_request, req)
        except WebSocketDisconnect:
            return
        except HexRayError as exc:
            await _send_last(ws, {"type": "error", **_error_doc(exc)})
            return
        except ValueError as exc:  # pydantic's ValidationError
            await _send_last(ws, {"type": "error", "ok": False, "error": _first_error(exc), "hint": None, "status": 422})
            return
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(lambda m: loop.call_soon_threadsafe(queue.put_nowait, m))

        async def run() -> None:
            try:
                done = await turns.run(job, lambda j: work(req, j), deadline)
                queue.put_nowait({"type": "done", **done})
            except (Cancelled, asyncio.CancelledError):
                pass
            except TimeoutError:
                queue.put_nowait({"type": "error", **_timeout().to_dict()})
            except HexRayError as exc:
                queue.put_nowait({"type": "error", **_error_doc(exc)})
            except Exception as exc:  # a HexRay bug: say so now, not at the time limit
                log.exception("websocket job failed")
                queue.put_nowait({"type": "error", "ok": False, "error": f"internal error: {type(exc).__name__}: {exc}", "hint": None, "status": 500})

        async def watch_close() -> None:
            """The client's close frame stops the work at its next block, even while nothing is sent."""
            try:
                while (await ws.receive())["type"] != "websocket.disconnect":
                    pass
            except Exception:  # the socket is already gone
                pass
            job.stop.set()
            queue.put_nowait(None)

        task = asyncio.create_task(run())
        watcher = asyncio.create_task(watch_close())
        try:
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), timeout=max(deadline - loop.time(), 0.001) + 1.0)
                except TimeoutError:  # the turn's own deadline answers first; this is a backstop
                    job.stop.set()
                    message = {"type": "error", **_timeout().to_dict()}
                if message is None:  # the client left: nothing more to send
                    return
                await ws.send_text(json.dumps(message, allow_nan=False))
                if message["type"] in ("done", "error"):
                    break
            await ws.close()
        except WebSocketDisconnect:
            pass
        finally:
            watcher.cancel()
            job.stop.set()  # a closed socket cancels the work at its next block
            task.cancel()

    @app.exception_handler(HexRayError)
    async def hexray_error(_: Request, exc: HexRayError) -> JSONResponse:
        return JSONResponse(_error_doc(exc), status_code=exc.http_status)

    @app.exception_handler(StarletteHTTPException)
    async def framework_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """404, 405, 400 (a body that is not JSON) and the like, in the one error shape."""
        hints = {404: "GET /api lists the endpoints", 405: "GET /api lists each endpoint's method", 400: "send a JSON body with Content-Type: application/json"}
        return JSONResponse({"ok": False, "error": str(exc.detail)[:200], "hint": hints.get(exc.status_code), "status": exc.status_code}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        json_body = "json" in request.headers.get("content-type", "").lower()
        hint = None if json_body or request.method == "GET" else "send the body as JSON with Content-Type: application/json"  # a GET's fields are its query
        return JSONResponse({"ok": False, "error": _first_error(exc), "hint": hint, "status": 422}, status_code=422)

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/", include_in_schema=False)
    async def lab() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), headers={"Cache-Control": "no-cache"})

    @app.get("/api", response_class=HTMLResponse)
    async def endpoints() -> str:
        rows = "".join(f"<li><code>{escape(m)} {escape(p)}</code></li>" for p, m in _ENDPOINTS)
        return f"<!doctype html><meta charset='utf-8'><title>HexRay API</title><h1>HexRay API &mdash; {escape(model.name)}</h1><ul>{rows}</ul><p>Schema: <a href='/openapi.json'>/openapi.json</a></p>"

    @app.get("/api/health")
    async def health() -> dict:
        return {"ok": True, "model": model.name, "model_info": jsondoc.model_info(model.spec), "busy": turns.busy,
                "queued": turns.waiting, "max_tokens": max_tokens, "time_limit": time_limit,
                "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}

    for name, (request_type, work, about) in _jobs(model).items():
        _route(app, name, request_type, work, about, on_model, stream)

    served_key = model_key or _model_key(model.name)

    @app.post("/api/cli")
    async def cli_command(req: schemas.CliRequest, request: Request) -> Response:
        """A one-shot ``hexray`` command on this model (``hexray --server``): {exit_code, stdout, stderr, refused}.

        Only for a process that read the token from the server's discovery file (the same user on
        this machine). It queues with every other job; a client that hangs up stops it.
        """
        if cli_token is None or not secrets.compare_digest(req.token.encode(), cli_token.encode()):
            raise HexRayError("wrong or missing token: /api/cli runs commands only for the user who started this server", http_status=403,
                              hint="hexray --server reads the token from the server's discovery file" if cli_token else "this server takes no CLI commands")
        if not os.path.isabs(req.cwd):
            raise HexRayError("cwd must be an absolute path", field="cwd")
        from hexray import warm

        work = asyncio.ensure_future(on_model(req, lambda job: warm.run_cli(model, served_key, req, reraise=(Cancelled,))))
        gone = asyncio.ensure_future(_hung_up(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():  # Ctrl-C on the client: the job stops at its next block
            work.cancel()
            return Response(status_code=499)
        return Response(json.dumps(work.result()), media_type="application/json")  # ASCII JSON: any text survives

    @app.get("/api/analyses")
    async def registered_analyses() -> dict:
        """The registry: every analysis /api/analyze can run, its request fields and the lab panel that draws it."""
        from hexray.analysis.registry import analyses

        return {"analyses": [
            {"name": a.name, "title": a.title, "json_key": a.json_key, "lab_panel": a.lab_panel,
             "switch": a.switch.request_field if a.switch else None,
             "switch_type": None if a.switch is None else "flag" if a.switch.type is bool else "text",  # a checkbox, or a value to type
             "options": [_option_doc(o) for o in a.all_options if o.api]}
            for a in analyses()
        ]}

    @app.get("/api/options")
    async def option_defaults() -> dict:
        """Each request's fields with their defaults and help (what the lab's forms start from)."""
        from hexray.analysis.heads import HEADS_OPTIONS
        from hexray.analysis.report import trace_options
        from hexray.generation.tracer import GENERATION_OPTIONS
        from hexray.intervene.ablation import ABLATE_OPTIONS
        from hexray.intervene.patching import PATCH_OPTIONS

        groups = {"analyze": trace_options(), "patch": PATCH_OPTIONS, "ablate": ABLATE_OPTIONS, "heads": HEADS_OPTIONS, "generate": GENERATION_OPTIONS}
        return {name: [_option_doc(o) for o in group if o.api] for name, group in groups.items()}

    @app.get("/api/dictionaries")
    async def dictionaries() -> dict:
        """The dictionaries in the cache that fit the served model (what ``dict`` / ``features`` fields take), and whether a tuned lens is there."""
        from hexray.features.dictionary import model_key as same_model
        from hexray.features.store import saved_dictionaries
        from hexray.features.tuned_lens import default_tuned_lens_path

        rows = [r for r in saved_dictionaries() if r.get("model") and same_model(r["model"]) == same_model(model.name)]
        for r in rows:  # the short name a model default answers to (resid.12), else the cache name
            r["use"] = r["site"] if r["name"].endswith("/" + r["site"]) else r["name"]
        return {"dictionaries": rows, "tuned_lens": default_tuned_lens_path(model).exists()}

    served_index: dict = {"index": None, "version": None}
    index_lock = threading.Lock()  # one DuckDB connection, read by one request at a time

    def with_index(read: Callable) -> dict:
        """``read(index)`` on the served model's default index, under the lock; reopened when a build moved a new file into place.

        No index answers 404 (``open_index``'s error). A build writes beside the file and moves it
        in at the end, so until then the open connection keeps reading the previous index.
        """
        from hexray.neuroscope import default_index_path, open_index

        path = default_index_path(model.spec)
        with index_lock:
            version = _file_version(path)
            if served_index["index"] is not None and served_index["version"] != version:  # rebuilt (or removed): read the new file
                served_index["index"].close()
                served_index["index"] = None
            if served_index["index"] is None:
                served_index["index"], served_index["version"] = open_index(path, model.spec), version
            return read(served_index["index"])

    @app.get("/api/units/{name}")
    def unit(name: str) -> dict:
        """A neuron's, head's or feature's neuroscope page (what ``hexray neuron --json`` prints) from the served model's index."""
        from hexray.neuroscope import unit_page

        if len(name) > 200:
            raise HexRayError("the unit name is over 200 characters", hint="name a unit: L10N1234, L9H6, resid.12:123")
        return with_index(lambda index: jsondoc.unit_page_doc(unit_page(index, name), index.info))

    @app.get("/api/units")
    async def unit_search(query: Annotated[schemas.UnitSearchRequest, Query()]) -> dict:
        """Reverse look-ups (what ``hexray index search --json`` prints): ``?prompt=P&position=N`` the units firing most at
        that token relative to their own max (one forward pass, queued with the model's other jobs); ``?token=T`` the
        units whose top examples centre on that token."""
        from hexray.neuroscope import search_position, search_token

        if (query.prompt is None) == (query.token is None):
            raise HexRayError("give prompt (with position) or token, one of them", hint="GET /api/units?prompt=...&position=-1, or /api/units?token=%20Paris")
        if query.token is not None:
            def by_token(index) -> dict:
                hits = search_token(index, model.single_token(query.token, role="token"), limit=query.limit)
                return jsondoc.unit_hits_doc(hits, search={"token": query.token})

            return await asyncio.to_thread(with_index, by_token)

        def at_position(index) -> dict:
            found = search_position(index, model, query.prompt, query.position, limit=query.limit)
            token = found.tokens[found.position]
            return jsondoc.unit_hits_doc(found.hits, search={"prompt": query.prompt, "position": found.position, "token": token})

        return await on_model(query, lambda job: with_index(at_position))  # a forward pass: the model's turn, then the index's lock

    @app.get("/api/presets")
    async def presets() -> dict:
        """The worked examples (``--preset`` in the CLI), each with the circuit the literature expects."""
        from hexray.presets import PRESETS

        return {"presets": [dataclasses.asdict(p) for p in PRESETS]}

    app.add_middleware(Guard, allowed_hosts=LOOPBACK_HOSTS + tuple(allowed_hosts))
    return app


def _route(app: FastAPI, name: str, request_type: type[BaseModel], work, about: str, on_model, stream) -> None:
    """``POST /api/NAME`` answers the document; ``/ws/NAME`` streams the job's messages, then the same document."""

    async def post(req: request_type) -> dict:  # type: ignore[valid-type]
        return await on_model(req, lambda job: work(req, job))

    async def socket(ws: WebSocket) -> None:
        await stream(ws, request_type, work)

    post.__doc__ = socket.__doc__ = about
    app.post(f"/api/{name}", name=f"post_{name}")(post)
    app.websocket(f"/ws/{name}", name=f"ws_{name}")(socket)


def _jobs(model: LoadedModel) -> dict[str, tuple[type[BaseModel], Callable[[BaseModel, Job], dict], str]]:
    """Every job the model serves: name -> (request, work(request, job) -> document, what it streams)."""
    return {
        "analyze": (schemas.AnalyzeRequest, lambda req, job: _analysis_job(model, req, job),
                    "Streams a ``layer`` message as each block finishes (norms, lens at the position), ``attribution`` rows once the final scale exists, then the document."),
        "attention": (schemas.AttentionRequest, lambda req, job: _attention_job(model, req),
                      "One head on the prompt: its pattern, entropy, concentration, value norms, top token pairs and role scores."),
        "flow": (schemas.FlowRequest, lambda req, job: _flow_job(model, req),
                 "Attention between token pairs summed over heads and layers (or one layer's, with ``layer``)."),
        "circuit": (schemas.CircuitRequest, lambda req, job: _circuit_job(model, req),
                    "Edges along the strongest contributors from the prediction backwards (input × gradient)."),
        "patch": (schemas.PatchRequest, lambda req, job: _patching(model, req, job), "Streams ``progress`` (variants done of total), then the patching document."),
        "ablate": (schemas.AblateRequest, lambda req, job: _ablation_job(model, req), "The distribution before and after ablating ``components``."),
        "analyze/set": (schemas.AnalyzeSetRequest, lambda req, job: _analysis_set_job(model, req),
                        "Attribution's mean and spread over ``prompts`` (the CLI's ``trace --prompts``), batched."),
        "patch/set": (schemas.PatchSetRequest, lambda req, job: _patch_set_job(model, req, job),
                      "Each site's mean and spread over ``rows`` of {clean, corrupt[, target, contrast]} (``patch --prompts``)."),
        "ablate/set": (schemas.AblateSetRequest, lambda req, job: _ablate_set_job(model, req),
                       "KL and the target's probability over ``prompts`` with ``components`` ablated (``ablate --prompts``)."),
        "heads": (schemas.HeadsRequest, lambda req, job: _heads_job(model, req), "Every head's role scores."),
        "generate": (schemas.GenerateRequest, lambda req, job: _generation_job(model, req, job),
                     "Streams one ``token`` message per generated token, then the generation's document."),
    }


_ENDPOINTS = [("/api/health", "GET"), ("/api/analyses", "GET"), ("/api/options", "GET"), ("/api/presets", "GET"), ("/api/dictionaries", "GET"),
              ("/api/units/{name}", "GET"), ("/api/units?prompt=P&position=N | ?token=T", "GET"), ("/api/cli", "POST")] + [
    (path, method) for name in ("analyze", "attention", "flow", "circuit", "patch", "ablate", "analyze/set", "patch/set", "ablate/set", "heads", "generate")
    for path, method in ((f"/api/{name}", "POST"), (f"/ws/{name}", "WEBSOCKET"))
]


def _file_version(path) -> tuple[int, int] | None:
    """What changes when a build moves a new file into ``path`` (its inode and modification time); None when there is none."""
    try:
        st = path.stat()
    except OSError:  # missing (or unreadable): open_index says which
        return None
    return st.st_ino, st.st_mtime_ns


async def _hung_up(request: Request) -> None:
    """Returns when the client closes the connection (the body is read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _model_key(name: str) -> str:
    from hexray.models.loading import model_key

    return model_key(name)


def _first_error(exc: Exception) -> str:
    """``field: message`` for the first thing pydantic rejected."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return str(exc).splitlines()[0]
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")


async def _send_last(ws: WebSocket, message: dict) -> None:
    try:
        await ws.send_text(json.dumps(message, allow_nan=False))
        await ws.close()
    except WebSocketDisconnect:
        pass


def _error_doc(exc: HexRayError) -> dict:
    """The error as the API spells it: a field by its request name (``sweep``, not ``sweeps``)."""
    from hexray.options import request_names

    names = request_names()
    return exc.to_dict(lambda field: names.get(field, field))


def _pair_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    for i, row in enumerate(rows):
        missing = [k for k in ("clean", "corrupt") if not row.get(k)]
        unknown = sorted(set(row) - {"clean", "corrupt", "target", "contrast"})
        if missing or unknown:
            raise HexRayError(f"{{field}} {'lacks ' + ', '.join(missing) if missing else 'has unknown keys ' + ', '.join(unknown)}", field=f"rows[{i}]")
    return rows


def _option_doc(o) -> dict:
    default = o.request_default
    return {"name": o.request_field, "default": list(default) if isinstance(default, tuple) else default, "help": o.help,
            "choices": list(o.choices) if o.choices else None}


def _from_request(cls, req: BaseModel, **overrides):
    """A capability's options from an API request (its field names), validated: errors name the field."""
    from hexray.options import values

    options = cls(**{**values(cls.OPTIONS, req, api=True), **overrides})
    options.validate()
    return options


def _analysis_job(model: LoadedModel, req: BaseModel, job: Job) -> dict:
    """The analysis, streamed live to a socket: blocks as the pass runs them, then the attribution."""
    from hexray.analysis.report import AnalysisOptions, analyze

    live = (lambda snapshot: job.emit({"type": "layer", **jsondoc.layer_snapshot_doc(snapshot)})) if job.streaming else None
    report = analyze(model, req.prompt, _from_request(AnalysisOptions, req), on_layer=live)
    if job.streaming:
        for row in jsondoc.layer_attribution_docs(report):
            job.emit({"type": "attribution", **row})
    return jsondoc.report_document(report)


def _attention_job(model: LoadedModel, req: BaseModel) -> dict:
    from hexray.analysis.heads import head_attention

    return jsondoc.head_attention_document(head_attention(
        model, req.prompt, req.layer, req.head, seq_len=req.seq_len, n_sequences=req.sequences, seed=req.seed, exclude_first_key=req.exclude_first_key,
    ))


def _flow_job(model: LoadedModel, req: BaseModel) -> dict:
    from hexray.analysis.flow import token_flow

    return jsondoc.token_flow_document(token_flow(model, req.prompt, layer=req.layer, exclude_first_key=req.exclude_first_key))


def _circuit_job(model: LoadedModel, req: BaseModel) -> dict:
    from hexray.analysis.circuit import circuit

    return jsondoc.circuit_document(circuit(
        model, req.prompt, target=req.target, contrast=req.contrast, position=req.token_index, k=req.k, depth=req.depth,
    ))


def _ablation_job(model: LoadedModel, req: BaseModel) -> dict:
    from hexray.intervene.ablation import AblateOptions, ablate

    options = _from_request(AblateOptions, req)
    return jsondoc.ablation_document(ablate(
        model, req.prompt, req.components, reference=req.reference, k=options.top_k,
        **{k: v for k, v in dataclasses.asdict(options).items() if k != "top_k"},
    ), model.spec)


def _analysis_set_job(model: LoadedModel, req: BaseModel) -> dict:
    from hexray.analysis.dataset import dataset_attribution
    from hexray.analysis.report import AnalysisOptions

    options = _from_request(AnalysisOptions, req)
    return jsondoc.dataset_attribution_document(dataset_attribution(model, [{"prompt": p} for p in req.prompts], options), model.spec)


def _patch_set_job(model: LoadedModel, req: BaseModel, job: Job) -> dict:
    from hexray.intervene.dataset import dataset_patching
    from hexray.intervene.patching import PatchOptions

    options = _from_request(PatchOptions, req)
    result = dataset_patching(model, _pair_rows(req.rows), options, progress=lambda done, total: job.emit({"type": "progress", "done": done, "total": total}))
    return jsondoc.dataset_patch_document(result, model.spec)


def _ablate_set_job(model: LoadedModel, req: BaseModel) -> dict:
    from hexray.intervene.ablation import AblateOptions
    from hexray.intervene.dataset import dataset_ablation

    options = _from_request(AblateOptions, req)
    rows = [{"prompt": p} for p in req.prompts]
    return jsondoc.dataset_ablation_document(dataset_ablation(model, rows, req.components, options, reference=req.reference), model.spec)


def _heads_job(model: LoadedModel, req: BaseModel) -> dict:
    from hexray.analysis.heads import HeadsOptions, classify_heads

    options = _from_request(HeadsOptions, req)
    kwargs = {k: v for k, v in dataclasses.asdict(options).items() if k != "top_k"}
    return jsondoc.heads_document(classify_heads(model, req.prompt, **kwargs), model.spec)


def _generation_job(model: LoadedModel, req: BaseModel, job: Job) -> dict:
    """Each token as it is generated; the document has them all (a stopped run keeps what it made)."""
    from hexray.generation.tracer import GenerationOptions, TracedGeneration

    run = TracedGeneration(model, req.prompt, _from_request(GenerationOptions, req))
    tokens = []
    try:
        for record in run:
            tokens.append(jsondoc.token_record_doc(record))
            job.emit({"type": "token", **tokens[-1]})
    except Cancelled:
        run.interrupted()
        raise
    return {"tokens": tokens, **jsondoc.generation_done_doc(run.result())}


def _patching(model: LoadedModel, req: BaseModel, job: Job) -> dict:
    from hexray.intervene.patching import PatchOptions, activation_patching

    options = _from_request(PatchOptions, req)
    result = activation_patching(
        model, req.clean, req.corrupt, **{k: v for k, v in dataclasses.asdict(options).items() if k != "top_k"},
        progress=lambda done, total: job.emit({"type": "progress", "done": done, "total": total}),
    )
    return jsondoc.patch_document(result, model.spec)
