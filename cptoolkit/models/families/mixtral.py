"""Mixtral (``MixtralForCausalLM``): Mistral's attention (GQA, ``sliding_window`` on every layer) with every MLP a
mixture of ``num_local_experts`` SwiGLU experts of ``intermediate_size``: softmax over the experts, the
``num_experts_per_tok`` best renormalised to sum 1. ``router_jitter_noise`` is read and ignored: transformers
multiplies the MoE input by it only in training, and cptoolkit runs the model as transformers does in eval mode."""
from __future__ import annotations

import dataclasses
from typing import Collection

from cptoolkit.models.families import Family
from cptoolkit.models.families.experts import (MIXTRAL_NAMES, aliased_key, expert_layout, expert_tensor_shapes,
                                               moe_dims, require_routing)
from cptoolkit.models.families.llama import (every_layer_window, llama_block_hf_config, llama_layout,
                                             llama_tensor_shapes, read_llama_block)
from cptoolkit.models.shape import GPTShape, positive_key
from cptoolkit.models.tensor_map import Layout, Shapes

_FIXED_KEYS = {"hidden_act": "silu"}
_DEFAULT_ROPE_THETA = 1e6  # MixtralConfig.default_theta, where Llama's is 1e4
# What every Mixtral layer routes with, whatever its config.json says (the rest are MoEDims' defaults).
_ROUTING = dict(score="softmax", norm_topk_prob=True, routed_scaling_factor=1.0, num_groups=1, topk_groups=1,
                group_score="max", score_correction_bias=False, router_bias=False, shared_ffn_hidden_size=0,
                shared_expert_gate=False)


def _read(config: dict, model_type: str) -> GPTShape:
    """Mistral's Llama block (RoPE base 1e6 when ``config.json`` sets none) with every layer MoE; the experts'
    ``intermediate_size`` is also the shape's ``ffn_hidden_size`` (no layer is dense)."""
    theta = config.get("rope_theta")
    shape = read_llama_block({**config, "rope_theta": _DEFAULT_ROPE_THETA if theta is None else theta},
                             _FIXED_KEYS, every_layer_window)
    experts = aliased_key(config, "num_local_experts", "num_experts")
    moe = moe_dims({"num_experts": experts, "top_k": "num_experts_per_tok"},
                   num_experts=positive_key(config, experts, default=8),
                   top_k=positive_key(config, "num_experts_per_tok", default=2),
                   ffn_hidden_size=shape.ffn_hidden_size, moe_layers=(True,) * shape.num_layers, **_ROUTING)
    return dataclasses.replace(shape, moe=moe)


def _owns(shape: GPTShape) -> bool:
    """Routed experts on the Llama block without Qwen's q/k/v biases, q/k norms or gated shared expert (what
    Mixtral cannot state its write refuses)."""
    return (shape.moe is not None and shape.mla is None and not shape.qkv_bias and not shape.qk_norm
            and not shape.moe.shared_expert_gate and not shape.attention_sinks)


def _write(shape: GPTShape) -> dict:
    """A Mixtral ``config.json``; a shape whose routing, layers or block Mixtral cannot state is refused."""
    moe = shape.moe
    if shape.gemma is not None or shape.sliding_layers is not None:
        raise ValueError("GPTShape with moe and gemma, or with sliding_layers, has no Hugging Face family (Mixtral "
                         "has the Llama block and windows every layer or none)")
    if shape.ffn_hidden_size != moe.ffn_hidden_size:
        raise ValueError(f"GPTShape.ffn_hidden_size={shape.ffn_hidden_size} differs from MoEDims.ffn_hidden_size="
                         f"{moe.ffn_hidden_size}; rule: equal for Mixtral (one intermediate_size sizes its experts, "
                         "and no layer is dense)")
    require_routing(moe, "mixtral", moe_layers=(True,) * shape.num_layers, **_ROUTING)
    return {**llama_block_hf_config(shape, "mixtral", MIXTRAL.architectures["mixtral"]),
            "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "sliding_window": shape.sliding_window}


def _tensor_shapes(shape: GPTShape, names: Collection[str]) -> Shapes:
    """The Llama block's tensors with every MLP Mixtral's ``block_sparse_moe`` (names play no part)."""
    return expert_tensor_shapes(shape, llama_tensor_shapes(shape), MIXTRAL_NAMES)


def _layout(shape: GPTShape, names: Collection[str]) -> Layout:
    """The Llama block's layout with every MLP the stacked experts (``families.experts``; names play no part)."""
    return expert_layout(shape, llama_layout(shape), MIXTRAL_NAMES)


MIXTRAL = Family(name="mixtral", architectures={"mixtral": ("MixtralForCausalLM",)},
                 read_hf_config=_read, owns=_owns, write_hf_config=_write,
                 tensor_shapes=_tensor_shapes, layout=_layout)
