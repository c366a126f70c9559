"""``MoELayer``: routed experts (and a shared one) as megatron's ``mlp`` submodule, expert-parallel.

Placement (``ExpertPlacement``; the layout's rule, ``cptoolkit.layout``): the replica's TP·PCP ranks are EP x ETP;
EP rank ``r`` holds routed experts ``[r·E/EP, (r+1)·E/EP)``, each split over its ETP group by FFN columns (ETP
divides TP, so an ETP group is a block of consecutive TP ranks). The shared expert is split over TP like the dense
MLP. The input rows are replicated over TP (attention's output projection ends in a TP all-reduce).

Prefill (tokens distinct across PCP ranks, replicated across TP): the TP group's ``TP / ETP`` blocks each take
a contiguous share of the rows, so no expert computes a token twice; each rank routes its block's rows,
dispatches them over the EP group to the ranks holding their experts (an all-gather of counts, an all-to-all of rows),
those compute their FFN slice, the rows come back (the reverse all-to-all), are weighted and summed per token;
one all-reduce over TP then adds the blocks' rows, the ETP slices and the shared expert's TP slices at once.
Decode (every rank of the replica holds the same rows): each rank routes every row, runs its own experts on the
rows that chose them, and one all-reduce over the replica adds it all (the shared expert counted on PCP rank 0
only). A rank with no rows for some expert, or none at all, computes nothing for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.distributed import ProcessGroup

from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.models.moe_dims import MoEDims
from cptoolkit.moe.collectives import all_to_all_rows, copy_to_group, gather_counts, reduce_partials
from cptoolkit.moe.routing import Routing, route


def _size(group: Optional[ProcessGroup]) -> int:
    return 1 if group is None else group.size()


def _rank(group: Optional[ProcessGroup]) -> int:
    return 0 if group is None else group.rank()


@dataclass(frozen=True)
class MoEGroups:
    """This rank's groups for the MoE layer (``None``: a group of this rank alone).

    ``tp``: its TP group; ``ep``: its expert-parallel group (group rank = EP rank); ``etp``: the ranks splitting
    the same experts (a block of ``etp.size()`` consecutive TP ranks, group rank = slice); ``replica``: its
    replica's TP·PCP ranks; ``pcp_rank``: its PCP rank."""

    tp: Optional[ProcessGroup]
    ep: Optional[ProcessGroup]
    etp: Optional[ProcessGroup]
    replica: Optional[ProcessGroup]
    pcp_rank: int = 0

    @classmethod
    def from_pg_collection(cls, pg_collection, pcp_rank: int) -> MoEGroups:
        """From megatron's ``ProcessGroupCollection`` (``ParallelGroups.megatron_pg_collection``: ``ep``,
        ``expt_tp``, ``tp_ep`` = the replica). A collection without ``ep`` (no expert layout) is EP = 1 with the
        experts split over TP, which is only a replica without PCP."""
        if hasattr(pg_collection, "ep"):
            return cls(tp=pg_collection.tp, ep=pg_collection.ep, etp=pg_collection.expt_tp,
                       replica=pg_collection.tp_ep, pcp_rank=pcp_rank)
        if pcp_rank != 0:
            raise ValueError("MoEGroups: a process-group collection without 'ep' describes no expert layout; rule: "
                             "with PCP > 1 build the model from ParallelGroups.megatron_pg_collection")
        return cls(tp=pg_collection.tp, ep=None, etp=pg_collection.tp, replica=pg_collection.tp)

    @property
    def tp_blocks(self) -> int:
        """TP / ETP: how many shares the TP group splits the prefill rows into."""
        return _size(self.tp) // _size(self.etp)


