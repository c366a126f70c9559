"""Per-block attention kernels that return the log-sum-exp, forward and backward.

Every context-parallel algorithm in ``cptoolkit.layers`` calls exactly these two functions for its
block computations, so a backend is swapped in one place.

Layout is ``[b, h, s, d]``. ``q`` has ``hq`` heads, ``k``/``v`` have ``hkv`` heads with
``hq % hkv == 0`` (GQA/MQA: query head ``i`` reads KV head ``i // (hq // hkv)``); K/V are never
physically repeated on CPU. ``causal=True`` masks top-left aligned (query ``i`` sees keys ``0..i``),
used only for square diagonal blocks. ``lse`` is ``[b, hq, sq]`` float32.

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
from typing import Iterator

import torch

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
                       out: torch.Tensor, lse: torch.Tensor, *, causal: bool, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *final* ``out``/``lse`` of the rows (ring backward).

    Passing the merged output and LSE rather than the block's own makes the per-block gradients
    sum exactly to the gradient of the full attention. Returns ``(dq, dk, dv)`` shaped like
    ``q, k, v``. ``lse`` may be a strided view (the ring backward passes ``lse[:, :, rows]``).
    """
    _check(q, k, v)
    if kernel_backend(q.device) == "te":
        from cptoolkit.layers.te_backend import te_attention_backward
        return te_attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
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
