"""How the model's parameters are split over tensor parallelism, decided by one table: ``PARAM_KINDS``.

The *full state dict* is the unsharded model: the tensors under the parameter names a TP=1 model
has (megatron's fused ``linear_qkv`` with ``num_kv_heads`` query groups, ``linear_fc1 = [gate; up]``
for SwiGLU, the unpadded vocabulary). Seeded init, Hugging Face checkpoints and cptoolkit's own all
produce it. A kind says which index ranges of a full tensor one TP rank holds (``Selection``);
``load_tp_slices`` copies exactly those ranges into the model's parameters, from memory
(``load_full_state_dict``) or straight from a checkpoint's files (``cptoolkit.models.checkpoint``), and
``gather_full_state_dict`` reassembles the full tensors, so every TP size holds the same model.

When ``num_kv_heads < TP`` each KV head is replicated on ``TP / num_kv_heads`` neighbouring ranks
(the megatron model is built with ``num_query_groups = TP``), which keeps megatron's per-rank QKV
split free of collectives; the replicas are separate parameters, so training with
``num_kv_heads < TP`` would let them drift apart (the trainer rejects that layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, Union

import torch
import torch.distributed as dist
from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel.layers import RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP

from cptoolkit.layers.core_attention import CPCoreAttention
from cptoolkit.layers.mla import MLASelfAttention
from cptoolkit.models.gemma import GemmaRMSNorm
from cptoolkit.models.gpt import CPGPTModel
from cptoolkit.models.shape import GPTShape, padded_vocab_size
from cptoolkit.moe.layer import ExpertPlacement, LocalExperts, MoELayer, Router, SharedExpert
from cptoolkit.progress import progress


def split_qkv(fused: torch.Tensor, num_groups: int, num_heads: int, head_dim: int):
    """Split megatron's fused QKV (rows per query group: its q heads, then k, then v) into
    ``q [num_heads, head_dim, ...]`` and ``k, v [num_groups, head_dim, ...]``."""
    grouped = fused.reshape(num_groups, num_heads // num_groups + 2, head_dim, *fused.shape[1:])
    return grouped[:, :-2].reshape(num_heads, head_dim, *fused.shape[1:]), grouped[:, -2], grouped[:, -1]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Inverse of ``split_qkv`` for ``num_groups`` query groups; ``num_groups`` may exceed the
    number of KV heads, then each KV head is repeated for its ``num_groups / num_kv`` groups."""
    kv_index = torch.arange(num_groups) * k.shape[0] // num_groups
    grouped_q = q.reshape(num_groups, q.shape[0] // num_groups, *q.shape[1:])
    fused = torch.cat([grouped_q, k[kv_index].unsqueeze(1), v[kv_index].unsqueeze(1)], dim=1)
    return fused.flatten(0, 2)


# ----------------------------------------------------------------------------- the kinds

@dataclass(frozen=True)
class Selection:
    """The part of a full tensor one TP rank holds: the index ranges ``[start, stop)`` of dimension ``dim``,
    concatenated in order, then ``padding`` zero rows (dim 0: the vocabulary padded to a multiple of TP).
    Ranges are non-empty and need not be contiguous (fused QKV, SwiGLU's ``[gate; up]``)."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    padding: int = 0


def _chunk(size: int, tp_rank: int, tp_size: int, offset: int = 0) -> tuple[int, int]:
    """TP rank ``tp_rank``'s range of ``size`` indices split evenly over ``tp_size`` ranks, shifted by ``offset``."""
    per_rank = size // tp_size
    return offset + tp_rank * per_rank, offset + (tp_rank + 1) * per_rank


class Kind(Protocol):
    """How one parameter is split over TP. ``select``: which part of the full tensor (of shape ``full_shape``) TP rank
    ``tp_rank`` holds; ``unshard``: the full tensor from every TP rank's slice, in TP order; ``full_shape``: the
    full tensor's shape from one rank's slice shape."""

    name: str

    def select(self, full_shape: Sequence[int], shape: GPTShape, tp_rank: int, tp_size: int) -> Selection: ...

    def unshard(self, slices: list[torch.Tensor], shape: GPTShape) -> torch.Tensor: ...

    def full_shape(self, local: torch.Size, shape: GPTShape, tp_size: int) -> tuple: ...


@dataclass(frozen=True)
class Replicated:
    """Every TP rank holds the whole tensor."""

    name: str

    def select(self, full_shape, shape, tp_rank, tp_size):
        return Selection(0, ((0, full_shape[0]),))

    def unshard(self, slices, shape):
        return slices[0]

    def full_shape(self, local, shape, tp_size):
        return tuple(local)


@dataclass(frozen=True)
class Split:
    """Even split along ``dim``: a column-parallel output (dim 0) or a row-parallel input (dim 1)."""

    name: str
    dim: int

    def select(self, full_shape, shape, tp_rank, tp_size):
        return Selection(self.dim, (_chunk(full_shape[self.dim], tp_rank, tp_size),))

    def unshard(self, slices, shape):
        return torch.cat(slices, dim=self.dim)

    def full_shape(self, local, shape, tp_size):
        size = list(local)
        size[self.dim] *= tp_size
        return tuple(size)


@dataclass(frozen=True)
class GatedColumn:
    """SwiGLU's ``[gate; up]`` rows: each half split over TP on its own, a rank holds ``[its gate; its up]``."""

    name: str

    def select(self, full_shape, shape, tp_rank, tp_size):
        half = full_shape[0] // 2
        return Selection(0, (_chunk(half, tp_rank, tp_size), _chunk(half, tp_rank, tp_size, offset=half)))

    def unshard(self, slices, shape):
        gates, ups = zip(*(local.chunk(2) for local in slices))
        return torch.cat([*gates, *ups])

    def full_shape(self, local, shape, tp_size):
        return (local[0] * tp_size, *local[1:])


@dataclass(frozen=True)
class FusedQKV:
    """megatron's fused QKV rows: whole query groups per rank, the full tensor's ``num_kv_heads``
    groups regrouped into the model's ``max(num_kv_heads, TP)`` (KV heads replicated when fewer).

    Full rows, per KV head: its ``num_attention_heads / num_kv_heads`` query heads, its key head, its value
    head (``head_dim`` rows each). Each of the model's ``max(num_kv_heads, TP)`` groups takes its share of
    one KV head's query heads plus that head's key and value rows."""

    name: str

    def select(self, full_shape, shape, tp_rank, tp_size):
        kv_heads, head_dim = shape.num_kv_heads, shape.head_dim
        groups = max(kv_heads, tp_size)
        q_rows_per_group = shape.num_attention_heads // groups * head_dim
        kv_group_rows = (shape.num_attention_heads // kv_heads + 2) * head_dim
        ranges = []
        for group in range(*_chunk(groups, tp_rank, tp_size)):
            kv_group, replica = divmod(group, groups // kv_heads)
            q_start = kv_group * kv_group_rows + replica * q_rows_per_group
            kv_start = (kv_group + 1) * kv_group_rows - 2 * head_dim
            ranges += [(q_start, q_start + q_rows_per_group), (kv_start, kv_start + 2 * head_dim)]
        return Selection(0, _merged(ranges))

    def unshard(self, slices, shape):
        megatron_groups = max(shape.num_kv_heads, len(slices))
        q, k, v = split_qkv(torch.cat(slices), megatron_groups, shape.num_attention_heads, shape.head_dim)
        replicas = megatron_groups // shape.num_kv_heads
        return fuse_qkv(q, k[::replicas], v[::replicas], shape.num_kv_heads)

    def full_shape(self, local, shape, tp_size):
        return ((shape.num_attention_heads + 2 * shape.num_kv_heads) * shape.head_dim, *local[1:])


def _merged(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """``ranges`` with each range that starts where the previous one stops joined to it (fewer, larger reads)."""
    merged = [ranges[0]]
    for start, stop in ranges[1:]:
        if start == merged[-1][1]:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return tuple(merged)


@dataclass(frozen=True)
class VocabRows:
    """Vocabulary rows (embedding, output layer): padded to a multiple of TP, then split evenly."""

    name: str

    def select(self, full_shape, shape, tp_rank, tp_size):
        start, stop = _chunk(padded_vocab_size(shape, tp_size), tp_rank, tp_size)
        real_stop = min(stop, shape.vocab_size)
        ranges = ((start, real_stop),) if start < real_stop else ()
        return Selection(0, ranges, padding=stop - max(start, real_stop))

    def unshard(self, slices, shape):
        return torch.cat(slices)[:shape.vocab_size]

    def full_shape(self, local, shape, tp_size):
        return (shape.vocab_size, *local[1:])


@dataclass(frozen=True)
class ExpertRows:
    """Routed experts' stacked rows (``LocalExperts``), placed by EP and ETP rank, not TP rank: the full tensor is
    ``[E · rows_per_expert, ...]``, expert after expert; the rank holds its ``placement``'s experts, of each its
    ETP slice of the FFN: of the gate rows and of the up rows separately with ``gated`` (``[gate; up]`` per
    expert), a contiguous slice otherwise; with ``split_ffn`` False (a down-projection bias), each expert whole.
    ``groups`` gather it back (``gather_full``)."""

    name: str
    placement: ExpertPlacement
    gated: bool
    groups: object = None
    split_ffn: bool = True

    def _ffn_ranges(self, base: int, rows_per_expert: int) -> list[tuple[int, int]]:
        p = self.placement
        if not self.split_ffn:
            return [(base, base + rows_per_expert)]
        if not self.gated:
            return [_chunk(rows_per_expert, p.etp_rank, p.etp_size, base)]
        half = rows_per_expert // 2
        return [_chunk(half, p.etp_rank, p.etp_size, base), _chunk(half, p.etp_rank, p.etp_size, base + half)]

    def select(self, full_shape, shape, tp_rank, tp_size):
        p = self.placement
        rows_per_expert = full_shape[0] // p.num_experts
        ranges = []
        for expert in range(p.first_expert, p.first_expert + p.num_local):
            ranges += self._ffn_ranges(expert * rows_per_expert, rows_per_expert)
        return Selection(0, _merged(ranges))

    def unshard(self, slices, shape):
        raise ValueError(f"{self.name}: expert weights are spread over the EP and ETP groups, not TP; "
                         "rule: gather them with ExpertRows.gather_full")

    def full_shape(self, local, shape, tp_size):
        slices = self.placement.ep_size * (self.placement.etp_size if self.split_ffn else 1)
        return (local[0] * slices, *local[1:])

    def gather_full(self, local: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's ``local`` slice: all-gather over the ETP group (FFN slices; none
        without ``split_ffn``), then over the EP group (experts). Collective over both groups."""
        p, groups = self.placement, self.groups
        per_expert = local.view(p.num_local, -1, *local.shape[1:])  # [E_local, rows_local, ...]
        if not self.split_ffn:
            return _gather(per_expert, groups.ep).flatten(0, 2)
        slices = _gather(per_expert, groups.etp)  # [ETP, E_local, rows_local, ...]
        if self.gated:
            gates, ups = slices.chunk(2, dim=2)
            experts = torch.cat([gates.transpose(0, 1).flatten(1, 2), ups.transpose(0, 1).flatten(1, 2)], dim=1)
        else:
            experts = slices.transpose(0, 1).flatten(1, 2)
        return _gather(experts, groups.ep).flatten(0, 2)


def _gather(tensor: torch.Tensor, group) -> torch.Tensor:
    """``[group_size, *tensor.shape]``: every member's ``tensor`` (``tensor[None]`` for a group of one)."""
    if group is None or group.size() == 1:
        return tensor.unsqueeze(0)
    slices = [torch.empty_like(tensor) for _ in range(group.size())]
    dist.all_gather(slices, tensor.contiguous(), group=group)
    return torch.stack(slices)


def _expert_kind(name: str, first_projection: bool, split_ffn: bool = True) -> Callable[[LocalExperts], Kind]:
    def kind(experts: LocalExperts) -> Kind:
        return ExpertRows(name, experts.placement, first_projection and experts.dims.gated_halves, experts.groups,
                          split_ffn)
    return kind


REPLICATED = Replicated("replicated")
NORM = Replicated("norm")  # replicated too; seeded init sets its weight to 1 and its bias to 0
COLUMN = Split("column", dim=0)
ROW = Split("row", dim=1)
GATED_COLUMN = GatedColumn("gated_column")
FUSED_QKV = FusedQKV("fused_qkv")
VOCAB = VocabRows("vocab")


# ----------------------------------------------------------------------------- the table

def _fc1_kind(mlp: MLP) -> Kind:
    return GATED_COLUMN if mlp.config.gated_linear_unit else COLUMN


# (module type, parameter) -> kind, or a function of the module giving the kind. A parameter is looked
# up first under the type of the module that owns its module, as "child.parameter": the rows of a
# ColumnParallelLinear are laid out by what its owner computes with them (fused QKV groups, SwiGLU's
# [gate; up], the padded vocabulary), as megatron-core's own sharded_state_dict decides. Then under
# its own module's type. Types match along the MRO. A parameter found in neither is an error, never a
# guess from its name. TransformerEngine's modules are keyed by their import path ("module.QualName",
# matched along the MRO too): megatron's TE wrappers and TE's norms exist only where TE is installed, and
# the table must load, and be tested, without it.
_MEGATRON_TE = "megatron.core.extensions.transformer_engine"
PARAM_KINDS: dict[tuple[Union[type, str], str], Union[Kind, Callable[[torch.nn.Module], Kind]]] = {
    (GPTModel, "output_layer.weight"): VOCAB,
    (SelfAttention, "linear_qkv.weight"): FUSED_QKV,
    (SelfAttention, "linear_qkv.bias"): FUSED_QKV,  # Qwen2's q/k/v biases, GPT-2's: rows like the weight's
    (SelfAttention, "q_layernorm.weight"): NORM,  # [head_dim], shared by every head, so whole on every rank
    (SelfAttention, "k_layernorm.weight"): NORM,
    # gpt-oss attention sinks, one per query head: FUSED_QKV gives TP rank r whole query groups whose query
    # heads are the contiguous heads [r·h/TP, (r+1)·h/TP) of the full order (KV replicated or not), so the
    # sinks split like a column-parallel output.
    (CPCoreAttention, "sinks"): COLUMN,
    # MLA: the up projections' rows and linear_proj's columns are per head; the down projections and norms
    # act on the one latent every head shares.
    (MLASelfAttention, "linear_q_proj.weight"): COLUMN,
    (MLASelfAttention, "linear_q_up_proj.weight"): COLUMN,
    (MLASelfAttention, "linear_kv_up_proj.weight"): COLUMN,
    (MLASelfAttention, "linear_proj.weight"): ROW,
    (MLASelfAttention, "linear_q_down_proj.weight"): REPLICATED,
    (MLASelfAttention, "linear_kv_down_proj.weight"): REPLICATED,
    # MoE: the router is whole on every rank, the routed experts placed by EP/ETP rank, the shared expert split
    # over TP like the dense MLP.
    (Router, "weight"): REPLICATED,
    (Router, "bias"): REPLICATED,
    (Router, "score_correction_bias"): REPLICATED,
    (LocalExperts, "fc1_weight"): _expert_kind("expert_fc1", first_projection=True),
    (LocalExperts, "fc1_bias"): _expert_kind("expert_fc1_bias", first_projection=True),
    (LocalExperts, "fc2_weight"): _expert_kind("expert_fc2", first_projection=False),
    (LocalExperts, "fc2_bias"): _expert_kind("expert_fc2_bias", first_projection=False, split_ffn=False),
    (SharedExpert, "linear_fc1.weight"): GATED_COLUMN,
    (SharedExpert, "linear_fc2.weight"): ROW,
    (MoELayer, "shared_expert_gate.weight"): REPLICATED,
    (MLP, "linear_fc1.weight"): _fc1_kind,
    (MLP, "linear_fc1.bias"): _fc1_kind,
    (RowParallelLinear, "weight"): ROW,
    (RowParallelLinear, "bias"): REPLICATED,  # added once, after the all-reduce of the partial sums
    (VocabParallelEmbedding, "weight"): VOCAB,
    (torch.nn.Embedding, "weight"): REPLICATED,  # GPT-2's learned absolute positions
    (torch.nn.LayerNorm, "weight"): NORM,
    (torch.nn.LayerNorm, "bias"): NORM,
    (torch.nn.RMSNorm, "weight"): NORM,
    (GemmaRMSNorm, "weight"): NORM,  # every Gemma norm, the post-norms inside PostNormRowParallelLinear too
    (FusedLayerNorm, "weight"): NORM,  # megatron's local spec takes apex's LayerNorm where apex is installed
    (FusedLayerNorm, "bias"): NORM,
    # megatron's TE layer spec: linear_qkv / linear_fc1 carry the norm before them (their weights and
    # biases are found under SelfAttention / MLP above), linear_proj / linear_fc2 are row-parallel.
    (f"{_MEGATRON_TE}.TELayerNormColumnParallelLinear", "layer_norm_weight"): NORM,
    (f"{_MEGATRON_TE}.TELayerNormColumnParallelLinear", "layer_norm_bias"): NORM,
    (f"{_MEGATRON_TE}.TEColumnParallelLinear", "weight"): COLUMN,
    (f"{_MEGATRON_TE}.TEColumnParallelLinear", "bias"): COLUMN,
    (f"{_MEGATRON_TE}.TERowParallelLinear", "weight"): ROW,
    (f"{_MEGATRON_TE}.TERowParallelLinear", "bias"): REPLICATED,
    # megatron's TENorm returns these; with TE installed it is every model's final_layernorm, whatever the spec.
    ("transformer_engine.pytorch.module.layernorm.LayerNorm", "weight"): NORM,
    ("transformer_engine.pytorch.module.layernorm.LayerNorm", "bias"): NORM,
    ("transformer_engine.pytorch.module.rmsnorm.RMSNorm", "weight"): NORM,
}


def _table_kind(module: torch.nn.Module, key: str) -> Kind | None:
    for cls in type(module).__mro__:
        entry = PARAM_KINDS.get((cls, key)) or PARAM_KINDS.get((f"{cls.__module__}.{cls.__qualname__}", key))
        if entry is not None:
            return entry(module) if callable(entry) else entry
    return None


def param_kinds(model: torch.nn.Module) -> dict[str, Kind]:
    """The kind of every parameter of ``model``, under its ``named_parameters`` name, from ``PARAM_KINDS``
    and the module types found by walking ``model.named_modules()``."""
    modules = dict(model.named_modules())
    kinds = {}
    for module_name, module in modules.items():
        owner_name, _, child_name = module_name.rpartition(".")
        owner = modules[owner_name] if module_name else None
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            kind = _table_kind(owner, f"{child_name}.{param_name}") if owner is not None else None
            kind = kind or _table_kind(module, param_name)
            if kind is None:
                owned = f" (the {child_name!r} of a {type(owner).__name__})" if owner is not None else ""
                raise ValueError(f"{name}: no TP kind for parameter {param_name!r} of a {type(module).__name__}"
                                 f"{owned}; rule: every (module type, parameter) must be in "
                                 "cptoolkit.models.tp_sharding.PARAM_KINDS; add an entry for it there")
            kinds[name] = kind
    return kinds


# ----------------------------------------------------------------------------- full state dict <-> this rank

Reader = Callable[[str, int, int, int], torch.Tensor]


def load_tp_slices(model: CPGPTModel, full_shapes: dict[str, tuple[int, ...]], read: Reader,
                   progress_desc: str | None = None) -> None:
    """Copy this TP rank's slice of every full tensor into ``model``'s parameters, one index range at a time:
    ``read(name, dim, start, stop)`` returns indices ``start:stop`` along ``dim`` of the full tensor ``name``,
    so no full tensor need be in memory. ``full_shapes``: the full tensors' shapes, under exactly the model's
    parameter names, each checked against what the model's TP slice implies before anything is read.
    ``progress_desc``: label of a progress bar over the tensors (``cptoolkit.progress``: rank 0, a terminal)."""
    params = dict(model.named_parameters())
    if set(full_shapes) != set(params):
        raise ValueError(f"full state dict does not match the model: missing "
                         f"{sorted(set(params) - set(full_shapes))}, "
                         f"unexpected {sorted(set(full_shapes) - set(params))}")
    tp_rank, tp_size, kinds = model.pg_collection.tp.rank(), model.pg_collection.tp.size(), param_kinds(model)
    tensors = params.items() if progress_desc is None else progress(params.items(), progress_desc, "tensor")
    with torch.no_grad():
        for name, param in tensors:
            kind, full_shape = kinds[name], tuple(full_shapes[name])
            needed = kind.full_shape(param.shape, model.shape, tp_size)
            if needed != full_shape:
                raise ValueError(f"{name}: full tensor of shape {full_shape}, but the model's TP slice "
                                 f"{tuple(param.shape)} ({kind.name}, TP={tp_size}) needs {needed}")
            selection = kind.select(full_shape, model.shape, tp_rank, tp_size)
            offset = 0
            for start, stop in selection.ranges:
                param.narrow(selection.dim, offset, stop - start).copy_(read(name, selection.dim, start, stop))
                offset += stop - start
            if selection.padding:
                param.narrow(0, offset, selection.padding).zero_()


def load_full_state_dict(model: CPGPTModel, full: dict[str, torch.Tensor]) -> None:
    """Copy this TP rank's slice of every full tensor of ``full`` (in memory) into ``model``'s parameters;
    the names must be exactly the model's parameter names."""
    load_tp_slices(model, {name: tuple(tensor.shape) for name, tensor in full.items()},
                   lambda name, dim, start, stop: full[name].narrow(dim, start, stop - start))


def gather_full_state_dict(model: CPGPTModel) -> dict[str, torch.Tensor]:
    """The full (unsharded) parameters, assembled on every rank of the model's TP group with one
    all-gather per parameter over that group."""
    tp_group, kinds = model.pg_collection.tp, param_kinds(model)
    full = {}
    for name, param in model.named_parameters():
        if isinstance(kinds[name], ExpertRows):
            full[name] = kinds[name].gather_full(param.detach())
            continue
        slices = [torch.empty_like(param) for _ in range(tp_group.size())]
        dist.all_gather(slices, param.detach().contiguous(), group=tp_group)
        full[name] = kinds[name].unshard(slices, model.shape)
    return full
