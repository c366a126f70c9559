"""One attention block through TransformerEngine's fused attention (cuDNN), forward and backward.

``block_attention`` calls these when the backend is ``te`` (or ``auto`` on CUDA with TransformerEngine
installed), so the ring, all-gather, a2a, decode and context-attention paths all run their blocks here.
Same contract as the torch kernels: ``q [b, hq, sq, d]``, ``k``/``v [b, hkv, sk, d]`` (GQA/MQA read
natively, K/V never repeated), ``causal`` = top-left causal (square diagonal blocks) else no mask, the LSE
``[b, hq, sq]`` float32 in natural log; the backward takes the rows' final (merged) ``out``/``lse``, as
TransformerEngine's own ring does. float16/bfloat16 CUDA tensors only.

Blocks go to TE as ``bshd`` (one transposed copy of each input per call; TE's ``bhsd`` layout, which would
need none, is newer than the TE megatron-core 0.16.1 is tested with). THD is not used: every block here is
dense.

Written against ``transformer_engine/pytorch/cpp_extensions/fused_attn.py`` (``fused_attn_fwd``,
``fused_attn_bwd``), whose keyword arguments come in two generations, told apart by signature:

- v2.9 to v2.14 (megatron-core 0.16.1's ``dev`` extra pins ``transformer-engine >=2.9,<2.12``; read at
  v2.11, commit c188b533): the backward takes ``dqkv_dtype``; O and dQ/dK/dV follow ``qkv_layout``.
- v2.15 on (read at v2.18, commit 27486e03, and main at d0067d0d, 2.20.0.dev0): no ``dqkv_dtype``;
  ``o_format``, ``do_format`` and ``dqkv_layout`` default to ``sbhd``, so they are given.

Every argument is passed by keyword (the positional order differs between the two). The softmax
statistics come only from a forward in training mode (``is_training=False`` returns no auxiliary
tensors), so every forward here asks for them; with dropout 0 nothing else changes.
Never run: no GPU was available to this project; ``tests/gpu`` checks it against torch's kernels.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

QKV_LAYOUT, QKV_FORMAT = "bshd_bshd_bshd", "bshd"
TE_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _FusedAttention:
    """TE's entry points and the keyword arguments that name the bshd layouts in its generation."""

    forward: Callable
    backward: Callable
    backend: Any  # FusedAttnBackend["F16_arbitrary_seqlen"]: cuDNN's fp16/bf16 kernels, as TE's own ring uses
    forward_layout: dict
    backward_layout: Callable[[torch.dtype], dict]


@functools.cache
def _fused_attention() -> _FusedAttention:
    """Imports TransformerEngine (first call only); ImportError if it is absent or of neither generation."""
    from transformer_engine.pytorch.cpp_extensions.fused_attn import (FusedAttnBackend, fused_attn_bwd,
                                                                      fused_attn_fwd)
    backend = FusedAttnBackend["F16_arbitrary_seqlen"]
    backward_params = inspect.signature(fused_attn_bwd).parameters
    if "dqkv_layout" in backward_params:
        return _FusedAttention(fused_attn_fwd, fused_attn_bwd, backend, {"o_format": QKV_FORMAT},
                               lambda dtype: {"o_format": QKV_FORMAT, "do_format": QKV_FORMAT,
                                              "dqkv_layout": QKV_LAYOUT})
    if "dqkv_dtype" in backward_params:
        from transformer_engine.pytorch.constants import TE_DType
        return _FusedAttention(fused_attn_fwd, fused_attn_bwd, backend, {},
                               lambda dtype: {"dqkv_dtype": TE_DType[dtype]})
    import transformer_engine
    raise ImportError(f"transformer_engine {transformer_engine.__version__}: its fused_attn_bwd takes neither "
                      "dqkv_layout (TE >= 2.15) nor dqkv_dtype (TE 2.9-2.14); cptoolkit's te backend knows "
                      "only those two signatures")


@functools.cache
def available() -> bool:
    """Whether TransformerEngine's fused attention imports here (``auto`` then picks it for CUDA tensors)."""
    try:
        _fused_attention()
    except ImportError:
        return False
    return True


