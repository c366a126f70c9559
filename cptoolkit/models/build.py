"""Construct the TP-sharded model of a ``GPTShape``: megatron-core's config, the uninitialized
``CPGPTModel`` on a given ``ProcessGroupCollection``, and seeded random weights that are the same
for every TP size (drawn full on every rank, then sliced by ``cptoolkit.models.tp_sharding``)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import LayerNormImpl, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from cptoolkit.layers.core_attention import AttentionRuntime, get_gpt_layer_spec
from cptoolkit.layers.mla import MLASelfAttention
from cptoolkit.models.gemma import gemma_block_spec
from cptoolkit.models.gpt import CPGPTModel
from cptoolkit.models.shape import GPTShape, check_tp, padded_vocab_size
from cptoolkit.models.tp_sharding import NORM, ROW, load_full_state_dict, param_kinds
from cptoolkit.moe.layer import MoEGroups, MoELayer

INIT_STD = 0.02


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def megatron_config(shape: GPTShape, tp_size: int, dtype: torch.dtype) -> TransformerConfig:
    """The megatron-core config of ``shape`` at TP=``tp_size``: CPU init, no dropout, no fusions.
    YaRN's ``attention_factor`` multiplies RoPE's cos and sin in transformers, so q and k each; here the
    softmax scale carries its square instead. A sliding window is megatron's ``window_size = (window - 1, 0)``
    on the layers ``window_attn_skip_freq`` (one flag per layer) marks, which ``CPCoreAttention`` reads. The Gemma
    block: GeGLU (tanh GELU, gated) and scores scaled by ``query_pre_attn_scalar ** -0.5``."""
    llama = shape.arch == "llama"
    score_dim = shape.head_dim if shape.gemma is None else shape.gemma.query_pre_attn_scalar
    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=max(shape.num_kv_heads, tp_size), kv_channels=shape.head_dim,
        softmax_scale=shape.rope_scaling.attention_factor ** 2 / math.sqrt(score_dim),
        ffn_hidden_size=shape.ffn_hidden_size, tensor_model_parallel_size=tp_size,
        normalization="RMSNorm" if llama else "LayerNorm", layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=llama, activation_func=F.silu if llama and shape.gemma is None else _gelu_tanh,
        add_bias_linear=not llama or shape.attention_out_bias, add_qkv_bias=not llama or shape.qkv_bias,
        qk_layernorm=shape.qk_norm,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, perform_initialization=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        cross_entropy_loss_fusion=False, **_window_config(shape))


def _window_config(shape: GPTShape) -> dict:
    """megatron's sliding-window fields for ``shape`` (none without a window)."""
    if shape.sliding_window is None:
        return {}
    layers = shape.sliding_layers or (True,) * shape.num_layers
    return {"window_size": (shape.sliding_window - 1, 0), "window_attn_skip_freq": [int(f) for f in layers]}


def layer_spec(shape: GPTShape, runtime: AttentionRuntime, pg_collection: ProcessGroupCollection
               ) -> ModuleSpec | TransformerBlockSubmodules:
    """cptoolkit's layer spec for ``shape.arch``, with ``qk_norm``: an RMSNorm over ``head_dim`` for the
    query and the key heads (megatron's ``q_layernorm``/``k_layernorm``, as its local spec with
    ``qk_layernorm=True`` builds them), applied before RoPE as in Qwen3; with ``mla``, cptoolkit's
    ``MLASelfAttention`` instead of megatron's ``SelfAttention``. With ``gemma``: the whole block's spec
    (``gemma_block_spec``: megatron's local linear layers, Gemma's norms, the attention softcap on every layer).
    With ``attention_sinks``: ``CPCoreAttention``'s learned sinks (gpt-oss). With ``moe``: the block's spec,
    ``MoELayer`` as the MLP of the layers ``moe.moe_layers`` flags (megatron's local spec: a separate pre-MLP norm),
    its groups from ``pg_collection`` (``MoEGroups``)."""
    if shape.gemma is not None:
        spec = get_gpt_layer_spec(runtime, shape.arch, transformer_engine=False)
        spec.submodules.self_attention.submodules.core_attention.params["softcap"] = \
            shape.gemma.attn_logit_softcapping
        return gemma_block_spec(spec, shape.num_layers, shape.qk_norm)
    spec = get_gpt_layer_spec(runtime, shape.arch, transformer_engine=False if shape.moe is not None else None)
    if shape.attention_sinks:
        spec.submodules.self_attention.submodules.core_attention.params["attention_sinks"] = True
    if shape.mla is not None:
        spec.submodules.self_attention = ModuleSpec(module=MLASelfAttention, params={
            "runtime": runtime, "mla": shape.mla, "softmax_scale": shape.mla_softmax_scale(),
            "rope_attention_factor": shape.rope_scaling.attention_factor})
    if shape.qk_norm:
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = WrappedTorchNorm
    if shape.moe is None:
        return spec
    pcp_rank = 0 if runtime.pcp_group is None else runtime.pcp_group.rank()
    moe = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=_ParamsSpec(
        MoELayer, {"dims": shape.moe, "groups": MoEGroups.from_pg_collection(pg_collection, pcp_rank),
                   "runtime": runtime})))
    return TransformerBlockSubmodules(layer_specs=[moe if flag else spec for flag in shape.moe.moe_layers],
                                      layer_norm=LayerNormImpl)


