"""Per-block attention kernels that return the log-sum-exp, forward and backward.

Every context-parallel algorithm in ``cptoolkit.layers`` calls exactly these two functions for its
block computations, so a backend is swapped in one place.

Layout is ``[b, h, s, d]``. ``q`` has ``hq`` heads, ``k``/``v`` have ``hkv`` heads with
``hq % hkv == 0`` (GQA/MQA: query head ``i`` reads KV head ``i // (hq // hkv)``); K/V are never
physically repeated on CPU. ``causal=True`` masks top-left aligned (query ``i`` sees keys ``0..i``),
used only for square diagonal blocks. ``lse`` is ``[b, hq, sq]`` float32.

Backends, chosen by the tensors' device:
- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward`` (torch's own kernels).
- CUDA: torch's CUDA flash-attention kernel (``aten._scaled_dot_product_flash_attention``), with
  K/V heads expanded for GQA and their gradients summed back. That kernel takes float16/bfloat16
  only (use ``runtime.dtype: bfloat16`` on a GPU). Never run yet: no GPU was available to this
  project, and CI has none.
"""
from __future__ import annotations

import torch


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"block attention expects q [b,hq,sq,d] and k, v [b,hkv,sk,d] of equal shape; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"block attention: batch and head_dim must match and hq must be a multiple of hkv; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one block: returns ``(out [b,hq,sq,d], lse [b,hq,sq] float32)``."""
    _check(q, k, v)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
        return out, lse.float()
    groups = q.shape[1] // k.shape[1]
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), 0.0, causal, scale=scale)
    return out, lse.float()


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, *, causal: bool, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *final* ``out``/``lse`` of the rows (ring backward).

    Passing the merged output and LSE rather than the block's own makes the per-block gradients
    sum exactly to the gradient of the full attention. Returns ``(dq, dk, dv)`` shaped like
    ``q, k, v``. ``lse`` may be a strided view (the ring backward passes ``lse[:, :, rows]``).
    """
    _check(q, k, v)
    # The CUDA flash backward indexes lse as a dense [b, hq, sq] array; a row slice of one is not.
    lse = lse.contiguous()
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    groups = q.shape[1] // k.shape[1]
    b, hkv, sk, d = k.shape
    k_full, v_full = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    cum = torch.empty(0, dtype=torch.int32, device=q.device)
    seed = torch.empty(0, dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k_full, v_full, out, lse, cum, cum, q.shape[2], sk, 0.0, causal, seed, seed,
        scale=scale)
    return dq, dk.view(b, hkv, groups, sk, d).sum(2), dv.view(b, hkv, groups, sk, d).sum(2)
