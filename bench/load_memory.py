"""Peak RSS per rank of loading a ~400 MB Hugging Face checkpoint, at TP=1 and TP=2.

    .venv/bin/python bench/load_memory.py [--results-dir DIR]

transformers saves a random Llama (``SHAPE``: hidden 1024, 8 layers, 16 query / 4 KV heads, vocabulary
32000, tied embeddings; 416 MB of float32) in a temporary directory; then fresh rank processes (gloo, one per
rank) load it with ``load_model_checkpoint``. Each rank records its peak RSS (``ru_maxrss``) once it has
imported everything and built its groups (the fixed overhead: nothing loaded yet) and again after loading,
with its parameters' bytes. A rank reads only its own TP slices, so its peak is about the overhead plus
1/TP of the weights. Prints a table and writes ``load_memory.json``.

A process's ``ru_maxrss`` starts at its parent's peak (it survives ``exec``), so the checkpoint is made in a
child process too, and this parent stays below the ranks' overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/load_memory.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_results_dir_argument, format_table, machine_info, write_json

SHAPE = dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True)
TP_SIZES = (1, 2)
MIB = 2 ** 20
RANK_TIMEOUT_S = 600


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_checkpoint(directory: Path) -> None:
    """Save a randomly initialised float32 Llama of ``SHAPE`` with ``save_pretrained`` (safetensors)."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(directory)


def rank_main(checkpoint: str, tp_size: int, load) -> dict:
    """One rank (``RANK``, ``WORLD_SIZE``, ``MASTER_*`` from the environment): the overhead, then
    ``load(checkpoint, pg_collection, runtime)`` and its peak RSS and parameter bytes."""
    import torch.distributed as dist

    from cptoolkit.layers.core_attention import AttentionRuntime
    from cptoolkit.parallel_state import initialize_model_parallel

    dist.init_process_group("gloo")
    groups = initialize_model_parallel(tp=tp_size, pcp=1, dcp=1, num_heads=SHAPE["num_attention_heads"],
                                       num_kv_heads=SHAPE["num_key_value_heads"])
    overhead = peak_rss_bytes()
    start = time.perf_counter()
    model = load(checkpoint, groups.megatron_pg_collection(), AttentionRuntime())
    load_s = time.perf_counter() - start
    peak = peak_rss_bytes()
    weights = sum(param.numel() * param.element_size() for param in model.parameters())
    rank = dist.get_rank()
    dist.destroy_process_group()
    return {"tp": tp_size, "rank": rank, "overhead_bytes": overhead, "peak_rss_bytes": peak,
            "weights_bytes": weights, "load_s": load_s}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(command: list[str], tp_size: int) -> list[dict]:
    """Run ``command`` (a rank that prints its result as its last stdout line, as JSON) in ``tp_size`` fresh
    processes of one gloo world; their results in rank order."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(tp_size), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command, env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, text=True)
             for rank in range(tp_size)]
    results = []
    try:
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=RANK_TIMEOUT_S)
            if proc.returncode != 0:
                raise RuntimeError(f"TP={tp_size} rank {rank} exited with {proc.returncode}; its stderr is above")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def run(checkpoint: Path) -> dict:
    """Every TP size's per-rank results, plus the checkpoint's size."""
    weights_file = checkpoint / "model.safetensors"
    command = [sys.executable, str(Path(__file__).resolve()), "--rank", str(checkpoint)]
    ranks = []
    for tp_size in TP_SIZES:
        ranks += launch_ranks(command + ["--tp", str(tp_size)], tp_size)
    return {"config": {"shape": SHAPE, "dtype": "float32", "checkpoint_bytes": weights_file.stat().st_size},
            "ranks": ranks}


def table(payload: dict) -> str:
    rows = [(r["tp"], r["rank"], r["weights_bytes"] / MIB, r["overhead_bytes"] / MIB, r["peak_rss_bytes"] / MIB,
             (r["peak_rss_bytes"] - r["overhead_bytes"]) / MIB, r["load_s"]) for r in payload["ranks"]]
    return format_table(("TP", "rank", "weights on rank (MiB)", "overhead RSS (MiB)", "peak RSS (MiB)",
                         "peak - overhead (MiB)", "load (s)"), rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_results_dir_argument(parser)
    parser.add_argument("--make-checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rank", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_checkpoint is not None:
        make_checkpoint(args.make_checkpoint)
        return 0
    if args.rank is not None:
        from cptoolkit.models.checkpoint import load_model_checkpoint

        print(json.dumps(rank_main(args.rank, args.tp, load_model_checkpoint)))
        return 0
    machine_before = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make-checkpoint", tmp], check=True)
        payload = run(Path(tmp))
    print(table(payload))
    print(f"wrote {write_json('load_memory', payload, machine_before, args.results_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
