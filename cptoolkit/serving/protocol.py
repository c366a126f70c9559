"""The OpenAI completions API as cptoolkit serves it: request models, their translation into
``SamplingParams``, the response and stream-chunk bodies, and OpenAI-style errors.

Requests are validated here, at the edge: a wrong type, an out-of-range value, an unknown field or a
feature cptoolkit does not have (``n`` > 1, penalties, logprobs) is an ``APIError`` 400 naming the
field. Limits that depend on the engine (prompt + ``max_tokens`` over ``max_seq_len``, more KV blocks
than the whole cache, token ids outside the vocabulary) are the engine's own checks: its error comes
back before any token and becomes the same 400.
"""
from __future__ import annotations

import json
import random
import time
from typing import ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cptoolkit.inference.request import GenerationResult
from cptoolkit.inference.sampling import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4
# OpenAI fields for features cptoolkit does not have: accepted only at their default (or null). The
# type of ``logprobs`` differs by endpoint (a count for completions, a flag for chat): its default is
# each request class's LOGPROBS_DEFAULT.
DEFAULT_ONLY = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "presence_penalty": 0.0,
                "frequency_penalty": 0.0, "logit_bias": {}}


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: Optional[bool] = False


class GenerationRequest(BaseModel):
    """Fields shared by both endpoints. Unknown fields are errors; null means 'the default'."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 63)
    stop: Optional[str | list[str]] = None
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    ignore_eos: Optional[bool] = False  # vLLM's extension: generate max_tokens whatever the model says

    @field_validator(*DEFAULT_ONLY, "logprobs", check_fields=False)
    @classmethod
    def _default_only(cls, value, info):
        default = cls.LOGPROBS_DEFAULT if info.field_name == "logprobs" else DEFAULT_ONLY[info.field_name]
        if value is not None and value != default:
            raise ValueError(f"{json.dumps(value)} is not supported: cptoolkit accepts only {json.dumps(default)} "
                             "here (or omit the field)")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise ValueError(f"{value!r}: give at most {MAX_STOP_STRINGS} non-empty stop strings")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_new_tokens: int, eos_token_ids: tuple[int, ...]) -> SamplingParams:
        """This request's ``SamplingParams``. No ``seed`` → a fresh random one, so repeated unseeded
        requests differ (OpenAI's semantics) while every rank still draws the same tokens: the seed
        travels with the request."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_k=self.top_k or 0, top_p=1.0 if self.top_p is None else self.top_p,
                seed=random.SystemRandom().randrange(2 ** 31) if self.seed is None else self.seed,
                max_new_tokens=max_new_tokens, stop_token_ids=() if self.ignore_eos else eos_token_ids,
                stop_strings=tuple(stops), ignore_eos=bool(self.ignore_eos))
        except ValueError as err:
            raise APIError(400, str(err)) from None


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    LOGPROBS_DEFAULT: ClassVar = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError(f"a batch of {len(value)} prompts: send one prompt per request")
            value = value[0]
        return value

    def prompt_ids(self, tokenizer) -> list[int]:
        return tokenizer.encode(self.prompt) if isinstance(self.prompt, str) else list(self.prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[str | list[ContentPart]] = None
    name: Optional[str] = None

    def as_dict(self) -> dict:
        """``{"role", "content"}`` with text parts joined, as chat templates expect."""
        content = self.content if isinstance(self.content, str) or self.content is None \
            else "".join(part.text for part in self.content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``: messages rendered by the checkpoint's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    LOGPROBS_DEFAULT: ClassVar = False

    def prompt_ids(self, tokenizer) -> list[int]:
        """The chat template's token ids (generation prompt added); a tokenizer without a template
        raises ``ValueError`` with its own message, answered as 400."""
        try:
            return tokenizer.render_chat([message.as_dict() for message in self.messages])
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None


def max_new_tokens(request: GenerationRequest, prompt_len: int, max_seq_len: int) -> int:
    """``max_tokens`` if given; else 16 for completions (OpenAI's default) and, for chat, the room left
    in ``max_seq_len`` (too little room is the engine's 400)."""
    given = request.max_tokens
    if isinstance(request, ChatCompletionRequest):
        given = given or request.max_completion_tokens
        return given or max(max_seq_len - prompt_len, 1)
    return given or DEFAULT_COMPLETION_MAX_TOKENS


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's ``RequestValidationError.errors()`` → one 400 naming the first bad field."""
    error = errors[0]
    if error.get("type") == "json_invalid":
        reason = error.get("ctx", {}).get("error", error["msg"])
        return APIError(400, f"the request body is not valid JSON: {reason}")
    path = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(path) or None
    message = error["msg"].removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        message = "unknown field"
    elif error.get("type") == "missing":
        message = "required field missing"
    return APIError(400, f"{param}: {message}" if param else message, param=param)


# ---------------------------------------------------------------------- response bodies
OPENAI_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Responder:
    """The response body and stream chunks of one request (``chat`` or plain completions)."""

    def __init__(self, chat: bool, response_id: str, model: str):
        self.chat, self.id, self.model, self.created = chat, response_id, model, int(time.time())

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    def response(self, result: GenerationResult) -> dict:
        finish_reason = OPENAI_FINISH_REASONS[result.finish_reason]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish_reason}
        body = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        return {**body, "usage": usage(len(result.prompt_token_ids), len(result.token_ids))}

    def chunk(self, text: str, finish_reason: Optional[str] = None, first: bool = False) -> dict:
        """One stream chunk; ``finish_reason`` is the engine's (mapped to OpenAI's names)."""
        finish_reason = OPENAI_FINISH_REASONS.get(finish_reason) if finish_reason else None
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion",
                              [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}])

    def usage_chunk(self, result: GenerationResult) -> dict:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        return {**body, "usage": usage(len(result.prompt_token_ids), len(result.token_ids))}
