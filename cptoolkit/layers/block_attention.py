"""Per-block attention kernels that return the log-sum-exp, forward and backward.

Every context-parallel algorithm in ``cptoolkit.layers`` calls exactly these two functions for its
block computations, so a backend is swapped in one place.

Layout is ``[b, h, s, d]``. ``q`` has ``hq`` heads, ``k``/``v`` have ``hkv`` heads with
``hq % hkv == 0`` (GQA/MQA: query head ``i`` reads KV head ``i // (hq // hkv)``); K/V are never
physically repeated on CPU. ``lse`` is ``[b, hq, sq]`` float32.

Which pairs a block computes: query row ``i`` sits ``offset + i - j`` positions after key column ``j``
(``offset`` 0: a diagonal block, top-left aligned). ``causal=True`` keeps the pairs with that distance
``>= 0``; ``window`` (a sliding window, transformers' ``sliding_window``) keeps those with distance
``< window``. ``softcap`` (Gemma 2's ``attn_logit_softcapping``) replaces every score ``s`` by
``softcap * tanh(s / softcap)`` before the softmax. ``block_coverage`` says, from those numbers alone,
whether a block sees all, some or none of its pairs: callers skip the ``none`` blocks, and the unmasked
``all``/causal-diagonal blocks run the fused kernels below. A block that needs a banded mask runs torch's
CPU flash kernel with an additive mask; softcapped blocks, and masked ones on CUDA, run ``_math_forward``
(plain matmul-softmax in float32, forward and backward written out).

Backends (``runtime.attention_backend``), one process-wide choice set once by whoever builds the model
(``set_backend``; ``use_backend`` for a scope, e.g. a test), read here on every call:
- ``torch`` on CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``.
- ``torch`` on CUDA: torch's CUDA flash-attention kernel (``aten._scaled_dot_product_flash_attention``),
  with K/V heads expanded for GQA and their gradients summed back. float16/bfloat16 only.
- ``te``: TransformerEngine's fused attention (``cptoolkit.layers.te_backend``), CUDA, float16/bfloat16.
- ``auto`` (the default): ``te`` for CUDA tensors when ``transformer_engine`` imports, else ``torch``.
TransformerEngine is imported only when ``te`` runs (or ``auto`` first sees a CUDA tensor); importing
this module never imports it. The CUDA paths have never run: no GPU was available to this project.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from cptoolkit.layers.lse_merge import merge_two

ATTENTION_BACKENDS = ("auto", "torch", "te")
_backend = "auto"


def set_backend(name: str) -> None:
    """Select the block kernels' backend for this process (``runtime.attention_backend``)."""
    global _backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} must be one of {ATTENTION_BACKENDS}")
    _backend = name


