"""Prefill scaling: causal attention of one long sequence, PCP=1 on one core vs PCP=2 on two cores.

All variants are timed side by side in one 2-rank run; every repetition runs each variant once, in
turn, so background load on the shared machine hits them alike:

- ``pcp1``: unsharded causal attention (``attention_forward``) on rank 0 alone while rank 1 waits at
  a barrier: the single-core baseline.
- ``pcp2_p2p`` / ``pcp2_all_gather`` / ``pcp2_a2a`` / ``pcp2_a2a+p2p``: ``ring_prefill_attention`` on
  DualChunkSwap shards. On 2 ranks ``a2a+p2p`` is 2 x 1 (the Ulysses exchange inside one a2a group of 2,
  a ring of 1): it measures the hierarchical plumbing over ``a2a``.
- ``pcp2_contiguous``: BENCH-ONLY baseline, not part of cptoolkit: the same P2P ring over a
  contiguous split (rank ``r`` holds tokens ``[r*S/P, (r+1)*S/P)``), to show what the balance buys.

A variant's time per repetition is its slowest rank's; speedup = median(pcp1) / median(variant), and
min(pcp1) / min(variant) beside it (the least disturbed repetitions, on a shared machine).
Rank 0 also checks its shard of every variant against the unsharded output (max abs difference), and
counts the collectives and bytes it sends in one untimed call (one layer's forward, ``CommStats``).

    python bench/prefill_scaling.py [--quick] [--seq-lens 4096 8192] [--reps 3]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/prefill_scaling.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from bench.common import (RESULTS_DIR, add_results_dir_argument, format_table, launch, machine_info, new_figure,
                          save_figure, slowest_rank_per_rep, summarize, time_call, write_json)
from cptoolkit.layers.algorithms import PREFILL_ALGORITHMS
from cptoolkit.layers.block_attention import attention_forward
from cptoolkit.layers.comm import CommStats, send_recv
from cptoolkit.layers.dual_chunk_swap import shard_positions, shard_sequence
from cptoolkit.layers.hierarchical_prefill import new_hierarchical_groups
from cptoolkit.layers.lse_merge import merge_two
from cptoolkit.layers.ring_prefill import ring_prefill_attention

VARIANTS = ("pcp1", "pcp2_p2p", "pcp2_all_gather", "pcp2_a2a", "pcp2_a2a+p2p", "pcp2_contiguous")
A2A_SIZE = 2  # a2a+p2p on the 2 ranks: one a2a group of 2, a ring of 1
FULL_SEQ_LENS, QUICK_SEQ_LENS = (4096, 8192, 16384, 32768), (4096, 8192)
PCP_SIZE = 2


def contiguous_ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pcp_group, scale: float
                              ) -> torch.Tensor:
    """BENCH-ONLY baseline: causal ring attention for a contiguous split of the sequence.

    ``q``, ``k``, ``v [b, h, L, d]`` hold tokens ``[r*L, (r+1)*L)`` of PCP rank ``r``. At step ``i``
    the rank holds the K/V of ``src = (r - i) mod P`` (P-1 ``send_recv`` calls on ``pcp_group``):
    ``src == r`` is the causal diagonal, ``src < r`` a full block, ``src > r`` is skipped — so rank
    ``r`` computes ``r + 1/2`` blocks' worth of work. Returns ``out [b, h, L, d]``.
    """
    pcp_rank, pcp_size = dist.get_rank(pcp_group), dist.get_world_size(pcp_group)
    next_rank = dist.get_global_rank(pcp_group, (pcp_rank + 1) % pcp_size)
    prev_rank = dist.get_global_rank(pcp_group, (pcp_rank - 1) % pcp_size)
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full(q.shape[:3], float("-inf"))
    kv = torch.stack([k, v])
    for step in range(pcp_size):
        if step + 1 < pcp_size:
            next_kv, works = send_recv(kv, next_rank, prev_rank, pcp_group)
        src = (pcp_rank - step) % pcp_size
        if src <= pcp_rank:
            block_out, block_lse = attention_forward(q, kv[0], kv[1], causal=src == pcp_rank, scale=scale)
            out, lse = merge_two(out, lse, block_out, block_lse)
        if step + 1 < pcp_size:
            for work in works:
                work.wait()
            kv = next_kv
    return out.to(q.dtype)


def _local_positions(split: str, seq_len: int, pcp_rank: int) -> torch.Tensor:
    if split == "contiguous":
        local_len = seq_len // PCP_SIZE
        return torch.arange(pcp_rank * local_len, (pcp_rank + 1) * local_len)
    return shard_positions(seq_len, pcp_rank, PCP_SIZE)


def _run_variant(variant: str, q, k, v, pcp_rank: int, scale: float, hcp_groups, stats: CommStats | None = None
                 ) -> tuple[float, torch.Tensor | None]:
    """``(seconds, local output)`` of one variant on this rank; ``pcp1`` runs on rank 0 only. ``stats``
    counts the collectives of a cptoolkit variant."""
    group = dist.group.WORLD
    dist.barrier()
    if variant == "pcp1":
        if pcp_rank != 0:
            return 0.0, None
        return time_call(lambda: attention_forward(q, k, v, causal=True, scale=scale)[0])
    if variant == "pcp2_contiguous":
        shards = [x.narrow(2, pcp_rank * x.shape[2] // PCP_SIZE, x.shape[2] // PCP_SIZE).contiguous()
                  for x in (q, k, v)]
        return time_call(lambda: contiguous_ring_attention(*shards, group, scale))
    shards = [shard_sequence(x, pcp_rank, PCP_SIZE, seq_dim=2) for x in (q, k, v)]
    comm = variant.removeprefix("pcp2_")
    return time_call(lambda: ring_prefill_attention(*shards, pcp_group=group, scale=scale, comm=comm, stats=stats,
                                                    hcp_groups=hcp_groups))


def measure_rank(rank: int, world_size: int, seq_lens: list[int], num_heads: int, head_dim: int, reps: int,
                 variants: list[str]) -> dict:
    """Per-rank body: ``{seq_len: {"times_s": {variant: [rep times]}, "max_abs_diff": {variant: float},
    "collectives": {variant: {name: {"calls", "bytes"}}}}}``.

    ``max_abs_diff`` (rank 0 only, else empty) compares rank 0's local output of each variant with the
    same rows of the unsharded output; ``collectives`` are this rank's in one untimed forward.
    """
    if world_size != PCP_SIZE:
        raise ValueError(f"world_size ({world_size}) must be {PCP_SIZE}: this benchmark compares PCP=1 and PCP=2")
    scale = 1.0 / math.sqrt(head_dim)
    hcp_groups = new_hierarchical_groups(dist.group.WORLD, A2A_SIZE) if "pcp2_a2a+p2p" in variants else None
    results = {}
    for seq_len in seq_lens:
        generator = torch.Generator().manual_seed(seq_len)
        q, k, v = (torch.randn(1, num_heads, seq_len, head_dim, generator=generator) for _ in range(3))
        times = {variant: [] for variant in variants}
        reference, max_abs_diff, collectives = None, {}, {}
        for variant in variants:
            if variant.removeprefix("pcp2_") in PREFILL_ALGORITHMS:
                stats = CommStats()
                _run_variant(variant, q, k, v, rank, scale, hcp_groups, stats)
                collectives[variant] = {name: {"calls": stats.calls[name], "bytes": stats.bytes_sent[name]}
                                        for name in stats.calls}
        for _ in range(reps):
            for variant in variants:
                seconds, out = _run_variant(variant, q, k, v, rank, scale, hcp_groups)
                times[variant].append(seconds)
                if rank == 0 and variant == "pcp1":
                    reference = out
                elif rank == 0 and reference is not None:
                    rows = _local_positions(variant.removeprefix("pcp2_"), seq_len, rank)
                    max_abs_diff[variant] = float((out - reference[:, :, rows]).abs().max())
        results[seq_len] = {"times_s": times, "max_abs_diff": max_abs_diff, "collectives": collectives}
    return results


def run(seq_lens: list[int], reps: int, num_heads: int = 8, head_dim: int = 64,
        variants: tuple[str, ...] = VARIANTS) -> dict:
    """Launch the 2-rank measurement; returns the JSON payload (per length: per-variant stats of the
    slowest rank, per-rank medians, speedup over ``pcp1``, rank 0's max abs difference)."""
    per_rank = launch(PCP_SIZE, measure_rank, list(seq_lens), num_heads, head_dim, reps, list(variants))
    rows = []
    for seq_len in seq_lens:
        by_rank = [result[seq_len] for result in per_rank]
        entry = {"seq_len": seq_len, "variants": {}}
        for variant in variants:
            step_times = slowest_rank_per_rep([r["times_s"][variant] for r in by_rank])
            entry["variants"][variant] = {
                **summarize(step_times),
                "per_rank_median_s": [summarize(r["times_s"][variant])["median_s"] for r in by_rank],
                "max_abs_diff_rank0": by_rank[0]["max_abs_diff"].get(variant),
                "collectives_per_layer_rank0": by_rank[0]["collectives"].get(variant)}
        if "pcp1" in variants:
            baseline = entry["variants"]["pcp1"]
            for stats in entry["variants"].values():
                stats["speedup_vs_pcp1"] = baseline["median_s"] / stats["median_s"]
                stats["best_speedup_vs_pcp1"] = baseline["min_s"] / stats["min_s"]
        rows.append(entry)
    return {"config": {"num_heads": num_heads, "head_dim": head_dim, "batch": 1, "dtype": "float32",
                       "threads_per_rank": 1, "pcp_size": PCP_SIZE, "reps": reps, "variants": list(variants)},
            "results": rows}


def table(payload: dict) -> str:
    rows = []
    for entry in payload["results"]:
        for variant, stats in entry["variants"].items():
            rows.append([entry["seq_len"], variant, stats["median_s"], stats["min_s"], stats["max_s"],
                         stats.get("speedup_vs_pcp1", "-"), stats.get("best_speedup_vs_pcp1", "-"),
                         " / ".join(f"{t:.3g}" for t in stats["per_rank_median_s"]),
                         "-" if stats["max_abs_diff_rank0"] is None else f"{stats['max_abs_diff_rank0']:.1e}",
                         _collectives_cell(stats["collectives_per_layer_rank0"])])
    return format_table(["seq_len", "variant", "median s", "min s", "max s", "speedup (medians)", "speedup (mins)",
                         "per-rank median s", "max abs diff (rank 0)", "collectives / layer (rank 0, MiB sent)"],
                        rows)


def _collectives_cell(collectives: dict | None) -> str:
    if collectives is None:
        return "-"
    return ", ".join(f"{c['calls']} {name} ({c['bytes'] / 2 ** 20:.1f})" for name, c in collectives.items())


def plot(payload: dict, results_dir: Path = RESULTS_DIR) -> Path:
    fig, ax = new_figure("Causal prefill attention: speedup over PCP=1 (1 core)", "sequence length (tokens)",
                         "speedup (median pcp1 / median variant)")
    seq_lens = [entry["seq_len"] for entry in payload["results"]]
    for variant in payload["config"]["variants"]:
        if variant == "pcp1":
            continue
        ax.plot(seq_lens, [e["variants"][variant]["speedup_vs_pcp1"] for e in payload["results"]], "o-",
                label=variant)
    ax.axhline(2.0, color="grey", linestyle=":", label="ideal (2 cores)")
    ax.set_xscale("log", base=2)
    ax.legend()
    return save_figure(fig, "prefill_scaling", results_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_SEQ_LENS}, 3 repetitions")
    parser.add_argument("--seq-lens", type=int, nargs="+", help=f"default {FULL_SEQ_LENS}")
    parser.add_argument("--reps", type=int, help="repetitions per variant (default 3 quick, 5 full)")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    seq_lens = args.seq_lens or (QUICK_SEQ_LENS if args.quick else FULL_SEQ_LENS)
    if any(n % (2 * PCP_SIZE) for n in seq_lens):
        parser.error(f"--seq-lens must be multiples of 2*PCP = {2 * PCP_SIZE}")
    before = machine_info()
    payload = run(list(seq_lens), args.reps or (3 if args.quick else 5))
    print(table(payload))
    json_path = write_json("prefill_scaling", payload, before, args.results_dir)
    print(f"wrote {json_path} and {plot(payload, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
