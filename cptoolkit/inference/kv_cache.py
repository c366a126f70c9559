"""Paged KV cache holding one DCP rank's shard of every request's keys and values.

Decode context parallelism shards each request's sequence over the ``dcp_size`` members of a DCP
group: token position ``t`` belongs to shard ``(t // interleave) % dcp_size``, and the member whose
shard index is ``dcp_rank`` stores exactly those positions, in position order. Inside a shard,
position ``t`` lives at slot ``(t // (interleave·dcp_size))·interleave + t % interleave``, so a
shard's slots are dense and a decode step's new token always lands at slot ``shard_len``. These
rules are ``cptoolkit.layers.dcp_decode``'s ``shard_of_position`` / ``slot_of_position``, used here.

Storage is one tensor ``[num_layers, 2 (k, v), num_blocks, num_kv_heads, block_size, head_dim]``, or with
``values_are_keys`` (multi-head latent attention, whose one latent per token serves as key and value)
``[num_layers, 1, ...]``: the keys alone, read back as both.
A request gets a block table (a list of block ids shared by all layers) when it is admitted, large
enough for the *fullest* shard's share of ``max_total_len`` on every member, so every member's
``BlockPool`` makes the same decisions (``block_pool``): admission either reserves everything the
request will ever need or raises ``KVCacheFull``, so decoding never runs out of blocks midway and
nothing is ever truncated. Each layer keeps its own stored-token count per request, because the
layers of one decode step append one after another.

Prefix caching (``add_request(..., prefix_keys=...)``, ``register_pages``): block ``j`` of a request
holds this member's share of page ``j`` (positions ``[j, j+1) * page_tokens``, ``page_tokens =
block_size * dcp_size``; needs ``block_size % interleave == 0``), so a cached page is reused by
putting its block in the new request's table; the request then starts with ``reused_pages *
block_size`` tokens stored on every layer.

Sliding-window layers (``ring_slots``): a request then reserves only ``ceil(ring_slots / block_size)`` blocks
(``ring_blocks``), used as a ring: slot ``s`` lives in block ``block_ids[(s // block_size) % ring_blocks]``, so
slot ``s`` overwrites slot ``s - ring_capacity`` (``ring_capacity = ring_blocks * block_size``). The caller
sizes ``ring_slots`` to hold every slot a window of the longest step can see (``window_ring_slots``); ``read``
then returns the last ``ring_capacity`` slots, column 0 holding slot ``first_slots()``. Every member computes
the same reservation from the same arguments, so the cache of a windowed layer stays bounded as the context
grows without any communication. Prefix pages cannot be shared from a ring (their blocks are overwritten), so
``ring_slots`` and ``prefix_keys`` exclude each other.

Layers are named by megatron-core's ``layer_number`` (1 .. num_layers), as the attention layers name
them. ``view(layer_number, request_ids)`` returns the ``LayerCacheView`` that DCP decode attention uses
for one layer and one batch: ``append`` stores the new token of the requests this shard owns and ignores the
rest; ``read`` gathers the batch's shard into contiguous right-padded tensors. No collective runs
here: every DCP member calls the same methods with the same arguments and keeps its own shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

# The one definition of the DCP token layout, shared with decode attention (see its glossary).
from cptoolkit.layers.dcp_decode import shard_length, shard_of_position, slot_of_position
from cptoolkit.inference.block_pool import BlockPool, PageKey

__all__ = ["KVCacheFull", "LayerCacheView", "PagedKVCache"]


class KVCacheFull(RuntimeError):
    """A request cannot be admitted: this rank has too few free blocks for its shard."""


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def window_ring_slots(window: int, step_tokens: int, dcp_size: int, interleave: int) -> int:
    """Shard slots a windowed layer must keep per request: any ``window - 1 + step_tokens`` consecutive
    positions (a step of ``step_tokens`` new tokens, written before they attend, and the window behind its
    first one) put at most ``interleave * (ceil(n / (interleave * dcp_size)) + 1)`` of them on one shard."""
    span = window - 1 + step_tokens
    return interleave * (-(-span // (interleave * dcp_size)) + 1)


def _require(condition: bool, field: str, value, rule: str) -> None:
    if not condition:
        raise ValueError(f"{field} = {value!r} is invalid: {rule}")


@dataclass
class _RequestState:
    """One admitted request: its reserved blocks and, per layer, how many shard tokens it stores."""

    max_total_len: int
    block_ids: torch.Tensor   # [num_reserved_blocks] int64
    shard_lens: torch.Tensor  # [num_layers] int64
    written: torch.Tensor     # [num_layers] int64: the most slots ever stored (truncation lowers only shard_lens)


class PagedKVCache:
    """One DCP member's paged shard of the KV cache of every layer and every running request.

    ``num_kv_heads`` is the number of KV heads this rank stores (the KV heads of its DCP group's
    query heads); ``num_blocks`` blocks of ``block_size`` tokens are allocated up front for each of
    ``num_layers`` layers, for both K and V (for K alone with ``values_are_keys``: every ``v`` given must
    then equal its ``k``, and ``read`` returns the keys as the values). With ``ring_slots`` every request
    keeps only its latest slots in a ring of blocks (sliding-window layers; the module docstring).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, num_blocks: int,
                 dcp_rank: int, dcp_size: int, interleave: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", values_are_keys: bool = False,
                 ring_slots: int | None = None):
        for field, value in [("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                             ("block_size", block_size), ("num_blocks", num_blocks), ("dcp_size", dcp_size),
                             ("interleave", interleave)]:
            _require(isinstance(value, int) and value >= 1, field, value, "it must be an integer >= 1")
        _require(isinstance(dcp_rank, int) and 0 <= dcp_rank < dcp_size, "dcp_rank", dcp_rank,
                 f"it must be an integer in [0, dcp_size) = [0, {dcp_size})")
        _require(ring_slots is None or (isinstance(ring_slots, int) and ring_slots >= 1), "ring_slots", ring_slots,
                 "it must be an integer >= 1 (shard slots a windowed layer keeps per request) or None")
        self.ring_blocks = None if ring_slots is None else _blocks_for(ring_slots, block_size)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.num_blocks = block_size, num_blocks
        self.dcp_rank, self.dcp_size, self.interleave = dcp_rank, dcp_size, interleave
        self.dtype, self.device = dtype, torch.device(device)
        self.values_are_keys = values_are_keys
        planes = 1 if values_are_keys else 2
        self.storage = torch.zeros(num_layers, planes, num_blocks, num_kv_heads, block_size, head_dim,
                                   dtype=dtype, device=self.device)
        self.pool = BlockPool(num_blocks)
        self._requests: dict[Hashable, _RequestState] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new request can get: free ones plus cached pages nobody holds (evictable)."""
        return self.pool.num_available

    @property
    def page_tokens(self) -> int:
        """Positions per prefix-cache page: one block on every DCP member."""
        return self.block_size * self.dcp_size

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block id across all layers, K and V (K alone with ``values_are_keys``)."""
        return self.storage[:, :, 0].numel() * self.storage.element_size()

    @property
    def bytes_per_rank(self) -> int:
        """Bytes of KV storage allocated on this rank."""
        return self.num_blocks * self.bytes_per_block

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks currently reserved by admitted requests."""
        return (self.num_blocks - self.num_free_blocks) * self.bytes_per_block

    def blocks_for(self, max_total_len: int) -> int:
        """Blocks every member reserves for a ``max_total_len``-token request: the fullest shard's (shard 0), at
        most ``ring_blocks``."""
        blocks = _blocks_for(shard_length(max_total_len, 0, self.dcp_size, self.interleave), self.block_size)
        return blocks if self.ring_blocks is None else min(blocks, self.ring_blocks)

    def can_admit(self, max_total_len: int, prefix_keys: Sequence[PageKey] = ()) -> bool:
        """Whether ``add_request(..., max_total_len, prefix_keys)`` would find its blocks now."""
        reused = self.pool.match(prefix_keys)[:self.blocks_for(max_total_len)]
        return self.pool.can_allocate(self.blocks_for(max_total_len) - len(reused), reused)

    def add_request(self, request_id: Hashable, max_total_len: int, prefix_keys: Sequence[PageKey] = ()) -> int:
        """Reserve the blocks of a ``max_total_len``-token request; returns how many of its first pages
        came from the prefix cache (``prefix_keys``: ``block_pool.page_keys`` of the pages the caller
        would reuse; their tokens then count as stored on every layer).

        Raises ``KVCacheFull`` (nothing reserved) when too few blocks are free, so the engine can
        queue or reject the request; every DCP member must admit or refuse the same requests.
        """
        if request_id in self._requests:
            raise ValueError(f"request_id = {request_id!r} is already in the KV cache: free it first")
        _require(isinstance(max_total_len, int) and max_total_len >= 1, "max_total_len", max_total_len,
                 "it must be an integer >= 1 (prompt length + max_new_tokens)")
        if prefix_keys and self.ring_blocks is not None:
            raise ValueError(f"prefix_keys given to a ring cache (ring_slots, {self.ring_blocks} blocks per "
                             "request): a windowed layer's ring overwrites its pages, so none can be shared")
        if prefix_keys and self.block_size % self.interleave:
            raise ValueError(f"prefix caching needs block_size ({self.block_size}) to be a multiple of "
                             f"interleave ({self.interleave}) so that a page fills one block on every member")
        blocks_needed = self.blocks_for(max_total_len)
        reused = self.pool.match(prefix_keys)[:blocks_needed]
        if not self.pool.can_allocate(blocks_needed - len(reused), reused):
            raise KVCacheFull(
                f"KV cache full on DCP rank {self.dcp_rank}: request {request_id!r} needs {blocks_needed} "
                f"blocks (max_total_len = {max_total_len}), {len(reused)} of them cached, but only "
                f"{self.num_free_blocks} of {self.num_blocks} blocks are free; queue it until a request "
                f"finishes, or raise num_blocks")
        self.pool.acquire(reused)
        block_ids = reused + self.pool.allocate(blocks_needed - len(reused))
        stored = torch.full((self.num_layers,), len(reused) * self.block_size, dtype=torch.int64, device=self.device)
        self._requests[request_id] = _RequestState(
            max_total_len=max_total_len, block_ids=torch.tensor(block_ids, dtype=torch.int64, device=self.device),
            shard_lens=stored, written=stored.clone())
        return len(reused)

    def register_pages(self, request_id: Hashable, keys: Sequence[PageKey]) -> None:
        """Offer the request's first ``len(keys)`` pages (fully stored on every layer) to the prefix cache."""
        state = self._state(request_id)
        for block, key in zip(state.block_ids.tolist(), keys):
            self.pool.register(block, key)

    def free_request(self, request_id: Hashable) -> None:
        """Release a finished request's blocks (cached pages stay reusable until evicted)."""
        state = self._state(request_id)
        self.pool.release(state.block_ids.tolist())
        del self._requests[request_id]

    def truncate(self, request_id: Hashable, num_tokens: int) -> None:
        """Forget the request's tokens at positions ``>= num_tokens`` on every layer (speculative decoding's
        rejected drafts): each DCP member keeps ``shard_length(num_tokens)`` of its own, so all agree without
        communicating. The blocks stay reserved; later appends overwrite the forgotten slots."""
        state = self._state(request_id)
        keep = shard_length(num_tokens, self.dcp_rank, self.dcp_size, self.interleave)
        _require(0 <= keep <= int(state.shard_lens.min()), "truncate num_tokens", num_tokens,
                 f"must be >= 0 and keep no more than the {int(state.shard_lens.min())} tokens shard "
                 f"{self.dcp_rank} stores on every layer")
        state.shard_lens.fill_(keep)

    def shard_len(self, layer_number: int, request_id: Hashable) -> int:
        """Tokens of ``request_id`` stored on this rank for layer ``layer_number``."""
        return int(self._state(request_id).shard_lens[self._layer_index(layer_number)])

    def fill_prefill(self, layer_number: int, request_id: Hashable, k: torch.Tensor, v: torch.Tensor,
                     positions: torch.Tensor) -> None:
        """Store the prompt K/V ``[num_kv_heads, n, head_dim]`` at ``positions [n]`` that this shard owns.

        Positions of other shards are ignored, so callers may pass the whole prompt or only part of
        it; the owned positions must continue this rank's stored sequence without gaps or repeats
        (several calls may fill a prompt chunk by chunk, in order).
        """
        self._check_kv(k, v, positions, "fill_prefill", (self.num_kv_heads, positions.numel(), self.head_dim))
        layer = self._layer_index(layer_number)
        state = self._state(request_id)
        owned = shard_of_position(positions, self.dcp_size, self.interleave) == self.dcp_rank
        slots = slot_of_position(positions[owned], self.dcp_size, self.interleave)
        start = int(state.shard_lens[layer])
        expected = torch.arange(start, start + slots.numel(), device=slots.device)
        if not torch.equal(slots.sort().values, expected):
            raise ValueError(
                f"fill_prefill: the positions of shard {self.dcp_rank} given for request {request_id!r} must "
                f"continue its stored sequence at shard slot {start} without gaps or repeats; got slots "
                f"{slots.tolist()}: pass every position of the prompt once, in order of chunks")
        self._check_within_reservation(request_id, state, positions[owned])
        k_owned, v_owned = k[:, owned].transpose(0, 1), v[:, owned].transpose(0, 1)
        end, capacity = start + slots.numel(), state.block_ids.numel() * self.block_size
        live = slots >= end - capacity  # a ring keeps the latest ``capacity`` slots; the rest is never written
        self._write(layer, state.block_ids[(slots[live] // self.block_size) % state.block_ids.numel()],
                    slots[live] % self.block_size, k_owned[live], v_owned[live])
        state.shard_lens[layer] = end
        state.written[layer] = max(int(state.written[layer]), end)

    def view(self, layer_number: int, request_ids: Sequence[Hashable]) -> "LayerCacheView":
        """The cache of layer ``layer_number`` for one batch (``request_ids`` in batch order)."""
        return LayerCacheView(self, self._layer_index(layer_number), list(request_ids))

    def _layer_index(self, layer_number: int) -> int:
        _require(1 <= layer_number <= self.num_layers, "layer_number", layer_number,
                 f"it must be in [1, {self.num_layers}] (megatron-core numbers layers from 1)")
        return layer_number - 1

    def _state(self, request_id: Hashable) -> _RequestState:
        if request_id not in self._requests:
            raise KeyError(f"request {request_id!r} is not in the KV cache of DCP rank {self.dcp_rank}: "
                           f"call add_request first")
        return self._requests[request_id]

    def _check_kv(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, caller: str,
                  expected_shape: tuple[int, ...]) -> None:
        if positions.dim() != 1 or positions.dtype != torch.int64:
            raise ValueError(f"{caller}: positions must be a 1-D int64 tensor; "
                             f"got shape {list(positions.shape)}, dtype {positions.dtype}")
        if tuple(k.shape) != expected_shape or k.shape != v.shape:
            raise ValueError(f"{caller}: k and v must both have shape {list(expected_shape)}; "
                             f"got k {list(k.shape)}, v {list(v.shape)}")
        if self.values_are_keys and v is not k and not torch.equal(k, v):
            raise ValueError(f"{caller}: this cache stores latents (values_are_keys), so v must equal k")

    def _check_within_reservation(self, request_id: Hashable, state: _RequestState,
                                  owned_positions: torch.Tensor) -> None:
        if owned_positions.numel() and int(owned_positions.max()) >= state.max_total_len:
            raise ValueError(f"request {request_id!r}: position {int(owned_positions.max())} is beyond its "
                             f"max_total_len = {state.max_total_len} given to add_request")

    def _write(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, k_tokens: torch.Tensor,
               v_tokens: torch.Tensor) -> None:
        """Write token ``i`` of ``k_tokens``/``v_tokens [n, num_kv_heads, head_dim]`` at offset ``offsets[i]``
        of block ``blocks[i]``."""
        self.storage[layer, 0, blocks, :, offsets] = k_tokens.to(self.dtype)
        if not self.values_are_keys:
            self.storage[layer, 1, blocks, :, offsets] = v_tokens.to(self.dtype)


class LayerCacheView:
    """One layer's shard cache for one decode batch: the cache protocol of DCP decode attention.

    The batch's block tables are padded to ``[b, max_reserved_blocks]`` once, at construction;
    padding entries point at block 0 and are never read unmasked.
    """

    def __init__(self, cache: PagedKVCache, layer: int, request_ids: list[Hashable]):
        self.cache, self.layer, self.request_ids = cache, layer, request_ids
        self._states = [cache._state(request_id) for request_id in request_ids]
        max_blocks = max((state.block_ids.numel() for state in self._states), default=0)
        self._block_table = torch.zeros(len(request_ids), max_blocks, dtype=torch.int64, device=cache.device)
        for row, state in enumerate(self._states):
            self._block_table[row, :state.block_ids.numel()] = state.block_ids
        self._table_blocks = torch.tensor([state.block_ids.numel() for state in self._states], dtype=torch.int64,
                                          device=cache.device)  # [b]: a row's slot s is in block s // bs % this
        self._max_total_lens = torch.tensor([state.max_total_len for state in self._states], dtype=torch.int64,
                                            device=cache.device)

    def shard_lens(self) -> torch.Tensor:
        """``[b]`` int64: tokens of each request of the batch stored on this rank for this layer."""
        return torch.stack([state.shard_lens[self.layer] for state in self._states]) if self._states \
            else torch.zeros(0, dtype=torch.int64, device=self.cache.device)

    def first_slots(self) -> torch.Tensor:
        """``[b]`` int64: the shard slot ``read`` returns in column 0 (``ShardedKVCache.first_slots``): 0, or in a
        ring the oldest slot it still holds (truncated drafts overwrote the slots one ring before them)."""
        written = torch.stack([state.written[self.layer] for state in self._states]) if self._states \
            else torch.zeros(0, dtype=torch.int64, device=self.cache.device)
        return (written - self._table_blocks * self.cache.block_size).clamp(min=0).minimum(self.shard_lens())

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor) -> None:
        """Store each request's new tokens ``k_new, v_new [b, num_kv_heads, L, head_dim]`` at ``positions``
        (``[b]`` for ``L = 1``, else ``[b, L]``, consecutive) where this shard owns them; tokens of other shards
        are ignored.

        Each owned position must be the request's next shard slot (no decode step skipped or repeated).
        Every position must be below its request's ``max_total_len`` on every rank, owned or not, so
        a sequence too long for the cache fails on all DCP members alike instead of leaving the
        others waiting in the next collective.
        """
        cache = self.cache
        batch, num_new = len(self.request_ids), k_new.shape[2] if k_new.dim() == 4 else 1
        positions_2d = positions.unsqueeze(1) if positions.dim() == 1 else positions
        _require(positions_2d.shape == (batch, num_new), "append positions.shape", tuple(positions.shape),
                 f"it must be [{batch}] or [{batch}, {num_new}]: one position per new token of the batch")
        cache._check_kv(k_new, v_new, positions_2d.flatten(), "append",
                        (batch, cache.num_kv_heads, num_new, cache.head_dim))
        owned = shard_of_position(positions_2d, cache.dcp_size, cache.interleave) == cache.dcp_rank
        slots = slot_of_position(positions_2d, cache.dcp_size, cache.interleave)
        lens = self.shard_lens()
        next_slots = lens[:, None] + torch.cumsum(owned, dim=1) - 1  # where each owned token must land
        self._check_next_slot((owned & (slots != next_slots)).any(1), lens, slots, positions_2d)
        self._check_next_slot((positions_2d >= self._max_total_lens[:, None]).any(1), lens, slots, positions_2d)
        rows, columns = torch.nonzero(owned, as_tuple=True)
        token_slots = slots[rows, columns]
        blocks = self._block_table[rows, (token_slots // cache.block_size) % self._table_blocks[rows]]
        cache._write(self.layer, blocks,
                     token_slots % cache.block_size, k_new[rows, :, columns], v_new[rows, :, columns])
        for row, count in enumerate(owned.sum(1).tolist()):
            state = self._states[row]
            state.shard_lens[self.layer] += count
            state.written[self.layer] = torch.maximum(state.written[self.layer], state.shard_lens[self.layer])

    def _check_next_slot(self, bad: torch.Tensor, lens: torch.Tensor, slots: torch.Tensor,
                         positions: torch.Tensor) -> None:
        """Raise for the first request flagged in ``bad [b]``: its owned position is not its next slot
        (a decode step skipped or repeated) or lies beyond its reservation."""
        if not bool(bad.any()):
            return
        row = int(torch.nonzero(bad)[0])
        got = (f"position {int(positions[row, 0])}, slot {int(slots[row, 0])}" if positions.shape[1] == 1 else
               f"positions {positions[row].tolist()}, slots {slots[row].tolist()}")
        raise ValueError(
            f"append: request {self.request_ids[row]!r} stores {int(lens[row])} tokens on shard "
            f"{self.cache.dcp_rank} of layer {self.layer} (max_total_len = {int(self._max_total_lens[row])}), "
            f"so its next owned position must map to slot {int(lens[row])} and be < max_total_len; got {got}")

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's stored tokens of every request of the batch, in position order.

        Returns ``(k_shard, v_shard, shard_lens)``: ``k_shard, v_shard [b, num_kv_heads, s_max, head_dim]``
        right-padded with zeros to ``s_max = max(shard_lens)`` (``s_max`` may be 0), and
        ``shard_lens [b]`` int64. The tensors are fresh copies gathered from the blocks. In a ring cache
        column 0 is slot ``first_slots()`` and ``shard_lens`` counts the columns held.
        """
        cache = self.cache
        if cache.ring_blocks is not None:
            return self._read_ring()
        lens = self.shard_lens()
        batch = len(self.request_ids)
        s_max = int(lens.max()) if batch else 0
        num_blocks = _blocks_for(s_max, cache.block_size)
        # [planes, b, num_blocks, hkv, block_size, d] -> [planes, b, hkv, num_blocks * block_size, d]
        gathered = cache.storage[self.layer][:, self._block_table[:, :num_blocks]]
        kv = gathered.permute(0, 1, 3, 2, 4, 5).reshape(
            cache.storage.shape[1], batch, cache.num_kv_heads, num_blocks * cache.block_size,
            cache.head_dim)[:, :, :, :s_max]
        valid = torch.arange(s_max, device=cache.device) < lens.to(cache.device)[:, None]
        kv = kv.masked_fill(~valid[None, :, None, :, None], 0)
        return kv[0], kv[-1], lens

    def _read_ring(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``read`` of a ring cache: each request's held slots ``[first_slots, shard_lens)``, token by token."""
        cache = self.cache
        first = self.first_slots()
        lens = self.shard_lens() - first
        s_max = int(lens.max()) if len(self.request_ids) else 0
        columns = torch.arange(s_max, device=cache.device)
        slots = first[:, None] + columns  # [b, s_max]
        blocks = self._block_table.gather(1, (slots // cache.block_size) % self._table_blocks[:, None])
        # the two index tensors, split by a slice, lead: [b, s_max, planes, hkv, d] -> [planes, b, hkv, s_max, d]
        kv = cache.storage[self.layer][:, blocks, :, slots % cache.block_size].permute(2, 0, 3, 1, 4)
        kv = kv.masked_fill(~(columns < lens[:, None])[None, :, None, :, None], 0)
        return kv[0], kv[-1], lens
