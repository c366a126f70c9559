"""A megatron-core ``GPTModel`` (Llama or GPT-2 shaped) whose attention is cptoolkit's.

Three pieces:

- ``GPTShape``: the architecture, validated once; ``GPTShape.from_hf_config`` reads a Hugging Face
  ``config.json`` dict.
- Construction and weights. The model is built uninitialized and then filled from a *full* state
  dict: the unsharded tensors under the parameter names a TP=1 model has (megatron's fused
  ``linear_qkv`` with ``num_kv_heads`` query groups, ``linear_fc1 = [gate; up]`` for SwiGLU, the
  unpadded vocabulary). ``load_full_state_dict`` cuts each rank's TP slice from it and
  ``gather_full_state_dict`` reassembles it, so random init from a seed, HF checkpoints and
  cptoolkit's own checkpoints give the same model for every TP size. When ``num_kv_heads < TP``
  each KV head is replicated on ``TP / num_kv_heads`` neighbouring ranks (the megatron model is built
  with ``num_query_groups = TP``), which keeps megatron's per-rank QKV split free of collectives;
  the replicas are separate parameters, so training with ``num_kv_heads < TP`` would let them drift
  apart (the trainer rejects that layout).
- ``gpt_forward``: embedding -> decoder -> final norm -> output layer for arbitrary position ids
  (DualChunkSwap shards hold non-contiguous positions, decode steps of different requests sit at
  different positions), so RoPE is computed here from the model's ``inv_freq`` rather than by
  megatron's contiguous-position path. Returns full-vocabulary logits or per-token losses.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.distributed import ProcessGroup

from cptoolkit.layers.core_attention import AttentionRuntime, get_gpt_layer_spec

ARCHS = ("llama", "gpt2")
HF_ARCHITECTURES = {"llama": ("LlamaForCausalLM",), "gpt2": ("GPT2LMHeadModel", "GPT2Model")}
_SUPPORTED_HF = "'llama' or 'gpt2' (architectures LlamaForCausalLM, GPT2LMHeadModel, GPT2Model)"
INIT_STD = 0.02


@dataclass(frozen=True)
class GPTShape:
    """Architecture of a decoder-only transformer.

    ``arch="llama"``: RMSNorm, SwiGLU MLP, RoPE, no biases, GQA allowed.
    ``arch="gpt2"``: LayerNorm, GELU (tanh) MLP, learned absolute positions, biases, MHA.
    ``max_seq_len`` bounds position ids (and sizes GPT-2's position table).
    """

    arch: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"GPTShape.arch={self.arch!r} is not supported; rule: one of {ARCHS}")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads",
                     "ffn_hidden_size", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTShape.{name}={value!r}; rule: must be a positive integer")
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GPTShape.{name}={getattr(self, name)!r}; rule: must be > 0")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"GPTShape.hidden_size={self.hidden_size} must be a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"GPTShape.num_attention_heads={self.num_attention_heads} must be a "
                             f"multiple of num_kv_heads={self.num_kv_heads}")
        if self.arch == "gpt2" and self.num_kv_heads != self.num_attention_heads:
            raise ValueError(f"GPTShape.num_kv_heads={self.num_kv_heads}; rule: gpt2 has one KV head "
                             f"per query head (num_attention_heads={self.num_attention_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, config: dict) -> "GPTShape":
        """Read a Hugging Face ``config.json`` dict of a ``LlamaForCausalLM`` or ``GPT2LMHeadModel``.
        Errors name the key and the rule but not the file: the caller knows which file it read."""
        if "model_type" not in config:
            raise ValueError(f"missing required key 'model_type'; rule: {_SUPPORTED_HF}")
        model_type = config["model_type"]
        if model_type not in ARCHS:
            raise ValueError(f"model_type={model_type!r} is not supported; rule: {_SUPPORTED_HF}")
        unsupported = [a for a in config.get("architectures") or [] if a not in HF_ARCHITECTURES[model_type]]
        if unsupported:
            raise ValueError(f"architectures={unsupported!r} is not supported for model_type {model_type!r}; "
                             f"rule: {' or '.join(HF_ARCHITECTURES[model_type])}")
        return _llama_shape(config) if model_type == "llama" else _gpt2_shape(config)

    def to_hf_config(self) -> dict:
        """A Hugging Face ``config.json`` dict that ``from_hf_config`` reads back as this shape."""
        if self.arch == "gpt2":
            return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                    "n_layer": self.num_layers, "n_embd": self.hidden_size,
                    "n_head": self.num_attention_heads, "n_inner": self.ffn_hidden_size,
                    "vocab_size": self.vocab_size, "n_positions": self.max_seq_len,
                    "layer_norm_epsilon": self.norm_eps, "activation_function": "gelu_new",
                    "tie_word_embeddings": self.tie_embeddings}
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.ffn_hidden_size, "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_seq_len, "hidden_act": "silu",
                "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
                "rms_norm_eps": self.norm_eps, "tie_word_embeddings": self.tie_embeddings}


def _positive(config: dict, key: str, number: type = int, default=None):
    """``config[key]``, a positive int (or, with ``number=float``, any positive number). A missing or
    null key gives ``default``, or is an error when there is none."""
    value = config.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"missing required key {key!r}; add it with the value from the model's "
                             "original config.json")
        return default
    allowed = (int, float) if number is float else int
    if not isinstance(value, allowed) or isinstance(value, bool) or not value > 0:
        kind = "number" if number is float else "integer"
        raise ValueError(f"{key}={value!r}; rule: must be a positive {kind}")
    return number(value)


def _llama_shape(config: dict) -> GPTShape:
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise ValueError(f"rope parameters {rope}: only unscaled RoPE (rope_type 'default') is supported")
    for key, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, supported) != supported:
            raise ValueError(f"{key}={config[key]!r}; rule: must be {supported!r}")
    hidden, heads = _positive(config, "hidden_size"), _positive(config, "num_attention_heads")
    head_dim = _positive(config, "head_dim", default=hidden // heads)
    if head_dim * heads != hidden:
        raise ValueError(f"head_dim={head_dim}; rule: must equal hidden_size / num_attention_heads = "
                         f"{hidden / heads}")
    return GPTShape(arch="llama", num_layers=_positive(config, "num_hidden_layers"), hidden_size=hidden,
                    num_attention_heads=heads,
                    num_kv_heads=_positive(config, "num_key_value_heads", default=heads),
                    ffn_hidden_size=_positive(config, "intermediate_size"),
                    vocab_size=_positive(config, "vocab_size"),
                    max_seq_len=_positive(config, "max_position_embeddings"),
                    rope_theta=_positive(rope, "rope_theta", float, default=10000.0),
                    norm_eps=_positive(config, "rms_norm_eps", float),
                    tie_embeddings=bool(config.get("tie_word_embeddings", False)))


def _gpt2_shape(config: dict) -> GPTShape:
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function={config['activation_function']!r}; "
                         "rule: must be the tanh GELU ('gelu_new')")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("reorder_and_upcast_attn"):
        raise ValueError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn must be false")
    hidden, heads = _positive(config, "n_embd"), _positive(config, "n_head")
    return GPTShape(arch="gpt2", num_layers=_positive(config, "n_layer"), hidden_size=hidden,
                    num_attention_heads=heads, num_kv_heads=heads,
                    ffn_hidden_size=_positive(config, "n_inner", default=4 * hidden),
                    vocab_size=_positive(config, "vocab_size"), max_seq_len=_positive(config, "n_positions"),
                    norm_eps=_positive(config, "layer_norm_epsilon", float),
                    tie_embeddings=bool(config.get("tie_word_embeddings", True)))


# ----------------------------------------------------------------------------- construction

def _check_tp(shape: GPTShape, tp_size: int) -> None:
    kv = shape.num_kv_heads
    rules = (
        (shape.num_attention_heads % tp_size == 0,
         f"num_attention_heads={shape.num_attention_heads} must be a multiple of TP={tp_size}"),
        (kv % tp_size == 0 or tp_size % kv == 0,
         f"num_kv_heads={kv} must be a multiple or a divisor of TP={tp_size}"),
        (shape.ffn_hidden_size % tp_size == 0,
         f"ffn_hidden_size={shape.ffn_hidden_size} must be a multiple of TP={tp_size}"),
    )
    for ok, message in rules:
        if not ok:
            raise ValueError(f"GPTShape does not fit the TP size: {message}")


def padded_vocab_size(shape: GPTShape, tp_size: int) -> int:
    """Vocabulary rounded up to a multiple of TP (megatron splits the embedding evenly)."""
    return math.ceil(shape.vocab_size / tp_size) * tp_size


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def megatron_config(shape: GPTShape, tp_size: int, dtype: torch.dtype) -> TransformerConfig:
    """The megatron-core config of ``shape`` at TP=``tp_size``: CPU init, no dropout, no fusions."""
    llama = shape.arch == "llama"
    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=max(shape.num_kv_heads, tp_size), kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn_hidden_size, tensor_model_parallel_size=tp_size,
        normalization="RMSNorm" if llama else "LayerNorm", layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=llama, activation_func=F.silu if llama else _gelu_tanh,
        add_bias_linear=not llama, add_qkv_bias=not llama,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, perform_initialization=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        cross_entropy_loss_fusion=False)


@functools.cache
def _self_group(rank: int) -> ProcessGroup:
    """A one-rank group: megatron's own CP group, which stays trivial (cptoolkit's PCP/DCP run
    inside ``CPCoreAttention``). Only the member calls ``new_group``, so no rank waits on others."""
    return dist.new_group([rank], use_local_synchronization=True)


class CPGPTModel(GPTModel):
    """megatron-core's ``GPTModel`` that remembers its ``GPTShape`` (``shape``): the vocabulary is
    padded to a multiple of TP inside megatron, and the loaders and ``gpt_forward`` need the real
    sizes."""

    def __init__(self, shape: GPTShape, **gpt_model_kwargs):
        super().__init__(**gpt_model_kwargs)
        self.shape = shape


def new_gpt_model(shape: GPTShape, tp_group: ProcessGroup, runtime: AttentionRuntime,
                  dtype: torch.dtype = torch.float32) -> CPGPTModel:
    """An *uninitialized* megatron-core ``GPTModel`` sharded over ``tp_group``; fill it with
    ``load_full_state_dict``. Every attention layer shares ``runtime``."""
    tp_size = tp_group.size()
    _check_tp(shape, tp_size)
    pg_collection = ProcessGroupCollection(tp=tp_group, cp=_self_group(dist.get_rank()), pp=None,
                                           embd=None)
    model = CPGPTModel(
        shape, config=megatron_config(shape, tp_size, dtype),
        transformer_layer_spec=get_gpt_layer_spec(runtime, shape.arch),
        vocab_size=padded_vocab_size(shape, tp_size), max_sequence_length=shape.max_seq_len,
        share_embeddings_and_output_weights=shape.tie_embeddings,
        position_embedding_type="rope" if shape.arch == "llama" else "learned_absolute",
        rotary_base=shape.rope_theta, pg_collection=pg_collection)
    return model.to(dtype)  # megatron's torch norms are created in float32 whatever params_dtype says


def build_gpt_model(shape: GPTShape, tp_group: ProcessGroup, runtime: AttentionRuntime,
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> CPGPTModel:
    """A randomly initialized model; the same ``seed`` gives the same (unsharded) weights for
    every TP size, because the full weights are drawn on every rank and then sliced."""
    model = new_gpt_model(shape, tp_group, runtime, dtype)
    load_full_state_dict(model, init_full_state_dict(model, seed))
    return model


# ----------------------------------------------------------------------------- TP slicing
# Each parameter is split over TP in one of these ways ("kind"), decided by its name.

def _param_kind(name: str) -> str:
    if "linear_qkv" in name:
        return "qkv"
    if "word_embeddings" in name or name.startswith("output_layer"):
        return "vocab"
    if "linear_fc1" in name:
        return "fc1"
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        return "row"
    return "replicated"


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


def _shard(kind: str, full: torch.Tensor, shape: GPTShape, tp_rank: int, tp_size: int
           ) -> torch.Tensor:
    """This TP rank's slice of the full tensor ``full``."""
    if kind == "qkv":
        parts = split_qkv(full, shape.num_kv_heads, shape.num_attention_heads, shape.head_dim)
        megatron_groups = max(shape.num_kv_heads, tp_size)
        return fuse_qkv(*parts, megatron_groups).chunk(tp_size)[tp_rank]
    if kind == "vocab":
        padding = padded_vocab_size(shape, tp_size) - shape.vocab_size
        return F.pad(full, (0, 0, 0, padding)).chunk(tp_size)[tp_rank]
    if kind == "fc1" and shape.arch == "llama":
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
    if kind == "fc1":
        return full.chunk(tp_size)[tp_rank]
    if kind == "row":
        return full.chunk(tp_size, dim=1)[tp_rank]
    return full