@dataclass(frozen=True)
class ExpertPlacement:
    """Which slice of which experts this rank holds: experts ``[ep_rank·E/EP, (ep_rank+1)·E/EP)``, FFN columns
    ``[etp_rank·F/ETP, (etp_rank+1)·F/ETP)`` of each."""

    num_experts: int
    ffn_hidden_size: int
    ep_rank: int
    ep_size: int
    etp_rank: int
    etp_size: int

    def __post_init__(self):
        if self.num_experts % self.ep_size:
            raise ValueError(f"num_experts={self.num_experts} must be a multiple of the expert-parallel size "
                             f"EP={self.ep_size} (each EP rank holds num_experts / EP whole experts)")
        if self.ffn_hidden_size % self.etp_size:
            raise ValueError(f"moe ffn_hidden_size={self.ffn_hidden_size} must be a multiple of the expert-TP size "
                             f"ETP={self.etp_size} (= TP·PCP / EP: the ranks splitting one expert's FFN)")

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def first_expert(self) -> int:
        return self.ep_rank * self.num_local

    @property
    def ffn_local(self) -> int:
        return self.ffn_hidden_size // self.etp_size


class Router(torch.nn.Module):
    """``weight [E, hidden]`` (+ ``bias [E]`` with ``router_bias``, + DeepSeek-V3's ``score_correction_bias [E]``,
    not trained by gradients); the same on every rank."""

    def __init__(self, hidden_size: int, dims: MoEDims, dtype: torch.dtype):
        super().__init__()
        self.dims = dims
        self.weight = torch.nn.Parameter(torch.empty(dims.num_experts, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.empty(dims.num_experts, dtype=dtype)) if dims.router_bias else None
        self.score_correction_bias = (torch.nn.Parameter(torch.empty(dims.num_experts, dtype=dtype),
                                                         requires_grad=False)
                                      if dims.score_correction_bias else None)

    def forward(self, rows: torch.Tensor) -> Routing:
        """``rows [n, hidden]`` -> their ``Routing``, in float32 (float64 for a float64 model)."""
        dtype = torch.promote_types(rows.dtype, torch.float32)
        bias = None if self.bias is None else self.bias.to(dtype)
        logits = F.linear(rows.to(dtype), self.weight.to(dtype), bias)
        return route(logits, self.dims, self.score_correction_bias)


class LocalExperts(torch.nn.Module):
    """This rank's routed experts (``placement``), each its FFN slice, computing ``dims.activation``.

    ``fc1_weight [E_local · 2·F_local, hidden]``: per local expert its first projection's rows (``swiglu``: its gate
    rows then its up rows; ``gpt_oss``: interleaved gate/up pairs, so a contiguous slice holds whole pairs);
    ``fc2_weight [E_local · F_local, hidden]``: per local expert its down projection transposed. With
    ``dims.expert_bias``: ``fc1_bias [E_local · 2·F_local]`` (rows as ``fc1_weight``'s) and ``fc2_bias [E_local,
    hidden]``, whole per expert, added by the first rank of the ETP group only (the others' outputs are partial
    sums)."""

    def __init__(self, hidden_size: int, placement: ExpertPlacement, groups: MoEGroups, dims: MoEDims,
                 dtype: torch.dtype):
        super().__init__()
        self.placement, self.groups, self.dims = placement, groups, dims
        local, ffn = placement.num_local, placement.ffn_local
        self.fc1_weight = torch.nn.Parameter(torch.empty(local * 2 * ffn, hidden_size, dtype=dtype))
        self.fc2_weight = torch.nn.Parameter(torch.empty(local * ffn, hidden_size, dtype=dtype))
        self.fc1_bias = self.fc2_bias = None
        if dims.expert_bias:
            self.fc1_bias = torch.nn.Parameter(torch.empty(local * 2 * ffn, dtype=dtype))
            self.fc2_bias = torch.nn.Parameter(torch.empty(local, hidden_size, dtype=dtype))

    def _activation(self, projected: torch.Tensor) -> torch.Tensor:
        """``[m, 2·F_local]`` first-projection outputs -> ``[m, F_local]`` (``MoEDims.activation``)."""
        if self.dims.activation == "swiglu":
            gate, up = projected.chunk(2, dim=-1)
            return F.silu(gate) * up
        limit = self.dims.swiglu_limit
        gate, up = projected[..., ::2].clamp(max=limit), projected[..., 1::2].clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.dims.swiglu_alpha)

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``rows [m, hidden]`` sorted by local expert, ``counts[e]`` of them for local expert ``e`` ->
        this rank's FFN slice of each row's expert output ``[m, hidden]`` (a partial sum over the ETP group)."""
        local, ffn = self.placement.num_local, self.placement.ffn_local
        fc1 = self.fc1_weight.view(local, 2 * ffn, -1)
        fc2 = self.fc2_weight.view(local, ffn, -1)
        fc1_bias = None if self.fc1_bias is None else self.fc1_bias.view(local, 2 * ffn)
        add_fc2_bias = self.fc2_bias is not None and self.placement.etp_rank == 0
        outputs, start = [], 0
        for expert, count in enumerate(counts):
            if count:
                projected = rows[start:start + count] @ fc1[expert].t()
                if fc1_bias is not None:
                    projected = projected + fc1_bias[expert]
                out = self._activation(projected) @ fc2[expert]
                outputs.append(out + self.fc2_bias[expert] if add_fc2_bias else out)
                start += count
        return torch.cat(outputs) if outputs else rows[:0]


class SharedExpert(torch.nn.Module):
    """The expert every token takes: a SwiGLU MLP split over TP like the dense one (``linear_fc1`` this rank's
    gate rows then up rows, ``linear_fc2`` its columns); ``forward`` gives this rank's partial sum."""

    def __init__(self, hidden_size: int, ffn_local: int, dtype: torch.dtype):
        super().__init__()
        self.linear_fc1 = torch.nn.Linear(hidden_size, 2 * ffn_local, bias=False, dtype=dtype)
        self.linear_fc2 = torch.nn.Linear(ffn_local, hidden_size, bias=False, dtype=dtype)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(rows).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


