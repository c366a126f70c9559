"""Sliding-window attention vs full attention: prefill time and KV-cache bytes per rank as the context grows.

Two measurements, side by side in one run:

- **prefill**: one layer's causal attention over a sequence of ``S`` tokens, full and with a ``--window``
  sliding window, at PCP = 1 (rank 0 alone, ``attention_forward`` / the windowed ``LocalAttention`` cptoolkit
  runs at PCP = 1; rank 1 waits) and PCP = 2 (DualChunkSwap
  shards, ``ring_prefill_attention`` with ``p2p`` and ``all_gather``). Every repetition runs every variant
  once, in turn; a variant's time is its slowest rank's. The chunk tiles the window lets each comm skip are
  counted (``CommStats.tiles``, rank 0) and each windowed PCP = 2 output is checked against the windowed
  PCP = 1 output (max abs difference).
- **cache**: the bytes per rank the engine's KV cache reserves (``builder.kv_cache``, really allocated) for a
  4-layer model at TP1 x PCP2 x DCP2 with one request of ``S`` tokens, every layer full vs three of four
  layers windowed (their ring caches, ``HybridKVCache``) vs every layer windowed.

    python bench/sliding_window.py [--quick] [--seq-lens 4096 8192 16384] [--window 1024] [--reps 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/sliding_window.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from bench.common import (add_results_dir_argument, format_table, launch, machine_info,
                          slowest_rank_per_rep, summarize, time_call, write_json)
from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import kv_cache
from cptoolkit.layers.block_attention import attention_forward
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.dual_chunk_swap import shard_positions, shard_sequence
from cptoolkit.layers.ring_prefill import ring_prefill_attention
from cptoolkit.layers.sliding_window import LocalAttention
from cptoolkit.layout import ParallelLayout
from cptoolkit.models.shape import GPTShape
from cptoolkit.parallel_state import ParallelGroups

PCP_SIZE = 2
COMMS = ("p2p", "all_gather")
FULL_SEQ_LENS, QUICK_SEQ_LENS = (4096, 8192, 16384), (2048, 4096)
FULL_WINDOW, QUICK_WINDOW = 1024, 512
CACHE_SEQ_LENS = (4096, 8192, 16384, 32768)
CACHE_SHAPE = GPTShape(arch="llama", num_layers=4, hidden_size=512, num_attention_heads=8, num_kv_heads=2,
                       ffn_hidden_size=1024, vocab_size=320, max_seq_len=32768)


def _variants(window: int) -> list[tuple[str, int, str | None, int | None]]:
    """``(name, pcp, comm, window)`` of every prefill variant."""
    out = []
    for w, label in ((None, "full"), (window, f"window {window}")):
        out.append((f"pcp1 {label}", 1, None, w))
        out += [(f"pcp2 {comm} {label}", PCP_SIZE, comm, w) for comm in COMMS]
    return out


def _run_variant(variant, q, k, v, rank: int, scale: float, stats: CommStats | None = None):
    """``(seconds, local output)`` of one variant on this rank; PCP = 1 runs on rank 0 only."""
    _, pcp, comm, window = variant
    dist.barrier()
    if pcp == 1:
        if rank != 0:
            return 0.0, None
        if window is None:
            return time_call(lambda: attention_forward(q, k, v, causal=True, scale=scale)[0])
        return time_call(lambda: LocalAttention.apply(q, k, v, scale, window, None, stats))
    shards = [shard_sequence(x, rank, PCP_SIZE, seq_dim=2) for x in (q, k, v)]
    return time_call(lambda: ring_prefill_attention(*shards, pcp_group=dist.group.WORLD, scale=scale, comm=comm,
                                                    stats=stats, window=window))


def measure_rank(rank: int, world_size: int, seq_lens: list[int], window: int, num_heads: int, head_dim: int,
                 reps: int) -> dict:
    """``{seq_len: {"times_s": {variant: [...]}, "max_abs_diff": {variant: float}, "tiles": {variant: {...}}}}``
    (differences and tiles: rank 0's)."""
    scale = 1.0 / math.sqrt(head_dim)
    variants = _variants(window)
    results = {}
    for seq_len in seq_lens:
        gen = torch.Generator().manual_seed(seq_len)
        q, k, v = (torch.randn(1, num_heads, seq_len, head_dim, generator=gen) for _ in range(3))
        tiles = {}
        for variant in variants:
            if variant[1] == PCP_SIZE or variant[3] is not None:
                stats = CommStats()
                _run_variant(variant, q, k, v, rank, scale, stats)
                tiles[variant[0]] = dict(stats.tiles)
        times, references, diffs = {name: [] for name, *_ in variants}, {}, {}
        rows = shard_positions(seq_len, rank, PCP_SIZE)
        for _ in range(reps):
            for variant in variants:
                seconds, out = _run_variant(variant, q, k, v, rank, scale)
                times[variant[0]].append(seconds)
                if rank == 0 and variant[1] == 1:
                    references[variant[3]] = out
                elif rank == 0:
                    diffs[variant[0]] = float((out - references[variant[3]][:, :, rows]).abs().max())
        results[seq_len] = {"times_s": times, "max_abs_diff": diffs, "tiles": tiles}
    return results


def cache_bytes(seq_lens: list[int], window: int) -> list[dict]:
    """Rank 0's KV-cache bytes per context (the engine's sizing, allocated), full vs windowed layers."""
    layout = ParallelLayout(1, PCP_SIZE, PCP_SIZE, CACHE_SHAPE.num_attention_heads, CACHE_SHAPE.num_kv_heads)
    groups = ParallelGroups(layout, layout.rank_info(0), *[None] * 7)  # sizing reads only the layout
    shapes = {"full": CACHE_SHAPE,
              "3 of 4 windowed": dataclasses.replace(CACHE_SHAPE, sliding_window=window,
                                                     sliding_layers=(True, True, True, False)),
              "all windowed": dataclasses.replace(CACHE_SHAPE, sliding_window=window)}
    rows = []
    for seq_len in seq_lens:
        cfg = config_from_dict({"parallel": dict(tp=1, pcp=PCP_SIZE, dcp=PCP_SIZE), "runtime": {},
                                "model": {"max_seq_len": max(seq_lens)},
                                "inference": {"prompts": ["x"], "max_seq_len": seq_len, "batch_size": 1,
                                              "kv_block_size": 16, "prefill_chunk_size": 512}}, source="bench")
        rows.append({"seq_len": seq_len, **{name: kv_cache(cfg, groups, shape, torch.device("cpu")).bytes_per_rank
                                            for name, shape in shapes.items()}})
    return rows


def run(seq_lens: list[int], window: int, reps: int, num_heads: int = 8, head_dim: int = 64) -> dict:
    per_rank = launch(PCP_SIZE, measure_rank, seq_lens, window, num_heads, head_dim, reps)
    prefill = []
    for seq_len in seq_lens:
        rank0 = per_rank[0][seq_len]
        times = {name: summarize(slowest_rank_per_rep([r[seq_len]["times_s"][name] for r in per_rank]))
                 for name in rank0["times_s"]}
        prefill.append({"seq_len": seq_len, "times": times, "max_abs_diff": rank0["max_abs_diff"],
                        "tiles": rank0["tiles"]})
    return {"window": window, "num_heads": num_heads, "head_dim": head_dim, "reps": reps, "prefill": prefill,
            "cache": cache_bytes(list(CACHE_SEQ_LENS), window)}


def tables(payload: dict) -> str:
    window = payload["window"]
    rows = []
    for entry in payload["prefill"]:
        times = entry["times"]
        for name, timing in times.items():
            if f"window {window}" not in name:
                continue
            full_name = name.replace(f"window {window}", "full")
            tiles = entry["tiles"].get(name, {})
            rows.append([entry["seq_len"], name.removesuffix(f" window {window}"), times[full_name]["median_s"],
                         timing["median_s"], times[full_name]["median_s"] / timing["median_s"],
                         f"{tiles.get('skipped', 0)}/{tiles.get('skipped', 0) + tiles.get('computed', 0)}"
                         if tiles else "-", entry["max_abs_diff"].get(name, "-")])
    prefill = format_table(["tokens", "layout", "full s", f"window {window} s", "speed-up", "tiles skipped (rank 0)",
                            "max abs diff vs pcp1"], rows)
    cache = format_table(["context", "full: bytes/rank", "3 of 4 windowed", "all windowed", "all windowed / full"],
                         [[c["seq_len"], c["full"], c["3 of 4 windowed"], c["all windowed"],
                           c["all windowed"] / c["full"]] for c in payload["cache"]])
    return f"prefill, one layer ({payload['num_heads']} heads x {payload['head_dim']}):\n{prefill}\n\n" \
           f"KV cache per rank, 4 layers, TP1 x PCP2 x DCP2, one request, window {window}:\n{cache}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"lengths {QUICK_SEQ_LENS}, window {QUICK_WINDOW}, 2 repetitions")
    parser.add_argument("--seq-lens", type=int, nargs="+", help=f"default {FULL_SEQ_LENS}")
    parser.add_argument("--window", type=int, help=f"default {FULL_WINDOW}")
    parser.add_argument("--reps", type=int, help="repetitions per variant (default 2 quick, 3 full)")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    seq_lens = args.seq_lens or list(QUICK_SEQ_LENS if args.quick else FULL_SEQ_LENS)
    window = args.window or (QUICK_WINDOW if args.quick else FULL_WINDOW)
    before = machine_info()
    payload = run(seq_lens, window, args.reps or (2 if args.quick else 3))
    print(tables(payload))
    print(f"wrote {write_json('sliding_window', payload, before, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
