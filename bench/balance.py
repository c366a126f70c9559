"""Causal-work balance of DualChunkSwap vs a contiguous split: exact counts and measured per-rank times.

Exact part (no processes): ``causal_work`` counts the (query, key) pairs with key <= query that each
PCP rank computes, for PCP = 2, 4, 8. ``max/mean`` is the slowest rank's work over the average, i.e.
the factor by which the step is longer than a perfectly balanced one: 1 for DualChunkSwap,
``(2P-1)/P + O(P/S)`` for a contiguous split (``max/min`` about ``2P-1``).

Measured part: per-rank medians of the 2-rank ring (``prefill_scaling``'s ``pcp2_p2p`` and the
bench-only ``pcp2_contiguous``) at one sequence length.

    python bench/balance.py [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/balance.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import prefill_scaling
from bench.common import (RESULTS_DIR, add_results_dir_argument, format_table, machine_info, new_figure,
                          save_figure, write_json)
from cptoolkit.layers.dual_chunk_swap import SPLITS, causal_work

PCP_SIZES = (2, 4, 8)
COUNT_SEQ_LEN = 32768
MEASURED_VARIANTS = {"dual_chunk_swap": "pcp2_p2p", "contiguous": "pcp2_contiguous"}


def work_counts(pcp_sizes: tuple[int, ...] = PCP_SIZES, seq_len: int = COUNT_SEQ_LEN) -> list[dict]:
    """Exact per-rank causal pairs for each split and PCP size, with ``max/mean`` and ``max/min``."""
    rows = []
    for pcp_size in pcp_sizes:
        for split in SPLITS:
            per_rank = [causal_work(rank, pcp_size, seq_len, split) for rank in range(pcp_size)]
            rows.append({"pcp_size": pcp_size, "split": split, "seq_len": seq_len, "per_rank_pairs": per_rank,
                         "max_over_mean": max(per_rank) / statistics.fmean(per_rank),
                         "max_over_min": max(per_rank) / min(per_rank),
                         "contiguous_limit_max_over_mean": (2 * pcp_size - 1) / pcp_size})
    return rows


def measured_times(seq_len: int, reps: int, num_heads: int = 8, head_dim: int = 64) -> list[dict]:
    """Per-rank median seconds of the 2-rank ring for each split, with ``max/mean`` of those medians."""
    payload = prefill_scaling.run([seq_len], reps, num_heads, head_dim, tuple(MEASURED_VARIANTS.values()))
    rows = []
    for split, variant in MEASURED_VARIANTS.items():
        stats = payload["results"][0]["variants"][variant]
        per_rank = stats["per_rank_median_s"]
        rows.append({"pcp_size": prefill_scaling.PCP_SIZE, "split": split, "seq_len": seq_len, "variant": variant,
                     "per_rank_median_s": per_rank, "step_median_s": stats["median_s"],
                     "max_over_mean": max(per_rank) / statistics.fmean(per_rank)})
    return rows


def run(measure_seq_len: int, reps: int, num_heads: int = 8, head_dim: int = 64) -> dict:
    return {"config": {"count_seq_len": COUNT_SEQ_LEN, "measure_seq_len": measure_seq_len, "reps": reps,
                       "num_heads": num_heads, "head_dim": head_dim},
            "exact_counts": work_counts(), "measured": measured_times(measure_seq_len, reps, num_heads, head_dim)}


def tables(payload: dict) -> str:
    exact = format_table(
        ["PCP", "split", "max/mean", "max/min", "(2P-1)/P", "per-rank causal pairs"],
        [[r["pcp_size"], r["split"], r["max_over_mean"], r["max_over_min"], r["contiguous_limit_max_over_mean"],
          " ".join(str(n) for n in r["per_rank_pairs"])] for r in payload["exact_counts"]])
    measured = format_table(
        ["PCP", "split", "seq_len", "per-rank median s", "max/mean", "step median s"],
        [[r["pcp_size"], r["split"], r["seq_len"], " / ".join(f"{t:.3g}" for t in r["per_rank_median_s"]),
          r["max_over_mean"], r["step_median_s"]] for r in payload["measured"]])
    return (f"Exact causal work per rank (seq_len {payload['config']['count_seq_len']}):\n{exact}\n\n"
            f"Measured per-rank ring attention time, 2 ranks:\n{measured}")


def plot(payload: dict, results_dir: Path = RESULTS_DIR) -> Path:
    fig, ax = new_figure(f"Causal work per PCP rank, PCP={max(PCP_SIZES)}", "PCP rank",
                         "causal (query, key) pairs / mean")
    for offset, split in ((-0.2, "dual_chunk_swap"), (0.2, "contiguous")):
        row = next(r for r in payload["exact_counts"] if r["pcp_size"] == max(PCP_SIZES) and r["split"] == split)
        mean = statistics.fmean(row["per_rank_pairs"])
        ax.bar([rank + offset for rank in range(row["pcp_size"])], [n / mean for n in row["per_rank_pairs"]],
               width=0.4, label=split)
    ax.legend()
    return save_figure(fig, "balance", results_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="measure at 8192 tokens, 3 repetitions")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    before = machine_info()
    payload = run(8192 if args.quick else 16384, 3 if args.quick else 5)
    print(tables(payload))
    print(f"wrote {write_json('balance', payload, before, args.results_dir)} and {plot(payload, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
