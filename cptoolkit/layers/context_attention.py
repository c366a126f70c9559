"""Context attention: a prefill chunk's queries over the request's DCP-sharded history and the chunk.

Chunked prefill and prefix reuse (DESIGN.md "Context attention") give each request of a batch a
history of ``history_lens[i]`` tokens already in the KV cache, sharded over the DCP group by position
(``dcp_decode.shard_of_position``), and a new chunk at positions ``history_lens[i] + j``,
DualChunkSwap-split over the PCP group like a prompt (all chunks of the batch padded at their end to
one length, so the chunk-relative causal mask is the same for every request). A chunk token's
exact attention is the LSE merge of two partials:

(a) the history, every cached token of its request. It precedes every chunk token, so no mask is
    needed: this is DCP decode with many query rows. Every member of the DCP group (``k`` TP
    positions x all PCP ranks, ``DecodeGroup``) gathers the queries of its group's heads for the
    whole chunk, attends its own shard (``dcp_decode.attend_shard``), and the partials go back to
    the query owners (member ``s`` owns TP position ``s // pcp_size``'s heads and PCP rank
    ``s % pcp_size``'s chunk tokens).
(b) the chunk itself, causally, by the ring or the all-gather prefill over the PCP group (their
    forward functions return the LSE; a PCP of 1 attends locally).

A sliding-window layer (``window``) keeps, in (a), only the history slots each query's window reaches (a
slot range per query, ``dcp_decode.window_slot_ranges``: the columns before the latest ``window`` positions
are cut off before any score is computed), and in (b) only the chunk tiles its window sees. Attention sinks
(gpt-oss) join a query's denominator once, after (a) and (b) are merged: neither partial is final alone.

Collectives per call (``a2a``/``ag_rs`` = ``decode_comm``, ``p2p``/``all_gather`` = ``prefill_comm``),
none of them depending on the history lengths (an empty history still takes part, with
``lse = -inf``)::

    history, DCP group   DCP = 1: 0
                         a2a:     all_gather(q) + all_to_all(out|lse)                    = 2
                         ag_rs:   all_gather(q) + all_gather(lse) + reduce_scatter(out)  = 3
    chunk, PCP group     PCP = 1: 0;  p2p: PCP-1 send_recv;  all_gather: 1 all_gather(k|v)

Bytes sent per rank, with ``b`` requests, ``L = 2c`` local chunk tokens, ``hq``/``hkv`` this rank's
query/KV heads, head dim ``d``, ``e`` bytes per element of q/k/v, ``P`` = PCP size and
``DCP = k * P``: all_gather(q) ``b*hq*L*d*e``; all_to_all ``DCP*b*hq*L*(d+1)*4``; all_gather(lse)
``b*k*hq*P*L*4``; reduce_scatter ``DCP*b*hq*L*d*4``; each send_recv, and the chunk all_gather,
``2*b*hkv*L*d*e``. The history's cost in compute grows with its length; its traffic does not.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from cptoolkit.layers.algorithms import DecodeComm, decode_algorithm, history_names, prefill_algorithm
from cptoolkit.layers.block_attention import attention_forward, check_sinks, kernel_backend
from cptoolkit.layers.comm import CommStats, all_gather
from cptoolkit.layers.dcp_decode import (DecodeGroup, ShardedKVCache, attend_shard, attend_shard_range,
                                         combine_partials, shard_length, window_slot_ranges)
from cptoolkit.layers.dual_chunk_swap import shard_positions
from cptoolkit.layers.lse_merge import add_sinks, merge_two
from cptoolkit.layers.sliding_window import needs_window, windowed_forward


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, history_lens: torch.Tensor, dg: DecodeGroup,
              pcp_group: ProcessGroup | None, prefill_comm: str, decode_comm: str,
              sinks: Optional[torch.Tensor]) -> None:
    if not prefill_algorithm(prefill_comm).attends_history:
        raise ValueError(f"prefill_comm ({prefill_comm!r}) must be one of {history_names()}: context attention "
                         "needs the chunk's LSE, which only their forwards return")
    decode_algorithm(decode_comm)
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"context attention expects q [b, hq, 2c, d] and k, v [b, hkv, 2c, d] of equal shape; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    (batch, hq, local_len, head_dim), (batch_kv, hkv, local_len_kv, head_dim_kv) = q.shape, k.shape
    if (batch, local_len, head_dim) != (batch_kv, local_len_kv, head_dim_kv) or hq % hkv:
        raise ValueError(f"q and k, v must agree on batch, local chunk length and head_dim, with query heads a "
                         f"multiple of KV heads; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if local_len == 0 or local_len % 2:
        raise ValueError(f"local chunk length ({local_len}) must be even and positive: a DualChunkSwap shard is "
                         "two equal chunks; pad the chunk with dual_chunk_swap.padded_length()")
    if history_lens.shape != (batch,) or history_lens.dtype != torch.int64 or bool((history_lens < 0).any()):
        raise ValueError(f"history_lens must be int64 [{batch}] with entries >= 0; "
                         f"got {history_lens.dtype} {tuple(history_lens.shape)}")
    pcp_size = 1 if pcp_group is None else dist.get_world_size(pcp_group)
    if pcp_size != dg.pcp_size:
        raise ValueError(f"pcp_group's size ({pcp_size}) must equal the decode group's pcp_size ({dg.pcp_size}): "
                         "pass this rank's PCP group (None only when PCP = 1)")
    check_sinks(sinks, hq, kernel_backend(q.device))


def _history_shard(kv_cache: ShardedKVCache, history_lens: torch.Tensor, hkv_group: int, dg: DecodeGroup
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This member's tokens of every request's history: ``(k, v [b, hkv_group, n_max, d], lens [b])``, column
    0 holding slot ``kv_cache.first_slots()``; ``lens`` counts the history's columns.

    The cache may hold more than the history (the engine may already have stored the chunk's own
    K/V); only each request's slots below ``shard_length(history_lens[i])`` are history.
    """
    k_shard, v_shard, cached_lens = kv_cache.read()
    column_0 = kv_cache.first_slots().cpu()
    if k_shard.shape[1] != hkv_group:
        raise ValueError(f"the cache holds {k_shard.shape[1]} KV heads but the DCP group's query heads read "
                         f"{hkv_group}; build it with the group's KV heads (ParallelLayout.dcp_kv_heads_of)")
    lens = torch.tensor([shard_length(length, dg.dcp_rank, dg.dcp_size, dg.interleave)
                         for length in history_lens.tolist()], dtype=torch.int64) - column_0
    short = (lens > cached_lens.cpu()).nonzero()
    if len(short):
        request = int(short[0])
        raise ValueError(f"request {request} has history_lens {int(history_lens[request])}, of which shard "
                         f"{dg.dcp_rank} stores {int(lens[request] + column_0[request])}, but its cache holds "
                         f"{int(cached_lens[request] + column_0[request])}: store the whole history before "
                         "attending it")
    n_max = int(lens.max()) if len(lens) else 0
    return k_shard[:, :, :n_max], v_shard[:, :, :n_max], lens.to(k_shard.device)


