"""gpt-oss (``GptOssForCausalLM``): the Llama block with learned attention sinks (one logit per query head in every
softmax), biases on q/k/v and o (``attention_bias``), its windowed and full layers alternating (``layer_types``,
``sliding_window``), YaRN RoPE, and every MLP a mixture of ``num_local_experts`` experts: router logits with a
bias, the ``num_experts_per_tok`` best softmaxed among themselves (= softmax over all, renormalised), each expert
with biases and a clamped SwiGLU on interleaved gate/up columns (``swiglu_limit``, ``swiglu_alpha``).

Its checkpoint stacks the experts: ``mlp.experts.gate_up_proj [E, hidden, 2F]`` (columns interleaved gate, up),
``gate_up_proj_bias [E, 2F]``, ``down_proj [E, F, hidden]``, ``down_proj_bias [E, hidden]``; the router is
``mlp.router.{weight,bias}``, the sinks ``self_attn.sinks [heads]``."""
from __future__ import annotations

import dataclasses
from typing import Collection

from cptoolkit.models.families import Family
from cptoolkit.models.families.experts import moe_dims, require_routing
from cptoolkit.models.families.llama import llama_block_hf_config, llama_layout, llama_tensor_shapes, read_llama_block
from cptoolkit.models.shape import GPTShape, hf_layer_types, layer_types_flags, positive_key, window_from_hf
from cptoolkit.models.tensor_map import Layout, Shapes, whole

# transformers' GptOssConfig defaults for keys a config.json may leave out.
_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
_DEFAULTS = {"sliding_window": 128, "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "num_local_experts": 128,
             "num_experts_per_tok": 4}
# How every gpt-oss layer routes and computes its experts (the rest are MoEDims' defaults).
_ROUTING = dict(score="softmax", norm_topk_prob=True, routed_scaling_factor=1.0, num_groups=1, topk_groups=1,
                group_score="max", score_correction_bias=False, router_bias=True, shared_ffn_hidden_size=0,
                shared_expert_gate=False, expert_bias=True, activation="gpt_oss")


def _window(config: dict):
    """``layer_types`` (default: transformers' alternation, windowed on the even layers 0, 2, ...) with
    ``sliding_window`` (default 128)."""
    layers = positive_key(config, "num_hidden_layers")
    flags = layer_types_flags(config, layers) or tuple(i % 2 == 0 for i in range(layers))
    return window_from_hf({**config, "sliding_window": config.get("sliding_window", _DEFAULTS["sliding_window"])},
                          flags)


def _read(config: dict, model_type: str) -> GPTShape:
    """The Llama block with sinks, attention biases (``attention_bias``, default true) and every layer MoE."""
    if not (config.get("rope_parameters") or config.get("rope_scaling")):
        config = {**config, "rope_parameters": _DEFAULT_ROPE}
    bias = config.get("attention_bias", True)
    if not isinstance(bias, bool):
        raise ValueError(f"attention_bias={bias!r}; rule: true or false")
    shape = read_llama_block(config, {}, _window, qkv_bias=bias)
    swiglu = {key: positive_key(config, key, float, default=_DEFAULTS[key]) for key in ("swiglu_alpha", "swiglu_limit")}
    moe = moe_dims({"num_experts": "num_local_experts", "top_k": "num_experts_per_tok"},
                   num_experts=positive_key(config, "num_local_experts", default=_DEFAULTS["num_local_experts"]),
                   top_k=positive_key(config, "num_experts_per_tok", default=_DEFAULTS["num_experts_per_tok"]),
                   ffn_hidden_size=shape.ffn_hidden_size, moe_layers=(True,) * shape.num_layers, **_ROUTING, **swiglu)
    return dataclasses.replace(shape, moe=moe, attention_sinks=True, attention_out_bias=bias)


def _owns(shape: GPTShape) -> bool:
    return shape.attention_sinks