def lse_from_te_stats(stats: torch.Tensor) -> torch.Tensor:
    """TE's softmax statistics as cptoolkit's LSE: ``[b, h, sq, 1]`` float32 -> ``[b, h, sq]`` float32.

    ``fused_attn_fwd`` (F16_arbitrary_seqlen backend, bshd/sbhd layouts; read at TE v2.11 and v2.18)
    returns ``aux_ctx_tensors[0]``, per query row ``m + log(sum_j exp(x_j - m))`` with ``x = scale·q·kᵀ``
    and ``m = max_j x_j``: the natural-log log-sum-exp of the scaled scores, cptoolkit's convention. TE's
    docstring abbreviates it as ``log(sum(e^(x - max(x))))``, but its own code treats it as the whole LSE:
    with ``return_max_logit`` v2.11 rebuilds the statistic as ``Max + log(Sum_Exp)``, and its ring
    (``context_parallel.py``) merges it with flash-attention's natural-log LSE by ``exp``/``log1p`` after
    squeezing the trailing 1. So no base or offset changes, only that unit dimension (TE's packed THD
    statistics, ``[t, h, 1]``, are never produced here).
    """
    if stats.dim() != 4 or stats.shape[-1] != 1 or stats.dtype != torch.float32:
        raise ValueError(f"TE softmax statistics must be [b, h, sq, 1] float32 (bshd/sbhd layouts); "
                         f"got {tuple(stats.shape)} {stats.dtype}")
    return stats.squeeze(-1)


def te_stats_from_lse(lse: torch.Tensor) -> torch.Tensor:
    """The inverse of ``lse_from_te_stats`` for ``fused_attn_bwd``: ``[b, h, sq]`` (any strides, e.g. the
    ring's row slice) -> a dense ``[b, h, sq, 1]`` float32, the array cuDNN indexes."""
    return lse.float().contiguous().unsqueeze(-1)


def _check(*tensors: torch.Tensor) -> None:
    first = tensors[0]
    if first.device.type != "cuda" or first.dtype not in TE_DTYPES or any(
            t.dtype != first.dtype or t.device != first.device for t in tensors):
        got = ", ".join(f"{t.device} {t.dtype}" for t in tensors)
        raise ValueError(f"attention backend 'te' got tensors on {got}; rule: TransformerEngine's fused "
                         "attention takes CUDA float16/bfloat16 tensors of one dtype (runtime.dtype: bfloat16 "
                         "on a CUDA device, or runtime.attention_backend: torch)")


def _swap_seq_heads(x: torch.Tensor) -> torch.Tensor:
    """``[b, h, s, d]`` <-> ``[b, s, h, d]``, dense (TE reads a bshd tensor by its layout, not its strides)."""
    return x.transpose(1, 2).contiguous()


def _cu_seqlens(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Offsets of a dense block's sequences, every one full: ``0, s, 2s, ..., b·s`` (int32)."""
    return torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)


def _shape_args(q: torch.Tensor, k: torch.Tensor, causal: bool) -> dict:
    batch, seq_q, seq_k = q.shape[0], q.shape[2], k.shape[2]
    return dict(max_seqlen_q=seq_q, max_seqlen_kv=seq_k, cu_seqlens_q=_cu_seqlens(batch, seq_q, q.device),
                cu_seqlens_kv=_cu_seqlens(batch, seq_k, q.device), qkv_layout=QKV_LAYOUT,
                attn_bias_type="no_bias", attn_mask_type="causal" if causal else "no_mask")


def te_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_attention.attention_forward`` on TE: ``(out [b, hq, sq, d] in q's dtype, lse [b, hq, sq]
    float32)``."""
    _check(q, k, v)
    te = _fused_attention()
    q_, k_, v_ = (_swap_seq_heads(t) for t in (q, k, v))
    out, aux_ctx_tensors = te.forward(
        is_training=True, q=q_, k=k_, v=v_, fake_dtype=q.dtype, fused_attention_backend=te.backend,
        attn_scale=scale, dropout=0.0, **_shape_args(q, k, causal), **te.forward_layout)
    return _swap_seq_heads(out), lse_from_te_stats(aux_ctx_tensors[0])


def te_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, *, causal: bool, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``block_attention.attention_backward`` on TE: ``(dq, dk, dv)`` shaped like ``q, k, v``, from the
    rows' final ``out [b, hq, sq, d]`` and ``lse [b, hq, sq]``."""
    _check(q, k, v, out, dout)
    te = _fused_attention()
    # The pack ends with the forward's philox [seed, offset]; with dropout 0 no kernel reads it.
    rng_state = torch.zeros(2, dtype=torch.int64, device=q.device)
    q_, k_, v_, out_, dout_ = (_swap_seq_heads(t) for t in (q, k, v, out, dout))
    dq, dk, dv, *_ = te.backward(
        q=q_, k=k_, v=v_, o=out_, d_o=dout_, fake_dtype=q.dtype,
        aux_ctx_tensors=[te_stats_from_lse(lse), rng_state], fused_attention_backend=te.backend,
        attn_scale=scale, dropout=0.0, **_shape_args(q, k, causal), **te.backward_layout(q.dtype))
    return _swap_seq_heads(dq), _swap_seq_heads(dk), _swap_seq_heads(dv)
