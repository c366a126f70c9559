"""The block kernels on CUDA, torch's and TransformerEngine's, against float64 attention of the same
(rounded) inputs: the output, the LSE convention (natural log, ``[b, hq, sq]`` float32), and gradients
from the rows' final ``out``/``lse`` — for one block, and for two blocks merged by LSE as the ring does.

Tolerances, relative to the reference's largest magnitude: the kernels round the softmax P (for P·V) and
dS (for the gradients) to the input dtype before their matmuls (bf16: 2**-9 relative), while the scores
and the LSE stay float32 — so the LSE is held to an absolute 1e-3 and everything else to a few bf16 steps.
"""
import math

import pytest
import torch

from cptoolkit.layers.block_attention import attention_backward, attention_forward, kernel_backend, use_backend
from cptoolkit.layers.lse_merge import merge_two
from tests.gpu.devices import BACKENDS, GPU

pytestmark = GPU

DEVICE = "cuda"
HEADS = {"MHA": (8, 8), "GQA": (8, 2), "MQA": (8, 1)}  # (query heads, KV heads)
HEAD_DIM = 64
# (sq, sk, causal): a ring's diagonal block, an off-diagonal block of another shape, a decode step.
BLOCKS = {"diagonal": (256, 256, True), "off_diagonal": (96, 160, False), "decode": (1, 200, False)}
TOL = {"out": 1e-2, "lse": 1e-3, "dq": 3e-2, "dk": 3e-2, "dv": 3e-2}


def _inputs(batch, hq, hkv, sq, sk, dtype, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(batch, hq, sq, HEAD_DIM, device=DEVICE, dtype=dtype, generator=gen)
    k, v = (torch.randn(batch, hkv, sk, HEAD_DIM, device=DEVICE, dtype=dtype, generator=gen) for _ in range(2))
    dout = torch.randn(q.shape, device=DEVICE, dtype=dtype, generator=gen)
    return q, k, v, dout


def _reference(q, k, v, dout, causal, scale, key_offset=0):
    """float64 attention with autograd (on the CPU), queries at positions ``key_offset + i`` under a causal
    mask: ``{"out", "lse", "dq", "dk", "dv"}``."""
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2) * scale
    if causal:
        rows, keys = torch.arange(q.shape[2])[:, None] + key_offset, torch.arange(k.shape[2])[None, :]
        scores = scores.masked_fill(keys > rows, float("-inf"))
    out = scores.softmax(-1) @ v.repeat_interleave(groups, 1)
    (out * dout.cpu().double()).sum().backward()
    return {"out": out.detach(), "lse": scores.logsumexp(-1).detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _errors(got: dict, want: dict) -> dict:
    errors = {}
    for name, value in got.items():
        diff = (value.detach().cpu().double() - want[name]).abs()
        errors[name] = float(diff.max()) if name == "lse" else float(diff.max() / want[name].abs().max())
    return errors


def _assert_within(errors: dict, where: str) -> None:
    failed = {name: f"{err:.2e} > {TOL[name]:.0e}" for name, err in errors.items() if not err <= TOL[name]}
    assert not failed, f"{where}: {failed}; all errors {({n: f'{e:.2e}' for n, e in errors.items()})}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_block_matches_float64_attention(backend, heads, block, dtype):
    (hq, hkv), (sq, sk, causal) = HEADS[heads], BLOCKS[block]
    scale = 1 / math.sqrt(HEAD_DIM)
    q, k, v, dout = _inputs(2, hq, hkv, sq, sk, dtype, seed=sq + sk)
    with use_backend(backend):
        assert kernel_backend(q.device) == backend
        out, lse = attention_forward(q, k, v, causal=causal, scale=scale)
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, dtype, (2, hq, sq), torch.float32)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    got = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    _assert_within(_errors(got, _reference(q, k, v, dout, causal, scale)), f"{backend} {heads} {block} {dtype}")


@pytest.mark.parametrize("heads", HEADS)
def test_te_and_torch_report_the_same_lse(heads):
    """The LSE convention itself: TE's converted softmax statistics equal torch's flash LSE row by row."""
    pytest.importorskip("transformer_engine", reason="needs TransformerEngine: transformer_engine is not installed")
    hq, hkv = HEADS[heads]
    q, k, v, _ = _inputs(2, hq, hkv, 128, 128, torch.bfloat16, seed=1)
    lses = {}
    for backend in ("torch", "te"):
        with use_backend(backend):
            lses[backend] = attention_forward(q, k, v, causal=True, scale=0.125)[1]
    diff = (lses["te"] - lses["torch"]).abs()
    assert diff.max() <= 1e-3, f"te vs torch LSE: max {diff.max():.2e}, mean {diff.mean():.2e}"


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_merged_by_lse_give_the_whole_rows_gradients(backend, heads):
    """Queries ``c..2c-1`` of a ``2c`` sequence: a full block over keys ``0..c-1`` and a causal diagonal block
    over ``c..2c-1`` (a ring step's shapes), merged by ``merge_two``; each block's backward from the merged
    out/lse sums to the gradients of the rows' whole causal attention."""
    (hq, hkv), chunk, dtype = HEADS[heads], 128, torch.bfloat16
    scale = 1 / math.sqrt(HEAD_DIM)
    q, k, v, dout = _inputs(2, hq, hkv, chunk, 2 * chunk, dtype, seed=7)
    blocks = ((slice(0, chunk), False), (slice(chunk, None), True))
    with use_backend(backend):
        parts = [attention_forward(q, k[:, :, keys], v[:, :, keys], causal=causal, scale=scale)
                 for keys, causal in blocks]
        out, lse = merge_two(parts[0][0].float(), parts[0][1], parts[1][0], parts[1][1])
        out = out.to(dtype)
        dq, dk, dv = (torch.zeros(t.shape, device=DEVICE) for t in (q, k, v))
        for keys, causal in blocks:
            block_dq, block_dk, block_dv = attention_backward(dout, q, k[:, :, keys], v[:, :, keys], out, lse,
                                                              causal=causal, scale=scale)
            dq += block_dq
            dk[:, :, keys] += block_dk
            dv[:, :, keys] += block_dv
    got = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    want = _reference(q, k, v, dout, causal=True, scale=scale, key_offset=chunk)
    _assert_within(_errors(got, want), f"{backend} {heads} merged blocks")
