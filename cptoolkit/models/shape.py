"""The model's architecture, ``GPTShape``, read from and written as a Hugging Face ``config.json``.

Pure Python: no torch, no megatron, so ``cptoolkit.config`` reads a checkpoint's shape while it
validates a YAML file without loading either. The RoPE frequencies of a ``RopeScaling`` are computed
by ``cptoolkit.models.rope``.

Hugging Face families read here (``model_type``: architectures):
- ``llama``: LlamaForCausalLM; ``mistral``: MistralForCausalLM (``sliding_window`` on every layer);
  ``qwen2``: Qwen2ForCausalLM (q/k/v biases; ``use_sliding_window`` on the layers from ``max_window_layers``,
  or as ``layer_types`` says); ``qwen3``: Qwen3ForCausalLM (per-head q/k RMSNorm; ``layer_types``).
  All four are ``arch="llama"``, with RoPE ``rope_type`` default, linear, llama3 or yarn.
- ``gemma2``: Gemma2ForCausalLM; ``gemma3_text``: Gemma3ForCausalLM: the Gemma block (``GemmaBlock``) on
  ``arch="llama"``: local (sliding-window) layers between global ones as ``layer_types`` says (else every other
  layer, Gemma 3: five of every ``sliding_window_pattern``), Gemma 3's q/k norms and local RoPE base.
- ``gpt2``: GPT2LMHeadModel, GPT2Model.
- ``deepseek_v2``: DeepseekV2ForCausalLM; ``deepseek_v3``: DeepseekV3ForCausalLM: multi-head latent
  attention (``MLADims``) on the Llama block, dense MLP layers only (MoE layers are refused).
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

ARCHS = ("llama", "gpt2")
HF_ARCHITECTURES = {"llama": ("LlamaForCausalLM",), "mistral": ("MistralForCausalLM",),
                    "qwen2": ("Qwen2ForCausalLM",), "qwen3": ("Qwen3ForCausalLM",),
                    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
                    "deepseek_v2": ("DeepseekV2ForCausalLM",), "deepseek_v3": ("DeepseekV3ForCausalLM",),
                    "gemma2": ("Gemma2ForCausalLM",), "gemma3_text": ("Gemma3ForCausalLM",)}
GEMMA_MODEL_TYPES = ("gemma2", "gemma3_text")
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
AUTO_DTYPES = ("float32", "bfloat16", "float64")  # the weights' dtypes ``runtime.dtype: auto`` runs in
CONFIG_FILE = "config.json"
RESAVE = "save the checkpoint again (save_pretrained or cptoolkit's save_checkpoint)"
_SUPPORTED_HF = (f"one of {', '.join(repr(t) for t in HF_ARCHITECTURES)} (architectures "
                 f"{', '.join(a for archs in HF_ARCHITECTURES.values() for a in archs)})")
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
class MLADims:
    """Multi-head latent attention (DeepSeek-V2/V3). Each token's keys and values come from one
    ``kv_lora_rank`` latent (after its RMSNorm) shared by every head, plus one ``qk_rope_head_dim`` RoPE key
    shared by every head; per head, ``kv_b`` expands the latent into a ``qk_nope_head_dim`` key and a
    ``v_head_dim`` value. Queries: ``q_lora_rank`` (None: one direct projection) then per head
    ``qk_nope_head_dim + qk_rope_head_dim``. ``rope_interleave``: RoPE rotates the pairs ``(2i, 2i+1)`` of the
    RoPE dims (DeepSeek's layout) rather than ``(i, i + d/2)``. ``mscale_all_dim`` (0: none): with scaled RoPE,
    every score (not only the RoPE dims') is multiplied by ``yarn_mscale(factor, mscale_all_dim)²``, as in
    DeepSeek's reference and transformers' ``yarn_apply_mscale``; see ``GPTShape.mla_softmax_scale``."""

    q_lora_rank: Optional[int]
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    mscale_all_dim: float = 0.0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """What the KV cache stores per token and layer: the latent and the RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


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
                      "gemma": (self.gemma, None)}
        for name, (value, gpt2_value) in llama_only.items():
            if value != gpt2_value:
                raise ValueError(f"GPTShape.{name}={value!r}; rule: must be {gpt2_value!r} for gpt2 (llama only)")

    @classmethod
    def from_hf_config(cls, config: dict) -> "GPTShape":
        """Read a Hugging Face ``config.json`` dict of one of the families of ``HF_ARCHITECTURES``.
        Errors name the key and the rule but not the file: the caller knows which file it read."""
        if "model_type" not in config:
            raise ValueError(f"missing required key 'model_type'; rule: {_SUPPORTED_HF}")
        model_type = config["model_type"]
        if model_type not in HF_ARCHITECTURES:
            raise ValueError(f"model_type={model_type!r} is not supported; rule: {_SUPPORTED_HF}")
        unsupported = [a for a in config.get("architectures") or [] if a not in HF_ARCHITECTURES[model_type]]
        if unsupported:
            raise ValueError(f"architectures={unsupported!r} is not supported for model_type {model_type!r}; "
                             f"rule: {' or '.join(HF_ARCHITECTURES[model_type])}")
        if model_type in MLA_MODEL_TYPES:
            return _deepseek_shape(config, model_type)
        if model_type in GEMMA_MODEL_TYPES:
            return _gemma_shape(config, model_type)
        return _gpt2_shape(config) if model_type == "gpt2" else _llama_shape(config, model_type)

    def to_hf_config(self) -> dict:
        """A Hugging Face ``config.json`` dict that ``from_hf_config`` reads back as this shape (q/k/v
        biases are written as a Qwen2, q/k norms as a Qwen3, anything else as a Llama)."""
        if self.arch == "gpt2":
            return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                    "n_layer": self.num_layers, "n_embd": self.hidden_size,
                    "n_head": self.num_attention_heads, "n_inner": self.ffn_hidden_size,
                    "vocab_size": self.vocab_size, "n_positions": self.max_seq_len,
                    "layer_norm_epsilon": self.norm_eps, "activation_function": "gelu_new",
                    "tie_word_embeddings": self.tie_embeddings}
        if self.mla is not None:
            return self._deepseek_hf_config()
        if self.gemma is not None:
            return self._gemma_hf_config()
        model_type = "qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else "llama"
        if self.sliding_window is not None and model_type == "llama":
            if self.sliding_layers is not None:
                raise ValueError("GPTShape with sliding_layers but neither qkv_bias nor qk_norm has no Hugging Face "
                                 "family (Mistral windows every layer; Qwen2/Qwen3 bring biases or q/k norms)")
            model_type = "mistral"
        return {"model_type": model_type, "architectures": list(HF_ARCHITECTURES[model_type]),
                "num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.ffn_hidden_size, "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_seq_len, "hidden_act": "silu",
                "rope_parameters": {"rope_theta": self.rope_theta, **self.rope_scaling.to_hf()},
                "rms_norm_eps": self.norm_eps, "tie_word_embeddings": self.tie_embeddings,
                **self._window_hf_keys(model_type)}

    def _window_hf_keys(self, model_type: str) -> dict:
        """The window as ``model_type``'s config keys: Mistral's ``sliding_window``; Qwen2/Qwen3's
        ``use_sliding_window``, ``sliding_window`` and ``layer_types``."""
        if self.sliding_window is None:
            return {}
        if model_type == "mistral":
            return {"sliding_window": self.sliding_window}
        layers = self.sliding_layers or (True,) * self.num_layers
        keys = {"sliding_window": self.sliding_window,
                "layer_types": ["sliding_attention" if windowed else "full_attention" for windowed in layers]}
        return {**keys, "use_sliding_window": True}

    def _gemma_hf_config(self) -> dict:
        """A Gemma 3 text ``config.json`` with q/k norms, a Gemma 2 one without."""
        model_type, g = ("gemma3_text" if self.qk_norm else "gemma2"), self.gemma
        global_rope = {"rope_theta": self.rope_theta, **self.rope_scaling.to_hf()}
        rope = ({"full_attention": global_rope, "sliding_attention": {"rope_type": "default",
                                                                      "rope_theta": g.local_rope_theta}}
                if g.local_rope_theta is not None else global_rope)
        layers = self.sliding_layers or (True,) * self.num_layers
        window = ({"sliding_window": self.sliding_window,
                   "layer_types": ["sliding_attention" if windowed else "full_attention" for windowed in layers]}
                  if self.sliding_window is not None
                  else {"sliding_window": None, "layer_types": ["full_attention"] * self.num_layers})
        return {"model_type": model_type, "architectures": list(HF_ARCHITECTURES[model_type]),
                "num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
                "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "intermediate_size": self.ffn_hidden_size, "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_seq_len, "hidden_activation": "gelu_pytorch_tanh",
                "rope_parameters": rope, "rms_norm_eps": self.norm_eps, "tie_word_embeddings": self.tie_embeddings,
                "query_pre_attn_scalar": g.query_pre_attn_scalar,
                "attn_logit_softcapping": g.attn_logit_softcapping,
                "final_logit_softcapping": g.final_logit_softcapping, **window}

    def _deepseek_hf_config(self) -> dict:
        """A DeepSeek-V3 ``config.json`` with every layer dense."""
        m = self.mla
        return {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
                "num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
                "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_attention_heads,
                "intermediate_size": self.ffn_hidden_size, "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_seq_len, "hidden_act": "silu",
                "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
                "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim,
                "rope_interleave": m.rope_interleave,
                "first_k_dense_replace": self.num_layers, "attention_bias": False,
                "rope_parameters": {"rope_theta": self.rope_theta, **self.rope_scaling.to_hf(),
                                    **({"mscale_all_dim": m.mscale_all_dim} if m.mscale_all_dim else {})},
                "rms_norm_eps": self.norm_eps, "tie_word_embeddings": self.tie_embeddings}

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


