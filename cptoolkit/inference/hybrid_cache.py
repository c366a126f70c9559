"""The KV cache of a model with sliding-window layers: full-attention layers in a ``PagedKVCache`` sized for
whole sequences, windowed layers in a ring ``PagedKVCache`` (``ring_slots``) whose reservation per request
does not grow with the context.

``HybridKVCache`` answers the engine's cache calls (admission, freeing, truncation, per-layer views and
prefill fills) by sending each to both caches, or to the one holding the layer. Both caches see the same
calls in the same order on every DCP member, so their ``BlockPool``s agree without communication, as one
cache's does. A request is admitted only when both have its blocks. Prefix caching needs pages that stay
(the ring overwrites its own), so the builder uses a ``HybridKVCache`` only without it.
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence

import torch

from cptoolkit.inference.block_pool import PageKey
from cptoolkit.inference.kv_cache import LayerCacheView, PagedKVCache


class HybridKVCache:
    """``full`` holds the layers not in ``windowed_layers`` (None when every layer is windowed), ``windowed``
    those in it (megatron layer numbers, 1-based); each cache numbers its own layers 1.. in model order."""

    def __init__(self, full: Optional[PagedKVCache], windowed: PagedKVCache, windowed_layers: Sequence[int]):
        if windowed.ring_blocks is None:
            raise ValueError("windowed: must be a ring cache (PagedKVCache(..., ring_slots=...))")
        num_layers = windowed.num_layers + (full.num_layers if full is not None else 0)
        if len(windowed_layers) != windowed.num_layers or not set(windowed_layers) <= set(range(1, num_layers + 1)):
            raise ValueError(f"windowed_layers = {list(windowed_layers)}: must be {windowed.num_layers} distinct "
                             f"layer numbers in [1, {num_layers}], one per layer of the windowed cache")
        self.full, self.windowed, self.num_layers = full, windowed, num_layers
        self._home: dict[int, tuple[PagedKVCache, int]] = {}
        counts = {id(windowed): 0, id(full): 0}
        for number in range(1, num_layers + 1):
            cache = windowed if number in windowed_layers else full
            counts[id(cache)] += 1
            self._home[number] = (cache, counts[id(cache)])
        self._primary = full if full is not None else windowed  # sizes and admission messages

    @property
    def _caches(self) -> list[PagedKVCache]:
        return [c for c in (self.full, self.windowed) if c is not None]

    # ------------------------------------------------------------------ what the engine and the server read
    # The figures a ``PagedKVCache`` offers, for a cache of two: block counts, block size, pool and page size are
    # the *primary* cache's (the full-attention layers', or the windowed rings' when every layer is windowed),
    # since its blocks are what a request's length uses up (a ring reservation is the same for every request);
    # bytes are the sum over both caches. ``pool`` is the primary's ``BlockPool``: no pages are ever cached in
    # it, as a hybrid cache exists only without prefix caching (``num_cached_pages`` stays 0).
    device = property(lambda self: self._primary.device)
    block_size = property(lambda self: self._primary.block_size)
    page_tokens = property(lambda self: self._primary.page_tokens)
    num_blocks = property(lambda self: self._primary.num_blocks)
    num_free_blocks = property(lambda self: self._primary.num_free_blocks)
    pool = property(lambda self: self._primary.pool)
    bytes_per_rank = property(lambda self: sum(c.bytes_per_rank for c in self._caches))
    used_bytes = property(lambda self: sum(c.used_bytes for c in self._caches))

    def blocks_for(self, max_total_len: int) -> int:
        """Blocks of the full-attention cache (the windowed ring's when every layer is windowed)."""
        return self._primary.blocks_for(max_total_len)

    def can_admit(self, max_total_len: int, prefix_keys: Sequence[PageKey] = ()) -> bool:
        return all(c.can_admit(max_total_len, prefix_keys) for c in self._caches)

    # ------------------------------------------------------------------ what the engine calls
    def add_request(self, request_id: Hashable, max_total_len: int, prefix_keys: Sequence[PageKey] = ()) -> int:
        """Reserve in both caches, or in neither (``KVCacheFull`` from the one without room)."""
        for cache in self._caches:
            if not cache.can_admit(max_total_len, prefix_keys):
                cache.add_request(request_id, max_total_len, prefix_keys)  # raises, naming its blocks
        return min(cache.add_request(request_id, max_total_len, prefix_keys) for cache in self._caches)

    def register_pages(self, request_id: Hashable, keys: Sequence[PageKey]) -> None:
        for cache in self._caches:
            cache.register_pages(request_id, keys)

    def free_request(self, request_id: Hashable) -> None:
        for cache in self._caches:
            cache.free_request(request_id)

    def truncate(self, request_id: Hashable, num_tokens: int) -> None:
        for cache in self._caches:
            cache.truncate(request_id, num_tokens)

    def _layer(self, layer_number: int) -> tuple[PagedKVCache, int]:
        if layer_number not in self._home:
            raise ValueError(f"layer_number = {layer_number!r} is invalid: it must be in [1, {self.num_layers}] "
                             "(megatron-core numbers layers from 1)")
        return self._home[layer_number]

    def shard_len(self, layer_number: int, request_id: Hashable) -> int:
        cache, local = self._layer(layer_number)
        return cache.shard_len(local, request_id)

    def fill_prefill(self, layer_number: int, request_id: Hashable, k: torch.Tensor, v: torch.Tensor,
                     positions: torch.Tensor) -> None:
        cache, local = self._layer(layer_number)
        cache.fill_prefill(local, request_id, k, v, positions)

    def view(self, layer_number: int, request_ids: Sequence[Hashable]) -> LayerCacheView:
        cache, local = self._layer(layer_number)
        return cache.view(local, request_ids)

    def views(self, request_ids: Sequence[Hashable], positions: Optional[Sequence[Sequence[int]]] = None,
              num_rows: Optional[int] = None) -> dict[int, LayerCacheView]:
        """``PagedKVCache.views`` of both caches (a step planned once per cache), keyed by model layer number."""
        by_cache = {id(cache): cache.views(request_ids, positions, num_rows) for cache in self._caches}
        return {number: by_cache[id(cache)][local] for number, (cache, local) in self._home.items()}
