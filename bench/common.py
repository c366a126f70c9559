"""What every benchmark shares: timing statistics, the rank launcher, tables, JSON and plots.

Timings are wall-clock seconds from ``time.perf_counter``. Every multi-rank measurement starts
after a barrier, so ranks begin together; a step's time is the slowest rank's. Each JSON file
records the machine's load average before and after the run, because the 2-core CI machine is
shared and background load shows up directly in the numbers.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tests.multiproc import run_ranks

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def summarize(times_s: Sequence[float]) -> dict[str, float]:
    """Median and spread of repeated timings: ``{"median_s", "min_s", "max_s", "reps"}``."""
    if not times_s:
        raise ValueError("times_s is empty: time at least one repetition")
    return {"median_s": statistics.median(times_s), "min_s": min(times_s), "max_s": max(times_s),
            "reps": len(times_s)}


def slowest_rank_per_rep(per_rank_times_s: Sequence[Sequence[float]]) -> list[float]:
    """``per_rank_times_s[rank][rep]`` -> the slowest rank's time of each repetition."""
    return [max(rep_times) for rep_times in zip(*per_rank_times_s)]


def time_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call of ``fn``."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def launch(world_size: int, fn: Callable[..., Any], *args, timeout_s: float = 1800.0, **kwargs) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks, one thread each
    (``tests.multiproc.run_ranks``); returns the per-rank results."""
    return run_ranks(world_size, fn, *args, timeout_s=timeout_s, collective_timeout_s=timeout_s, **kwargs)


def machine_info() -> dict[str, Any]:
    """Host facts that qualify every timing: cores, torch version, current load average."""
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def add_results_dir_argument(parser) -> None:
    """``--results-dir DIR`` (default ``bench/results``): where JSON and PNG files go."""
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="folder for the JSON and PNG results (default bench/results)")


def write_json(name: str, payload: dict[str, Any], machine_before: dict[str, Any],
               results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``payload`` plus the machine state before and after the run to ``results_dir/name.json``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    document = {"benchmark": name, "machine_before": machine_before, "machine_after": machine_info(), **payload}
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (also readable as plain text)."""
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def new_figure(title: str, xlabel: str, ylabel: str):
    """A matplotlib (Agg) figure and axes with a title and axis labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def save_figure(fig, name: str, results_dir: Path = RESULTS_DIR) -> Path:
    import matplotlib.pyplot as plt

    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
