"""The HexRay API: one model, many clients; every answer is the CLI's ``--json`` document.

Model work runs in a worker thread, one request at a time (a lock queues them), so the event loop
stays free for ``/api/health`` and for other connections. A user's mistake answers 422 with
``{"ok": false, "error", "hint"}``; a request over the time limit answers 504.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from html import escape

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel
from hexray.render import jsondoc
from hexray.server.schemas import AblateRequest, AnalyzeRequest, GenerateRequest, HeadsRequest, PatchRequest


def create_app(model: LoadedModel, *, time_limit: float = 300.0) -> FastAPI:
    """The API app serving ``model`` (already loaded; the server loads it once)."""
    # no /docs or /redoc: their pages load scripts from a CDN, and the lab runs offline
    app = FastAPI(title="HexRay", version="0.1.0", description="A debugger for transformer language models.", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # the model serves one request at a time

    async def on_model(work: Callable[[], dict]) -> dict:
        def locked() -> dict:
            with lock:
                return work()

        try:
            return await asyncio.wait_for(asyncio.to_thread(locked), timeout=time_limit)
        except TimeoutError:
            raise HexRayError(f"the request took longer than {time_limit:.0f} s", hint="ask for less", http_status=504) from None

    @app.exception_handler(HexRayError)
    async def hexray_error(_: Request, exc: HexRayError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse({"ok": False, "error": message, "hint": None, "status": 422}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        rows = "".join(f"<li><code>{escape(m)} {escape(p)}</code></li>" for p, m in _ENDPOINTS)
        return f"<!doctype html><meta charset='utf-8'><title>HexRay API</title><h1>HexRay API &mdash; {escape(model.name)}</h1><ul>{rows}</ul><p>Schema: <a href='/openapi.json'>/openapi.json</a></p>"

    @app.get("/api/health")
    async def health() -> dict:
        return {"ok": True, "model": model.name, "model_info": jsondoc.model_info(model.spec), "busy": lock.locked()}

    @app.post("/api/analyze")
    async def analyze_prompt(req: AnalyzeRequest) -> dict:
        from hexray.analysis.report import AnalysisOptions, analyze

        options = AnalysisOptions(
            target=req.target, contrast=req.contrast, token_index=req.token_index, granularity=req.granularity,
            top_k=req.top_k, logit_lens=req.logit_lens, residual=req.residual,
        )
        return await on_model(lambda: jsondoc.report_document(analyze(model, req.prompt, options)))

    @app.post("/api/patch")
    async def patch(req: PatchRequest) -> dict:
        from hexray.intervene.patching import activation_patching

        return await on_model(lambda: jsondoc.patch_document(activation_patching(
            model, req.clean, req.corrupt, target=req.target, contrast=req.contrast, sweeps=req.sweep,
            method=req.method, last_position_only=req.last_position, batch_size=req.batch_size,
        ), model.spec))

    @app.post("/api/ablate")
    async def ablate(req: AblateRequest) -> dict:
        from hexray.intervene.ablation import ablate as run_ablation

        return await on_model(lambda: jsondoc.ablation_document(run_ablation(
            model, req.prompt, req.components, mode=req.mode, reference=req.reference, samples=req.samples,
            seed=req.seed, target=req.target, contrast=req.contrast, token_index=req.token_index, k=req.top_k,
        ), model.spec))

    @app.post("/api/heads")
    async def heads(req: HeadsRequest) -> dict:
        from hexray.analysis.heads import classify_heads

        return await on_model(lambda: jsondoc.heads_document(classify_heads(
            model, req.prompt, threshold=req.threshold, seq_len=req.seq_len, n_sequences=req.sequences, seed=req.seed,
        ), model.spec))

    @app.post("/api/generate")
    async def generate(req: GenerateRequest) -> dict:
        def work() -> dict:
            run = _generation(model, req)
            tokens = [jsondoc.token_record_doc(r) for r in run]
            return {"tokens": tokens, **jsondoc.generation_done_doc(run.result())}

        return await on_model(work)

    @app.websocket("/ws/generate")
    async def generate_stream(ws: WebSocket) -> None:
        """Send one message per generated token, then ``done`` (or ``error``); a closed socket stops the work."""
        await ws.accept()
        try:
            req = GenerateRequest.model_validate_json(await ws.receive_text())
        except WebSocketDisconnect:
            return
        except ValueError as exc:
            await ws.send_json({"type": "error", "error": str(exc).splitlines()[0], "status": 422})
            await ws.close()
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def work() -> None:
            with lock:
                try:
                    run = _generation(model, req)
                    for record in run:
                        if stop.is_set():
                            run.interrupted()
                            break
                        loop.call_soon_threadsafe(queue.put_nowait, {"type": "token", **jsondoc.token_record_doc(record)})
                    loop.call_soon_threadsafe(queue.put_nowait, {"type": "done", **jsondoc.generation_done_doc(run.result())})
                except HexRayError as exc:
                    loop.call_soon_threadsafe(queue.put_nowait, {"type": "error", **exc.to_dict()})

        task = asyncio.create_task(asyncio.to_thread(work))
        try:
            while True:
                message = await queue.get()
                await ws.send_text(json.dumps(message, allow_nan=False))
                if message["type"] in ("done", "error"):
                    break
            await ws.close()
        except WebSocketDisconnect:
            pass
        finally:
            stop.set()  # a closed socket cancels the generation at the next token
            await task

    return app


_ENDPOINTS = [
    ("/api/health", "GET"), ("/api/analyze", "POST"), ("/api/patch", "POST"), ("/api/ablate", "POST"),
    ("/api/heads", "POST"), ("/api/generate", "POST"), ("/ws/generate", "WEBSOCKET"),
]


def _generation(model: LoadedModel, req: GenerateRequest):
    from hexray.generation.tracer import GenerationOptions, TracedGeneration

    options = GenerationOptions(
        max_new_tokens=req.max_new_tokens, temperature=req.temperature, seed=req.seed, chat=req.chat, text=req.text,
        granularity=req.granularity, top_k=req.top_k, watch=tuple(p.strip() for p in (req.watch or "").split(",") if p.strip()),
        watch_threshold=req.watch_threshold,
    )
    return TracedGeneration(model, req.prompt, options)
