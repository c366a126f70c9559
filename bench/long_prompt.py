"""Whole-model generation with a long prompt: one rank vs PCP=2 / DCP=2 on two cores.

The engine (megatron-core GPT with cptoolkit attention, 4 layers, hidden 512, 8 query / 2 KV heads)
prefills one random prompt of ``N`` tokens and decodes 8 tokens greedily, on 1 rank (TP=PCP=DCP=1)
and on 2 ranks (TP=1, PCP=2, DCP=2: the prompt split by DualChunkSwap, the cache by DCP). Both must
generate the same tokens. Unlike ``end_to_end`` (tiny model, 4 ranks on 2 cores), every rank has a
core here, so this is where context parallelism pays for a whole model: the prefill of every layer
(attention *and* MLP, since PCP splits the tokens) is shared by the two cores.

    python bench/long_prompt.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/long_prompt.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from bench.common import (RESULTS_DIR, add_results_dir_argument, format_table, launch, machine_info, new_figure,
                          save_figure, summarize, write_json)
from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel

MODEL = {"num_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "num_kv_heads": 2,
         "ffn_hidden_size": 1536, "vocab_size": 512, "max_seq_len": 16384 + 64, "seed": 3}
NEW_TOKENS = 8
FULL_LENGTHS, QUICK_LENGTHS = (2048, 4096, 8192, 16384), (2048, 4096)
LAYOUTS = {1: {"tp": 1, "pcp": 1, "dcp": 1}, 2: {"tp": 1, "pcp": 2, "dcp": 2}}


def _generate_rank(rank: int, world_size: int, prompt_len: int, reps: int, model: dict) -> dict:
    raw = {"parallel": LAYOUTS[world_size], "model": model, "runtime": {"device": "cpu"},
           "inference": {"prompts": ["x"], "batch_size": 1, "kv_block_size": 64}}
    cfg = config_from_dict(raw, source="<long_prompt>")
    groups = initialize_model_parallel(tp=1, pcp=world_size, dcp=world_size, num_heads=8, num_kv_heads=2)
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        prompt = torch.randint(0, model["vocab_size"], (prompt_len,), generator=torch.Generator().manual_seed(0))
        prefill_s, decode_s, tokens = [], [], None
        for _ in range(reps):
            engine.metrics = type(engine.metrics)()
            dist.barrier()
            tokens = engine.generate([prompt.tolist()], SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS))
            prefill_s.append(engine.metrics.prefill_time_s)
            decode_s.append(engine.metrics.decode_time_s / max(engine.metrics.decode_steps, 1))
        return {"prefill_s": prefill_s, "decode_step_s": decode_s, "tokens": tokens[0].token_ids,
                "kv_bytes_per_rank": engine.cache.bytes_per_rank}
    finally:
        destroy_model_parallel()


def run(lengths: tuple[int, ...], reps: int, model: dict = MODEL) -> dict:
    rows = []
    for prompt_len in lengths:
        per_layout = {}
        for world_size in LAYOUTS:
            ranks = launch(world_size, _generate_rank, prompt_len, reps, model)
            per_layout[world_size] = {
                "prefill": summarize([max(r["prefill_s"][i] for r in ranks) for i in range(reps)]),
                "decode_step": summarize([max(r["decode_step_s"][i] for r in ranks) for i in range(reps)]),
                "tokens": ranks[0]["tokens"], "kv_bytes_per_rank": ranks[0]["kv_bytes_per_rank"]}
        one, two = per_layout[1], per_layout[2]
        rows.append({"prompt_len": prompt_len, "one_rank": one, "pcp2_dcp2": two,
                     "prefill_speedup": one["prefill"]["median_s"] / two["prefill"]["median_s"],
                     "decode_step_speedup": one["decode_step"]["median_s"] / two["decode_step"]["median_s"],
                     "same_tokens": one["tokens"] == two["tokens"]})
    return {"config": {"model": model, "new_tokens": NEW_TOKENS, "reps": reps, "threads_per_rank": 1},
            "rows": rows}


def table(payload: dict) -> str:
    headers = ["prompt tokens", "1 rank prefill s", "PCP=2 prefill s", "prefill speedup",
               "1 rank decode step ms", "DCP=2 decode step ms", "decode speedup", "KV MiB/rank 1 → 2",
               "same tokens"]
    rows = [[r["prompt_len"], f"{r['one_rank']['prefill']['median_s']:.3f}", f"{r['pcp2_dcp2']['prefill']['median_s']:.3f}",
             f"{r['prefill_speedup']:.2f}x", f"{r['one_rank']['decode_step']['median_s'] * 1e3:.1f}",
             f"{r['pcp2_dcp2']['decode_step']['median_s'] * 1e3:.1f}", f"{r['decode_step_speedup']:.2f}x",
             f"{r['one_rank']['kv_bytes_per_rank'] / 2**20:.0f} → {r['pcp2_dcp2']['kv_bytes_per_rank'] / 2**20:.0f}",
             r["same_tokens"]] for r in payload["rows"]]
    return format_table(headers, rows)


def plot(payload: dict, results_dir: Path = RESULTS_DIR) -> Path:
    fig, ax = new_figure("Long prompt, whole model: 2 ranks vs 1", "prompt tokens", "speedup over 1 rank")
    lengths = [r["prompt_len"] for r in payload["rows"]]
    ax.plot(lengths, [r["prefill_speedup"] for r in payload["rows"]], marker="o", label="prefill (PCP=2)")
    ax.plot(lengths, [r["decode_step_speedup"] for r in payload["rows"]], marker="o", label="decode step (DCP=2)")
    ax.axhline(2.0, linestyle=":", color="grey", label="ideal (2 cores)")
    ax.set_xscale("log", base=2)
    ax.legend()
    return save_figure(fig, "long_prompt", results_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"prompts of {QUICK_LENGTHS} tokens, 2 repetitions")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    before = machine_info()
    payload = run(QUICK_LENGTHS if args.quick else FULL_LENGTHS, 2 if args.quick else 3)
    print(table(payload))
    write_json("long_prompt", payload, before, args.results_dir)
    plot(payload, args.results_dir)
    return 0 if all(r["same_tokens"] for r in payload["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
