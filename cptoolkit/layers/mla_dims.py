"""Multi-head latent attention's dimensions, ``MLADims``: the extra of ``GPTShape.mla``.

Pure Python like ``cptoolkit.models.shape``, which holds it, and here, on the layers' floor, so that the layer
that computes it (``cptoolkit.layers.mla``) takes it without importing the models above it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
