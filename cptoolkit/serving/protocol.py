"""The OpenAI completions API as cptoolkit serves it: request models, their translation into
``SamplingParams``, the response and stream-chunk bodies, and OpenAI-style errors.

Requests are validated here, at the edge: a wrong type, an out-of-range value, an unknown field, text
that cannot be encoded as UTF-8 (a lone surrogate such as ``"\ud800"``) or a feature cptoolkit does not
have (``suffix``, ``best_of`` other than ``n``) is an ``APIError`` 400 naming the field. The length limit
(prompt + ``max_tokens`` over ``max_seq_len`` or over what the whole KV cache holds) is checked here too,
naming the field the client sent (``max_tokens``, ``max_completion_tokens``, ``prompt`` or ``messages``).
Token ids outside the vocabulary are the engine's own check: its error comes back before any token and
becomes the same 400.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cptoolkit.inference.request import GenerationResult, TokenEvent, TokenLogprob
from cptoolkit.inference.sampling import MAX_LOGPROBS, SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16  # n per prompt
MAX_PROMPTS = 64  # prompts per /v1/completions request


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``: every
    4xx and 5xx the server sends has this body (OpenAI's shape); ``type`` follows from the status."""

    TYPES = {401: "authentication_error", 404: "not_found_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        default = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, default),
                          "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """The body of every error response (``APIError.body``), as the OpenAPI schema documents it."""

    error: ErrorDetail


def _utf8(text: str) -> str:
    """``text`` if it can be encoded as UTF-8 (what the tokenizer does with it); else ``ValueError``
    (pydantic names the field). JSON's ``\\ud800`` escapes decode to lone surrogates, which cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{text[err.start:err.end]!r} at character {err.start} cannot be encoded as UTF-8 "
                         "(a lone surrogate); send valid Unicode text") from None
    return text


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    include_usage: Optional[bool] = False


