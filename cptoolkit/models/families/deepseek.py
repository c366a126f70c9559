"""DeepSeek-V2 (``DeepseekV2ForCausalLM``) and DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-head latent
attention (``MLADims``) on the Llama block, the dense MLP of ``intermediate_size`` on the first
``first_k_dense_replace`` layers and routed experts (``MoEDims``) on every later one, as transformers builds them.

Routing, as transformers computes it: ``n_routed_experts`` experts of ``moe_intermediate_size``, the
``num_experts_per_tok`` best weighted by ``routed_scaling_factor``, plus ``n_shared_experts`` shared experts as one
SwiGLU MLP of ``n_shared_experts * moe_intermediate_size`` (0 or null: none). V2: softmax scores, ``topk_method``
``greedy`` (over every expert) or ``group_limited_greedy`` (within the ``topk_group`` of ``n_group`` groups with the
best single score), never renormalised. V3: sigmoid scores, plus ``e_score_correction_bias`` to choose the experts
(not to weight them), within the ``topk_group`` groups whose best two sum highest, renormalised with
``norm_topk_prob``. Keys whose values transformers ignores but DeepSeek's own code would follow (``moe_layer_freq``,
V2's ``norm_topk_prob``, ``scoring_func``, V3's ``topk_method``) are refused unless they agree."""
from __future__ import annotations

from typing import Collection

from cptoolkit.layers.mla_dims import MLADims
from cptoolkit.models.families import Family
from cptoolkit.models.families.experts import (DEEPSEEK_NAMES, aliased_key, expert_layout, expert_tensor_shapes,
                                               moe_dims, non_negative_key, require_routing)
from cptoolkit.models.families.llama import llama_layout, llama_tensor_shapes
from cptoolkit.models.moe_dims import MoEDims
from cptoolkit.models.shape import GPTShape, positive_key, read_rope, require_keys
from cptoolkit.models.tensor_map import Layout, Shapes, whole


