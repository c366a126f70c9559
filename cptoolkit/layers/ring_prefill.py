"""Exact causal prefill attention over the PCP group for DualChunkSwap shards: the entry point.

Every PCP rank passes its local shard (chunk ``r`` then chunk ``2P-1-r`` of the padded sequence,
see ``dual_chunk_swap``) and gets the attention output of exactly those tokens over the whole
causal prefix, as unsharded attention would give them. Four algorithms, one file each, one record each
(``algorithms.PREFILL_ALGORITHMS``: the name, the rule on heads and sizes, the collectives):

- ``comm="p2p"`` (``ring_p2p``): K/V blocks travel around the ring, send/recv overlapped with compute;
  ``P-1`` ``send_recv`` calls forward, ``2P-1`` backward.
- ``comm="all_gather"`` (``allgather_prefill``): one ``all_gather`` of K/V forward, one
  ``reduce_scatter`` of dK/dV backward.
- ``comm="a2a"`` (``ulysses_a2a``, Ulysses): ``all_to_all`` (one per tensor) trades the sequence shard
  for a head shard, causal attention over the whole sequence, one ``all_to_all`` back; 4 forward (q, k, v,
  out), 4 backward (dout, dq, dk, dv). KV heads are replicated as needed.
- ``comm="a2a+p2p"`` (``hierarchical_prefill``): PCP = a x p, a2a inside ``hcp_groups.a2a_group``
  (a consecutive PCP ranks), ring over ``hcp_groups.ring_group``; 4 ``all_to_all`` + ``p-1``
  ``send_recv`` forward, 4 + ``2p-1`` backward.

All collectives run on ``pcp_group`` (or its sub-groups) and are counted in ``stats`` when given.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from cptoolkit.layers.algorithms import PrefillAlgorithm, prefill_algorithm
from cptoolkit.layers.block_attention import check_sinks, kernel_backend
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.hierarchical_prefill import HierarchicalGroups, check_groups


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pcp_group: ProcessGroup | None,
              algorithm: PrefillAlgorithm, hcp_groups: HierarchicalGroups | None) -> None:
    if pcp_group is None:
        raise ValueError("pcp_group (None) must be the PCP process group: torch.distributed would read None "
                         "as the whole world; pass the group from parallel_state")
    if dist.get_rank(pcp_group) < 0:
        raise ValueError(f"this rank (global {dist.get_rank()}) is not a member of pcp_group; every rank "
                         f"must pass the PCP group it belongs to")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be [b, hq, 2c, d] and k, v [b, hkv, 2c, d] of equal shape; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    (b, hq, local_len, d), (b_kv, hkv, local_len_kv, d_kv) = q.shape, k.shape
    if (b, local_len, d) != (b_kv, local_len_kv, d_kv):
        raise ValueError(f"q and k, v must agree on batch, local sequence length and head_dim; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if local_len == 0 or local_len % 2:
        raise ValueError(f"local sequence length ({local_len}) must be even and positive: a DualChunkSwap "
                         f"shard is two equal chunks; pad with dual_chunk_swap.padded_length()")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if algorithm.hierarchical:
        check_groups(hcp_groups, pcp_group)
    error = algorithm.check(hq, dist.get_world_size(pcp_group), None if hcp_groups is None else hcp_groups.a2a_size)
    if error is not None:
        raise ValueError(f"comm {algorithm.name!r}: {error}")


def ring_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pcp_group: ProcessGroup,
                           scale: float, comm: str = "p2p", stats: CommStats | None = None,
                           hcp_groups: HierarchicalGroups | None = None, window: Optional[int] = None,
                           softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of this rank's DualChunkSwap shard over the whole sequence.

    ``q [b, hq, 2c, d]``, ``k``/``v [b, hkv, 2c, d]`` with ``hq % hkv == 0`` (GQA/MQA; the ring and
    all-gather never repeat K/V, the a2a comms repeat them to ``lcm(hkv, a2a size)`` heads); returns
    ``out [b, hq, 2c, d]`` in q's dtype, differentiable in q, k, v. Runs its collectives on ``pcp_group``
    (every member must call with the same shapes, ``comm`` and ``scale``); ``comm="a2a+p2p"`` runs them
    on ``hcp_groups`` (``hierarchical_prefill.new_hierarchical_groups(pcp_group, a2a_size)``).
    ``window``: a sliding window (each token attends its ``window`` most recent positions, itself included;
    every comm skips the chunk tiles outside it, ``sliding_window``); ``softcap``: scores capped by
    ``softcap * tanh(s / softcap)``. ``sinks [hq]`` (gpt-oss attention sinks, or None): one learned logit per
    query head in every query's softmax denominator (``lse_merge.add_sinks``), differentiable too; the
    gradient this rank gets is its share (the query rows, or for the a2a comms the heads, it computed), summed
    over the PCP group by the gradient all-reduce.
    """
    algorithm = prefill_algorithm(comm, "comm")
    _validate(q, k, v, pcp_group, algorithm, hcp_groups)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window ({window!r}) must be a positive integer or None")
    check_sinks(sinks, q.shape[1], kernel_backend(q.device))
    groups = hcp_groups if algorithm.hierarchical else pcp_group
    return algorithm.run(q, k, v, groups, scale, stats, window, softcap, sinks)