@dataclasses.dataclass(frozen=True)
class _ParamsSpec:
    """What megatron's ``build_module`` instantiates as ``module(**params, config=...)``. Not a ``ModuleSpec``, so
    ``TransformerLayer`` adds no ``tp_group``/``pg_collection`` of its own (and logs no "unknown MLP type"):
    ``MoELayer`` takes its groups in ``params``."""

    module: type
    params: dict[str, Any]


def new_gpt_model(shape: GPTShape, pg_collection: ProcessGroupCollection, runtime: AttentionRuntime,
                  dtype: torch.dtype = torch.float32) -> CPGPTModel:
    """An *uninitialized* megatron-core ``GPTModel`` sharded over ``pg_collection.tp``; fill it with
    ``load_full_state_dict``. ``pg_collection`` is ``ParallelGroups.megatron_pg_collection()`` (its
    ``cp`` group is this rank alone: cptoolkit's PCP/DCP run inside ``CPCoreAttention``). Every
    attention layer shares ``runtime``."""
    tp_size = pg_collection.tp.size()
    check_tp(shape, tp_size)
    model = CPGPTModel(
        shape, config=megatron_config(shape, tp_size, dtype),
        transformer_layer_spec=layer_spec(shape, runtime, pg_collection),
        vocab_size=padded_vocab_size(shape, tp_size), max_sequence_length=shape.max_seq_len,
        share_embeddings_and_output_weights=shape.tie_embeddings,
        position_embedding_type="rope" if shape.arch == "llama" else "learned_absolute",
        rotary_base=shape.rope_theta, pg_collection=pg_collection)
    return model.to(dtype)  # megatron's torch norms are created in float32 whatever params_dtype says


def init_full_state_dict(model: CPGPTModel, seed: int) -> dict[str, torch.Tensor]:
    """Random full weights (float32) for ``model``'s parameters, drawn in name order from one
    seeded generator: norm weights their identity (1, or 0 for Gemma's ``1 + weight`` norms), biases 0, matrices
    N(0, 0.02²) (output projections of each layer scaled by ``1/sqrt(2·num_layers)``, as GPT-2 does)."""
    generator = torch.Generator().manual_seed(seed)
    shape, tp_size, kinds = model.shape, model.pg_collection.tp.size(), param_kinds(model)
    modules, full = dict(model.named_modules()), {}
    for name, local in sorted(model.named_parameters()):
        kind = kinds[name]
        size = kind.full_shape(local.shape, shape, tp_size)
        if kind is NORM:
            identity = getattr(modules[name.rpartition(".")[0]], "identity_weight", 1.0)
            full[name] = torch.full(size, identity) if name.endswith("weight") else torch.zeros(size)
        elif name.endswith("bias"):
            full[name] = torch.zeros(size)
        else:
            std = INIT_STD / math.sqrt(2 * shape.num_layers) if kind is ROW else INIT_STD
            full[name] = torch.randn(size, generator=generator) * std
    return full


def build_gpt_model(shape: GPTShape, pg_collection: ProcessGroupCollection, runtime: AttentionRuntime,
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> CPGPTModel:
    """A randomly initialized model; the same ``seed`` gives the same (unsharded) weights for
    every TP size, because the full weights are drawn on every rank and then sliced."""
    model = new_gpt_model(shape, pg_collection, runtime, dtype)
    load_full_state_dict(model, init_full_state_dict(model, seed))
    return model
