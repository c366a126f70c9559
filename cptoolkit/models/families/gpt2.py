"""GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``): ``arch="gpt2"``: LayerNorm with biases, tanh-GELU MLP, learned
absolute positions, one KV head per query head."""
from __future__ import annotations

from cptoolkit.models.families import Family
from cptoolkit.models.shape import GPTShape, positive_key


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


def _writes(shape: GPTShape) -> bool:
    return shape.arch == "gpt2"


def _write(shape: GPTShape) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "n_layer": shape.num_layers, "n_embd": shape.hidden_size,
            "n_head": shape.num_attention_heads, "n_inner": shape.ffn_hidden_size,
            "vocab_size": shape.vocab_size, "n_positions": shape.max_seq_len,
            "layer_norm_epsilon": shape.norm_eps, "activation_function": "gelu_new",
            "tie_word_embeddings": shape.tie_embeddings}


GPT2 = Family(name="gpt2", architectures={"gpt2": ("GPT2LMHeadModel", "GPT2Model")},
              read_hf_config=_read, writes=_writes, write_hf_config=_write)
