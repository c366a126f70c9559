"""GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``): ``arch="gpt2"``: LayerNorm with biases, tanh-GELU MLP, learned
absolute positions, one KV head per query head."""
from __future__ import annotations

from typing import Collection
from cptoolkit.models.families import Family
from cptoolkit.models.shape import GPTShape, positive_key
from cptoolkit.models.tensor_map import Layout, Shapes, fused_qkv, whole


def _read(config: dict, model_type: str) -> GPTShape:
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function={config['activation_function']!r}; "
                         "rule: must be the tanh GELU ('gelu_new')")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("reorder_and_upcast_attn"):
        raise ValueError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn must be false")
    hidden, heads = positive_key(config, "n_embd"), positive_key(config, "n_head")
    return GPTShape(arch="gpt2", num_layers=positive_key(config, "n_layer"), hidden_size=hidden,
                    num_attention_heads=heads, num_kv_heads=heads,
                    ffn_hidden_size=positive_key(config, "n_inner", default=4 * hidden),
                    vocab_size=positive_key(config, "vocab_size"), max_seq_len=positive_key(config, "n_positions"),
                    norm_eps=positive_key(config, "layer_norm_epsilon", float),
                    tie_embeddings=bool(config.get("tie_word_embeddings", True)))


def _owns(shape: GPTShape) -> bool:
    return shape.arch == "gpt2"


def _write(shape: GPTShape) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "n_layer": shape.num_layers, "n_embd": shape.hidden_size,
            "n_head": shape.num_attention_heads, "n_inner": shape.ffn_hidden_size,
            "vocab_size": shape.vocab_size, "n_positions": shape.max_seq_len,
            "layer_norm_epsilon": shape.norm_eps, "activation_function": "gelu_new",
            "tie_word_embeddings": shape.tie_embeddings}

def _prefix(names: Collection[str]) -> str:
    """``GPT2LMHeadModel`` saves ``transformer.h.0...``; a bare ``GPT2Model`` saves ``h.0...``."""
    return "transformer." if any(name.startswith("transformer.") for name in names) else ""


def _tensor_shapes(shape: GPTShape, names: Collection[str]) -> Shapes:
    """Every tensor a GPT-2 checkpoint of ``shape`` holds, with its shape (Conv1D: ``[in, out]``); ``names``
    tell the prefix."""
    prefix = _prefix(names)
    hidden, ffn, vocab = shape.hidden_size, shape.ffn_hidden_size, shape.vocab_size
    shapes = {prefix + "wte.weight": (vocab, hidden), prefix + "wpe.weight": (shape.max_seq_len, hidden),
              prefix + "ln_f.weight": (hidden,), prefix + "ln_f.bias": (hidden,)}
    if not shape.tie_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for layer in range(shape.num_layers):
        hf = f"{prefix}h.{layer}."
        shapes.update({
            hf + "ln_1.weight": (hidden,), hf + "ln_1.bias": (hidden,),
            hf + "attn.c_attn.weight": (hidden, 3 * hidden), hf + "attn.c_attn.bias": (3 * hidden,),
            hf + "attn.c_proj.weight": (hidden, hidden), hf + "attn.c_proj.bias": (hidden,),
            hf + "ln_2.weight": (hidden,), hf + "ln_2.bias": (hidden,),
            hf + "mlp.c_fc.weight": (hidden, ffn), hf + "mlp.c_fc.bias": (ffn,),
            hf + "mlp.c_proj.weight": (ffn, hidden), hf + "mlp.c_proj.bias": (hidden,),
        })
    return shapes


def _layout(shape: GPTShape, names: Collection[str]) -> Layout:
    """The full state dict as rows of a GPT-2 checkpoint's tensors (``names`` tell the prefix: ``transformer.``
    or none). Conv1D weights are stored ``[in, out]`` (so read transposed); ``c_attn`` holds ``[q | k | v]`` over
    all heads."""
    prefix = _prefix(names)
    shapes, hidden = _tensor_shapes(shape, names), shape.hidden_size
    layout = {"embedding.word_embeddings.weight": whole(shapes, prefix + "wte.weight"),
              "embedding.position_embeddings.weight": whole(shapes, prefix + "wpe.weight"),
              "decoder.final_layernorm.weight": whole(shapes, prefix + "ln_f.weight"),
              "decoder.final_layernorm.bias": whole(shapes, prefix + "ln_f.bias")}
    if not shape.tie_embeddings:
        layout["output_layer.weight"] = whole(shapes, "lm_head.weight")
    for layer in range(shape.num_layers):
        hf, mc = f"{prefix}h.{layer}.", f"decoder.layers.{layer}."
        c_attn_weight, c_attn_bias = hf + "attn.c_attn.weight", hf + "attn.c_attn.bias"
        layout.update({
            mc + "input_layernorm.weight": whole(shapes, hf + "ln_1.weight"),
            mc + "input_layernorm.bias": whole(shapes, hf + "ln_1.bias"),
            mc + "self_attention.linear_qkv.weight": fused_qkv(
                shape, (c_attn_weight, 0), (c_attn_weight, hidden), (c_attn_weight, 2 * hidden), transposed=True),
            mc + "self_attention.linear_qkv.bias": fused_qkv(
                shape, (c_attn_bias, 0), (c_attn_bias, hidden), (c_attn_bias, 2 * hidden)),
            mc + "self_attention.linear_proj.weight": whole(shapes, hf + "attn.c_proj.weight", transposed=True),
            mc + "self_attention.linear_proj.bias": whole(shapes, hf + "attn.c_proj.bias"),
            mc + "pre_mlp_layernorm.weight": whole(shapes, hf + "ln_2.weight"),
            mc + "pre_mlp_layernorm.bias": whole(shapes, hf + "ln_2.bias"),
            mc + "mlp.linear_fc1.weight": whole(shapes, hf + "mlp.c_fc.weight", transposed=True),
            mc + "mlp.linear_fc1.bias": whole(shapes, hf + "mlp.c_fc.bias"),
            mc + "mlp.linear_fc2.weight": whole(shapes, hf + "mlp.c_proj.weight", transposed=True),
            mc + "mlp.linear_fc2.bias": whole(shapes, hf + "mlp.c_proj.bias"),
        })
    return layout


GPT2 = Family(name="gpt2", architectures={"gpt2": ("GPT2LMHeadModel", "GPT2Model")},
              read_hf_config=_read, owns=_owns, write_hf_config=_write,
              tensor_shapes=_tensor_shapes, layout=_layout)