def _unshard(kind: str, stacked: torch.Tensor, shape: GPTShape) -> torch.Tensor:
    """The full tensor from every TP rank's slice, ``stacked [tp_size, ...]``."""
    tp_size = stacked.shape[0]
    if kind == "qkv":
        megatron_groups = max(shape.num_kv_heads, tp_size)
        q, k, v = split_qkv(torch.cat(list(stacked)), megatron_groups,
                             shape.num_attention_heads, shape.head_dim)
        replicas = megatron_groups // shape.num_kv_heads
        return fuse_qkv(q, k[::replicas], v[::replicas], shape.num_kv_heads)
    if kind == "vocab":
        return torch.cat(list(stacked))[:shape.vocab_size]
    if kind == "fc1" and shape.arch == "llama":
        gates, ups = zip(*(local.chunk(2) for local in stacked))
        return torch.cat([*gates, *ups])
    if kind == "fc1":
        return torch.cat(list(stacked))
    if kind == "row":
        return torch.cat(list(stacked), dim=1)
    return stacked[0]


def _full_shape(kind: str, local: torch.Size, shape: GPTShape, tp_size: int) -> tuple:
    if kind == "qkv":
        rows = (shape.num_attention_heads + 2 * shape.num_kv_heads) * shape.head_dim
        return (rows, *local[1:])
    if kind == "vocab":
        return (shape.vocab_size, *local[1:])
    if kind == "fc1":
        return (local[0] * tp_size, *local[1:])
    if kind == "row":
        return (local[0], local[1] * tp_size)
    return tuple(local)


