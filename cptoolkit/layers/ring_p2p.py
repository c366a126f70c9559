"""Ring (P2P) prefill attention for DualChunkSwap shards, forward and backward.

Each PCP rank holds q, k, v for chunks ``r`` and ``2P-1-r`` (``[b, h, 2c, d]``). K/V travel around
the PCP group: at step ``i`` rank ``r`` holds the K/V of rank ``src = (r - i) mod P``, sends it on to
``r + 1`` and receives the next block from ``r - 1`` while it computes (send/recv overlapped with
attention). Only the causally needed part of each step is computed:

- ``src == r`` (step 0): the local ``2c`` tokens attend each other causally; the local order
  (chunk r, then the later chunk 2P-1-r) is already causal order.
- ``src < r``: every local query sees chunk ``src`` (the first half of the received K/V) in full
  and none of chunk ``2P-1-src``, which lies after both local chunks.
- ``src > r``: chunk ``r`` sees nothing; chunk ``2P-1-r`` sees both received chunks in full.

With a sliding ``window`` (``sliding_window``) a step computes only the chunk-by-chunk tiles the window
sees, each with its own band mask, and skips the rest (counted in ``stats.tiles``); ``softcap`` caps every
score (``block_attention``). Partials are merged by their log-sum-exp (``lse_merge.merge_two``). Per rank and layer the forward
issues ``P-1`` ``send_recv`` calls on the PCP group. The backward replays the ring: K/V circulate
again (``P-1`` calls), and each block's dK/dV accumulator follows its K/V one step behind, collecting
every rank's contribution, and takes one more step home to its owner (``P`` calls).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from cptoolkit.layers.block_attention import attention_backward, attention_forward
from cptoolkit.layers.comm import CommStats, send_recv
from cptoolkit.layers.dual_chunk_swap import chunk_ids
from cptoolkit.layers.lse_merge import add_sinks, merge_two, sinks_grad
from cptoolkit.layers.sliding_window import chunk_tiles, needs_window


def _ring_neighbours(pcp_group: ProcessGroup) -> tuple[int, int, int, int]:
    """``(pcp_rank, pcp_size, next_global_rank, prev_global_rank)`` of this rank's ring."""
    pcp_rank, pcp_size = dist.get_rank(pcp_group), dist.get_world_size(pcp_group)
    next_rank = dist.get_global_rank(pcp_group, (pcp_rank + 1) % pcp_size)
    prev_rank = dist.get_global_rank(pcp_group, (pcp_rank - 1) % pcp_size)
    return pcp_rank, pcp_size, next_rank, prev_rank


def _step_blocks(pcp_rank: int, pcp_size: int, src: int, chunk_len: int, window: Optional[int],
                 stats: CommStats | None) -> list[tuple[slice, slice, int, bool]]:
    """``(local query rows, received key rows, offset, causal)`` of every block a step computes, its tiles
    counted in ``stats``. Without a window one block per step: the causal local block (``src == r``), or the
    part of the received K/V every row, or no row, sees."""
    tiles, skipped = chunk_tiles(chunk_ids(pcp_rank, pcp_size), chunk_ids(src, pcp_size), chunk_len, window)
    if stats is not None:
        stats.record_tiles(len(tiles), skipped)
    if window is not None:
        return [(tile.rows, tile.keys, tile.offset, True) for tile in tiles]
    if src == pcp_rank:
        return [(slice(None), slice(None), 0, True)]
    if src < pcp_rank:
        return [(slice(None), slice(0, chunk_len), 0, False)]
    return [(slice(chunk_len, None), slice(None), 0, False)]


