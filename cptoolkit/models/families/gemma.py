"""Gemma 2 (``Gemma2ForCausalLM``) and Gemma 3 text (``Gemma3ForCausalLM``): the Gemma block (``GemmaBlock``) on
``arch="llama"``: local (sliding-window) layers between global ones as ``layer_types`` says (else every other
layer; Gemma 3: five of every ``sliding_window_pattern``), Gemma 3's per-head q/k norms and local RoPE base."""
from __future__ import annotations

from typing import Collection, Optional

from cptoolkit.models.families import Family
from cptoolkit.models.families.llama import llama_layout, llama_tensor_shapes
from cptoolkit.models.shape import (GemmaBlock, GPTShape, RopeScaling, hf_layer_types, layer_types_flags, positive_key,
                                    read_rope)
from cptoolkit.models.tensor_map import Layout, Shapes, whole


# Gemma 2: sliding on every other layer (the first too); Gemma 3: five of every six, as transformers' configs say.
_GEMMA_PATTERN_DEFAULT = {"gemma2": 2, "gemma3_text": 6}
_GEMMA_LOCAL_THETA_DEFAULT = 10000.0


def _local_layers(config: dict, model_type: str, layers: int) -> tuple[bool, ...]:
    """Which layers are local (sliding): ``layer_types``, else the family's pattern (Gemma 3's
    ``sliding_window_pattern``): every layer but each ``pattern``-th."""
    flags = layer_types_flags(config, layers)
    if flags is not None:
        return flags
    pattern = positive_key(config, "sliding_window_pattern", default=_GEMMA_PATTERN_DEFAULT[model_type]) \
        if model_type == "gemma3_text" else _GEMMA_PATTERN_DEFAULT[model_type]
    return tuple(bool((i + 1) % pattern) for i in range(layers))


def _rope(config: dict, model_type: str) -> tuple[float, RopeScaling, Optional[float]]:
    """``(rope_theta, rope_scaling, local_rope_theta)``. Gemma 2: one RoPE. Gemma 3: per layer type, either
    transformers 5's ``rope_parameters: {full_attention: {...}, sliding_attention: {...}}`` or the older
    ``rope_theta`` (default 1e6) + ``rope_scaling`` for the global layers and ``rope_local_base_freq`` (default
    1e4) for the local ones, which must be unscaled."""
    if model_type == "gemma2":
        theta, scaling = read_rope(config)
        return theta, scaling, None
    per_type = config.get("rope_parameters")
    if isinstance(per_type, dict) and ("full_attention" in per_type or "sliding_attention" in per_type):
        local = per_type.get("sliding_attention") or {}
        if not isinstance(local, dict):
            raise ValueError(f"rope_parameters.sliding_attention={local!r}; rule: an object of RoPE parameters")
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters.sliding_attention.rope_type={local['rope_type']!r}; rule: 'default' "
                             "(cptoolkit scales only the global layers' RoPE)")
        local_theta = positive_key(local, "rope_theta", float, default=_GEMMA_LOCAL_THETA_DEFAULT)
        global_config = {**config, "rope_scaling": None,
                         "rope_parameters": {"rope_theta": 1_000_000.0, **(per_type.get("full_attention") or {})}}
    else:
        local_theta = positive_key(config, "rope_local_base_freq", float, default=_GEMMA_LOCAL_THETA_DEFAULT)
        global_config = {**config, "rope_theta": config.get("rope_theta", 1_000_000.0)}
    theta, scaling = read_rope(global_config)
    if scaling.rope_type not in ("default", "linear"):
        raise ValueError(f"the global layers' rope_type={scaling.rope_type!r}; rule: 'default' or 'linear' for "
                         f"{model_type} (its local layers' RoPE is never scaled, and the softmax scale is shared)")
    return theta, scaling, local_theta


def _softcap(config: dict, key: str, default: Optional[float]) -> Optional[float]:
    """A softcap key: absent is the family's default, null is no cap, else a positive number."""
    if key not in config:
        return default
    return None if config[key] is None else positive_key(config, key, float)


