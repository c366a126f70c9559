"""All-gather prefill attention for DualChunkSwap shards, forward and backward.

The PCP group's K/V are gathered once (one ``all_gather`` of ``[2, b, hkv, 2c, d]`` per rank) and
restored to token order. Rank ``r``'s chunk ``j`` (``j = r`` and ``j = 2P-1-r``) attends keys
``[0, (j+1)c)``, computed as a full block over ``[0, jc)`` (absent for ``j = 0``) plus a causal
diagonal block over ``[jc, (j+1)c)``, merged by log-sum-exp; no sequence-long mask is built. With a
sliding ``window`` each chunk attends only the chunk-by-chunk tiles the window sees
(``sliding_window.chunk_tiles``), the others skipped and counted.

The gathered K/V are kept for the backward (memory ``O(seq_len_padded)`` per rank, no second
gather). The backward scatters dK/dV for the whole sequence back to the owners with one
``reduce_scatter`` on the PCP group, summing every rank's contribution.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from cptoolkit.layers.block_attention import attention_backward, attention_forward
from cptoolkit.layers.comm import CommStats, all_gather, reduce_scatter
from cptoolkit.layers.dual_chunk_swap import chunk_ids, shard_sequence, unshard_sequence
from cptoolkit.layers.lse_merge import add_sinks, merge_two, sinks_grad
from cptoolkit.layers.sliding_window import chunk_tiles, needs_window

_KV_SEQ_DIM = 3  # sequence dim of stacked K/V [2, b, hkv, s, d]


def _chunk_blocks(pcp_rank: int, pcp_size: int, chunk_len: int, window: Optional[int],
                  stats: CommStats | None) -> list[tuple[slice, slice, int, bool]]:
    """``(local query rows, gathered key rows, offset, causal)`` of every block rank ``pcp_rank`` computes,
    its tiles counted in ``stats``."""
    tiles, skipped = chunk_tiles(chunk_ids(pcp_rank, pcp_size), range(2 * pcp_size), chunk_len, window)
    if stats is not None:
        stats.record_tiles(len(tiles), skipped)
    if window is not None:
        return [(tile.rows, tile.keys, tile.offset, True) for tile in tiles]
    blocks = []
    for rows, chunk in zip((slice(0, chunk_len), slice(chunk_len, None)), chunk_ids(pcp_rank, pcp_size)):
        if chunk > 0:
            blocks.append((rows, slice(0, chunk * chunk_len), 0, False))
        blocks.append((rows, slice(chunk * chunk_len, (chunk + 1) * chunk_len), 0, True))
    return blocks


def allgather_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pcp_group: ProcessGroup, scale: float,
                      stats: CommStats | None, window: Optional[int] = None, softcap: Optional[float] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out [b, hq, 2c, d] in q's dtype, lse [b, hq, 2c] float32, kv_full [2, b, hkv, S, d])``."""
    pcp_rank, pcp_size = dist.get_rank(pcp_group), dist.get_world_size(pcp_group)
    chunk_len = q.shape[2] // 2
    window = window if needs_window(window, 2 * pcp_size * chunk_len) else None
    kv_full = unshard_sequence(all_gather(torch.stack([k, v]), pcp_group, stats), pcp_size, _KV_SEQ_DIM)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
    for rows, keys, offset, causal in _chunk_blocks(pcp_rank, pcp_size, chunk_len, window, stats):
        block_out, block_lse = attention_forward(q[:, :, rows], kv_full[0][:, :, keys], kv_full[1][:, :, keys],
                                                 causal=causal, scale=scale, offset=offset, window=window,
                                                 softcap=softcap)
        out[:, :, rows], lse[:, :, rows] = merge_two(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
    return out.to(q.dtype), lse, kv_full


def allgather_backward(dout: torch.Tensor, q: torch.Tensor, kv_full: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, pcp_group: ProcessGroup, scale: float, stats: CommStats | None,
                       window: Optional[int] = None, softcap: Optional[float] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of the local shards, from the forward's final ``out``/``lse``."""
    pcp_rank, pcp_size = dist.get_rank(pcp_group), dist.get_world_size(pcp_group)
    chunk_len = q.shape[2] // 2
    window = window if needs_window(window, 2 * pcp_size * chunk_len) else None
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv_full = torch.zeros(kv_full.shape, dtype=torch.float32, device=q.device)
    for rows, keys, offset, causal in _chunk_blocks(pcp_rank, pcp_size, chunk_len, window, None):
        block_dq, block_dk, block_dv = attention_backward(
            dout[:, :, rows], q[:, :, rows], kv_full[0][:, :, keys], kv_full[1][:, :, keys], out[:, :, rows],
            lse[:, :, rows], causal=causal, scale=scale, offset=offset, window=window, softcap=softcap)
        dq[:, :, rows] += block_dq
        dkv_full[0][:, :, keys] += block_dk
        dkv_full[1][:, :, keys] += block_dv
    per_owner = torch.stack([shard_sequence(dkv_full, owner, pcp_size, _KV_SEQ_DIM) for owner in range(pcp_size)])
    dkv = reduce_scatter(per_owner, pcp_group, stats)
    return dq.to(q.dtype), dkv[0].to(kv_full.dtype), dkv[1].to(kv_full.dtype)


class AllGatherPrefillAttention(torch.autograd.Function):
    """Differentiable all-gather attention: ``apply(q, k, v, pcp_group, scale, stats, window, softcap, sinks) ->
    out``. ``sinks [hq]`` (or None) join each local query's denominator once, after its blocks are merged; the
    backward returns this rank's share of their gradient (its own query rows)."""

    @staticmethod
    def forward(ctx, q, k, v, pcp_group, scale, stats, window, softcap, sinks):
        out, lse, kv_full = allgather_forward(q, k, v, pcp_group, scale, stats, window, softcap)
        out, lse = add_sinks(out, lse, sinks)
        ctx.save_for_backward(q, kv_full, out, lse, sinks)
        ctx.pcp_group, ctx.scale, ctx.stats, ctx.window, ctx.softcap = pcp_group, scale, stats, window, softcap
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv_full, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv = allgather_backward(dout, q, kv_full, out, lse, ctx.pcp_group, ctx.scale, ctx.stats,
                                        ctx.window, ctx.softcap)
        return dq, dk, dv, None, None, None, None, None, sinks_grad(dout, out, lse, sinks)
