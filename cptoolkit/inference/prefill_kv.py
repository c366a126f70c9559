"""Route prefill K/V from DualChunkSwap shards to their DCP KV-shard owners: one all-to-all per layer.

After prefill, PCP rank ``p`` holds K/V of its two DualChunkSwap chunks for its own KV heads, while
the decode cache wants, on DCP member ``s``, the tokens ``t`` with ``(t // interleave) % dcp == s`` for
every KV head of its DCP group. Each member therefore sends every other member exactly the tokens that
member stores (one ``all_to_all`` on the DCP group), rather than all-gathering the whole prompt's K/V
onto every rank: a member receives ``~1/dcp`` of the prompt's tokens, not all of them.

Which local tokens go where is a pure function of ``(seq_len_padded, pcp, dcp, interleave)``, so no
positions travel: every rank derives what it receives from whom.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from cptoolkit.inference.kv_cache import keep_where
from cptoolkit.layers.comm import CommStats, all_to_all
from cptoolkit.layers.dcp_decode import DecodeGroup, shard_of_position
from cptoolkit.layers.dual_chunk_swap import shard_positions


@dataclass(frozen=True)
class PrefillRoute:
    """For this member: ``send_index[s]`` = local token indices bound for member ``s``;
    ``recv_positions[m]`` = token positions member ``m`` sends here; ``width`` = the largest such count
    (every message is padded to it)."""

    send_index: list[torch.Tensor]
    recv_positions: list[torch.Tensor]
    width: int


def prefill_route(seq_len_padded: int, pcp_rank: int, dg: DecodeGroup) -> PrefillRoute:
    """The routing of one prefill batch (all sequences padded to ``seq_len_padded``)."""
    positions_of = [shard_positions(seq_len_padded, p, dg.pcp_size) for p in range(dg.pcp_size)]
    owner_of = [shard_of_position(pos, dg.dcp_size, dg.interleave) for pos in positions_of]
    send_index = [torch.nonzero(owner_of[pcp_rank] == s).flatten() for s in range(dg.dcp_size)]
    # Member m sits at PCP rank m % pcp_size of the group (TP-major, PCP-minor order).
    recv_positions = [positions_of[m % dg.pcp_size][owner_of[m % dg.pcp_size] == dg.dcp_rank]
                      for m in range(dg.dcp_size)]
    width = max(int((owner == s).sum()) for owner in owner_of for s in range(dg.dcp_size))
    return PrefillRoute(send_index, recv_positions, width)


def route_prefill_kv(k: torch.Tensor, v: torch.Tensor, seq_len_padded: int, pcp_rank: int, dg: DecodeGroup,
                     stats: CommStats | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This member's KV-shard tokens of the prefill K/V, for its DCP group's KV heads.

    ``k``/``v [b, hkv_local, 2c, d]``: this rank's DualChunkSwap shard of its own KV heads. Returns
    ``(k_shard, v_shard [b, hkv_group, n, d], positions [n])`` — padding positions included (callers
    drop those ``>= seq_len`` per sequence). One all-to-all on the DCP group (none when ``dcp == 1``).
    ``v is k`` (MLA's latent, key and value at once): the keys alone travel, and ``v_shard`` is ``k_shard``.
    """
    route = prefill_route(seq_len_padded, pcp_rank, dg)
    if dg.dcp_size == 1:
        return k, v, route.recv_positions[0]
    kv = torch.stack([k] if v is k else [k, v])  # [planes, b, hkv_local, 2c, d]
    send = kv.new_zeros((dg.dcp_size, *kv.shape[:3], route.width, kv.shape[-1]))
    for member, index in enumerate(route.send_index):
        send[member, ..., :len(index), :] = kv[..., index, :]
    received = all_to_all(send, dg.group, stats)  # [dcp, 2, b, hkv_local, width, d], by sender
    per_source = []
    for tp_position in dg.kv_source_tp_positions:  # the group's KV heads, in order
        senders = range(tp_position * dg.pcp_size, (tp_position + 1) * dg.pcp_size)
        per_source.append(torch.cat([received[m, ..., :len(route.recv_positions[m]), :] for m in senders],
                                    dim=-2))
    kv_group = torch.cat(per_source, dim=2)  # [planes, b, hkv_group, n, d]
    positions = torch.cat([route.recv_positions[m] for m in range(dg.pcp_size)])
    k_shard = kv_group[0]
    return k_shard, k_shard if v is k else kv_group[1], positions


def store_prefill_kv(cache, dg: DecodeGroup, pcp_rank: int, request_ids: Sequence[Hashable],
                     chunk_lens: Sequence[int], history: Sequence[int], seq_len_padded: int, layer_number: int,
                     k: torch.Tensor, v: torch.Tensor) -> None:
    """Keep this member's KV shard of one prefill layer's K/V in ``cache`` (a ``PagedKVCache``).

    ``k``/``v [b, hkv_local, 2c, d]`` are this rank's DualChunkSwap shard of its own KV heads for chunks of
    ``chunk_lens`` tokens starting at positions ``history[row]``; ``route_prefill_kv`` brings each member the
    tokens it stores (one all-to-all on the DCP group), padding tokens are never cached. The engine binds
    every argument but ``layer_number, k, v`` as a model's ``AttentionPhase.on_prefill_kv``.
    """
    k_shard, v_shard, positions = route_prefill_kv(k, v, seq_len_padded, pcp_rank, dg)
    for row, (request_id, chunk_len, start) in enumerate(zip(request_ids, chunk_lens, history)):
        real_positions, k_real, v_real = keep_where(positions < chunk_len, positions, k_shard[row].transpose(0, 1),
                                                    v_shard[row].transpose(0, 1))
        cache.fill_prefill(layer_number, request_id, k_real.transpose(0, 1), v_real.transpose(0, 1),
                           (real_positions + start).to(k.device))
