"""Run several configs with torchrun and compare them in one table.

    .venv/bin/python launch/sweep.py --sweep configs/sweep_layouts.yaml [--out DIR] [--timeout-s 600]
                                     [--threads-per-rank 1]

(``launch/sweep.py`` is the thin entry point; the runner is this module.)

A sweep file lists runs, or a grid over fields of one base config (paths relative to the sweep file)::

    runs:                                   # either a list of runs ...
      - config: tp1_pcp1_dcp1.yaml          #   required
        name: baseline                      #   optional, default: the config's file stem
        nproc: 1                            #   optional, default: dp*pcp*tp of the config
        overrides: {inference.max_new_tokens: 4}   # optional "section.field: value" changes
        reference: baseline                 #   optional, the run to compare with (default: the first)
    base: tp2_pcp2_dcp2.yaml                # ... or a grid: every combination of the listed values
    grid: {parallel.decode_comm: [a2a, ag_rs], parallel.prefill_comm: [p2p, all_gather]}
    overrides: {inference.max_new_tokens: 8}       # optional, applied to every run (before its own)

Each run's config (overrides applied, relative paths made absolute) is written to ``DIR/<name>/config.yaml``
and launched with ``torchrun`` (``OMP_NUM_THREADS`` = ``--threads-per-rank``, default 1, for every run:
torchrun itself sets 1 only for several processes, and a 1-rank run with a thread per core contends with
everything else on the machine) on ``launch/infer.py`` (an ``inference`` section) or ``launch/train.py``
(a ``train`` section); its log and JSON output land beside it. Each run is compared with its reference
(the first run unless it names another, e.g. an MQA run with an MQA baseline); the difference is the
number of generated tokens that differ (inference) or the max abs loss difference (train). A run that
fails is reported in the table with its status and first error line, and the others still run. Writes
``DIR/sweep.csv`` and ``DIR/sweep.png``. Exit status: 0 when every run succeeded, 1 when one failed, 2 for
a malformed sweep file (one line naming the file and field).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cptoolkit.config import Config, ConfigError, config_from_dict, read_yaml, with_overrides
from cptoolkit.torchrun import free_port

# The launchers run from a checkout (torchrun launch/infer.py ...): the sweep runs them there.
REPO_ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = {"inference": REPO_ROOT / "launch" / "infer.py", "train": REPO_ROOT / "launch" / "train.py"}
RUN_KEYS = {"config", "name", "nproc", "overrides", "reference"}
TOP_KEYS = {"runs", "base", "grid", "overrides"}
CSV_FIELDS = ("name", "status", "nproc", "layout", "decode_tokens_per_s", "prefill_time_s", "kv_bytes_per_rank",
              "collectives_per_decode_step", "train_tokens_per_s", "final_loss", "reference", "diff_vs_reference",
              "error")


class SweepError(ValueError):
    """A malformed sweep file: the message names the file and the field."""


@dataclass(frozen=True)
class SweepRun:
    """One entry of a sweep: a config file, its overrides (``{"section.field": value}``) and launch size."""

    name: str
    config_path: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    nproc: int | None = None
    reference: str | None = None


def _fail(path: Path, where: str, rule: str) -> SweepError:
    return SweepError(f"{path}: {where}: {rule}")


def _overrides(path: Path, where: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(path, where, f"must be a mapping of 'section.field: value', got {type(raw).__name__}")
    for key in raw:
        if not isinstance(key, str) or not re.fullmatch(r"\w+\.\w+", key):
            raise _fail(path, f"{where}.{key}", "keys must be 'section.field', e.g. inference.max_new_tokens")
    return dict(raw)


def _config_path(path: Path, where: str, raw: Any) -> Path:
    if not isinstance(raw, str) or not raw:
        raise _fail(path, where, "must be a path to a config YAML (relative to the sweep file)")
    config_path = (path.parent / raw).resolve()
    if not config_path.is_file():
        raise _fail(path, where, f"config file {config_path} not found")
    return config_path


def _listed_runs(path: Path, raw: Any, shared: dict[str, Any]) -> list[SweepRun]:
    if not isinstance(raw, list) or not raw:
        raise _fail(path, "runs", "must be a non-empty list of {config, name?, nproc?, overrides?, reference?}")
    runs = []
    for index, entry in enumerate(raw):
        where = f"runs[{index}]"
        if not isinstance(entry, dict):
            raise _fail(path, where, f"must be a mapping with a 'config' key, got {type(entry).__name__}")
        unknown = sorted(set(entry) - RUN_KEYS)
        if unknown:
            raise _fail(path, f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(RUN_KEYS))})")
        config_path = _config_path(path, f"{where}.config", entry.get("config"))
        name = entry.get("name", config_path.stem)
        if not isinstance(name, str) or not re.fullmatch(r"[\w.=,+-]+", name):
            raise _fail(path, f"{where}.name", f"{name!r} must be a non-empty name of letters, digits and _.=,+-")
        nproc = entry.get("nproc")
        if nproc is not None and (not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1):
            raise _fail(path, f"{where}.nproc", f"{nproc!r} must be a positive integer")
        own = _overrides(path, f"{where}.overrides", entry.get("overrides"))
        runs.append(SweepRun(name, config_path, {**shared, **own}, nproc, entry.get("reference")))
    return runs


def _grid_runs(path: Path, base: Any, grid: Any, shared: dict[str, Any]) -> list[SweepRun]:
    config_path = _config_path(path, "base", base)
    if not isinstance(grid, dict) or not grid:
        raise _fail(path, "grid", "must be a non-empty mapping of 'section.field: [values]'")
    _overrides(path, "grid", grid)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _fail(path, f"grid.{key}", "must be a non-empty list of values")
    runs = []
    for combination in itertools.product(*grid.values()):
        chosen = dict(zip(grid, combination))
        name = ",".join(f"{key.split('.')[1]}={value}" for key, value in chosen.items())
        runs.append(SweepRun(re.sub(r"[^\w.=,+-]", "_", name), config_path, {**shared, **chosen}))
    return runs


def load_sweep(path: str | Path) -> list[SweepRun]:
    """Parse and check a sweep file; raises SweepError naming the file and the field."""
    path = Path(path)
    try:
        raw = read_yaml(path, kind="sweep")
    except ConfigError as err:
        raise SweepError(str(err)) from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: top level must be a mapping with 'runs', or 'base' and 'grid'")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise _fail(path, unknown[0], f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    shared = _overrides(path, "overrides", raw.get("overrides"))
    if ("runs" in raw) == ("grid" in raw or "base" in raw):
        raise _fail(path, "runs", "give either 'runs' (a list) or 'base' and 'grid', not both or neither")
    runs = _listed_runs(path, raw["runs"], shared) if "runs" in raw else _grid_runs(
        path, raw.get("base"), raw.get("grid"), shared)
    names = [run.name for run in runs]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise _fail(path, "runs", f"run name {duplicate!r} is used twice; give each run a distinct 'name'")
    for index, run in enumerate(runs):
        if run.reference is not None and run.reference not in names:
            raise _fail(path, f"runs[{index}].reference", f"{run.reference!r} is not the name of a run in this sweep "
                        f"(names: {', '.join(names)})")
    return runs


def derived_config(run: SweepRun) -> dict[str, Any]:
    """The run's config as a dict: the file's YAML with the overrides set and relative paths made absolute
    (so the copy written elsewhere still finds them)."""
    return with_overrides(read_yaml(run.config_path), run.overrides, run.config_path.parent)


def first_error_line(log: str) -> str:
    """The most telling line of a failed run's log: a launcher's one-line ``error:`` or ``failed:``, else the first
    exception line (other than torchrun's own ChildFailedError), else the last line."""
    match = re.search(r"\[rank \d+\] (error|failed): .*", log)
    if match:
        return match.group(0).strip()
    for line in log.splitlines():
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line) and "ChildFailedError" not in line:
            return line.strip()
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _launch(command: list[str], log_path: Path, timeout_s: float, threads_per_rank: int) -> int | None:
    """Run ``command`` in its own session with ``OMP_NUM_THREADS=threads_per_rank``, output to ``log_path``;
    the exit code, or None on timeout (the whole process group is killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank)}
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def _layout_label(cfg: Config) -> str:
    """E.g. ``tp2_pcp2_dcp4 kv2 p2p/a2a`` (inference) or ``tp2_pcp2 kv2 p2p`` (training: no decode)."""
    p = cfg.parallel
    dp = f"_dp{p.dp}" if p.dp > 1 else ""
    kv = "mqa" if cfg.model.num_kv_heads == 1 else f"kv{cfg.model.num_kv_heads}"
    if cfg.train is not None:
        return f"tp{p.tp}_pcp{p.pcp}{dp} {kv} {p.prefill_comm}"
    return f"tp{p.tp}_pcp{p.pcp}_dcp{p.dcp}{dp} {kv} {p.prefill_comm}/{p.decode_comm}"


def execute(run: SweepRun, out_dir: Path, timeout_s: float, threads_per_rank: int = 1) -> dict[str, Any]:
    """Validate, write and launch one run; returns its row (``status``: ok, invalid, failed or timeout)."""
    run_dir = out_dir / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"name": run.name, "config": str(run.config_path), "overrides": run.overrides,
                           "nproc": run.nproc, "layout": "-"}
    try:
        raw = derived_config(run)
        cfg = config_from_dict(raw, source=f"{run.config_path} (run {run.name})", base_dir=run.config_path.parent)
    except ValueError as err:
        return {**row, "status": "invalid", "error": str(err).splitlines()[0]}
    kind = "inference" if cfg.inference is not None else "train"
    nproc = run.nproc or cfg.parallel.world_size
    config_file, output, log_path = run_dir / "config.yaml", run_dir / "result.json", run_dir / "log.txt"
    config_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    output.unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), str(SCRIPTS[kind]), "--config", str(config_file),
               "--output", str(output)]
    row.update(kind=kind, nproc=nproc, layout=_layout_label(cfg), log=str(log_path))
    code = _launch(command, log_path, timeout_s, threads_per_rank)
    if code is None:
        return {**row, "status": "timeout", "error": f"no result within {timeout_s:.0f} s; see {log_path}"}
    if code != 0 or not output.is_file():
        return {**row, "status": "failed", "error": f"exit {code}: {first_error_line(log_path.read_text())}"}
    return {**row, "status": "ok", "error": "", **_result_fields(kind, json.loads(output.read_text()))}


def _result_fields(kind: str, result: dict[str, Any]) -> dict[str, Any]:
    """The compared fields of a run's JSON output: ``launch/train.py``'s per-step ``steps`` or
    ``launch/infer.py``'s ``requests`` and ``metrics``."""
    if kind == "train":
        losses = [float(step["loss"]) for step in result["steps"]]
        tokens_per_s = sorted(float(step["tokens_per_s"]) for step in result["steps"])
        return {"losses": losses, "final_loss": losses[-1] if losses else None,
                "train_tokens_per_s": tokens_per_s[len(tokens_per_s) // 2] if tokens_per_s else None}
    metrics = result["metrics"]
    return {"token_ids": [request["token_ids"] for request in result["requests"]],
            **{name: metrics[name] for name in ("decode_tokens_per_s", "prefill_time_s", "kv_bytes_per_rank",
                                               "collectives_per_decode_step")}}


def difference(row: dict[str, Any], reference: dict[str, Any]) -> float | int | None:
    """Generated tokens that differ from the reference's (position by position, a missing token counts),
    or the max abs difference of the losses; None when either run has no result or they differ in kind."""
    if row.get("status") != "ok" or reference.get("status") != "ok" or row["kind"] != reference["kind"]:
        return None
    if row["kind"] == "train":
        if len(row["losses"]) != len(reference["losses"]):
            return float("inf")
        return max((abs(a - b) for a, b in zip(row["losses"], reference["losses"])), default=0.0)
    mismatches = 0
    for ours, theirs in itertools.zip_longest(row["token_ids"], reference["token_ids"], fillvalue=[]):
        mismatches += sum(a != b for a, b in itertools.zip_longest(ours, theirs))
    return mismatches


def run_sweep(runs: list[SweepRun], out_dir: Path, timeout_s: float = 600.0, threads_per_rank: int = 1,
              echo=print) -> list[dict[str, Any]]:
    """Execute every run in order (a failure does not stop the others); returns the rows with
    ``reference`` and ``diff_vs_reference`` against each run's reference run (default: the first)."""
    rows = []
    for index, run in enumerate(runs):
        echo(f"[{index + 1}/{len(runs)}] {run.name} ...")
        rows.append(execute(run, out_dir, timeout_s, threads_per_rank))
        echo(f"    {rows[-1]['status']}" + (f": {rows[-1]['error']}" if rows[-1]["error"] else ""))
    by_name = {row["name"]: row for row in rows}
    for run, row in zip(runs, rows):
        row["reference"] = run.reference or rows[0]["name"]
        row["diff_vs_reference"] = difference(row, by_name[row["reference"]])
    return rows


def _cell(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None:
        return "-"
    if name == "prefill_time_s":
        return f"{value * 1e3:.1f} ms"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """One markdown table of every run, each compared with its reference run."""
    headers = ["run", "status", "nproc", "layout", "decode tok/s", "prefill", "KV bytes/rank", "collectives/step",
               "train tok/s (median)", "final loss", "reference", "diff vs ref", "error"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(row, name).replace("|", "/") for name in CSV_FIELDS) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars of decode tokens/s and prefill time per successful inference run; loss curves of train runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in rows if row["status"] == "ok"]
    inference = [row for row in ok if row["kind"] == "inference"]
    train = [row for row in ok if row["kind"] == "train"]
    panels = [("decode tokens/s", "decode_tokens_per_s", 1.0), ("prefill time (ms)", "prefill_time_s", 1e3)]
    panels = (panels if inference else []) + ([("training loss", "losses", None)] if train else [])
    panels = panels or [("no successful runs", None, None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1, 4.5), squeeze=False)
    for ax, (title, name, factor) in zip(axes[0], panels):
        ax.set_title(title)
        if factor is not None:
            ax.barh([row["name"] for row in inference], [row[name] * factor for row in inference])
            ax.invert_yaxis()  # runs top to bottom in sweep order, as in the table
        elif name == "losses":
            for row in train:
                ax.plot(range(1, len(row["losses"]) + 1), row["losses"], label=row["name"])
            ax.set_xlabel("step")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a sweep of configs with torchrun and compare them.")
    parser.add_argument("--sweep", required=True, help="sweep YAML (runs, or base + grid)")
    parser.add_argument("--out", help="output folder (default: sweep_results/<sweep file stem>)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per-run time limit (default 600)")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="OMP_NUM_THREADS of every rank (default 1)")
    args = parser.parse_args(argv)
    try:
        runs = load_sweep(args.sweep)
    except SweepError as err:
        print(f"sweep.py: error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out or f"sweep_results/{Path(args.sweep).stem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.threads_per_rank < 1:
        parser.error(f"--threads-per-rank ({args.threads_per_rank}) must be >= 1")
    rows = run_sweep(runs, out_dir, args.timeout_s, args.threads_per_rank)
    print(comparison_table(rows))
    write_csv(rows, out_dir / "sweep.csv")
    plot(rows, out_dir / "sweep.png")
    print(f"wrote {out_dir / 'sweep.csv'} and {out_dir / 'sweep.png'}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":  # python -m cptoolkit.sweep
    sys.exit(main())