def _read(config: dict, model_type: str) -> GPTShape:
    """Gemma 2 / Gemma 3 text: the Llama block with the Gemma differences (``GemmaBlock``); Gemma 3 adds per-head
    q/k norms (Gemma's ``1 + weight`` norms) and the local layers' own RoPE base. The window is kept even when it
    is no shorter than ``max_position_embeddings`` (it then never masks), since it also marks the local layers."""
    fixed = {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "use_bidirectional_attention": False}
    for key, supported in fixed.items():
        if (config.get(key) or supported) != supported:
            raise ValueError(f"{key}={config[key]!r}; rule: must be {supported!r}")
    if config.get("hidden_act") not in (None, "gelu_pytorch_tanh") and "hidden_activation" not in config:
        raise ValueError(f"hidden_act={config['hidden_act']!r}; rule: must be 'gelu_pytorch_tanh' (Gemma's GeGLU)")
    layers = positive_key(config, "num_hidden_layers")
    local_layers = _local_layers(config, model_type, layers)
    window = positive_key(config, "sliding_window") if any(local_layers) and config.get("sliding_window") is not None \
        else None
    theta, rope_scaling, local_theta = _rope(config, model_type)
    heads, head_dim = positive_key(config, "num_attention_heads"), positive_key(config, "head_dim", default=256)
    softcaps = {"gemma2": (50.0, 30.0), "gemma3_text": (None, None)}[model_type]
    gemma = GemmaBlock(query_pre_attn_scalar=positive_key(config, "query_pre_attn_scalar", float, default=256.0),
                       attn_logit_softcapping=_softcap(config, "attn_logit_softcapping", softcaps[0]),
                       final_logit_softcapping=_softcap(config, "final_logit_softcapping", softcaps[1]),
                       local_rope_theta=local_theta if window is not None else None)
    return GPTShape(arch="llama", num_layers=layers, hidden_size=positive_key(config, "hidden_size"),
                    num_attention_heads=heads,
                    num_kv_heads=positive_key(config, "num_key_value_heads", default=heads),
                    ffn_hidden_size=positive_key(config, "intermediate_size"),
                    vocab_size=positive_key(config, "vocab_size"),
                    max_seq_len=positive_key(config, "max_position_embeddings"),
                    rope_theta=theta, norm_eps=positive_key(config, "rms_norm_eps", float, default=1e-6),
                    tie_embeddings=bool(config.get("tie_word_embeddings", True)), head_dim=head_dim,
                    qk_norm=model_type == "gemma3_text", rope_scaling=rope_scaling,
                    sliding_window=window, sliding_layers=None if window is None or all(local_layers) else local_layers,
                    gemma=gemma)


def _owns(shape: GPTShape) -> bool:
    return shape.gemma is not None and shape.moe is None and not shape.attention_sinks


def _write(shape: GPTShape) -> dict:
    """A Gemma 3 text ``config.json`` with q/k norms, a Gemma 2 one without."""
    model_type, g = ("gemma3_text" if shape.qk_norm else "gemma2"), shape.gemma
    global_rope = {"rope_theta": shape.rope_theta, **shape.rope_scaling.to_hf()}
    rope = ({"full_attention": global_rope, "sliding_attention": {"rope_type": "default",
                                                                  "rope_theta": g.local_rope_theta}}
            if g.local_rope_theta is not None else global_rope)
    return {"model_type": model_type, "architectures": list(GEMMA.architectures[model_type]),
            "num_hidden_layers": shape.num_layers, "hidden_size": shape.hidden_size,
            "num_attention_heads": shape.num_attention_heads, "num_key_value_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim, "intermediate_size": shape.ffn_hidden_size, "vocab_size": shape.vocab_size,
            "max_position_embeddings": shape.max_seq_len, "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": rope, "rms_norm_eps": shape.norm_eps, "tie_word_embeddings": shape.tie_embeddings,
            "query_pre_attn_scalar": g.query_pre_attn_scalar,
            "attn_logit_softcapping": g.attn_logit_softcapping,
            "final_logit_softcapping": g.final_logit_softcapping,
            "sliding_window": shape.sliding_window, "layer_types": hf_layer_types(shape)}

def _tensor_shapes(shape: GPTShape, names: Collection[str]) -> Shapes:
    """The Llama block's tensors plus, per layer, the pre/post feed-forward norms."""
    shapes = llama_tensor_shapes(shape)
    for layer in range(shape.num_layers):
        hf = f"model.layers.{layer}."
        shapes.update({hf + "pre_feedforward_layernorm.weight": (shape.hidden_size,),
                       hf + "post_feedforward_layernorm.weight": (shape.hidden_size,)})
    return shapes


def _layout(shape: GPTShape, names: Collection[str]) -> Layout:
    """The Llama block's layout with the sandwich norms: Gemma's ``post_attention_layernorm`` follows the
    attention (megatron's ``linear_proj.post_norm``), ``pre_feedforward_layernorm`` is the pre-MLP norm and
    ``post_feedforward_layernorm`` follows the MLP."""
    shapes, layout = _tensor_shapes(shape, names), llama_layout(shape)
    for layer in range(shape.num_layers):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        layout.update({
            mc + "self_attention.linear_proj.post_norm.weight": whole(shapes, hf + "post_attention_layernorm.weight"),
            mc + "pre_mlp_layernorm.weight": whole(shapes, hf + "pre_feedforward_layernorm.weight"),
            mc + "mlp.linear_fc2.post_norm.weight": whole(shapes, hf + "post_feedforward_layernorm.weight"),
        })
    return layout


GEMMA = Family(name="gemma", architectures={"gemma2": ("Gemma2ForCausalLM",), "gemma3_text": ("Gemma3ForCausalLM",)},
               read_hf_config=_read, owns=_owns, write_hf_config=_write,
               tensor_shapes=_tensor_shapes, layout=_layout)
