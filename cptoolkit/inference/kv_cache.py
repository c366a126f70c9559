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

The decode hot path never waits on the device: the books (block ids, stored tokens per layer) are host integers,
and ``views(request_ids, positions)`` plans a step once, before the forward, from the positions the engine already
knows (``DecodeStepPlan``: where each owned new token goes, and the gather index of the shard after the append).
Every layer's ``append`` is then one indexed write and its ``read`` one gather through that index; the checks of
a position (next slot, ``max_total_len``) run there, once per step.

Static shapes: a step writes every one of its tokens, those this shard does not keep into a scratch block (one
block past ``num_blocks``, never handed out), so the write's shape is the batch's, not the count of owned tokens;
and a step may be padded to a fixed number of rows (``views(..., num_rows=...)``), whose padding rows keep nothing
and read nothing. The tensors of a step then depend only on its padded batch size and the read width ``s_max``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import torch

# The one definition of the DCP token layout, shared with decode attention (see its glossary).
from cptoolkit.layers.dcp_decode import shard_length, shard_of_position, slot_of_position
from cptoolkit.inference.block_pool import BlockPool, PageKey

__all__ = ["DecodeStepPlan", "KVCacheFull", "LayerCacheView", "PagedKVCache"]


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
    """One admitted request: its reserved blocks and, per layer, how many shard tokens it stores. Host integers
    only, so that planning a step and keeping its books never waits on the device."""

    max_total_len: int
    block_ids: tuple[int, ...]  # [num_reserved_blocks]
    shard_lens: list[int]       # [num_layers]
    written: list[int]          # [num_layers]: the most slots ever stored (truncation lowers only shard_lens)


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
        # One block more than the pool hands out: the scratch block, where a step writes the tokens no request of
        # this shard keeps (other shards' tokens, padding rows), so every step writes all of its tokens.
        self.scratch_block = num_blocks
        self.storage = torch.zeros(num_layers, planes, num_blocks + 1, num_kv_heads, block_size, head_dim,
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
        """Bytes of the ``num_blocks`` blocks requests can hold on this rank (the storage has one scratch block
        more)."""
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
        stored = [len(reused) * self.block_size] * self.num_layers
        self._requests[request_id] = _RequestState(max_total_len=max_total_len, block_ids=tuple(block_ids),
                                                   shard_lens=stored, written=list(stored))
        return len(reused)

    def register_pages(self, request_id: Hashable, keys: Sequence[PageKey]) -> None:
        """Offer the request's first ``len(keys)`` pages (fully stored on every layer) to the prefix cache."""
        state = self._state(request_id)
        for block, key in zip(state.block_ids, keys):
            self.pool.register(block, key)

    def free_request(self, request_id: Hashable) -> None:
        """Release a finished request's blocks (cached pages stay reusable until evicted)."""
        state = self._state(request_id)
        self.pool.release(list(state.block_ids))
        del self._requests[request_id]

    def truncate(self, request_id: Hashable, num_tokens: int) -> None:
        """Forget the request's tokens at positions ``>= num_tokens`` on every layer (speculative decoding's
        rejected drafts): each DCP member keeps ``shard_length(num_tokens)`` of its own, so all agree without
        communicating. The blocks stay reserved; later appends overwrite the forgotten slots."""
        state = self._state(request_id)
        keep = shard_length(num_tokens, self.dcp_rank, self.dcp_size, self.interleave)
        _require(0 <= keep <= min(state.shard_lens), "truncate num_tokens", num_tokens,
                 f"must be >= 0 and keep no more than the {min(state.shard_lens)} tokens shard "
                 f"{self.dcp_rank} stores on every layer")
        state.shard_lens[:] = [keep] * self.num_layers

    def shard_len(self, layer_number: int, request_id: Hashable) -> int:
        """Tokens of ``request_id`` stored on this rank for layer ``layer_number``."""
        return self._state(request_id).shard_lens[self._layer_index(layer_number)]

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
        owned_positions, k_owned, v_owned = keep_where(owned, positions, k.transpose(0, 1), v.transpose(0, 1))
        slots = slot_of_position(owned_positions, self.dcp_size, self.interleave)
        start = state.shard_lens[layer]
        expected = torch.arange(start, start + slots.numel(), device=slots.device)
        if not torch.equal(slots.sort().values, expected):
            raise ValueError(
                f"fill_prefill: the positions of shard {self.dcp_rank} given for request {request_id!r} must "
                f"continue its stored sequence at shard slot {start} without gaps or repeats; got slots "
                f"{slots.tolist()}: pass every position of the prompt once, in order of chunks")
        self._check_within_reservation(request_id, state, owned_positions)
        end, capacity = start + slots.numel(), len(state.block_ids) * self.block_size
        live = slots >= end - capacity  # a ring keeps the latest ``capacity`` slots; the rest is never written
        block_ids = torch.tensor(state.block_ids, dtype=torch.int64, device=self.device)
        slots, k_live, v_live = keep_where(live, slots, k_owned, v_owned)
        self._write(layer, block_ids[(slots // self.block_size) % len(state.block_ids)], slots % self.block_size,
                    k_live, v_live)
        state.shard_lens[layer] = end
        state.written[layer] = max(state.written[layer], end)

    def view(self, layer_number: int, request_ids: Sequence[Hashable]) -> "LayerCacheView":
        """The cache of layer ``layer_number`` for one batch (``request_ids`` in batch order), planning each
        ``append`` from the positions it is given (one host read of them per call)."""
        return LayerCacheView(self, self._layer_index(layer_number), list(request_ids))

    def views(self, request_ids: Sequence[Hashable], positions: Optional[Sequence[Sequence[int]]] = None,
              num_rows: Optional[int] = None) -> dict[int, "LayerCacheView"]:
        """``{layer_number: view}`` of every layer for one batch. With ``positions`` (``[b][L]`` host integers: the
        positions the step's forward will append), the step is planned once here (``plan_step``) and every view
        appends and reads through that one plan, without a host round-trip; ``num_rows`` (>= b, default b) pads
        the step with rows of no request (``plan_step``)."""
        ids = list(request_ids)
        plan = None if positions is None else self.plan_step(ids, positions, num_rows)
        return {layer + 1: LayerCacheView(self, layer, ids, plan) for layer in range(self.num_layers)}

    def plan_step(self, request_ids: Sequence[Hashable], positions: Sequence[Sequence[int]],
                  num_rows: Optional[int] = None) -> "DecodeStepPlan":
        """The ``DecodeStepPlan`` of appending ``positions [b][L]`` (host integers, consecutive per request) to
        every layer: all of them must then hold the same tokens of each request (true between steps). Raises
        ``ValueError`` for a position that is not its request's next or lies beyond its ``max_total_len``.
        With ``num_rows > b`` the step has ``num_rows - b`` padding rows after the requests' (a batch padded to a
        static size): their tokens go to the scratch block and they read nothing."""
        num_rows = len(request_ids) if num_rows is None else num_rows
        _require(isinstance(num_rows, int) and num_rows >= len(request_ids), "num_rows", num_rows,
                 f"it must be an integer >= the {len(request_ids)} requests of the step")
        states = [self._state(request_id) for request_id in request_ids]
        for request_id, state in zip(request_ids, states):
            if len(set(state.shard_lens)) != 1 or len(set(state.written)) != 1:
                raise ValueError(f"plan_step: request {request_id!r} stores {state.shard_lens} tokens per layer on "
                                 f"shard {self.dcp_rank}; a step is planned once for every layer, so every layer "
                                 "must hold the same tokens (finish its prefill first)")
        return DecodeStepPlan.build(self, list(request_ids), states, 0, [list(row) for row in positions],
                                    num_rows - len(request_ids))

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



def keep_where(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``tensors``' entries along dim 0 where the bool ``mask`` (as long as that dim) is True: the tensors
    themselves, uncopied, when every entry is kept (a prefill's usual case: every token real, owned and live), at
    one host read of the mask instead of a masked gather per tensor."""
    if bool(mask.all()):
        return tensors
    return tuple(t[mask] for t in tensors)


def _tensor(values: list, device: torch.device, *shape: int) -> torch.Tensor:
    """Host integers ``values`` as an int64 tensor of ``shape`` on ``device`` (one host-to-device copy)."""
    return torch.tensor(values, dtype=torch.int64, device=device).view(*shape)


@dataclass(frozen=True)
class _ReadIndex:
    """Where ``read`` finds a batch's held shard slots: column ``c`` of row ``i`` is slot ``first_slots[i] + c``.
    ``rows [planes * b * hkv * s_max]`` int64: for each (plane, row, KV head, column), in that order, its row of the
    layer's storage seen as ``[planes * (num_blocks + 1) * hkv * block_size, head_dim]``, so ``read`` is one
    ``index_select`` of whole ``head_dim`` rows straight into ``[planes, b, hkv, s_max, head_dim]``.
    ``hidden [1, b, 1, s_max, 1]`` bool marks the padding columns, ``c >= lens[i]``; ``lens``, ``first_slots [b]``
    int64. Tensors on the cache's device, ``s_max = max(lens)`` a host integer (0 for an empty batch);
    ``has_padding``: whether any row holds fewer than ``s_max`` (a host bool: without padding columns ``read`` has
    nothing to zero)."""

    rows: torch.Tensor
    hidden: torch.Tensor
    lens: torch.Tensor
    first_slots: torch.Tensor
    s_max: int
    has_padding: bool

    @classmethod
    def build(cls, cache: PagedKVCache, block_ids: list[tuple[int, ...]], shard_lens: list[int],
              written: list[int], num_pad: int = 0) -> "_ReadIndex":
        """The index of rows holding ``shard_lens[i]`` slots, ``written[i]`` the most ever stored: a ring holds the
        last ``len(block_ids[i]) * block_size`` of them (truncated drafts overwrote the slots one ring before);
        then ``num_pad`` padding rows that hold nothing (their table: the scratch block)."""
        block_ids = block_ids + [(cache.scratch_block,)] * num_pad
        shard_lens, written = shard_lens + [0] * num_pad, written + [0] * num_pad
        device, block_size, batch = cache.device, cache.block_size, len(block_ids)
        first = [min(max(w - len(ids) * block_size, 0), n) for ids, n, w in zip(block_ids, shard_lens, written)]
        lens = [n - f for n, f in zip(shard_lens, first)]
        s_max, width = max(lens, default=0), max(map(len, block_ids), default=0)
        table = _tensor([b for ids in block_ids for b in ids + (0,) * (width - len(ids))], device, batch, width)
        first_slots, held = _tensor(first, device, batch), _tensor(lens, device, batch)
        columns = torch.arange(s_max, device=device)
        slots = first_slots[:, None] + columns  # [b, s_max]
        table_blocks = _tensor([len(ids) for ids in block_ids], device, batch, 1)
        blocks = table.gather(1, (slots // block_size) % table_blocks) if width else torch.zeros_like(slots)
        planes, heads = cache.storage.shape[1], cache.num_kv_heads
        plane = torch.arange(planes, device=device).view(planes, 1, 1, 1)
        head = torch.arange(heads, device=device).view(1, 1, heads, 1)
        rows = ((plane * (cache.num_blocks + 1) + blocks[None, :, None]) * heads + head) * block_size \
            + (slots % block_size)[None, :, None]
        hidden = (columns >= held[:, None])[None, :, None, :, None]
        return cls(rows.flatten(), hidden, held, first_slots, s_max, any(n < s_max for n in lens))


@dataclass(frozen=True)
class DecodeStepPlan:
    """A step's appends to one ``PagedKVCache`` for a batch, planned on the host before the forward and shared by
    every layer (the layers of a step append the same positions).

    ``blocks``, ``offsets [num_rows * L]`` int64: where each new token of the step goes, row-major (row ``i``,
    token ``j`` at ``i * L + j``): its slot when this shard keeps it, else the scratch block (another shard's
    token, or a padding row's), so every step writes all its tokens and the write's shape depends on the batch
    size alone. ``before``/``shard_lens``/``written`` (``[b]`` host integers, the requests' rows): each request's
    stored tokens before and after the append, and the most slots ever stored after it; ``read``: the gather
    index of the shard after the append (``num_rows`` rows). ``num_new``: ``L``, the new tokens per request;
    ``num_rows``: the requests' rows and the padding rows after them.
    """

    blocks: torch.Tensor
    offsets: torch.Tensor
    before: tuple[int, ...]
    shard_lens: tuple[int, ...]
    written: tuple[int, ...]
    read: _ReadIndex
    num_new: int
    num_rows: int

    @classmethod
    def build(cls, cache: PagedKVCache, request_ids: list[Hashable], states: list[_RequestState], layer: int,
              positions: list[list[int]], num_pad: int = 0) -> "DecodeStepPlan":
        """Plan appending ``positions [b][L]`` to layer ``layer``'s ``states``, then ``num_pad`` padding rows. Each
        owned position must be its request's next shard slot (no decode step skipped or repeated), and every
        position below its request's ``max_total_len`` on every rank, owned or not, so a sequence too long for the
        cache fails on all DCP members alike instead of leaving the others waiting in the next collective."""
        blocks, offsets, ends = [], [], []
        for request_id, state, row_positions in zip(request_ids, states, positions):
            end = state.shard_lens[layer]
            slots = [slot_of_position(p, cache.dcp_size, cache.interleave) for p in row_positions]
            bad = any(p >= state.max_total_len for p in row_positions)
            for position, slot in zip(row_positions, slots):
                if shard_of_position(position, cache.dcp_size, cache.interleave) == cache.dcp_rank:
                    bad |= slot != end
                    blocks.append(state.block_ids[(slot // cache.block_size) % len(state.block_ids)])
                    offsets.append(slot % cache.block_size)
                    end += 1
                else:
                    blocks.append(cache.scratch_block)
                    offsets.append(0)
            if bad:
                got = (f"position {row_positions[0]}, slot {slots[0]}" if len(row_positions) == 1 else
                       f"positions {row_positions}, slots {slots}")
                stored = state.shard_lens[layer]
                raise ValueError(
                    f"append: request {request_id!r} stores {stored} tokens on shard {cache.dcp_rank} "
                    f"(max_total_len = {state.max_total_len}), so its next owned position must map to slot "
                    f"{stored} and be < max_total_len; got {got}")
            ends.append(end)
        num_new = len(positions[0]) if positions else 1
        blocks += [cache.scratch_block] * (num_pad * num_new)
        offsets += [0] * (num_pad * num_new)
        written = [max(state.written[layer], end) for state, end in zip(states, ends)]
        read = _ReadIndex.build(cache, [state.block_ids for state in states], ends, written, num_pad)
        return cls(_tensor(blocks, cache.device, len(blocks)), _tensor(offsets, cache.device, len(offsets)),
                   tuple(state.shard_lens[layer] for state in states), tuple(ends), tuple(written), read, num_new,
                   len(states) + num_pad)


class LayerCacheView:
    """One layer's shard cache for one batch: the cache protocol of DCP decode attention (``ShardedKVCache``).

    With a ``plan`` (``PagedKVCache.views``) the view's one ``append`` is one indexed write of the planned tokens
    and ``read`` gathers through the plan's index: no host round-trip. Without one, each ``append`` plans itself
    from its ``positions`` (read to the host, checked there) and ``read`` indexes the tokens stored now. The batch
    has ``num_rows`` rows: the requests' and, with a padded plan, padding rows that keep nothing.
    """

    def __init__(self, cache: PagedKVCache, layer: int, request_ids: list[Hashable],
                 plan: Optional[DecodeStepPlan] = None):
        self.cache, self.layer, self.request_ids, self._plan = cache, layer, request_ids, plan
        self.num_rows = len(request_ids) if plan is None else plan.num_rows
        self._states = [cache._state(request_id) for request_id in request_ids]
        self._appended: Optional[DecodeStepPlan] = None  # the plan of this view's last append

    def _index(self) -> _ReadIndex:
        """The read index of the tokens stored now: the last append's, unless the books moved since."""
        layer, plan = self.layer, self._appended
        if plan is not None and all(state.shard_lens[layer] == n and state.written[layer] == w
                                    for state, n, w in zip(self._states, plan.shard_lens, plan.written)):
            return plan.read
        return _ReadIndex.build(self.cache, [state.block_ids for state in self._states],
                                [state.shard_lens[layer] for state in self._states],
                                [state.written[layer] for state in self._states], self.num_rows - len(self._states))

    def first_slots(self) -> torch.Tensor:
        """``[b]`` int64: the shard slot ``read`` returns in column 0 (``ShardedKVCache.first_slots``): 0, or in a
        ring the oldest slot it still holds (truncated drafts overwrote the slots one ring before them)."""
        return self._index().first_slots

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor) -> None:
        """Store each request's new tokens ``k_new, v_new [num_rows, num_kv_heads, L, head_dim]`` at ``positions``
        (``[num_rows]`` for ``L = 1``, else ``[num_rows, L]``, consecutive) where this shard owns them; tokens of
        other shards and of padding rows go to the scratch block, which nothing reads. The rules a position must keep are ``DecodeStepPlan.build``'s; with a plan they were checked
        when the step was planned, and ``positions`` must be the planned ones (only their shape is checked here).
        """
        cache = self.cache
        batch, num_new = self.num_rows, k_new.shape[2] if k_new.dim() == 4 else 1
        positions_2d = positions.unsqueeze(1) if positions.dim() == 1 else positions
        _require(positions_2d.shape == (batch, num_new), "append positions.shape", tuple(positions.shape),
                 f"it must be [{batch}] or [{batch}, {num_new}]: one position per new token of the batch")
        cache._check_kv(k_new, v_new, positions_2d.flatten(), "append",
                        (batch, cache.num_kv_heads, num_new, cache.head_dim))
        plan = self._plan if self._plan is not None else DecodeStepPlan.build(
            cache, self.request_ids, self._states, self.layer, positions_2d.tolist())
        before = tuple(state.shard_lens[self.layer] for state in self._states)
        _require(plan.num_new == num_new and plan.before == before, "append plan", (plan.num_new, plan.before),
                 f"a step plan appends once to every layer: it must be planned for {num_new} new tokens on the "
                 f"stored tokens {before}; plan the step again (PagedKVCache.views)")
        cache._write(self.layer, plan.blocks, plan.offsets, k_new.transpose(1, 2).flatten(0, 1),
                     v_new.transpose(1, 2).flatten(0, 1))
        for state, shard_len, written in zip(self._states, plan.shard_lens, plan.written):
            state.shard_lens[self.layer], state.written[self.layer] = shard_len, written
        self._appended = plan

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's stored tokens of every request of the batch, in position order.

        Returns ``(k_shard, v_shard, shard_lens)``: ``k_shard, v_shard [b, num_kv_heads, s_max, head_dim]``
        right-padded with zeros to ``s_max = max(shard_lens)`` (``s_max`` may be 0), and ``shard_lens [b]``
        int64: fresh copies gathered from the blocks through the step's index (one ``index_select`` of ``head_dim``
        rows per layer, ``[planes, b, hkv, s_max, head_dim]``, contiguous). Column 0
        is slot ``first_slots()`` (0 unless a ring dropped older slots); ``shard_lens`` counts the columns held.
        """
        index = self._index()
        cache = self.cache
        kv = cache.storage[self.layer].view(-1, cache.head_dim).index_select(0, index.rows).view(
            cache.storage.shape[1], self.num_rows, cache.num_kv_heads, index.s_max, cache.head_dim)
        if index.has_padding:  # a pass over the whole history: only when some row has columns to zero
            kv = kv.masked_fill(index.hidden, 0)
        return kv[0], kv[-1], index.lens
