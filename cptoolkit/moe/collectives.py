"""The MoE layer's collectives: counted like the attention's (``cptoolkit.layers.comm``) and differentiable.

- ``gather_counts``: how many rows each EP rank sends each other one, per expert (a small all-gather: every
  member learns every member's counts, so each knows what it receives and the group's whole expert load);
- ``all_to_all_rows``: rows of uneven counts to each member (dispatch and its reverse, the combine); its
  gradient is the reverse all-to-all;
- ``reduce_partials``: the sum of replicated outputs' partial sums over a group (megatron's reduce-from-region:
  the gradient of a replicated output is already whole on every rank, so it passes through);
- ``copy_to_group``: identity forward, sum of the input gradients over the group backward (megatron's
  copy-to-region), for an input every member holds whole but each member uses only part of.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from cptoolkit.layers.comm import CommStats


def _record(stats: Optional[CommStats], name: str, tensor: torch.Tensor) -> None:
    if stats is not None:
        stats.record(name, tensor)


def gather_counts(counts: torch.Tensor, group: ProcessGroup, stats: Optional[CommStats] = None) -> torch.Tensor:
    """``counts [..., E]`` (int64: this rank's rows per expert, experts in EP-rank order) -> every member's,
    ``[G, ..., E]`` in member order: one all-gather over ``group``."""
    gathered = counts.new_empty(group.size() * counts.numel())  # flat: gloo wants a dim-0 concatenation
    _record(stats, "moe_counts_all_gather", counts)
    dist.all_gather_single(gathered, counts.contiguous().view(-1), group=group)
    return gathered.view(group.size(), *counts.shape)


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group, stats):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
        _record(stats, "moe_all_to_all", rows)
        dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        grad_rows = grad_out.new_empty((sum(send_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_rows, grad_out.contiguous(), output_split_sizes=send_splits,
                               input_split_sizes=recv_splits, group=ctx.group)
        return grad_rows, None, None, None, None


def all_to_all_rows(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: ProcessGroup,
                    stats: Optional[CommStats] = None) -> torch.Tensor:
    """``rows [sum(send_splits), ...]``: the first ``send_splits[0]`` to member 0, the next to member 1, ...;
    returns ``[sum(recv_splits), ...]``, member 0's rows first. One all-to-all over ``group``."""
    return _AllToAllRows.apply(rows, send_splits, recv_splits, group, stats)


class _ReducePartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial, group, stats):
        total = partial.clone()
        _record(stats, "moe_all_reduce", total)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return grad_total, None, None


def reduce_partials(partial: torch.Tensor, group: Optional[ProcessGroup], stats: Optional[CommStats] = None
                    ) -> torch.Tensor:
    """The sum of every member's ``partial`` (one all-reduce over ``group``; none for a group of one)."""
    if group is None or group.size() == 1:
        return partial
    return _ReducePartials.apply(partial, group, stats)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_group(tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """``tensor`` unchanged; its gradient summed over ``group`` (each member backpropagates only its part)."""
    if group is None or group.size() == 1 or not torch.is_grad_enabled() or not tensor.requires_grad:
        return tensor
    return _CopyToGroup.apply(tensor, group)
