"""RoPE's inverse frequencies for every ``RopeScaling`` variant, computed as transformers computes them
(its ``ROPE_INIT_FUNCTIONS`` and the default in each model's rotary embedding), in float32, so a
checkpoint's rotations match transformers' to the last bit.

The frequencies depend only on the shape, never on positions or sequence length: ``gpt_forward``
multiplies them by any position ids (DualChunkSwap shards, decode steps, positions past
``original_max_position_embeddings``). YaRN's ``attention_factor`` is not applied here: scaling cos and
sin by it scales every attention score by its square, which ``build.megatron_config`` folds into the
softmax scale.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from cptoolkit.models.shape import GPTShape, RopeScaling


def _unscaled(theta: float, dim: int) -> torch.Tensor:
    """``theta ** (-2i / dim)`` for ``i < dim / 2``: ``[dim / 2]`` float32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, rope: RopeScaling) -> torch.Tensor:
    """Wavelengths longer than ``original / low_freq_factor`` are stretched by ``factor``, those shorter
    than ``original / high_freq_factor`` kept, and those between blended linearly in ``original / wavelength``."""
    original = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / rope.low_freq_factor, inv_freq / rope.factor, inv_freq)
    smooth = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < original / rope.high_freq_factor) * ~(wavelen > original / rope.low_freq_factor)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(theta: float, dim: int, rope: RopeScaling) -> torch.Tensor:
    """Dimensions that turn more than ``beta_fast`` times over ``original`` positions keep their
    frequency, those turning fewer than ``beta_slow`` times are interpolated by ``factor``, with a
    linear ramp between."""
    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    return (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def inv_freq(shape: GPTShape) -> torch.Tensor:
    """RoPE's inverse frequencies of ``shape``: ``[head_dim / 2]`` float32, for angles ``position * inv_freq``."""
    rope, dim = shape.rope_scaling, shape.head_dim
    if rope.rope_type == "yarn":
        return _yarn(shape.rope_theta, dim, rope)
    unscaled = _unscaled(shape.rope_theta, dim)
    if rope.rope_type == "linear":
        return unscaled / rope.factor
    if rope.rope_type == "llama3":
        return _llama3(unscaled, rope)
    return unscaled


def local_inv_freq(shape: GPTShape) -> Optional[torch.Tensor]:
    """Gemma 3's local (windowed) layers' inverse frequencies: unscaled, base ``gemma.local_rope_theta``;
    None when every layer takes ``inv_freq(shape)``."""
    if shape.gemma is None or shape.gemma.local_rope_theta is None:
        return None
    return _unscaled(shape.gemma.local_rope_theta, shape.head_dim)