def _write(shape: GPTShape) -> dict:
    """A gpt-oss ``config.json``; a shape it cannot state (no experts, other routing, q/k norms, ...) is refused."""
    moe = shape.moe
    if moe is None or shape.mla is not None or shape.gemma is not None or shape.qk_norm:
        raise ValueError("GPTShape with attention_sinks is written as gpt-oss, which needs moe on every layer and no "
                         "mla, gemma or qk_norm")
    if shape.qkv_bias != shape.attention_out_bias or shape.ffn_hidden_size != moe.ffn_hidden_size:
        raise ValueError("GPTShape for gpt-oss: qkv_bias and attention_out_bias must be equal (one attention_bias) "
                         "and ffn_hidden_size must equal MoEDims.ffn_hidden_size (one intermediate_size)")
    require_routing(moe, "gpt_oss", moe_layers=(True,) * shape.num_layers, **_ROUTING)
    keys = llama_block_hf_config(shape, "gpt_oss", GPT_OSS.architectures["gpt_oss"])
    return {**keys, "attention_bias": shape.qkv_bias, "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k, "swiglu_alpha": moe.swiglu_alpha, "swiglu_limit": moe.swiglu_limit,
            "layer_types": hf_layer_types(shape), "sliding_window": shape.sliding_window}


def _expert_shapes(shape: GPTShape, hf: str) -> Shapes:
    """One layer's router and stacked experts (``hf``: its ``model.layers.N.`` prefix)."""
    experts, hidden, ffn = shape.moe.num_experts, shape.hidden_size, shape.moe.ffn_hidden_size
    return {f"{hf}mlp.router.weight": (experts, hidden), f"{hf}mlp.router.bias": (experts,),
            f"{hf}mlp.experts.gate_up_proj": (experts, hidden, 2 * ffn),
            f"{hf}mlp.experts.gate_up_proj_bias": (experts, 2 * ffn),
            f"{hf}mlp.experts.down_proj": (experts, ffn, hidden),
            f"{hf}mlp.experts.down_proj_bias": (experts, hidden)}


def _tensor_shapes(shape: GPTShape, names: Collection[str]) -> Shapes:
    """The Llama block's tensors without its dense MLP, plus o_proj's bias, the sinks, the router and the stacked
    experts of every layer (names play no part)."""
    shapes = {name: size for name, size in llama_tensor_shapes(shape).items() if ".mlp." not in name}
    for layer in range(shape.num_layers):
        hf = f"model.layers.{layer}."
        shapes[f"{hf}self_attn.sinks"] = (shape.num_attention_heads,)
        if shape.attention_out_bias:
            shapes[f"{hf}self_attn.o_proj.bias"] = (shape.hidden_size,)
        shapes.update(_expert_shapes(shape, hf))
    return shapes


def _layout(shape: GPTShape, names: Collection[str]) -> Layout:
    """The Llama block's layout without its dense MLP; per layer the sinks (``core_attention.sinks``), o_proj's
    bias (``linear_proj.bias``), the router, and each expert's slot of the stacked tensors as its rows: the
    transposed ``gate_up_proj[e]`` (interleaved rows, as ``LocalExperts`` computes them) and its bias,
    ``down_proj[e]`` (already ``[F, hidden]``), ``down_proj_bias`` whole (names play no part)."""
    shapes = _tensor_shapes(shape, names)
    layout = {name: pieces for name, pieces in llama_layout(shape).items() if ".mlp." not in name}
    experts = range(shape.moe.num_experts)
    for layer in range(shape.num_layers):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        layout[mc + "self_attention.core_attention.sinks"] = whole(shapes, hf + "self_attn.sinks")
        if shape.attention_out_bias:
            layout[mc + "self_attention.linear_proj.bias"] = whole(shapes, hf + "self_attn.o_proj.bias")
        stacked = hf + "mlp.experts."
        layout.update({
            mc + "mlp.router.weight": whole(shapes, hf + "mlp.router.weight"),
            mc + "mlp.router.bias": whole(shapes, hf + "mlp.router.bias"),
            mc + "mlp.experts.fc1_weight": tuple(piece for e in experts for piece in
                                                 whole(shapes, stacked + "gate_up_proj", transposed=True, index=e)),
            mc + "mlp.experts.fc1_bias": tuple(piece for e in experts for piece in
                                               whole(shapes, stacked + "gate_up_proj_bias", index=e)),
            mc + "mlp.experts.fc2_weight": tuple(piece for e in experts for piece in
                                                 whole(shapes, stacked + "down_proj", index=e)),
            mc + "mlp.experts.fc2_bias": whole(shapes, stacked + "down_proj_bias"),
        })
    return layout


GPT_OSS = Family(name="gpt_oss", architectures={"gpt_oss": ("GptOssForCausalLM",)},
                 read_hf_config=_read, owns=_owns, write_hf_config=_write,
                 tensor_shapes=_tensor_shapes, layout=_layout)