class GenerationRequest(BaseModel):
    """Fields shared by both endpoints. Unknown fields are errors; null means 'the default'."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 63)
    stop: Optional[str | list[str]] = None
    n: Optional[int] = Field(None, ge=1, le=MAX_CHOICES)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0)  # vLLM's extension (transformers' CTRL penalty)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    ignore_eos: Optional[bool] = False  # vLLM's extension: generate max_tokens whatever the model says

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        for token, bias in (value or {}).items():
            if not (token.isascii() and token.isdigit()):
                raise ValueError(f"key {token!r}: keys are token ids (strings of digits)")
            if not -100 <= bias <= 100:
                raise ValueError(f"{token}: {bias}: each bias must be in [-100, 100]")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise ValueError(f"{value!r}: give at most {MAX_STOP_STRINGS} non-empty stop strings")
        for stop in stops:
            _utf8(stop)
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def num_prompts(self) -> int:
        return 1

    def token_logprobs(self) -> Optional[int]:
        """Alternatives per generated token (None: no logprobs)."""
        raise NotImplementedError

    def prompt_logprobs(self) -> Optional[int]:
        """Alternatives per prompt token (None: the prompt is not scored)."""
        return None

    def check_streamable(self) -> None:
        """Raise the 400 of a field combination a stream cannot carry (none for chat)."""

    def sampling_params(self, max_new_tokens: int, eos_token_ids: tuple[int, ...], vocab_size: int) -> SamplingParams:
        """This request's ``SamplingParams``. No ``seed`` → a fresh random one, so repeated unseeded
        requests differ (OpenAI's semantics) while every rank still draws the same tokens: the seed
        travels with the request. ``logit_bias`` ids must be below ``vocab_size``."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        bias = {int(token): value for token, value in (self.logit_bias or {}).items()}
        outside = [token for token in bias if token >= vocab_size]
        if outside:
            raise APIError(400, f"logit_bias: token id {outside[0]} is outside the vocabulary [0, {vocab_size})",
                           param="logit_bias")
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_k=self.top_k or 0, top_p=1.0 if self.top_p is None else self.top_p,
                seed=random.SystemRandom().randrange(2 ** 31) if self.seed is None else self.seed,
                max_new_tokens=max_new_tokens, stop_token_ids=() if self.ignore_eos else eos_token_ids,
                stop_strings=tuple(stops), ignore_eos=bool(self.ignore_eos),
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                logit_bias=tuple(sorted(bias.items())), logprobs=self.token_logprobs(),
                prompt_logprobs=self.prompt_logprobs())
        except ValueError as err:
            raise APIError(400, str(err)) from None


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: one prompt or a batch of them, as text or token ids. ``max_tokens`` 0
    with ``echo`` scores the prompt only (lm-eval's loglikelihood requests)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Optional[int] = Field(None, ge=0)
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"a batch of {len(value)} prompts: at most {MAX_PROMPTS} per request")
        if isinstance(value, str):
            _utf8(value)
        for index, text in enumerate(value if isinstance(value, list) else []):
            if isinstance(text, str):
                try:
                    _utf8(text)
                except ValueError as err:
                    raise ValueError(f"prompt {index} of the batch: {err}") from None
        return value

    @property
    def num_prompts(self) -> int:
        return len(self.prompt) if self.batched else 1

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value is not None:
            raise ValueError("is not supported: cptoolkit has no fill-in-the-middle models (omit the field)")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value, info):
        if value is not None and value != (info.data.get("n") or 1):
            raise ValueError(f"{value} is not supported: cptoolkit returns every choice it samples, so best_of "
                             "must equal n (or be omitted)")
        return value

    @property
    def batched(self) -> bool:
        return isinstance(self.prompt, list) and bool(self.prompt) and isinstance(self.prompt[0], (str, list))

    def token_logprobs(self) -> Optional[int]:
        return self.logprobs

    def prompt_logprobs(self) -> Optional[int]:
        return self.logprobs if self.echo else None

    def check_streamable(self) -> None:
        """A stream carries one prompt, and no prompt logprobs (they come whole, with the response)."""
        if self.stream and self.batched:
            raise APIError(400, f"stream: a stream carries one prompt; this request has {len(self.prompt)} "
                                "(send them as separate requests, or set stream to false)", param="stream")
        if self.stream and self.echo and self.logprobs is not None:
            raise APIError(400, "stream: echo with logprobs is answered whole (the prompt's logprobs come with the "
                                "response); set stream to false", param="stream")

    def prompt_texts(self, prompts_ids: Sequence[list[int]], tokenizer) -> list[str]:
        """Every prompt as text (what ``echo`` repeats): the request's own strings, token ids decoded."""
        prompts = self.prompt if self.batched else [self.prompt]
        return [prompt if isinstance(prompt, str) else tokenizer.decode(ids) for prompt, ids in zip(prompts, prompts_ids)]

    def prompts_ids(self, tokenizer) -> list[list[int]]:
        """Every prompt's token ids, in order."""
        prompts = self.prompt if self.batched else [self.prompt]
        return [tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt) for prompt in prompts]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, value):
        return _utf8(value)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[str | list[ContentPart]] = None
    name: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _content(cls, value):
        return _utf8(value) if isinstance(value, str) else value

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
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value, info):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs \"logprobs\": true")
        return value

    def token_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompts_ids(self, tokenizer) -> list[list[int]]:
        """The chat template's token ids (generation prompt added), as the request's one prompt; a
        tokenizer without a template raises ``ValueError`` with its own message, answered as 400."""
        try:
            return [tokenizer.render_chat([message.as_dict() for message in self.messages])]
        except (ValueError, TemplateError) as err:  # the template's own refusals (e.g. roles must alternate)
            raise APIError(400, str(err), param="messages") from None


@dataclass(frozen=True)
class LengthLimit:
    """The most tokens, prompt and generated, one sequence may hold: ``max_seq_len``, or fewer when the
    whole KV cache holds fewer (``cache_tokens``, per sequence)."""

    max_seq_len: int
    cache_tokens: int

    @property
    def tokens(self) -> int:
        return min(self.max_seq_len, self.cache_tokens)

    def __str__(self) -> str:
        if self.max_seq_len <= self.cache_tokens:
            return f"max_seq_len {self.max_seq_len}"
        return f"the {self.cache_tokens} tokens the whole KV cache holds for one sequence"


