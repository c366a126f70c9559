"""Phi-3 (``Phi3ForCausalLM``): the Llama block (RMSNorm, SwiGLU, RoPE, GQA, no biases; ``sliding_window`` on every
layer when set, as Mistral) with its projections stored fused: ``self_attn.qkv_proj`` (all query rows, then all key
rows, then all value rows) and ``mlp.gate_up_proj`` (gate rows, then up rows). Long-context Phi-3 variants'
``longrope`` and a ``partial_rotary_factor`` other than 1 are refused by the shared RoPE reader.

A Phi-3 model is a Llama-block ``GPTShape``, which the Llama family owns and writes (a re-saved checkpoint is a
Llama / Mistral one of the same model); this family reads Phi-3's ``config.json`` and its fused tensors
(``registry.checkpoint_family``)."""
from __future__ import annotations

from typing import Collection

from cptoolkit.models.families import Family
from cptoolkit.models.families.llama import every_layer_window, llama_layout, llama_tensor_shapes, read_llama_block
from cptoolkit.models.shape import GPTShape
from cptoolkit.models.tensor_map import Layout, Shapes, fused_qkv, whole

# The keys transformers' Phi-3 reads whose other values cptoolkit would compute differently (it has no biases).
_FIXED_KEYS = {"hidden_act": "silu", "attention_bias": False}
_SEPARATE = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "mlp.gate_proj.weight", "mlp.up_proj.weight")


def _read(config: dict, model_type: str) -> GPTShape:
    return read_llama_block(config, _FIXED_KEYS, every_layer_window)


def _owns(shape: GPTShape) -> bool:
    return False  # its shapes are the Llama block's, which the Llama family writes


def _write(shape: GPTShape) -> dict:
    raise ValueError("the Phi-3 family writes no config.json: its shapes are written as Llama / Mistral ones")


def _tensor_shapes(shape: GPTShape, names: Collection[str]) -> Shapes:
    """The Llama block's tensors with q/k/v fused into ``qkv_proj`` and gate/up into ``gate_up_proj``."""
    q_rows, kv_rows = shape.num_attention_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    shapes = {name: size for name, size in llama_tensor_shapes(shape).items() if not name.endswith(_SEPARATE)}
    for layer in range(shape.num_layers):
        hf = f"model.layers.{layer}."
        shapes[hf + "self_attn.qkv_proj.weight"] = (q_rows + 2 * kv_rows, shape.hidden_size)
        shapes[hf + "mlp.gate_up_proj.weight"] = (2 * shape.ffn_hidden_size, shape.hidden_size)
    return shapes


def _layout(shape: GPTShape, names: Collection[str]) -> Layout:
    """Llama's layout over the fused tensors: megatron's fused QKV regrouped from ``qkv_proj``'s q, k and v row
    blocks, ``linear_fc1`` = ``gate_up_proj`` whole (already ``[gate; up]``)."""
    shapes = _tensor_shapes(shape, names)
    q_rows, kv_rows = shape.num_attention_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    layout = llama_layout(shape)
    for layer in range(shape.num_layers):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        qkv = hf + "self_attn.qkv_proj.weight"
        layout[mc + "self_attention.linear_qkv.weight"] = fused_qkv(shape, (qkv, 0), (qkv, q_rows),
                                                                    (qkv, q_rows + kv_rows))
        layout[mc + "mlp.linear_fc1.weight"] = whole(shapes, hf + "mlp.gate_up_proj.weight")
    return layout


PHI3 = Family(name="phi3", architectures={"phi3": ("Phi3ForCausalLM",)}, read_hf_config=_read, owns=_owns,
              write_hf_config=_write, tensor_shapes=_tensor_shapes, layout=_layout)
