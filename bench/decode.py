"""Decode attention latency vs context length: DCP=1 on one core vs DCP=2 on two cores, both comms.

One decode step of one attention layer (append the new token to the KV cache, attend over it,
combine partials), 8 query heads / 2 KV heads (GQA), head_dim 64, batch 1, float32. Layouts, all
measured side by side in one 2-rank run (rounds of steps interleaved across layouts):

- ``dcp1``: TP=1, DCP=1 on rank 0 alone (rank 1 waits at a barrier): the whole cache on one core.
- ``tp1_pcp2_dcp2`` (k = 1): each rank holds every head and half of the tokens.
- ``tp2_pcp1_dcp2`` (k = 2 = TP): each rank owns 4 query heads; the group's queries are gathered,
  each rank attends all 8 heads over its half of the tokens and gets its heads back.

For each layout: per-step latency (slowest rank; median over steps, with min/max), KV bytes stored per
rank, and the collectives and bytes of one step from ``CommStats`` (constant in the context length).

    python bench/decode.py [--quick] [--context-lens 4096 16384] [--steps 20]
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/decode.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from bench.common import (RESULTS_DIR, add_results_dir_argument, format_table, launch, machine_info, new_figure,
                          save_figure, slowest_rank_per_rep, summarize, time_call, write_json)
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.dcp_decode import ContiguousShardCache, DecodeGroup, attend_shard, dcp_decode_attention

FULL_CONTEXT_LENS = (4096, 8192, 16384, 32768, 65536, 131072)
QUICK_CONTEXT_LENS = (4096, 16384, 65536)
WORLD_SIZE = 2


@dataclass(frozen=True)
class DecodeLayout:
    """A decode layout on 2 ranks: ``tp`` x ``pcp`` ranks, ``comm`` None for DCP=1 (no collectives)."""

    name: str
    tp: int
    pcp: int
    comm: str | None

    @property
    def label(self) -> str:
        return self.name if self.comm is None else f"{self.name} {self.comm}"


LAYOUTS = (DecodeLayout("dcp1", 1, 1, None),
           DecodeLayout("tp1_pcp2_dcp2", 1, 2, "a2a"), DecodeLayout("tp1_pcp2_dcp2", 1, 2, "ag_rs"),
           DecodeLayout("tp2_pcp1_dcp2", 2, 1, "a2a"), DecodeLayout("tp2_pcp1_dcp2", 2, 1, "ag_rs"))


class _LayoutRun:
    """One rank's cache and step function for one layout at one context length."""

    def __init__(self, layout: DecodeLayout, rank: int, context_len: int, max_new: int, num_heads: int,
                 num_kv_heads: int, head_dim: int):
        self.layout, self.active = layout, layout.comm is not None or rank == 0
        self.scale, self.stats = 1.0 / math.sqrt(head_dim), CommStats()
        if layout.comm is None:
            self.dg = DecodeGroup(None, dcp_rank=0, dcp_size=1, tp_positions=1, pcp_size=1)
        else:
            self.dg = DecodeGroup.from_group(dist.group.WORLD, tp_positions=layout.tp, pcp_size=layout.pcp)
        self.hq_local, self.hkv_local = num_heads // layout.tp, num_kv_heads // layout.tp
        self.head_dim = head_dim
        self.cache = ContiguousShardCache(context_len + max_new, 1, num_kv_heads, head_dim, self.dg)
        if self.active:
            generator = torch.Generator().manual_seed(context_len)
            history = [torch.randn(1, num_kv_heads, context_len, head_dim, generator=generator) for _ in range(2)]
            self.cache.write_prefix(*history, torch.tensor([context_len]))

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V this rank stores for the current context."""
        k = self.cache.k
        return 2 * int(self.cache.shard_lens.max()) * k.shape[1] * k.shape[3] * k.element_size()

    def new_token(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's ``q [1, hq_local, 1, d]``, ``k``, ``v [1, hkv_local, 1, d]`` of a random new token."""
        return (torch.randn(1, self.hq_local, 1, self.head_dim),
                *(torch.randn(1, self.hkv_local, 1, self.head_dim) for _ in range(2)))

    def step(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        positions = self.cache.seq_lens.clone()
        if self.layout.comm is None:
            self.cache.append(k_new, v_new, positions)
            attend_shard(q, *self.cache.read(), self.scale)
        else:
            dcp_decode_attention(q, k_new, v_new, self.cache, positions, self.dg, self.layout.comm, self.scale,
                                 self.stats)


def _timed_step(run: _LayoutRun) -> float:
    token = run.new_token()
    dist.barrier()
    return time_call(lambda: run.step(*token))[0] if run.active else 0.0


def measure_rank(rank: int, world_size: int, context_lens: list[int], steps: int, rounds: int, num_heads: int,
                 num_kv_heads: int, head_dim: int) -> dict:
    """Per-rank body: ``{context_len: {layout label: {"step_times_s", "kv_bytes", "calls", "bytes_sent"}}}``;
    ``calls``/``bytes_sent`` are one step's counts by collective name."""
    if world_size != WORLD_SIZE:
        raise ValueError(f"world_size ({world_size}) must be {WORLD_SIZE}")
    torch.manual_seed(rank)
    results = {}
    for context_len in context_lens:
        runs = [_LayoutRun(layout, rank, context_len, (rounds * steps) + 2, num_heads, num_kv_heads, head_dim)
                for layout in LAYOUTS]
        entry = {run.layout.label: {"step_times_s": [], "kv_bytes": run.kv_bytes} for run in runs}
        for run in runs:
            _timed_step(run)  # warm-up, and the step whose collectives are counted
            entry[run.layout.label].update(calls=dict(run.stats.calls), bytes_sent=dict(run.stats.bytes_sent))
            _timed_step(run)
        for _ in range(rounds):
            for run in runs:
                entry[run.layout.label]["step_times_s"] += [_timed_step(run) for _ in range(steps)]
        results[context_len] = entry
        del runs  # free this length's caches before the next length allocates its own
    return results


def run(context_lens: list[int], steps: int, rounds: int = 2, num_heads: int = 8, num_kv_heads: int = 2,
        head_dim: int = 64) -> dict:
    """Launch the 2-rank measurement; returns the JSON payload."""
    per_rank = launch(WORLD_SIZE, measure_rank, list(context_lens), steps, rounds, num_heads, num_kv_heads, head_dim)
    rows = []
    for context_len in context_lens:
        for layout in LAYOUTS:
            by_rank = [result[context_len][layout.label] for result in per_rank]
            stats = summarize(slowest_rank_per_rep([r["step_times_s"] for r in by_rank]))
            rows.append({"context_len": context_len, "label": layout.label, "layout": layout.name, "comm": layout.comm,
                         "tp": layout.tp, "pcp": layout.pcp, "dcp": layout.tp * layout.pcp, **stats,
                         "kv_bytes_per_rank": max(r["kv_bytes"] for r in by_rank),
                         "collectives_per_step": sum(by_rank[0]["calls"].values()),
                         "calls_per_step": by_rank[0]["calls"],
                         "bytes_sent_per_step_rank0": sum(by_rank[0]["bytes_sent"].values())})
    for row in rows:
        baseline = next(r for r in rows if r["context_len"] == row["context_len"] and r["comm"] is None)
        row["speedup_vs_dcp1"] = baseline["median_s"] / row["median_s"]
    return {"config": {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim, "batch": 1,
                       "dtype": "float32", "threads_per_rank": 1, "steps_per_round": steps, "rounds": rounds,
                       "layouts": [layout.label for layout in LAYOUTS]},
            "results": rows}


def table(payload: dict) -> str:
    rows = [[r["context_len"], r["layout"], r["comm"] or "-", r["median_s"] * 1e3, r["min_s"] * 1e3,
             r["max_s"] * 1e3, r["speedup_vs_dcp1"], r["kv_bytes_per_rank"] / 2**20, r["collectives_per_step"],
             " ".join(f"{name}={n}" for name, n in sorted(r["calls_per_step"].items())) or "-",
             r["bytes_sent_per_step_rank0"]] for r in payload["results"]]
    return format_table(["context", "layout", "comm", "median ms", "min ms", "max ms", "speedup vs dcp1",
                         "KV MiB/rank", "collectives/step", "calls", "bytes sent/step (rank 0)"], rows)


def plot(payload: dict, results_dir: Path = RESULTS_DIR) -> Path:
    fig, ax = new_figure("Decode attention step (1 layer, batch 1)", "context length (tokens)",
                         "median step latency (ms)")
    for label in payload["config"]["layouts"]:
        points = [r for r in payload["results"] if r["label"] == label]
        ax.plot([r["context_len"] for r in points], [r["median_s"] * 1e3 for r in points], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend()
    return save_figure(fig, "decode", results_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"contexts {QUICK_CONTEXT_LENS}, 10 steps per round")
    parser.add_argument("--context-lens", type=int, nargs="+", help=f"default {FULL_CONTEXT_LENS}")
    parser.add_argument("--steps", type=int, help="timed steps per layout and round (default 10 quick, 20 full)")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    before = machine_info()
    payload = run(list(args.context_lens or (QUICK_CONTEXT_LENS if args.quick else FULL_CONTEXT_LENS)),
                  args.steps or (10 if args.quick else 20))
    print(table(payload))
    print(f"wrote {write_json('decode', payload, before, args.results_dir)} and {plot(payload, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
