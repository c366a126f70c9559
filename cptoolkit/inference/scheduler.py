"""The engine's scheduler: which requests wait, run and finish, and what each step does.

- **Validation**: an invalid request (empty, a token outside the vocabulary, too long for ``max_seq_len``, too
  large for the whole KV cache, a ``prompt_source`` with another prompt) ends at its first step with an error
  (``error_status`` 400), and the others carry on.
- **Cancellations** requested since the last step end their requests and free their blocks.
- **Admission**: waiting requests join the running batch (up to ``max_batch_size``), in arrival order, when the
  KV caches have free blocks for their whole life (prompt + ``max_new_tokens``); otherwise they wait until a
  running request finishes. The decision uses the worst-case shard's block count, so it is the same on every
  rank. A request reuses the cached pages of its prompt's prefix (``prefix_caching``); one that asks for
  ``prompt_logprobs`` never does, since reused tokens would go unscored.
- **Prompt sharing**: requests that share a prompt (``prompt_source``, the server's ``n > 1``) share its cached
  pages: a sibling waits until its source's prompt is prefilled, then reuses every full page of it and prefills
  only the rest (with prefix caching off, the pages are keyed for the siblings alone).
- **The step's work**: prefill chunks and decode steps alternate while both have work, so a long prompt delays
  the running streams by about one chunk at a time.

Every rank of a replica makes the same calls in the same order, so every decision here is the same on every
rank without a collective. A prompt prefilled over several chunks shows a progress bar (``cptoolkit.progress``).
"""
from __future__ import annotations

import hashlib
from collections import deque
from typing import Optional

from tqdm import tqdm

from cptoolkit.inference.block_pool import PageKey, page_keys
from cptoolkit.inference.caches import EngineCaches
from cptoolkit.inference.request import GenerationResult, Request, TokenEvent, request_result
from cptoolkit.progress import progress


