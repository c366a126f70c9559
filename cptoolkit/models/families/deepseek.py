"""DeepSeek-V2 (``DeepseekV2ForCausalLM``) and DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-head latent
attention (``MLADims``) on the Llama block, dense MLP layers only (``first_k_dense_replace`` must cover every
layer: cptoolkit has no MoE layers)."""
from __future__ import annotations

from typing import Collection
from cptoolkit.models.families import Family
from cptoolkit.models.families.llama import llama_layout, llama_tensor_shapes
from cptoolkit.models.shape import GPTShape, MLADims, positive_key, read_rope, require_keys
from cptoolkit.models.tensor_map import Layout, Shapes, whole


# transformers' defaults for the MLA keys a DeepSeek config.json may leave out.
_MLA_DEFAULTS = {"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
_FIRST_DENSE_DEFAULT = {"deepseek_v2": 0, "deepseek_v3": 3}


def _read(config: dict, model_type: str) -> GPTShape:
    """The Llama block with multi-head latent attention; every layer must be dense."""
    require_keys(config, {"hidden_act": "silu", "attention_bias": False})
    layers = positive_key(config, "num_hidden_layers")
    first_dense = config.get("first_k_dense_replace", _FIRST_DENSE_DEFAULT[model_type])
    if first_dense is None or first_dense < layers:
        raise ValueError(f"first_k_dense_replace={first_dense!r} makes layers {first_dense or 0}..{layers - 1} "
                         f"mixture-of-experts; rule: must be >= num_hidden_layers={layers}: cptoolkit runs dense "
                         "MLP layers only (no MoE)")
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
                    head_dim=mla.qk_rope_head_dim, rope_scaling=rope_scaling, mla=mla)


def _owns(shape: GPTShape) -> bool:
    return shape.mla is not None


def _write(shape: GPTShape) -> dict:
    """A DeepSeek-V3 ``config.json`` with every layer dense."""
    m = shape.mla
    return {"model_type": "deepseek_v3", "architectures": list(DEEPSEEK.architectures["deepseek_v3"]),
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
    """Every tensor a dense DeepSeek-V2/V3 checkpoint of ``shape`` holds, with its shape (names play no part)."""
    shapes = {name: size for name, size in llama_tensor_shapes(shape).items() if ".self_attn." not in name}
    for layer in range(shape.num_layers):
        shapes.update({f"model.layers.{layer}.self_attn.{name}.weight": size
                       for name, size in _mla_attention_shapes(shape).items()})
    return shapes


def _layout(shape: GPTShape, names: Collection[str]) -> Layout:
    """The full state dict as a DeepSeek checkpoint's tensors: Llama's embedding, norms and MLP, every
    attention tensor whole under its ``MLASelfAttention`` name (names play no part)."""
    shapes = _tensor_shapes(shape, names)
    layout = {name: pieces for name, pieces in llama_layout(shape).items() if ".self_attention." not in name}
    for layer in range(shape.num_layers):
        for name in _mla_attention_shapes(shape):
            hf = f"model.layers.{layer}.self_attn.{name}.weight"
            layout[f"decoder.layers.{layer}.self_attention.{_MLA_NAMES[name]}.weight"] = whole(shapes, hf)
    return layout


DEEPSEEK = Family(name="deepseek", architectures={"deepseek_v2": ("DeepseekV2ForCausalLM",),
                                                  "deepseek_v3": ("DeepseekV3ForCausalLM",)},
                  read_hf_config=_read, owns=_owns, write_hf_config=_write,
                  tensor_shapes=_tensor_shapes, layout=_layout)
