"""MLA decode: step latency and latent-cache bytes per rank, DCP = 1 / 2 / 4 beside a TP-replicated cache.

One absorbed decode step of one multi-head latent attention layer with DeepSeek-V2-Lite's attention dims
(16 heads, ``kv_lora_rank`` 512, ``qk_rope_head_dim`` 64, ``qk_nope_head_dim`` 128, ``v_head_dim`` 128),
batch 1, float32, over a random history of ``context`` tokens in the engine's own paged cache
(``PagedKVCache(values_are_keys=True)``: one 576-wide latent per token). A step is what
``MLASelfAttention._absorbed`` runs in decode: queries into latent space (``q_nope W_UK``), append the
new latent, attend (MQA over the latent, LSE-merged over DCP: ``dcp_decode_attention``), back through
``W_UV``. Layouts:

- 2 ranks (one core each): ``tp1`` (rank 0 alone: all heads, the whole latent); ``tp2_dcp1`` (each rank half
  the heads over the *whole* latent: TP replicates it); ``tp2_dcp2`` a2a / ag_rs and ``tp1_pcp2_dcp2`` a2a
  (each rank half the tokens).
- 4 ranks (on 2 cores: oversubscribed, so their times are not per-core figures; the bytes are exact):
  ``tp4_dcp1`` (4 copies of the latent) and ``tp4_dcp4`` a2a (one).

Per layout: median step latency of the slowest rank (rounds interleaved across layouts), the latent bytes
each rank stores for the context (one layer; times ``--layers`` for the model), its copies of the latent, and
one step's collectives (``CommStats``).

    python bench/mla_decode.py [--quick] [--context-lens 8192 32768] [--steps 10]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/mla_decode.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from bench.common import (RESULTS_DIR, add_results_dir_argument, format_table, launch, machine_info, new_figure,
                          save_figure, slowest_rank_per_rep, summarize, time_call, write_json)
from cptoolkit.inference.kv_cache import PagedKVCache
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.dcp_decode import DecodeGroup, dcp_decode_attention
from cptoolkit.layers.mla_dims import MLADims
from cptoolkit.layout import ParallelLayout

V2_LITE = MLADims(q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  rope_interleave=True)
NUM_HEADS, MODEL_LAYERS, BLOCK_SIZE = 16, 27, 16  # DeepSeek-V2-Lite: 16 heads, 27 layers
FULL_CONTEXT_LENS = (8192, 32768, 131072)
QUICK_CONTEXT_LENS = (4096, 16384)


@dataclass(frozen=True)
class MLALayout:
    """``tp x pcp`` ranks with a DCP group of ``dcp`` (1: none, each rank caches every token); ``ranks``: the
    processes of the run it belongs to (``tp * pcp`` ranks measure; a 1-rank layout runs on rank 0 alone)."""

    tp: int
    pcp: int
    dcp: int
    comm: str | None
    ranks: int

    @property
    def label(self) -> str:
        name = f"tp{self.tp}" + (f"_pcp{self.pcp}" if self.pcp > 1 else "") + (f"_dcp{self.dcp}" if self.tp > 1
                                                                              or self.dcp > 1 else "")
        return name if self.comm is None else f"{name} {self.comm}"

    @property
    def parallel(self) -> ParallelLayout:
        return ParallelLayout(self.tp, self.pcp, self.dcp, NUM_HEADS, 1)

    @property
    def latent_copies(self) -> float:
        return self.tp * self.pcp / self.dcp


LAYOUTS = {2: (MLALayout(1, 1, 1, None, 2), MLALayout(2, 1, 1, None, 2), MLALayout(2, 1, 2, "a2a", 2),
               MLALayout(2, 1, 2, "ag_rs", 2), MLALayout(1, 2, 2, "a2a", 2)),
           4: (MLALayout(4, 1, 1, None, 4), MLALayout(4, 1, 4, "a2a", 4))}


class _LayoutRun:
    """One rank's latent cache, absorbed weights and step for one layout at one context length."""

    def __init__(self, layout: MLALayout, rank: int, context_len: int, max_new: int):
        self.layout, self.stats = layout, CommStats()
        self.active = rank < layout.tp * layout.pcp
        par = layout.parallel
        if layout.dcp == 1:
            self.dg = DecodeGroup(None, dcp_rank=0, dcp_size=1, tp_positions=1, pcp_size=1)
        else:
            self.dg = DecodeGroup.from_group(dist.group.WORLD, par.dcp_tp_positions, layout.pcp,
                                             kv_head_replication=par.kv_head_replication)
        m, self.heads = V2_LITE, NUM_HEADS // layout.tp
        self.scale = m.qk_head_dim ** -0.5
        generator = torch.Generator().manual_seed(rank)
        self.w_uk = torch.randn(self.heads, m.qk_nope_head_dim, m.kv_lora_rank, generator=generator) * 0.02
        self.w_uv = torch.randn(self.heads, m.v_head_dim, m.kv_lora_rank, generator=generator) * 0.02
        self.cache = PagedKVCache(1, 1, m.latent_dim, BLOCK_SIZE, -(-(context_len + max_new) // BLOCK_SIZE),
                                  self.dg.dcp_rank, self.dg.dcp_size, 1, torch.float32, values_are_keys=True)
        self.cache.add_request(0, context_len + max_new)
        if self.active:
            # Every member draws the same history and keeps its own shard of it, as prefill routing leaves it.
            history = torch.randn(1, context_len, m.latent_dim, generator=torch.Generator().manual_seed(context_len))
            self.cache.fill_prefill(1, 0, history, history, torch.arange(context_len))
        self.position = context_len

    @property
    def latent_bytes(self) -> int:
        """Latent bytes this rank stores for the request (one layer)."""
        return self.cache.shard_len(1, 0) * V2_LITE.latent_dim * 4

    def step(self) -> None:
        m = V2_LITE
        q_nope = torch.randn(1, self.heads, 1, m.qk_nope_head_dim)
        q_rope = torch.randn(1, self.heads, 1, m.qk_rope_head_dim)
        latent = torch.randn(1, 1, 1, m.latent_dim)
        q = torch.cat([torch.einsum("bhsn,hnl->bhsl", q_nope, self.w_uk), q_rope], dim=-1)
        positions = torch.tensor([self.position])
        out = dcp_decode_attention(q, latent, latent, self.cache.view(1, [0]), positions, self.dg,
                                   self.layout.comm or "a2a", self.scale, self.stats)
        torch.einsum("bhsl,hvl->bhsv", out[..., :m.kv_lora_rank], self.w_uv)
        self.position += 1


def _timed_step(run: _LayoutRun) -> float:
    dist.barrier()
    return time_call(run.step)[0] if run.active else 0.0


def measure_rank(rank: int, world_size: int, context_lens: list[int], steps: int, rounds: int) -> dict:
    """Per-rank body: ``{context_len: {label: {"step_times_s", "latent_bytes", "calls", "bytes_sent"}}}``."""
    torch.manual_seed(rank)
    results = {}
    for context_len in context_lens:
        runs = [_LayoutRun(layout, rank, context_len, rounds * steps + 2) for layout in LAYOUTS[world_size]]
        entry = {run.layout.label: {"step_times_s": [], "latent_bytes": run.latent_bytes} for run in runs}
        for run in runs:
            _timed_step(run)  # warm-up, and the step whose collectives are counted
            entry[run.layout.label].update(calls=dict(run.stats.calls), bytes_sent=dict(run.stats.bytes_sent))
            _timed_step(run)
        for _ in range(rounds):
            for run in runs:
                entry[run.layout.label]["step_times_s"] += [_timed_step(run) for _ in range(steps)]
        results[context_len] = entry
        del runs
    return results


def run(context_lens: list[int], steps: int, rounds: int = 2) -> dict:
    """Launch the 2-rank and the 4-rank measurement; returns the JSON payload."""
    rows = []
    for world_size, layouts in LAYOUTS.items():
        per_rank = launch(world_size, measure_rank, list(context_lens), steps, rounds)
        for context_len in context_lens:
            for layout in layouts:
                by_rank = [result[context_len][layout.label] for result in per_rank][:layout.tp * layout.pcp]
                rows.append({"context_len": context_len, "label": layout.label, "tp": layout.tp, "pcp": layout.pcp,
                             "dcp": layout.dcp, "comm": layout.comm, "processes": world_size,
                             "oversubscribed": world_size > 2,
                             **summarize(slowest_rank_per_rep([r["step_times_s"] for r in by_rank])),
                             "latent_bytes_per_rank_layer": max(r["latent_bytes"] for r in by_rank),
                             "latent_bytes_per_rank_model": MODEL_LAYERS * max(r["latent_bytes"] for r in by_rank),
                             "latent_copies": layout.latent_copies,
                             "calls_per_step": by_rank[0]["calls"],
                             "bytes_sent_per_step_rank0": sum(by_rank[0]["bytes_sent"].values())})
    for row in rows:
        baseline = next(r for r in rows if r["context_len"] == row["context_len"] and r["processes"] ==
                        row["processes"] and r["tp"] == max(lay.tp for lay in LAYOUTS[row["processes"]])
                        and r["dcp"] == 1)
        row["speedup_vs_tp_replicated"] = baseline["median_s"] / row["median_s"]
    return {"config": {"mla": V2_LITE.__dict__, "num_heads": NUM_HEADS, "model_layers": MODEL_LAYERS, "batch": 1,
                       "dtype": "float32", "threads_per_rank": 1, "kv_block_size": BLOCK_SIZE,
                       "steps_per_round": steps, "rounds": rounds},
            "results": rows}


def table(payload: dict) -> str:
    rows = [[r["context_len"], r["label"], f"{r['processes']}" + (" (2 cores)" if r["oversubscribed"] else ""),
             r["median_s"] * 1e3, r["speedup_vs_tp_replicated"], r["latent_bytes_per_rank_layer"] / 2 ** 20,
             r["latent_bytes_per_rank_model"] / 2 ** 30, f"{r['latent_copies']:g}",
             " ".join(f"{name}={n}" for name, n in sorted(r["calls_per_step"].items())) or "-",
             r["bytes_sent_per_step_rank0"]] for r in payload["results"]]
    return format_table(["context", "layout", "processes", "median ms", "vs TP-replicated", "latent MiB/rank/layer",
                         f"latent GiB/rank ({MODEL_LAYERS} layers)", "latent copies", "calls/step",
                         "bytes sent/step (rank 0)"], rows)


def plot(payload: dict, results_dir: Path = RESULTS_DIR) -> Path:
    fig, ax = new_figure("MLA absorbed decode step (1 layer, DeepSeek-V2-Lite dims, batch 1)",
                         "context length (tokens)", "median step latency (ms)")
    for label in dict.fromkeys(r["label"] for r in payload["results"]):
        points = [r for r in payload["results"] if r["label"] == label]
        style = "s--" if points[0]["oversubscribed"] else "o-"
        ax.plot([r["context_len"] for r in points], [r["median_s"] * 1e3 for r in points], style,
                label=label + (" (4 procs, 2 cores)" if points[0]["oversubscribed"] else ""))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return save_figure(fig, "mla_decode", results_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"contexts {QUICK_CONTEXT_LENS}, 5 steps per round")
    parser.add_argument("--context-lens", type=int, nargs="+", help=f"default {FULL_CONTEXT_LENS}")
    parser.add_argument("--steps", type=int, help="timed steps per layout and round (default 5 quick, 10 full)")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    before = machine_info()
    payload = run(list(args.context_lens or (QUICK_CONTEXT_LENS if args.quick else FULL_CONTEXT_LENS)),
                  args.steps or (5 if args.quick else 10))
    print(table(payload))
    print(f"wrote {write_json('mla_decode', payload, before, args.results_dir)} and "
          f"{plot(payload, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