def _rope(config: dict) -> tuple[float, RopeScaling]:
    """``(rope_theta, RopeScaling)`` from ``rope_parameters`` (transformers 5) or the older
    ``rope_scaling`` + top-level ``rope_theta`` (which wins when both are set, as in transformers),
    with transformers' defaults (its ``ROPE_INIT_FUNCTIONS``)."""
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    rope = config.get(key) or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{key}={rope!r}; rule: must be an object of RoPE parameters")
    theta = _positive(rope, "rope_theta", float, default=_positive(config, "rope_theta", float, default=10000.0))
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
        return theta, RopeScaling("linear", factor=_positive(rope, "factor", float))
    max_positions = _positive(config, "max_position_embeddings")
    # Phi-3 style: a top-level original_max_position_embeddings wins, as in transformers' standardize_rope_params.
    original = _positive(config, "original_max_position_embeddings",
                         default=_positive(rope, "original_max_position_embeddings", default=max_positions))
    if rope_type == "llama3":
        return theta, RopeScaling("llama3", factor=_positive(rope, "factor", float),
                                  low_freq_factor=_positive(rope, "low_freq_factor", float),
                                  high_freq_factor=_positive(rope, "high_freq_factor", float),
                                  original_max_position_embeddings=original)
    # An explicit factor wins over max_position_embeddings / original, as in transformers' _compute_yarn_parameters
    # (which warns when they differ); Qwen2.5's long-context recipe sets factor 4 where that ratio is 1.
    factor = _positive(rope, "factor", float, default=max_positions / original)
    return theta, RopeScaling("yarn", factor=factor, original_max_position_embeddings=original,
                              beta_fast=_yarn_beta(rope, "beta_fast", 32.0),
                              beta_slow=_yarn_beta(rope, "beta_slow", 1.0),
                              truncate=bool(rope.get("truncate", True)),
                              attention_factor=_yarn_attention_factor(rope, factor))


