"""Hierarchical (a2a+p2p) prefill attention for DualChunkSwap shards, forward and backward.

PCP = ``a·p``: Ulysses all-to-all inside groups of ``a`` consecutive PCP ranks, ring (p2p) across
the ``p`` groups (megatron's ``hierarchical_context_parallel_sizes = [a, p]``). PCP rank ``r`` is
member ``i = r mod a`` of a2a group ``g = r // a`` and member ``g`` of ring group ``i``.

Why the ring needs nothing new: a2a group ``g`` holds chunks ``g·a … g·a+a-1`` and their mirrors
``2P-1-g·a-(a-1) … 2P-1-g·a``, i.e. super-chunks ``g`` and ``2p-1-g`` of a sequence cut into ``2p``
super-chunks of ``a`` chunks each. After the inner exchange (``ulysses_a2a.scatter_qkv``) member
``i`` holds heads slice ``i`` (``hq/a`` heads) of exactly those tokens in super-chunk order, which is
the DualChunkSwap shard of rank ``g`` of a ring of size ``p`` with chunk length ``a·c``. The
existing ring (``ring_p2p.ring_forward``/``ring_backward``) on the ring group is then exact causal
attention; one ``all_to_all`` returns the outputs to their tokens' owners.

Collectives per rank and layer: forward 4 ``all_to_all`` on the a2a group (q, k, v, out; none when
``a = 1``) and ``p-1`` ``send_recv`` on the ring group; backward 4 ``all_to_all`` (dout, dq, dk, dv)
and ``2p-1`` ``send_recv``. The ring moves the K/V of ``hkv·kv_replicas(hkv, a)/a`` heads over
``2ac`` tokens per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from cptoolkit.layers.ring_p2p import ring_backward, ring_forward
from cptoolkit.layers.lse_merge import add_sinks
from cptoolkit.layers.ulysses_a2a import (gather_grads, gather_heads, member_sinks, member_sinks_grad, scatter_heads,
                                          scatter_qkv)
from cptoolkit.layout import check_a2a_size, hierarchical_rank_lists  # pure rank math, shared with the layout


@dataclass(frozen=True)
class HierarchicalGroups:
    """This rank's two sub-groups of its PCP group (megatron-core's ``pg_collection.hcp`` order)."""

    a2a_group: ProcessGroup
    ring_group: ProcessGroup

    @property
    def a2a_size(self) -> int:
        return dist.get_world_size(self.a2a_group)

    @property
    def ring_size(self) -> int:
        return dist.get_world_size(self.ring_group)


def _pcp_ranks(pcp_group: ProcessGroup) -> list[int]:
    return [dist.get_global_rank(pcp_group, i) for i in range(dist.get_world_size(pcp_group))]


def new_hierarchical_groups(pcp_group: ProcessGroup, a2a_size: int) -> HierarchicalGroups:
    """Build every rank's a2a and ring groups; returns this rank's.

    Collective over the default group: every rank of the world calls it with its own PCP group and the
    same ``a2a_size``. The PCP groups are exchanged with one ``all_gather_object`` so that every rank
    creates every sub-group in the same order (as ``dist.new_group`` requires). A bad ``a2a_size``
    raises the same ValueError on every rank before any communication.
    """
    check_a2a_size(a2a_size, dist.get_world_size(pcp_group))
    every_pcp = [None] * dist.get_world_size()
    dist.all_gather_object(every_pcp, _pcp_ranks(pcp_group))
    a2a_lists, ring_lists = hierarchical_rank_lists(sorted(set(map(tuple, every_pcp))), a2a_size)
    rank, mine = dist.get_rank(), {}
    for kind, rank_lists in (("a2a", a2a_lists), ("ring", ring_lists)):
        for ranks in rank_lists:
            # sort_ranks=False: the list order is the group-rank order the ring relies on.
            group = dist.new_group(ranks=ranks, sort_ranks=False)
            if rank in ranks:
                mine[kind] = group
    return HierarchicalGroups(a2a_group=mine["a2a"], ring_group=mine["ring"])


def check_groups(groups: HierarchicalGroups | None, pcp_group: ProcessGroup) -> None:
    """``groups`` must be this rank's sub-groups of ``pcp_group`` as ``new_hierarchical_groups`` builds them."""
    if groups is None:
        raise ValueError("hcp_groups (None) must be this rank's HierarchicalGroups for comm 'a2a+p2p'; "
                         "build them with hierarchical_prefill.new_hierarchical_groups(pcp_group, a2a_size)")
    pcp_ranks, pcp_rank = _pcp_ranks(pcp_group), dist.get_rank(pcp_group)
    a = len(_pcp_ranks(groups.a2a_group))
    check_a2a_size(a, len(pcp_ranks))
    start = pcp_rank - pcp_rank % a
    want = (pcp_ranks[start:start + a], pcp_ranks[pcp_rank % a::a])
    got = (_pcp_ranks(groups.a2a_group), _pcp_ranks(groups.ring_group))
    if got != want:
        raise ValueError(f"hcp_groups (a2a {got[0]}, ring {got[1]}) must be the sub-groups of this rank's PCP "
                         f"group {pcp_ranks}: a2a {want[0]} (consecutive PCP ranks) and ring {want[1]}; "
                         f"build them with new_hierarchical_groups(pcp_group, a2a_size={a})")


