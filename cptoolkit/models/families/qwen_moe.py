"""Qwen2-MoE (``Qwen2MoeForCausalLM``) and Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen2's (q/k/v biases, while
``qkv_bias`` is unset or true) or Qwen3's (per-head q/k RMSNorm) attention, with routed experts of
``moe_intermediate_size`` on the layers transformers' decoder layer picks (not in ``mlp_only_layers``, and
``(i + 1) % decoder_sparse_step == 0``) and the dense MLP of ``intermediate_size`` on the others. Routing: softmax
over ``num_experts``, the ``num_experts_per_tok`` best, renormalised with ``norm_topk_prob``. Qwen2-MoE adds a
shared expert of ``shared_expert_intermediate_size`` scaled by ``sigmoid(shared_expert_gate @ x)``.
Windows: Qwen2-MoE's layers as ``layer_types`` says, else (transformers' ``Qwen2MoeConfig``) the even layers below
``max_window_layers``; Qwen3-MoE's every layer; both only with ``use_sliding_window``."""
from __future__ import annotations

import dataclasses
from typing import Collection, Optional

from cptoolkit.models.families import Family
from cptoolkit.models.families.experts import (QWEN_MOE_NAMES, aliased_key, expert_layout, expert_tensor_shapes,
                                               moe_dims, non_negative_key, require_routing)
from cptoolkit.models.families.llama import (every_layer_window, llama_block_hf_config, llama_layout,
                                             llama_tensor_shapes, read_llama_block)
from cptoolkit.models.families.qwen import qwen_window
from cptoolkit.models.shape import GPTShape, hf_layer_types, positive_key
from cptoolkit.models.tensor_map import Layout, Shapes

# Qwen2-MoE's q/k/v biases come with its qkv_bias; Qwen3-MoE's attention_bias would add o_proj's too.
_FIXED_KEYS = {"qwen2_moe": {"hidden_act": "silu"}, "qwen3_moe": {"hidden_act": "silu", "attention_bias": False}}
# transformers' defaults for the MoEDims fields a config.json may leave out.
_DEFAULTS = {"qwen2_moe": dict(num_experts=60, top_k=4, ffn_hidden_size=1408),
             "qwen3_moe": dict(num_experts=128, top_k=8, ffn_hidden_size=768)}
_SHARED_DEFAULT = 5632  # Qwen2MoeConfig.shared_expert_intermediate_size
# What both route with, whatever their config.json says.
_ROUTING = dict(score="softmax", routed_scaling_factor=1.0, num_groups=1, topk_groups=1, group_score="max",
                score_correction_bias=False, router_bias=False)


def _qwen2_moe_window(config: dict) -> tuple[Optional[int], Optional[tuple[bool, ...]]]:
    """Qwen2MoeConfig's default ``layer_types``: the even layers (0, 2, ...) below ``max_window_layers``."""
    return qwen_window(config, lambda i, max_window_layers: i % 2 == 0 and i < max_window_layers)


def _qwen3_moe_window(config: dict) -> tuple[Optional[int], Optional[tuple[bool, ...]]]:
    """Qwen3-MoE windows every layer with ``use_sliding_window`` (its attention ignores ``layer_types``)."""
    return every_layer_window(config) if config.get("use_sliding_window") else (None, None)


def _experts_key(config: dict, model_type: str) -> str:
    """Qwen3-MoE's ``num_experts`` (what its checkpoints say) is ``num_local_experts`` in transformers 5 (its
    ``attribute_map``); Qwen2-MoE has only ``num_experts``."""
    return "num_experts" if model_type == "qwen2_moe" else aliased_key(config, "num_local_experts", "num_experts")


def _moe_layers(config: dict, model_type: str, layers: int) -> tuple[bool, ...]:
    """transformers' decoder layer ``i`` is MoE when ``i`` is not in ``mlp_only_layers``, ``num_experts > 0`` and
    ``(i + 1) % decoder_sparse_step == 0``."""
    num_experts = non_negative_key(config, _experts_key(config, model_type), _DEFAULTS[model_type]["num_experts"])
    step = positive_key(config, "decoder_sparse_step", default=1)
    mlp_only = config.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in mlp_only):
        raise ValueError(f"mlp_only_layers={mlp_only!r}; rule: a list of layer indices (0-based)")
    return tuple(i not in mlp_only and num_experts > 0 and (i + 1) % step == 0 for i in range(layers))


