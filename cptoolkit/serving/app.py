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
from typing import AsyncIterator, Awaitable, Sequence, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from cptoolkit.inference.request import GenerationResult
from cptoolkit.serving.inbox import Finished, Inbox, Submission
from cptoolkit.serving.metrics import ServerMetrics
from cptoolkit.serving.protocol import (APIError, ChatCompletionRequest, CompletionRequest, PromptAnswer,
                                        Responder, max_new_tokens, validation_error)

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


async def _choices(submission: Submission) -> list[Finished]:
    """Every choice's ``Finished`` update, in choice order (token events are skipped); a 503 is raised."""
    finished: dict[int, Finished] = {}
    while len(finished) < submission.num_choices:
        update = await submission.updates.get()
        if isinstance(update, APIError):
            raise update
        if isinstance(update, Finished):
            finished[update.event.request_index] = update
    return [finished[choice] for choice in range(submission.num_choices)]


async def _all_choices(submissions: Sequence[Submission]) -> list[list[Finished]]:
    return list(await asyncio.gather(*(_choices(submission) for submission in submissions)))


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
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        body.check_streamable()
        prompts_ids = body.prompts_ids(tokenizer)
        sampling = [body.sampling_params(max_new_tokens(body, len(ids), max_seq_len), tokenizer.eos_token_ids,
                                         tokenizer.vocab_size) for ids in prompts_ids]
        submissions = inbox.submit(prompts_ids, sampling, body.num_choices)
        keys = [submission.key for submission in submissions]
        chat = isinstance(body, ChatCompletionRequest)
        responder = Responder(body, f"{'chatcmpl' if chat else 'cmpl'}-{keys[0]}", model_name, tokenizer)
        texts = [""] * len(prompts_ids) if chat else body.prompt_texts(prompts_ids, tokenizer)
        try:
            if body.stream:
                first = _checked(await _unless_disconnected(request, submissions[0].updates.get()))
            else:
                finished = await _unless_disconnected(request, _all_choices(submissions))
                for update in (update for choices in finished for update in choices):
                    _checked(update)
        except _ClientDisconnected:
            inbox.cancel(keys)
            metrics.http_response(request.url.path, CLIENT_CLOSED_REQUEST)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except APIError:
            inbox.cancel(keys)  # the other prompts of a request that failed are not worth finishing
            raise
        metrics.http_response(request.url.path, 200)
        if not body.stream:
            answers = [PromptAnswer(text, [update.result for update in choices])
                       for text, choices in zip(texts, finished)]
            return JSONResponse(responder.response(answers))
        return StreamingResponse(_stream(submissions[0], first, responder, body.include_usage, texts[0]),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _stream(submission: Submission, update, responder: Responder, include_usage: bool, prompt_text: str
                      ) -> AsyncIterator[str]:
        """Server-sent events: with ``echo`` the prompt's text first (chat: the role), then a chunk per
        token that adds text or a logprob, each choice's finish chunk, the usage when asked, ``[DONE]``.
        An unfinished stream that ends (the client left, so the response task was cancelled) cancels
        its request."""
        results: dict[int, GenerationResult] = {}  # choice -> its result, once it finished
        done = False
        try:
            if responder.chat:
                yield _sse(responder.role_chunk(submission.num_choices))
            elif responder.echo:
                yield _sse(responder.echo_chunk(prompt_text, submission.num_choices))
            while True:
                if isinstance(update, APIError):
                    done = True
                    yield _sse(update.body())
                    return
                event = update.event if isinstance(update, Finished) else update
                if responder.wants_chunk(event):
                    yield _sse(responder.chunk(event))
                if isinstance(update, Finished):
                    results[event.request_index] = update.result
                    if len(results) == submission.num_choices:
                        if include_usage:
                            answer = PromptAnswer(prompt_text, [results[c] for c in range(submission.num_choices)])
                            yield _sse(responder.usage_chunk([answer]))
                        done = True
                        yield "data: [DONE]\n\n"
                        return
                update = await submission.updates.get()
        finally:
            if not done:
                inbox.cancel([submission.key])

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
