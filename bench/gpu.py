"""GPU kernels, only where CUDA is available: the block kernels per backend and the Triton LSE merge.

Without CUDA it prints "no GPU" and writes nothing: no figure in ``bench/results`` comes from a GPU
unless this script ran on one. With CUDA (one device is enough) it measures, with CUDA events, for every
block-kernel backend that runs here (``torch``, and ``te`` where TransformerEngine imports):

- prefill: one causal block (``attention_forward``, and forward + ``attention_backward``) of a Llama-like
  layer's heads (32 query, 8 KV, head_dim 128, batch 1, bfloat16) at the prefill lengths, as achieved
  TFLOP/s (causal forward ``2 * 2 * hq * S^2 * d / 2`` FLOPs; the backward counted as 2.5 forwards, as
  FlashAttention counts it);
- decode: one new token per sequence over a cached context (batch 8, same heads, no mask), as the K/V
  bytes read per second;
- ``merge_many_triton`` vs ``merge_many`` (torch) for DCP decode partials ``[dcp, b, h, 1, d]``,
  checking that both agree.

    python bench/gpu.py [--quick]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/gpu.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import add_results_dir_argument, format_table, machine_info, summarize, write_json
from cptoolkit.layers import te_backend
from cptoolkit.layers.block_attention import attention_backward, attention_forward, use_backend
from cptoolkit.layers.lse_merge import merge_many

FULL_SEQ_LENS, QUICK_SEQ_LENS = (4096, 8192, 16384, 32768), (4096, 16384)
FULL_CONTEXTS, QUICK_CONTEXTS = (4096, 16384, 65536, 131072), (4096, 65536)
HEADS, HEAD_DIM, DECODE_BATCH = (32, 8), 128, 8  # (query, KV) heads
MERGE_SHAPES = ((2, 64, 8), (4, 64, 8), (8, 256, 32))  # (dcp partials, batch, heads), head_dim 64


def _cuda_times_s(fn, reps: int) -> list[float]:
    fn()  # warm-up (kernel compilation, allocator)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def backends() -> list[str]:
    """The block-kernel backends that run on this machine."""
    return ["torch", "te"] if te_backend.available() else ["torch"]


def _randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def prefill_rows(backend: str, seq_lens, reps: int) -> list[dict]:
    (hq, hkv), scale = HEADS, 1 / math.sqrt(HEAD_DIM)
    rows = []
    for seq_len in seq_lens:
        q, dout = _randn(1, hq, seq_len, HEAD_DIM), _randn(1, hq, seq_len, HEAD_DIM)
        k, v = _randn(1, hkv, seq_len, HEAD_DIM), _randn(1, hkv, seq_len, HEAD_DIM)

        def forward():
            return attention_forward(q, k, v, causal=True, scale=scale)

        def forward_backward():
            out, lse = forward()
            attention_backward(dout, q, k, v, out, lse, causal=True, scale=scale)

        with use_backend(backend):
            fwd, fwd_bwd = summarize(_cuda_times_s(forward, reps)), summarize(_cuda_times_s(forward_backward, reps))
        flops = 2 * 2 * hq * seq_len * seq_len * HEAD_DIM / 2
        rows.append({"backend": backend, "seq_len": seq_len, "fwd_median_s": fwd["median_s"],
                     "fwd_tflops": flops / fwd["median_s"] / 1e12, "fwd_bwd_median_s": fwd_bwd["median_s"],
                     "fwd_bwd_tflops": 3.5 * flops / fwd_bwd["median_s"] / 1e12})
    return rows


def decode_rows(backend: str, contexts, reps: int) -> list[dict]:
    (hq, hkv), scale = HEADS, 1 / math.sqrt(HEAD_DIM)
    rows = []
    for context in contexts:
        q = _randn(DECODE_BATCH, hq, 1, HEAD_DIM)
        k, v = _randn(DECODE_BATCH, hkv, context, HEAD_DIM), _randn(DECODE_BATCH, hkv, context, HEAD_DIM)
        with use_backend(backend):
            stats = summarize(_cuda_times_s(lambda: attention_forward(q, k, v, causal=False, scale=scale), reps))
        kv_bytes = 2 * k.numel() * k.element_size()
        rows.append({"backend": backend, "context": context, "batch": DECODE_BATCH, **stats,
                     "kv_gbytes_per_s": kv_bytes / stats["median_s"] / 1e9})
    return rows


def merge_rows(reps: int, head_dim: int = 64) -> list[dict]:
    from cptoolkit.layers.lse_merge_triton import merge_many_triton

    rows = []
    for parts, batch, heads in MERGE_SHAPES:
        outs = torch.randn(parts, batch, heads, 1, head_dim, device="cuda")
        lses = torch.randn(parts, batch, heads, 1, device="cuda")
        max_abs_diff = float((merge_many_triton(outs, lses)[0] - merge_many(outs, lses)[0]).abs().max())
        triton_stats = summarize(_cuda_times_s(lambda: merge_many_triton(outs, lses), reps))
        torch_stats = summarize(_cuda_times_s(lambda: merge_many(outs, lses), reps))
        rows.append({"parts": parts, "batch": batch, "heads": heads, "head_dim": head_dim,
                     "triton_median_s": triton_stats["median_s"], "torch_median_s": torch_stats["median_s"],
                     "max_abs_diff": max_abs_diff})
    return rows


def tables(payload: dict) -> str:
    prefill = format_table(["backend", "seq_len", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s"],
                           [[r["backend"], r["seq_len"], r["fwd_median_s"] * 1e3, r["fwd_tflops"],
                             r["fwd_bwd_median_s"] * 1e3, r["fwd_bwd_tflops"]] for r in payload["prefill"]])
    decode = format_table(["backend", "context", "batch", "median us", "K/V GB/s"],
                          [[r["backend"], r["context"], r["batch"], r["median_s"] * 1e6, r["kv_gbytes_per_s"]]
                           for r in payload["decode"]])
    merge = format_table(["partials", "batch", "heads", "triton us", "torch us", "max abs diff"],
                         [[r["parts"], r["batch"], r["heads"], r["triton_median_s"] * 1e6, r["torch_median_s"] * 1e6,
                           r["max_abs_diff"]] for r in payload["merge"]])
    heads = f"{HEADS[0]} query / {HEADS[1]} KV heads, head_dim {HEAD_DIM}, bfloat16"
    return (f"{payload['device']}: prefill, one causal block, batch 1, {heads}\n{prefill}\n\n"
            f"decode, one token over the context, {heads}\n{decode}\n\nDCP merge\n{merge}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"lengths {QUICK_SEQ_LENS}, contexts {QUICK_CONTEXTS}, 5 repetitions")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing measured, nothing written")
        return 0
    before = machine_info()
    reps = 5 if args.quick else 20
    seq_lens, contexts = (QUICK_SEQ_LENS, QUICK_CONTEXTS) if args.quick else (FULL_SEQ_LENS, FULL_CONTEXTS)
    names = backends()
    payload = {"config": {"reps": reps, "heads": list(HEADS), "head_dim": HEAD_DIM, "backends": names},
               "device": torch.cuda.get_device_name(),
               "prefill": [row for name in names for row in prefill_rows(name, seq_lens, reps)],
               "decode": [row for name in names for row in decode_rows(name, contexts, reps)],
               "merge": merge_rows(reps)}
    print(tables(payload))
    print(f"wrote {write_json('gpu', payload, before, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
