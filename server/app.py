"""`partinfer serve`: an OpenAI-compatible HTTP server (FastAPI) over one loaded model, and a chat page.

Routes: POST /v1/chat/completions and /v1/completions (`stream` false or true: server-sent events in
OpenAI's chunk format, ended by `data: [DONE]`), GET /v1/models, GET /health, GET / (the page).
Every error is an OpenAI-style error object with a 4xx status; a full queue is 429 with Retry-After.
Responses carry `usage` and, as an extension, `partinfer`: the method, the fraction of FFN neurons
loaded and computed, and the speed of that request.
"""

from __future__ import annotations

import asyncio
import json
from importlib.resources import files
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from partinfer.common.errors import PartinferError
from partinfer.runtime.generate import SamplingConfig
from partinfer.runtime.text import encode_messages, require_utf8
from partinfer.server.protocol import (BadRequest, ChatRequest, CompletionRequest, SamplingFields, chat_chunk, chat_response,
                             completion_id, error_body, text_chunk, text_response, usage)
from partinfer.server.guard import RequestGuard
from partinfer.server.worker import Completion, Job, ModelWorker


def build_app(worker: ModelWorker) -> RequestGuard:
    """The API behind the Host check and body limit of server/guard.py (an ASGI app for uvicorn)."""
    config = worker.config
    app = FastAPI(title="partinfer", docs_url=None, redoc_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind=kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = "the body is not valid JSON" if first.get("type") == "json_invalid" else \
            f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(message, param=where), status_code=400)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse(error_body(exc.message, param=exc.param, code=exc.code), status_code=exc.status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model_name, "method": config.method, "queued": worker.admitted}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "partinfer"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return (files("partinfer.server") / "static" / "index.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = await asyncio.to_thread(encode_messages, worker.engine.tokenizer, messages)  # not on the event loop
        except PartinferError as e:
            raise BadRequest(str(e), param="messages") from None
        rid = completion_id("chatcmpl")
        return await respond(request, body, ids, rid, lambda c: chat_response(rid, config.model_name, c.text, c.finish_reason,
                                                                  c.prompt_tokens, c.completion_tokens, c.extension),
                             lambda piece: chat_chunk(rid, config.model_name, {"content": piece}),
                             lambda c: chat_chunk(rid, config.model_name, {}, c.finish_reason, final_extra(c)),
                             first=chat_chunk(rid, config.model_name, {"role": "assistant", "content": ""}))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        try:
            text = require_utf8(body.prompt, "the prompt")
            ids = await asyncio.to_thread(worker.engine.encode, text, False)  # not on the event loop
        except PartinferError as e:
            raise BadRequest(str(e), param="prompt") from None
        rid = completion_id("cmpl")
        return await respond(request, body, ids, rid, lambda c: text_response(rid, config.model_name, c.text, c.finish_reason,
                                                                  c.prompt_tokens, c.completion_tokens, c.extension),
                             lambda piece: text_chunk(rid, config.model_name, piece),
                             lambda c: text_chunk(rid, config.model_name, "", c.finish_reason, final_extra(c)))

    def final_extra(c: Completion) -> dict:
        return {"usage": usage(c.prompt_tokens, c.completion_tokens), "partinfer": c.extension}

    async def respond(request: Request, body: SamplingFields, ids: list[int], rid: str, whole: Callable[[Completion], dict],
                      piece_chunk: Callable[[str], dict], last_chunk: Callable[[Completion], dict],
                      first: dict | None = None):
        body.refuse_unsupported()
        sampling = SamplingConfig(temperature=body.temperature, top_p=body.top_p, seed=body.seed or 0)
        job = worker.job_for(ids, body.requested_max_tokens(), sampling, body.stops())
        if not worker.admit():
            return JSONResponse(error_body(f"the server is busy ({config.max_queue} requests queued); retry shortly",
                                           kind="rate_limit_error", code="queue_full"),
                                status_code=429, headers={"Retry-After": str(config.retry_after_s)})
        if not body.stream:
            return whole(await until_done_or_gone(request, job, asyncio.wrap_future(worker.submit(job))))
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        job.emit = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
        done = asyncio.wrap_future(worker.submit(job))  # submitted now: its place is freed however the client acts
        return StreamingResponse(stream(job, pieces, done, piece_chunk, last_chunk, first),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def until_done_or_gone(request: Request, job: Job, done: asyncio.Future) -> Completion:
        """The job's completion; a client that disconnects first cancels it (at the next token), so its
        place goes to the next request instead of a reply nobody reads."""
        while not done.done():
            await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
            if not done.done() and await request.is_disconnected():
                job.cancelled.set()
                break
        return await done

    async def stream(job: Job, pieces: asyncio.Queue, done: asyncio.Future, piece_chunk: Callable[[str], dict],
                     last_chunk: Callable[[Completion], dict], first: dict | None) -> AsyncIterator[str]:
        """Pieces as they come; pieces are queued before the job's end is (both via the event loop, in order)."""
        try:
            if first is not None:
                yield sse(first)
            while not (done.done() and pieces.empty()):
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield sse(piece_chunk(getter.result()))
                else:
                    getter.cancel()
            try:
                completion = done.result()
            except Exception as e:  # a failure inside generation: tell the client, keep serving
                yield sse(error_body(f"generation failed: {e}", kind="server_error"))
                return
            yield sse(last_chunk(completion))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a client that went away stops its generation and frees its place

    return RequestGuard(app, config.max_body_bytes, config.allowed_hosts)


DISCONNECT_POLL_S = 0.05  # how often a non-streaming request checks that its client is still there


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
