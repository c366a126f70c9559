"""An inference forward's transformer layers without megatron-core's module call chain.

A decode step sends one token per sequence (``s = 1``) through every layer. On a CPU at batch 1-8 a layer's matmuls
take a few hundred microseconds, and megatron's wrappers around them cost about as much again: the linear layers'
autograd functions and TP region mappings, the layer's recompute/offload/CUDA-graph checks, the bias-dropout-add
factory, RoPE's cos/sin recomputed for q and for k in every layer (docs/results.md, "Decode hot path"); a prefill
pays the same per layer, plus the gated MLP's ``+ 0.0`` offset over the whole ``[s, b, ffn]`` activation.
``replayed_decoder`` runs the very operations megatron's local-spec ``TransformerLayer`` runs in eval mode (at any TP,
without sequence parallelism: the row-parallel layers' one all-reduce over the TP group each), in the same order on
the same parameters, so its hidden states equal megatron's bit for bit when the matmuls are computed megatron's way
(``x @ W^T``: an empty ``MatmulPlan``; tests/test_inference_layers.py), in prefill (any PCP algorithm: the core
attention is cptoolkit's, called as megatron calls it) and in decode; the model's measured ``matmul_plan`` may pick
a faster formulation of the same product for a few rows (``cptoolkit.models.matmul_plan``). ``supports`` says when
it applies, and ``gpt_hidden`` uses megatron's modules otherwise (MoE, MLA, q/k norms, Gemma, the TransformerEngine
spec, training, autograd).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.models.common.embeddings.rope_utils import _rotate_half
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import \
    _yarn_get_concentration_factor_from_config
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer

from cptoolkit.layers.comm import all_reduce
from cptoolkit.layers.core_attention import CPCoreAttention
from cptoolkit.models.matmul_plan import MatmulPlan

# megatron settings under which its eval forward is the plain sequence ``_layer`` replays (any other value: a fused,
# offloaded, recomputed or gated variant, left to megatron's modules).
_PLAIN_CONFIG = dict(sequence_parallel=False, multi_latent_attention=False,
                     rotary_interleaved=False, apply_rope_fusion=False, attention_output_gate=False,
                     fused_single_qkv_rope=False, bias_dropout_fusion=False, bias_activation_fusion=False,
                     use_te_activation_func=False, activation_func_clamp_value=None, test_mode=False,
                     inference_fuse_tp_communication=False, flash_decode=False, mrope_section=None)
_LAYER_FLAGS = ("recompute_input_layernorm", "recompute_pre_mlp_layernorm", "recompute_mlp", "offload_attn_norm",
                "offload_mlp_norm")
_ATTENTION_FLAGS = ("offload_qkv_linear", "offload_core_attention", "offload_attn_proj")


def _plain_layer(layer: torch.nn.Module) -> bool:
    config = layer.config
    if type(layer) is not TransformerLayer or layer.training or any(getattr(layer, f, False) for f in _LAYER_FLAGS):
        return False
    if any(getattr(config, key, default) != default for key, default in _PLAIN_CONFIG.items()):
        return False
    attention, mlp = layer.self_attention, layer.mlp
    return (type(attention) is SelfAttention and type(mlp) is MLP
            and isinstance(attention.core_attention, CPCoreAttention)
            and not any(getattr(attention, f, False) for f in _ATTENTION_FLAGS)
            and all(m is None or isinstance(m, IdentityOp) for m in (attention.q_layernorm, attention.k_layernorm))
            and isinstance(layer.pre_cross_attn_layernorm, IdentityOp) and isinstance(layer.cross_attention, IdentityOp)
            and type(attention.linear_qkv) is ColumnParallelLinear and type(mlp.linear_fc1) is ColumnParallelLinear
            and type(attention.linear_proj) is RowParallelLinear and type(mlp.linear_fc2) is RowParallelLinear
            and not attention.linear_qkv.gather_output and not mlp.linear_fc1.gather_output
            and all(m.input_is_parallel and not m.explicit_expert_comm
                    for m in (attention.linear_proj, mlp.linear_fc2)))


def supports(model) -> bool:
    """Whether ``replayed_decoder`` replays ``model``'s decoder exactly: global RoPE only (no Gemma), a plain
    ``TransformerBlock`` of local-spec dense ``TransformerLayer``s in eval mode without sequence parallelism
    (``_plain_layer``)."""
    decoder = getattr(model, "decoder", None)
    return (type(decoder) is TransformerBlock and not model.training and model.position_embedding_type == "rope"
            and model.local_inv_freq is None and model.shape.gemma is None and decoder.pre_process
            and decoder.post_process and decoder.final_layernorm is not None
            and all(_plain_layer(layer) for layer in decoder.layers))


def _linear(module: torch.nn.Module, x: torch.Tensor, plan: MatmulPlan
            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """megatron's eval ``ColumnParallelLinear`` / ``RowParallelLinear`` forward without sequence parallelism:
    ``(x @ W^T [+ b], bias)`` on this rank's weight shard (``plan.linear``), a row-parallel product summed over the
    module's TP group, the bias added here unless the module skips it (``skip_bias_add``: returned for the caller to
    add)."""
    out = plan.linear(x, module.weight)
    if isinstance(module, RowParallelLinear) and dist.get_world_size(module.tp_group) > 1:
        out = all_reduce(out.contiguous(), module.tp_group)
    if module.bias is None:
        return out, None
    if module.skip_bias_add:
        return out, module.bias
    return out + module.bias, None


def _bias_add_residual(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
    """megatron's eval bias-dropout-add: ``residual + (x + bias)`` (dropout is the identity in eval mode)."""
    residual = residual if residual.dtype == x.dtype else residual.to(x.dtype)
    if bias is not None:
        x = x + bias
    return residual + x


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron's ``_apply_rotary_pos_emb_bshd`` with its ``cos``/``sin`` computed once per step (``rope_tables``)."""
    rot_dim = cos.shape[-1]
    if rot_dim == t.shape[-1]:
        return (t * cos) + (_rotate_half(t, False) * sin)
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    return torch.cat(((t * cos) + (_rotate_half(t, False) * sin), t_pass), dim=-1)