def _yarn_beta(rope: dict, key: str, default: float) -> float:
    """YaRN's ``beta_fast`` / ``beta_slow``: missing, null or 0 is ``default`` (transformers' ``or``); otherwise a
    positive number, a number of rotations over ``original_max_position_embeddings`` whose log YaRN takes."""
    return _positive({key: rope.get(key) or default}, key, float)


def _yarn_attention_factor(rope: dict, factor: float) -> float:
    """YaRN's cos/sin multiplier, as transformers' ``_compute_yarn_parameters`` infers it: an explicit
    ``attention_factor``, else ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are set
    and non-zero, else ``mscale(factor)``."""
    if rope.get("attention_factor") is not None:
        return _positive(rope, "attention_factor", float)
    if rope.get("mscale") and rope.get("mscale_all_dim"):
        for key in ("mscale", "mscale_all_dim"):
            if not isinstance(rope[key], (int, float)):
                raise ValueError(f"{key}={rope[key]!r}; rule: must be a number")
        return float(_yarn_mscale(factor, rope["mscale"]) / _yarn_mscale(factor, rope["mscale_all_dim"]))
    return _yarn_mscale(factor)


def _window(config: dict, model_type: str) -> tuple[Optional[int], Optional[tuple[bool, ...]]]:
    """``(sliding_window, sliding_layers)`` as transformers reads them: Mistral windows every layer when
    ``sliding_window`` is set; Qwen2 and Qwen3 only with ``use_sliding_window``, on the layers ``layer_types``
    (or, when absent, ``max_window_layers`` onwards) marks; Llama never (its attention has no window). A
    window no shorter than ``max_position_embeddings`` never masks a token and is dropped."""
    window = config.get("sliding_window")
    if model_type == "llama" or (model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window")):
        return None, None
    layers, layer_types = _positive(config, "num_hidden_layers"), config.get("layer_types")
    if model_type == "mistral":  # transformers' Mistral windows every layer, whatever layer_types says
        flags = (True,) * layers
    elif layer_types is not None:
        kinds = ("full_attention", "sliding_attention")
        if not isinstance(layer_types, list) or len(layer_types) != layers or any(t not in kinds for t in layer_types):
            raise ValueError(f"layer_types={layer_types!r}; rule: a list of {layers} entries, each one of {kinds}")
        flags = tuple(t == "sliding_attention" for t in layer_types)
    else:
        first = config.get("max_window_layers", 28)
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise ValueError(f"max_window_layers={first!r}; rule: a non-negative integer")
        flags = tuple(i >= first for i in range(layers))
    if window is None or not any(flags):
        return None, None
    window = _positive(config, "sliding_window")
    if window >= _positive(config, "max_position_embeddings"):
        return None, None
    return window, None if all(flags) else flags


# Per family, the keys its transformers model reads whose other values cptoolkit would compute differently.
# attention_bias puts biases on o_proj as well as q/k/v; Qwen2's q/k/v biases come with its model_type.
_FIXED_KEYS = {"llama": {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
               "mistral": {"hidden_act": "silu"}, "qwen2": {"hidden_act": "silu"},
               "qwen3": {"hidden_act": "silu", "attention_bias": False}}


def _llama_shape(config: dict, model_type: str) -> GPTShape:
    """Llama, Mistral, Qwen2 and Qwen3: the Llama block with, per family, q/k/v biases (Qwen2) or
    per-head q/k RMSNorm (Qwen3)."""
    for key, supported in _FIXED_KEYS[model_type].items():
        if config.get(key, supported) != supported:
            raise ValueError(f"{key}={config[key]!r}; rule: must be {supported!r}")
    window, window_layers = _window(config, model_type)
    theta, rope_scaling = _rope(config)
    return GPTShape(arch="llama", num_layers=_positive(config, "num_hidden_layers"),
                    hidden_size=_positive(config, "hidden_size"),
                    num_attention_heads=_positive(config, "num_attention_heads"),
                    num_kv_heads=_positive(config, "num_key_value_heads",
                                           default=_positive(config, "num_attention_heads")),
                    ffn_hidden_size=_positive(config, "intermediate_size"),
                    vocab_size=_positive(config, "vocab_size"),
                    max_seq_len=_positive(config, "max_position_embeddings"),
                    rope_theta=theta, norm_eps=_positive(config, "rms_norm_eps", float),
                    tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                    head_dim=None if config.get("head_dim") is None else _positive(config, "head_dim"),
                    qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3", rope_scaling=rope_scaling,
                    sliding_window=window, sliding_layers=window_layers)


# transformers' defaults for the MLA keys a DeepSeek config.json may leave out.
_MLA_DEFAULTS = {"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
_FIRST_DENSE_DEFAULT = {"deepseek_v2": 0, "deepseek_v3": 3}


def _deepseek_shape(config: dict, model_type: str) -> GPTShape:
    """DeepSeek-V2 / V3: the Llama block with multi-head latent attention; every layer must be dense
    (``first_k_dense_replace`` covers them all: cptoolkit has no MoE layers)."""
    for key, supported in {"hidden_act": "silu", "attention_bias": False}.items():
        if config.get(key, supported) != supported:
            raise ValueError(f"{key}={config[key]!r}; rule: must be {supported!r}")
    layers = _positive(config, "num_hidden_layers")
    first_dense = config.get("first_k_dense_replace", _FIRST_DENSE_DEFAULT[model_type])
    if first_dense is None or first_dense < layers:
        raise ValueError(f"first_k_dense_replace={first_dense!r} makes layers {first_dense or 0}..{layers - 1} "
                         f"mixture-of-experts; rule: must be >= num_hidden_layers={layers}: cptoolkit runs dense "
                         "MLP layers only (no MoE)")
    heads = _positive(config, "num_attention_heads")
    q_lora = config.get("q_lora_rank", 1536)
    dims = {key: _positive(config, key, default=default) for key, default in _MLA_DEFAULTS.items()}
    theta, rope_scaling = _rope(config)
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    mscale_all_dim = rope.get("mscale_all_dim") or 0.0
    if not isinstance(mscale_all_dim, (int, float)):
        raise ValueError(f"mscale_all_dim={mscale_all_dim!r}; rule: must be a number")
    mla = MLADims(q_lora_rank=None if q_lora is None else _positive(config, "q_lora_rank"), **dims,
                  rope_interleave=model_type == "deepseek_v2" or bool(config.get("rope_interleave", True)),
                  mscale_all_dim=float(mscale_all_dim))
    return GPTShape(arch="llama", num_layers=layers, hidden_size=_positive(config, "hidden_size"),
                    num_attention_heads=heads, num_kv_heads=1,
                    ffn_hidden_size=_positive(config, "intermediate_size"),
                    vocab_size=_positive(config, "vocab_size"),
                    max_seq_len=_positive(config, "max_position_embeddings"),
                    rope_theta=theta, norm_eps=_positive(config, "rms_norm_eps", float, default=1e-6),
                    tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                    head_dim=mla.qk_rope_head_dim, rope_scaling=rope_scaling, mla=mla)


# Gemma 2: sliding on every other layer (the first too); Gemma 3: five of every six, as transformers' configs say.
_GEMMA_PATTERN_DEFAULT = {"gemma2": 2, "gemma3_text": 6}
_GEMMA_LOCAL_THETA_DEFAULT = 10000.0


def _gemma_layers(config: dict, model_type: str, layers: int) -> tuple[bool, ...]:
    """Which layers are local (sliding): ``layer_types``, else the family's pattern (Gemma 3's
    ``sliding_window_pattern``): every layer but each ``pattern``-th."""
    layer_types = config.get("layer_types")
    if layer_types is not None:
        kinds = ("full_attention", "sliding_attention")
        if not isinstance(layer_types, list) or len(layer_types) != layers or any(t not in kinds for t in layer_types):
            raise ValueError(f"layer_types={layer_types!r}; rule: a list of {layers} entries, each one of {kinds}")
        return tuple(t == "sliding_attention" for t in layer_types)
    pattern = _positive(config, "sliding_window_pattern", default=_GEMMA_PATTERN_DEFAULT[model_type]) \
        if model_type == "gemma3_text" else _GEMMA_PATTERN_DEFAULT[model_type]
    return tuple(bool((i + 1) % pattern) for i in range(layers))


def _gemma_rope(config: dict, model_type: str) -> tuple[float, RopeScaling, Optional[float]]:
    """``(rope_theta, rope_scaling, local_rope_theta)``. Gemma 2: one RoPE. Gemma 3: per layer type, either
    transformers 5's ``rope_parameters: {full_attention: {...}, sliding_attention: {...}}`` or the older
    ``rope_theta`` (default 1e6) + ``rope_scaling`` for the global layers and ``rope_local_base_freq`` (default
    1e4) for the local ones, which must be unscaled."""
    if model_type == "gemma2":
        theta, scaling = _rope(config)
        return theta, scaling, None
    per_type = config.get("rope_parameters")
    if isinstance(per_type, dict) and ("full_attention" in per_type or "sliding_attention" in per_type):
        local = per_type.get("sliding_attention") or {}
        if not isinstance(local, dict):
            raise ValueError(f"rope_parameters.sliding_attention={local!r}; rule: an object of RoPE parameters")
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters.sliding_attention.rope_type={local['rope_type']!r}; rule: 'default' "
                             "(cptoolkit scales only the global layers' RoPE)")
        local_theta = _positive(local, "rope_theta", float, default=_GEMMA_LOCAL_THETA_DEFAULT)
        global_config = {**config, "rope_scaling": None,
                         "rope_parameters": {"rope_theta": 1_000_000.0, **(per_type.get("full_attention") or {})}}
    else:
        local_theta = _positive(config, "rope_local_base_freq", float, default=_GEMMA_LOCAL_THETA_DEFAULT)
        global_config = {**config, "rope_theta": config.get("rope_theta", 1_000_000.0)}
    theta, scaling = _rope(global_config)
    if scaling.rope_type not in ("default", "linear"):
        raise ValueError(f"the global layers' rope_type={scaling.rope_type!r}; rule: 'default' or 'linear' for "
                         f"{model_type} (its local layers' RoPE is never scaled, and the softmax scale is shared)")
    return theta, scaling, local_theta


def _gemma_softcap(config: dict, key: str, default: Optional[float]) -> Optional[float]:
    """A softcap key: absent is the family's default, null is no cap, else a positive number."""
    if key not in config:
        return default
    return None if config[key] is None else _positive(config, key, float)


def _gemma_shape(config: dict, model_type: str) -> GPTShape:
    """Gemma 2 / Gemma 3 text: the Llama block with the Gemma differences (``GemmaBlock``); Gemma 3 adds per-head
    q/k norms (Gemma's ``1 + weight`` norms) and the local layers' own RoPE base. The window is kept even when it
    is no shorter than ``max_position_embeddings`` (it then never masks), since it also marks the local layers."""
    fixed = {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "use_bidirectional_attention": False}
    for key, supported in fixed.items():
        if (config.get(key) or supported) != supported:
            raise ValueError(f"{key}={config[key]!r}; rule: must be {supported!r}")
    if config.get("hidden_act") not in (None, "gelu_pytorch_tanh") and "hidden_activation" not in config:
        raise ValueError(f"hidden_act={config['hidden_act']!r}; rule: must be 'gelu_pytorch_tanh' (Gemma's GeGLU)")
    layers = _positive(config, "num_hidden_layers")
    local_layers = _gemma_layers(config, model_type, layers)
    window = _positive(config, "sliding_window") if any(local_layers) and config.get("sliding_window") is not None \
        else None
    theta, rope_scaling, local_theta = _gemma_rope(config, model_type)
    heads, head_dim = _positive(config, "num_attention_heads"), _positive(config, "head_dim", default=256)
    softcaps = {"gemma2": (50.0, 30.0), "gemma3_text": (None, None)}[model_type]
    gemma = GemmaBlock(query_pre_attn_scalar=_positive(config, "query_pre_attn_scalar", float, default=256.0),
                       attn_logit_softcapping=_gemma_softcap(config, "attn_logit_softcapping", softcaps[0]),
                       final_logit_softcapping=_gemma_softcap(config, "final_logit_softcapping", softcaps[1]),
                       local_rope_theta=local_theta if window is not None else None)
    return GPTShape(arch="llama", num_layers=layers, hidden_size=_positive(config, "hidden_size"),
                    num_attention_heads=heads,
                    num_kv_heads=_positive(config, "num_key_value_heads", default=heads),
                    ffn_hidden_size=_positive(config, "intermediate_size"),
                    vocab_size=_positive(config, "vocab_size"),
                    max_seq_len=_positive(config, "max_position_embeddings"),
                    rope_theta=theta, norm_eps=_positive(config, "rms_norm_eps", float, default=1e-6),
                    tie_embeddings=bool(config.get("tie_word_embeddings", True)), head_dim=head_dim,
                    qk_norm=model_type == "gemma3_text", rope_scaling=rope_scaling,
                    sliding_window=window, sliding_layers=None if window is None or all(local_layers) else local_layers,
                    gemma=gemma)


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