def current_backend() -> str:
    """The backend ``set_backend`` selected (``auto`` until someone sets one)."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``name`` for the duration of the block, the previous backend again afterwards."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def kernel_backend(device: torch.device) -> str:
    """The backend that computes a block on ``device``: ``"torch"`` or ``"te"``."""
    if _backend != "auto":
        return _backend
    if device.type != "cuda":
        return "torch"
    from cptoolkit.layers import te_backend
    return "te" if te_backend.available() else "torch"


def check_sinks(sinks: Optional[torch.Tensor], num_q_heads: int, backend: str) -> None:
    """Attention sinks (``lse_merge.add_sinks``), when given, must be one logit per query head of the caller's,
    ``[num_q_heads]``, and ``backend`` (``kernel_backend`` of the query's device, or the configured one) must
    not be ``te``."""
    if sinks is None:
        return
    if backend == "te":
        raise ValueError("attention backend 'te' (TransformerEngine) does not support attention sinks; rule: "
                         "sinks run with the torch kernels only; set runtime.attention_backend to torch")
    if tuple(sinks.shape) != (num_q_heads,):
        raise ValueError(f"sinks of shape {tuple(sinks.shape)} must be [{num_q_heads}]: one learned logit per "
                         f"query head this rank attends (num_attention_heads / TP), or None for no sinks")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"block attention expects q [b,hq,sq,d] and k, v [b,hkv,sk,d] of equal shape; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"block attention: batch and head_dim must match and hq must be a multiple of hkv; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")


def block_coverage(num_queries: int, num_keys: int, *, offset: int = 0, causal: bool,
                   window: Optional[int] = None) -> str:
    """``"all"``, ``"some"`` or ``"none"``: how many of a ``num_queries x num_keys`` block's pairs are visible
    (distances ``offset + i - j``, see the module docstring)."""
    nearest, farthest = offset - (num_keys - 1), offset + num_queries - 1  # smallest and largest distance
    if (causal and farthest < 0) or (window is not None and nearest >= window):
        return "none"
    if (causal and nearest < 0) or (window is not None and farthest >= window):
        return "some"
    return "all"


def _visible(num_queries: int, num_keys: int, offset: int, causal: bool, window: Optional[int],
             device: torch.device) -> torch.Tensor:
    """``[sq, sk]`` bool: the visible pairs of a block."""
    distance = (offset + torch.arange(num_queries, device=device)[:, None]
                - torch.arange(num_keys, device=device)[None, :])
    seen = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
    return seen & (distance < window) if window is not None else seen


def _fused_kind(coverage: str, offset: int, causal: bool, window: Optional[int], softcap: Optional[float],
                sq: int, sk: int) -> Optional[bool]:
    """``is_causal`` for the fused kernels when one of them computes the block exactly, else None (masked)."""
    if softcap is not None:
        return None
    if coverage == "all":
        return False
    diagonal_only = causal and offset == 0 and (window is None or sq - 1 < window)
    return True if diagonal_only else None


def _band_tiles(sq: int, sk: int, offset: int, window: int) -> list[tuple[slice, slice, int]]:
    """A causal windowed block too wide for one masked kernel call, as ``(rows, keys, offset)`` tiles: each
    ``window`` query rows against the keys before their first row's position (a masked tile) and against the
    keys from it on (a causal diagonal tile, the fused kernel's), only where they see some key (row ``r`` sees
    keys ``(r + offset - window, r + offset]``)."""
    tiles = []
    for start in range(0, sq, window):
        end = min(start + window, sq)
        first, diagonal, last = start + offset - window + 1, start + offset, end + offset
        for k_start, k_end in ((max(0, first), min(sk, diagonal)), (max(0, diagonal), min(sk, last))):
            if k_end > k_start:
                tiles.append((slice(start, end), slice(k_start, k_end), start + offset - k_start))
    return tiles


def _is_banded(sq: int, sk: int, causal: bool, window: Optional[int]) -> bool:
    """Whether a windowed block is computed tile by tile (``_band_tiles``): its mask would mostly hide keys."""
    return causal and window is not None and min(sq, sk) >= 2 * window


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                      offset: int = 0, window: Optional[int] = None, softcap: Optional[float] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one block: returns ``(out [b,hq,sq,d], lse [b,hq,sq] float32)``; a row that sees
    no key gets ``out = 0``, ``lse = -inf``. A causal window much narrower than the block is computed band
    tile by band tile (the keys each ``window`` rows can see), never as one mostly-masked ``sq x sk`` call."""
    _check(q, k, v)
    sq, sk = q.shape[2], k.shape[2]
    coverage = block_coverage(sq, sk, offset=offset, causal=causal, window=window)
    if coverage == "none":
        return torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), device=q.device)
    if coverage == "some" and _is_banded(sq, sk, causal, window):
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        for rows, keys, tile_offset in _band_tiles(sq, sk, offset, window):
            tile_out, tile_lse = attention_forward(q[:, :, rows], k[:, :, keys], v[:, :, keys], causal=True,
                                                   scale=scale, offset=tile_offset, window=window, softcap=softcap)
            out[:, :, rows], lse[:, :, rows] = merge_two(out[:, :, rows], lse[:, :, rows], tile_out, tile_lse)
        return out.to(q.dtype), lse
    is_causal = _fused_kind(coverage, offset, causal, window, softcap, sq, sk)
    if is_causal is None:
        seen = _visible(sq, sk, offset, causal, window, q.device)
        if softcap is None and q.device.type == "cpu":
            return _masked_cpu_forward(q, k, v, seen, scale)
        return _math_forward(q, k, v, seen, scale, softcap)
    causal = is_causal
    if kernel_backend(q.device) == "te":
        from cptoolkit.layers.te_backend import te_attention_forward
        return te_attention_forward(q, k, v, causal=causal, scale=scale)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
        return out, lse.float()
    groups = q.shape[1] // k.shape[1]
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), 0.0, causal, scale=scale)
    return out, lse.float()


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, *, causal: bool, scale: float, offset: int = 0,
                       window: Optional[int] = None, softcap: Optional[float] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *final* ``out``/``lse`` of the rows (ring backward).

    Passing the merged output and LSE rather than the block's own makes the per-block gradients
    sum exactly to the gradient of the full attention. Returns ``(dq, dk, dv)`` shaped like
    ``q, k, v``. ``lse`` may be a strided view (the ring backward passes ``lse[:, :, rows]``).
    ``offset``, ``window`` and ``softcap`` must be the forward's.
    """
    _check(q, k, v)
    sq, sk = q.shape[2], k.shape[2]
    coverage = block_coverage(sq, sk, offset=offset, causal=causal, window=window)
    if coverage == "none":
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if coverage == "some" and _is_banded(sq, sk, causal, window):  # attention_forward's tiles
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for rows, keys, tile_offset in _band_tiles(sq, sk, offset, window):
            dq_tile, dk_tile, dv_tile = attention_backward(
                dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows], lse[:, :, rows],
                causal=True, scale=scale, offset=tile_offset, window=window, softcap=softcap)
            dq[:, :, rows] += dq_tile
            dk[:, :, keys] += dk_tile
            dv[:, :, keys] += dv_tile
        return dq, dk, dv
    is_causal = _fused_kind(coverage, offset, causal, window, softcap, sq, sk)
    if is_causal is None:
        seen = _visible(sq, sk, offset, causal, window, q.device)
        if softcap is None and q.device.type == "cpu":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k, v, out, lse.to(q.dtype).contiguous(), 0.0, False, attn_mask=_additive(seen, q.dtype),
                scale=scale)
        return _math_backward(dout, q, k, v, out, lse, seen, scale, softcap)
    causal = is_causal
    if kernel_backend(q.device) == "te":
        from cptoolkit.layers.te_backend import te_attention_backward
        return te_attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
    # The CUDA flash backward indexes lse as a dense [b, hq, sq] array; a row slice of one is not.
    lse = lse.contiguous()
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.to(q.dtype), 0.0, causal, scale=scale)
    groups = q.shape[1] // k.shape[1]
    b, hkv, sk, d = k.shape
    k_full, v_full = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    cum = torch.empty(0, dtype=torch.int32, device=q.device)
    seed = torch.empty(0, dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k_full, v_full, out, lse, cum, cum, q.shape[2], sk, 0.0, causal, seed, seed,
        scale=scale)
    return dq, dk.view(b, hkv, groups, sk, d).sum(2), dv.view(b, hkv, groups, sk, d).sum(2)


def _additive(seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A visibility mask as the additive float mask torch's CPU flash kernel takes (0 or -inf)."""
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(~seen, float("-inf"))


