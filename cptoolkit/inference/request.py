"""One generation request's state, the events it streams and the result it ends with.

The engine owns ``Request`` objects; callers see ``TokenEvent`` (one per request and step) and
``GenerationResult`` (one per request, with its ``RequestMetrics``). Text comes from the request's
``IncrementalDetokenizer`` (a few tokens decoded per step, equal to decoding every output id), so
multi-byte characters split over several byte tokens come out whole; ``stream_delta`` holds back what
may still change.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from cptoolkit.inference.detokenizer import IncrementalDetokenizer
from cptoolkit.inference.sampling import SamplingParams, make_generator

FINISH_REASONS = ("length", "eos", "stop", "cancelled", "error")


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model and the ``top`` most likely tokens at its position,
    ``((token_id, logprob), ...)`` most likely first (see ``sampling``: raw model log-softmax)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Request:
    """An admitted or waiting request. ``request_id`` is engine-wide unique (the KV-cache key);
    ``index`` is the caller's label (a prompt's position for ``generate``/``stream``)."""

    request_id: int
    index: int
    prompt: Optional[str]
    prompt_ids: list[int]
    sampling: SamplingParams
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    streamed_chars: int = 0
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    # With error: 400 when the request itself is invalid (refused before any token), 500 when the engine failed
    # while generating it (sampling, detokenizing, stop strings, logprobs): that request ends, the others go on.
    error_status: int = 400
    num_cached: int = 0            # prompt tokens whose K/V is in the cache (prefilled or reused)
    cached_prompt_tokens: int = 0  # of which served by the prefix cache
    arrival_s: float = field(default_factory=time.perf_counter)
    token_times_s: list[float] = field(default_factory=list)
    # With sampling.logprobs: one per output token. With sampling.prompt_logprobs: one per prompt token,
    # None for the first (nothing predicts it) and until its chunk is prefilled.
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
    prompt_source: Optional[int] = None  # a request with the same prompt whose cached pages this one reuses
    detokenizer: Optional[IncrementalDetokenizer] = None  # keeps ``text`` equal to the decoded output_ids

    @classmethod
    def new(cls, request_id: int, index: int, prompt: str | list[int], sampling: SamplingParams, tokenizer,
            prompt_source: Optional[int] = None) -> "Request":
        """A waiting request for ``prompt`` (text, encoded by ``tokenizer``, or token ids): its sampler seeded by
        ``(sampling.seed, index)``, its text detokenized incrementally, a slot per prompt token for the prompt
        logprobs it asks for."""
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        request = cls(request_id, index, prompt if isinstance(prompt, str) else None, ids, sampling,
                      make_generator(sampling.seed, index), prompt_source=prompt_source,
                      detokenizer=IncrementalDetokenizer(tokenizer))
        if sampling.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(ids)
        return request

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_total_len(self) -> int:
        """The longest this request can grow: its KV-cache reservation."""
        return len(self.prompt_ids) + self.sampling.max_new_tokens


@dataclass(frozen=True)
class TokenEvent:
    """One streamed step of one request: the new token (``None`` for a rejected or cancelled
    request), the text it added, and ``finish_reason`` once the request ended (one of
    ``FINISH_REASONS``). ``request_index`` is the caller's label, ``request_id`` the engine's id."""

    request_index: int
    token_id: Optional[int]
    text_delta: str
    finish_reason: Optional[str] = None
    request_id: int = -1
    logprob: Optional[TokenLogprob] = None


@dataclass(frozen=True)
class RequestMetrics:
    """Latency of one request on this rank: time to first token (from ``add_request``), the gaps
    between its later tokens, and how many prompt tokens came from the prefix cache."""

    time_to_first_token_s: Optional[float]
    inter_token_gaps_s: tuple[float, ...]
    cached_prompt_tokens: int = 0

    @property
    def max_inter_token_gap_s(self) -> float:
        return max(self.inter_token_gaps_s, default=0.0)

    def to_dict(self) -> dict:
        gaps = self.inter_token_gaps_s
        return {"time_to_first_token_s": self.time_to_first_token_s,
                "mean_inter_token_gap_s": sum(gaps) / len(gaps) if gaps else None,
                "max_inter_token_gap_s": max(gaps) if gaps else None,
                "cached_prompt_tokens": self.cached_prompt_tokens}


@dataclass(frozen=True)
class GenerationResult:
    request_index: int
    prompt: Optional[str]
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    error: Optional[str] = None
    metrics: Optional[RequestMetrics] = None
    logprobs: Optional[list[TokenLogprob]] = None  # with sampling.logprobs: one per token id
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # with sampling.prompt_logprobs
    error_status: int = 400  # with error: 400 the request was invalid, 500 it failed while generating


def request_result(request: Request) -> GenerationResult:
    times = request.token_times_s
    metrics = RequestMetrics(time_to_first_token_s=times[0] - request.arrival_s if times else None,
                             inter_token_gaps_s=tuple(b - a for a, b in zip(times, times[1:])),
                             cached_prompt_tokens=request.cached_prompt_tokens)
    logprobs = request.output_logprobs if request.sampling.logprobs is not None else None
    return GenerationResult(request.index, request.prompt, request.prompt_ids, request.output_ids, request.text,
                            request.finish_reason, request.error, metrics, logprobs, request.prompt_logprobs,
                            request.error_status)


def stream_delta(request: Request) -> str:
    """The text to stream after this token. Until the request ends, two tails are held back: a
    trailing U+FFFD (a multi-byte character whose last bytes may still come) and the last
    ``len(longest stop string) - 1`` characters (the start of a stop string that would be cut), so
    the streamed pieces always add up to the final text."""
    stable = request.text
    if request.finish_reason is None:
        hold = max((len(stop) for stop in request.sampling.stop_strings), default=1) - 1
        stable = stable.rstrip("\ufffd")
        stable = stable[:max(len(stable) - hold, 0)]
    delta = stable[request.streamed_chars:]
    request.streamed_chars = max(request.streamed_chars, len(stable))
    return delta


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.index(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]
