"""HTTP serving under load: requests/s, time to first token and inter-token latency at 1, 8 and 32
concurrent clients, one rank vs TP=2 x PCP=2 x DCP=4 (four ranks), on the built-in model.

    python bench/serve_load.py [--quick] [--results-dir DIR]

Each layout is a real ``launch/serve.py`` job on 127.0.0.1 (``python`` for one rank, ``torchrun`` for
four; one thread per rank either way, as torchrun sets it). ``c`` clients each send streamed
``/v1/completions`` requests back to back until the level's requests are done. Latencies are measured
by the client, from sending the request: time to first token (TTFT) = the first text chunk;
inter-token latency (ITL) = a request's time from its first to its last chunk over its tokens after
the first (p50/p99 over requests). Chunk gaps (p50/p99 over every gap) are reported beside it: the
byte tokenizer holds back an incomplete UTF-8 character, so a chunk may carry two or more tokens.
Greedy, so every run does the same work. Prints a table, writes ``serve_load.json`` and
``serve_load.png``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/serve_load.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import yaml

from bench.common import (add_results_dir_argument, format_table, machine_info, new_figure, save_figure,
                          write_json)
from tests.multiproc import free_port

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {1: "tp1_pcp1_dcp1.yaml", 4: "tp2_pcp2_dcp4.yaml"}
CONCURRENCY = (1, 8, 32)
FULL = {"max_tokens": 64, "requests_per_client": 4, "min_requests": 16}
QUICK = {"max_tokens": 16, "requests_per_client": 1, "min_requests": 4}
MODEL = "tiny-gqa"  # /v1/models names the checkpoint directory of the reference configs


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


def _prompt(i: int) -> str:
    return f"Request {i}: context parallelism shards the sequence over ranks; " * (1 + i % 3)


class ServerJob:
    """A launch/serve.py job for ``world_size`` ranks, ready when ``/health`` answers."""

    def __init__(self, world_size: int, workdir: Path):
        raw = yaml.safe_load((REPO / "configs" / LAYOUTS[world_size]).read_text())
        raw["model"]["checkpoint"] = str(REPO / "configs" / raw["model"]["checkpoint"])  # the copy lives in workdir
        raw["inference"].update(batch_size=max(CONCURRENCY), max_seq_len=384)
        config = workdir / f"serve_{world_size}.yaml"
        config.write_text(yaml.safe_dump(raw))
        self.world_size, self.port = world_size, free_port()
        serve = ["launch/serve.py", "--config", str(config), "--port", str(self.port)]
        command = [sys.executable, *serve] if world_size == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world_size), "--master-addr",
             "127.0.0.1", "--master-port", str(free_port()), *serve]
        self.log = workdir / f"serve_{world_size}.log"
        with open(self.log, "w") as out:
            env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
            self.process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {world_size}-rank server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _ranks(self) -> list[int]:
        if self.world_size == 1:
            return [self.process.pid]
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        return [int(pid) for pid in children.split()]

    def _signal_ranks(self, signum: int) -> None:
        for pid in self._ranks() if self.process.poll() is None else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def stop(self) -> None:
        """SIGTERM every rank (a drain; not torchrun, which would report the signal as a failure), then
        wait; kill the ranks and the job if it does not end."""
        self._signal_ranks(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._signal_ranks(signal.SIGKILL)
            self.process.kill()
            self.process.wait()


async def _one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunk_times, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["text"]:
                chunk_times.append(time.perf_counter())
    decode_s = chunk_times[-1] - chunk_times[0] if chunk_times else 0.0
    return {"ttft_s": chunk_times[0] - start if chunk_times else None,
            "gaps_s": [b - a for a, b in zip(chunk_times, chunk_times[1:])], "tokens": tokens,
            "tpot_s": decode_s / (tokens - 1) if tokens > 1 and decode_s > 0 else None}


async def _load(url: str, concurrency: int, num_requests: int, max_tokens: int) -> dict:
    """``concurrency`` clients sharing ``num_requests`` requests; client-side latencies."""
    pending = list(range(num_requests))
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def client_loop():
            while pending:
                results.append(await _one_request(client, url, _prompt(pending.pop()), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall_s = time.perf_counter() - start
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    tpots = [r["tpot_s"] for r in results if r["tpot_s"] is not None]
    gaps = [gap for r in results for gap in r["gaps_s"]]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": num_requests, "wall_s": wall_s,
            "requests_per_s": num_requests / wall_s, "output_tokens_per_s": tokens / wall_s,
            "ttft_p50_s": _percentile(ttfts, 50), "ttft_p99_s": _percentile(ttfts, 99),
            "tpot_p50_s": _percentile(tpots, 50), "tpot_p99_s": _percentile(tpots, 99),
            "chunk_gap_p50_s": _percentile(gaps, 50), "chunk_gap_p99_s": _percentile(gaps, 99)}


def run(sizes: dict) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for world_size in LAYOUTS:
            job = ServerJob(world_size, Path(workdir))
            try:
                asyncio.run(_load(job.url, 1, 2, sizes["max_tokens"]))  # warm-up: first-call costs
                for concurrency in CONCURRENCY:
                    num_requests = max(concurrency * sizes["requests_per_client"], sizes["min_requests"])
                    level = asyncio.run(_load(job.url, concurrency, num_requests, sizes["max_tokens"]))
                    rows.append({"ranks": world_size, "layout": LAYOUTS[world_size].removesuffix(".yaml"), **level})
                    print(f"{world_size} rank(s), concurrency {concurrency}: {level['requests_per_s']:.2f} req/s, "
                          f"TTFT p50 {level['ttft_p50_s'] * 1e3:.0f} ms", flush=True)
            finally:
                job.stop()
            if job.process.returncode != 0:
                raise RuntimeError(f"the {world_size}-rank server exited {job.process.returncode} after its drain:\n"
                                   f"{job.log.read_text()[-3000:]}")
    return {"config": {**sizes, "concurrency": list(CONCURRENCY), "layouts": LAYOUTS}, "rows": rows}


def table(document: dict) -> str:
    headers = ["ranks", "clients", "requests", "req/s", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
               "ITL p99 ms", "chunk gap p50 ms", "chunk gap p99 ms"]
    milliseconds = ["ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "chunk_gap_p50_s", "chunk_gap_p99_s"]
    return format_table(headers, [[r["ranks"], r["concurrency"], r["requests"], r["requests_per_s"],
                                   r["output_tokens_per_s"], *(r[key] * 1e3 for key in milliseconds)]
                                  for r in document["rows"]])


def plot(document: dict, results_dir: Path) -> Path:
    fig, ax = new_figure("Serving latency under load (client side, p50)", "concurrent clients", "milliseconds")
    for world_size in LAYOUTS:
        rows = [r for r in document["rows"] if r["ranks"] == world_size]
        levels = [r["concurrency"] for r in rows]
        ax.plot(levels, [r["ttft_p50_s"] * 1e3 for r in rows], marker="o", label=f"TTFT, {world_size} rank(s)")
        ax.plot(levels, [r["tpot_p50_s"] * 1e3 for r in rows], marker="s", linestyle="--",
                label=f"inter-token, {world_size} rank(s)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
    ax.legend()
    return save_figure(fig, "serve_load", results_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter requests (a smoke run)")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    before = machine_info()
    document = run(QUICK if args.quick else FULL)
    print(table(document))
    print(f"wrote {write_json('serve_load', document, before, args.results_dir)} and "
          f"{plot(document, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
