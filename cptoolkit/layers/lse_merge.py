"""Exact combination of partial attention results by their log-sum-exp.

Attention over a key set split into parts A and B can be computed part by part: each part gives
``(out_p, lse_p)`` with ``lse_p = log Σ_{k∈p} exp(q·k·scale)``. The exact result over A ∪ B is
``lse = log(e^{lse_a} + e^{lse_b})`` and ``out = e^{lse_a-lse}·out_a + e^{lse_b-lse}·out_b``.
Written as ``out_a - sigmoid(lse_b - lse_a)·(out_a - out_b)`` it never exponentiates a large number.

An empty part (no key visible, e.g. an empty KV shard or a fully masked causal block) has
``lse = -inf``; merging it is the identity, and merging two empty parts gives ``lse = -inf`` with a
zero-weighted output, never NaN. This is the one merge used by ring prefill and by DCP decode.

Attention sinks (gpt-oss): head ``h`` adds one learned logit ``sink[h]`` with a zero value to every query's
softmax denominator. That is one more partial, ``(out = 0, lse = sink[h])``, merged once into the query's
*final* result: ``out·sigmoid(lse - sink)`` and ``lse' = log(e^{lse} + e^{sink})`` (``add_sinks``). With
``lse'`` and that output, the block backward kernels give the exact dq/dk/dv of attention with sinks, and the
sink's own gradient is ``sinks_grad``. Every attention path calls these two at the one place where a query's
final ``lse`` is known, never per block.

Shapes: ``out [b, h, s, d]`` in any float dtype; ``lse [b, h, s]`` in float32 (or float64); ``sinks [h]``.
"""
from __future__ import annotations

from typing import Optional

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


def add_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: Optional[torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A query's final ``(out [b, h, s, d], lse [b, h, s])`` with head ``h``'s sink in its denominator:
    ``(out·sigmoid(lse - sinks[h]) in out's dtype, log(e^{lse} + e^{sinks[h]}) float32)``. ``sinks=None``
    returns ``(out, lse)`` themselves. A row that sees no key (``lse = -inf``) keeps ``out = 0``."""
    if sinks is None:
        return out, lse
    sink = sinks.float()[:, None]  # [h, 1], broadcast over [b, h, s]
    # lse = sink = -inf gives NaN: such a row has nothing to weigh, and its out is 0.
    weight = torch.nan_to_num(torch.sigmoid(lse - sink), nan=0.0).unsqueeze(-1)
    return (out.float() * weight).to(out.dtype), merge_lse(lse.float(), sink.expand_as(lse))


def sinks_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: Optional[torch.Tensor]
               ) -> Optional[torch.Tensor]:
    """Gradient of ``sinks [h]`` from ``add_sinks``'s ``out [b, h, s, d]`` and ``lse [b, h, s]`` and the
    output's gradient ``dout``: ``-Σ_{b,s} e^{sink - lse}·(dout·out)`` in ``sinks``' dtype (the sink's
    probability times the softmax's row term; its value is zero). None when ``sinks`` is None. Sums only
    the rows given: each rank's rows of a sharded sequence give that rank's share."""
    if sinks is None:
        return None
    sink_prob = torch.exp(sinks.float()[:, None] - lse.float())
    row_dot = (dout.float() * out.float()).sum(-1)
    return -(sink_prob * row_dot).sum((0, 2)).to(sinks.dtype)
