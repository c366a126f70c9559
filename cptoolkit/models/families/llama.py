"""Llama (``LlamaForCausalLM``) and Mistral (``MistralForCausalLM``): the Llama block (RMSNorm, SwiGLU, RoPE
``default`` / ``linear`` / ``llama3`` / ``yarn``, GQA, no biases); Mistral windows every layer with
``sliding_window``. ``read_llama_block`` and ``llama_block_hf_config`` are the keys every family built on the
Llama block shares (Qwen, Mixtral and Qwen-MoE read and write through them)."""
from __future__ import annotations

from typing import Callable, Collection, Optional

from cptoolkit.models.families import Family
from cptoolkit.models.shape import GPTShape, positive_key, read_rope, require_keys, window_from_hf
from cptoolkit.models.tensor_map import Layout, Rows, Shapes, fused_qkv, whole

# The keys a family's transformers model reads whose other values cptoolkit would compute differently.
# attention_bias puts biases on o_proj as well as q/k/v.
_FIXED_KEYS = {"llama": {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
               "mistral": {"hidden_act": "silu"}}


def read_llama_block(config: dict, fixed: dict,
                     read_window: Callable[[dict], tuple[Optional[int], Optional[tuple[bool, ...]]]],
                     qkv_bias: bool = False, qk_norm: bool = False) -> GPTShape:
    """The Llama block of ``config``: the ``fixed`` keys must hold their supported values (checked first, so a
    refused key is named before a missing one), ``read_window(config)`` gives ``(sliding_window,
    sliding_layers)``, and q/k/v biases or per-head q/k RMSNorm are as the family says."""
    require_keys(config, fixed)
    window = read_window(config)
    theta, rope_scaling = read_rope(config)
    return GPTShape(arch="llama", num_layers=positive_key(config, "num_hidden_layers"),
                    hidden_size=positive_key(config, "hidden_size"),
                    num_attention_heads=positive_key(config, "num_attention_heads"),
                    num_kv_heads=positive_key(config, "num_key_value_heads",
                                              default=positive_key(config, "num_attention_heads")),
                    ffn_hidden_size=positive_key(config, "intermediate_size"),
                    vocab_size=positive_key(config, "vocab_size"),
                    max_seq_len=positive_key(config, "max_position_embeddings"),
                    rope_theta=theta, norm_eps=positive_key(config, "rms_norm_eps", float),
                    tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                    head_dim=None if config.get("head_dim") is None else positive_key(config, "head_dim"),
                    qkv_bias=qkv_bias, qk_norm=qk_norm, rope_scaling=rope_scaling,
                    sliding_window=window[0], sliding_layers=window[1])


def llama_block_hf_config(shape: GPTShape, model_type: str, architectures: tuple[str, ...]) -> dict:
    """The keys of a Llama-block ``config.json`` (no window keys: each family writes its own)."""
    return {"model_type": model_type, "architectures": list(architectures),
            "num_hidden_layers": shape.num_layers, "hidden_size": shape.hidden_size,
            "num_attention_heads": shape.num_attention_heads,
            "num_key_value_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
            "intermediate_size": shape.ffn_hidden_size, "vocab_size": shape.vocab_size,
            "max_position_embeddings": shape.max_seq_len, "hidden_act": "silu",
            "rope_parameters": {"rope_theta": shape.rope_theta, **shape.rope_scaling.to_hf()},
            "rms_norm_eps": shape.norm_eps, "tie_word_embeddings": shape.tie_embeddings}


def _read(config: dict, model_type: str) -> GPTShape:
    """Llama never windows (its attention has none); Mistral windows every layer when ``sliding_window`` is set,
    whatever ``layer_types`` says, as transformers' Mistral does."""
    return read_llama_block(config, _FIXED_KEYS[model_type],
                            _no_window if model_type == "llama" else every_layer_window)


def _no_window(config: dict) -> tuple[None, None]:
    return None, None


def every_layer_window(config: dict) -> tuple[Optional[int], Optional[tuple[bool, ...]]]:
    """Mistral's window (Mixtral's, Qwen3-MoE's with ``use_sliding_window``): ``sliding_window`` on every layer."""
    return window_from_hf(config, (True,) * positive_key(config, "num_hidden_layers"))


def _owns(shape: GPTShape) -> bool:
    return (shape.arch == "llama" and shape.mla is None and shape.gemma is None and shape.moe is None
            and not shape.qkv_bias and not shape.qk_norm and not shape.attention_sinks)


def _write(shape: GPTShape) -> dict:
    """A Llama ``config.json``, or a Mistral one when every layer is windowed."""
    if shape.sliding_window is None:
        return llama_block_hf_config(shape, "llama", LLAMA.architectures["llama"])
    if shape.sliding_layers is not None:
        raise ValueError("GPTShape with sliding_layers but neither qkv_bias nor qk_norm has no Hugging Face "
                         "family (Mistral windows every layer; Qwen2/Qwen3 bring biases or q/k norms)")
    return {**llama_block_hf_config(shape, "mistral", LLAMA.architectures["mistral"]),
            "sliding_window": shape.sliding_window}

def llama_tensor_shapes(shape: GPTShape) -> Shapes:
    """Every tensor a Llama-block checkpoint of ``shape`` holds, with its shape: q/k/v/o, gate/up/down, the
    RMSNorms, and with ``qkv_bias`` / ``qk_norm`` the q/k/v biases (Qwen2) or q/k norms (Qwen3, Gemma 3)."""
    hidden, ffn, vocab = shape.hidden_size, shape.ffn_hidden_size, shape.vocab_size
    q_rows, kv_rows = shape.num_attention_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not shape.tie_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for layer in range(shape.num_layers):
        hf = f"model.layers.{layer}."
        shapes.update({
            hf + "input_layernorm.weight": (hidden,),
            hf + "self_attn.q_proj.weight": (q_rows, hidden),
            hf + "self_attn.k_proj.weight": (kv_rows, hidden),
            hf + "self_attn.v_proj.weight": (kv_rows, hidden),
            hf + "self_attn.o_proj.weight": (hidden, q_rows),
            hf + "post_attention_layernorm.weight": (hidden,),
            hf + "mlp.gate_proj.weight": (ffn, hidden),
            hf + "mlp.up_proj.weight": (ffn, hidden),
            hf + "mlp.down_proj.weight": (hidden, ffn),
        })
        if shape.qkv_bias:
            shapes.update({hf + "self_attn.q_proj.bias": (q_rows,), hf + "self_attn.k_proj.bias": (kv_rows,),
                           hf + "self_attn.v_proj.bias": (kv_rows,)})
        if shape.qk_norm:
            shapes.update({hf + "self_attn.q_norm.weight": (shape.head_dim,),
                           hf + "self_attn.k_norm.weight": (shape.head_dim,)})
    return shapes


def _qkv(shape: GPTShape, layer_prefix: str, suffix: str) -> tuple[Rows, ...]:
    """The fused QKV ``weight`` or ``bias`` of one layer over its ``q_proj``, ``k_proj`` and ``v_proj``."""
    return fused_qkv(shape, *((f"{layer_prefix}self_attn.{name}_proj.{suffix}", 0) for name in "qkv"))


def llama_layout(shape: GPTShape) -> Layout:
    """The full state dict as rows of a Llama-block checkpoint's tensors: fused QKV per KV group (its biases
    alike), fc1 = [gate; up], q/k norms as megatron's ``q_layernorm``/``k_layernorm``."""
    shapes = llama_tensor_shapes(shape)
    layout = {"embedding.word_embeddings.weight": whole(shapes, "model.embed_tokens.weight"),
              "decoder.final_layernorm.weight": whole(shapes, "model.norm.weight")}
    if not shape.tie_embeddings:
        layout["output_layer.weight"] = whole(shapes, "lm_head.weight")
    for layer in range(shape.num_layers):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        if shape.qkv_bias:
            layout[mc + "self_attention.linear_qkv.bias"] = _qkv(shape, hf, "bias")
        if shape.qk_norm:
            layout[mc + "self_attention.q_layernorm.weight"] = whole(shapes, hf + "self_attn.q_norm.weight")
            layout[mc + "self_attention.k_layernorm.weight"] = whole(shapes, hf + "self_attn.k_norm.weight")
        layout.update({
            mc + "input_layernorm.weight": whole(shapes, hf + "input_layernorm.weight"),
            mc + "self_attention.linear_qkv.weight": _qkv(shape, hf, "weight"),
            mc + "self_attention.linear_proj.weight": whole(shapes, hf + "self_attn.o_proj.weight"),
            mc + "pre_mlp_layernorm.weight": whole(shapes, hf + "post_attention_layernorm.weight"),
            mc + "mlp.linear_fc1.weight": (whole(shapes, hf + "mlp.gate_proj.weight")
                                           + whole(shapes, hf + "mlp.up_proj.weight")),
            mc + "mlp.linear_fc2.weight": whole(shapes, hf + "mlp.down_proj.weight"),
        })
    return layout


def llama_block_tensor_shapes(shape: GPTShape, names: Collection[str]) -> Shapes:
    """``Family.tensor_shapes`` of a family whose checkpoint is the plain Llama block's (names play no part)."""
    return llama_tensor_shapes(shape)


def llama_block_layout(shape: GPTShape, names: Collection[str]) -> Layout:
    """``Family.layout`` of a family whose checkpoint is the plain Llama block's (names play no part)."""
    return llama_layout(shape)


LLAMA = Family(name="llama", architectures={"llama": ("LlamaForCausalLM",), "mistral": ("MistralForCausalLM",)},
               read_hf_config=_read, owns=_owns, write_hf_config=_write,
               tensor_shapes=llama_block_tensor_shapes, layout=llama_block_layout)
