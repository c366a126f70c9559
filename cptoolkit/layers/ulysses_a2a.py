"""Ulysses (all-to-all) prefill attention for DualChunkSwap shards, forward and backward.

Every member of a group of ``a`` ranks holds q, k, v of its DualChunkSwap shard (chunks ``r`` and
``2P-1-r``) for all its local heads, ``[b, h, 2c, d]``. An ``all_to_all`` on the group per tensor trades
the sequence shard for a head shard (``scatter_heads``): member ``i`` receives heads
``[i·h/a, (i+1)·h/a)`` of every member's two chunks, ``[a, b, h/a, 2c, d]`` in member order, which
``unshard_sequence`` reorders to the first chunks of members ``0..a-1`` followed by the second chunks
of members ``a-1..0``. For the whole PCP group (``a = P``, the ``a2a`` comm) that is token order
(chunks arrive as ``0, 2P-1, 1, 2P-2, …``), so one causal block over the sequence is exact; for an
inner group of ``a`` consecutive PCP ranks it is the group's DualChunkSwap shard of a ring over
super-chunks of ``a`` chunks (``hierarchical_prefill``). ``gather_heads`` is the inverse exchange.

KV heads: only query heads constrain the layout (``hq % a == 0``, the a2a record's rule in ``algorithms``).
Each KV head is repeated ``kv_replicas(hkv, a) = a / gcd(hkv, a)`` times before the exchange
(``repeat_interleave``, so query head ``i`` still reads the repeats of its own KV head ``i // (hq/hkv)``), which
makes the KV head count
divisible by ``a`` and gives each member exactly the KV heads its query heads read (MQA at ``a = 2``:
both members get the one KV head). The replicas' gradients are summed back. ``hq % a == 0`` and
``hq % hkv == 0`` imply ``hq`` is a multiple of ``hkv·kv_replicas``, so GQA grouping survives.

Per layer the ``a2a`` comm issues 4 ``all_to_all`` calls on the PCP group forward (q, k, v, out) and 4
backward (dout, dq, dk, dv), each moving this rank's whole local share of its tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from cptoolkit.layers.algorithms import kv_replicas
from cptoolkit.layers.block_attention import attention_backward, attention_forward
from cptoolkit.layers.comm import CommStats, all_to_all
from cptoolkit.layers.dual_chunk_swap import chunk_ids, unshard_sequence
from cptoolkit.layers.lse_merge import add_sinks, sinks_grad
from cptoolkit.layers.sliding_window import needs_window, sequence_tiles, windowed_backward, windowed_forward

_SEQ_DIM = 2  # [b, h, s, d]


def scatter_heads(tensors: list[torch.Tensor], group: ProcessGroup, stats: CommStats | None) -> list[torch.Tensor]:
    """One ``all_to_all`` on ``group`` (``a`` members) per tensor.

    Each ``[b, h, 2c, d]`` (this member's shard, ``h % a == 0``) becomes ``[b, h/a, a·2c, d]``: this
    member's head slice of the union of the members' shards, in ``unshard_sequence`` order. With one
    sequence (``b = 1``) a tensor's head slices are already contiguous and it is sent as it lies; the
    received pieces are copied once, into token order. One exchange per tensor rather than one of them
    packed: packing costs a copy, and gloo moved three 8 MiB exchanges in 13.5 ms where one of 24 MiB
    took 23.5 ms (2 ranks on this machine).
    """
    a = dist.get_world_size(group)
    if a == 1:
        return list(tensors)
    outs = []
    for t in tensors:
        b, h, s, d = t.shape
        by_member = t.view(b, a, h // a, s, d).movedim(1, 0)  # [a, b, h/a, 2c, d]: entry j goes to member j
        outs.append(unshard_sequence(all_to_all(by_member, group, stats), a, _SEQ_DIM))
    return outs


def gather_heads(tensors: list[torch.Tensor], group: ProcessGroup, stats: CommStats | None) -> list[torch.Tensor]:
    """Inverse of :func:`scatter_heads`, one ``all_to_all`` on ``group`` per tensor: each
    ``[b, h, a·2c, d]`` becomes ``[b, a·h, 2c, d]``, every member's head slice of this member's own shard.
    Each tensor is copied once into per-member order (member ``j`` gets chunks ``j`` and ``2a-1-j``)."""
    a = dist.get_world_size(group)
    if a == 1:
        return list(tensors)
    outs = []
    for t in tensors:
        b, h, s, d = t.shape
        chunks = t.view(b, h, 2 * a, s // (2 * a), d)
        send = torch.empty(a, b, h, 2, s // (2 * a), d, dtype=t.dtype, device=t.device)
        for member in range(a):
            first, second = chunk_ids(member, a)
            send[member, :, :, 0].copy_(chunks[:, :, first])
            send[member, :, :, 1].copy_(chunks[:, :, second])
        received = all_to_all(send, group, stats)  # [a, b, h, 2, c, d], entry j = head slice j
        outs.append(received.movedim(0, 1).reshape(b, a * h, s // a, d))
    return outs


def scatter_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ProcessGroup, stats: CommStats | None
                ) -> list[torch.Tensor]:
    """q, k, v shards → this member's heads over the group's tokens, KV heads replicated (three ``all_to_all``)."""
    replicas = kv_replicas(k.shape[1], dist.get_world_size(group))
    if replicas > 1:
        k, v = k.repeat_interleave(replicas, 1), v.repeat_interleave(replicas, 1)
    return scatter_heads([q, k, v], group, stats)


def gather_grads(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, num_kv_heads: int, group: ProcessGroup,
                 stats: CommStats | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Transpose of :func:`scatter_qkv` (three ``all_to_all``): gradients of the local shards, each KV
    head's replicas summed."""
    dq, dk, dv = gather_heads([dq, dk, dv], group, stats)
    replicas = kv_replicas(num_kv_heads, dist.get_world_size(group))
    if replicas == 1:
        return dq, dk, dv
    return dq, dk.unflatten(1, (num_kv_heads, replicas)).sum(2), dv.unflatten(1, (num_kv_heads, replicas)).sum(2)


def member_sinks(sinks: Optional[torch.Tensor], group: ProcessGroup) -> Optional[torch.Tensor]:
    """This member's slice of the shard's ``sinks [h]``: the sinks of the heads ``scatter_heads`` gives it,
    ``[i·h/a, (i+1)·h/a)``; None for None."""
    if sinks is None:
        return None
    per_member = sinks.shape[0] // dist.get_world_size(group)
    return sinks.narrow(0, dist.get_rank(group) * per_member, per_member)


def member_sinks_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: Optional[torch.Tensor],
                      group: ProcessGroup) -> Optional[torch.Tensor]:
    """Gradient of the shard's ``sinks [h]`` from this member's heads over the group's tokens (``dout``, ``out``,
    ``lse`` of those heads, ``lse_merge.sinks_grad``): this member reads only its slice (``member_sinks``), so the
    rest is zero here and summed in from the other members by the gradient all-reduce over PCP."""
    if sinks is None:
        return None
    grad = torch.zeros_like(sinks)
    own = member_sinks(grad, group)
    own.copy_(sinks_grad(dout, out, lse, member_sinks(sinks, group)))
    return grad


