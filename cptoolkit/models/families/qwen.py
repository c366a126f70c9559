"""Qwen2 (``Qwen2ForCausalLM``: q/k/v biases) and Qwen3 (``Qwen3ForCausalLM``: per-head q/k RMSNorm, an explicit
``head_dim``) on the Llama block; both window only with ``use_sliding_window``, on the layers ``layer_types``
(or, when absent, ``max_window_layers`` onwards) marks."""
from __future__ import annotations

from typing import Callable, Optional

from cptoolkit.models.families import Family
from cptoolkit.models.families.llama import (llama_block_hf_config, llama_block_layout, llama_block_tensor_shapes,
                                             read_llama_block)
from cptoolkit.models.shape import GPTShape, hf_layer_types, layer_types_flags, positive_key, window_from_hf

# Qwen2's q/k/v biases come with its model_type; an attention_bias would add o_proj's too.
_FIXED_KEYS = {"qwen2": {"hidden_act": "silu"}, "qwen3": {"hidden_act": "silu", "attention_bias": False}}


def qwen_window(config: dict, default_flags: Callable[[int, int], bool]
                ) -> tuple[Optional[int], Optional[tuple[bool, ...]]]:
    """``(sliding_window, sliding_layers)`` as transformers' Qwen2/Qwen3 (and Qwen2-MoE) read them: a window only
    with ``use_sliding_window``, on the layers ``layer_types`` marks, else layer ``i`` when
    ``default_flags(i, max_window_layers)``."""
    if not config.get("use_sliding_window"):
        return None, None
    layers = positive_key(config, "num_hidden_layers")
    flags = layer_types_flags(config, layers)
    if flags is None:
        max_window_layers = config.get("max_window_layers", 28)
        if not isinstance(max_window_layers, int) or isinstance(max_window_layers, bool) or max_window_layers < 0:
            raise ValueError(f"max_window_layers={max_window_layers!r}; rule: a non-negative integer")
        flags = tuple(default_flags(i, max_window_layers) for i in range(layers))
    return window_from_hf(config, flags)


def _window(config: dict) -> tuple[Optional[int], Optional[tuple[bool, ...]]]:
    """Qwen2/Qwen3 window the layers from ``max_window_layers`` on."""
    return qwen_window(config, lambda i, max_window_layers: i >= max_window_layers)


def _read(config: dict, model_type: str) -> GPTShape:
    return read_llama_block(config, _FIXED_KEYS[model_type], _window,
                            qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3")


def _owns(shape: GPTShape) -> bool:
    return (shape.gemma is None and shape.moe is None and not shape.attention_sinks
            and (shape.qkv_bias or shape.qk_norm))


def _write(shape: GPTShape) -> dict:
    """A Qwen3 ``config.json`` with q/k norms, else a Qwen2 one (q/k/v biases)."""
    model_type = "qwen3" if shape.qk_norm else "qwen2"
    keys = llama_block_hf_config(shape, model_type, QWEN.architectures[model_type])
    if shape.sliding_window is None:
        return keys
    return {**keys, "sliding_window": shape.sliding_window, "layer_types": hf_layer_types(shape),
            "use_sliding_window": True}


QWEN = Family(name="qwen", architectures={"qwen2": ("Qwen2ForCausalLM",), "qwen3": ("Qwen3ForCausalLM",)},
              read_hf_config=_read, owns=_owns, write_hf_config=_write,
              tensor_shapes=llama_block_tensor_shapes, layout=llama_block_layout)
