"""Triton kernels for the LSE merge, with the semantics of ``cptoolkit.layers.lse_merge``.

``merge_many_triton`` combines ``n`` partials (DCP decode and context attention: one per KV shard) in
one pass per row. An empty partial (``lse = -inf``) is the identity; rows where every partial is empty
give ``lse = -inf`` and ``out = 0`` — never NaN.

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
