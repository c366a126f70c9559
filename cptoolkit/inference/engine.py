"""Generation engine: PCP-sharded prefill, DCP-sharded decode, continuous batching, sampling.

Online API: ``add_request`` queues a request at any time, ``step`` runs one engine iteration and returns its
``TokenEvent``s, ``cancel`` ends a request, ``result`` hands back a finished one. ``generate`` and ``stream`` are
built on them. Every rank of one model replica (TP x PCP ranks) must make the same calls in the same order: the
engine runs in lock step, with no collective to agree on what to do next. With ``dp > 1`` each replica serves its
own requests; ``generate`` gives replica ``i % dp`` request ``i`` and gathers every result, in order.

The engine is the short loop that ties its parts, each documenting its own rules. One ``step``: the ``Scheduler``
ends rejected and cancelled requests and admits waiting ones against the ``EngineCaches`` (the target's cache and a
draft model's, reserved in lock step); then either the ``ModelRunner`` prefills the next chunk of the prompts being
prefilled (a prompt it completes gets its first token) or runs a decode step (one token per running request; with a
``proposer`` or a ``draft_model``, speculative decoding: each request also feeds its drafts and emits the accepted
ones plus one token, and the caches forget the rejected ones); the ``Sampler`` draws the tokens, the same on every
rank (the replica's first rank's, broadcast); the ``OutputProcessor`` appends them (logprobs, text, stops,
``TokenEvent``s); the scheduler frees the finished requests' blocks. Requests end on ``max_new_tokens``, EOS, a stop
string, cancellation, or as invalid (``error_status`` 400, at their first step; the others carry on).

**Failure isolation.** An exception while sampling, accepting drafts, scoring a token's logprobs, detokenizing or
checking stop strings for one request ends that request (``finish_reason`` ``error``, ``error_status`` 500, its
blocks freed) and the batch carries on. Every rank takes the same decision with no collective of its own: a sampling
failure travels in the token broadcast that already follows sampling (``FAILED_TOKEN`` in the replica's first rank's
row, which every rank applies, whatever its own draw did), and everything after the broadcast is a deterministic
function of the broadcast token ids, so it raises on every rank alike. Only a collective failure (a dead or stalled
peer) ends the job.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Iterator, Optional, Sequence

from cptoolkit.inference.caches import EngineCaches
from cptoolkit.inference.data_parallel import gather_results, replica_share
from cptoolkit.inference.draft_model import DraftModel
from cptoolkit.inference.hybrid_cache import HybridKVCache
from cptoolkit.inference.kv_cache import PagedKVCache
from cptoolkit.inference.metrics import EngineMetrics
from cptoolkit.inference.model_runner import ModelRunner
from cptoolkit.inference.output_processor import OutputProcessor
from cptoolkit.inference.request import GenerationResult, Request, TokenEvent
from cptoolkit.inference.sampler import Sampler
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.inference.scheduler import Scheduler
from cptoolkit.inference.speculative import NgramProposer
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.models.gpt import CPGPTModel
from cptoolkit.parallel_state import ParallelGroups

Prompt = str | list[int]


class Engine:
    """Batched generation with a megatron-core GPT ``model`` built with ``runtime`` (the ``AttentionRuntime`` its
    attention layers share) on this rank's ``groups``; ``cache`` is this rank's KV shard; ``tokenizer`` has
    ``encode``, ``decode``, ``eos_token_ids`` and ``vocab_size`` (only ids below it and the model's ``vocab_size``
    are sampled). ``max_seq_len`` caps prompt + generated tokens (at most the model's); ``prefill_chunk_size`` (a
    multiple of ``interleave * dcp``; None = whole prompts) splits long prompts into chunks with decode steps in
    between; ``prefix_caching`` reuses cached KV pages of prompt prefixes (``block_pool``); ``proposer`` (prompt
    lookup, ``speculative``) or ``draft_model`` (``draft_model``) turns on speculative decoding with its drafts."""

    def __init__(self, model: CPGPTModel, runtime: AttentionRuntime, groups: ParallelGroups,
                 cache: PagedKVCache | HybridKVCache, tokenizer, max_batch_size: int, max_seq_len: Optional[int] = None,
                 prefill_chunk_size: Optional[int] = None, prefix_caching: bool = False,
                 proposer: Optional[NgramProposer] = None, draft_model: Optional[DraftModel] = None):
        shape = model.shape
        max_seq_len = shape.max_seq_len if max_seq_len is None else max_seq_len
        if not 1 <= max_seq_len <= shape.max_seq_len:
            raise ValueError(f"max_seq_len = {max_seq_len}: must be in [1, the model's max_seq_len = "
                             f"{shape.max_seq_len}]")
        self.model, self.runtime, self.groups, self.cache, self.tokenizer = model, runtime, groups, cache, tokenizer
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.caches = EngineCaches(cache, draft_model)
        chunk_size = prefill_chunk_size or max_seq_len
        self.scheduler = Scheduler(self.caches, max_batch_size, max_seq_len, shape.vocab_size, chunk_size,
                                   prefix_caching)
        self.runner = ModelRunner(model, runtime, groups, self.caches, chunk_size, proposer)
        # A model's vocabulary may be padded past the tokenizer's (e.g. 320 rows for 258 byte ids):
        # ids the tokenizer cannot decode are never sampled.
        self.sampler = Sampler(groups, min(tokenizer.vocab_size, shape.vocab_size), cache.device)
        self.output = OutputProcessor(tokenizer)
        self.metrics = EngineMetrics()
        self._request_ids = itertools.count()

    # ------------------------------------------------------------------ online API
    def add_request(self, prompt: Prompt, sampling: SamplingParams, index: Optional[int] = None,
                    prompt_source: Optional[int] = None) -> int:
        """Queue a request (text or token ids); returns its engine-wide id. ``index`` labels its
        events and result (default: the id) and, with ``sampling.seed``, seeds its sampler, so the
        same (seed, index) draws the same tokens whatever else runs. ``prompt_source``: the id of an
        earlier request with the same prompt whose cached pages this one reuses (``scheduler``). An
        invalid request ends with an error event at the next ``step``."""
        request_id = next(self._request_ids)
        self.scheduler.add(Request.new(request_id, request_id if index is None else index, prompt, sampling,
                                       self.tokenizer, prompt_source))
        return request_id

    def step(self) -> list[TokenEvent]:
        """One engine iteration (see the module docstring); the events of every request it touched."""
        events, prefilling, decoding = self.scheduler.schedule()
        if prefilling:
            events += self._prefill(prefilling)
        elif decoding:
            events += self._decode(decoding)
        self.scheduler.release_finished()
        return events

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def cancel(self, request_id: int) -> None:
        """End request ``request_id`` at the next ``step`` (``finish_reason`` ``cancelled``, its KV
        blocks freed). Unknown or finished requests are ignored."""
        self.scheduler.cancel(request_id)

    def result(self, request_id: int) -> GenerationResult:
        """The result of a finished request (once; it is then forgotten)."""
        return self.scheduler.result(request_id)

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
        return gather_results([self.result(request_id) for request_id in ids], self.groups)

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
        return [self.add_request(prompt, params, index)
                for index, prompt, params in replica_share(prompts, sampling, self.groups)]

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
                self.scheduler.abort(pending)

    # ------------------------------------------------------------------ the two kinds of step
    def _prefill(self, requests: list[Request]) -> list[TokenEvent]:
        """Prefill the next chunk of every request in ``requests``; those whose prompt it completes get their
        first token (or end, when they only asked for their prompt to be scored)."""
        start = time.perf_counter()
        last_logits, chunk_lens = self.runner.prefill(requests)  # [b, vocab]
        events, first_token_rows = self.scheduler.prefilled(requests, chunk_lens)
        if first_token_rows:
            sampled, logits = [requests[row] for row in first_token_rows], last_logits[first_token_rows]
            tokens, failures = self.sampler.sample(logits, sampled)
            events += self.output.append_tokens(sampled, tokens, logits, failures)
        self.metrics.prefill_time_s += time.perf_counter() - start
        self.metrics.prompt_tokens += sum(chunk_lens)
        self.metrics.prefill_tokens_generated += len(first_token_rows)
        return events

    def _decode(self, requests: list[Request]) -> list[TokenEvent]:
        """One decode step of every request in ``requests``, with their drafts when speculative decoding is on."""
        start = time.perf_counter()
        drafts = self.runner.propose(requests, self.metrics)
        logits = self.runner.decode(requests, drafts, self.metrics)  # [b, L, vocab]
        if logits.shape[1] == 1:
            tokens, failures = self.sampler.sample(logits[:, -1], requests)
            events = self.output.append_tokens(requests, tokens, logits[:, -1], failures)
            self.metrics.decode_tokens += len(requests)
        else:
            emitted, failures = self.sampler.verify(logits, requests, drafts)
            events = self.output.append_verified(requests, drafts, emitted, failures, logits, self.metrics)
            self.caches.keep([r for r in requests if r.finish_reason is None])
        self.metrics.decode_time_s += time.perf_counter() - start
        self.metrics.decode_steps += 1
        self.metrics.decode_rows += len(requests)
        return events
