"""Decode attention over a KV cache sharded along the sequence (decode context parallel, DCP).

Layout (DESIGN.md "Decode: sharded KV"). A DCP group spans ``k`` neighbouring TP positions x all
``pcp_size`` PCP ranks, ``dcp_size = k * pcp_size``. Members are numbered TP-major, PCP-minor: member
``s`` (its KV shard index, ``dcp_rank``) sits at TP position ``s // pcp_size`` of the group and PCP
rank ``s % pcp_size``. Token position ``t`` is stored by member ``(t // interleave) % dcp_size``.

The group's rank order must be this KV-shard order (group rank = ``s``, as ``parallel_state`` builds
it with ``sort_ranks=False``), so the entries of every collective come in KV-shard order.

Heads. The group's query heads are its ``k`` TP positions' heads in TP order
(``hq_group = k * hq_local``). Its KV heads are the distinct KV heads those positions use: with
``KV >= TP`` every position owns its own (``hkv_group = k * hkv_local``); with ``KV < TP`` a KV head
is shared by ``r = TP // KV`` neighbouring positions, so only positions ``0, r, 2r, ... < k`` bring a
new one (``hkv_group = max(1, k // r)``). Either way group query head ``i`` reads group KV head
``i // (hq_group // hkv_group)``, the uniform GQA mapping the block kernel expects.

One decode step of one layer (``dcp_decode_attention``), every collective on the DCP group:
1. ``gather_new_qkv``: the group's q and the new token's K/V (``k > 1``: one all-gather).
2. ``kv_cache.append``: only the owner of the new position stores it.
3. ``attend_shard``: attention of the group's heads over this member's shard -> ``(out, lse)``.
4. ``combine_partials``: the exact output of this rank's own heads, by the decode algorithm (a record of
   ``algorithms.DECODE_ALGORITHMS``); attention sinks, gpt-oss's, join it then, once the query's final LSE is known.
A step may carry ``L > 1`` consecutive new tokens per sequence (speculative decoding's verification): the
same four steps and collectives, every token appended first, and token ``j`` attending only the shard's
tokens at positions up to its own (``attend_shard_range``). A sliding-window layer's token at ``p`` attends
only the shard's tokens at positions ``(p - window, p]``: a contiguous range of its slots
(``window_slot_ranges``), so every member still computes its own partial and the merge is unchanged. A
cache may drop the slots no window can reach any more (``ShardedKVCache.first_slots``).

Collectives per layer and step (bytes depend on batch, heads, head_dim and group size, never on
the context length)::

    k     ag_rs                                              a2a
    DCP=1 0                                                  0
    1     2: all_gather(lse) + all_reduce(out)               1: all_gather(out|lse)
    > 1   3: all_gather(q|k|v) + all_gather(lse)             2: all_gather(q|k|v)
             + reduce_scatter(out)                              + all_to_all(out|lse)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from cptoolkit.errors import check_positive
from cptoolkit.layers.algorithms import DecodeComm, decode_algorithm
from cptoolkit.layers.block_attention import check_sinks, kernel_backend, masked_attention_forward
from cptoolkit.layers.comm import CommStats, all_gather, all_reduce, all_to_all, reduce_scatter
from cptoolkit.layers.lse_merge import add_sinks, merge_partials


def shard_of_position(position, dcp_size: int, interleave: int):
    """KV shard index that stores token ``position`` (an int or an int64 tensor of positions)."""
    return (position // interleave) % dcp_size


def slot_of_position(position, dcp_size: int, interleave: int):
    """Index of token ``position`` inside its own shard (an int or an int64 tensor)."""
    return (position // (interleave * dcp_size)) * interleave + position % interleave


def shard_length(seq_len: int, shard: int, dcp_size: int, interleave: int) -> int:
    """Number of the first ``seq_len`` tokens that shard ``shard`` stores."""
    full_turns, rest = divmod(seq_len, interleave * dcp_size)
    return full_turns * interleave + min(max(rest - shard * interleave, 0), interleave)


def positions_in_shard(seq_len: int, shard: int, dcp_size: int, interleave: int) -> torch.Tensor:
    """Token positions (int64, ascending) among the first ``seq_len`` that shard ``shard`` stores;
    entry ``j`` is the token in slot ``j``."""
    positions = torch.arange(seq_len, dtype=torch.int64)
    return positions[shard_of_position(positions, dcp_size, interleave) == shard]


@dataclass(frozen=True)
class DecodeGroup:
    """One rank's view of its DCP group.

    ``group``: the DCP process group (used only by collectives; may be ``None`` for pure cache
    bookkeeping). ``dcp_rank``: this member's KV shard index (TP-major, PCP-minor).
    ``tp_positions``: ``k``, the neighbouring TP positions the group spans, ``k | TP``.
    ``interleave``: consecutive tokens a shard takes per turn. ``kv_head_replication``: TP positions
    that share one KV head, ``TP // KV`` when ``KV < TP`` else 1.
    """

    group: ProcessGroup | None
    dcp_rank: int
    dcp_size: int
    tp_positions: int
    pcp_size: int
    interleave: int = 1
    kv_head_replication: int = 1

    def __post_init__(self) -> None:
        for name in ("tp_positions", "pcp_size", "interleave", "kv_head_replication"):
            check_positive(name, getattr(self, name))
        if self.dcp_size != self.tp_positions * self.pcp_size:
            raise ValueError(f"dcp_size ({self.dcp_size}) must equal tp_positions ({self.tp_positions}) x "
                             f"pcp_size ({self.pcp_size}) = {self.tp_positions * self.pcp_size}: a DCP group "
                             "spans k neighbouring TP positions x all PCP ranks")
        if not 0 <= self.dcp_rank < self.dcp_size:
            raise ValueError(f"dcp_rank ({self.dcp_rank}) must lie in [0, dcp_size={self.dcp_size})")
        k, r = self.tp_positions, self.kv_head_replication
        if k % r and r % k:
            raise ValueError(f"kv_head_replication ({r}) and tp_positions ({k}) must divide one another, "
                             "so that the group's query heads map uniformly onto its distinct KV heads")

    @classmethod
    def from_group(cls, group: ProcessGroup, tp_positions: int, pcp_size: int, interleave: int = 1,
                   kv_head_replication: int = 1) -> DecodeGroup:
        """Describe this rank's membership of ``group``: ``k`` neighbouring TP positions x all
        ``pcp_size`` PCP ranks, in KV-shard order (global rank ``pcp_rank * TP + tp_rank``)."""
        check_positive("tp_positions", tp_positions)
        check_positive("pcp_size", pcp_size)
        size = dist.get_world_size(group)
        if size != tp_positions * pcp_size:
            raise ValueError(f"the DCP group has {size} members but tp_positions ({tp_positions}) x pcp_size "
                             f"({pcp_size}) = {tp_positions * pcp_size}; build it from k neighbouring TP "
                             "positions x all PCP ranks")
        _check_shard_order(dist.get_process_group_ranks(group), tp_positions, pcp_size)
        return cls(group, dist.get_rank(group), size, tp_positions, pcp_size, interleave, kv_head_replication)

    @classmethod
    def from_parallel_groups(cls, groups, interleave: int = 1) -> DecodeGroup:
        """This rank's decode group from ``cptoolkit.parallel_state.ParallelGroups``: its DCP group,
        ``k``, PCP size and KV-head replication all come from the layout."""
        return cls.from_group(groups.dcp_group, groups.dcp_tp_positions, groups.pcp_size, interleave,
                              groups.layout.kv_head_replication)

    @property
    def tp_position(self) -> int:
        """This member's TP position inside the group, in ``[0, k)``."""
        return self.dcp_rank // self.pcp_size

    @property
    def kv_source_tp_positions(self) -> tuple[int, ...]:
        """Group TP positions whose KV heads, concatenated in this order, are the group's KV heads."""
        return tuple(range(0, self.tp_positions, self.kv_head_replication))


