"""Triton kernels for the LSE merge, with the semantics of ``cptoolkit.layers.lse_merge``.

``merge_many_triton`` combines ``n`` partials (DCP decode: one per KV shard) in one pass per row;
``merge_two_triton`` is ``merge_two``'s output correction ``out_a - sigmoid(lse_b - lse_a)·(out_a - out_b)``
(ring prefill). An empty partial (``lse = -inf``) is the identity; rows where every partial is empty
give ``lse = -inf`` and, for ``merge_many``, ``out = 0`` — never NaN.

This module imports triton, an optional dependency: ``dcp_decode`` imports it only for CUDA tensors.
On CPU the same kernels run under ``TRITON_INTERPRET=1`` (set before triton is imported), which is how
the tests check them. One program handles one row (one query position of one head): the ``n``
partials x ``head_dim`` tile of a row is small.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_many_kernel(outs_ptr, lses_ptr, out_ptr, lse_ptr, num_parts, num_rows, head_dim,
                       BLOCK_PARTS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    parts = tl.arange(0, BLOCK_PARTS)
    dims = tl.arange(0, BLOCK_D)
    part_mask = parts < num_parts
    dim_mask = dims < head_dim
    lses = tl.load(lses_ptr + parts * num_rows + row, mask=part_mask, other=float("-inf"))
    lse_max = tl.max(lses, axis=0)
    # All parts empty: exp(-inf - -inf) would be NaN; shifting by 0 gives weights 0 instead.
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp(lses - shift)
    total = tl.sum(weights, axis=0)
    lse = tl.where(total > 0, shift + tl.log(total), float("-inf"))
    weights = weights / tl.where(total > 0, total, 1.0)
    tile_offsets = (parts[:, None] * num_rows + row) * head_dim + dims[None, :]
    tile = tl.load(outs_ptr + tile_offsets, mask=part_mask[:, None] & dim_mask[None, :], other=0.0)
    out = tl.sum(weights[:, None] * tile.to(tl.float32), axis=0)
    tl.store(out_ptr + row * head_dim + dims, out.to(out_ptr.dtype.element_ty), mask=dim_mask)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _merge_two_kernel(out_a_ptr, lse_a_ptr, out_b_ptr, lse_b_ptr, out_ptr, lse_ptr, head_dim,
                      BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    lse_a = tl.load(lse_a_ptr + row)
    lse_b = tl.load(lse_b_ptr + row)
    lse_diff = lse_b - lse_a
    # Both parts empty gives NaN; weight 0 keeps out_a, itself a zero-weight partial.
    lse_diff = tl.where(lse_diff != lse_diff, float("-inf"), lse_diff)
    weight_b = tl.sigmoid(lse_diff)
    out_a = tl.load(out_a_ptr + row * head_dim + dims, mask=dim_mask, other=0.0).to(tl.float32)
    out_b = tl.load(out_b_ptr + row * head_dim + dims, mask=dim_mask, other=0.0).to(tl.float32)
    out = out_a - weight_b * (out_a - out_b)
    tl.store(out_ptr + row * head_dim + dims, out.to(out_ptr.dtype.element_ty), mask=dim_mask)
    lse_hi = tl.maximum(lse_a, lse_b)
    lse_lo = tl.minimum(lse_a, lse_b)
    hi_finite = tl.where(lse_hi == float("-inf"), 0.0, lse_hi)
    lse = tl.where(lse_hi == float("-inf"), lse_hi, lse_hi + tl.log(1.0 + tl.exp(lse_lo - hi_finite)))
    tl.store(lse_ptr + row, lse)


def _check(out: torch.Tensor, lse: torch.Tensor) -> None:
    if out.dim() < 2 or out.shape[:-1] != lse.shape:
        raise ValueError(f"expected out [..., d] and lse [...] with matching leading dims; "
                         f"got out {tuple(out.shape)}, lse {tuple(lse.shape)}")


def merge_many_triton(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lse_merge.merge_many`` as one kernel: ``outs [n, b, h, s, d]``, ``lses [n, b, h, s]`` ->
    ``(out [b, h, s, d] in outs' dtype, lse [b, h, s] float32)``."""
    _check(outs, lses)
    outs, lses = outs.contiguous(), lses.float().contiguous()
    num_parts, head_dim = outs.shape[0], outs.shape[-1]
    num_rows = lses[0].numel()
    out = torch.empty(outs.shape[1:], dtype=outs.dtype, device=outs.device)
    lse = torch.empty(lses.shape[1:], dtype=torch.float32, device=lses.device)
    _merge_many_kernel[(num_rows,)](outs, lses, out, lse, num_parts, num_rows, head_dim,
                                    BLOCK_PARTS=triton.next_power_of_2(num_parts),
                                    BLOCK_D=triton.next_power_of_2(head_dim))
    return out, lse


def merge_two_triton(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``lse_merge.merge_two`` as one kernel: ``out [b, h, s, d]``, ``lse [b, h, s]`` per part ->
    ``(out in out_a's dtype, lse float32)``."""
    _check(out_a, lse_a)
    if out_b.shape != out_a.shape or lse_b.shape != lse_a.shape:
        raise ValueError(f"both parts must have equal shapes; got out {tuple(out_a.shape)} vs {tuple(out_b.shape)}, "
                         f"lse {tuple(lse_a.shape)} vs {tuple(lse_b.shape)}")
    out_a, out_b = out_a.contiguous(), out_b.contiguous()
    lse_a, lse_b = lse_a.float().contiguous(), lse_b.float().contiguous()
    out, lse = torch.empty_like(out_a), torch.empty_like(lse_a)
    head_dim = out_a.shape[-1]
    _merge_two_kernel[(lse_a.numel(),)](out_a, lse_a, out_b, lse_b, out, lse, head_dim,
                                        BLOCK_D=triton.next_power_of_2(head_dim))
    return out, lse