def rope_tables(freqs: torch.Tensor, config, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of the RoPE angles ``freqs [s, b, 1, rot_dim]`` as megatron computes them in every layer:
    ``(cos(freqs) * mscale).to(dtype)``."""
    mscale = _yarn_get_concentration_factor_from_config(config)
    return (torch.cos(freqs) * mscale).to(dtype), (torch.sin(freqs) * mscale).to(dtype)


def _attention(attention: SelfAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: MatmulPlan
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``SelfAttention.forward`` on this rank's heads: fused QKV, split per query group, RoPE, core attention,
    projection."""
    mixed_qkv, _ = _linear(attention.linear_qkv, x, plan)
    heads_per_group = attention.num_attention_heads_per_partition // attention.num_query_groups_per_partition
    head_dim = attention.hidden_size_per_attention_head
    mixed_qkv = mixed_qkv.view(*mixed_qkv.shape[:-1], attention.num_query_groups_per_partition,
                               (heads_per_group + 2) * head_dim)
    query, key, value = torch.split(mixed_qkv, [heads_per_group * head_dim, head_dim, head_dim], dim=3)
    query = query.reshape(query.size(0), query.size(1), -1, head_dim)
    query, key = _rope(query, cos, sin), _rope(key, cos, sin)
    out = attention.core_attention(query, key, value, None, attn_mask_type=attention.attn_mask_type)
    return _linear(attention.linear_proj, out, plan)


def _mlp(mlp: MLP, x: torch.Tensor, plan: MatmulPlan) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``MLP.forward`` without fusions: fc1 (+ bias), the (gated) activation, fc2."""
    config = mlp.config
    hidden, bias = _linear(mlp.linear_fc1, x, plan)
    if bias is not None:
        hidden = hidden + bias
    if config.gated_linear_unit:
        x_glu, x_linear = torch.chunk(hidden, 2, dim=-1)
        if config.glu_linear_offset != 0:  # megatron adds it even when 0.0: the same values without the pass
            x_linear = x_linear + config.glu_linear_offset
        hidden = config.activation_func(x_glu) * x_linear
    else:
        hidden = mlp.activation_func(hidden)
    return _linear(mlp.linear_fc2, hidden, plan)


def _layer(layer: TransformerLayer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: MatmulPlan
           ) -> torch.Tensor:
    hidden = _bias_add_residual(*_attention(layer.self_attention, layer.input_layernorm(hidden), cos, sin, plan),
                                hidden)
    return _bias_add_residual(*_mlp(layer.mlp, layer.pre_mlp_layernorm(hidden), plan), hidden)


def replayed_decoder(model, hidden: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
    """``model.decoder``'s forward (every layer, then the final norm) on ``hidden [s, b, h]`` with the RoPE angles
    ``rotary [s, b, 1, rot_dim]`` (``gpt.rotary_freqs``), for a model that ``supports`` says it replays; the
    attention phase (prefill or decode, its caches) is the runtime's, as for megatron's forward; the linear layers'
    products are computed as ``model.matmul_plan`` says. Inference only: its collectives carry no gradient."""
    layers = model.decoder.layers
    cos, sin = rope_tables(rotary, layers[0].config, hidden.dtype)
    for layer in layers:
        hidden = _layer(layer, hidden, cos, sin, model.matmul_plan)
    return model.decoder.final_layernorm(hidden)
