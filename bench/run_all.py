"""Run every benchmark, refresh ``bench/results/*.json`` and PNGs, and write ``bench/results/SUMMARY.md``.

    python bench/run_all.py [--quick] [--only prefill_scaling decode ...] [--results-dir DIR]

``--quick`` (fewer lengths and repetitions, about 4 minutes on the 2-core machine) is what ``make bench``
runs. A benchmark that fails is reported and the others still run; the summary holds the tables of
the benchmarks that completed in this invocation, each with the machine's load average around it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/run_all.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import (all_reduce, balance, decode, eager_floor, end_to_end, gpu, long_prompt, matmul_plan, mla_decode, moe, prefill_scaling,
                   sampling, sliding_window, speculative)
from bench.common import RESULTS_DIR, add_results_dir_argument

BENCHMARKS = {"prefill_scaling": (prefill_scaling.main, prefill_scaling.table),
              "balance": (balance.main, balance.tables),
              "decode": (decode.main, decode.table),
              "end_to_end": (end_to_end.main, end_to_end.table),
              "long_prompt": (long_prompt.main, long_prompt.table),
              "mla_decode": (mla_decode.main, mla_decode.table),
              "speculative": (speculative.main, speculative.table),
              "sliding_window": (sliding_window.main, sliding_window.tables),
              "sampling": (sampling.main, sampling.table),
              "moe": (moe.main, moe.table),
              "matmul_plan": (matmul_plan.main, matmul_plan.tables),
              "all_reduce": (all_reduce.main, all_reduce.table),
              "eager_floor": (eager_floor.main, eager_floor.table),
              "gpu": (gpu.main, gpu.tables)}


def run_benchmark(name: str, quick: bool, results_dir: Path) -> dict:
    """Run one benchmark's ``main``; returns ``{"name", "status", "seconds", "error"}``."""
    main, _ = BENCHMARKS[name]
    print(f"\n=== {name} ===", flush=True)
    if name == "gpu" and not torch.cuda.is_available():
        return {"name": name, "status": "skipped", "seconds": 0.0, "error": "no GPU on this machine"}
    start = time.perf_counter()
    try:
        code, error = main(["--quick"] * quick + ["--results-dir", str(results_dir)]), ""
    except Exception:  # noqa: BLE001 - one broken benchmark must not stop the others; its traceback is shown
        traceback.print_exc()
        code, error = 1, traceback.format_exc().strip().splitlines()[-1]
    return {"name": name, "status": "ok" if code == 0 else "failed", "seconds": time.perf_counter() - start,
            "error": error or ("" if code == 0 else f"exit status {code}")}


def summary(outcomes: list[dict], quick: bool, results_dir: Path = RESULTS_DIR) -> str:
    """Markdown: one line per benchmark, then the tables of those that completed (read back from JSON)."""
    lines = [f"# Benchmark summary ({'--quick' if quick else 'full'} run)", "",
             "Written by `python bench/run_all.py" + (" --quick" if quick else "") + "`. One rank per core, one thread "
             "per rank, gloo on 127.0.0.1; times are medians over repetitions (min/max beside them).", ""]
    lines += [f"- {o['name']}: {o['status']} in {o['seconds']:.0f} s" + (f" ({o['error']})" if o["error"] else "")
              for o in outcomes]
    for outcome in outcomes:
        _, table = BENCHMARKS[outcome["name"]]
        path = results_dir / f"{outcome['name']}.json"
        if outcome["status"] != "ok" or not path.is_file():
            continue
        document = json.loads(path.read_text())
        before, after = document["machine_before"], document["machine_after"]
        lines += ["", f"## {outcome['name']}", "",
                  f"{before['utc']}, {before['cpu_count']} cores, load average {before['loadavg_1m']} before / "
                  f"{after['loadavg_1m']} after; config `{json.dumps(document['config'])}`", "", table(document)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer lengths and repetitions (about 4 minutes)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    outcomes = [run_benchmark(name, args.quick, args.results_dir) for name in (args.only or BENCHMARKS)]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "SUMMARY.md").write_text(summary(outcomes, args.quick, args.results_dir))
    print(f"\nwrote {args.results_dir / 'SUMMARY.md'}")
    for outcome in outcomes:
        print(f"  {outcome['name']}: {outcome['status']} in {outcome['seconds']:.0f} s {outcome['error']}")
    return 0 if all(outcome["status"] != "failed" for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
