"""The model's architecture, ``GPTShape``, read from and written as a Hugging Face ``config.json``.

Pure Python: no torch, no megatron, so ``cptoolkit.config`` reads a checkpoint's shape while it
validates a YAML file without loading either.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from cptoolkit.config import ConfigError

ARCHS = ("llama", "gpt2")
HF_ARCHITECTURES = {"llama": ("LlamaForCausalLM",), "gpt2": ("GPT2LMHeadModel", "GPT2Model")}
CONFIG_FILE = "config.json"
RESAVE = "save the checkpoint again (save_pretrained or cptoolkit's save_checkpoint)"
_SUPPORTED_HF = "'llama' or 'gpt2' (architectures LlamaForCausalLM, GPT2LMHeadModel, GPT2Model)"


@dataclass(frozen=True)
class GPTShape:
    """Architecture of a decoder-only transformer.

    ``arch="llama"``: RMSNorm, SwiGLU MLP, RoPE, no biases, GQA allowed.
    ``arch="gpt2"``: LayerNorm, GELU (tanh) MLP, learned absolute positions, biases, MHA.
    ``max_seq_len`` bounds position ids (and sizes GPT-2's position table).
    """

    arch: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"GPTShape.arch={self.arch!r} is not supported; rule: one of {ARCHS}")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads",
                     "ffn_hidden_size", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTShape.{name}={value!r}; rule: must be a positive integer")
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GPTShape.{name}={getattr(self, name)!r}; rule: must be > 0")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"GPTShape.hidden_size={self.hidden_size} must be a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"GPTShape.num_attention_heads={self.num_attention_heads} must be a "
                             f"multiple of num_kv_heads={self.num_kv_heads}")
        if self.arch == "gpt2" and self.num_kv_heads != self.num_attention_heads:
            raise ValueError(f"GPTShape.num_kv_heads={self.num_kv_heads}; rule: gpt2 has one KV head "
                             f"per query head (num_attention_heads={self.num_attention_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, config: dict) -> "GPTShape":
        """Read a Hugging Face ``config.json`` dict of a ``LlamaForCausalLM`` or ``GPT2LMHeadModel``.
        Errors name the key and the rule but not the file: the caller knows which file it read."""
        if "model_type" not in config:
            raise ValueError(f"missing required key 'model_type'; rule: {_SUPPORTED_HF}")
        model_type = config["model_type"]
        if model_type not in ARCHS:
            raise ValueError(f"model_type={model_type!r} is not supported; rule: {_SUPPORTED_HF}")
        unsupported = [a for a in config.get("architectures") or [] if a not in HF_ARCHITECTURES[model_type]]
        if unsupported:
            raise ValueError(f"architectures={unsupported!r} is not supported for model_type {model_type!r}; "
                             f"rule: {' or '.join(HF_ARCHITECTURES[model_type])}")
        return _llama_shape(config) if model_type == "llama" else _gpt2_shape(config)

    def to_hf_config(self) -> dict:
        """A Hugging Face ``config.json`` dict that ``from_hf_config`` reads back as this shape."""
        if self.arch == "gpt2":
            return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                    "n_layer": self.num_layers, "n_embd": self.hidden_size,
                    "n_head": self.num_attention_heads, "n_inner": self.ffn_hidden_size,
                    "vocab_size": self.vocab_size, "n_positions": self.max_seq_len,
                    "layer_norm_epsilon": self.norm_eps, "activation_function": "gelu_new",
                    "tie_word_embeddings": self.tie_embeddings}
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.ffn_hidden_size, "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_seq_len, "hidden_act": "silu",
                "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
                "rms_norm_eps": self.norm_eps, "tie_word_embeddings": self.tie_embeddings}


def _positive(config: dict, key: str, number: type = int, default=None):
    """``config[key]``, a positive int (or, with ``number=float``, any positive number). A missing or
    null key gives ``default``, or is an error when there is none."""
    value = config.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"missing required key {key!r}; add it with the value from the model's "
                             "original config.json")
        return default
    allowed = (int, float) if number is float else int
    if not isinstance(value, allowed) or isinstance(value, bool) or not value > 0:
        kind = "number" if number is float else "integer"
        raise ValueError(f"{key}={value!r}; rule: must be a positive {kind}")
    return number(value)


def _llama_shape(config: dict) -> GPTShape:
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise ValueError(f"rope parameters {rope}: only unscaled RoPE (rope_type 'default') is supported")
    for key, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, supported) != supported:
            raise ValueError(f"{key}={config[key]!r}; rule: must be {supported!r}")
    hidden, heads = _positive(config, "hidden_size"), _positive(config, "num_attention_heads")
    head_dim = _positive(config, "head_dim", default=hidden // heads)
    if head_dim * heads != hidden:
        raise ValueError(f"head_dim={head_dim}; rule: must equal hidden_size / num_attention_heads = "
                         f"{hidden / heads}")
    return GPTShape(arch="llama", num_layers=_positive(config, "num_hidden_layers"), hidden_size=hidden,
                    num_attention_heads=heads,
                    num_kv_heads=_positive(config, "num_key_value_heads", default=heads),
                    ffn_hidden_size=_positive(config, "intermediate_size"),
                    vocab_size=_positive(config, "vocab_size"),
                    max_seq_len=_positive(config, "max_position_embeddings"),
                    rope_theta=_positive(rope, "rope_theta", float, default=10000.0),
                    norm_eps=_positive(config, "rms_norm_eps", float),
                    tie_embeddings=bool(config.get("tie_word_embeddings", False)))


def _gpt2_shape(config: dict) -> GPTShape:
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function={config['activation_function']!r}; "
                         "rule: must be the tanh GELU ('gelu_new')")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("reorder_and_upcast_attn"):
        raise ValueError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn must be false")
    hidden, heads = _positive(config, "n_embd"), _positive(config, "n_head")
    return GPTShape(arch="gpt2", num_layers=_positive(config, "n_layer"), hidden_size=hidden,
                    num_attention_heads=heads, num_kv_heads=heads,
                    ffn_hidden_size=_positive(config, "n_inner", default=4 * hidden),
                    vocab_size=_positive(config, "vocab_size"), max_seq_len=_positive(config, "n_positions"),
                    norm_eps=_positive(config, "layer_norm_epsilon", float),
                    tie_embeddings=bool(config.get("tie_word_embeddings", True)))


# ----------------------------------------------------------------------------- at a TP size

def check_tp(shape: GPTShape, tp_size: int) -> None:
    """Raise ``ValueError`` unless the heads, KV heads and MLP of ``shape`` split over ``tp_size`` ranks."""
    kv = shape.num_kv_heads
    rules = (
        (shape.num_attention_heads % tp_size == 0,
         f"num_attention_heads={shape.num_attention_heads} must be a multiple of TP={tp_size}"),
        (kv % tp_size == 0 or tp_size % kv == 0,
         f"num_kv_heads={kv} must be a multiple or a divisor of TP={tp_size}"),
        (shape.ffn_hidden_size % tp_size == 0,
         f"ffn_hidden_size={shape.ffn_hidden_size} must be a multiple of TP={tp_size}"),
    )
    for ok, message in rules:
        if not ok:
            raise ValueError(f"GPTShape does not fit the TP size: {message}")


def padded_vocab_size(shape: GPTShape, tp_size: int) -> int:
    """Vocabulary rounded up to a multiple of TP (megatron splits the embedding evenly)."""
    return math.ceil(shape.vocab_size / tp_size) * tp_size


# ----------------------------------------------------------------------------- a checkpoint's config.json

def read_json_object(path: Path) -> dict:
    """A JSON file of a checkpoint that must hold an object; malformed JSON names the line and column."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: malformed JSON: line {err.lineno}, column {err.colno}: {err.msg}; "
                          f"fix the file or {RESAVE}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text, so not JSON (the file is corrupt); {RESAVE}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: must hold a JSON object, got a {type(value).__name__}; {RESAVE}")
    return value


def read_config(checkpoint_dir: str | Path) -> dict:
    """The checkpoint's ``config.json`` as a dict."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a checkpoint directory holds the model's {CONFIG_FILE} "
                          f"next to its weights; {RESAVE}")
    return read_json_object(path)


def hf_shape(config: dict, checkpoint_dir: str | Path) -> GPTShape:
    """``GPTShape.from_hf_config(config)``; its errors name the checkpoint's ``config.json``."""
    try:
        return GPTShape.from_hf_config(config)
    except ValueError as err:
        raise ConfigError(f"{Path(checkpoint_dir) / CONFIG_FILE}: {err}") from None