def _check_shard_order(global_ranks: list[int], tp_positions: int, pcp_size: int) -> None:
    """``global_ranks`` (in group-rank order) must list TP positions ``first .. first+k-1`` TP-major,
    PCP-minor: ascending, they form ``pcp_size`` rows of ``k`` consecutive ranks."""
    ascending = sorted(global_ranks)
    rows = [ascending[i:i + tp_positions] for i in range(0, len(ascending), tp_positions)]
    neighbours = all(row == list(range(row[0], row[0] + tp_positions)) for row in rows)
    shard_order = [ascending[(s % pcp_size) * tp_positions + s // pcp_size] for s in range(len(ascending))]
    if not neighbours or global_ranks != shard_order:
        raise ValueError(f"DCP group ranks {global_ranks} must be {tp_positions} neighbouring TP positions x "
                         f"{pcp_size} PCP ranks in KV-shard order (TP-major, PCP-minor, e.g. TP=2, PCP=2 -> "
                         "[0, 2, 1, 3]); create it with dist.new_group(ranks, sort_ranks=False)")


class ShardedKVCache(Protocol):
    """This member's KV shard for a batch of requests, as ``dcp_decode_attention`` uses it."""

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the tokens of ``k_new``/``v_new [b, hkv_group, L, d]`` whose ``positions`` (int64, ``[b]``
        when ``L = 1``, else ``[b, L]``, consecutive per request) belong to this shard; ignore the others."""

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(k_shard, v_shard [b, hkv_group, s_max, d], shard_lens [b] int64)``: request ``i``'s slots
        ``first_slots()[i] ..`` in its first ``shard_lens[i]`` columns."""

    def first_slots(self) -> torch.Tensor:
        """``[b]`` int64: the shard slot in column 0 of ``read``'s tensors (0 unless the cache has dropped the
        slots a sliding window can no longer reach)."""


class ContiguousShardCache:
    """This member's KV shard stored contiguously: ``k``, ``v [b, hkv_group, capacity, d]``.

    ``capacity`` is shard 0's share of ``max_seq_len`` (no shard holds more). ``seq_lens [b]``
    counts each request's tokens in the whole group: every member sees every append and checks every
    position, so a bad position fails on all members alike. ``shard_lens [b]`` counts those held here.
    """

    def __init__(self, max_seq_len: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 dg: DecodeGroup, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        for name, value in (("max_seq_len", max_seq_len), ("batch_size", batch_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            check_positive(name, value)
        self.max_seq_len, self.dg = max_seq_len, dg
        capacity = shard_length(max_seq_len, 0, dg.dcp_size, dg.interleave)
        self.k = torch.zeros(batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.seq_lens = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.shard_lens = torch.zeros_like(self.seq_lens)

    def write_prefix(self, k_full: torch.Tensor, v_full: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """Replace the contents with this shard's tokens of an unsharded history.

        ``k_full``, ``v_full [b, hkv_group, s, d]`` hold every position; request ``i`` keeps its first
        ``seq_lens[i]`` (``<= s``, ``<= max_seq_len``).
        """
        batch, heads, _, head_dim = self.k.shape
        if k_full.shape != v_full.shape or k_full.shape[:2] != (batch, heads) or k_full.shape[3] != head_dim:
            raise ValueError(f"write_prefix expects k_full, v_full [{batch}, {heads}, s, {head_dim}]; "
                             f"got {tuple(k_full.shape)} and {tuple(v_full.shape)}")
        if seq_lens.shape != (batch,) or int(seq_lens.max()) > min(k_full.shape[2], self.max_seq_len):
            raise ValueError(f"seq_lens must be [{batch}] with entries <= min(s={k_full.shape[2]}, "
                             f"max_seq_len={self.max_seq_len}); got {seq_lens.tolist()}")
        dg = self.dg
        for request, seq_len in enumerate(seq_lens.tolist()):
            positions = positions_in_shard(seq_len, dg.dcp_rank, dg.dcp_size, dg.interleave)
            self.k[request, :, :len(positions)] = k_full[request][:, positions]
            self.v[request, :, :len(positions)] = v_full[request][:, positions]
            self.shard_lens[request] = len(positions)
        self.seq_lens.copy_(seq_lens)

    def _check_append(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor) -> None:
        batch, heads, _, head_dim = self.k.shape
        num_new = k_new.shape[2] if k_new.dim() == 4 else 0
        if k_new.shape != (batch, heads, num_new, head_dim) or num_new < 1 or v_new.shape != k_new.shape:
            raise ValueError(f"append expects k_new, v_new [{batch}, {heads}, L, {head_dim}]; "
                             f"got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
        one_token = positions.shape == (batch,) and num_new == 1
        if not (one_token or positions.shape == (batch, num_new)) or positions.dtype != torch.int64:
            raise ValueError(f"positions must be int64 [{batch}] (one new token) or [{batch}, L]; got "
                             f"{positions.dtype} {tuple(positions.shape)}")
        positions = positions.view(batch, num_new)
        too_long = (positions[:, -1] >= self.max_seq_len).nonzero()
        if len(too_long):
            request = int(too_long[0])
            raise ValueError(f"sequence too long for the cache: position {int(positions[request, -1])} >= "
                             f"max_seq_len {self.max_seq_len} (request {request}); allocate the cache with "
                             "a larger max_seq_len or stop generating before it")
        expected = self.seq_lens[:, None] + torch.arange(num_new, device=positions.device)
        out_of_order = (positions != expected).any(1).nonzero()
        if len(out_of_order):
            request = int(out_of_order[0])
            raise ValueError(f"append out of order: request {request} is at position "
                             f"{int(positions[request, 0])} but the cache holds {int(self.seq_lens[request])} "
                             "of its tokens; each append must continue every request's sequence")

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor) -> None:
        """See ``ShardedKVCache.append``; ``positions`` (``[b]``, or ``[b, L]`` for ``L`` tokens) must continue
        ``seq_lens`` (no gaps)."""
        self._check_append(k_new, v_new, positions)
        positions = positions.view(positions.shape[0], -1)
        dg = self.dg
        rows, columns = torch.nonzero(shard_of_position(positions, dg.dcp_size, dg.interleave) == dg.dcp_rank,
                                      as_tuple=True)
        slots = slot_of_position(positions[rows, columns], dg.dcp_size, dg.interleave)
        self.k[rows, :, slots] = k_new[rows, :, columns]
        self.v[rows, :, slots] = v_new[rows, :, columns]
        self.shard_lens += torch.bincount(rows, minlength=len(self.shard_lens))
        self.seq_lens += positions.shape[1]

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See ``ShardedKVCache.read``: views up to the longest request's shard length."""
        s_max = int(self.shard_lens.max())
        return self.k[:, :, :s_max], self.v[:, :, :s_max], self.shard_lens

    def first_slots(self) -> torch.Tensor:
        """See ``ShardedKVCache.first_slots``: this cache keeps every slot."""
        return torch.zeros_like(self.shard_lens)


def _check_new_token(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or k.shape[2] != q.shape[2]:
        raise ValueError(f"decode expects L new tokens per sequence: q [b, hq, L, d], k and v [b, hkv, L, d]; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k/v must agree on batch and head_dim; got q {tuple(q.shape)}, k {tuple(k.shape)}")


def gather_new_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dg: DecodeGroup,
                   stats: CommStats | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The group's query heads and the new token's group KV heads.

    ``q [b, hq_local, L, d]``, ``k``/``v [b, hkv_local, L, d]`` (this rank's TP heads) ->
    ``(q [b, k*hq_local, L, d], k, v [b, hkv_group, L, d])``. ``k = 1``: returned as is. ``k > 1``:
    one all-gather of packed ``q|k|v`` on the DCP group; the PCP copies are identical (decode is not
    sequence-sharded), so members ``0, pcp_size, 2*pcp_size, ...`` (PCP rank 0) supply one copy per
    TP position. ``v is k`` (MLA's latent, key and value at once): ``q|k`` travels, and ``v`` is ``k``.
    """
    _check_new_token(q, k, v)
    if dg.tp_positions == 1:
        return q, k, v
    hq_local, hkv_local = q.shape[1], k.shape[1]
    packed = [q, k] if v is k else [q, k, v]
    per_tp = all_gather(torch.cat(packed, dim=1), dg.group, stats)[::dg.pcp_size]
    kv_sources = per_tp[list(dg.kv_source_tp_positions)]

    def heads(stacked: torch.Tensor, start: int, count: int) -> torch.Tensor:
        return stacked[:, :, start:start + count].movedim(0, 1).flatten(1, 2)

    k_group = heads(kv_sources, hq_local, hkv_local)
    v_group = k_group if v is k else heads(kv_sources, hq_local + hkv_local, hkv_local)
    return heads(per_tp, 0, hq_local), k_group, v_group


def attend_shard(q_group: torch.Tensor, k_shard: torch.Tensor, v_shard: torch.Tensor,
                 shard_lens: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the new token over this member's shard: a partial result to merge.

    ``q_group [b, hq_group, 1, d]``, ``k_shard``/``v_shard [b, hkv_group, s_max, d]`` of which request
    ``i`` uses the first ``shard_lens[i] <= s_max`` slots (``read``'s invariant: not checked, as that would wait
    on the device). Returns ``(out [b, hq_group, 1, d], lse [b, hq_group, 1] float32)``; a request with an empty
    shard gets ``out = 0``, ``lse = -inf``. One masked kernel call for the whole batch.
    """
    batch, _, s_max, _ = k_shard.shape
    if shard_lens.shape != (batch,):
        raise ValueError(f"shard_lens must be [{batch}] (one length <= s_max {s_max} per request); "
                         f"got shape {list(shard_lens.shape)}")
    if s_max == 0:
        return (torch.zeros_like(q_group),
                torch.full(q_group.shape[:3], float("-inf"), dtype=torch.float32, device=q_group.device))
    seen = torch.arange(s_max, device=k_shard.device) < shard_lens.to(k_shard.device)[:, None]  # [b, s_max]
    return masked_attention_forward(q_group, k_shard, v_shard, seen[:, None, None, :], scale)


def visible_shard_lens(positions: torch.Tensor, dg: DecodeGroup) -> torch.Tensor:
    """``[b, L]`` int64: how many of this member's shard slots the token at ``positions [b, L]`` sees, i.e.
    its shard's tokens at positions ``<= positions`` (``shard_length(position + 1)``, vectorised; 0 for
    negative positions)."""
    turn = dg.interleave * dg.dcp_size
    after = positions.clamp(min=-1) + 1
    full_turns, rest = torch.div(after, turn, rounding_mode="floor"), after % turn
    return full_turns * dg.interleave + (rest - dg.dcp_rank * dg.interleave).clamp(0, dg.interleave)


def window_slot_ranges(positions: torch.Tensor, window: Optional[int], dg: DecodeGroup
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, end) [b, L]`` int64: the shard slots ``[first, end)`` the token at ``positions [b, L]`` attends:
    those at positions ``<= positions``, and with a ``window`` also ``> positions - window``."""
    end = visible_shard_lens(positions, dg)
    first = torch.zeros_like(end) if window is None else visible_shard_lens(positions - window, dg)
    return first, end


def attend_shard_range(q_group: torch.Tensor, k_shard: torch.Tensor, v_shard: torch.Tensor, first: torch.Tensor,
                       end: torch.Tensor, scale: float, softcap: Optional[float] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend_shard`` for ``L`` queries per sequence, query ``j`` of request ``i`` over the columns
    ``[first[i, j], end[i, j])`` of ``k_shard``/``v_shard`` only: ``q_group [b, hq_group, L, d]``, ``first``,
    ``end [b, L]`` -> ``(out [b, hq_group, L, d], lse [b, hq_group, L])``, computed in (at least) float32 with an
    explicit mask, since the block kernels take no per-query ranges; ``softcap`` caps the scores. A query that
    sees no column gets ``out = 0``, ``lse = -inf``."""
    batch, hq, num_queries, head_dim = q_group.shape
    hkv, s_max = k_shard.shape[1], k_shard.shape[2]
    dtype = torch.promote_types(q_group.dtype, torch.float32)
    q = q_group.to(dtype).view(batch, hkv, hq // hkv, num_queries, head_dim)
    scores = torch.einsum("bkgld,bksd->bkgls", q, k_shard.to(dtype)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    columns = torch.arange(s_max, device=scores.device)
    seen = ((columns >= first[:, None, None, :, None].to(scores.device))
            & (columns < end[:, None, None, :, None].to(scores.device)))
    scores = scores.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)), nan=0.0)
    out = torch.einsum("bkgls,bksd->bkgld", weights, v_shard.to(dtype))
    return (out.reshape(batch, hq, num_queries, -1).to(q_group.dtype),
            lse.reshape(batch, hq, num_queries).float())


def _slices_by_member(x: torch.Tensor, dg: DecodeGroup, split_tokens: bool) -> torch.Tensor:
    """``x [b, k*hq_local, T, ...]`` -> ``[dcp_size, b, hq_local, T', ...]`` whose entry ``s`` is what member ``s``
    owns: the heads of its TP position ``s // pcp_size`` and, with ``split_tokens``, the ``T' = T / pcp_size``
    tokens of its PCP rank ``s % pcp_size`` (else all ``T' = T``)."""
    by_heads = x.unflatten(1, (dg.tp_positions, -1))
    if not split_tokens:
        return by_heads.movedim(1, 0).repeat_interleave(dg.pcp_size, dim=0)
    by_tokens = by_heads.unflatten(3, (dg.pcp_size, -1))  # [b, k, hq_local, P, T', ...]
    # Contiguous: comm.all_to_all allocates its receive buffer with empty_like, which keeps strides.
    return by_tokens.movedim((1, 3), (0, 1)).flatten(0, 1).contiguous()


def _owns_every_row(dg: DecodeGroup, split_tokens: bool) -> bool:
    """Every member owns every row of the partials (one TP position, tokens not split): nothing to scatter."""
    return dg.tp_positions == 1 and not split_tokens


def combine_ag_rs(out: torch.Tensor, lse: torch.Tensor, dg: DecodeGroup, stats: CommStats | None,
                  split_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``ag_rs``: all-gather the LSEs, rescale locally by ``e^{lse - LSE}``, then sum the outputs with an all-reduce
    (every member owns every row) or a reduce-scatter that hands each member its rows."""
    lse_total = torch.logsumexp(all_gather(lse, dg.group, stats), dim=0)
    # A row empty on every shard (a padding slot) has lse = lse_total = -inf: weight 0, not NaN.
    weight = torch.nan_to_num(torch.exp(lse - lse_total), nan=0.0)
    rescaled = out.float() * weight.unsqueeze(-1)
    if _owns_every_row(dg, split_tokens):
        return all_reduce(rescaled, dg.group, stats=stats), lse_total
    lse_own = _slices_by_member(lse_total, dg, split_tokens)[dg.dcp_rank]
    return reduce_scatter(_slices_by_member(rescaled, dg, split_tokens), dg.group, stats), lse_own


def combine_a2a(out: torch.Tensor, lse: torch.Tensor, dg: DecodeGroup, stats: CommStats | None,
                split_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``a2a``: send packed ``(out, lse)`` slices straight to their owners (an all-gather when every member owns
    every row) and merge locally (``merge_partials``: the Triton kernel on CUDA)."""
    packed = torch.cat([out.float(), lse.unsqueeze(-1)], dim=-1)
    if _owns_every_row(dg, split_tokens):
        received = all_gather(packed, dg.group, stats)
    else:
        received = all_to_all(_slices_by_member(packed, dg, split_tokens), dg.group, stats)
    return merge_partials(received[..., :-1], received[..., -1])


def combine_partials(out: torch.Tensor, lse: torch.Tensor, dg: DecodeGroup, comm: DecodeComm,
                     stats: CommStats | None = None, split_tokens: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact attention of this member's own rows from every member's partial: DCP decode's and context
    attention's one combine.

    ``out [b, k*hq_local, T, d]``, ``lse [b, k*hq_local, T]`` (this member's shard, the group's query heads) ->
    ``(out [b, hq_local, T', d] float32, lse [b, hq_local, T'])`` over every shard. Member ``s`` owns the heads
    of its TP position; with ``split_tokens`` (context attention: ``T = P*L``, the PCP ranks' chunk tokens in
    turn) only its PCP rank's ``T' = L`` tokens, else (decode: every PCP rank decodes the same tokens) all
    ``T' = T``. The collectives on the DCP group are the decode algorithm's (``algorithms.DECODE_ALGORITHMS``:
    ``a2a`` or ``ag_rs``); none when ``dcp_size == 1``, where the partial is exact and returned as it is.
    Attention sinks are the caller's: they join once the query's final LSE is known.
    """
    algorithm = decode_algorithm(comm, "comm")
    if dg.dcp_size == 1:  # the only shard holds the whole history: its partial is exact
        return out, lse
    return algorithm.combine(out, lse, dg, stats, split_tokens)


def dcp_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: ShardedKVCache,
                         positions: torch.Tensor, dg: DecodeGroup, comm: DecodeComm, scale: float,
                         stats: CommStats | None = None, window: Optional[int] = None,
                         softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One decode step of one attention layer with the KV cache sharded over the DCP group.

    ``q [b, hq_local, L, d]``, ``k``/``v [b, hkv_local, L, d]``: this rank's heads of ``L`` new tokens per
    sequence at ``positions`` (int64; ``[b]`` when ``L = 1``, else ``[b, L]``, consecutive). Appends them to
    ``kv_cache`` (each owner stores its own), attends over every shard (token ``j`` causally: the history and
    the new tokens up to itself) and returns ``[b, hq_local, L, d]``, equal to attention over the whole
    history (over the ``window`` latest positions with a sliding window; scores capped by ``softcap``; with
    ``sinks [hq_local]``, gpt-oss attention sinks, in every query's denominator once the partials are combined).
    Collective counts per call: see the module docstring (the same for any ``L``).
    """
    decode_algorithm(comm, "comm")  # before the first collective, so a bad value fails every rank alike
    check_sinks(sinks, q.shape[1], kernel_backend(q.device))
    q_group, k_new, v_new = gather_new_qkv(q, k, v, dg, stats)
    one_token = q.shape[2] == 1 and positions.dim() == 1
    if not one_token and positions.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"positions of {q.shape[2]} new tokens per sequence must be [b, L] = "
                         f"[{q.shape[0]}, {q.shape[2]}]; got {tuple(positions.shape)}")
    kv_cache.append(k_new, v_new, positions)
    k_shard, v_shard, shard_lens = kv_cache.read()
    if one_token and window is None and softcap is None:  # it sees the whole shard: the block kernel, no mask
        out, lse = attend_shard(q_group, k_shard, v_shard, shard_lens, scale)
    else:
        first, end = window_slot_ranges(positions.view(q.shape[0], q.shape[2]), window, dg)
        column_0 = kv_cache.first_slots()[:, None].to(first.device)
        out, lse = attend_shard_range(q_group, k_shard, v_shard, (first - column_0).clamp(min=0), end - column_0,
                                      scale, softcap)
    out_own, lse_own = combine_partials(out, lse, dg, comm, stats)
    return add_sinks(out_own, lse_own, sinks)[0].to(out.dtype)
