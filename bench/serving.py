"""Long-context serving: chunked prefill, prefix caching, and streams that keep flowing while a long
prompt arrives. One rank vs TP=1 x PCP=2 x DCP=2 on two cores, the 4-layer hidden-512 model of
``bench/long_prompt.py``.

    python bench/serving.py [--quick] [--results-dir DIR]

Four measurements, each in fresh rank processes (so peak RSS is the measurement's own):
- **chunked vs whole prefill** of one long prompt (PCP=2): prefill time with ``prefill_chunk_size`` vs
  without (median of 3 interleaved repetitions), and the generated tokens (must be equal);
- **shared prefix**: a request whose prompt shares a long prefix with an earlier one, with
  ``prefix_caching``: its time to first token vs the first request's;
- **streams during a long prefill**: two requests decode; a long prompt arrives; the longest gap
  between the streams' tokens with chunking vs without;
- **peak RSS per rank** during a long prefill, chunked vs whole.
Prints one table and writes ``serving.json``.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/serving.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from bench.common import add_results_dir_argument, format_table, launch, machine_info, write_json
from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel

MODEL = {"num_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "num_kv_heads": 2,
         "ffn_hidden_size": 1536, "vocab_size": 512, "seed": 3}
FULL = {"long": 16384, "chunk": 2048, "prefix": 8192, "arrival": 16384, "arrival_chunk": 1024, "rss": 32768,
        "rss_chunk": 2048}
QUICK = {"long": 2048, "chunk": 512, "prefix": 2048, "arrival": 2048, "arrival_chunk": 256, "rss": 4096,
         "rss_chunk": 512}
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=4)


def _engine(world_size: int, max_seq_len: int, **inference):
    layout = {"tp": 1, "pcp": world_size, "dcp": world_size}
    raw = {"parallel": layout, "model": {**MODEL, "max_seq_len": max_seq_len}, "runtime": {"device": "cpu"},
           "inference": {"prompts": ["x"], "batch_size": 4, "kv_block_size": 64, **inference}}
    groups = initialize_model_parallel(tp=1, pcp=world_size, dcp=world_size, num_heads=8, num_kv_heads=2)
    return build_engine(config_from_dict(raw, source="<serving>"), groups, torch.device("cpu"))


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, MODEL["vocab_size"], (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prefill_rank(rank: int, world_size: int, length: int, chunk: int | None) -> dict:
    """One prompt of ``length`` tokens; prefill time, tokens and this rank's peak RSS."""
    try:
        engine = _engine(world_size, length + 64, prefill_chunk_size=chunk)
        dist.barrier()
        result = engine.generate([_prompt(length, 0)], GREEDY)[0]
        return {"prefill_s": engine.metrics.prefill_time_s, "tokens": result.token_ids,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    finally:
        destroy_model_parallel()


def _prefix_rank(rank: int, world_size: int, prefix_len: int) -> dict:
    """Two requests sharing ``prefix_len`` tokens, one after the other, with prefix caching."""
    try:
        engine = _engine(world_size, prefix_len + 256, prefix_caching=True)
        prefix = _prompt(prefix_len, 1)
        dist.barrier()
        first = engine.generate([prefix + _prompt(40, 2)], GREEDY)[0]
        second = engine.generate([prefix + _prompt(56, 3)], GREEDY)[0]
        return {"first_ttft_s": first.metrics.time_to_first_token_s,
                "second_ttft_s": second.metrics.time_to_first_token_s,
                "second_cached_tokens": second.metrics.cached_prompt_tokens}
    finally:
        destroy_model_parallel()


def _arrival_rank(rank: int, world_size: int, length: int, chunk: int | None) -> dict:
    """Two streams decode; after 4 steps a ``length``-token prompt arrives; once it has its first token
    and 3 more steps ran, the streams are cancelled. Their longest gap between two tokens."""
    try:
        engine = _engine(world_size, length + 256, prefill_chunk_size=chunk)
        streams = [engine.add_request(_prompt(16, 10 + i), SamplingParams(temperature=0.0, max_new_tokens=200))
                   for i in range(2)]
        dist.barrier()
        for _ in range(4):
            engine.step()
        arrival = engine.add_request(_prompt(length, 4), SamplingParams(temperature=0.0, max_new_tokens=1))
        start, done_s = time.perf_counter(), None
        while done_s is None:
            if any(event.request_id == arrival for event in engine.step()):
                done_s = time.perf_counter() - start
        for _ in range(3):
            engine.step()
        for request_id in streams:
            engine.cancel(request_id)
        while engine.has_unfinished_requests():
            engine.step()
        gaps = [engine.result(request_id).metrics.max_inter_token_gap_s for request_id in streams]
        return {"max_gap_s": max(gaps), "long_prompt_done_s": done_s}
    finally:
        destroy_model_parallel()


def _slowest(ranks: list[dict], key: str) -> float:
    return max(r[key] for r in ranks)


def _interleaved(reps: int, variants: dict, fn, *args) -> dict:
    """``{name: [per-rep rank results]}``: every repetition runs every variant in turn, so background load
    hits the variants alike (ratios are taken between medians of the same run)."""
    runs = {name: [] for name in variants}
    for _ in range(reps):
        for name, chunk in variants.items():
            runs[name].append(launch(2, fn, *args, chunk))
    return runs


def _median_of_slowest(reps: list[list[dict]], key: str) -> float:
    return statistics.median(_slowest(ranks, key) for ranks in reps)


def run(sizes: dict, reps: int) -> dict:
    chunked = _interleaved(reps, {"whole": None, "chunked": sizes["chunk"]}, _prefill_rank, sizes["long"])
    prefix = {world: launch(world, _prefix_rank, sizes["prefix"]) for world in (1, 2)}
    arrival = _interleaved(reps, {"whole": None, "chunked": sizes["arrival_chunk"]}, _arrival_rank, sizes["arrival"])
    rss = {name: launch(2, _prefill_rank, sizes["rss"], chunk) for name, chunk in (("whole", None),
                                                                                  ("chunked", sizes["rss_chunk"]))}
    return {
        "sizes": sizes, "model": MODEL, "reps": reps,
        "chunked_prefill": {
            "whole_s": _median_of_slowest(chunked["whole"], "prefill_s"),
            "chunked_s": _median_of_slowest(chunked["chunked"], "prefill_s"),
            "same_tokens": all(ranks[0]["tokens"] == chunked["whole"][0][0]["tokens"]
                               for runs in chunked.values() for ranks in runs)},
        "prefix_caching": {
            str(world): {"first_ttft_s": _slowest(ranks, "first_ttft_s"),
                         "second_ttft_s": _slowest(ranks, "second_ttft_s"),
                         "second_cached_tokens": ranks[0]["second_cached_tokens"]} for world, ranks in prefix.items()},
        "arrival": {name: {"max_gap_s": _median_of_slowest(runs, "max_gap_s"),
                           "long_prompt_done_s": _median_of_slowest(runs, "long_prompt_done_s")}
                    for name, runs in arrival.items()},
        "peak_rss_mib": {name: [r["peak_rss_mib"] for r in ranks] for name, ranks in rss.items()},
    }


def table(payload: dict) -> str:
    s, c, p, a, r = (payload["sizes"], payload["chunked_prefill"], payload["prefix_caching"], payload["arrival"],
                     payload["peak_rss_mib"])
    rows = [
        (f"prefill {s['long']} tokens, PCP=2: chunk {s['chunk']} / whole", f"{c['chunked_s']:.2f} s / {c['whole_s']:.2f} s",
         f"{c['chunked_s'] / c['whole_s']:.2f}", f"same tokens: {c['same_tokens']}")]
    for world, label in (("1", "1 rank"), ("2", "PCP=2 DCP=2")):
        rows.append((f"TTFT, 2nd request sharing {s['prefix']} tokens ({label}): 2nd / 1st",
                     f"{p[world]['second_ttft_s']:.3f} s / {p[world]['first_ttft_s']:.3f} s",
                     f"{p[world]['second_ttft_s'] / p[world]['first_ttft_s']:.3f}",
                     f"{p[world]['second_cached_tokens']} prompt tokens from the cache"))
    rows.append((f"longest stream gap while {s['arrival']} tokens arrive: chunk {s['arrival_chunk']} / whole",
                 f"{a['chunked']['max_gap_s']:.3f} s / {a['whole']['max_gap_s']:.3f} s",
                 f"{a['chunked']['max_gap_s'] / a['whole']['max_gap_s']:.3f}",
                 f"long prompt done in {a['chunked']['long_prompt_done_s']:.2f} s / {a['whole']['long_prompt_done_s']:.2f} s"))
    rows.append((f"peak RSS per rank, {s['rss']}-token prefill: chunk {s['rss_chunk']} / whole",
                 f"{max(r['chunked']):.0f} MiB / {max(r['whole']):.0f} MiB", f"{max(r['chunked']) / max(r['whole']):.2f}",
                 ""))
    return format_table(["measurement", "values", "ratio", "note"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    before = machine_info()
    payload = run(QUICK if args.quick else FULL, 1 if args.quick else 3)
    print(table(payload))
    write_json("serving", payload, before, args.results_dir)
    return 0 if payload["chunked_prefill"]["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
