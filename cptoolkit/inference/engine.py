"""Generation engine: PCP-sharded prefill, DCP-sharded decode, continuous batching, sampling.

Online API: ``add_request`` queues a request at any time, ``step`` runs one engine iteration and
returns its ``TokenEvent``s, ``cancel`` ends a request, ``result`` hands back a finished one.
``generate`` and ``stream`` are built on them. Every rank of one model replica (TP x PCP ranks)
must make the same calls in the same order: the engine runs in lock step, with no collective to
agree on what to do next. With ``dp > 1`` each replica serves its own requests; ``generate`` gives
replica ``i % dp`` request ``i`` and gathers every result, in order.

One iteration (``step``):
- **Cancellations** requested since the last step end their requests and free their blocks.
- **Admission**: waiting requests join the running batch (up to ``max_batch_size``) when the KV cache
  has free blocks for their whole life (prompt + ``max_new_tokens``); otherwise they wait until a
  running request finishes. The decision uses the worst-case shard's block count, so it is the same
  on every rank.
- **Prefill** of the newly admitted requests, together: each prompt is padded and split by
  DualChunkSwap over the PCP group; the attention layers hand each layer's K/V to
  ``prefill_kv.store_prefill_kv``, which routes each token to its KV-shard owner over the DCP group
  (one all-to-all per layer); a ``draft_model`` prefills the same chunks into its own cache. Only each
  prompt's last token gets logits; the PCP rank holding it contributes them to a sum over the PCP group,
  and the first new token is sampled.
  A request that asks for ``prompt_logprobs`` has every prompt token scored where its PCP rank holds it
  (``prompt_logprobs``); it never reuses cached prefix pages, whose tokens would go unscored.
- Otherwise a **decode** step: one token for every running request, attention over the DCP-sharded
  cache. With a ``proposer`` (speculative decoding, ``speculative``: prompt lookup) or a ``draft_model``
  (``draft_model``: a second checkpoint's greedy drafts) requests with draft tokens feed them too, ``L`` tokens
  per sequence through one forward, and emit the accepted drafts plus one token; the caches forget the rejected
  ones.
Sampled tokens are broadcast from the replica's first rank over the replica group, so every rank
appends the same token even if the ranks' float rounding differed.

Requests that share a prompt (``add_request(..., prompt_source=...)``, the server's ``n > 1``) share its
cached pages: a sibling waits until its source's prompt is prefilled, then reuses every full page of it
and prefills only the rest (with prefix caching off, the pages are keyed for the siblings alone).

Requests end on ``max_new_tokens``, on EOS, on a stop string, or when cancelled. Invalid requests
(empty, too long for ``max_seq_len``, too large for the whole KV cache) end at their first step with
an error (``error_status`` 400), and the others carry on.

**Failure isolation.** An exception while sampling, accepting drafts, scoring a token's logprobs,
detokenizing or checking stop strings for one request ends that request (``finish_reason`` ``error``,
``error_status`` 500, its blocks freed) and the batch carries on. Every rank takes the same decision with no
collective of its own: a sampling failure travels in the token broadcast that already follows sampling
(``FAILED_TOKEN`` in the replica's first rank's row, which every rank applies, whatever its own draw did), and
everything after the broadcast is a deterministic function of the broadcast token ids, so it raises on every
rank alike. Only a collective failure (a dead or stalled peer) ends the job.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from cptoolkit.inference.block_pool import PageKey, page_keys
from cptoolkit.inference.detokenizer import IncrementalDetokenizer
from cptoolkit.inference.kv_cache import PagedKVCache
from cptoolkit.inference.draft_model import DraftModel
from cptoolkit.inference.prefill_kv import store_prefill_kv
from cptoolkit.inference.prompt_logprobs import ScoredRow, score_prompt_chunks
from cptoolkit.inference.request import (GenerationResult, Request, TokenEvent, TokenLogprob, cut_at_stop,
                                         request_result, stream_delta)
from cptoolkit.inference.sampling import (FAILED_TOKEN, SamplingParams, adjust_logits, broadcast_tokens,
                                          make_generator, sample_each, top_logprobs)
from cptoolkit.inference.speculative import NgramProposer, accept
from cptoolkit.layers.comm import all_reduce
from cptoolkit.layers.core_attention import AttentionPhase, AttentionRuntime
from cptoolkit.layers.dual_chunk_swap import partition_batch
from cptoolkit.models.gpt import CPGPTModel, gpt_forward, gpt_hidden, gpt_logits
from cptoolkit.parallel_state import ParallelGroups
from cptoolkit.progress import progress

Prompt = str | list[int]
LOG = logging.getLogger("cptoolkit")
# A row that failed on the replica's first rank while this rank's own draw succeeded: the broadcast decides.
_FAILED_ON_FIRST_RANK = "sampling failed on the replica's first rank (its log says why)"


@dataclass
class EngineMetrics:
    """Wall times and counts of one engine's lifetime (every rank measures its own)."""

    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    prompt_tokens: int = 0
    prefill_tokens_generated: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_rows: int = 0  # requests summed over decode steps
    decode_collectives: int = 0
    decode_bytes_sent: int = 0
    decode_collectives_by_layer: dict[int, int] = field(default_factory=dict)
    draft_tokens: int = 0  # speculative decoding: drafts proposed and verified
    accepted_draft_tokens: int = 0
    draft_collectives: int = 0  # the draft model's own, in decode steps

    def summary(self, kv_bytes_per_rank: int, num_layers: int) -> dict:
        steps = max(self.decode_steps, 1)
        return {
            "draft_tokens": self.draft_tokens,
            "draft_acceptance_rate": self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0,
            "draft_collectives_per_decode_step": self.draft_collectives / steps,
            "tokens_per_request_step": self.decode_tokens / max(self.decode_rows, 1),
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
    ``prefill_chunk_size`` (a multiple of ``interleave * dcp``; None = whole prompts) splits long prompts
    into chunks with decode steps in between; ``prefix_caching`` reuses cached KV pages of prompt
    prefixes (``block_pool``); ``proposer`` (prompt lookup, ``speculative``) or ``draft_model`` (a second model on
    the same groups, ``draft_model``; its cache gets every reservation the target's gets) turns on speculative
    decoding with their drafts.
    """

    def __init__(self, model: CPGPTModel, runtime: AttentionRuntime, groups: ParallelGroups,
                 cache: PagedKVCache, tokenizer, max_batch_size: int, max_seq_len: Optional[int] = None,
                 prefill_chunk_size: Optional[int] = None, prefix_caching: bool = False,
                 proposer: Optional[NgramProposer] = None, draft_model: Optional[DraftModel] = None):
        self.shape = model.shape
        max_seq_len = self.shape.max_seq_len if max_seq_len is None else max_seq_len
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size = {max_batch_size}: must be >= 1")
        if proposer is not None and draft_model is not None:
            raise ValueError("proposer and draft_model: give at most one (speculative decoding takes one source of "
                             "drafts)")
        if not 1 <= max_seq_len <= self.shape.max_seq_len:
            raise ValueError(f"max_seq_len = {max_seq_len}: must be in [1, the model's max_seq_len = "
                             f"{self.shape.max_seq_len}]")
        self.model, self.runtime, self.groups = model, runtime, groups
        self.cache, self.tokenizer, self.max_batch_size = cache, tokenizer, max_batch_size
        self.max_seq_len = max_seq_len
        self.prefill_chunk_size, self.prefix_caching = prefill_chunk_size, prefix_caching
        self.proposer, self.draft_model = proposer, draft_model
        # A model's vocabulary may be padded past the tokenizer's (e.g. 320 rows for 258 byte ids):
        # ids the tokenizer cannot decode are never sampled.
        self.sampled_vocab_size = min(tokenizer.vocab_size, self.shape.vocab_size)
        self.metrics = EngineMetrics()
        self._request_ids = itertools.count()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._finished: dict[int, Request] = {}
        self._rejected: list[Request] = []
        self._cancel_requested: set[int] = set()
        self._last_step_decoded = False
        self._prefill_bars: dict[int, tqdm] = {}  # request id -> the progress bar of its prefill

    # ------------------------------------------------------------------ online API
    def add_request(self, prompt: Prompt, sampling: SamplingParams, index: Optional[int] = None,
                    prompt_source: Optional[int] = None) -> int:
        """Queue a request (text or token ids); returns its engine-wide id. ``index`` labels its
        events and result (default: the id) and, with ``sampling.seed``, seeds its sampler, so the
        same (seed, index) draws the same tokens whatever else runs. ``prompt_source``: the id of an
        earlier request with the same prompt whose cached pages this one reuses (see the module
        docstring). An invalid request ends with an error event at the next ``step``."""
        request_id = next(self._request_ids)
        index = request_id if index is None else index
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        request = Request(request_id, index, prompt if isinstance(prompt, str) else None, ids, sampling,
                          make_generator(sampling.seed, index), prompt_source=prompt_source,
                          detokenizer=IncrementalDetokenizer(self.tokenizer))
        if sampling.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(ids)
        request.error = self._request_error(request)
        if prompt_source is not None and not request.error and ids != self._prompt_of(prompt_source):
            request.error = f"prompt_source {prompt_source}: its prompt differs from this request's"
        if request.error:
            request.finish_reason = "error"
            self._rejected.append(request)
        else:
            self._waiting.append(request)
        return request_id

    def step(self) -> list[TokenEvent]:
        """One engine iteration (see the module docstring); the events of every request it touched.

        Prefill chunks and decode steps alternate while both have work, so a long prompt delays the
        running streams by about one chunk at a time."""
        events = [self._finish(request, "error") for request in self._rejected]
        self._rejected.clear()
        events += self._apply_cancellations()
        self._admit()
        prefilling = [r for r in self._running if r.num_cached < len(r.prompt_ids)]
        decoding = [r for r in self._running if r.num_cached == len(r.prompt_ids) and r.finish_reason is None]
        if prefilling and (self._last_step_decoded or not decoding):
            events += self._prefill(prefilling)
            self._last_step_decoded = False
        elif decoding:
            events += self._decode_step(decoding)
            self._last_step_decoded = True
        for request in [r for r in self._running if r.finish_reason is not None]:
            self._release(request)
        return events

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running or self._rejected)

    def cancel(self, request_id: int) -> None:
        """End request ``request_id`` at the next ``step`` (``finish_reason`` ``cancelled``, its KV
        blocks freed). Unknown or finished requests are ignored."""
        self._cancel_requested.add(request_id)

    def result(self, request_id: int) -> GenerationResult:
        """The result of a finished request (once; it is then forgotten)."""
        if request_id not in self._finished:
            raise KeyError(f"request {request_id} has not finished (or its result was already taken)")
        return request_result(self._finished.pop(request_id))

    # ------------------------------------------------------------------ batch API
    def generate(self, prompts: Sequence[Prompt], sampling: SamplingParams | Sequence[SamplingParams],
                 on_event: Optional[Callable[[TokenEvent], None]] = None) -> list[GenerationResult]:
        """Generate for every prompt; results of every request in prompt order (with ``dp > 1``
        gathered from all replicas). ``on_event`` sees every ``TokenEvent`` of this rank's replica as
        it happens (``request_index`` = the prompt's position)."""
        ids = self._add_batch(prompts, sampling)
        for event in self._events_of(ids):
            if on_event is not None:
                on_event(event)
        return self._gather_results([self.result(request_id) for request_id in ids])

    def stream(self, prompts: Sequence[Prompt], sampling: SamplingParams | Sequence[SamplingParams]
               ) -> Iterator[TokenEvent]:
        """Like ``generate``, yielding this replica's ``TokenEvent``s as tokens arrive. Stopping early
        (``close()``, ``break``) cancels the unfinished requests and frees their blocks at once; every
        rank of the replica must stop at the same event."""
        ids = self._add_batch(prompts, sampling)
        yield from self._events_of(ids)
        for request_id in ids:
            self.result(request_id)

    def _add_batch(self, prompts: Sequence[Prompt], sampling) -> list[int]:
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f"sampling: got {len(params)} SamplingParams for {len(prompts)} prompts")
        dp_rank, dp_size = self.groups.dp_rank, self.groups.dp_size
        return [self.add_request(prompt, request_params, index)
                for index, (prompt, request_params) in enumerate(zip(prompts, params))
                if index % dp_size == dp_rank]

    def _events_of(self, request_ids: list[int]) -> Iterator[TokenEvent]:
        """Step until ``request_ids`` finish, yielding their events; whatever ends the iteration early
        (an exception, a closed generator) drops them from the engine and frees their blocks."""
        mine, pending = set(request_ids), set(request_ids)
        try:
            while pending:
                for event in self.step():
                    if event.request_id in mine:
                        if event.finish_reason is not None:
                            pending.discard(event.request_id)
                        yield event
        finally:
            if pending:
                self._abort(pending)

    def _abort(self, request_ids: set[int]) -> None:
        self._waiting = deque(r for r in self._waiting if r.request_id not in request_ids)
        self._rejected = [r for r in self._rejected if r.request_id not in request_ids]
        for request in [r for r in self._running if r.request_id in request_ids]:
            self._release(request)
        for request_id in request_ids:
            self._finished.pop(request_id, None)

    def _gather_results(self, mine: list[GenerationResult]) -> list[GenerationResult]:
        """Every request's result in prompt order: this replica's own, plus (``dp > 1``) the other
        replicas' via one ``all_gather_object`` on the DP group."""
        if self.groups.dp_size == 1:
            return mine
        per_replica: list = [None] * self.groups.dp_size
        dist.all_gather_object(per_replica, mine, group=self.groups.dp_group)
        return sorted((result for results in per_replica for result in results), key=lambda r: r.request_index)

    # ------------------------------------------------------------------ admission and release
    def _request_error(self, request: Request) -> Optional[str]:
        if not request.prompt_ids:
            return "empty prompt: a request needs at least one prompt token"
        if request.max_total_len > self.max_seq_len:
            return (f"prompt of {len(request.prompt_ids)} tokens + max_new_tokens "
                    f"{request.sampling.max_new_tokens} = {request.max_total_len} exceeds max_seq_len "
                    f"{self.max_seq_len}")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.shape.vocab_size]
        if bad:
            return f"prompt token id {bad[0]} is outside the vocabulary [0, {self.shape.vocab_size})"
        if self.cache.blocks_for(request.max_total_len) > self.cache.num_blocks:
            return (f"needs {self.cache.blocks_for(request.max_total_len)} KV blocks per rank for "
                    f"{request.max_total_len} tokens "
                    f"but the whole cache has {self.cache.num_blocks} ({self.cache.bytes_per_rank:,} bytes per "
                    f"rank); raise inference.kv_cache_bytes (--kv-cache-memory) or lower max_new_tokens "
                    f"(max_tokens)")
        return None

    def _apply_cancellations(self) -> list[TokenEvent]:
        cancelled = [r for r in [*self._waiting, *self._running]
                     if r.request_id in self._cancel_requested and r.finish_reason is None]
        self._cancel_requested.clear()
        self._waiting = deque(r for r in self._waiting if r not in cancelled)
        events = [self._finish(request, "cancelled") for request in cancelled]
        for request in [r for r in cancelled if r in self._running]:
            self._release(request)
        return events

    def _finish(self, request: Request, reason: str) -> TokenEvent:
        """End a request that gets no token this step (rejected or cancelled)."""
        request.finish_reason = reason
        self._finished[request.request_id] = request
        return TokenEvent(request.index, None, "", reason, request.request_id)

    def _admit(self) -> None:
        """Move waiting requests into the running batch (and the cache) while slots and blocks last,
        in arrival order; a request reuses the cached pages of its prompt's prefix."""
        while self._waiting and len(self._running) < self.max_batch_size:
            request = self._waiting[0]
            if request.prompt_source is not None and self._prefilling(request.prompt_source):
                break  # its source's pages are not cached yet
            keys = self._prefix_keys(request, True)
            if not self.cache.can_admit(request.max_total_len, keys):
                break  # queued until a running request frees its blocks
            self._waiting.popleft()
            reused_pages = self.cache.add_request(request.request_id, request.max_total_len, keys)
            if self.draft_model is not None:  # the same pool decisions: it admits and reuses alike
                self.draft_model.add_request(request.request_id, request.max_total_len, keys)
            request.num_cached = request.cached_prompt_tokens = reused_pages * self.cache.page_tokens
            self._running.append(request)

    def _prefilling(self, request_id: int) -> bool:
        """Whether request ``request_id`` is waiting or still prefilling its prompt."""
        return any(r.request_id == request_id for r in self._waiting) or any(
            r.request_id == request_id and r.num_cached < len(r.prompt_ids) for r in self._running)

    def _prompt_of(self, request_id: int) -> Optional[list[int]]:
        for request in [*self._waiting, *self._running, *self._finished.values()]:
            if request.request_id == request_id:
                return request.prompt_ids
        return None

    def _release(self, request: Request) -> None:
        if request.request_id in self._prefill_bars:  # cancelled while prefilling
            self._prefill_bars.pop(request.request_id).close()
        self.cache.free_request(request.request_id)
        if self.draft_model is not None:
            self.draft_model.free_request(request.request_id)
        self._running.remove(request)
        self._finished[request.request_id] = request

    # ------------------------------------------------------------------ prefill
    def _prefill(self, requests: list[Request]) -> list[TokenEvent]:
        """Prefill the next chunk of every request in ``requests`` (the rest of its prompt when
        chunking is off) over the cached history (``Request.num_cached``); requests whose prompt this
        completes get their first token. Chunks start at multiples of ``interleave * dcp`` (prefix
        pages and chunk sizes are such multiples), so one DCP routing serves every row."""
        groups = self.groups
        start = time.perf_counter()
        chunk_size = self.prefill_chunk_size or self.max_seq_len
        history = [r.num_cached for r in requests]
        chunks = [r.prompt_ids[h:h + chunk_size] for r, h in zip(requests, history)]
        batch = partition_batch(chunks, groups.pcp_rank, groups.pcp_size, pad_id=0)
        starts = torch.tensor(history, dtype=torch.int64)
        # DualChunkSwap pads each chunk by up to 2*PCP-1 tokens whose positions may pass the model's
        # last one; no real token attends to a pad (pads come last, attention is causal) and pads are
        # never cached, so their positions are clamped into the model's range.
        positions = (batch.position_ids + starts[:, None]).clamp(max=self.shape.max_seq_len - 1)
        owners = batch.last_token_owners()  # (pcp_rank, local index) of each chunk's last token
        ids = [r.request_id for r in requests]
        phase = AttentionPhase(
            mode="prefill",
            history_lens=starts.to(self._device) if any(history) else None,
            kv_caches=self._cache_views(ids) if any(history) else {},
            on_prefill_kv=functools.partial(store_prefill_kv, self.cache, self.runtime.decode_group,
                                            groups.pcp_rank, ids, batch.seq_lens, history, batch.seq_len_padded))
        with torch.no_grad():
            hidden = gpt_hidden(self.model, batch.input_ids.to(self._device), positions.to(self._device),
                                self.runtime, phase=phase)  # [s_local, b, h]
            last_index = torch.tensor([i for _, i in owners], device=self._device)
            last_logits = gpt_logits(self.model, hidden.gather(
                0, last_index.view(1, -1, 1).expand(1, -1, hidden.shape[-1])))[:, 0]
            self._score_prompts(hidden, batch, requests, history)
        if self.draft_model is not None:
            self.draft_model.prefill(ids, batch, positions, history)
        if groups.pcp_size > 1:  # exactly one PCP rank holds each row; the others contribute zeros
            not_mine = torch.tensor([owner != groups.pcp_rank for owner, _ in owners], device=self._device)
            all_reduce(last_logits.masked_fill_(not_mine.unsqueeze(1), 0.0), groups.pcp_group)
        for request, chunk in zip(requests, chunks):
            request.num_cached += len(chunk)
        self._show_prefill_progress(requests, [len(chunk) for chunk in chunks])
        complete = [row for row, r in enumerate(requests) if r.num_cached == len(r.prompt_ids)]
        for row in complete:
            self._cache_prompt_pages(requests[row])
        scored_only = [requests[row] for row in complete if requests[row].sampling.max_new_tokens == 0]
        done = [row for row in complete if requests[row].sampling.max_new_tokens > 0]
        events = [self._finish(request, "length") for request in scored_only]
        if done:
            sampled = [requests[row] for row in done]
            tokens, failures = self._sample(last_logits[done], sampled)
            events += self._append_tokens(sampled, tokens, last_logits[done], failures)
        self.metrics.prefill_time_s += time.perf_counter() - start
        self.metrics.prompt_tokens += sum(batch.seq_lens)
        self.metrics.prefill_tokens_generated += len(done)
        return events

    def _show_prefill_progress(self, requests: list[Request], chunk_lens: list[int]) -> None:
        """Advance a progress bar of tokens prefilled / prompt length for each prompt whose prefill spans
        several chunks (``cptoolkit.progress``: global rank 0, on a terminal); closed once it is prefilled."""
        chunk_size = self.prefill_chunk_size or self.max_seq_len
        for request, chunk_len in zip(requests, chunk_lens):
            prompt_len, bar = len(request.prompt_ids), self._prefill_bars.get(request.request_id)
            if bar is None and prompt_len - request.cached_prompt_tokens > chunk_size:
                bar = self._prefill_bars[request.request_id] = progress(
                    prompt_len, f"prefill request {request.index}", "token", initial=request.cached_prompt_tokens)
            if bar is not None:
                bar.update(chunk_len)
                if request.num_cached == prompt_len:
                    self._prefill_bars.pop(request.request_id).close()

    def _score_prompts(self, hidden: torch.Tensor, batch, requests: list[Request], history: list[int]) -> None:
        """Record the prompt logprobs of this chunk for the requests that asked for them."""
        rows = [ScoredRow(row, r.prompt_ids, start, chunk_len, r.sampling.prompt_logprobs)
                for row, (r, start, chunk_len) in enumerate(zip(requests, history, batch.seq_lens))
                if r.sampling.prompt_logprobs is not None]
        figures = score_prompt_chunks(self.model, hidden, batch.position_ids[0], rows, self.groups.pcp_group)
        for scored, by_position in zip(rows, figures):
            for position, logprob in by_position.items():
                requests[scored.row].prompt_logprobs[position] = logprob

    def _prefix_keys(self, request: Request, whole_pages_only_before_last: bool) -> list[PageKey]:
        """Page keys of the prompt: the pages before its last token (what admission may reuse: the
        last token is always computed, for its logits) or every full page (what a prefill caches)."""
        shared = request.prompt_source is not None or any(
            r.prompt_source == request.request_id for r in self._waiting)
        if not (self.prefix_caching or shared):
            return []
        if whole_pages_only_before_last and request.sampling.prompt_logprobs is not None:
            return []  # every prompt token must be computed to be scored
        page = self.cache.page_tokens
        usable = len(request.prompt_ids) - 1 if whole_pages_only_before_last else len(request.prompt_ids)
        keys = page_keys(request.prompt_ids, page, usable // page)
        if self.prefix_caching:
            return keys
        # Keyed for the requests sharing this prompt only: unrelated requests never hit these pages.
        source = request.prompt_source if request.prompt_source is not None else request.request_id
        salt = source.to_bytes(8, "little")
        return [hashlib.blake2b(key, key=salt, digest_size=16).digest() for key in keys]

    def _cache_prompt_pages(self, request: Request) -> None:
        keys = self._prefix_keys(request, False)
        if keys:
            self.cache.register_pages(request.request_id, keys)
            if self.draft_model is not None:
                self.draft_model.register_pages(request.request_id, keys)

    def _cache_views(self, request_ids: list[int], positions: Optional[list[list[int]]] = None) -> dict:
        """``{layer_number: view}``: every layer's cache for this batch; with the step's ``positions [b][L]`` the
        step is planned once for every layer (``PagedKVCache.views``)."""
        return self.cache.views(request_ids, positions)

    # ------------------------------------------------------------------ decode
    def _decode_step(self, requests: list[Request]) -> list[TokenEvent]:
        start = time.perf_counter()
        draft_calls_before = self.draft_model.runtime.stats.total_calls if self.draft_model is not None else 0
        drafts = self._drafts(requests)
        if self.draft_model is not None:
            self.metrics.draft_collectives += self.draft_model.runtime.stats.total_calls - draft_calls_before
        stats_before = (self.runtime.stats.total_calls, self.runtime.stats.total_bytes)
        layer_calls_before = {layer: stats.total_calls for layer, stats in self.runtime.per_layer_stats.items()}
        num_drafts = max(map(len, drafts))
        # Each row feeds its last token and its drafts, padded to the longest row's (padding is never accepted).
        input_ids = torch.tensor([[r.output_ids[-1], *d, *[0] * (num_drafts - len(d))]
                                  for r, d in zip(requests, drafts)], device=self._device)
        host_positions = [list(range(r.total_len - 1, r.total_len + num_drafts)) for r in requests]
        positions = torch.tensor(host_positions, device=self._device)
        phase = AttentionPhase(mode="decode", decode_positions=positions[:, 0] if num_drafts == 0 else positions,
                               kv_caches=self._cache_views([r.request_id for r in requests], host_positions))
        with torch.no_grad():
            logits = gpt_forward(self.model, input_ids, positions, self.runtime, phase=phase)  # [b, L, vocab]
        self.metrics.decode_collectives += self.runtime.stats.total_calls - stats_before[0]
        self.metrics.decode_bytes_sent += self.runtime.stats.total_bytes - stats_before[1]
        for layer, layer_stats in self.runtime.per_layer_stats.items():
            by_layer = self.metrics.decode_collectives_by_layer
            by_layer[layer] = by_layer.get(layer, 0) + layer_stats.total_calls - layer_calls_before.get(layer, 0)
        if num_drafts == 0:
            tokens, failures = self._sample(logits[:, -1], requests)
            events = self._append_tokens(requests, tokens, logits[:, -1], failures)
            self.metrics.decode_tokens += len(requests)
        else:
            events = self._verify(logits, requests, drafts)
        self.metrics.decode_time_s += time.perf_counter() - start
        self.metrics.decode_steps += 1
        self.metrics.decode_rows += len(requests)
        return events

    def _drafts(self, requests: list[Request]) -> list[list[int]]:
        """Each request's draft tokens (none without a proposer or draft model). Every row writes ``1 + max
        drafts`` positions to the cache, so the request with the least room left (``max_new_tokens`` minus
        generated, >= 1) bounds them all; the same on every rank (the proposer reads only token ids, the draft
        model's argmax reads logits gathered over TP)."""
        if self.proposer is None and self.draft_model is None:
            return [[] for _ in requests]
        room = min(r.sampling.max_new_tokens - len(r.output_ids) for r in requests)
        if self.draft_model is not None:
            return self.draft_model.propose(requests, room)
        return [self.proposer.propose(r.prompt_ids + r.output_ids, room) for r in requests]

    def _verify(self, logits: torch.Tensor, requests: list[Request], drafts: list[list[int]]) -> list[TokenEvent]:
        """Speculative decoding's acceptance (``speculative.accept``) on ``logits [b, L, vocab]``, then each
        request's tokens appended in order (stopping at its end) and its rejected drafts forgotten by the
        caches (the target's and the draft model's). The first rank's tokens are broadcast over the replica,
        like ``_sample``'s; a row whose acceptance raised is all ``FAILED_TOKEN`` there, and that request fails
        on every rank."""
        vocab = self.sampled_vocab_size
        emitted = torch.full((len(requests), logits.shape[1]), FAILED_TOKEN, dtype=torch.int64, device=self._device)
        errors: dict[int, str] = {}
        for row, (request, draft) in enumerate(zip(requests, drafts)):
            try:
                # Row j's penalties count the drafts before it as generated.
                adjusted = torch.cat([adjust_logits(logits[row, j:j + 1, :vocab], [request.sampling],
                                                    [request.prompt_ids], [request.output_ids + draft[:j]])
                                      for j in range(len(draft) + 1)])
                tokens = accept(adjusted, draft, request.sampling, request.generator)
                emitted[row, :len(tokens)] = torch.tensor(tokens)
            except Exception as err:  # one request's fault ends that request, not the batch
                errors[row] = f"sampling failed ({type(err).__name__}: {err})"
        if dist.is_initialized() and dist.get_world_size(self.groups.replica_group) > 1:
            emitted = broadcast_tokens(emitted, self.groups.replica_group, src=self.groups.replica_first_rank)
        events = []
        for row, (request, draft) in enumerate(zip(requests, drafts)):
            tokens = emitted[row][emitted[row] != FAILED_TOKEN]
            self.metrics.draft_tokens += len(draft)
            if not len(tokens):
                events.append(self._fail(request, errors.get(row, _FAILED_ON_FIRST_RANK)))
                continue
            self.metrics.accepted_draft_tokens += len(tokens) - 1
            for j, token in enumerate(tokens.view(-1, 1)):
                events += self._append_tokens([request], token, logits[row, j:j + 1])
                self.metrics.decode_tokens += 1
                if request.finish_reason is not None:
                    break
            if request.finish_reason is None:
                self.cache.truncate(request.request_id, request.total_len - 1)
                if self.draft_model is not None:
                    self.draft_model.keep(request.request_id, request.total_len)
        return events

    def _logprob(self, logits: torch.Tensor, token: torch.Tensor, request: Request) -> Optional[TokenLogprob]:
        """``token``'s ``TokenLogprob`` under ``logits [vocab]`` if the request asked for logprobs."""
        num_top = request.sampling.logprobs
        if num_top is None:
            return None
        chosen, top_values, top_ids = top_logprobs(logits.unsqueeze(0), token, num_top)
        return TokenLogprob(int(token), float(chosen[0]), tuple(zip(top_ids[0].tolist(), top_values[0].tolist())))

    # ------------------------------------------------------------------ sampling and stopping
    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> tuple[torch.Tensor, dict[int, str]]:
        """One token per row of ``logits [b, vocab_size]``, the same on every rank of the replica (the first
        rank's, broadcast), and ``{row: error}`` for the rows whose sampling failed there (``FAILED_TOKEN``)."""
        tokens, errors = sample_each(logits[:, :self.sampled_vocab_size], [r.sampling for r in requests],
                                     [r.generator for r in requests], [r.prompt_ids for r in requests],
                                     [r.output_ids for r in requests])
        if dist.is_initialized() and dist.get_world_size(self.groups.replica_group) > 1:
            tokens = broadcast_tokens(tokens.contiguous(), self.groups.replica_group,
                                      src=self.groups.replica_first_rank)
        failed = (tokens == FAILED_TOKEN).nonzero().flatten().tolist()
        return tokens, {row: errors.get(row, _FAILED_ON_FIRST_RANK) for row in failed}

    def _append_tokens(self, requests: list[Request], tokens: torch.Tensor, token_logits: torch.Tensor,
                       failures: Optional[dict[int, str]] = None) -> list[TokenEvent]:
        """Append ``tokens [b]`` to their requests; ``token_logits [b, vocab]`` (raw) give the logprobs of the
        requests that asked. Rows in ``failures`` and rows whose logprobs, detokenizing or stop check raise end
        their request with an error (see the module docstring); the others are unaffected."""
        events, now = [], time.perf_counter()
        for row, (request, token) in enumerate(zip(requests, tokens.tolist())):
            if failures and row in failures:
                events.append(self._fail(request, failures[row]))
                continue
            try:
                events.append(self._append_token(request, token, token_logits[row], now))
            except Exception as err:  # one request's fault ends that request, not the batch
                events.append(self._fail(request, f"processing token {token} failed ({type(err).__name__}: {err})"))
        return events

    def _append_token(self, request: Request, token: int, logits: torch.Tensor, now: float) -> TokenEvent:
        logprob = self._logprob(logits, torch.tensor(token), request)
        if logprob is not None:
            request.output_logprobs.append(logprob)
        request.output_ids.append(token)
        request.token_times_s.append(now)
        changed_from = request.detokenizer.append(token)
        request.text = request.detokenizer.text
        request.finish_reason = self._finish_reason(request, token, changed_from)
        if request.finish_reason == "stop":
            request.text = cut_at_stop(request.text, request.sampling.stop_strings)
        return TokenEvent(request.index, token, stream_delta(request), request.finish_reason, request.request_id,
                          logprob)

    def _fail(self, request: Request, error: str) -> TokenEvent:
        """End running ``request`` with an internal error (500); ``step`` frees its blocks."""
        LOG.warning("request %d failed and was ended, the others carry on: %s", request.index, error)
        request.finish_reason, request.error, request.error_status = "error", error, 500
        return TokenEvent(request.index, None, "", "error", request.request_id)

    def _finish_reason(self, request: Request, token: int, changed_from: int) -> Optional[str]:
        """Why ``request`` ends after ``token`` (None: it goes on). Its text may have changed from offset
        ``changed_from`` only, so a stop string is looked for in that tail and the ``len(stop) - 1`` characters
        before it."""
        if (token in self.tokenizer.eos_token_ids and not request.sampling.ignore_eos) \
                or token in request.sampling.stop_token_ids:
            return "eos"
        if any(stop in request.text[max(changed_from - len(stop) + 1, 0):]
               for stop in request.sampling.stop_strings):
            return "stop"
        if len(request.output_ids) >= request.sampling.max_new_tokens:
            return "length"
        return None

    @property
    def _device(self) -> torch.device:
        return self.cache.device
