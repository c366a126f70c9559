"""End-to-end generation on the tiny model: ``launch/infer.py`` (torchrun) for every reference layout.

Runs the sweep ``configs/sweep_layouts.yaml`` (1-rank baseline first, then TP=2 x PCP=2 with DCP=2 and
DCP=4, GQA and MQA) through ``launch/sweep.py`` and reports per layout: prefill time, decode tokens/s,
KV bytes per rank, collectives per decode step, and how many generated tokens differ from the
baseline of the same model (GQA or MQA). One thread per rank. Runs with more ranks than cores
oversubscribe them (4 ranks on the 2-core machine), so their timings measure contention as much as
the algorithm: the table marks them.

    python bench/end_to_end.py [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/end_to_end.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, add_results_dir_argument, format_table, machine_info, write_json
from cptoolkit import sweep

SWEEP_FILE = Path(__file__).resolve().parents[1] / "configs" / "sweep_layouts.yaml"
ROW_FIELDS = ("name", "status", "nproc", "layout", "prefill_time_s", "decode_tokens_per_s", "kv_bytes_per_rank",
              "collectives_per_decode_step", "reference", "diff_vs_reference", "error")


def run(sweep_file: Path = SWEEP_FILE, max_new_tokens: int | None = None, timeout_s: float = 600.0) -> dict:
    """Run every layout of ``sweep_file`` (optionally with ``inference.max_new_tokens`` overridden);
    returns the JSON payload. Logs and per-run outputs go to a temporary folder."""
    runs = sweep.load_sweep(sweep_file)
    if max_new_tokens is not None:
        runs = [dataclasses.replace(r, overrides={**r.overrides, "inference.max_new_tokens": max_new_tokens})
                for r in runs]
    with tempfile.TemporaryDirectory(prefix="cptoolkit_e2e_") as out_dir:
        rows = sweep.run_sweep(runs, Path(out_dir), timeout_s, threads_per_rank=1)
    cpu_count = os.cpu_count()
    results = [{**{name: row.get(name) for name in ROW_FIELDS},
                "oversubscribed": isinstance(row.get("nproc"), int) and row["nproc"] > cpu_count} for row in rows]
    return {"config": {"sweep": str(sweep_file.relative_to(SWEEP_FILE.parents[1])), "cpu_count": cpu_count,
                       "threads_per_rank": 1,
                       "max_new_tokens_override": max_new_tokens},
            "results": results}


def table(payload: dict) -> str:
    def ms(value):
        return "-" if value is None else value * 1e3

    def shown(value):
        return "-" if value is None else value

    rows = [[r["name"] + (" (oversubscribed)" if r["oversubscribed"] else ""), r["status"], r["nproc"], r["layout"],
             ms(r["prefill_time_s"]), shown(r["decode_tokens_per_s"]), shown(r["kv_bytes_per_rank"]),
             shown(r["collectives_per_decode_step"]), r["reference"], shown(r["diff_vs_reference"]), r["error"] or ""]
            for r in payload["results"]]
    return format_table(["run", "status", "ranks", "layout", "prefill ms", "decode tok/s", "KV bytes/rank",
                         "collectives/step", "reference", "tokens differing from reference", "error"], rows)


def plot(payload: dict, results_dir: Path = RESULTS_DIR) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "end_to_end.png"
    rows = [{**r, "kind": "inference"} for r in payload["results"]]
    sweep.plot(rows, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="generate 8 tokens per request instead of 16")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    before = machine_info()
    payload = run(max_new_tokens=8 if args.quick else None)
    print(table(payload))
    print(f"wrote {write_json('end_to_end', payload, before, args.results_dir)} and {plot(payload, args.results_dir)}")
    return 0 if all(r["status"] == "ok" for r in payload["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