def _wait(works: list[dist.Work]) -> None:
    for work in works:
        work.wait()


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pcp_group: ProcessGroup, scale: float,
                 stats: CommStats | None, window: Optional[int] = None, softcap: Optional[float] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [b, hq, 2c, d] in q's dtype, lse [b, hq, 2c] float32)`` over the whole prefix (the
    ``window`` most recent positions of it, with a sliding window)."""
    pcp_rank, pcp_size, next_rank, prev_rank = _ring_neighbours(pcp_group)
    chunk_len = q.shape[2] // 2
    window = window if needs_window(window, 2 * pcp_size * chunk_len) else None
    kv = torch.stack([k, v])
    if window is not None:
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
    for step in range(pcp_size):
        if step + 1 < pcp_size:
            next_kv, works = send_recv(kv, next_rank, prev_rank, pcp_group, stats)
        for rows, keys, offset, causal in _step_blocks(pcp_rank, pcp_size, (pcp_rank - step) % pcp_size,
                                                        chunk_len, window, stats):
            block_out, block_lse = attention_forward(q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys],
                                                     causal=causal, scale=scale, offset=offset, window=window,
                                                     softcap=softcap)
            if step == 0 and window is None:
                # The diagonal block covers every local row: it starts the result (merging it into an empty
                # partial would return it unchanged, at the cost of a zero fill and a pass over [b, hq, 2c, d]).
                out, lse = block_out.float(), block_lse
            else:
                out[:, :, rows], lse[:, :, rows] = merge_two(out[:, :, rows], lse[:, :, rows], block_out,
                                                             block_lse)
        if step + 1 < pcp_size:
            _wait(works)
            kv = next_kv
    return out.to(q.dtype), lse


def ring_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, pcp_group: ProcessGroup, scale: float, stats: CommStats | None,
                  window: Optional[int] = None, softcap: Optional[float] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of the local shards, shaped like ``q, k, v``.

    ``out``/``lse`` are the forward's final (merged) values, so block gradients sum exactly.
    Gradients accumulate in float32 and travel the ring in float32.
    """
    pcp_rank, pcp_size, next_rank, prev_rank = _ring_neighbours(pcp_group)
    chunk_len = q.shape[2] // 2
    window = window if needs_window(window, 2 * pcp_size * chunk_len) else None
    kv = torch.stack([k, v])
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
    dkv_in, dkv_works = dkv, []  # from step 1 on: the accumulator arriving from rank r-1, and its receive
    for step in range(pcp_size):
        if step + 1 < pcp_size:
            next_kv, kv_works = send_recv(kv, next_rank, prev_rank, pcp_group, stats)
        if step > 0:
            # The accumulator of block src arrives from rank r-1, which held block src last step.
            _wait(dkv_works)
            dkv = dkv_in
        for rows, keys, offset, causal in _step_blocks(pcp_rank, pcp_size, (pcp_rank - step) % pcp_size,
                                                        chunk_len, window, None):
            block_dq, block_dk, block_dv = attention_backward(
                dout[:, :, rows], q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], out[:, :, rows],
                lse[:, :, rows], causal=causal, scale=scale, offset=offset, window=window, softcap=softcap)
            dq[:, :, rows] += block_dq
            dkv[0][:, :, keys] += block_dk
            dkv[1][:, :, keys] += block_dv
        if pcp_size > 1:
            dkv_in, dkv_works = send_recv(dkv, next_rank, prev_rank, pcp_group, stats)
        if step + 1 < pcp_size:
            _wait(kv_works)
            kv = next_kv
    if pcp_size > 1:
        _wait(dkv_works)
        dkv = dkv_in
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingP2PAttention(torch.autograd.Function):
    """Differentiable ring attention: ``apply(q, k, v, pcp_group, scale, stats, window, softcap, sinks) -> out``.
    ``sinks [hq]`` (or None) join each local query's denominator once, after the ring's last merge; the
    backward replays the ring from the output and LSE with sinks and returns this rank's share of their
    gradient (its own query rows)."""

    @staticmethod
    def forward(ctx, q, k, v, pcp_group, scale, stats, window, softcap, sinks):
        out, lse = add_sinks(*ring_forward(q, k, v, pcp_group, scale, stats, window, softcap), sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.pcp_group, ctx.scale, ctx.stats, ctx.window, ctx.softcap = pcp_group, scale, stats, window, softcap
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.pcp_group, ctx.scale, ctx.stats, ctx.window,
                                   ctx.softcap)
        return dq, dk, dv, None, None, None, None, None, sinks_grad(dout, out, lse, sinks)
