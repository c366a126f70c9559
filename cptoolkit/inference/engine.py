"""Generation engine: PCP-sharded prefill, DCP-sharded decode, continuous batching, sampling.

Every rank of one model replica (TP x PCP ranks) runs the same engine loop on the same requests, in
lock step; with ``dp > 1`` each replica takes every ``dp``-th request (request ``i`` goes to replica
``i % dp``) and ``generate`` gathers the results of all replicas, in request order.
- **Admission**: waiting requests join the running batch (up to ``max_batch_size``) when the KV cache
  has free blocks for their whole life (prompt + ``max_new_tokens``); otherwise they wait until a
  running request finishes. The decision uses the worst-case shard's block count, so it is the same
  on every rank without a collective.
- **Prefill** of the newly admitted requests, together: each prompt is padded and split by
  DualChunkSwap over the PCP group; the attention layers hand each layer's K/V to
  ``_fill_cache_from_prefill``, which routes each token to its KV-shard owner over the DCP group
  (one all-to-all per layer, ``prefill_kv``). Only each prompt's last token gets logits; the PCP
  rank holding it contributes them to a sum over the PCP group, and the first new token is sampled.
- **Decode**: one token for every running request per step, attention over the DCP-sharded cache.
- Sampled tokens are broadcast from the replica's first rank over the replica group, so every rank
  appends the same token even if the ranks' float rounding differed.

Requests end on ``max_new_tokens``, on EOS, on a stop string, or when cancelled. Invalid requests
(empty, too long for ``max_seq_len``, too large for the whole KV cache) end at once with an error,
and the others carry on. Every request gets a cache id that is never reused, and a generation that
ends early (an exception, or a ``stream`` its consumer stops reading) frees its requests' blocks.
"""
from __future__ import annotations

import functools
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from cptoolkit.inference.kv_cache import PagedKVCache, shard_token_count
from cptoolkit.inference.sampling import SamplingParams, broadcast_tokens, make_generator, sample
from cptoolkit.inference.prefill_kv import route_prefill_kv
from cptoolkit.layers.comm import all_reduce
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.layers.dual_chunk_swap import partition_batch
from cptoolkit.models.gpt import CPGPTModel, gpt_forward
from cptoolkit.parallel_state import ParallelGroups


@dataclass
class _Request:
    index: int      # position in the caller's list of prompts
    cache_id: int   # the engine-wide unique key of this request in the KV cache
    prompt: str | None
    prompt_ids: list[int]
    sampling: SamplingParams
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    streamed_chars: int = 0
    finish_reason: Optional[str] = None
    error: Optional[str] = None

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(frozen=True)
class TokenEvent:
    """One streamed step of one request: the new token (``None`` for a rejected request), the text it
    added, and ``finish_reason`` once the request ended (``length``, ``eos``, ``stop``, ``cancelled`` or
    ``error``)."""

    request_index: int
    token_id: Optional[int]
    text_delta: str
    finish_reason: Optional[str] = None


@dataclass(frozen=True)
class GenerationResult:
    request_index: int
    prompt: Optional[str]
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    error: Optional[str] = None


@dataclass
class EngineMetrics:
    """Wall times and counts of one engine's lifetime (every rank measures its own)."""

    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    prompt_tokens: int = 0
    prefill_tokens_generated: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_collectives: int = 0
    decode_bytes_sent: int = 0
    decode_collectives_by_layer: dict[int, int] = field(default_factory=dict)

    def summary(self, kv_bytes_per_rank: int, num_layers: int) -> dict:
        steps = max(self.decode_steps, 1)
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.prefill_tokens_generated + self.decode_tokens,
            "prefill_time_s": self.prefill_time_s,
            "decode_time_s": self.decode_time_s,
            "decode_steps": self.decode_steps,
            "decode_tokens_per_s": self.decode_tokens / self.decode_time_s if self.decode_time_s else 0.0,
            "kv_bytes_per_rank": kv_bytes_per_rank,
            "collectives_per_decode_step": self.decode_collectives / steps,
            "attention_collectives_per_layer_step": self.decode_collectives / steps / num_layers,
            "collectives_per_decode_step_by_layer": {layer: calls / steps for layer, calls
                                                     in sorted(self.decode_collectives_by_layer.items())},
            "attention_bytes_per_decode_step": self.decode_bytes_sent / steps,
        }


