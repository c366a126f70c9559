"""The Gemma 2 / Gemma 3 block on megatron-core's ``TransformerLayer`` (``GPTShape.gemma``).

megatron's layer is ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; Gemma norms the two outputs as well
(sandwich norms). Here those post-norms live in the row-parallel output projections (``PostNormRowParallelLinear``:
``linear_proj`` and ``linear_fc2``), after their TP all-reduce, so the layer's residual adds stay megatron's. Every
norm is ``GemmaRMSNorm``: ``x / rms(x) * (1 + weight)`` in float32, as transformers computes it. Gemma 3's local
layers rotate by their own RoPE base: ``gpt_hidden`` passes ``{"global": angles, "local": angles}`` and
``GemmaSelfAttention`` takes the one of its layer (local exactly when the layer has a sliding window).
The block always uses megatron's local (non-TransformerEngine) linear layers: TE's fuse the pre-norm into the
projection with TE's own norm, which has no ``1 + weight`` form. The attention kernels keep their backend.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from cptoolkit.layers.core_attention import layer_window


class GemmaRMSNorm(torch.nn.Module):
    """``x [..., hidden_size]`` -> ``x * rsqrt(mean(x²) + eps) * (1 + weight)``, computed in float32 and returned
    in ``x``'s dtype. ``weight`` is stored as the checkpoint stores it (0 is the identity); ``identity_weight``
    tells the seeded initializer so."""

    identity_weight = 0.0

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class PostNormRowParallelLinear(RowParallelLinear):
    """megatron's ``RowParallelLinear`` whose full (TP-reduced) output ``[s, b, output_size]`` is normed by a
    ``GemmaRMSNorm`` (``post_norm``) before the residual add: Gemma's post-attention / post-feed-forward norm.
    Biases are refused: Gemma has none, and a skipped bias would be added after the norm."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, bias: bool, **kwargs):
        if bias:
            raise ValueError("PostNormRowParallelLinear(bias=True); rule: the Gemma block has no linear biases")
        super().__init__(input_size, output_size, config=config, bias=bias, **kwargs)
        self.post_norm = GemmaRMSNorm(config, output_size, eps=config.layernorm_epsilon)

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, None]:
        output, _ = super().forward(input_)
        return self.post_norm(output), None


class GemmaSelfAttention(SelfAttention):
    """megatron's ``SelfAttention`` that accepts ``rotary_pos_emb`` as ``{"global": ..., "local": ...}`` (Gemma 3)
    and rotates by the local angles exactly when its layer has a sliding window; a plain tensor is every layer's."""

    def forward(self, hidden_states: torch.Tensor, *args, rotary_pos_emb=None, **kwargs):
        if isinstance(rotary_pos_emb, dict):
            rotary_pos_emb = rotary_pos_emb["local" if layer_window(self.config, self.layer_number) else "global"]
        return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


def gemma_block_spec(layer_spec: ModuleSpec, num_layers: int, qk_norm: bool) -> TransformerBlockSubmodules:
    """megatron's local layer spec (``layer_spec``, with cptoolkit's core attention in it) made Gemma's, in place:
    ``GemmaRMSNorm`` for the pre-norms (and, with ``qk_norm``, Gemma 3's q/k norms), ``PostNormRowParallelLinear``
    for ``linear_proj`` / ``linear_fc2``, ``GemmaSelfAttention``; the block of ``num_layers`` such layers with a
    ``GemmaRMSNorm`` as its final norm."""
    layer = layer_spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = GemmaRMSNorm
    attention = layer.self_attention
    attention.module = GemmaSelfAttention
    attention.submodules.linear_proj = PostNormRowParallelLinear
    if qk_norm:
        attention.submodules.q_layernorm = attention.submodules.k_layernorm = GemmaRMSNorm
    layer.mlp.submodules.linear_fc2 = PostNormRowParallelLinear
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=GemmaRMSNorm)
