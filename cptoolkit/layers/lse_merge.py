"""Exact combination of partial attention results by their log-sum-exp.

Attention over a key set split into parts A and B can be computed part by part: each part gives
``(out_p, lse_p)`` with ``lse_p = log Σ_{k∈p} exp(q·k·scale)``. The exact result over A ∪ B is
``lse = log(e^{lse_a} + e^{lse_b})`` and ``out = e^{lse_a-lse}·out_a + e^{lse_b-lse}·out_b``.
Written as ``out_a - sigmoid(lse_b - lse_a)·(out_a - out_b)`` it never exponentiates a large number.

An empty part (no key visible, e.g. an empty KV shard or a fully masked causal block) has
``lse = -inf``; merging it is the identity, and merging two empty parts gives ``lse = -inf`` with a
zero-weighted output, never NaN. This is the one merge used by ring prefill and by DCP decode.

Shapes: ``out [b, h, s, d]`` in any float dtype; ``lse [b, h, s]`` in float32 (or float64).
"""
from __future__ import annotations

import torch


def _finite_or(x: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.full_like(x, fill))


def merge_lse(lse_a: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """``log(e^{lse_a} + e^{lse_b})`` elementwise, exact for ``-inf`` inputs."""
    hi = torch.maximum(lse_a, lse_b)
    lo = torch.minimum(lse_a, lse_b)
    # hi = -inf means both parts are empty: lo - hi would be NaN, and the answer is -inf.
    return torch.where(hi == float("-inf"), hi, hi + torch.log1p(torch.exp(lo - _finite_or(hi, 0.0))))


def merge_two(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results; returns ``(out [b,h,s,d] in out_a's dtype, lse [b,h,s])``."""
    # Both -inf gives NaN here; -inf weight keeps out_a (itself a zero-weight partial).
    lse_diff = torch.nan_to_num(lse_b - lse_a, nan=float("-inf"))
    weight_b = torch.sigmoid(lse_diff).unsqueeze(-1)
    out = out_a.float() - weight_b * (out_a.float() - out_b.float())
    return out.to(out_a.dtype), merge_lse(lse_a, lse_b)


def merge_many(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``n`` partials stacked on dim 0: ``outs [n, b, h, s, d]``, ``lses [n, b, h, s]``.

    Returns ``(out [b, h, s, d], lse [b, h, s])``. Used by DCP decode, where each of the ``n`` KV
    shards contributes one partial.
    """
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.nan_to_num(torch.exp(lses - lse.unsqueeze(0)), nan=0.0)
    out = (weights.unsqueeze(-1) * outs.float()).sum(dim=0)
    return out.to(outs.dtype), lse


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_many`` on the device's kernel: the Triton kernel on CUDA (``lse_merge_triton``, imported only
    there), torch elsewhere. The one merge dispatch of DCP decode and context attention."""
    if outs.is_cuda:
        from cptoolkit.layers.lse_merge_triton import merge_many_triton
        return merge_many_triton(outs, lses)
    return merge_many(outs, lses)