def _masked_cpu_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU flash kernel with a mask ``seen`` (``[sq, sk]`` or ``[b, 1, sq, sk]``). It reports ``lse = 0``
    (not ``-inf``) for a row that sees no key, which would give that row weight in a merge, so such rows are set
    to ``-inf`` here (its ``out`` is 0)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=_additive(seen, q.dtype), scale=scale)
    return out, lse.float().masked_fill(~seen.any(-1), float("-inf"))


def masked_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with a per-request mask ``seen [b, 1, sq, sk]`` bool (True: the pair is visible): one
    kernel call for the whole batch, whatever each row sees, and no host round-trip. Returns ``(out [b,hq,sq,d],
    lse [b,hq,sq] float32)``; a row that sees no key gets ``out = 0``, ``lse = -inf``. CPU: torch's flash kernel
    with an additive mask; elsewhere ``_math_forward``."""
    _check(q, k, v)
    if q.device.type == "cpu":
        return _masked_cpu_forward(q, k, v, seen, scale)
    return _math_forward(q, k, v, seen.unsqueeze(1), scale, None)


def _grouped(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """``q [b, hq, sq, d]`` as ``[b, hkv, hq/hkv, sq, d]`` in the math kernels' dtype (at least float32)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    return q.to(dtype).unflatten(1, (k.shape[1], -1)), dtype


def _capped_scores(q_grouped: torch.Tensor, k: torch.Tensor, seen: torch.Tensor, scale: float,
                   softcap: Optional[float]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Masked scores ``[b, hkv, g, sq, sk]`` and, with ``softcap``, ``tanh(s / softcap)`` for the backward."""
    scores = torch.einsum("bkgqd,bksd->bkgqs", q_grouped, k.to(q_grouped.dtype)) * scale
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(scores / softcap)
        scores = tanh * softcap
    return scores.masked_fill(~seen, float("-inf")), tanh


def _math_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, scale: float,
                  softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One block as plain matmul-softmax: any mask ``seen [sq, sk]``, optional softcap; K/V not repeated."""
    q_grouped, dtype = _grouped(q, k)
    scores, _ = _capped_scores(q_grouped, k, seen, scale, softcap)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)), nan=0.0)
    out = torch.einsum("bkgqs,bksd->bkgqd", weights, v.to(dtype))
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2).float()


def _math_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, seen: torch.Tensor, scale: float, softcap: Optional[float]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``_math_forward`` from the rows' final ``out``/``lse``: with ``p = exp(s - lse)``,
    ``dv = p^T dout``, ``ds = p * (dout v^T - rowsum(dout * out))``, times ``1 - tanh^2`` under a softcap."""
    q_grouped, dtype = _grouped(q, k)
    scores, tanh = _capped_scores(q_grouped, k, seen, scale, softcap)
    lse_grouped = lse.to(dtype).unflatten(1, (k.shape[1], -1)).unsqueeze(-1)
    weights = torch.nan_to_num(torch.exp(scores - lse_grouped), nan=0.0)
    dout_grouped = dout.to(dtype).unflatten(1, (k.shape[1], -1))
    row_dot = (dout_grouped * out.to(dtype).unflatten(1, (k.shape[1], -1))).sum(-1, keepdim=True)
    dscores = weights * (torch.einsum("bkgqd,bksd->bkgqs", dout_grouped, v.to(dtype)) - row_dot)
    if tanh is not None:
        dscores = dscores * (1 - tanh * tanh)
    dq = torch.einsum("bkgqs,bksd->bkgqd", dscores, k.to(dtype)) * scale
    dk = torch.einsum("bkgqs,bkgqd->bksd", dscores, q_grouped) * scale
    dv = torch.einsum("bkgqs,bkgqd->bksd", weights, dout_grouped)
    return dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