class HierarchicalPrefillAttention(torch.autograd.Function):
    """Differentiable a2a+p2p attention: ``apply(q, k, v, groups, scale, stats, window, softcap, sinks) -> out
    [b, hq, 2c, d]``; a sliding ``window`` reaches the ring, whose chunks are the super-chunks.

    ``q [b, hq, 2c, d]``, ``k``/``v [b, hkv, 2c, d]``: this rank's DualChunkSwap shard over the whole
    PCP group; ``hq`` must be a multiple of ``a`` (the ``a2a+p2p`` record's rule, ``algorithms``). ``sinks [hq]``
    (or None): the a2a member's slice (``ulysses_a2a.member_sinks``) joins its heads' ring result, before the
    exchange back.
    """

    @staticmethod
    def forward(ctx, q, k, v, groups, scale, stats, window, softcap, sinks):
        q_ring, k_ring, v_ring = scatter_qkv(q, k, v, groups.a2a_group, stats)
        out_ring, lse_ring = add_sinks(*ring_forward(q_ring, k_ring, v_ring, groups.ring_group, scale, stats,
                                                     window, softcap), member_sinks(sinks, groups.a2a_group))
        (out,) = gather_heads([out_ring], groups.a2a_group, stats)
        ctx.save_for_backward(q_ring, k_ring, v_ring, out_ring, lse_ring, sinks)
        ctx.groups, ctx.scale, ctx.stats, ctx.num_kv_heads = groups, scale, stats, k.shape[1]
        ctx.window, ctx.softcap = window, softcap
        return out

    @staticmethod
    def backward(ctx, dout):
        q_ring, k_ring, v_ring, out_ring, lse_ring, sinks = ctx.saved_tensors
        groups = ctx.groups
        (dout_ring,) = scatter_heads([dout], groups.a2a_group, ctx.stats)
        dq_ring, dk_ring, dv_ring = ring_backward(dout_ring, q_ring, k_ring, v_ring, out_ring, lse_ring,
                                                  groups.ring_group, ctx.scale, ctx.stats, ctx.window, ctx.softcap)
        dq, dk, dv = gather_grads(dq_ring, dk_ring, dv_ring, ctx.num_kv_heads, groups.a2a_group, ctx.stats)
        dsinks = member_sinks_grad(dout_ring, out_ring, lse_ring, sinks, groups.a2a_group)
        return dq, dk, dv, None, None, None, None, None, dsinks
