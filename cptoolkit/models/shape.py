"""The model's architecture, ``GPTShape``, and what every family's Hugging Face ``config.json`` shares.

Pure Python: no torch, no megatron, so ``cptoolkit.config`` reads a checkpoint's shape while it
validates a YAML file without loading either. The RoPE frequencies of a ``RopeScaling`` are computed
by ``cptoolkit.models.rope``.

Here: the schema (``GPTShape`` with its extras ``MLADims``, defined beside its layer in ``layers.mla_dims``, and
``GemmaBlock``, ``RopeScaling``), the config.json keys several families read alike (``positive_key``, ``read_rope``
with YaRN, ``layer_types_flags``, ``window_from_hf``, ``hf_layer_types``), the TP fit and the checkpoint's JSON
files. Each family's own keys are
read and written by its module in ``cptoolkit.models.families``; ``families.registry`` picks it by
``model_type``.
Sliding windows: ``GPTShape.sliding_window`` (a query sees itself and the ``window - 1`` tokens before
it, transformers' ``sliding_window``) on the layers ``GPTShape.sliding_layers`` marks.
Anything a family can express that cptoolkit would compute differently (dynamic NTK RoPE, an
output-projection bias, ...) is refused with the key, its value and the rule.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cptoolkit.errors import ConfigError
from cptoolkit.layers.mla_dims import MLADims
from cptoolkit.models.moe_dims import MoEDims

ARCHS = ("llama", "gpt2")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
AUTO_DTYPES = ("float32", "bfloat16", "float64")  # the weights' dtypes ``runtime.dtype: auto`` runs in
CONFIG_FILE = "config.json"
RESAVE = "save the checkpoint again (save_pretrained or cptoolkit's save_checkpoint)"
_DYNAMIC_REFUSED = ("dynamic NTK scaling recomputes the frequencies from the longest position of each forward "
                    "pass, so keys already in the KV cache would have been rotated with other frequencies than "
                    "the queries that read them (transformers' own output depends on how it is batched)")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE's inverse frequencies are scaled: Hugging Face's ``rope_parameters`` without ``rope_theta``.

    ``rope_type``: ``default`` (unscaled), ``linear`` (every frequency / ``factor``), ``llama3`` (low
    frequencies / ``factor``, high ones kept, a smooth ramp between, set by ``low_freq_factor``,
    ``high_freq_factor`` and ``original_max_position_embeddings``) or ``yarn`` (a ramp between
    interpolated and original frequencies over the dimensions set by ``beta_fast``, ``beta_slow`` and
    ``original_max_position_embeddings``; ``truncate`` rounds its ends). ``attention_factor`` multiplies
    RoPE's cos and sin (so the attention scores by its square): YaRN's ``mscale``, 1 otherwise. Every
    variant is a fixed function of the position, so it holds at any position, including beyond
    ``original_max_position_embeddings``.
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: Optional[int] = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"RopeScaling.rope_type={self.rope_type!r} is not supported; rule: one of {ROPE_TYPES}")
        if self.rope_type in ("llama3", "yarn") and self.original_max_position_embeddings is None:
            raise ValueError(f"RopeScaling.original_max_position_embeddings=None; rule: {self.rope_type} needs it")

    def to_hf(self) -> dict:
        """This scaling as Hugging Face ``rope_parameters`` keys (``rope_theta`` aside)."""
        keys = {"default": (), "linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
                         "attention_factor")}[self.rope_type]
        return {"rope_type": self.rope_type, **{key: getattr(self, key) for key in keys}}


@dataclass(frozen=True)
class GemmaBlock:
    """What a Gemma 2 / Gemma 3 layer computes beyond the Llama block. Always: every RMSNorm scales by
    ``1 + weight`` (computed in float32); sandwich norms (the attention output and the MLP output are normed before
    their residual adds, beside the usual pre-norms); the embedding is multiplied by ``sqrt(hidden_size)`` rounded
    to the weights' dtype; the MLP is GeGLU (tanh GELU). Per checkpoint: scores scaled by
    ``query_pre_attn_scalar ** -0.5`` (not ``head_dim``'s), capped as ``c * tanh(s / c)`` with
    ``attn_logit_softcapping`` and the logits with ``final_logit_softcapping`` (None: no cap), and
    ``local_rope_theta`` (Gemma 3): the RoPE base of the windowed layers, unscaled, while the global layers take
    ``GPTShape.rope_theta`` and ``rope_scaling`` (None: every layer the global RoPE)."""

    query_pre_attn_scalar: float
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    local_rope_theta: Optional[float] = None

    def __post_init__(self):
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "local_rope_theta"):
            value = getattr(self, name)
            if (value is not None or name == "query_pre_attn_scalar") and not (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"GemmaBlock.{name}={value!r}; rule: a positive number"
                                 + ("" if name == "query_pre_attn_scalar" else ", or None"))


@dataclass(frozen=True)
class GPTShape:
    """Architecture of a decoder-only transformer.

    ``arch="llama"``: RMSNorm, SwiGLU MLP, RoPE (scaled by ``rope_scaling``), no biases except q/k/v
    biases with ``qkv_bias`` (Qwen2), RMSNorm of every query and key head before RoPE with ``qk_norm``
    (Qwen3), GQA allowed.
    ``arch="gpt2"``: LayerNorm, GELU (tanh) MLP, learned absolute positions, biases, MHA.
    ``head_dim``: None means ``hidden_size / num_attention_heads``; an explicit one (Qwen3) may differ.
    ``mla`` (llama only): multi-head latent attention instead of GQA; ``head_dim`` is then its RoPE dims
    and ``num_kv_heads`` 1 (the one latent every head reads).
    ``max_seq_len`` bounds position ids (and sizes GPT-2's position table).
    ``sliding_window`` (None: every layer attends to every earlier token): on a windowed layer the token at
    position ``p`` attends to positions ``(p - sliding_window, p]``; ``sliding_layers`` flags the windowed
    layers in order (None: every layer), transformers' ``layer_types`` with ``sliding_attention`` as True.
    ``gemma`` (llama only): the Gemma 2/3 block (``GemmaBlock``); its windowed layers are its local ones.
    ``moe`` (llama only): routed experts (``MoEDims``) in place of the dense MLP on the layers it flags; the
    other layers keep the dense MLP of ``ffn_hidden_size``.
    ``attention_sinks`` (llama only): one learned logit per query head joins each softmax with no value
    (gpt-oss; ``cptoolkit.layers.lse_merge.add_sinks``). ``attention_out_bias``: the attention output projection
    has a bias (with ``qkv_bias``: gpt-oss's ``attention_bias``); only with every layer MoE, since megatron's
    ``add_bias_linear`` would give a dense MLP biases too.
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
    head_dim: Optional[int] = None
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    mla: Optional[MLADims] = None
    sliding_window: Optional[int] = None
    sliding_layers: Optional[tuple[bool, ...]] = None
    gemma: Optional[GemmaBlock] = None
    moe: Optional[MoEDims] = None
    attention_sinks: bool = False
    attention_out_bias: bool = False

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
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"GPTShape.hidden_size={self.hidden_size} must be a multiple of "
                                 f"num_attention_heads={self.num_attention_heads} (or give head_dim)")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ValueError(f"GPTShape.head_dim={self.head_dim!r}; rule: must be a positive integer")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"GPTShape.head_dim={self.head_dim}; rule: must be even for llama (RoPE rotates "
                             "pairs of dimensions)")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"GPTShape.num_attention_heads={self.num_attention_heads} must be a "
                             f"multiple of num_kv_heads={self.num_kv_heads}")
        if self.arch == "gpt2":
            self._check_gpt2()
        self._check_window()
        if self.gemma is not None and (self.mla is not None or self.qkv_bias):
            raise ValueError("GPTShape with gemma: mla must be None and qkv_bias false (the Gemma block has neither)")
        if self.gemma is not None and self.gemma.local_rope_theta is not None and (
                self.sliding_window is None or self.rope_scaling.attention_factor != 1.0):
            raise ValueError(f"GPTShape with gemma.local_rope_theta={self.gemma.local_rope_theta}: needs windowed "
                             f"(local) layers to apply it to (sliding_window={self.sliding_window}), and a global "
                             f"RoPE without attention_factor (got {self.rope_scaling.attention_factor}): the softmax "
                             "scale that would carry it is shared by every layer")
        if self.attention_out_bias and (self.moe is None or not all(self.moe.moe_layers)):
            raise ValueError("GPTShape.attention_out_bias=True; rule: only with every layer MoE (moe.moe_layers all "
                             "True): megatron's add_bias_linear would put biases on a dense MLP too")
        if self.moe is not None and len(self.moe.moe_layers) != self.num_layers:
            raise ValueError(f"GPTShape.moe.moe_layers has {len(self.moe.moe_layers)} flags; rule: one per layer "
                             f"(num_layers={self.num_layers})")
        if self.mla is not None and (self.head_dim != self.mla.qk_rope_head_dim or self.num_kv_heads != 1
                                     or self.qkv_bias or self.qk_norm):
            raise ValueError(f"GPTShape with mla: head_dim={self.head_dim} must be qk_rope_head_dim="
                             f"{self.mla.qk_rope_head_dim}, num_kv_heads={self.num_kv_heads} must be 1, qkv_bias "
                             "and qk_norm false (the latent replaces the K/V heads)")

    def _check_window(self) -> None:
        window, layers = self.sliding_window, self.sliding_layers
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError(f"GPTShape.sliding_window={window!r}; rule: a positive integer, or None (no window)")
        if layers is not None:
            if window is None or len(layers) != self.num_layers or not all(isinstance(f, bool) for f in layers):
                raise ValueError(f"GPTShape.sliding_layers={layers!r}; rule: one bool per layer "
                                 f"({self.num_layers}), and only with a sliding_window")
            if not any(layers):
                raise ValueError("GPTShape.sliding_layers marks no layer; rule: give sliding_window=None instead")
        if window is not None and self.mla is not None:
            raise ValueError(f"GPTShape.sliding_window={window} with mla; rule: multi-head latent attention has "
                             "no sliding window in cptoolkit")

    def layer_window(self, layer_number: int) -> Optional[int]:
        """The window of layer ``layer_number`` (1 .. num_layers, megatron's numbering); None: full attention."""
        if not 1 <= layer_number <= self.num_layers:
            raise ValueError(f"layer_number={layer_number}; rule: in [1, {self.num_layers}]")
        if self.sliding_layers is not None and not self.sliding_layers[layer_number - 1]:
            return None
        return self.sliding_window

    @property
    def has_full_layers(self) -> bool:
        """Whether some layer attends to every earlier token (its cache grows with the context)."""
        return self.sliding_window is None or (self.sliding_layers is not None and not all(self.sliding_layers))

    def _check_gpt2(self) -> None:
        if self.num_kv_heads != self.num_attention_heads:
            raise ValueError(f"GPTShape.num_kv_heads={self.num_kv_heads}; rule: gpt2 has one KV head "
                             f"per query head (num_attention_heads={self.num_attention_heads})")
        llama_only = {"head_dim": (self.head_dim, self.hidden_size // self.num_attention_heads),
                      "qkv_bias": (self.qkv_bias, False), "qk_norm": (self.qk_norm, False), "mla": (self.mla, None),
                      "rope_scaling": (self.rope_scaling, RopeScaling()), "sliding_window": (self.sliding_window, None),
                      "gemma": (self.gemma, None), "moe": (self.moe, None),
                      "attention_sinks": (self.attention_sinks, False)}
        for name, (value, gpt2_value) in llama_only.items():
            if value != gpt2_value:
                raise ValueError(f"GPTShape.{name}={value!r}; rule: must be {gpt2_value!r} for gpt2 (llama only)")

    @property
    def kv_cache_entry(self) -> tuple[int, int]:
        """``(planes, width)`` the KV cache stores per token, layer and KV head: K and V of ``head_dim``, or
        MLA's one latent (key and value at once) of ``kv_lora_rank + qk_rope_head_dim``."""
        return (1, self.mla.latent_dim) if self.mla is not None else (2, self.head_dim)

    def mla_softmax_scale(self) -> float:
        """MLA's scale of ``q . k``: ``1/sqrt(qk_nope + qk_rope)``, times ``yarn_mscale(factor, mscale_all_dim)²``
        with scaled RoPE (transformers' ``yarn_apply_mscale``)."""
        scale = self.mla.qk_head_dim ** -0.5
        if self.rope_scaling.rope_type != "default" and self.mla.mscale_all_dim:
            scale *= _yarn_mscale(self.rope_scaling.factor, self.mla.mscale_all_dim) ** 2
        return scale


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched ``scale`` times."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def positive_key(config: dict, key: str, number: type = int, default=None):
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


def read_rope(config: dict) -> tuple[float, RopeScaling]:
    """``(rope_theta, RopeScaling)`` from ``rope_parameters`` (transformers 5) or the older
    ``rope_scaling`` + top-level ``rope_theta`` (which wins when both are set, as in transformers),
    with transformers' defaults (its ``ROPE_INIT_FUNCTIONS``)."""
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    rope = config.get(key) or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{key}={rope!r}; rule: must be an object of RoPE parameters")
    theta = positive_key(rope, "rope_theta", float, default=positive_key(config, "rope_theta", float, default=10000.0))
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial!r}; rule: must be 1.0 (RoPE on the whole head)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "dynamic":
        raise ValueError(f"{key}.rope_type='dynamic' is not supported; rule: one of {ROPE_TYPES}: {_DYNAMIC_REFUSED}")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{key}.rope_type={rope_type!r} is not supported; rule: one of {ROPE_TYPES}")
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor=positive_key(rope, "factor", float))
    max_positions = positive_key(config, "max_position_embeddings")
    # Phi-3 style: a top-level original_max_position_embeddings wins, as in transformers' standardize_rope_params.
    original = positive_key(config, "original_max_position_embeddings",
                         default=positive_key(rope, "original_max_position_embeddings", default=max_positions))
    if rope_type == "llama3":
        return theta, RopeScaling("llama3", factor=positive_key(rope, "factor", float),
                                  low_freq_factor=positive_key(rope, "low_freq_factor", float),
                                  high_freq_factor=positive_key(rope, "high_freq_factor", float),
                                  original_max_position_embeddings=original)
    # An explicit factor wins over max_position_embeddings / original, as in transformers' _compute_yarn_parameters
    # (which warns when they differ); Qwen2.5's long-context recipe sets factor 4 where that ratio is 1.
    factor = positive_key(rope, "factor", float, default=max_positions / original)
    return theta, RopeScaling("yarn", factor=factor, original_max_position_embeddings=original,
                              beta_fast=_yarn_beta(rope, "beta_fast", 32.0),
                              beta_slow=_yarn_beta(rope, "beta_slow", 1.0),
                              truncate=bool(rope.get("truncate", True)),
                              attention_factor=_yarn_attention_factor(rope, factor))


