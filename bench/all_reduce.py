"""gloo's all-reduce against the shared-memory one (``cptoolkit.layers.shared_memory``), two ranks, one core each.

Each rank runs the products of a TP=2 decode step (its half of every layer's QKV, projection, gate/up and down
weights, float32, ``--shape``) and sums the two row-parallel outputs ``[rows, hidden]`` of every layer over the two
ranks, as the replayed layers do; and the same all-reduces with nothing between them ("idle"). Per transport, rows
and setting: the median of the slowest rank's seconds per all-reduce and per step, repetitions interleaved between
the transports.

    python bench/all_reduce.py [--shape smollm-135m] [--steps 20] [--reps 3] [--quick] [--name all_reduce]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/all_reduce.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import add_results_dir_argument, format_table, launch, machine_info, write_json
from bench.matmul_plan import SHAPES

ROWS = (1, 8)
TRANSPORTS = ("gloo", "shared_memory")


def _rank(rank: int, world_size: int, shape: str, steps: int, reps: int) -> list[dict]:
    """This rank's seconds per all-reduce and per step, for every (rows, setting, transport, repetition)."""
    import torch.distributed as dist

    from cptoolkit.layers.shared_memory import SharedMemoryGroup

    torch.manual_seed(rank)
    channel = SharedMemoryGroup.open(dist.group.WORLD, timeout_s=600)
    reduce = {"gloo": lambda t: dist.all_reduce(t), "shared_memory": channel.all_reduce_}
    layers, per_layer, _ = SHAPES[shape]
    n_of = {name: (n, k) for name, n, k in per_layer}
    hidden = n_of["proj"][0]
    # this rank's shards: column-parallel QKV and gate/up (rows of W), row-parallel projection and down (columns)
    weights = [(torch.randn(n_of["qkv"][0] // 2, hidden), torch.randn(hidden, n_of["proj"][1] // 2),
                torch.randn(n_of["fc1"][0] // 2, hidden), torch.randn(hidden, n_of["fc2"][1] // 2))
               for _ in range(layers)]
    out = []
    for rows in ROWS:
        x = torch.randn(rows, hidden) * 1e-2
        for setting in ("idle", "in a decode step"):
            for rep in range(reps + 1):  # the first repetition warms up, unrecorded
                for transport in TRANSPORTS if rep % 2 else TRANSPORTS[::-1]:
                    dist.barrier()
                    waited, start = 0.0, time.perf_counter()
                    for _ in range(steps):
                        for qkv, proj, fc1, fc2 in weights:
                            for column, row in ((qkv, proj), (fc1, fc2)):
                                if setting == "idle":
                                    partial = x.clone()
                                else:
                                    partial = torch.nn.functional.linear(
                                        torch.nn.functional.linear(x, column)[:, : row.shape[1]], row)
                                began = time.perf_counter()
                                reduce[transport](partial)
                                waited += time.perf_counter() - began
                    if rep:
                        out.append({"rows": rows, "setting": setting, "transport": transport, "rep": rep,
                                    "per_all_reduce_s": waited / (steps * layers * 2),
                                    "per_step_s": (time.perf_counter() - start) / steps})
    return out


def run(shape: str, steps: int, reps: int) -> dict:
    per_rank = launch(2, _rank, shape, steps, reps)
    rows_out = []
    for rows in ROWS:
        for setting in ("idle", "in a decode step"):
            entry = {"rows": rows, "setting": setting}
            for transport in TRANSPORTS:
                def slowest(key):
                    recs = [[r for r in rank_recs if (r["rows"], r["setting"], r["transport"]) ==
                             (rows, setting, transport)] for rank_recs in per_rank]
                    return statistics.median(max(rec[key] for rec in rep) for rep in zip(*recs))
                entry[transport] = {"all_reduce_us": round(slowest("per_all_reduce_s") * 1e6, 1),
                                    "step_ms": round(slowest("per_step_s") * 1e3, 2)}
            entry["step_speedup"] = round(entry["gloo"]["step_ms"] / entry["shared_memory"]["step_ms"], 3)
            rows_out.append(entry)
    return {"config": {"shape": shape, "ranks": 2, "threads": 1, "steps": steps, "reps": reps, "dtype": "float32",
                       "all_reduces_per_step": 2 * SHAPES[shape][0]}, "rows": rows_out}


def table(payload: dict) -> str:
    return format_table(
        ["rows", "setting", "gloo µs / all-reduce", "shared memory µs", "gloo ms / step", "shared memory ms / step",
         "step speedup"],
        [[r["rows"], r["setting"], r["gloo"]["all_reduce_us"], r["shared_memory"]["all_reduce_us"],
          r["gloo"]["step_ms"], r["shared_memory"]["step_ms"], r["step_speedup"]] for r in payload["rows"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--steps", type=int, help="decode steps per repetition (default 20; --quick 5)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="SmolLM-135M's shape, 5 steps, 1 repetition")
    parser.add_argument("--name", default="all_reduce", help="JSON file name (default all_reduce)")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    before = machine_info()
    payload = run("smollm-135m" if args.quick else args.shape, args.steps or (5 if args.quick else 20),
                  args.reps or (1 if args.quick else 3))
    print(table(payload))
    print(f"wrote {write_json(args.name, payload, before, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
