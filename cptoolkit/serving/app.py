"""The HTTP side (global rank 0): a FastAPI app speaking the OpenAI completions API, and the uvicorn
thread that serves it.

A request is validated (``protocol``), tokenized, and submitted to the ``Inbox``; its handler then
waits on its own queue for the coordinator's updates. The HTTP status is decided by the request's
first update, so a request the engine rejects (its prompt ids outside the vocabulary) is a 400 even
when it asked for a stream. A client that disconnects, while waiting or mid-stream, cancels its
request: the engine frees its KV blocks at its next step.

Errors: every 4xx and 5xx has OpenAI's body ``{"error": {"message", "type", "param", "code"}}``,
FastAPI's and Starlette's own included (a body that is not JSON, not UTF-8, nested too deep or sent
with another Content-Type: 400; an unknown route: 404; a wrong method: 405). A request that fails in the
engine (``result.error``) answers ``result.error_status`` (400: refused before any token; 500: it failed
while generating, the other requests carry on) before its first token, or, once its stream has begun,
ends the stream with that error as an event and then ``data: [DONE]``; so does a stream whose server
fails (a rank died: 503). ``/openapi.json`` documents these statuses.

Guard (``HTTPOptions``): with an API key, every ``/v1/*`` route answers 401 without
``Authorization: Bearer <key>``; ``/health``, ``/metrics`` and ``/openapi.json`` stay open (as vLLM
leaves ``/health``), so probes and scrapers need no key. A body over ``max_request_bytes`` is a 413,
refused by its ``Content-Length`` before any of it is read, or when the bytes streamed in (chunked)
pass the limit. A request of more than ``max_sequences_per_request`` sequences (prompts x ``n``) is a
400 naming ``n`` (or ``prompt``). ``/health`` answers 503 once the engine loop has not come by the inbox
for ``health_stall_s`` (a stopped rank, a hung collective, a step that long).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Optional, Sequence, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cptoolkit.inference.request import GenerationResult
from cptoolkit.serving.inbox import Finished, Inbox, Submission
from cptoolkit.serving.metrics import ServerMetrics
from cptoolkit.serving.protocol import (APIError, ChatCompletionRequest, CompletionRequest, ErrorResponse,
                                        LengthLimit, PromptAnswer, Responder, max_new_tokens, validation_error)

LOG = logging.getLogger("cptoolkit")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response
DEFAULT_MAX_REQUEST_BYTES = 4 * 2 ** 20
DEFAULT_MAX_SEQUENCES_PER_REQUEST = 256
DEFAULT_HEALTH_STALL_S = 30.0
PROTECTED_PREFIX = "/v1/"  # the routes an API key guards; /health, /metrics, /openapi.json stay open


@dataclass(frozen=True)
class HTTPOptions:
    """What the HTTP side enforces besides the request schema (``cptoolkit serve``'s flags of the same
    names): the API key (None: no key), the largest request body in bytes, the most sequences (prompts x
    ``n``) per request, and how long the engine loop may make no progress before ``/health`` says 503."""

    api_key: Optional[str] = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_sequences_per_request: int = DEFAULT_MAX_SEQUENCES_PER_REQUEST
    health_stall_s: float = DEFAULT_HEALTH_STALL_S

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key: the key is empty; give a non-empty key or leave the flag (and "
                             "CPTOOLKIT_API_KEY) unset to serve without one")
        for name in ("max_request_bytes", "max_sequences_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} = {getattr(self, name)}: must be >= 1")
        if not self.health_stall_s >= 1:
            raise ValueError(f"--health-stall-s = {self.health_stall_s}: must be >= 1 (the idle engine loop "
                             "comes by every 0.5 s at most)")


class _ClientDisconnected(Exception):
    pass


class _Guard:
    """ASGI middleware in front of the app: the API key on ``/v1/*`` (401) and the body-size limit
    (413, by ``Content-Length`` before reading, else counted as the body streams in). Keys are
    compared in constant time (``hmac.compare_digest``)."""

    def __init__(self, app: ASGIApp, options: HTTPOptions, metrics: ServerMetrics):
        self.app, self.options, self.metrics = app, options, metrics

    def _refusal(self, scope: Scope) -> Optional[APIError]:
        headers = dict(scope["headers"])
        key = self.options.api_key
        if key is not None and scope["path"].startswith(PROTECTED_PREFIX):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + key.encode("utf-8", "surrogateescape")):
                return APIError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                                code="invalid_api_key")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.options.max_request_bytes:
            return self._too_large(f"Content-Length {int(length)}")
        return None

    def _too_large(self, what: str) -> APIError:
        return APIError(413, f"the request body ({what}) exceeds this server's limit of "
                             f"{self.options.max_request_bytes} bytes (--max-request-bytes)", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            self.metrics.http_response(scope["path"], refusal.status)
            return await _error_json(refusal)(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.options.max_request_bytes:
                # an HTTPException: FastAPI's body reader re-raises it (any other exception becomes a 400)
                raise HTTPException(413, self._too_large(f"over {received} bytes, chunked").message)
            return message

        await self.app(scope, counted, send)


class _ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped, so text the client sent (a lone surrogate in a field name) can always
    be written back in an error message."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _error_json(error: APIError, headers: Optional[dict] = None) -> JSONResponse:
    return _ASCIIJSONResponse(error.body(), status_code=error.status, headers=headers)


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


def _failure(update: Union[Finished, object], prompt_field: str) -> Optional[APIError]:
    """The error an update carries: a 503 (the server failed or drained the request away), or a request
    the engine ended with an error (``result.error_status``: 400 refused, 500 failed while generating)."""
    if isinstance(update, APIError):
        return update
    if isinstance(update, Finished) and update.result.finish_reason == "error":
        status = update.result.error_status
        return APIError(status, update.result.error or "the engine ended the request with an error",
                        param=prompt_field if status == 400 else None)
    return None


def _checked(update: Union[Finished, object], prompt_field: str):
    error = _failure(update, prompt_field)
    if error is not None:
        raise error
    return update


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


_DONE = "data: [DONE]\n\n"
_ERRORS = {400: "invalid request (a field named in param)", 401: "missing or wrong API key (with --api-key)",
           404: "unknown model (code model_not_found) or route", 413: "request body over --max-request-bytes",
           500: "the engine failed while generating this request (the others carry on)",
           503: "the server is draining, or the engine died (a rank or collective failed)"}
_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in _ERRORS.items()}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema with the statuses this server answers: 422 (which it never sends: validation
    errors are 400) removed, every error documented with ``ErrorResponse``."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(inbox: Inbox, tokenizer, metrics: ServerMetrics, model_name: str, limit: LengthLimit,
               options: HTTPOptions = HTTPOptions()) -> FastAPI:
    """The app: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models`` (behind the
    API key, if any), ``GET /health``, ``GET /metrics``, ``GET /openapi.json`` (open)."""
    app = FastAPI(title="cptoolkit", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: _openapi(app)
    app.add_middleware(_Guard, options=options, metrics=metrics)

    def error_response(request: Request, error: APIError, headers: Optional[dict] = None) -> JSONResponse:
        metrics.http_response(request.url.path, error.status)
        return _error_json(error, headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return error_response(request, validation_error(error.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        """Starlette's and FastAPI's own errors: unknown route, wrong method, a body that cannot be parsed."""
        cause = error.__cause__
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}; the API is under /v1 (see /openapi.json)"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {error.headers['Allow']})"
        elif isinstance(cause, RecursionError):
            message = "the request body is nested too deeply to parse as JSON"
        elif isinstance(cause, UnicodeDecodeError):
            message = f"the request body is not valid UTF-8 JSON ({cause.reason} at byte {cause.start})"
        elif isinstance(cause, ValueError):  # e.g. an integer of more digits than Python converts
            message = f"the request body could not be parsed as JSON: {cause}"
        else:
            message = str(error.detail)
        code = "request_too_large" if error.status_code == 413 else None  # _Guard's, for a chunked body
        return error_response(request, APIError(error.status_code, message, code=code), headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        LOG.exception("%s %s failed", request.method, request.url.path)
        return error_response(request, APIError(500, f"the server failed ({type(error).__name__}); see its log"))

    @app.get("/health", responses={503: _RESPONSES[503]})
    async def health():
        """200 while the server accepts requests and its engine loop makes progress; 503 when draining,
        after an engine failure, or when the loop has not come by for ``health_stall_s``. Open: needs no key."""
        refusal = inbox.refusal
        if refusal is None and inbox.stalled_s() > options.health_stall_s:
            refusal = APIError(503, f"the engine loop has made no progress for {inbox.stalled_s():.1f} s "
                                    f"(limit {options.health_stall_s} s): a rank is stopped or a collective hangs")
        if refusal is not None:
            return _error_json(refusal)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        """Prometheus text; open (needs no key)."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses={401: _RESPONSES[401]})
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "cptoolkit", "max_model_len": limit.max_seq_len}]}

    def check_size(body: Union[CompletionRequest, ChatCompletionRequest]) -> None:
        sequences = body.num_prompts * body.num_choices
        if sequences > options.max_sequences_per_request:
            param = "n" if body.num_choices > 1 else "prompt"
            raise APIError(400, f"{param}: {body.num_prompts} prompts x n {body.num_choices} = {sequences} sequences "
                                f"exceeds this server's limit of {options.max_sequences_per_request} per request "
                                "(--max-sequences-per-request); split the request", param=param)

    async def generate(request: Request, body: Union[CompletionRequest, ChatCompletionRequest]) -> Response:
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        body.check_streamable()
        check_size(body)
        chat = isinstance(body, ChatCompletionRequest)
        prompt_field = "messages" if chat else "prompt"
        prompts_ids = body.prompts_ids(tokenizer)
        sampling = [body.sampling_params(max_new_tokens(body, len(ids), limit), tokenizer.eos_token_ids,
                                         tokenizer.vocab_size) for ids in prompts_ids]
        submissions = inbox.submit(prompts_ids, sampling, body.num_choices)
        keys = [submission.key for submission in submissions]
        responder = Responder(body, f"{'chatcmpl' if chat else 'cmpl'}-{keys[0]}", model_name, tokenizer)
        texts = [""] * len(prompts_ids) if chat else body.prompt_texts(prompts_ids, tokenizer)
        try:
            if body.stream:
                first = _checked(await _unless_disconnected(request, submissions[0].updates.get()), prompt_field)
            else:
                finished = await _unless_disconnected(request, _all_choices(submissions))
                for update in (update for choices in finished for update in choices):
                    _checked(update, prompt_field)
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
        return StreamingResponse(_stream(submissions[0], first, responder, body.include_usage, texts[0], prompt_field),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _stream(submission: Submission, update, responder: Responder, include_usage: bool, prompt_text: str,
                      prompt_field: str) -> AsyncIterator[str]:
        """Server-sent events: with ``echo`` the prompt's text first (chat: the role), then a chunk per
        token that adds text or a logprob, each choice's finish chunk, the usage when asked, ``[DONE]``.
        A failure (a choice the engine ended with an error, the server failing or draining the request
        away) ends the stream with the error body as an event, then ``[DONE]``. An unfinished stream
        (the client left, so the response task was cancelled, or a choice failed) cancels its request."""
        results: dict[int, GenerationResult] = {}  # choice -> its result, once it finished
        done = False
        try:
            if responder.chat:
                yield _sse(responder.role_chunk(submission.num_choices))
            elif responder.echo:
                yield _sse(responder.echo_chunk(prompt_text, submission.num_choices))
            while True:
                error = _failure(update, prompt_field)
                if error is not None:
                    yield _sse(error.body())
                    yield _DONE
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
                        yield _DONE
                        return
                update = await submission.updates.get()
        finally:
            if not done:
                inbox.cancel([submission.key])

    @app.post("/v1/completions", responses=_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        return await generate(request, body)

    @app.post("/v1/chat/completions", responses=_RESPONSES)
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