def _yarn_beta(rope: dict, key: str, default: float) -> float:
    """YaRN's ``beta_fast`` / ``beta_slow``: missing, null or 0 is ``default`` (transformers' ``or``); otherwise a
    positive number, a number of rotations over ``original_max_position_embeddings`` whose log YaRN takes."""
    return positive_key({key: rope.get(key) or default}, key, float)


def _yarn_attention_factor(rope: dict, factor: float) -> float:
    """YaRN's cos/sin multiplier, as transformers' ``_compute_yarn_parameters`` infers it: an explicit
    ``attention_factor``, else ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are set
    and non-zero, else ``mscale(factor)``."""
    if rope.get("attention_factor") is not None:
        return positive_key(rope, "attention_factor", float)
    if rope.get("mscale") and rope.get("mscale_all_dim"):
        for key in ("mscale", "mscale_all_dim"):
            if not isinstance(rope[key], (int, float)):
                raise ValueError(f"{key}={rope[key]!r}; rule: must be a number")
        return float(_yarn_mscale(factor, rope["mscale"]) / _yarn_mscale(factor, rope["mscale_all_dim"]))
    return _yarn_mscale(factor)


def require_keys(config: dict, fixed: dict) -> None:
    """Refuse a key of ``fixed`` that ``config`` sets to another value than the supported one (absent is
    supported): keys a family's transformers model reads that cptoolkit would compute differently."""
    for key, supported in fixed.items():
        if config.get(key, supported) != supported:
            raise ValueError(f"{key}={config[key]!r}; rule: must be {supported!r}")