def _tp_group(model: CPGPTModel) -> ProcessGroup:
    return model.pg_collection.tp


def init_full_state_dict(model: CPGPTModel, seed: int) -> dict[str, torch.Tensor]:
    """Random full weights (float32) for ``model``'s parameters, drawn in name order from one
    seeded generator: norms 1, biases 0, matrices N(0, 0.02²) (output projections of each layer
    scaled by ``1/sqrt(2·num_layers)``, as GPT-2 does)."""
    generator = torch.Generator().manual_seed(seed)
    shape = model.shape
    tp_size = _tp_group(model).size()
    full = {}
    for name, local in sorted(model.named_parameters()):
        size = _full_shape(_param_kind(name), local.shape, shape, tp_size)
        if "layernorm" in name:
            full[name] = torch.ones(size) if name.endswith("weight") else torch.zeros(size)
        elif name.endswith("bias"):
            full[name] = torch.zeros(size)
        else:
            std = INIT_STD / math.sqrt(2 * shape.num_layers) if _param_kind(name) == "row" else INIT_STD
            full[name] = torch.randn(size, generator=generator) * std
    return full


def load_full_state_dict(model: CPGPTModel, full: dict[str, torch.Tensor]) -> None:
    """Copy this TP rank's slice of every full tensor into ``model``'s parameters; the names must
    be exactly the model's parameter names."""
    params = dict(model.named_parameters())
    if set(full) != set(params):
        raise ValueError(f"full state dict does not match the model: missing "
                         f"{sorted(set(params) - set(full))}, unexpected {sorted(set(full) - set(params))}")
    tp_group = _tp_group(model)
    with torch.no_grad():
        for name, param in params.items():
            local = _shard(_param_kind(name), full[name], model.shape, tp_group.rank(), tp_group.size())
            if local.shape != param.shape:
                raise ValueError(f"{name}: full tensor of shape {tuple(full[name].shape)} gives a TP "
                                 f"slice of {tuple(local.shape)}, the model expects {tuple(param.shape)}")
            param.copy_(local)


