"""Collectives between the ranks of one process group on one host, through a shared-memory segment.

Why: on a CPU, gloo's all-reduce of a decode step's activation (``[1, 8, 896]`` float32, 28 KiB) costs about 0.13 ms
between two idle ranks but 1.0-1.5 ms inside a decode step, where each one is handed through gloo's TCP threads and
every hand-off waits for a core the peer's compute also wants (``bench/all_reduce.py``; docs/results.md). Here each
member copies its tensor into its own slot of a segment every member has mapped, publishes a sequence number and
polls until every member's number has reached it; then an all-gather copies the slots out in member order, an
all-to-all the part of each slot meant for it, an all-reduce sums the slots and a reduce-scatter the parts meant for it,
in member order: the same operations on the same bytes on every member, so every member ends
with the same bits (with two members, gloo's bits too: ``a + b`` and ``b + a`` round alike).

Segment: one sequence counter per member, each on a 64-byte line of its own, then two parities x members slots of
``slot_bytes``. Collective ``n`` uses the slots of parity ``n % 2``; a member writes collective ``n + 2``'s slot
only after it has seen every counter reach ``n + 1``, that is after every member has finished reading collective
``n``. A tensor larger than a slot goes through in slot-sized pieces, one collective each.

Memory order: a member's slot must be visible before its counter. x86-64 keeps ordinary stores in program order; the
non-temporal and fast-string stores a large copy may use are ordered by any locked instruction, which ``_fence``
issues (a lock's compare-and-exchange) between the copy and the counter. Other architectures order stores less
strictly, and ``shared_memory_groups`` leaves them to gloo.

Waiting: a member polls the counters, yields its core between polls after ``_SPIN_S``, and raises ``TimeoutError``
naming the collective when a peer has not arrived within the timeout, or at once when a peer's process has exited
(checked every ``_LIVENESS_S``).
"""
from __future__ import annotations

import mmap
import os
import platform
import socket
import sys
import threading
import time
import uuid
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

_LINE_BYTES = 64
_WORDS_PER_LINE = _LINE_BYTES // 8
_SPIN_S = 50e-6
_LIVENESS_S = 0.5
_SEGMENT_DIR = "/dev/shm"
DEFAULT_SLOT_BYTES = 1 << 20
_FENCE = threading.Lock()


def _fence() -> None:
    """A full memory barrier on x86-64: taking a lock is a locked compare-and-exchange."""
    with _FENCE:
        pass


def _sum_in_member_order(out: torch.Tensor, parts: torch.Tensor) -> None:
    """``out = parts[0] + parts[1] + ...`` in place, rounding after each addition as gloo does: ``parts [members,
    *out.shape]``, the same operations on every member, hence the same bits."""
    out.copy_(parts[0])
    for part in parts[1:]:
        out.add_(part)


