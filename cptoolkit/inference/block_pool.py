"""KV block bookkeeping: free blocks, reference counts, and the prefix cache. No tensors, no collectives.

Every DCP member runs the same pool operations in the same order (the engine decides admission the same
way on every rank, and every member reserves the *fullest* shard's block count), so block ids, hits and
evictions are identical on every member without communication.

Prefix caching: a *page* is ``block_size * dcp_size`` consecutive positions starting at a multiple of
that size; with ``block_size % interleave == 0`` every DCP member stores exactly ``block_size`` of a
page's tokens, in its block number ``page`` of the request's table. A full page is keyed by
``page_keys``: a hash chain over every token up to the page's end, so equal keys mean equal tokens at
equal positions, i.e. equal K/V on every layer. Released blocks that hold a keyed page stay cached,
least recently used first in line for eviction when the free list runs out.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

PageKey = bytes


def page_keys(token_ids: Sequence[int], page_tokens: int, num_pages: int) -> list[PageKey]:
    """Keys of the first ``num_pages`` full pages of ``token_ids`` (``page_tokens`` tokens each)."""
    if num_pages * page_tokens > len(token_ids):
        raise ValueError(f"num_pages = {num_pages}: {num_pages} pages of {page_tokens} tokens need "
                         f"{num_pages * page_tokens} tokens, the sequence has {len(token_ids)}")
    keys, previous = [], b""
    for page in range(num_pages):
        tokens = token_ids[page * page_tokens:(page + 1) * page_tokens]
        previous = hashlib.blake2b(previous + b"|" + ",".join(map(str, tokens)).encode(), digest_size=16).digest()
        keys.append(previous)
    return keys


class BlockPool:
    """``num_blocks`` block ids handed out and taken back, with reference counts and cached pages.

    A block is *free* (no owner, no cached page), *in use* (reference count > 0) or *evictable*
    (count 0 but holding a cached page: reused by a hit, reclaimed LRU-first by ``allocate``).
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks))
        self._refs: dict[int, int] = {}
        self._block_of_key: dict[PageKey, int] = {}
        self._key_of_block: dict[int, PageKey] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_available(self) -> int:
        """Blocks ``allocate`` can hand out now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        return len(self._block_of_key)

    def match(self, keys: Sequence[PageKey]) -> list[int]:
        """Blocks of the longest run of ``keys`` that is cached, from the first key on."""
        blocks = []
        for key in keys:
            if key not in self._block_of_key:
                break
            blocks.append(self._block_of_key[key])
        return blocks

    def can_allocate(self, num_new: int, reused: Sequence[int]) -> bool:
        """Whether ``acquire(reused)`` then ``allocate(num_new)`` would succeed."""
        reused_evictable = sum(block in self._evictable for block in reused)
        return num_new <= self.num_available - reused_evictable

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take one more reference on each (cached) block."""
        for block in blocks:
            self._evictable.pop(block, None)
            self._refs[block] = self._refs.get(block, 0) + 1

    def allocate(self, num_new: int) -> list[int]:
        """``num_new`` fresh blocks (reference count 1), evicting least recently used cached pages when
        the free list runs out. Raises ``ValueError`` when fewer are available (check ``can_allocate``)."""
        if num_new > self.num_available:
            raise ValueError(f"allocate({num_new}): only {self.num_available} of {self.num_blocks} blocks "
                             f"are free or evictable")
        blocks = self._free[:num_new]
        del self._free[:num_new]
        while len(blocks) < num_new:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of_key[self._key_of_block.pop(block)]
            blocks.append(block)
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; a block nobody holds becomes evictable (if it caches a
        page; most recently used last) or free."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                del self._refs[block]
                if block in self._key_of_block:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def register(self, block: int, key: PageKey) -> None:
        """Cache ``block`` (in use, holding a full page) under ``key``; a key already cached keeps its block."""
        if key in self._block_of_key or block in self._key_of_block:
            return
        self._block_of_key[key] = block
        self._key_of_block[block] = key