def max_new_tokens(request: GenerationRequest, prompt_len: int, limit: LengthLimit) -> int:
    """``max_tokens`` (chat: or ``max_completion_tokens``) if given; else 16 for completions (OpenAI's
    default) and, for chat, the room left under ``limit``. A prompt and budget over ``limit`` is a 400
    naming the field the client sent: the budget's field, or ``prompt`` / ``messages`` when the prompt
    alone leaves no room (or the budget is the default)."""
    chat = isinstance(request, ChatCompletionRequest)
    prompt_field = "messages" if chat else "prompt"
    field = "max_tokens" if request.max_tokens is not None else None
    given = request.max_tokens
    if chat and given is None and request.max_completion_tokens is not None:
        field, given = "max_completion_tokens", request.max_completion_tokens
    if given is None:
        given = max(limit.tokens - prompt_len, 1) if chat else DEFAULT_COMPLETION_MAX_TOKENS
    if prompt_len + given <= limit.tokens:
        return given
    budget = f"{field} {given}" if field else f"the default max_tokens {given}"
    param = field if field is not None and prompt_len < limit.tokens else prompt_field
    raise APIError(400, f"{param}: {prompt_len} prompt tokens + {budget} = {prompt_len + given} exceeds "
                        f"{limit}; send a shorter prompt or fewer tokens to generate", param=param)