def _process_exited(pid: int) -> bool:
    """Whether process ``pid`` has ended (gone, or a zombie not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return False


class SharedMemoryGroup:
    """Collectives over the members of one process group, all on this host (``open``: a collective on the group):
    ``all_reduce_`` (sum, in place), ``all_gather``, ``all_to_all`` and ``reduce_scatter`` (sum), of CPU tensors of the
    same shape and dtype on every member."""

    def __init__(self, segment: mmap.mmap, member: int, member_pids: list[int], slot_bytes: int, timeout_s: float,
                 label: str):
        members = len(member_pids)
        if slot_bytes % _LINE_BYTES or slot_bytes < members * 8:
            raise ValueError(f"slot_bytes = {slot_bytes} must be a multiple of {_LINE_BYTES} and at least 8 bytes per "
                             f"member ({members * 8}), so that a piece holds one element for every member")
        self._member, self._member_pids, self._slot_bytes = member, member_pids, slot_bytes
        self._timeout_s, self._label = timeout_s, label
        self._counters = memoryview(segment)[: members * _LINE_BYTES].cast("q")
        self._slots = torch.frombuffer(segment, dtype=torch.uint8, offset=members * _LINE_BYTES,
                                       count=2 * members * slot_bytes).view(2, members, slot_bytes)
        self._sequence = 0

    @classmethod
    def open(cls, group: ProcessGroup, timeout_s: float, slot_bytes: int = DEFAULT_SLOT_BYTES
             ) -> Optional["SharedMemoryGroup"]:
        """Collective on ``group`` (every member calls it): member 0 creates a segment in ``/dev/shm`` (its space
        reserved up front, so a full ``/dev/shm`` fails here and not later with SIGBUS), every member maps it, and
        member 0 unlinks it once all have (nothing is left behind, whatever ends the job). None on every member when
        any member could not map it."""
        members, member = dist.get_world_size(group), dist.get_rank(group)
        segment_bytes = members * _LINE_BYTES + 2 * members * slot_bytes
        path = [_create_segment(segment_bytes) if member == 0 else None]
        dist.broadcast_object_list(path, src=dist.get_global_rank(group, 0), group=group)
        segment = None if path[0] is None else _map_segment(path[0], segment_bytes)
        mapped = torch.tensor([int(segment is not None)])
        dist.all_reduce(mapped, op=dist.ReduceOp.MIN, group=group)
        if member == 0 and path[0] is not None:
            os.unlink(path[0])
        pids: list = [None] * members
        dist.all_gather_object(pids, os.getpid(), group=group)
        if not mapped.item():
            return None
        return cls(segment, member, pids, slot_bytes, timeout_s,
                   label=f"group of ranks {dist.get_process_group_ranks(group)}")

    @property
    def collectives(self) -> int:
        """The collectives this member has completed (one per slot-sized piece)."""
        return self._sequence

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (contiguous) over the members in place, in member order; returns it."""
        flat = tensor.view(-1)
        piece_numel = self._slot_bytes // tensor.element_size()
        for start in range(0, flat.numel(), piece_numel):
            piece = flat[start:start + piece_numel]
            _sum_in_member_order(piece, self._exchange(piece, "all_reduce"))
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every member's ``tensor``, stacked in member order: ``[members, *tensor.shape]``."""
        flat = tensor.contiguous().view(-1)
        out = torch.empty(len(self._member_pids), flat.numel(), dtype=tensor.dtype)
        piece_numel = self._slot_bytes // tensor.element_size()
        for start in range(0, flat.numel(), piece_numel):
            piece = flat[start:start + piece_numel]
            out[:, start:start + piece.numel()].copy_(self._exchange(piece, "all_gather"))
        return out.view(len(self._member_pids), *tensor.shape)

    def all_to_all(self, stacked: torch.Tensor) -> torch.Tensor:
        """Entry ``i`` of ``stacked [members, ...]`` to member ``i``: what each member sent to this one, stacked in
        member order (``stacked.shape``)."""
        received = torch.empty(stacked.shape, dtype=stacked.dtype)
        for columns, slots in self._exchange_rows(stacked, "all_to_all"):
            received.view(stacked.shape[0], -1)[:, columns].copy_(slots[:, self._member])
        return received

    def reduce_scatter(self, stacked: torch.Tensor) -> torch.Tensor:
        """The sum over members of entry ``i`` of their ``stacked [members, ...]``, on member ``i``, summed in member
        order (``stacked.shape[1:]``)."""
        total = torch.empty(stacked.shape[1:], dtype=stacked.dtype)
        for columns, slots in self._exchange_rows(stacked, "reduce_scatter"):
            _sum_in_member_order(total.view(-1)[columns], slots[:, self._member])
        return total

    def _exchange_rows(self, stacked: torch.Tensor, collective: str):
        """Yield ``(columns, slots [members (from), members (for), len(columns)])`` over pieces of the flattened
        entries of ``stacked [members, ...]``, each piece of every entry exchanged at once."""
        members = len(self._member_pids)
        rows = stacked.contiguous().view(members, -1)
        piece_columns = self._slot_bytes // (members * stacked.element_size())
        for start in range(0, rows.shape[1], piece_columns):
            columns = slice(start, min(start + piece_columns, rows.shape[1]))
            piece = rows[:, columns]
            yield columns, self._exchange(piece, collective).view(members, members, piece.shape[1])

    def _exchange(self, piece: torch.Tensor, collective: str) -> torch.Tensor:
        """Publish ``piece`` (at most a slot) and wait for every member's: the slots ``[members, piece.numel()]``,
        valid until this member's next-but-one collective. ``collective`` names the caller in a failure."""
        self._sequence += 1
        sequence = self._sequence
        slots = self._slots[sequence % 2, :, : piece.numel() * piece.element_size()].view(piece.dtype)
        slots[self._member].view(piece.shape).copy_(piece)
        _fence()
        self._counters[self._member * _WORDS_PER_LINE] = sequence
        self._wait_for(sequence, collective)
        return slots

    def _wait_for(self, sequence: int, collective: str) -> None:
        """Poll until every member's counter has reached ``sequence``."""
        counters = self._counters
        start = time.perf_counter()
        next_check = start + _LIVENESS_S
        for member in range(len(self._member_pids)):
            while counters[member * _WORDS_PER_LINE] < sequence:
                now = time.perf_counter()
                if now - start > _SPIN_S:
                    os.sched_yield()
                if now > next_check:
                    self._check_peer(member, now - start, collective)
                    next_check = now + _LIVENESS_S

    def _check_peer(self, member: int, waited_s: float, collective: str) -> None:
        """Raise when member ``member`` has exited, or has kept this one waiting longer than the timeout (the
        message in the form ``cptoolkit.distributed`` logs gloo's timeouts in)."""
        pid = self._member_pids[member]
        where = f"collective {collective} over shared memory ({self._label})"
        if _process_exited(pid):
            raise RuntimeError(f"{where} failed: member {member} (pid {pid}) has exited")
        if waited_s > self._timeout_s:
            raise TimeoutError(f"{where} timed out (runtime.collective_timeout_s; a peer rank is stuck or gone): "
                               f"waited {self._timeout_s:g} s for member {member}")


