"""Fault tolerance of the real launchers: killed ranks, frozen ranks, a killed parent or torchrun, back-to-back runs.

    python bench/fault_tolerance.py [--kills 5] [--freezes 5] [--parent-kills 5] [--torchrun-kills 5] [--runs 20]
                                    [--results-dir DIR]

Every job runs the 4 ranks of ``configs/tp2_pcp2_dcp4.yaml``:
- **kill**: a ``torchrun launch/infer.py`` job; once it has generated 16 tokens, one worker gets SIGKILL; the
  job must exit non-zero within 30 s (time measured from the signal to torchrun's exit);
- **freeze**: the same with SIGSTOP and ``runtime.collective_timeout_s: 5``; the job must exit
  non-zero within the timeout plus a few seconds;
- **parent kill**: a ``cptoolkit serve`` job, once it answers ``/health``, gets SIGKILL on the ``cptoolkit``
  process; within ``GONE_WITHIN_S`` no process of the job (torchrun, ranks) may be left, nor any file in the
  job's own ``TMPDIR``;
- **torchrun kill**: the same with SIGKILL on torchrun; no rank may be left;
- **back-to-back**: ``--runs`` complete runs in a row (480 s limit each), which must all exit 0 and
  produce identical tokens.
Prints one table and writes ``fault_tolerance.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_results_dir_argument, format_table, machine_info, write_json  # noqa: E402
from cptoolkit.torchrun import children  # noqa: E402
from tests.multiproc import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tp2_pcp2_dcp4.yaml"
CLI = str(Path(sys.executable).with_name("cptoolkit"))
GONE_WITHIN_S = 10


def _command(config: Path, output: Path | None = None) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "launch/infer.py", "--config", str(config)]
    return command + (["--output", str(output)] if output else [])


def _config_with(workdir: Path, name: str, runtime: dict, inference: dict) -> Path:
    raw = yaml.safe_load(CONFIG.read_text())
    raw["model"]["checkpoint"] = str(CONFIG.parent / raw["model"]["checkpoint"])  # the copy lives elsewhere
    raw["runtime"].update(runtime)
    raw["inference"].update(inference)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def signal_trial(config: Path, signum: int, log: Path) -> dict:
    """Start the job, send ``signum`` to its third worker after 16 generated tokens, time the exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        job = subprocess.Popen(_command(config), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 180
            while "generated 16 tokens" not in log.read_text():
                if job.poll() is not None or time.monotonic() > deadline:
                    return {"ok": False, "why": "the job ended or stalled before 16 tokens",
                            "log_tail": log.read_text()[-2000:]}
                time.sleep(0.1)
            workers = Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()
            os.kill(int(workers[2]), signum)
            signalled = time.monotonic()
            try:
                returncode = job.wait(timeout=120)
            except subprocess.TimeoutExpired:
                return {"ok": False, "why": "still running 120 s after the signal"}
            return {"ok": returncode != 0, "returncode": returncode, "exit_after_s": time.monotonic() - signalled}
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()


def _identity(pid: int) -> tuple[int, str] | None:
    """``(pid, start time)`` of a live process (a zombie has ended), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (pid, fields[19])


def _job_processes(parent: int) -> list[tuple[int, str]]:
    """The identities of ``parent``, its torchrun and torchrun's ranks, once all 4 ranks exist."""
    torchrun = children(parent)
    ranks = children(torchrun[0]) if torchrun else []
    return [i for i in map(_identity, [parent, *torchrun, *ranks]) if i] if len(ranks) == 4 else []


def cli_kill_trial(target: str, workdir: Path, log: Path) -> dict:
    """``cptoolkit serve`` on 4 ranks with its own TMPDIR; once healthy, SIGKILL ``target`` (``parent``: the
    cptoolkit process, ``torchrun``: its child); time until no process of the job is left, list what is."""
    tmpdir = workdir / f"{log.stem}-tmp"
    tmpdir.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmpdir), "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor")}
    with open(log, "w") as out:
        job = subprocess.Popen([CLI, "serve", "--config", str(CONFIG), "--port", str(port)], cwd=REPO, stdout=out,
                               stderr=subprocess.STDOUT, env=env)
    processes: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + 240
        while not _healthy(port):
            if job.poll() is not None or time.monotonic() > deadline:
                return {"ok": False, "why": "the server did not come up"}
            time.sleep(0.2)
        processes = _job_processes(job.pid)
        if len(processes) != 6:
            return {"ok": False, "why": f"expected cptoolkit, torchrun and 4 ranks, found {len(processes)} processes"}
        os.kill(processes[0 if target == "parent" else 1][0], signal.SIGKILL)
        signalled = time.monotonic()
        while [p for p in processes if _identity(p[0]) == p] and time.monotonic() - signalled < 60:
            time.sleep(0.05)
        gone_after_s = time.monotonic() - signalled
        survivors = [p for p in processes if _identity(p[0]) == p]
        left_files = sorted(path.name for path in tmpdir.iterdir())
        return {"ok": not survivors and gone_after_s < GONE_WITHIN_S and not left_files,
                "gone_after_s": gone_after_s, "survivors": len(survivors), "left_files": left_files}
    finally:
        for pid, start in processes:
            if _identity(pid) == (pid, start):
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.kill(pid, signal.SIGKILL)
        job.kill()
        job.wait()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def back_to_back(config: Path, workdir: Path, runs: int) -> list[dict]:
    trials = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for run in range(runs):
        output = workdir / f"run{run}.json"
        start = time.monotonic()
        try:
            done = subprocess.run(_command(config, output), cwd=REPO, capture_output=True, text=True,
                                  timeout=480, env=env)
            returncode = done.returncode
        except subprocess.TimeoutExpired:
            returncode = None
        tokens = ([r["token_ids"] for r in json.loads(output.read_text())["requests"]]
                  if returncode == 0 and output.is_file() else None)
        trials.append({"returncode": returncode, "seconds": time.monotonic() - start, "tokens": tokens})
        print(f"run {run + 1}/{runs}: exit {returncode}, {trials[-1]['seconds']:.1f} s", flush=True)
    return trials


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--freezes", type=int, default=5)
    parser.add_argument("--parent-kills", type=int, default=5)
    parser.add_argument("--torchrun-kills", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    before = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        long_job = {"prompts": ["hello", "world"], "max_new_tokens": 400}
        kill_config = _config_with(workdir, "kill", {}, long_job)
        freeze_config = _config_with(workdir, "freeze", {"collective_timeout_s": 5}, long_job)
        kills = [signal_trial(kill_config, signal.SIGKILL, workdir / f"kill{i}.log") for i in range(args.kills)]
        freezes = [signal_trial(freeze_config, signal.SIGSTOP, workdir / f"freeze{i}.log")
                   for i in range(args.freezes)]
        parent_kills = [cli_kill_trial("parent", workdir, workdir / f"parent{i}.log")
                        for i in range(args.parent_kills)]
        torchrun_kills = [cli_kill_trial("torchrun", workdir, workdir / f"torchrun{i}.log")
                          for i in range(args.torchrun_kills)]
        runs = back_to_back(CONFIG, workdir, args.runs)
    reference = runs[0]["tokens"] if runs else None
    identical = sum(r["tokens"] is not None and r["tokens"] == reference for r in runs)
    rows = []
    for name, trials in (("SIGKILL one worker", kills), ("SIGSTOP one worker (timeout 5 s)", freezes)):
        times = [t["exit_after_s"] for t in trials if "exit_after_s" in t]
        rows.append((name, len(trials), sum(t["ok"] for t in trials),
                     f"{min(times):.1f}-{max(times):.1f} s" if times else "-"))
    for name, trials in (("SIGKILL the cptoolkit serve process: nothing left", parent_kills),
                         ("SIGKILL torchrun (cptoolkit serve): no rank left", torchrun_kills)):
        times = [t["gone_after_s"] for t in trials if "gone_after_s" in t]
        rows.append((name, len(trials), sum(t["ok"] for t in trials),
                     f"{min(times):.2f}-{max(times):.2f} s to the last exit" if times else "-"))
    seconds = [r["seconds"] for r in runs]
    rows.append((f"back-to-back runs ({identical} with identical tokens)", len(runs),
                 sum(r["returncode"] == 0 for r in runs),
                 f"{min(seconds):.1f}-{max(seconds):.1f} s per run" if runs else "-"))
    print(format_table(["trial", "runs", "as required", "time"], rows))
    write_json("fault_tolerance", {"kills": kills, "freezes": freezes, "parent_kills": parent_kills,
                                   "torchrun_kills": torchrun_kills,
                                   "back_to_back": [{k: v for k, v in r.items() if k != "tokens"} for r in runs],
                                   "back_to_back_identical_tokens": identical}, before, args.results_dir)
    all_ok = all(t["ok"] for t in kills + freezes + parent_kills + torchrun_kills) and identical == len(runs) \
        and all(r["returncode"] == 0 for r in runs)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