def _is_union_member(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's ``RequestValidationError.errors()`` → one 400 naming the first bad field. A field of
    several types (``prompt``, ``content``) fails once per type: a refusal by our own validators wins over
    "not this type", and the type's name (pydantic's ``str``, ``list[int]`` in the location) is dropped."""
    error = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if error.get("type") == "json_invalid":
        reason = error.get("ctx", {}).get("error", error["msg"])
        return APIError(400, f"the request body is not valid JSON: {reason}")
    path = [str(part) for part in error.get("loc", ()) if part != "body" and not _is_union_member(part)]
    if not path:  # the body as a whole: none, or not a JSON object (a list, a string, a form, bytes)
        if error.get("type") == "missing":
            return APIError(400, "the request body is empty: send a JSON object")
        if error.get("type") == "string_unicode":  # pydantic cannot read a key with a lone surrogate
            return APIError(400, "a field name in the request body cannot be encoded as UTF-8 (a lone surrogate)")
        return APIError(400, "the request body must be a JSON object, sent with Content-Type: application/json")
    param = ".".join(path)
    message = error["msg"].removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        message = "unknown field"
    elif error.get("type") == "missing":
        message = "required field missing"
    return APIError(400, f"{param}: {message}", param=param)


# ---------------------------------------------------------------------- response bodies
OPENAI_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
MIN_LOGPROB = -9999.0  # what a -inf log-probability is reported as (JSON has no infinity), as vLLM does


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class PromptAnswer:
    """One prompt's outcome: its text (the request's own string, or its ids decoded) and one result per
    choice, in choice order."""

    prompt_text: str
    results: list[GenerationResult]


class Responder:
    """The response body and stream chunks of one request (``chat`` or plain completions), in OpenAI's
    shapes. Completions' ``logprobs``: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``,
    the prompt's tokens first with ``echo`` (its first token has no logprob: null); each ``top_logprobs``
    entry maps token text to logprob for the top alternatives and the chosen token. Chat's:
    ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": null}``. With
    several prompts, choice ``index`` is ``prompt * n + choice``."""

    def __init__(self, request: GenerationRequest, response_id: str, model: str, tokenizer):
        self.request, self.id, self.model, self.created = request, response_id, model, int(time.time())
        self.chat = isinstance(request, ChatCompletionRequest)
        self.echo = bool(getattr(request, "echo", False))
        self.wants_logprobs = request.token_logprobs() is not None
        self._tokenizer = tokenizer
        self._stream_offsets: dict[int, int] = {}  # choice -> text offset of its next streamed token

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices}

    # ------------------------------------------------------------------ logprob objects
    def _top_dict(self, entry: TokenLogprob) -> dict[str, float]:
        """``{token text: logprob}`` of the alternatives and the chosen token; of tokens with the same text
        the likelier is kept."""
        top: dict[str, float] = {}
        for token_id, logprob in (*entry.top, (entry.token_id, entry.logprob)):
            text, value = self._tokenizer.token_text(token_id), max(logprob, MIN_LOGPROB)
            top[text] = max(value, top.get(text, MIN_LOGPROB))
        return top

    def _completion_logprobs(self, token_ids: Sequence[int], entries: Sequence[Optional[TokenLogprob]],
                             start_offset: int = 0) -> dict:
        """The completions ``logprobs`` object of these tokens; ``entries[i]`` is None where token ``i``
        has no logprob (a prompt's first token). Offsets count from ``start_offset``."""
        tokens = [self._tokenizer.token_text(token_id) for token_id in token_ids]
        offsets, offset = [], start_offset
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens,
                "token_logprobs": [None if e is None else max(e.logprob, MIN_LOGPROB) for e in entries],
                "top_logprobs": [None if e is None else self._top_dict(e) for e in entries],
                "text_offset": offsets}

    def _chat_entry(self, token_id: int, logprob: float) -> dict:
        text = self._tokenizer.token_text(token_id)
        return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(text.encode("utf-8"))}

    def _chat_logprobs(self, entries: Sequence[TokenLogprob]) -> dict:
        return {"content": [{**self._chat_entry(e.token_id, e.logprob),
                             "top_logprobs": [self._chat_entry(t, lp) for t, lp in e.top]} for e in entries],
                "refusal": None}

    # ------------------------------------------------------------------ whole responses
    def _choice(self, index: int, answer: PromptAnswer, result: GenerationResult) -> dict:
        finish_reason = OPENAI_FINISH_REASONS[result.finish_reason]
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": result.text},
                    "logprobs": self._chat_logprobs(result.logprobs) if self.wants_logprobs else None,
                    "finish_reason": finish_reason}
        logprobs = None
        if self.wants_logprobs:
            token_ids, entries = list(result.token_ids), list(result.logprobs)
            if self.echo:
                token_ids[:0], entries[:0] = result.prompt_token_ids, answer.results[0].prompt_logprobs
            logprobs = self._completion_logprobs(token_ids, entries)
        text = answer.prompt_text + result.text if self.echo else result.text
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def response(self, answers: Sequence[PromptAnswer]) -> dict:
        """The whole body: every prompt's choices; usage counts each prompt once, every choice's tokens."""
        choices = [self._choice(p * len(a.results) + c, a, result)
                   for p, a in enumerate(answers) for c, result in enumerate(a.results)]
        body = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        return {**body, "usage": _usage_of(answers)}

    # ------------------------------------------------------------------ streams (one prompt)
    def echo_chunk(self, prompt_text: str, num_choices: int) -> dict:
        """The first completions chunk with ``echo``: the prompt's text, once per choice."""
        self._stream_offsets = {choice: len(prompt_text) for choice in range(num_choices)}
        return self._envelope("text_completion", [{"index": choice, "text": prompt_text, "logprobs": None,
                                                   "finish_reason": None} for choice in range(num_choices)])

    def role_chunk(self, num_choices: int) -> dict:
        """The first chat chunk: the assistant's role, per choice."""
        return self._envelope("chat.completion.chunk", [
            {"index": choice, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None} for choice in range(num_choices)])

    def chunk(self, event: TokenEvent) -> dict:
        """One stream chunk for ``event`` (its choice is ``event.request_index``): the text it adds, its
        token's logprobs when asked for, its finish reason (OpenAI's names) when it ends the choice."""
        choice = event.request_index
        finish_reason = OPENAI_FINISH_REASONS.get(event.finish_reason) if event.finish_reason else None
        entry = event.logprob if self.wants_logprobs and event.token_id is not None else None
        if self.chat:
            delta = {"content": event.text_delta} if event.text_delta else {}
            logprobs = self._chat_logprobs([entry]) if entry is not None else None
            return self._envelope("chat.completion.chunk", [{"index": choice, "delta": delta, "logprobs": logprobs,
                                                             "finish_reason": finish_reason}])
        logprobs = None
        if entry is not None:
            offset = self._stream_offsets.get(choice, 0)
            logprobs = self._completion_logprobs([event.token_id], [entry], offset)
            self._stream_offsets[choice] = offset + len(logprobs["tokens"][0])
        return self._envelope("text_completion", [{"index": choice, "text": event.text_delta, "logprobs": logprobs,
                                                   "finish_reason": finish_reason}])

    def wants_chunk(self, event: TokenEvent) -> bool:
        """Whether ``event`` makes a chunk: it adds text, carries a logprob to report, or ends its choice."""
        return bool(event.text_delta) or event.finish_reason is not None or (
            self.wants_logprobs and event.token_id is not None)

    def usage_chunk(self, answers: Sequence[PromptAnswer]) -> dict:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        return {**body, "usage": _usage_of(answers)}


def _usage_of(answers: Sequence[PromptAnswer]) -> dict:
    return usage(sum(len(a.results[0].prompt_token_ids) for a in answers),
                 sum(len(result.token_ids) for a in answers for result in a.results))