def _create_segment(segment_bytes: int) -> Optional[str]:
    """A new file of ``segment_bytes`` reserved bytes in ``/dev/shm`` (None where there is no room or no such
    directory)."""
    path = os.path.join(_SEGMENT_DIR, f"cptoolkit-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, segment_bytes)
    except OSError:
        os.unlink(path)
        return None
    finally:
        os.close(fd)
    return path


def _map_segment(path: str, segment_bytes: int) -> Optional[mmap.mmap]:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        return mmap.mmap(fd, segment_bytes)
    except OSError:
        return None
    finally:
        os.close(fd)


def shared_memory_groups(groups: Sequence[ProcessGroup], timeout_s: float) -> list[Optional[SharedMemoryGroup]]:
    """A ``SharedMemoryGroup`` for each of ``groups`` where it pays: more than one member, Linux (``/dev/shm``,
    ``/proc``) on x86-64, every member on this host, and no more ranks on this host than cores each member may run on
    (a member polling for its peers must not take the core a peer computes on); None where not, on every member of
    that group. Collective on the default group (every rank calls it, each with its own groups, in the same order),
    then on each group."""
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    here = hosts[dist.get_rank()]
    linux_x86 = sys.platform.startswith("linux") and platform.machine() == "x86_64"
    segments = []
    for group in groups:
        members = dist.get_process_group_ranks(group)
        if len(members) == 1:
            segments.append(None)
            continue
        worthwhile = torch.tensor([int(linux_x86 and all(hosts[rank] == here for rank in members)
                                       and hosts.count(here) <= len(os.sched_getaffinity(0)))])
        dist.all_reduce(worthwhile, op=dist.ReduceOp.MIN, group=group)  # every member decides alike
        segments.append(SharedMemoryGroup.open(group, timeout_s) if worthwhile.item() else None)
    return segments
