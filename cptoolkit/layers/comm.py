"""Counted collectives: the only place cptoolkit's attention layers talk to other ranks.

Each wrapper runs one ``torch.distributed`` collective on an explicit group and, when given a
``CommStats``, records one call and the bytes this rank sent, under the collective's name. Tests
assert these counts (e.g. DCP decode ``a2a`` = 2 collectives per layer and step, ``ag_rs`` = 3) and
benchmarks report them.

A group given a ``SharedMemoryGroup`` (``use_shared_memory``: its members all on one host) runs its CPU all-gathers,
all-to-alls, reduce-scatters and sum all-reduces through that segment instead of gloo
(``cptoolkit.layers.shared_memory``); ``send_recv`` stays on gloo.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from cptoolkit.layers.shared_memory import SharedMemoryGroup

_SHARED_MEMORY: dict[ProcessGroup, SharedMemoryGroup] = {}


@dataclass
class CommStats:
    """Per-rank tally: ``calls[name]`` collectives issued and ``bytes_sent[name]`` bytes sent; and the
    prefill's attention work, ``tiles["computed"]`` / ``tiles["skipped"]``: causal chunk-by-chunk tiles
    (one query chunk against one key chunk of a DualChunkSwap split) computed, and skipped because they lie
    wholly outside a sliding window (``sliding_window``).

    A tally with a ``parent`` (e.g. one attention layer's, under the model's) also counts into it."""

    calls: Counter = field(default_factory=Counter)
    bytes_sent: Counter = field(default_factory=Counter)
    tiles: Counter = field(default_factory=Counter)
    parent: "CommStats | None" = None

    def record(self, name: str, tensor: torch.Tensor) -> None:
        self.calls[name] += 1
        self.bytes_sent[name] += tensor.numel() * tensor.element_size()
        if self.parent is not None:
            self.parent.record(name, tensor)

    def record_tiles(self, computed: int, skipped: int) -> None:
        self.tiles["computed"] += computed
        self.tiles["skipped"] += skipped
        if self.parent is not None:
            self.parent.record_tiles(computed, skipped)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.calls.clear()
        self.bytes_sent.clear()
        self.tiles.clear()


def _record(stats: CommStats | None, name: str, tensor: torch.Tensor) -> None:
    if stats is not None:
        stats.record(name, tensor)


def _shared_memory(group: ProcessGroup, tensor: torch.Tensor) -> SharedMemoryGroup | None:
    """``group``'s shared-memory segment for a CPU ``tensor`` (``use_shared_memory``), else None: gloo."""
    return _SHARED_MEMORY.get(group) if tensor.device.type == "cpu" else None


def all_gather(tensor: torch.Tensor, group: ProcessGroup, stats: CommStats | None = None) -> torch.Tensor:
    """Gather ``tensor`` from every member of ``group``: returns ``[group_size, *tensor.shape]``."""
    _record(stats, "all_gather", tensor)
    if (shared_memory := _shared_memory(group, tensor)) is not None:
        return shared_memory.all_gather(tensor)
    size = dist.get_world_size(group)
    # Flat buffers: gloo wants the output as a dim-0 concatenation of the inputs.
    out = torch.empty(size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_single(out, tensor.contiguous().view(-1), group=group)
    return out.view(size, *tensor.shape)


def reduce_scatter(stacked: torch.Tensor, group: ProcessGroup, stats: CommStats | None = None) -> torch.Tensor:
    """Sum ``stacked [group_size, ...]`` over the group; member ``i`` receives entry ``i``."""
    _record(stats, "reduce_scatter", stacked)
    if (shared_memory := _shared_memory(group, stacked)) is not None:
        return shared_memory.reduce_scatter(stacked)
    out = torch.empty(stacked[0].numel(), dtype=stacked.dtype, device=stacked.device)
    dist.reduce_scatter_single(out, stacked.contiguous().view(-1), group=group)
    return out.view(stacked.shape[1:])


def all_to_all(stacked: torch.Tensor, group: ProcessGroup, stats: CommStats | None = None) -> torch.Tensor:
    """Send entry ``i`` of ``stacked [group_size, ...]`` to member ``i``; returns what each member sent
    to this rank, stacked in member order (a dense tensor even when ``stacked`` is strided:
    ``all_to_all_single`` writes its output as if it were flat)."""
    _record(stats, "all_to_all", stacked)
    if (shared_memory := _shared_memory(group, stacked)) is not None:
        return shared_memory.all_to_all(stacked)
    out = torch.empty(stacked.shape, dtype=stacked.dtype, device=stacked.device)
    dist.all_to_all_single(out, stacked.contiguous(), group=group)
    return out


def all_reduce(tensor: torch.Tensor, group: ProcessGroup, op=dist.ReduceOp.SUM,
               stats: CommStats | None = None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` over ``group``; returns it. A sum of a contiguous CPU tensor goes through
    the group's shared-memory segment where it has one (``use_shared_memory``)."""
    _record(stats, "all_reduce", tensor)
    shared_memory = _shared_memory(group, tensor)
    if shared_memory is not None and op == dist.ReduceOp.SUM and tensor.is_contiguous():
        return shared_memory.all_reduce_(tensor)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def use_shared_memory(group: ProcessGroup, shared_memory: SharedMemoryGroup | None) -> None:
    """Run ``group``'s CPU all-gathers, all-to-alls, reduce-scatters and sum all-reduces through ``shared_memory``
    from now on (None: gloo again). Every member of ``group`` must choose alike."""
    if shared_memory is None:
        _SHARED_MEMORY.pop(group, None)
    else:
        _SHARED_MEMORY[group] = shared_memory


def send_recv(send: torch.Tensor, dst: int, src: int, group: ProcessGroup,
              stats: CommStats | None = None) -> tuple[torch.Tensor, list[dist.Work]]:
    """Start a non-blocking send of ``send`` to global rank ``dst`` and receive of a like-shaped
    tensor from global rank ``src``; returns ``(recv_buffer, works)`` — wait on ``works`` before use."""
    recv = torch.empty_like(send)
    _record(stats, "send_recv", send)
    ops = [dist.P2POp(dist.isend, send.contiguous(), dst, group=group),
           dist.P2POp(dist.irecv, recv, src, group=group)]
    return recv, dist.batch_isend_irecv(ops)