class Scheduler:
    """The waiting, running and finished requests of one replica over ``caches``: at most ``max_batch_size``
    running, each at most ``max_seq_len`` tokens of ids below ``vocab_size``, prompts prefilled ``chunk_size``
    tokens at a time; ``prefix_caching`` reuses cached pages of prompt prefixes (``block_pool``)."""

    def __init__(self, caches: EngineCaches, max_batch_size: int, max_seq_len: int, vocab_size: int,
                 chunk_size: int, prefix_caching: bool):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size = {max_batch_size}: must be >= 1")
        self.caches, self.max_batch_size, self.max_seq_len = caches, max_batch_size, max_seq_len
        self.vocab_size, self.chunk_size, self.prefix_caching = vocab_size, chunk_size, prefix_caching
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished: dict[int, Request] = {}
        self._rejected: list[Request] = []
        self._cancel_requested: set[int] = set()
        self._last_step_decoded = False
        self.prefill_bars: dict[int, tqdm] = {}  # request id -> the progress bar of its prefill

    # ------------------------------------------------------------------ requests in and out
    def add(self, request: Request) -> None:
        """Queue ``request``, or reject it (see the module docstring) to end at the next step."""
        request.error = self._request_error(request)
        if request.prompt_source is not None and not request.error \
                and request.prompt_ids != self._prompt_of(request.prompt_source):
            request.error = f"prompt_source {request.prompt_source}: its prompt differs from this request's"
        if request.error:
            request.finish_reason = "error"
            self._rejected.append(request)
        else:
            self.waiting.append(request)

    def cancel(self, request_id: int) -> None:
        self._cancel_requested.add(request_id)

    def result(self, request_id: int) -> GenerationResult:
        """The result of a finished request (once; it is then forgotten)."""
        if request_id not in self._finished:
            raise KeyError(f"request {request_id} has not finished (or its result was already taken)")
        return request_result(self._finished.pop(request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self._rejected)

    def abort(self, request_ids: set[int]) -> None:
        """Drop ``request_ids`` wherever they are, freeing their blocks; their results are forgotten."""
        self.waiting = deque(r for r in self.waiting if r.request_id not in request_ids)
        self._rejected = [r for r in self._rejected if r.request_id not in request_ids]
        for request in [r for r in self.running if r.request_id in request_ids]:
            self._release(request)
        for request_id in request_ids:
            self._finished.pop(request_id, None)

    def finish(self, request: Request, reason: str) -> TokenEvent:
        """End a request that gets no token this step (rejected, cancelled, or its prompt only scored)."""
        request.finish_reason = reason
        self._finished[request.request_id] = request
        return TokenEvent(request.index, None, "", reason, request.request_id)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> tuple[list[TokenEvent], list[Request], list[Request]]:
        """Start a step: the events of rejected and cancelled requests, then admission; returns those events, the
        requests to prefill a chunk of and the requests to decode (at most one of the two lists is non-empty)."""
        events = [self.finish(request, "error") for request in self._rejected]
        self._rejected.clear()
        events += self._apply_cancellations()
        self._admit()
        prefilling = [r for r in self.running if r.num_cached < len(r.prompt_ids)]
        decoding = [r for r in self.running if r.num_cached == len(r.prompt_ids) and r.finish_reason is None]
        if prefilling and (self._last_step_decoded or not decoding):
            self._last_step_decoded = False
            return events, prefilling, []
        if decoding:
            self._last_step_decoded = True
        return events, [], decoding

    def prefilled(self, requests: list[Request], chunk_lens: list[int]) -> tuple[list[TokenEvent], list[int]]:
        """Record a prefilled chunk of ``chunk_lens[row]`` tokens per request. A prompt it completes has its full
        pages offered for reuse; its request ends (``length``) if it asked for no new token. Returns those
        requests' events and the rows that get their first token now."""
        for request, chunk_len in zip(requests, chunk_lens):
            request.num_cached += chunk_len
        self._show_prefill_progress(requests, chunk_lens)
        complete = [row for row, r in enumerate(requests) if r.num_cached == len(r.prompt_ids)]
        for row in complete:
            keys = self._prefix_keys(requests[row], False)
            if keys:
                self.caches.register_pages(requests[row].request_id, keys)
        events = [self.finish(requests[row], "length") for row in complete
                  if requests[row].sampling.max_new_tokens == 0]
        return events, [row for row in complete if requests[row].sampling.max_new_tokens > 0]

    def release_finished(self) -> None:
        """End the step: free the blocks of every running request that finished in it."""
        for request in [r for r in self.running if r.finish_reason is not None]:
            self._release(request)

    # ------------------------------------------------------------------ validation, admission, release
    def _request_error(self, request: Request) -> Optional[str]:
        if not request.prompt_ids:
            return "empty prompt: a request needs at least one prompt token"
        if request.max_total_len > self.max_seq_len:
            return (f"prompt of {len(request.prompt_ids)} tokens + max_new_tokens "
                    f"{request.sampling.max_new_tokens} = {request.max_total_len} exceeds max_seq_len "
                    f"{self.max_seq_len}")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            return f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
        cache = self.caches.target
        if cache.blocks_for(request.max_total_len) > cache.num_blocks:
            return (f"needs {cache.blocks_for(request.max_total_len)} KV blocks per rank for "
                    f"{request.max_total_len} tokens "
                    f"but the whole cache has {cache.num_blocks} ({cache.bytes_per_rank:,} bytes per "
                    f"rank); raise inference.kv_cache_bytes (--kv-cache-memory) or lower max_new_tokens "
                    f"(max_tokens)")
        return None

    def _apply_cancellations(self) -> list[TokenEvent]:
        cancelled = [r for r in [*self.waiting, *self.running]
                     if r.request_id in self._cancel_requested and r.finish_reason is None]
        self._cancel_requested.clear()
        self.waiting = deque(r for r in self.waiting if r not in cancelled)
        events = [self.finish(request, "cancelled") for request in cancelled]
        for request in [r for r in cancelled if r in self.running]:
            self._release(request)
        return events

    def _admit(self) -> None:
        """Move waiting requests into the running batch (and the caches) while slots and blocks last."""
        while self.waiting and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            if request.prompt_source is not None and self._prefilling(request.prompt_source):
                break  # its source's pages are not cached yet
            keys = self._prefix_keys(request, True)
            if not self.caches.can_admit(request.max_total_len, keys):
                break  # queued until a running request frees its blocks
            self.waiting.popleft()
            reused_tokens = self.caches.add_request(request.request_id, request.max_total_len, keys)
            request.num_cached = request.cached_prompt_tokens = reused_tokens
            self.running.append(request)

    def _prefilling(self, request_id: int) -> bool:
        """Whether request ``request_id`` is waiting or still prefilling its prompt."""
        return any(r.request_id == request_id for r in self.waiting) or any(
            r.request_id == request_id and r.num_cached < len(r.prompt_ids) for r in self.running)

    def _prompt_of(self, request_id: int) -> Optional[list[int]]:
        for request in [*self.waiting, *self.running, *self._finished.values()]:
            if request.request_id == request_id:
                return request.prompt_ids
        return None

    def _release(self, request: Request) -> None:
        if request.request_id in self.prefill_bars:  # cancelled while prefilling
            self.prefill_bars.pop(request.request_id).close()
        self.caches.free_request(request.request_id)
        self.running.remove(request)
        self._finished[request.request_id] = request

    def _prefix_keys(self, request: Request, whole_pages_only_before_last: bool) -> list[PageKey]:
        """Page keys of the prompt: the pages before its last token (what admission may reuse: the
        last token is always computed, for its logits) or every full page (what a prefill caches)."""
        shared = request.prompt_source is not None or any(
            r.prompt_source == request.request_id for r in self.waiting)
        if not (self.prefix_caching or shared):
            return []
        if whole_pages_only_before_last and request.sampling.prompt_logprobs is not None:
            return []  # every prompt token must be computed to be scored
        page = self.caches.target.page_tokens
        usable = len(request.prompt_ids) - 1 if whole_pages_only_before_last else len(request.prompt_ids)
        keys = page_keys(request.prompt_ids, page, usable // page)
        if self.prefix_caching:
            return keys
        # Keyed for the requests sharing this prompt only: unrelated requests never hit these pages.
        source = request.prompt_source if request.prompt_source is not None else request.request_id
        salt = source.to_bytes(8, "little")
        return [hashlib.blake2b(key, key=salt, digest_size=16).digest() for key in keys]

    def _show_prefill_progress(self, requests: list[Request], chunk_lens: list[int]) -> None:
        """Advance a progress bar of tokens prefilled / prompt length for each prompt whose prefill spans
        several chunks (``cptoolkit.progress``: global rank 0, on a terminal); closed once it is prefilled."""
        for request, chunk_len in zip(requests, chunk_lens):
            prompt_len, bar = len(request.prompt_ids), self.prefill_bars.get(request.request_id)
            if bar is None and prompt_len - request.cached_prompt_tokens > self.chunk_size:
                bar = self.prefill_bars[request.request_id] = progress(
                    prompt_len, f"prefill request {request.index}", "token", initial=request.cached_prompt_tokens)
            if bar is not None:
                bar.update(chunk_len)
                if request.num_cached == prompt_len:
                    self.prefill_bars.pop(request.request_id).close()