def layer_types_flags(config: dict, layers: int) -> Optional[tuple[bool, ...]]:
    """transformers' ``layer_types`` as one flag per layer, True for ``sliding_attention``; None when absent."""
    layer_types = config.get("layer_types")
    if layer_types is None:
        return None
    kinds = ("full_attention", "sliding_attention")
    if not isinstance(layer_types, list) or len(layer_types) != layers or any(t not in kinds for t in layer_types):
        raise ValueError(f"layer_types={layer_types!r}; rule: a list of {layers} entries, each one of {kinds}")
    return tuple(t == "sliding_attention" for t in layer_types)


def window_from_hf(config: dict, flags: tuple[bool, ...]) -> tuple[Optional[int], Optional[tuple[bool, ...]]]:
    """``(sliding_window, sliding_layers)`` for a window on the layers ``flags`` marks; no window when
    ``sliding_window`` is unset or marks no layer, and a window no shorter than ``max_position_embeddings`` (it
    never masks a token) is dropped. ``sliding_layers`` is None when every layer is windowed."""
    if config.get("sliding_window") is None or not any(flags):
        return None, None
    window = positive_key(config, "sliding_window")
    if window >= positive_key(config, "max_position_embeddings"):
        return None, None
    return window, None if all(flags) else flags


def hf_layer_types(shape: GPTShape) -> list[str]:
    """``shape``'s windowed layers as transformers' ``layer_types`` (every layer full without a window)."""
    layers = shape.sliding_layers or (shape.sliding_window is not None,) * shape.num_layers
    return ["sliding_attention" if windowed else "full_attention" for windowed in layers]


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


def weights_dtype(config: dict, checkpoint_dir: str | Path) -> str:
    """``runtime.dtype: auto`` for a checkpoint: the dtype its ``config.json`` says the weights are in (``dtype``,
    transformers 5's key, else ``torch_dtype``), float32 when neither is set (transformers' default). A dtype
    cptoolkit does not compute in (float16, ...) is a ``ConfigError`` naming the file."""
    key = "dtype" if config.get("dtype") is not None else "torch_dtype"
    value = config.get(key)
    if value is None:
        return "float32"
    if value not in AUTO_DTYPES:
        raise ConfigError(f"{Path(checkpoint_dir) / CONFIG_FILE}: {key}={value!r} cannot be runtime.dtype auto; "
                          f"rule: auto runs in the weights' dtype, one of {AUTO_DTYPES}; set runtime.dtype to "
                          "bfloat16 or float32 to convert the weights as they load")
    return value