class Engine:
    """Batched generation with a megatron-core GPT model built on cptoolkit attention.

    ``model`` must have been built with ``runtime`` (the ``AttentionRuntime`` its attention layers
    share); ``groups`` are this rank's process groups; ``cache`` is this rank's KV shard;
    ``tokenizer`` has ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``eos_token_id`` and
    ``vocab_size`` (only ids below it, and below the model's ``vocab_size``, are ever sampled).
    ``max_seq_len`` caps prompt + generated tokens per request (at most the model's ``max_seq_len``).
    """

    def __init__(self, model: CPGPTModel, runtime: AttentionRuntime, groups: ParallelGroups,
                 cache: PagedKVCache, tokenizer, max_batch_size: int, max_seq_len: Optional[int] = None):
        self.shape = model.shape
        max_seq_len = self.shape.max_seq_len if max_seq_len is None else max_seq_len
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size = {max_batch_size}: must be >= 1")
        if not 1 <= max_seq_len <= self.shape.max_seq_len:
            raise ValueError(f"max_seq_len = {max_seq_len}: must be in [1, the model's max_seq_len = "
                             f"{self.shape.max_seq_len}]")
        self.model, self.runtime, self.groups = model, runtime, groups
        self.cache, self.tokenizer, self.max_batch_size = cache, tokenizer, max_batch_size
        self.max_seq_len = max_seq_len
        # A model's vocabulary may be padded past the tokenizer's (e.g. 320 rows for 258 byte ids):
        # ids the tokenizer cannot decode are never sampled.
        self.sampled_vocab_size = min(tokenizer.vocab_size, self.shape.vocab_size)
        self.metrics = EngineMetrics()
        self._reserved_blocks = 0
        self._cache_ids = itertools.count()
        self._cancel_requested: set[int] = set()

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence[str | list[int]], sampling: SamplingParams | Sequence[SamplingParams],
                 on_event: Optional[Callable[[TokenEvent], None]] = None) -> list[GenerationResult]:
        """Generate for every prompt (text or token ids); results of every request in prompt order
        (with ``dp > 1`` gathered from all replicas). ``on_event`` sees every ``TokenEvent`` of this
        rank's replica as it happens (progress display)."""
        requests = self._make_requests(prompts, sampling)
        for event in self._run(self._replica_share(requests)):
            if on_event is not None:
                on_event(event)
        return self._gather_results(requests)

    def stream(self, prompts: Sequence[str | list[int]], sampling: SamplingParams | Sequence[SamplingParams]
               ) -> Iterator[TokenEvent]:
        """Like ``generate``, yielding a ``TokenEvent`` per request and step as tokens arrive (this
        replica's requests only). Stopping early (``close()``, ``break``) frees every request's KV
        blocks; every rank of the replica must stop at the same event."""
        yield from self._run(self._replica_share(self._make_requests(prompts, sampling)))

    def cancel(self, request_index: int) -> None:
        """End request ``request_index`` of the running ``stream`` before its next step
        (``finish_reason`` ``cancelled``, its KV blocks freed). Every rank of the replica must cancel
        the same request after the same event; unknown or finished requests are ignored."""
        self._cancel_requested.add(request_index)

    # ------------------------------------------------------------------ requests
    def _make_requests(self, prompts, sampling) -> list[_Request]:
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f"sampling: got {len(params)} SamplingParams for {len(prompts)} prompts")
        requests = []
        for index, (prompt, request_params) in enumerate(zip(prompts, params)):
            text = prompt if isinstance(prompt, str) else None
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            requests.append(_Request(index, next(self._cache_ids), text, ids, request_params,
                                     make_generator(request_params.seed, index)))
        return requests

    def _replica_share(self, requests: list[_Request]) -> list[_Request]:
        return [r for r in requests if r.index % self.groups.dp_size == self.groups.dp_rank]

    def _gather_results(self, requests: list[_Request]) -> list[GenerationResult]:
        """Every request's result in prompt order: this replica's own, plus (``dp > 1``) the other
        replicas' via one ``all_gather_object`` on the DP group."""
        mine = [self._result(r) for r in self._replica_share(requests)]
        if self.groups.dp_size == 1:
            return mine
        per_replica: list = [None] * self.groups.dp_size
        dist.all_gather_object(per_replica, mine, group=self.groups.dp_group)
        return sorted((result for results in per_replica for result in results), key=lambda r: r.request_index)

    def _request_error(self, request: _Request) -> Optional[str]:
        if not request.prompt_ids:
            return "empty prompt: a request needs at least one prompt token"
        needed = len(request.prompt_ids) + request.sampling.max_new_tokens
        if needed > self.max_seq_len:
            return (f"prompt of {len(request.prompt_ids)} tokens + max_new_tokens "
                    f"{request.sampling.max_new_tokens} = {needed} exceeds max_seq_len {self.max_seq_len}")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.shape.vocab_size]
        if bad:
            return f"prompt token id {bad[0]} is outside the vocabulary [0, {self.shape.vocab_size})"
        if self._blocks_needed(needed) > self.cache.num_blocks:
            return (f"needs {self._blocks_needed(needed)} KV blocks per rank for {needed} tokens but the whole "
                    f"cache has {self.cache.num_blocks} ({self.cache.bytes_per_rank:,} bytes per rank); raise "
                    f"inference.kv_cache_bytes or lower max_new_tokens")
        return None

    def _blocks_needed(self, total_len: int) -> int:
        """Blocks of the fullest shard (shard 0) for ``total_len`` tokens: the same on every rank."""
        shard0 = shard_token_count(total_len, 0, self.cache.dcp_size, self.cache.interleave)
        return -(-shard0 // self.cache.block_size)

    # ------------------------------------------------------------------ the loop
    def _run(self, requests: list[_Request]) -> Iterator[TokenEvent]:
        """The engine loop over ``requests``; whatever ends it (done, an exception, or the consumer
        closing the generator) frees the KV blocks of every request it admitted."""
        self._cancel_requested = set()
        waiting: deque[_Request] = deque()
        running: list[_Request] = []
        try:
            for request in requests:
                request.error = self._request_error(request)
                if request.error:
                    request.finish_reason = "error"
                    yield TokenEvent(request.index, None, "", "error")
                else:
                    waiting.append(request)
            while waiting or running:
                yield from self._cancel(waiting, running)
                admitted = self._admit(waiting, running)
                if admitted:
                    yield from self._prefill(admitted)
                decoding = [r for r in running if r.finish_reason is None]
                if decoding and not admitted:
                    yield from self._decode_step(decoding)
                for request in [r for r in running if r.finish_reason is not None]:
                    self._release(request)
                    running.remove(request)
        finally:
            for request in running:
                self._release(request)

    def _cancel(self, waiting: deque, running: list) -> Iterator[TokenEvent]:
        """End the requests ``cancel`` named since the last step; running ones are released by the loop."""
        for request in [r for r in [*waiting, *running] if r.index in self._cancel_requested
                        and r.finish_reason is None]:
            request.finish_reason = "cancelled"
            if request in waiting:
                waiting.remove(request)
            yield TokenEvent(request.index, None, "", "cancelled")
        self._cancel_requested.clear()

    def _admit(self, waiting: deque, running: list) -> list[_Request]:
        """Move waiting requests into ``running`` (and the cache) while batch slots and blocks last."""
        admitted = []
        while waiting and len(running) < self.max_batch_size:
            request = waiting[0]
            blocks = self._blocks_needed(len(request.prompt_ids) + request.sampling.max_new_tokens)
            if self._reserved_blocks + blocks > self.cache.num_blocks:
                break  # queued until a running request frees its blocks
            waiting.popleft()
            self.cache.add_request(request.cache_id, len(request.prompt_ids) + request.sampling.max_new_tokens)
            self._reserved_blocks += blocks
            running.append(request)
            admitted.append(request)
        return admitted

    def _release(self, request: _Request) -> None:
        self.cache.free_request(request.cache_id)
        self._reserved_blocks -= self._blocks_needed(len(request.prompt_ids) + request.sampling.max_new_tokens)

    # ------------------------------------------------------------------ prefill
    def _prefill(self, requests: list[_Request]) -> Iterator[TokenEvent]:
        groups = self.groups
        start = time.perf_counter()
        batch = partition_batch([r.prompt_ids for r in requests], groups.pcp_rank, groups.pcp_size, pad_id=0)
        self.runtime.mode = "prefill"
        self.runtime.on_prefill_kv = functools.partial(
            self._fill_cache_from_prefill, [r.cache_id for r in requests], batch.seq_lens, batch.seq_len_padded)
        # DualChunkSwap pads each prompt by up to 2*PCP-1 tokens whose positions may pass the model's
        # last one; no real token attends to a pad (pads come last, attention is causal) and pads are
        # never cached, so their positions are clamped into the model's range.
        positions = batch.position_ids.clamp(max=self.shape.max_seq_len - 1)
        owners = batch.last_token_owners()  # (pcp_rank, local index) of each prompt's last token
        try:
            with torch.no_grad():
                last_logits = gpt_forward(self.model, batch.input_ids.to(self._device),
                                          positions.to(self._device), self.runtime,
                                          logits_index=torch.tensor([i for _, i in owners], device=self._device))
        finally:
            self.runtime.on_prefill_kv = None
        last_logits = last_logits[:, 0]
        if groups.pcp_size > 1:  # exactly one PCP rank holds each row; the others contribute zeros
            not_mine = torch.tensor([owner != groups.pcp_rank for owner, _ in owners], device=self._device)
            all_reduce(last_logits.masked_fill_(not_mine.unsqueeze(1), 0.0), groups.pcp_group)
        tokens = self._sample(last_logits, requests)
        self.metrics.prefill_time_s += time.perf_counter() - start
        self.metrics.prompt_tokens += sum(batch.seq_lens)
        self.metrics.prefill_tokens_generated += len(requests)
        yield from self._append_tokens(requests, tokens)

    def _fill_cache_from_prefill(self, request_ids: list[int], seq_lens: Sequence[int], seq_len_padded: int,
                                 layer_number: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep this rank's KV shard of the prefill K/V of ``layer_number`` for the batch's requests.

        ``k``/``v [b, hkv_local, 2c, d]`` are this rank's DualChunkSwap shard of its own KV heads;
        one all-to-all on the DCP group brings each member the tokens it stores (``prefill_kv``).
        """
        k_shard, v_shard, positions = route_prefill_kv(k, v, seq_len_padded, self.groups.pcp_rank,
                                                       self.runtime.decode_group)
        for row, (request_id, seq_len) in enumerate(zip(request_ids, seq_lens)):
            real = positions < seq_len  # padding tokens are never cached
            self.cache.fill_prefill(layer_number - 1, request_id, k_shard[row][:, real], v_shard[row][:, real],
                                    positions[real].to(k.device))

    # ------------------------------------------------------------------ decode
    def _decode_step(self, requests: list[_Request]) -> Iterator[TokenEvent]:
        start = time.perf_counter()
        stats_before = (self.runtime.stats.total_calls, self.runtime.stats.total_bytes)
        layer_calls_before = {layer: stats.total_calls for layer, stats in self.runtime.per_layer_stats.items()}
        input_ids = torch.tensor([[r.output_ids[-1]] for r in requests], device=self._device)
        positions = torch.tensor([[r.total_len - 1] for r in requests], device=self._device)
        ids = [r.cache_id for r in requests]
        self.runtime.mode = "decode"
        self.runtime.decode_positions = positions[:, 0]
        self.runtime.kv_caches = {layer + 1: self.cache.view(layer, ids) for layer in range(self.shape.num_layers)}
        with torch.no_grad():
            logits = gpt_forward(self.model, input_ids, positions, self.runtime)[:, -1]
        self.metrics.decode_collectives += self.runtime.stats.total_calls - stats_before[0]
        self.metrics.decode_bytes_sent += self.runtime.stats.total_bytes - stats_before[1]
        for layer, layer_stats in self.runtime.per_layer_stats.items():
            by_layer = self.metrics.decode_collectives_by_layer
            by_layer[layer] = by_layer.get(layer, 0) + layer_stats.total_calls - layer_calls_before.get(layer, 0)
        tokens = self._sample(logits, requests)
        self.metrics.decode_time_s += time.perf_counter() - start
        self.metrics.decode_steps += 1
        self.metrics.decode_tokens += len(requests)
        yield from self._append_tokens(requests, tokens)

    # ------------------------------------------------------------------ sampling and stopping
    def _sample(self, logits: torch.Tensor, requests: list[_Request]) -> torch.Tensor:
        tokens = sample(logits[:, :self.sampled_vocab_size], [r.sampling for r in requests],
                        [r.generator for r in requests])
        if dist.is_initialized() and dist.get_world_size(self.groups.replica_group) > 1:
            tokens = broadcast_tokens(tokens.contiguous(), self.groups.replica_group,
                                      src=self.groups.replica_first_rank)
        return tokens

    def _append_tokens(self, requests: list[_Request], tokens: torch.Tensor) -> Iterator[TokenEvent]:
        for request, token in zip(requests, tokens.tolist()):
            request.output_ids.append(token)
            request.text = self.tokenizer.decode(request.output_ids)
            request.finish_reason = self._finish_reason(request, token)
            if request.finish_reason == "stop":
                request.text = _cut_at_stop(request.text, request.sampling.stop_strings)
            yield TokenEvent(request.index, token, _stream_delta(request), request.finish_reason)

    def _finish_reason(self, request: _Request, token: int) -> Optional[str]:
        if token == self.tokenizer.eos_token_id or token in request.sampling.stop_token_ids:
            return "eos"
        if any(stop in request.text for stop in request.sampling.stop_strings):
            return "stop"
        if len(request.output_ids) >= request.sampling.max_new_tokens:
            return "length"
        return None

    def _result(self, request: _Request) -> GenerationResult:
        return GenerationResult(request.index, request.prompt, request.prompt_ids, request.output_ids,
                                request.text, request.finish_reason, request.error)

    @property
    def _device(self) -> torch.device:
        return self.cache.device


def _stream_delta(request: _Request) -> str:
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


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.index(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]
