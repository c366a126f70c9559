"""Schema fuzz of real ``cptoolkit serve`` jobs: thousands of requests over the whole request schema.

    python bench/serve_fuzz.py [--requests 2000] [--ranks 1 4] [--clients 8] [--results-dir DIR]

For each layout (1 rank: ``configs/tp1_pcp1_dcp1.yaml``; 4 ranks: ``configs/tp2_pcp2_dcp4.yaml``, TP2 x PCP2 x
DCP4, under torchrun) a ``cptoolkit serve`` job of checkpoints/tiny-gqa is started and sent ``--requests``
bodies drawn by ``tests/serve_fuzz_schema.py`` (hypothesis, derandomized: the same bodies every run), from
``--clients`` threads at once. Counted: HTTP statuses; 5xx other than the engine-death 503; errors without
OpenAI's body; streams that do not end with ``[DONE]`` or carry an error event; then whether ``/health`` is
200 and the job still runs, and whether SIGTERM drains it to exit 0. tiny-gqa's tokenizer has no chat
template, so chat bodies that pass validation end as the tokenizer's 400. Prints one table and writes
``serve_fuzz.json``.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_results_dir_argument, format_table, machine_info, write_json  # noqa: E402
from tests.multiproc import free_port  # noqa: E402
from tests.serve_fuzz_schema import is_openai_error, request_bodies  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("cptoolkit"))
CONFIGS = {1: REPO / "configs" / "tp1_pcp1_dcp1.yaml", 4: REPO / "configs" / "tp2_pcp2_dcp4.yaml"}


def draw_bodies(count: int) -> list[tuple[str, object]]:
    """``count`` (path, body) pairs from the schema strategy, the same ones every run."""
    bodies: list = []

    @settings(derandomize=True, max_examples=count, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=request_bodies())
    def collect(request):
        bodies.append(request)

    collect()
    return bodies


def _sound_stream(text: str) -> bool:
    """Every ``data:`` line is JSON without an error, and the last is ``[DONE]``."""
    payloads = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    if not payloads or payloads[-1] != "[DONE]":
        return False
    return not any("error" in json.loads(payload) for payload in payloads[:-1])


def send(url: str, path: str, body) -> dict:
    """One request's outcome: its status and what is wrong with the answer (None: nothing)."""
    try:
        response = httpx.post(f"{url}{path}", content=json.dumps(body), timeout=120,
                              headers={"content-type": "application/json"})
    except httpx.HTTPError as err:
        return {"status": "no answer", "problem": f"{type(err).__name__}: {err}"}
    status, problem = response.status_code, None
    stream = isinstance(body, dict) and body.get("stream") is True
    if status >= 500 and not (status == 503 and "the engine failed" in response.text):
        problem = f"{status}: {response.text[:300]}"
    elif status != 200 and not is_openai_error(response):
        problem = f"{status} without OpenAI's error body: {response.text[:300]}"
    elif status == 200 and stream and not _sound_stream(response.text):
        problem = f"stream without [DONE] or with an error event: {response.text[-300:]}"
    return {"status": status, "problem": problem}


def fuzz_job(ranks: int, bodies: list, clients: int, log: Path) -> dict:
    """Start the job, send every body, check health, drain with SIGTERM; the figures."""
    port = free_port()
    with open(log, "w") as out:
        job = subprocess.Popen([CLI, "serve", "--config", str(CONFIGS[ranks]), "--port", str(port)], cwd=REPO,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while not _healthy(url):
            if job.poll() is not None or time.monotonic() > deadline:
                return {"ranks": ranks, "error": f"the server did not come up; see {log}"}
            time.sleep(0.2)
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            outcomes = list(pool.map(lambda request: send(url, *request), bodies))
        elapsed_s = time.perf_counter() - started
        healthy_after = _healthy(url)
        alive_after = job.poll() is None
        job.send_signal(signal.SIGTERM)
        try:
            exit_status = job.wait(timeout=120)
        except subprocess.TimeoutExpired:
            exit_status = "still running 120 s after SIGTERM"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    statuses = collections.Counter(str(outcome["status"]) for outcome in outcomes)
    problems = [outcome["problem"] for outcome in outcomes if outcome["problem"]]
    return {"ranks": ranks, "config": str(CONFIGS[ranks].relative_to(REPO)), "requests": len(bodies),
            "clients": clients, "elapsed_s": round(elapsed_s, 1), "statuses": dict(sorted(statuses.items())),
            "problems": len(problems), "first_problems": problems[:10], "healthy_after": healthy_after,
            "alive_after": alive_after, "sigterm_exit_status": exit_status}


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="fuzzed requests per layout (default 2000)")
    parser.add_argument("--ranks", type=int, nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS),
                        help="layouts to run: 1 and/or 4 ranks (default both)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    machine_before = machine_info()
    bodies = draw_bodies(args.requests)
    logs = Path(tempfile.mkdtemp(prefix="serve_fuzz-"))
    print(f"server logs in {logs}")
    runs = [fuzz_job(ranks, bodies, args.clients, logs / f"{ranks}ranks.log") for ranks in args.ranks]
    codes = sorted({code for run in runs for code in run.get("statuses", {})})
    print(format_table(["ranks", "requests", "s", *codes, "problems", "healthy after", "alive after", "SIGTERM exit"],
                       [[run["ranks"], run.get("requests"), run.get("elapsed_s"),
                         *[run.get("statuses", {}).get(code, 0) for code in codes], run.get("problems"),
                         run.get("healthy_after"), run.get("alive_after"), run.get("sigterm_exit_status")]
                        for run in runs]))
    for run in runs:
        for problem in run.get("first_problems", []):
            print(f"{run['ranks']} ranks: {problem}")
    path = write_json("serve_fuzz", {"runs": runs}, machine_before, args.results_dir)
    print(f"wrote {path}")
    ok = all(not run.get("error") and not run["problems"] and run["healthy_after"] and run["alive_after"]
             and run["sigterm_exit_status"] == 0 for run in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