class UlyssesAttention(torch.autograd.Function):
    """Differentiable Ulysses attention: ``apply(q, k, v, pcp_group, scale, stats, window, softcap, sinks) -> out
    [b, hq, 2c, d]``.

    ``q [b, hq, 2c, d]``, ``k``/``v [b, hkv, 2c, d]``: this rank's DualChunkSwap shard; ``hq`` must be a
    multiple of the PCP size (the ``a2a`` record's rule, ``algorithms``). Saves the exchanged ``[b, hq/P, S, d]`` tensors for the
    backward (as much memory as the local shards, plus the KV replicas). With a sliding ``window`` the
    whole-sequence attention runs tile by tile (tiles of ``c`` positions, ``sliding_window.windowed_forward``),
    skipping the tiles the window cannot see; the exchanges are unchanged. ``sinks [hq]`` (or None): each
    member applies its heads' slice (``member_sinks``) to their whole-sequence result, before the exchange back.
    """

    @staticmethod
    def forward(ctx, q, k, v, pcp_group, scale, stats, window, softcap, sinks):
        q_seq, k_seq, v_seq = scatter_qkv(q, k, v, pcp_group, stats)
        chunk_len, seq_len = q.shape[2] // 2, q_seq.shape[2]
        window = window if needs_window(window, seq_len) else None
        if window is None:
            out_seq, lse_seq = attention_forward(q_seq, k_seq, v_seq, causal=True, scale=scale, softcap=softcap)
            if stats is not None:
                stats.record_tiles(len(sequence_tiles(seq_len, chunk_len, None)[0]), 0)
        else:
            out_seq, lse_seq = windowed_forward(q_seq, k_seq, v_seq, scale, window, softcap, chunk_len, stats)
        out_seq, lse_seq = add_sinks(out_seq, lse_seq, member_sinks(sinks, pcp_group))
        (out,) = gather_heads([out_seq], pcp_group, stats)
        ctx.save_for_backward(q_seq, k_seq, v_seq, out_seq, lse_seq, sinks)
        ctx.pcp_group, ctx.scale, ctx.stats, ctx.num_kv_heads = pcp_group, scale, stats, k.shape[1]
        ctx.window, ctx.softcap, ctx.chunk_len = window, softcap, chunk_len
        return out

    @staticmethod
    def backward(ctx, dout):
        q_seq, k_seq, v_seq, out_seq, lse_seq, sinks = ctx.saved_tensors
        (dout_seq,) = scatter_heads([dout], ctx.pcp_group, ctx.stats)
        if ctx.window is None:
            dq_seq, dk_seq, dv_seq = attention_backward(dout_seq, q_seq, k_seq, v_seq, out_seq, lse_seq,
                                                        causal=True, scale=ctx.scale, softcap=ctx.softcap)
        else:
            dq_seq, dk_seq, dv_seq = windowed_backward(dout_seq, q_seq, k_seq, v_seq, out_seq, lse_seq, ctx.scale,
                                                       ctx.window, ctx.softcap, ctx.chunk_len)
        dq, dk, dv = gather_grads(dq_seq, dk_seq, dv_seq, ctx.num_kv_heads, ctx.pcp_group, ctx.stats)
        dsinks = member_sinks_grad(dout_seq, out_seq, lse_seq, sinks, ctx.pcp_group)
        return dq, dk, dv, None, None, None, None, None, dsinks
