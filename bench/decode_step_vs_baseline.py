"""The engine's decode step at 1 rank, this checkout against a baseline checkout of cptoolkit, interleaved.

A small model where the per-layer overhead of a decode step (cache append, history read, masking, module calls)
weighs more than the matmuls: 24 layers, hidden 576, 9 query heads, 3 KV heads (the issue's small-model shape),
seeded random weights, float32, the byte tokenizer. Each checkout runs in its own long-lived worker process
(``PYTHONPATH`` set to the checkout, one thread, gloo world of 1); every repetition runs every batch on both
workers in turn, the order alternating per repetition, so both see the same machine load. A measurement is one
greedy ``generate`` of ``--steps + 1`` tokens per prompt; its decode time is ``EngineMetrics.decode_time_s`` (the
steps after the first token: forward, sampling, bookkeeping). Both checkouts must produce the same tokens (the
exit status is 1 otherwise).

    python bench/decode_step_vs_baseline.py --baseline /path/to/main
    python bench/decode_step_vs_baseline.py --baseline ../main --batches 1 8 --steps 50 --reps 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, "") and "--worker" not in sys.argv:  # the driver: make this repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = dict(num_layers=24, hidden_size=576, num_attention_heads=9, num_kv_heads=3, ffn_hidden_size=1536,
             vocab_size=512, max_seq_len=256, seed=7)
PROMPT = "The decode step of a small model: overhead per layer "  # 53 bytes


def _worker() -> None:
    """One checkout's engine: reads ``{"batch": b, "steps": n}`` lines on stdin, answers one JSON line each."""
    import torch
    import torch.distributed as dist
    import cptoolkit
    from cptoolkit.config import config_from_dict
    from cptoolkit.inference.builder import build_engine
    from cptoolkit.inference.sampling import SamplingParams
    from cptoolkit.parallel_state import initialize_model_parallel

    torch.set_num_threads(1)
    setup = json.loads(sys.stdin.readline())
    prompts = [PROMPT[i:] for i in range(max(setup["batches"]))]  # distinct lengths
    raw = {"parallel": {}, "runtime": {"device": "cpu"}, "model": SHAPE,
           "inference": {"prompts": prompts, "batch_size": max(setup["batches"]), "kv_block_size": 16,
                         "max_new_tokens": setup["steps"] + 1}}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{setup['port']}", rank=0, world_size=1)
    groups = initialize_model_parallel(tp=1, pcp=1, dcp=1, num_heads=SHAPE["num_attention_heads"],
                                       num_kv_heads=SHAPE["num_kv_heads"])
    engine = build_engine(config_from_dict(raw, source="<bench>"), groups, torch.device("cpu"))
    print(json.dumps({"cptoolkit": cptoolkit.__file__}), flush=True)
    for line in sys.stdin:
        batch = json.loads(line)["batch"]
        metrics = engine.metrics
        time_before, steps_before = metrics.decode_time_s, metrics.decode_steps
        results = engine.generate(prompts[:batch], SamplingParams(temperature=0.0, max_new_tokens=setup["steps"] + 1,
                                                                 ignore_eos=True))
        print(json.dumps({"decode_s": metrics.decode_time_s - time_before,
                          "steps": metrics.decode_steps - steps_before,
                          "tokens": [r.token_ids for r in results]}), flush=True)


class _Worker:
    def __init__(self, checkout: Path, batches: list[int], steps: int, port: int):
        env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._send({"batches": batches, "steps": steps, "port": port})
        self.imported = self._receive()["cptoolkit"]

    def _send(self, message: dict) -> None:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def _receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker exited (status {self.process.wait()}); its stderr is above")
        return json.loads(line)

    def run(self, batch: int) -> dict:
        self._send({"batch": batch})
        return self._receive()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def main() -> int:
    from bench.common import add_results_dir_argument, format_table, machine_info, summarize, write_json
    from tests.multiproc import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another cptoolkit checkout (e.g. main's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default 1 8)")
    parser.add_argument("--steps", type=int, default=50, help="timed decode steps per generate (default 50)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--name", default="decode_step_vs_baseline", help="JSON file name")
    add_results_dir_argument(parser)
    args = parser.parse_args()
    machine_before = machine_info()
    checkouts = {"baseline": args.baseline.resolve(), "this": Path(__file__).resolve().parents[1]}
    workers = {name: _Worker(path, args.batches, args.steps, free_port()) for name, path in checkouts.items()}
    times = {(name, batch): [] for name in workers for batch in args.batches}
    tokens, same_tokens = {}, True
    try:
        for name in workers:  # warm-up, untimed
            workers[name].run(min(args.batches))
        for rep in range(args.reps):
            for batch in args.batches:
                order = list(workers) if rep % 2 == 0 else list(reversed(workers))
                for name in order:
                    result = workers[name].run(batch)
                    times[name, batch].append(result["decode_s"] / result["steps"])
                    tokens.setdefault(batch, result["tokens"])
                    same_tokens &= result["tokens"] == tokens[batch]
    finally:
        for worker in workers.values():
            worker.close()
    rows, payload = [], {"shape": SHAPE, "steps": args.steps, "reps": args.reps, "same_tokens": same_tokens,
                         "checkouts": {name: w.imported for name, w in workers.items()}, "rows": []}
    for batch in args.batches:
        old, new = (summarize(times[name, batch]) for name in ("baseline", "this"))
        speedup = old["median_s"] / new["median_s"]
        rows.append([batch, old["median_s"] * 1e3, new["median_s"] * 1e3, batch / old["median_s"],
                     batch / new["median_s"], speedup])
        payload["rows"].append({"batch": batch, "baseline_step_s": old, "this_step_s": new, "speedup": speedup})
    print(format_table(["batch", "baseline ms/step", "this ms/step", "baseline tok/s", "this tok/s",
                        "speedup (baseline/this)"], rows))
    print(f"same greedy tokens: {same_tokens}; imported {payload['checkouts']}")
    print(f"wrote {write_json(args.name, payload, machine_before, args.results_dir)}")
    return 0 if same_tokens else 1


if __name__ == "__main__":
    if "--worker" in sys.argv:
        _worker()
    else:
        sys.exit(main())
