"""Exact causal prefill attention over the PCP group for DualChunkSwap shards: the entry point.

Every PCP rank passes its local shard (chunk ``r`` then chunk ``2P-1-r`` of the padded sequence,
see ``dual_chunk_swap``) and gets the attention output of exactly those tokens over the whole
causal prefix, as unsharded attention would give them. Two algorithms, one file each:

- ``comm="p2p"`` (``ring_p2p``): K/V blocks travel around the ring, send/recv overlapped with compute;
  ``P-1`` ``send_recv`` calls forward, ``2P-1`` backward.
- ``comm="all_gather"`` (``allgather_prefill``): one ``all_gather`` of K/V forward, one
  ``reduce_scatter`` of dK/dV backward.

All collectives run on ``pcp_group`` and are counted in ``stats`` when given.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from cptoolkit.layers.allgather_prefill import AllGatherPrefillAttention
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.ring_p2p import RingP2PAttention

PREFILL_COMMS = {"p2p": RingP2PAttention, "all_gather": AllGatherPrefillAttention}


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pcp_group: ProcessGroup | None, comm: str) -> None:
    if comm not in PREFILL_COMMS:
        raise ValueError(f"comm ({comm!r}) must be one of {sorted(PREFILL_COMMS)}")
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


def ring_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pcp_group: ProcessGroup,
                           scale: float, comm: str = "p2p", stats: CommStats | None = None) -> torch.Tensor:
    """Causal attention of this rank's DualChunkSwap shard over the whole sequence.

    ``q [b, hq, 2c, d]``, ``k``/``v [b, hkv, 2c, d]`` with ``hq % hkv == 0`` (GQA/MQA; K/V are never
    repeated); returns ``out [b, hq, 2c, d]`` in q's dtype, differentiable in q, k, v. Runs its
    collectives on ``pcp_group`` (every member must call with the same shapes, ``comm`` and ``scale``).
    """
    _validate(q, k, v, pcp_group, comm)
    return PREFILL_COMMS[comm].apply(q, k, v, pcp_group, scale, stats)