def gather_full_state_dict(model: CPGPTModel) -> dict[str, torch.Tensor]:
    """The full (unsharded) parameters, assembled on every rank of the model's TP group with one
    all-gather per parameter over that group."""
    tp_group = _tp_group(model)
    full = {}
    for name, param in model.named_parameters():
        slices = [torch.empty_like(param) for _ in range(tp_group.size())]
        dist.all_gather(slices, param.detach().contiguous(), group=tp_group)
        full[name] = _unshard(_param_kind(name), torch.stack(slices), model.shape)
    return full


# ----------------------------------------------------------------------------- forward

def rotary_freqs(model: CPGPTModel, position_ids: torch.Tensor) -> torch.Tensor:
    """RoPE angles for arbitrary positions: ``position_ids [b, s]`` -> ``[s, b, 1, head_dim]``,
    laid out as megatron's ``apply_rotary_pos_emb`` expects (non-interleaved halves)."""
    inv_freq = model.rotary_pos_emb.inv_freq.to(position_ids.device)
    angles = position_ids.t().float().unsqueeze(-1) * inv_freq  # [s, b, head_dim / 2]
    return torch.cat([angles, angles], dim=-1).unsqueeze(2)


class _TPCrossEntropy(torch.autograd.Function):
    """megatron's vocab-parallel cross entropy (its ``VocabParallelCrossEntropy`` steps) with the
    TP group passed explicitly: ``logits [s, b, v_local]``, ``target [s, b]`` -> ``loss [s, b]``
    in float32; three all-reduces over ``tp_group``."""

    @staticmethod
    def forward(ctx, logits, target, tp_group):
        steps = VocabParallelCrossEntropy
        logits, logits_max = steps.calculate_logits_max(logits.clone())
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
        vocab_start = tp_group.rank() * logits.shape[-1]
        target_mask, masked_target, predicted, sum_exp, exp_logits = steps.calculate_predicted_logits(
            logits, target, logits_max, vocab_start, vocab_start + logits.shape[-1])
        dist.all_reduce(predicted, group=tp_group)
        dist.all_reduce(sum_exp, group=tp_group)
        softmax, loss = steps.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, target_mask, masked_target = ctx.saved_tensors
        steps = VocabParallelCrossEntropy
        grad_2d, arange_1d, update, grad_logits = steps.prepare_gradient_calculation_operands(
            softmax, target_mask)
        return steps.calculate_gradients(grad_2d, arange_1d, masked_target, update, grad_logits,
                                         grad_loss), None, None


