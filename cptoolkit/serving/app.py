"""The HTTP side (global rank 0): a FastAPI app speaking the OpenAI completions API, and the uvicorn
thread that serves it.

A request is validated (``protocol``), tokenized, and submitted to the ``Inbox``; its handler then
waits on its own queue for the coordinator's updates. The HTTP status is decided by the request's
first update, so a request the engine rejects (too long for ``max_seq_len`` or the cache) is a 400
even when it asked for a stream. A client that disconnects, while waiting or mid-stream, cancels its
request: the engine frees its KV blocks at its next step.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import AsyncIterator, Awaitable, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from cptoolkit.serving.inbox import Finished, Inbox, Submission
from cptoolkit.serving.metrics import ServerMetrics
from cptoolkit.serving.protocol import (APIError, ChatCompletionRequest, CompletionRequest, Responder,
                                        max_new_tokens, validation_error)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response


class _ClientDisconnected(Exception):
    pass


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable):
    """``await work``, or raise ``_ClientDisconnected`` if the client leaves first."""
    work_task, gone_task = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    done, pending = await asyncio.wait({work_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if work_task in done:
        return work_task.result()
    raise _ClientDisconnected


async def _final(submission: Submission) -> Finished:
    """The request's ``Finished`` update (its token events are skipped); a 503 is raised."""
    while True:
        update = await submission.updates.get()
        if isinstance(update, APIError):
            raise update
        if isinstance(update, Finished):
            return update


def _checked(update: Union[Finished, object]):
    """A request the engine rejected finishes at its first update, with its error: answer 400."""
    if isinstance(update, APIError):
        raise update
    if isinstance(update, Finished) and update.result.error:
        raise APIError(400, update.result.error, param="prompt")
    return update


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def create_app(inbox: Inbox, tokenizer, metrics: ServerMetrics, model_name: str, max_seq_len: int) -> FastAPI:
    """The app: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
    ``GET /health``, ``GET /metrics``."""
    app = FastAPI(title="cptoolkit", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(request: Request, error: APIError) -> JSONResponse:
        metrics.http_response(request.url.path, error.status)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return error_response(request, validation_error(error.errors()))

    @app.get("/health")
    async def health():
        refusal = inbox.refusal
        if refusal is not None:
            return JSONResponse({"status": "unavailable", "reason": refusal.message}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "cptoolkit", "max_model_len": max_seq_len}]}

    async def generate(request: Request, body: Union[CompletionRequest, ChatCompletionRequest]) -> Response:
        chat = isinstance(body, ChatCompletionRequest)
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        prompt_ids = body.prompt_ids(tokenizer)
        sampling = body.sampling_params(max_new_tokens(body, len(prompt_ids), max_seq_len), tokenizer.eos_token_ids)
        submission = inbox.submit(prompt_ids, sampling)
        responder = Responder(chat, f"{'chatcmpl' if chat else 'cmpl'}-{submission.key}", model_name)
        try:
            if body.stream:
                first = _checked(await _unless_disconnected(request, submission.updates.get()))
            else:
                finished = _checked(await _unless_disconnected(request, _final(submission)))
        except _ClientDisconnected:
            inbox.cancel(submission.key)
            metrics.http_response(request.url.path, CLIENT_CLOSED_REQUEST)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        metrics.http_response(request.url.path, 200)
        if not body.stream:
            return JSONResponse(responder.response(finished.result))
        return StreamingResponse(_stream(submission, first, responder, body.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _stream(submission: Submission, update, responder: Responder, include_usage: bool
                      ) -> AsyncIterator[str]:
        """Server-sent events: a chunk per token that adds text, the finish chunk, ``[DONE]``. An
        unfinished stream that ends (the client left, so the response task was cancelled) cancels
        its request."""
        finished = False
        try:
            if responder.chat:
                yield _sse(responder.chunk("", first=True))
            while True:
                if isinstance(update, APIError):
                    finished = True
                    yield _sse(update.body())
                    return
                event = update.event if isinstance(update, Finished) else update
                if event.text_delta or event.finish_reason is not None:
                    yield _sse(responder.chunk(event.text_delta, event.finish_reason))
                if isinstance(update, Finished):
                    finished = True
                    if include_usage:
                        yield _sse(responder.usage_chunk(update.result))
                    yield "data: [DONE]\n\n"
                    return
                update = await submission.updates.get()
        finally:
            if not finished:
                inbox.cancel(submission.key)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await generate(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await generate(request, body)

    return app


class HTTPServer:
    """uvicorn serving ``app`` from a background thread, so the main thread is free for the engine
    loop (and keeps the signal handlers: uvicorn installs none outside the main thread)."""

    STARTUP_TIMEOUT_S = 30.0

    def __init__(self, app: FastAPI, host: str, port: int):
        self.host, self.port = host, port
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                timeout_graceful_shutdown=5, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)

    def start(self) -> None:
        """Start listening; raises ``OSError`` when the address cannot be bound (uvicorn logs why)."""
        self._thread.start()
        deadline = time.monotonic() + self.STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP server could not listen on {self.host}:{self.port} (see the log above)")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop accepting connections, let open responses finish (up to 5 s), end the thread."""
        self._server.should_exit = True
        self._thread.join()
