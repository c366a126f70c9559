"""Speculative decoding with a draft model: a second, smaller checkpoint of the same vocabulary proposes the drafts.

The draft is a ``CPGPTModel`` on the target's process groups and layout (the same TP x PCP x DCP ranks; its own
heads split over them by its own ``ParallelLayout``), with its own ``AttentionRuntime`` and its own
``PagedKVCache``. That cache has as many blocks as the target's, of the same block size, interleave and DCP
shards, and the engine gives it every reservation it gives the target's (``add_request``, ``register_pages``,
``free_request``, with the same arguments): its ``BlockPool`` is then in the target's state after every call,
so it admits exactly the requests the target's admits, reuses the same prefix pages, and ``truncate`` keeps the
same positions on every DCP member.

Per request the runner keeps ``num_cached``: the draft cache holds the K/V of the sequence's first
``num_cached`` tokens (positions ``[0, num_cached)``, every one a token of the sequence). Its life:

- **prefill**: the same chunks as the target's, alongside it (``prefill``; no logits: the target samples the
  first token);
- **propose** ``k`` drafts for every running request, batched: the first forward feeds each row the tokens its
  cache has not seen (after a verification, the accepted drafts the draft did not feed itself plus the bonus
  token: 1 or 2 tokens), right-padded to the longest row, a multi-token decode (``decode_positions [b, L]``);
  the padding is then forgotten (``truncate``). Each of the ``k - 1`` further forwards feeds the previous draft.
  A draft is the argmax of the draft's logits (gathered over TP, the same tensor on every rank of the replica,
  like the target's), so every rank proposes the same drafts without communicating;
- **keep** after verification: ``min(num_cached, total_len - 1)`` tokens, the drafts that were accepted (the
  target's cache keeps ``total_len - 1`` too; the last token is fed at the next step).

Greedy drafts are deterministic proposals (``q(d) = 1``), so ``speculative.accept``'s rules stay exact for
greedy decoding and for sampling.
"""
from __future__ import annotations

import functools
from typing import Hashable, Sequence

import torch

from cptoolkit.inference.block_pool import PageKey
from cptoolkit.inference.kv_cache import PagedKVCache
from cptoolkit.inference.prefill_kv import store_prefill_kv
from cptoolkit.inference.request import Request
from cptoolkit.layers.core_attention import AttentionPhase, AttentionRuntime
from cptoolkit.layers.dual_chunk_swap import DualChunkSwapBatch
from cptoolkit.models.gpt import CPGPTModel, gpt_forward, gpt_hidden