def _read(config: dict, model_type: str) -> GPTShape:
    """The Qwen2/Qwen3 block with routed experts on the MoE layers; no MoE layer (``num_experts: 0``, every layer in
    ``mlp_only_layers``) is the dense model transformers builds then (``moe=None``)."""
    qwen2 = model_type == "qwen2_moe"
    shape = read_llama_block(config, _FIXED_KEYS[model_type], _qwen2_moe_window if qwen2 else _qwen3_moe_window,
                             qkv_bias=qwen2 and bool(config.get("qkv_bias", True)), qk_norm=not qwen2)
    flags = _moe_layers(config, model_type, shape.num_layers)
    if not any(flags):
        return shape
    keys = {"num_experts": _experts_key(config, model_type), "top_k": "num_experts_per_tok",
            "ffn_hidden_size": "moe_intermediate_size"}
    read = {field: positive_key(config, keys[field], default=_DEFAULTS[model_type][field]) for field in keys}
    shared = positive_key(config, "shared_expert_intermediate_size", default=_SHARED_DEFAULT) if qwen2 else 0
    moe = moe_dims(keys, **read, moe_layers=flags, norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                   shared_ffn_hidden_size=shared, shared_expert_gate=qwen2, **_ROUTING)
    return dataclasses.replace(shape, moe=moe)


def _owns(shape: GPTShape) -> bool:
    """Routed experts on the Llama block with Qwen2-MoE's gated shared expert or q/k/v biases, or Qwen3's q/k norms
    (what neither can state its write refuses)."""
    return (shape.moe is not None and shape.mla is None and not shape.attention_sinks
            and (shape.qkv_bias or shape.qk_norm or shape.moe.shared_expert_gate))


def _write(shape: GPTShape) -> dict:
    """A Qwen3-MoE ``config.json`` with q/k norms, else a Qwen2-MoE one; a shape neither can state is refused."""
    moe, qwen3 = shape.moe, shape.qk_norm
    model_type = "qwen3_moe" if qwen3 else "qwen2_moe"
    if shape.gemma is not None or (qwen3 and shape.qkv_bias):
        raise ValueError("GPTShape with moe and gemma, or with qk_norm and qkv_bias, has no Hugging Face family "
                         "(Qwen3-MoE's attention_bias would add an o_proj bias)")
    if qwen3 and shape.sliding_layers is not None:
        raise ValueError(f"GPTShape.sliding_layers={shape.sliding_layers} with qk_norm and moe has no Hugging Face "
                         "family (Qwen3-MoE windows every layer or none)")
    shared = dict(shared_ffn_hidden_size=0, shared_expert_gate=False) if qwen3 else dict(shared_expert_gate=True)
    require_routing(moe, model_type, **_ROUTING, **shared)
    keys = {**llama_block_hf_config(shape, model_type, QWEN_MOE.architectures[model_type]),
            "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": moe.ffn_hidden_size, "norm_topk_prob": moe.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": [i for i, flag in enumerate(moe.moe_layers) if not flag]}
    if not qwen3:
        keys.update(qkv_bias=shape.qkv_bias, shared_expert_intermediate_size=moe.shared_ffn_hidden_size)
    if shape.sliding_window is not None:
        keys.update(use_sliding_window=True, sliding_window=shape.sliding_window)
        if not qwen3:
            keys["layer_types"] = hf_layer_types(shape)
    return keys


def _tensor_shapes(shape: GPTShape, names: Collection[str]) -> Shapes:
    """The Qwen2/Qwen3 block's tensors with each MoE layer's ``mlp`` the router, experts and (Qwen2-MoE) the gated
    ``shared_expert`` (names play no part)."""
    return expert_tensor_shapes(shape, llama_tensor_shapes(shape), QWEN_MOE_NAMES)


def _layout(shape: GPTShape, names: Collection[str]) -> Layout:
    """The Qwen2/Qwen3 block's layout with each MoE layer's MLP the stacked experts (``families.experts``; names
    play no part)."""
    return expert_layout(shape, llama_layout(shape), QWEN_MOE_NAMES)


QWEN_MOE = Family(name="qwen_moe", architectures={"qwen2_moe": ("Qwen2MoeForCausalLM",),
                                                  "qwen3_moe": ("Qwen3MoeForCausalLM",)},
                  read_hf_config=_read, owns=_owns, write_hf_config=_write,
                  tensor_shapes=_tensor_shapes, layout=_layout)
