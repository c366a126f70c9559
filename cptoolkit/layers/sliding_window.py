"""Sliding-window attention over chunked sequences: which chunk-by-chunk tiles a window needs.

A windowed layer's query at position ``p`` sees the keys at positions ``(p - window, p]`` (transformers'
``sliding_window``). Every prefill algorithm cuts its sequence into chunks of ``c`` consecutive positions
(DualChunkSwap's ``2P`` chunks; the hierarchical ring's super-chunks), so its work is a set of tiles: query
chunk ``i`` against key chunk ``j <= i``, whose pairs lie ``(i - j)·c + a - b`` positions apart (rows ``a``,
columns ``b``). ``chunk_tiles`` keeps the tiles a window sees at least partly and counts the others, which are
never computed (``CommStats.tiles``): with ``window <= c`` a query chunk needs only itself and its
predecessor, so the attention work of a sequence grows linearly, not quadratically, with its length.
Without a window every causal tile is computed.

The window changes no collective: each algorithm still moves the same K/V (a ring step's block holds two
chunks far apart in the sequence, DualChunkSwap's pairing, so some tile of it is usually needed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from cptoolkit.layers.block_attention import (attention_backward, attention_forward, block_coverage, check_sinks,
                                              kernel_backend)
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.lse_merge import add_sinks, merge_two, sinks_grad


@dataclass(frozen=True)
class Tile:
    """One tile to compute: local query ``rows``, local key columns ``keys`` and the ``offset`` (query row 0
    sits ``offset`` positions after key column 0) the block kernels take with ``causal=True``."""

    rows: slice
    keys: slice
    offset: int


def chunk_tiles(query_chunks: Sequence[int], key_chunks: Sequence[int], chunk_len: int,
                window: Optional[int]) -> tuple[list[Tile], int]:
    """``(tiles, skipped)``: the causal tiles of query chunks ``query_chunks`` (chunk ids, local rows in that
    order, ``chunk_len`` each) against key chunks ``key_chunks`` (local columns likewise) that ``window``
    (None: no window) sees at least partly, and the number of causal tiles it sees none of."""
    tiles, skipped = [], 0
    for row_index, query_chunk in enumerate(query_chunks):
        rows = slice(row_index * chunk_len, (row_index + 1) * chunk_len)
        for key_index, key_chunk in enumerate(key_chunks):
            if key_chunk > query_chunk:
                continue
            offset = (query_chunk - key_chunk) * chunk_len
            if block_coverage(chunk_len, chunk_len, offset=offset, causal=True, window=window) == "none":
                skipped += 1
                continue
            tiles.append(Tile(rows, slice(key_index * chunk_len, (key_index + 1) * chunk_len), offset))
    return tiles, skipped


def needs_window(window: Optional[int], seq_len: int) -> bool:
    """Whether ``window`` masks anything in a sequence of ``seq_len`` positions (it does not when it is at
    least as long: the unwindowed kernels then compute the same thing faster)."""
    return window is not None and window < seq_len


def sequence_tiles(seq_len: int, tile_len: int, window: Optional[int]) -> tuple[list[Tile], int]:
    """``chunk_tiles`` for one sequence in position order (every query and key at its own position, the last
    tile shorter when ``tile_len`` does not divide ``seq_len``)."""
    starts = range(0, seq_len, tile_len)
    tiles, skipped = [], 0
    for query_start in starts:
        rows = slice(query_start, min(query_start + tile_len, seq_len))
        for key_start in starts:
            if key_start > query_start:
                break
            keys = slice(key_start, min(key_start + tile_len, seq_len))
            offset = query_start - key_start
            coverage = block_coverage(rows.stop - rows.start, keys.stop - keys.start, offset=offset, causal=True,
                                      window=window)
            if coverage == "none":
                skipped += 1
            else:
                tiles.append(Tile(rows, keys, offset))
    return tiles, skipped


def windowed_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int,
                     softcap: Optional[float], tile_len: int, stats: CommStats | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window causal attention of one position-ordered sequence, tile by tile: ``q [b, hq, s, d]``,
    ``k``/``v [b, hkv, s, d]`` -> ``(out [b, hq, s, d] in q's dtype, lse [b, hq, s] float32)``. Tiles of
    ``tile_len`` the window cannot see are skipped (and counted in ``stats``); no ``s x s`` mask is built."""
    tiles, skipped = sequence_tiles(q.shape[2], tile_len, window)
    if stats is not None:
        stats.record_tiles(len(tiles), skipped)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
    for tile in tiles:
        block_out, block_lse = attention_forward(q[:, :, tile.rows], k[:, :, tile.keys], v[:, :, tile.keys],
                                                 causal=True, scale=scale, offset=tile.offset, window=window,
                                                 softcap=softcap)
        out[:, :, tile.rows], lse[:, :, tile.rows] = merge_two(out[:, :, tile.rows], lse[:, :, tile.rows],
                                                               block_out, block_lse)
    return out.to(q.dtype), lse


def windowed_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, scale: float, window: int, softcap: Optional[float], tile_len: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of ``windowed_forward`` from its ``out``/``lse``, over the same tiles."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for tile in sequence_tiles(q.shape[2], tile_len, window)[0]:
        block_dq, block_dk, block_dv = attention_backward(
            dout[:, :, tile.rows], q[:, :, tile.rows], k[:, :, tile.keys], v[:, :, tile.keys], out[:, :, tile.rows],
            lse[:, :, tile.rows], causal=True, scale=scale, offset=tile.offset, window=window, softcap=softcap)
        dq[:, :, tile.rows] += block_dq
        dk[:, :, tile.keys] += block_dk
        dv[:, :, tile.keys] += block_dv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class LocalAttention(torch.autograd.Function):
    """Differentiable attention of one whole sequence on this rank (PCP = 1), causal, with an optional
    sliding window, softcap and attention sinks: ``apply(q, k, v, scale, window, softcap, stats, sinks=None) ->
    out [b, hq, s, d]``. Windowed: tiles of ``window`` positions (each query tile needs two key tiles at most).
    ``sinks [hq]`` join every query's denominator once, after its tiles are merged (``lse_merge.add_sinks``)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, window, softcap, stats, sinks=None):
        check_sinks(sinks, q.shape[1], kernel_backend(q.device))
        window = window if needs_window(window, q.shape[2]) else None
        if window is None:
            out, lse = attention_forward(q, k, v, causal=True, scale=scale, softcap=softcap)
        else:
            out, lse = windowed_forward(q, k, v, scale, window, softcap, window, stats)
        out, lse = add_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.scale, ctx.window, ctx.softcap = scale, window, softcap
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        if ctx.window is None:
            grads = attention_backward(dout, q, k, v, out, lse, causal=True, scale=ctx.scale, softcap=ctx.softcap)
        else:
            grads = windowed_backward(dout, q, k, v, out, lse, ctx.scale, ctx.window, ctx.softcap, ctx.window)
        return (*grads, None, None, None, None, sinks_grad(dout, out, lse, sinks))