class DraftModel:
    """The draft model of speculative decoding and its KV cache (see the module docstring).

    ``model`` was built with ``runtime``; ``cache`` is this rank's shard of the draft's KV cache (as many blocks as
    the target's); ``pcp_rank`` is this rank's PCP rank; at most ``num_tokens`` drafts per step, argmax over the
    first ``vocab_size`` ids (the ids the engine samples)."""

    def __init__(self, model: CPGPTModel, runtime: AttentionRuntime, cache: PagedKVCache, pcp_rank: int,
                 num_tokens: int, vocab_size: int):
        if num_tokens < 1:
            raise ValueError(f"DraftModel num_tokens = {num_tokens}: must be >= 1")
        self.model, self.runtime, self.cache = model, runtime, cache
        self.pcp_rank, self.num_tokens, self.vocab_size = pcp_rank, num_tokens, vocab_size
        self._num_cached: dict[Hashable, int] = {}

    # ------------------------------------------------------------------ reservations, mirrored from the target's
    def add_request(self, request_id: Hashable, max_total_len: int, prefix_keys: Sequence[PageKey] = ()) -> int:
        """Reserve the request's draft blocks (``PagedKVCache.add_request``); returns its reused prefix pages."""
        reused_pages = self.cache.add_request(request_id, max_total_len, prefix_keys)
        self._num_cached[request_id] = reused_pages * self.cache.page_tokens
        return reused_pages

    def register_pages(self, request_id: Hashable, keys: Sequence[PageKey]) -> None:
        self.cache.register_pages(request_id, keys)

    def free_request(self, request_id: Hashable) -> None:
        self.cache.free_request(request_id)
        del self._num_cached[request_id]

    # ------------------------------------------------------------------ prefill, drafts, verification
    def prefill(self, request_ids: list[Hashable], batch: DualChunkSwapBatch, positions: torch.Tensor,
                history: list[int]) -> None:
        """The draft's prefill of the target's chunks: ``batch`` (this PCP rank's DualChunkSwap shard of the chunks)
        at ``positions [b, s_local]``, each chunk continuing ``history[row]`` cached tokens. The K/V go to this
        cache's shard owners (one all-to-all per layer on the DCP group, ``store_prefill_kv``)."""
        device = self.cache.device
        ids = list(request_ids)
        views = self.cache.views(ids) if any(history) else {}
        phase = AttentionPhase(
            mode="prefill", history_lens=torch.tensor(history, device=device) if any(history) else None,
            kv_caches=views,
            on_prefill_kv=functools.partial(store_prefill_kv, self.cache, self.runtime.decode_group, self.pcp_rank,
                                            ids, batch.seq_lens, history, batch.seq_len_padded))
        # Only pads can sit past the draft's last position (the engine caps requests below it): clamp them too.
        positions = positions.clamp(max=self.model.shape.max_seq_len - 1)
        with torch.no_grad():
            gpt_hidden(self.model, batch.input_ids.to(device), positions.to(device), self.runtime, phase=phase)
        for request_id, start, chunk_len in zip(ids, history, batch.seq_lens):
            self._num_cached[request_id] = start + chunk_len

    def propose(self, requests: Sequence[Request], limit: int) -> list[list[int]]:
        """``min(num_tokens, limit)`` greedy drafts for every request (``limit >= 1``: the least room left in the
        batch), ``k`` forwards of the draft over the batch; the draft cache then holds each sequence and its
        first ``k - 1`` drafts."""
        num_drafts = min(self.num_tokens, limit)
        ids = [r.request_id for r in requests]
        total_lens = [r.total_len for r in requests]
        unseen = [(r.prompt_ids + r.output_ids)[self._num_cached[r.request_id]:] for r in requests]
        width = max(map(len, unseen))
        device = self.cache.device
        input_ids = torch.tensor([u + [0] * (width - len(u)) for u in unseen], device=device)
        last = torch.tensor([len(u) - 1 for u in unseen], device=device)
        token = self._greedy(ids, input_ids, [list(range(self._num_cached[i], self._num_cached[i] + width))
                                              for i in ids], last)
        for request_id, total_len, fed in zip(ids, total_lens, unseen):
            if len(fed) < width:  # its padding was appended: forget it
                self.cache.truncate(request_id, total_len)
        drafts = [token]
        for step in range(num_drafts - 1):
            token = self._greedy(ids, token[:, None], [[total_len + step] for total_len in total_lens],
                                 torch.zeros_like(last))
            drafts.append(token)
        for request_id, total_len in zip(ids, total_lens):
            self._num_cached[request_id] = total_len + num_drafts - 1
        return torch.stack(drafts, dim=1).tolist()

    def keep(self, request_id: Hashable, total_len: int) -> None:
        """After verification left the request ``total_len`` tokens: forget the draft K/V of rejected drafts."""
        num_cached = min(self._num_cached[request_id], total_len - 1)
        self.cache.truncate(request_id, num_cached)
        self._num_cached[request_id] = num_cached

    def _greedy(self, request_ids: list[Hashable], input_ids: torch.Tensor, host_positions: list[list[int]],
                last: torch.Tensor) -> torch.Tensor:
        """One decode forward of ``input_ids [b, L]`` at consecutive ``host_positions [b][L]`` (appended to the
        draft cache, planned once for every layer); the argmax ``[b]`` of each row's logits after its token
        ``last[row]``."""
        positions = torch.tensor(host_positions, device=self.cache.device)
        phase = AttentionPhase(mode="decode", decode_positions=positions[:, 0] if input_ids.shape[1] == 1
                               else positions, kv_caches=self.cache.views(request_ids, host_positions))
        with torch.no_grad(), self.model.matmul_plan.tuning():
            logits = gpt_forward(self.model, input_ids, positions, self.runtime, logits_index=last,
                                 phase=phase)  # [b, 1, vocab]
        return logits[:, 0, :self.vocab_size].argmax(dim=-1)

