"""GPU kernels, only where CUDA is available: per-block causal attention and the Triton LSE merges.

Without CUDA it prints "no GPU" and writes nothing: no figure in ``bench/results`` comes from a GPU
unless this script ran on one. With CUDA (one device is enough) it measures, with CUDA events:

- ``attention_forward`` (torch's CUDA flash kernel) causal, 8 heads, head_dim 64, bfloat16, at the
  prefill lengths, as achieved TFLOP/s (causal: ``2 * 2 * h * S^2 * d / 2`` FLOPs);
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
from cptoolkit.layers.block_attention import attention_forward
from cptoolkit.layers.lse_merge import merge_many

FULL_SEQ_LENS, QUICK_SEQ_LENS = (4096, 8192, 16384, 32768), (4096, 16384)
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


def attention_rows(seq_lens, reps: int, num_heads: int = 8, head_dim: int = 64) -> list[dict]:
    rows = []
    for seq_len in seq_lens:
        q, k, v = (torch.randn(1, num_heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        stats = summarize(_cuda_times_s(lambda: attention_forward(q, k, v, causal=True,
                                                                  scale=1 / math.sqrt(head_dim)), reps))
        flops = 2 * 2 * num_heads * seq_len * seq_len * head_dim / 2
        rows.append({"seq_len": seq_len, **stats, "tflops": flops / stats["median_s"] / 1e12})
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
    attention = format_table(["seq_len", "median ms", "min ms", "max ms", "TFLOP/s"],
                             [[r["seq_len"], r["median_s"] * 1e3, r["min_s"] * 1e3, r["max_s"] * 1e3, r["tflops"]]
                              for r in payload["attention"]])
    merge = format_table(["partials", "batch", "heads", "triton us", "torch us", "max abs diff"],
                         [[r["parts"], r["batch"], r["heads"], r["triton_median_s"] * 1e6, r["torch_median_s"] * 1e6,
                           r["max_abs_diff"]] for r in payload["merge"]])
    return f"{payload['device']}: causal attention, 8 heads, head_dim 64, bfloat16\n{attention}\n\nDCP merge\n{merge}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_SEQ_LENS}, 5 repetitions")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing measured, nothing written")
        return 0
    before = machine_info()
    reps = 5 if args.quick else 20
    payload = {"config": {"reps": reps}, "device": torch.cuda.get_device_name(),
               "attention": attention_rows(QUICK_SEQ_LENS if args.quick else FULL_SEQ_LENS, reps),
               "merge": merge_rows(reps)}
    print(tables(payload))
    print(f"wrote {write_json('gpu', payload, before, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
