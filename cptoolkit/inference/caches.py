"""The engine's KV caches behind one protocol: the target model's cache and, with a draft model, the draft's.

``target`` is this rank's shard of the target model's cache: a ``PagedKVCache``, or a ``HybridKVCache`` (full and
windowed layers) that answers the same calls. ``draft`` (speculative decoding with a draft model) is the
``DraftModel``, which owns the draft's own ``PagedKVCache``. Every reservation (admission, page registration,
freeing) goes to both with the same arguments in the same order, so the draft's ``BlockPool`` stays in the
target's state after every call: it admits exactly the requests the target's admits and reuses the same pages
(``draft_model``). Admission is decided on the target's cache alone for that reason. Callers never ask whether a
draft model exists.
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence

import torch

from cptoolkit.inference.block_pool import PageKey
from cptoolkit.inference.draft_model import DraftModel
from cptoolkit.inference.hybrid_cache import HybridKVCache
from cptoolkit.inference.kv_cache import LayerCacheView, PagedKVCache
from cptoolkit.inference.request import Request


class EngineCaches:
    """The target's cache (``target``) and the optional ``draft`` model's, reserved in lock step."""

    def __init__(self, target: PagedKVCache | HybridKVCache, draft: Optional[DraftModel] = None):
        self.target, self.draft = target, draft

    @property
    def device(self) -> torch.device:
        return self.target.device

    def can_admit(self, max_total_len: int, prefix_keys: Sequence[PageKey]) -> bool:
        """Whether the target's cache has the blocks (the draft's, in the same state, has them too)."""
        return self.target.can_admit(max_total_len, prefix_keys)

    def add_request(self, request_id: Hashable, max_total_len: int, prefix_keys: Sequence[PageKey]) -> int:
        """Reserve the request's blocks in every cache; returns the prompt tokens served by reused pages."""
        reused_pages = self.target.add_request(request_id, max_total_len, prefix_keys)
        if self.draft is not None:
            self.draft.add_request(request_id, max_total_len, prefix_keys)
        return reused_pages * self.target.page_tokens

    def register_pages(self, request_id: Hashable, keys: Sequence[PageKey]) -> None:
        """Offer the request's full prompt pages (``keys``) for reuse, in every cache."""
        self.target.register_pages(request_id, keys)
        if self.draft is not None:
            self.draft.register_pages(request_id, keys)

    def free_request(self, request_id: Hashable) -> None:
        self.target.free_request(request_id)
        if self.draft is not None:
            self.draft.free_request(request_id)

    def keep(self, requests: Sequence[Request]) -> None:
        """After a verification: forget the K/V of each request's rejected drafts. The target keeps ``total_len -
        1`` positions (the last token is fed at the next step), the draft what it cached of those
        (``DraftModel.keep``)."""
        for request in requests:
            self.target.truncate(request.request_id, request.total_len - 1)
            if self.draft is not None:
                self.draft.keep(request.request_id, request.total_len)

    def views(self, request_ids: Sequence[Hashable], positions: Optional[Sequence[Sequence[int]]] = None,
              num_rows: Optional[int] = None) -> dict[int, LayerCacheView]:
        """``{layer_number: view}`` of the target's cache for this batch; with the step's ``positions [b][L]`` the
        step is planned once for every layer, padded to ``num_rows`` rows (``PagedKVCache.views``)."""
        return self.target.views(request_ids, positions, num_rows)