def _gather_vocab(logits: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """``[s, b, v_local]`` -> ``[s, b, v_padded]`` with one all-gather over ``tp_group``. Gradient
    reaches only this rank's slice, as in megatron's gather-from-TP-region (which allocates its
    buffer with ``torch.cuda.current_device()`` and so cannot run on CPU)."""
    if tp_group.size() == 1:
        return logits
    slices = [torch.empty_like(logits) for _ in range(tp_group.size())]
    dist.all_gather(slices, logits.detach().contiguous(), group=tp_group)
    slices[tp_group.rank()] = logits
    return torch.cat(slices, dim=-1)


def _mask_vocab_padding(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Set the logits of padding vocabulary ids (``>= vocab_size``) to -inf on this TP slice."""
    vocab_ids = torch.arange(logits.shape[-1], device=logits.device) + tp_rank * logits.shape[-1]
    return logits.masked_fill(vocab_ids >= vocab_size, float("-inf"))


def gpt_forward(model: CPGPTModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
                runtime: AttentionRuntime, labels: Optional[torch.Tensor] = None,
                logits_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the model on ``input_ids [b, s]`` at ``position_ids [b, s]`` (any positions).

    ``runtime`` must be the one the model was built with; its ``mode`` decides prefill (the tokens
    attend causally to each other; with PCP > 1 they are this rank's DualChunkSwap shard) or decode
    (``s == 1``: each token attends to its sequence's cache). Returns ``logits [b, s, vocab_size]``
    (float32, or float64 for a float64 model; gathered over TP) or, with ``labels [b, s]``, the
    per-token cross-entropy ``[b, s]`` computed on vocab-parallel logits. ``logits_index [b]`` (local
    token index per sequence) computes the logits of those tokens only, ``[b, 1, vocab_size]``: a
    prompt's last token during prefill, without materializing ``s x vocab`` logits.
    """
    if runtime.mode == "decode" and input_ids.shape[1] != 1:
        raise ValueError(f"decode takes one token per sequence; got input_ids of shape "
                         f"{tuple(input_ids.shape)} (rule: s == 1)")
    hidden = model.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
    rotary = rotary_freqs(model, position_ids) if model.position_embedding_type == "rope" else None
    hidden = model.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)
    if logits_index is not None:  # hidden [s, b, h] -> [1, b, h]: row logits_index[i] of sequence i
        hidden = hidden.gather(0, logits_index.view(1, -1, 1).expand(1, -1, hidden.shape[-1]))
    output_weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=output_weight)  # [s, b, vocab_padded / TP]
    tp_group = _tp_group(model)
    vocab_size = model.shape.vocab_size
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if labels is not None:
        logits = _mask_vocab_padding(logits, vocab_size, tp_group.rank())
        return _TPCrossEntropy.apply(logits, labels.t().contiguous(), tp_group).t()
    return _gather_vocab(logits, tp_group).transpose(0, 1)[..., :vocab_size]