@dataclass(frozen=True)
class RoutingRecord:
    """What one training forward's routing saw on the rows this rank owns (the first rank of each ETP group
    records; the others record zeros, so summing over every rank counts each row once).

    ``score_sums [E]`` (differentiable): each row's scores, normalised to sum 1 per row, summed over the rows;
    ``counts [E]`` (float64): (row, slot) assignments per expert; ``rows``: rows routed."""

    score_sums: torch.Tensor
    counts: torch.Tensor
    rows: int


def block_rows(num_rows: int, num_blocks: int, block: int) -> tuple[int, int]:
    """``[start, stop)`` of block ``block`` when ``num_rows`` rows are split into ``num_blocks`` contiguous shares
    whose sizes differ by at most one (the first ``num_rows % num_blocks`` one larger)."""
    base, extra = divmod(num_rows, num_blocks)
    start = block * base + min(block, extra)
    return start, start + base + (block < extra)


class MoELayer(MegatronModule):
    """megatron's ``mlp`` submodule for a layer with routed experts: ``forward(hidden [s, b, h])`` ->
    ``(output [s, b, h], None)``, replicated over TP like the dense MLP's. ``runtime``'s phase picks the prefill
    dispatch or the decode reduce (module docstring); its ``layer_stats`` count every collective.
    ``expert_tokens [E]`` counts every (token, slot) routed to each expert, the replica's whole load, on every rank
    (prefill: from the gathered counts; decode: every rank routes every row), padding left out, for the engine's
    metrics."""

    def __init__(self, config: TransformerConfig, dims: MoEDims, groups: MoEGroups, runtime: AttentionRuntime):
        super().__init__(config)
        hidden, dtype = config.hidden_size, config.params_dtype
        tp_size = _size(groups.tp)
        if dims.shared_ffn_hidden_size % tp_size:
            raise ValueError(f"shared expert ffn_hidden_size={dims.shared_ffn_hidden_size} must be a multiple of "
                             f"TP={tp_size} (it is split over TP like the dense MLP)")
        self.dims, self.groups, self.runtime = dims, groups, runtime
        self.placement = ExpertPlacement(dims.num_experts, dims.ffn_hidden_size, _rank(groups.ep), _size(groups.ep),
                                         _rank(groups.etp), _size(groups.etp))
        self.router = Router(hidden, dims, dtype)
        self.experts = LocalExperts(hidden, self.placement, groups, dims, dtype)
        self.shared_experts = (SharedExpert(hidden, dims.shared_ffn_hidden_size // tp_size, dtype)
                               if dims.shared_ffn_hidden_size else None)
        self.shared_expert_gate = (torch.nn.Linear(hidden, 1, bias=False, dtype=dtype)
                                   if dims.shared_expert_gate else None)
        self.layer_number = 0
        self.routing_record: Optional[RoutingRecord] = None
        # (token, slot) assignments per expert over every forward of this replica: the same on each of its ranks.
        self.register_buffer("expert_tokens", torch.zeros(dims.num_experts, dtype=torch.int64), persistent=False)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, None]:
        """``hidden [s, b, h]``; ``padding_mask [b, s]`` (megatron's convention: True at padding tokens) keeps
        padding out of the ``routing_record`` and ``expert_tokens`` (padding rows are still computed, like every
        row)."""
        rows = hidden.reshape(-1, hidden.shape[-1])
        is_padding = None if padding_mask is None else padding_mask.t().reshape(-1)
        stats = self.runtime.layer_stats(self.layer_number)
        if self.runtime.phase.mode == "decode":
            out = self._decode(rows, is_padding, stats)
        else:
            out = self._prefill(rows, is_padding, stats)
        return out.view_as(hidden), None

    def _shared(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's TP partial of the shared expert on ``rows [n, h]`` (gated: the gate is whole per rank)."""
        out = self.shared_experts(rows)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(rows)) * out
        return out

    def _prefill(self, rows: torch.Tensor, is_padding: Optional[torch.Tensor], stats: CommStats) -> torch.Tensor:
        groups = self.groups
        rows = copy_to_group(rows, groups.tp)  # each TP rank uses part of the rows: their gradient sums over TP
        start, stop = block_rows(rows.shape[0], groups.tp_blocks, _rank(groups.tp) // _size(groups.etp))
        routed = self._dispatch(rows[start:stop], None if is_padding is None else is_padding[start:stop], stats)
        partial = torch.cat([rows.new_zeros(start, rows.shape[1]), routed,
                             rows.new_zeros(rows.shape[0] - stop, rows.shape[1])])
        if self.shared_experts is not None:
            partial = partial + self._shared(rows)
        return reduce_partials(partial, groups.tp, stats)

    def _dispatch(self, rows: torch.Tensor, is_padding: Optional[torch.Tensor], stats: CommStats) -> torch.Tensor:
        """The routed experts' output (this rank's ETP slice) for ``rows [m, h]``, which this rank owns:
        dispatched over the EP group and back. ``is_padding [m]`` (or None) only shapes what is counted (the routing
        record, ``expert_tokens``)."""
        placement, top_k = self.placement, self.dims.top_k
        weights, experts, scores = self.router(rows)
        flat_experts = experts.flatten()
        order = flat_experts.argsort(stable=True)  # (row, slot) pairs grouped by expert, so by EP rank
        sorted_rows = rows[order // top_k]
        counts = torch.bincount(flat_experts, minlength=placement.num_experts)
        real_counts = _real_counts(experts, is_padding, placement.num_experts)
        if torch.is_grad_enabled():
            self._record(scores, experts, is_padding)
        if placement.ep_size == 1:
            self.expert_tokens += real_counts
            expert_out = self.experts(sorted_rows, counts.tolist())
        else:
            expert_out = self._exchange(sorted_rows, counts, real_counts, stats)
        weighted = expert_out * weights.flatten()[order, None].to(expert_out.dtype)
        return rows.new_zeros(rows.shape).index_add(0, order // top_k, weighted)

    def _record(self, scores: torch.Tensor, experts: torch.Tensor, is_padding: Optional[torch.Tensor]) -> None:
        """Keep this forward's ``RoutingRecord`` of the non-padding rows (for the trainer's load balancing)."""
        if is_padding is not None:
            scores, experts = scores[~is_padding], experts[~is_padding]
        if self.placement.etp_rank != 0:
            scores, experts = scores[:0], experts[:0]
        counts = torch.bincount(experts.flatten(), minlength=self.placement.num_experts).double()
        self.routing_record = RoutingRecord((scores / scores.sum(dim=-1, keepdim=True)).sum(dim=0), counts,
                                            scores.shape[0])

    def _exchange(self, sorted_rows: torch.Tensor, counts: torch.Tensor, real_counts: torch.Tensor,
                  stats: CommStats) -> torch.Tensor:
        """Rows grouped by expert (``counts [E]``, so by destination EP rank) -> each one's expert output, computed
        by the rank holding its expert: an all-gather of counts, an all-to-all of rows and one of the outputs back.
        The gathered ``real_counts`` (padding left out; in the same all-gather) are the EP group's whole load (its
        members own distinct rows): ``expert_tokens``."""
        group, placement, local = self.groups.ep, self.placement, self.placement.num_local
        gathered = gather_counts(torch.stack([counts, real_counts]), group, stats)  # [EP, 2, E]
        every_count = gathered[:, 0].view(placement.ep_size, placement.ep_size, local)
        self.expert_tokens += gathered[:, 1].sum(dim=0)
        received_counts = every_count[:, placement.ep_rank]  # [source, local expert]
        send_splits = counts.view(placement.ep_size, local).sum(dim=1).tolist()
        recv_splits = received_counts.sum(dim=1).tolist()
        received = all_to_all_rows(sorted_rows, send_splits, recv_splits, group, stats)
        expert_of_row = torch.arange(local).repeat(len(recv_splits)).repeat_interleave(received_counts.flatten())
        by_expert = expert_of_row.argsort(stable=True)
        out = self.experts(received[by_expert], received_counts.sum(dim=0).tolist())
        out = out.new_zeros(out.shape).index_copy(0, by_expert, out)
        return all_to_all_rows(out, recv_splits, send_splits, group, stats)

    def _decode(self, rows: torch.Tensor, is_padding: Optional[torch.Tensor], stats: CommStats) -> torch.Tensor:
        placement = self.placement
        weights, experts, _ = self.router(rows)
        local = experts - placement.first_expert
        token, slot = ((local >= 0) & (local < placement.num_local)).nonzero(as_tuple=True)
        local = local[token, slot]
        order = local.argsort(stable=True)
        token, slot = token[order], slot[order]
        self.expert_tokens += _real_counts(experts, is_padding, placement.num_experts)
        counts = torch.bincount(local, minlength=placement.num_local).tolist()
        out = self.experts(rows[token], counts) * weights[token, slot, None].to(rows.dtype)
        partial = rows.new_zeros(rows.shape).index_add(0, token, out)
        if self.shared_experts is not None and self.groups.pcp_rank == 0:
            partial = partial + self._shared(rows)
        return reduce_partials(partial, self.groups.replica, stats)


def _real_counts(experts: torch.Tensor, is_padding: Optional[torch.Tensor], num_experts: int) -> torch.Tensor:
    """``[E]`` (row, slot) assignments per expert of the rows of ``experts [n, top_k]`` that are not padding."""
    real = experts if is_padding is None else experts[~is_padding]
    return torch.bincount(real.flatten(), minlength=num_experts)


def moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    """The model's MoE layers in order (none for a dense model)."""
    return [module for module in model.modules() if isinstance(module, MoELayer)]


def expert_load(model: torch.nn.Module) -> dict[int, list[int]]:
    """``{layer number: tokens routed to each expert so far}`` of the model's MoE layers (``expert_tokens``)."""
    return {layer.layer_number: layer.expert_tokens.tolist() for layer in moe_layers(model)}