def gather_chunk_queries(q: torch.Tensor, dg: DecodeGroup, stats: CommStats | None = None) -> torch.Tensor:
    """Every chunk query of the DCP group's heads: ``q [b, hq_local, L, d]`` -> ``[b, k*hq_local, P*L, d]``.

    One all-gather on the DCP group (none when ``dcp_size == 1``). Heads come in TP order, tokens in
    PCP-rank order (each rank's DualChunkSwap shard in turn): the history needs no mask, so the
    tokens need not be in position order.
    """
    if dg.dcp_size == 1:
        return q
    gathered = all_gather(q, dg.group, stats)  # [dcp, b, hq_local, L, d], member s = (s // P, s % P)
    per_position = gathered.unflatten(0, (dg.tp_positions, dg.pcp_size))
    return per_position.permute(2, 0, 3, 1, 4, 5).flatten(3, 4).flatten(1, 2)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pcp_group: ProcessGroup | None,
                    prefill_comm: str, scale: float, stats: CommStats | None = None, window: Optional[int] = None,
                    softcap: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of this rank's DualChunkSwap shard over the chunk: ``(out [b, hq, L, d], lse [b, hq, L])``.

    Collectives on ``pcp_group``: the ring's ``P-1`` send_recv or one all_gather; none when PCP = 1.
    """
    if pcp_group is None or dist.get_world_size(pcp_group) == 1:
        if needs_window(window, q.shape[2]):
            return windowed_forward(q, k, v, scale, window, softcap, window, stats)
        return attention_forward(q, k, v, causal=True, scale=scale, softcap=softcap)
    out, lse, *_ = prefill_algorithm(prefill_comm).history_forward(q, k, v, pcp_group, scale, stats, window, softcap)
    return out, lse


def _history_partial(q_group: torch.Tensor, k_history: torch.Tensor, v_history: torch.Tensor,
                     history_shard_lens: torch.Tensor, column_0: torch.Tensor, history_lens: torch.Tensor,
                     dg: DecodeGroup, scale: float, window: Optional[int], softcap: Optional[float]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a): ``q_group [b, hq_group, P*L, d]`` over this member's history columns. Without a window or softcap
    every query sees every history column (the block kernel); otherwise each query its own column range
    (``window_slot_ranges`` at its position ``history_lens[i] + chunk position``)."""
    if window is None and softcap is None:
        return attend_shard(q_group, k_history, v_history, history_shard_lens, scale)
    local_len = q_group.shape[2] // dg.pcp_size
    chunk_positions = torch.cat([shard_positions(dg.pcp_size * local_len, rank, dg.pcp_size)
                                 for rank in range(dg.pcp_size)]).to(history_lens.device)
    positions = history_lens[:, None] + chunk_positions[None, :]  # [b, P*L], gather_chunk_queries' token order
    first, _ = window_slot_ranges(positions, window, dg)
    first = (first - column_0[:, None].to(first.device)).clamp(min=0)
    end = history_shard_lens[:, None].expand_as(first)
    return attend_shard_range(q_group, k_history, v_history, first, end, scale, softcap)


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: ShardedKVCache,
                      history_lens: torch.Tensor, dg: DecodeGroup, pcp_group: ProcessGroup | None,
                      prefill_comm: str, decode_comm: DecodeComm, scale: float,
                      stats: CommStats | None = None, window: Optional[int] = None,
                      softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of a prefill chunk over each request's cached history and, causally, the chunk itself.

    ``q [b, hq_local, 2c, d]``, ``k``/``v [b, hkv_local, 2c, d]``: this rank's TP heads of its
    DualChunkSwap shard of the chunk (request ``i``'s chunk token ``j`` sits at position
    ``history_lens[i] + j``; padding at the chunk's end). ``kv_cache.read()`` gives this member's
    shard of the DCP group's KV heads (``PagedKVCache.view`` or ``ContiguousShardCache``); it must
    hold at least each request's first ``history_lens[i]`` (int64 ``[b]``, 0 allowed) tokens and
    may hold more. ``dg`` runs the history collectives, ``pcp_group`` (``None`` when PCP = 1) the
    chunk's. Returns ``[b, hq_local, 2c, d]`` in q's dtype, equal to causal attention over history
    and chunk (over each token's ``window`` latest positions with a sliding window; scores capped by
    ``softcap``; ``sinks [hq_local]``, gpt-oss attention sinks, join every query's denominator once, after
    history and chunk are merged). Every member must call with the same shapes, ``history_lens`` and comms;
    all checks run before the first collective. Forward only (inference).
    """
    _validate(q, k, v, history_lens, dg, pcp_group, prefill_comm, decode_comm, sinks)
    hkv_group = k.shape[1] * len(dg.kv_source_tp_positions)
    k_history, v_history, history_shard_lens = _history_shard(kv_cache, history_lens, hkv_group, dg)
    q_group = gather_chunk_queries(q, dg, stats)
    out_history, lse_history = _history_partial(q_group, k_history, v_history, history_shard_lens,
                                                kv_cache.first_slots(), history_lens, dg, scale, window, softcap)
    out_chunk, lse_chunk = chunk_attention(q, k, v, pcp_group, prefill_comm, scale, stats, window, softcap)
    out_history, lse_history = combine_partials(out_history, lse_history, dg, decode_comm, stats, split_tokens=True)
    out, _ = add_sinks(*merge_two(out_chunk.float(), lse_chunk, out_history, lse_history), sinks)
    return out.to(q.dtype)