# transformers' defaults for the MLA keys a DeepSeek config.json may leave out.
_MLA_DEFAULTS = {"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
_FIRST_DENSE_DEFAULT = {"deepseek_v2": 0, "deepseek_v3": 3}
# V2's MLPs (dense and shared experts) take mlp_bias; V3's have no bias.
_FIXED_KEYS = {"deepseek_v2": {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
               "deepseek_v3": {"hidden_act": "silu", "attention_bias": False}}
# transformers' defaults for the MoE keys (V2's num_experts_per_tok has none: it must be set).
_MOE_DEFAULTS = {"deepseek_v2": dict(n_routed_experts=64, num_experts_per_tok=None, moe_intermediate_size=1407,
                                     n_shared_experts=2, routed_scaling_factor=1.0),
                 "deepseek_v3": dict(n_routed_experts=256, num_experts_per_tok=8, moe_intermediate_size=2048,
                                     n_shared_experts=1, routed_scaling_factor=2.5)}
# transformers' other name for n_routed_experts (its attribute_map).
_EXPERTS_ALIAS = {"deepseek_v2": "num_experts", "deepseek_v3": "num_local_experts"}
# The scoring_func and topk_method each version's transformers model computes (absent keys agree).
_SCORING = {"deepseek_v2": "softmax", "deepseek_v3": "sigmoid"}
_TOPK_METHODS = {"deepseek_v2": ("greedy", "group_limited_greedy"), "deepseek_v3": ("noaux_tc",)}
# What each version routes with whatever its keys say.
_ROUTING = {"deepseek_v2": dict(score="softmax", norm_topk_prob=False, group_score="max",
                                score_correction_bias=False, router_bias=False, shared_expert_gate=False),
            "deepseek_v3": dict(score="sigmoid", group_score="top2_sum", score_correction_bias=True,
                                router_bias=False, shared_expert_gate=False)}


def _check_routing_keys(config: dict, model_type: str) -> None:
    """Refuse the keys transformers ignores where DeepSeek's own code would compute something else."""
    freq = config.get("moe_layer_freq", 1)
    if freq != 1:
        raise ValueError(f"moe_layer_freq={freq!r}; rule: must be 1 (transformers makes every layer from "
                         "first_k_dense_replace on MoE whatever moe_layer_freq says; DeepSeek's code would make only "
                         "every moe_layer_freq-th one)")
    scoring = config.get("scoring_func", _SCORING[model_type])
    if scoring != _SCORING[model_type]:
        raise ValueError(f"scoring_func={scoring!r}; rule: must be {_SCORING[model_type]!r} for {model_type} "
                         f"(transformers' {model_type} scores the experts with {_SCORING[model_type]} whatever "
                         "scoring_func says)")
    method = config.get("topk_method", _TOPK_METHODS[model_type][0])
    if method not in _TOPK_METHODS[model_type]:
        raise ValueError(f"topk_method={method!r}; rule: one of {_TOPK_METHODS[model_type]} for {model_type} "
                         "(what transformers computes)")
    if model_type == "deepseek_v2" and config.get("norm_topk_prob"):
        raise ValueError(f"norm_topk_prob={config['norm_topk_prob']!r}; rule: must be false for deepseek_v2 "
                         "(transformers' DeepSeek-V2 never renormalises the top-k weights, DeepSeek's code does: "
                         "the two disagree)")


def _read_moe(config: dict, model_type: str, layers: int, first_dense: int) -> MoEDims:
    """The routed experts of layers ``first_dense`` .. ``layers - 1``."""
    _check_routing_keys(config, model_type)
    defaults = _MOE_DEFAULTS[model_type]
    ffn = positive_key(config, "moe_intermediate_size", default=defaults["moe_intermediate_size"])
    # null: no shared expert, as in DeepSeek's code (transformers' would fail to build one).
    shared = 0 if "n_shared_experts" in config and config["n_shared_experts"] is None else \
        non_negative_key(config, "n_shared_experts", defaults["n_shared_experts"])
    if model_type == "deepseek_v2" and config.get("topk_method", "greedy") == "greedy":
        groups = {"num_groups": 1, "topk_groups": 1}
    else:
        v3 = model_type == "deepseek_v3"
        groups = {"num_groups": positive_key(config, "n_group", default=8 if v3 else None),
                  "topk_groups": positive_key(config, "topk_group", default=4 if v3 else None)}
    experts = aliased_key(config, "n_routed_experts", _EXPERTS_ALIAS[model_type])
    keys = {"num_experts": experts, "top_k": "num_experts_per_tok",
            **({} if groups["num_groups"] == 1 else {"num_groups": "n_group", "topk_groups": "topk_group"})}
    routing = dict(_ROUTING[model_type])
    if model_type == "deepseek_v3":
        routing["norm_topk_prob"] = bool(config.get("norm_topk_prob", True))
    return moe_dims(keys, num_experts=positive_key(config, experts, default=defaults["n_routed_experts"]),
                    top_k=positive_key(config, "num_experts_per_tok", default=defaults["num_experts_per_tok"]),
                    ffn_hidden_size=ffn, moe_layers=tuple(i >= first_dense for i in range(layers)), **groups,
                    routed_scaling_factor=positive_key(config, "routed_scaling_factor", float,
                                                       default=defaults["routed_scaling_factor"]),
                    shared_ffn_hidden_size=shared * ffn, **routing)


def _read(config: dict, model_type: str) -> GPTShape:
    """The Llama block with multi-head latent attention, routed experts from ``first_k_dense_replace`` on (none when
    it covers every layer: the MoE keys are then not read, as transformers builds no MoE layer). Kimi K2
    (``kimi_k2``) is DeepSeek-V3's architecture under another name (its config.json names
    ``DeepseekV3ForCausalLM``): read as ``deepseek_v3``."""
    model_type = _SAME_ARCHITECTURE.get(model_type, model_type)
    require_keys(config, _FIXED_KEYS[model_type])
    layers = positive_key(config, "num_hidden_layers")
    first_dense = non_negative_key(config, "first_k_dense_replace", _FIRST_DENSE_DEFAULT[model_type])
    moe = _read_moe(config, model_type, layers, first_dense) if first_dense < layers else None
    heads = positive_key(config, "num_attention_heads")
    q_lora = config.get("q_lora_rank", 1536)
    dims = {key: positive_key(config, key, default=default) for key, default in _MLA_DEFAULTS.items()}
    theta, rope_scaling = read_rope(config)
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    mscale_all_dim = rope.get("mscale_all_dim") or 0.0
    if not isinstance(mscale_all_dim, (int, float)):
        raise ValueError(f"mscale_all_dim={mscale_all_dim!r}; rule: must be a number")
    mla = MLADims(q_lora_rank=None if q_lora is None else positive_key(config, "q_lora_rank"), **dims,
                  rope_interleave=model_type == "deepseek_v2" or bool(config.get("rope_interleave", True)),
                  mscale_all_dim=float(mscale_all_dim))
    return GPTShape(arch="llama", num_layers=layers, hidden_size=positive_key(config, "hidden_size"),
                    num_attention_heads=heads, num_kv_heads=1,
                    ffn_hidden_size=positive_key(config, "intermediate_size"),
                    vocab_size=positive_key(config, "vocab_size"),
                    max_seq_len=positive_key(config, "max_position_embeddings"),
                    rope_theta=theta, norm_eps=positive_key(config, "rms_norm_eps", float, default=1e-6),
                    tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                    head_dim=mla.qk_rope_head_dim, rope_scaling=rope_scaling, mla=mla, moe=moe)


def _owns(shape: GPTShape) -> bool:
    return shape.mla is not None and not shape.attention_sinks


def _write(shape: GPTShape) -> dict:
    """A DeepSeek-V3 ``config.json`` (sigmoid routing, or every layer dense), or a DeepSeek-V2 one (softmax
    routing); a shape neither can state is refused."""
    m, moe = shape.mla, shape.moe
    model_type = "deepseek_v2" if moe is not None and moe.score == "softmax" else "deepseek_v3"
    keys = {"model_type": model_type, "architectures": list(DEEPSEEK.architectures[model_type]),
            "num_hidden_layers": shape.num_layers, "hidden_size": shape.hidden_size,
            "num_attention_heads": shape.num_attention_heads, "num_key_value_heads": shape.num_attention_heads,
            "intermediate_size": shape.ffn_hidden_size, "vocab_size": shape.vocab_size,
            "max_position_embeddings": shape.max_seq_len, "hidden_act": "silu",
            "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
            "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim,
            "rope_interleave": m.rope_interleave,
            "first_k_dense_replace": shape.num_layers, "attention_bias": False,
            "rope_parameters": {"rope_theta": shape.rope_theta, **shape.rope_scaling.to_hf(),
                                **({"mscale_all_dim": m.mscale_all_dim} if m.mscale_all_dim else {})},
            "rms_norm_eps": shape.norm_eps, "tie_word_embeddings": shape.tie_embeddings}
    return keys if moe is None else {**keys, **_moe_keys(shape, model_type)}


def _moe_keys(shape: GPTShape, model_type: str) -> dict:
    """The MoE keys of ``shape``'s DeepSeek ``config.json``."""
    moe = shape.moe
    first_dense = moe.moe_layers.index(True)
    if moe.moe_layers != tuple(i >= first_dense for i in range(shape.num_layers)):
        raise ValueError(f"MoEDims.moe_layers={moe.moe_layers} has no DeepSeek config.json; rule: dense layers "
                         "first, then MoE layers to the last (first_k_dense_replace)")
    if model_type == "deepseek_v2" and not shape.mla.rope_interleave:
        raise ValueError("MLADims.rope_interleave=False with softmax routing has no DeepSeek config.json; rule: "
                         "softmax routing is DeepSeek-V2's, which always interleaves RoPE")
    if moe.shared_ffn_hidden_size % moe.ffn_hidden_size:
        raise ValueError(f"MoEDims.shared_ffn_hidden_size={moe.shared_ffn_hidden_size} has no DeepSeek config.json; "
                         f"rule: a multiple of ffn_hidden_size={moe.ffn_hidden_size} (n_shared_experts experts)")
    require_routing(moe, model_type, **_ROUTING[model_type])
    keys = {"first_k_dense_replace": first_dense, "moe_layer_freq": 1, "n_routed_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k, "moe_intermediate_size": moe.ffn_hidden_size,
            "n_shared_experts": moe.shared_ffn_hidden_size // moe.ffn_hidden_size,
            "routed_scaling_factor": moe.routed_scaling_factor, "n_group": moe.num_groups,
            "topk_group": moe.topk_groups, "norm_topk_prob": moe.norm_topk_prob,
            "scoring_func": _SCORING[model_type]}
    if model_type == "deepseek_v2":
        return {**keys, "topk_method": "greedy" if moe.num_groups == 1 else "group_limited_greedy"}
    return {**keys, "topk_method": "noaux_tc"}

# DeepSeek's attention tensors (under model.layers.N.self_attn.) -> MLASelfAttention's (under
# decoder.layers.N.self_attention.); the rest of the block is the Llama one.
_MLA_NAMES = {"q_proj": "linear_q_proj", "q_a_proj": "linear_q_down_proj", "q_a_layernorm": "q_layernorm",
              "q_b_proj": "linear_q_up_proj", "kv_a_proj_with_mqa": "linear_kv_down_proj",
              "kv_a_layernorm": "kv_layernorm", "kv_b_proj": "linear_kv_up_proj", "o_proj": "linear_proj"}


def _mla_attention_shapes(shape: GPTShape) -> dict[str, tuple[int, ...]]:
    """One layer's DeepSeek attention tensors (names after ``self_attn.``, without ``.weight``) and shapes."""
    m, hidden, heads = shape.mla, shape.hidden_size, shape.num_attention_heads
    shapes = {"kv_a_proj_with_mqa": (m.latent_dim, hidden), "kv_a_layernorm": (m.kv_lora_rank,),
              "kv_b_proj": (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
              "o_proj": (hidden, heads * m.v_head_dim)}
    if m.q_lora_rank is None:
        return {"q_proj": (heads * m.qk_head_dim, hidden), **shapes}
    return {"q_a_proj": (m.q_lora_rank, hidden), "q_a_layernorm": (m.q_lora_rank,),
            "q_b_proj": (heads * m.qk_head_dim, m.q_lora_rank), **shapes}


def _tensor_shapes(shape: GPTShape, names: Collection[str]) -> Shapes:
    """Every tensor a DeepSeek-V2/V3 checkpoint of ``shape`` holds, with its shape: the Llama block's with MLA's
    attention, and on each MoE layer the router (V3: with ``e_score_correction_bias``), experts and shared experts
    (names play no part)."""
    shapes = {name: size for name, size in llama_tensor_shapes(shape).items() if ".self_attn." not in name}
    for layer in range(shape.num_layers):
        shapes.update({f"model.layers.{layer}.self_attn.{name}.weight": size
                       for name, size in _mla_attention_shapes(shape).items()})
    return expert_tensor_shapes(shape, shapes, DEEPSEEK_NAMES)


def _layout(shape: GPTShape, names: Collection[str]) -> Layout:
    """The full state dict as a DeepSeek checkpoint's tensors: Llama's embedding, norms and dense MLP, every
    attention tensor whole under its ``MLASelfAttention`` name, each MoE layer's stacked experts
    (``families.experts``; names play no part)."""
    shapes = _tensor_shapes(shape, names)
    layout = {name: pieces for name, pieces in llama_layout(shape).items() if ".self_attention." not in name}
    for layer in range(shape.num_layers):
        for name in _mla_attention_shapes(shape):
            hf = f"model.layers.{layer}.self_attn.{name}.weight"
            layout[f"decoder.layers.{layer}.self_attention.{_MLA_NAMES[name]}.weight"] = whole(shapes, hf)
    return expert_layout(shape, layout, DEEPSEEK_NAMES)


_SAME_ARCHITECTURE = {"kimi_k2": "deepseek_v3"}
DEEPSEEK = Family(name="deepseek", architectures={"deepseek_v2": ("DeepseekV2ForCausalLM",),
                                                  "deepseek_v3": ("DeepseekV3ForCausalLM",),
                                                  "kimi_k2": ("DeepseekV3ForCausalLM",)},
                  read_hf_config=_read, owns=_owns, write_hf_config=_write,
                  tensor_shapes=_tensor_shapes, layout=_layout)
