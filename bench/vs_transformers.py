"""cptoolkit's whole engine against ``transformers``' own ``generate`` on a Qwen2.5-0.5B-shaped model, on CPU.

The checkpoint is built by ``transformers`` itself (``Qwen2Config`` / ``Qwen2ForCausalLM``, random weights with
``initializer_range=0.2`` so logits are far from uniform, saved with ``save_pretrained`` next to a word-level
tokenizer) in float32, and the same weights rounded to bfloat16 saved again. Both sides load the same directory
and run the same prompts greedily (random token ids, seeded).

Rows: prefill of one prompt of 512 / 2k / 8k tokens (the wall time of a ``generate`` of one new token, both
sides), and decode tokens/s at batch 1 and 8 (``--decode-prompt`` tokens per prompt, ``--new-tokens`` new ones;
the decode time is that of the steps after the first token: transformers' from a logits processor's
timestamps, cptoolkit's from ``EngineMetrics.decode_time_s``).

Columns: transformers with ``torch.set_num_threads(1)`` and ``(2)``; cptoolkit at 1 rank, TP=2, and TP=1 x
PCP=2 x DCP=2, each rank a gloo process with one thread. Every column is a long-lived worker process holding its
loaded model (the multi-rank columns, one process per rank), so repetitions interleave: each repetition runs
every row on every column in turn (the column order rotated per repetition), and the ratios come out of the
same run. Times are medians over the repetitions; a multi-rank time is the slowest rank's.

Tokens are compared with transformers at 1 thread: in float32 cptoolkit must produce the very same greedy
tokens (a miss is reported in the table and the JSON, and the exit status is 1); in bfloat16 they are compared
and reported only (the two sides round differently).

    python bench/vs_transformers.py                # Qwen2.5-0.5B's 24 layers, 512/2k/8k, batch 1 and 8, fp32 and bf16
    python bench/vs_transformers.py --quick        # 2 layers, short prompts, 1 repetition (about a minute)
    python bench/vs_transformers.py --layers 4 --prefill 8192 --decode-batches --dtypes float32
    python bench/vs_transformers.py --shape smollm-135m   # the small-model rows (30 layers, hidden 576)
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/vs_transformers.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import add_results_dir_argument, format_table, machine_info, summarize, write_json

# Qwen2.5-0.5B's shape (its config.json), random weights.
QWEN25_05B = dict(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, max_position_embeddings=32768)
# SmolLM-135M's shape (Llama architecture, its config.json), random weights: the small-model row, where per-layer
# overhead weighs most.
SMOLLM_135M = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                   intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=10000.0,
                   rms_norm_eps=1e-5, max_position_embeddings=2048)
# --shape name -> (transformers architecture, shape).
SHAPES = {"qwen2.5-0.5b": ("qwen2", QWEN25_05B), "smollm-135m": ("llama", SMOLLM_135M)}
# Columns: name -> (kind, world size, parallel layout, threads).
COLUMNS = {
    "hf_1t": ("hf", 1, None, 1),
    "hf_2t": ("hf", 1, None, 2),
    "cp_1rank": ("cp", 1, dict(tp=1, pcp=1, dcp=1), 1),
    "cp_tp2": ("cp", 2, dict(tp=2, pcp=1, dcp=1), 1),
    "cp_pcp2_dcp2": ("cp", 2, dict(tp=1, pcp=2, dcp=2), 1),
    "cp_tp2_gloo": ("cp", 2, dict(tp=2, pcp=1, dcp=1), 1),
}
# runtime settings of a column beyond the defaults: TP=2 with every collective on gloo (no shared memory), for A/B runs
COLUMN_RUNTIME = {"cp_tp2_gloo": {"shared_memory_collectives": False}}
DEFAULT_COLUMNS = [c for c in COLUMNS if c not in COLUMN_RUNTIME]
COLUMN_TITLES = {"hf_1t": "transformers 1 thread", "hf_2t": "transformers 2 threads", "cp_1rank": "cptoolkit 1 rank",
                 "cp_tp2": "cptoolkit TP=2", "cp_pcp2_dcp2": "cptoolkit PCP=2 DCP=2",
                 "cp_tp2_gloo": "cptoolkit TP=2, gloo only"}
# The goal of issue #24: each cptoolkit column against the transformers column with as many cores.
GOALS = {"cp_1rank": "hf_1t", "cp_tp2": "hf_2t", "cp_pcp2_dcp2": "hf_2t", "cp_tp2_gloo": "hf_2t"}
FULL = dict(layers=None, prefill=(512, 2048, 8192), decode_batches=(1, 8), decode_prompt=128, new_tokens=16, reps=3,
            dtypes=("float32", "bfloat16"))
QUICK = dict(layers=2, prefill=(64, 256), decode_batches=(1, 8), decode_prompt=32, new_tokens=4, reps=1,
             dtypes=("float32", "bfloat16"))
KV_BLOCK = 64
SEED = 0

_CONTEXT = mp.get_context("forkserver")
# What every worker imports (seconds of CPU each): once in the forkserver.
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed", "megatron.core.models.gpt.gpt_model",
                                 "transformers.models.qwen2.modeling_qwen2",
                                 "transformers.models.llama.modeling_llama"])


# ----------------------------------------------------------------------------- checkpoint and prompts

def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``w0..w{vocab-1}`` (as tests/test_hf_families.py builds), with its eos id
    past the model's vocabulary: no request stops early, on either side."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}, "<eos>": vocab_size}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def build_checkpoints(directory: Path, shape: dict, dtypes: tuple[str, ...], max_len: int,
                      arch: str = "qwen2") -> dict[str, str]:
    """``{dtype: checkpoint dir}``: one random Qwen2 (or Llama, ``arch``) model saved in each dtype (bf16 = the fp32
    weights rounded)."""
    import transformers

    torch.manual_seed(SEED)
    settings = dict(**{**shape, "max_position_embeddings": max(shape["max_position_embeddings"], max_len)},
                    initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "qwen2":
        config = transformers.Qwen2Config(**settings, use_sliding_window=False)
    else:
        config = transformers.LlamaConfig(**settings)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    tokenizer = word_tokenizer(shape["vocab_size"])
    paths = {}
    for dtype in dtypes:
        path = directory / dtype
        model.to(getattr(torch, dtype)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[dtype] = str(path)
    return paths


def prompts(length: int, count: int, vocab_size: int, salt: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1000 * salt + length)
    return [torch.randint(2, vocab_size, (length,), generator=generator).tolist() for _ in range(count)]


def cases(settings: dict, vocab_size: int) -> list[dict]:
    """Every row: ``{"row", "prompts", "new_tokens"}`` (prefill rows generate one token)."""
    rows = [{"row": f"prefill {n}", "kind": "prefill", "prompts": prompts(n, 1, vocab_size, 1), "new_tokens": 1}
            for n in settings["prefill"]]
    rows += [{"row": f"decode batch {b}", "kind": "decode", "batch": b,
              "prompts": prompts(settings["decode_prompt"], b, vocab_size, 2 + b),
              "new_tokens": settings["new_tokens"]} for b in settings["decode_batches"]]
    return rows


# ----------------------------------------------------------------------------- workers

def _hf_case(model, case: dict, threads: int) -> dict:
    import transformers

    class Stamps(transformers.LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    torch.set_num_threads(threads)
    stamps = Stamps()
    input_ids = torch.tensor(case["prompts"])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=case["new_tokens"], min_new_tokens=case["new_tokens"],
                             logits_processor=transformers.LogitsProcessorList([stamps]), pad_token_id=0,
                             eos_token_id=None)
    wall = time.perf_counter() - start
    steps = len(stamps.times) - 1
    return {"wall_s": wall, "decode_s": stamps.times[-1] - stamps.times[0] if steps else 0.0,
            "decode_tokens": steps * len(case["prompts"]), "tokens": out[:, input_ids.shape[1]:].tolist()}


def _cp_case(engine, case: dict) -> dict:
    import torch.distributed as dist
    from cptoolkit.inference.sampling import SamplingParams

    engine.metrics = type(engine.metrics)()
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    results = engine.generate(case["prompts"], SamplingParams(temperature=0.0, max_new_tokens=case["new_tokens"]))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "decode_s": engine.metrics.decode_time_s, "decode_tokens": engine.metrics.decode_tokens,
            "tokens": [r.token_ids for r in results]}


def _profile_case(run_case, case: dict, path: str) -> dict:
    """``run_case(case)`` under cProfile; the stats go to ``path``."""
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return run_case(case)
    finally:
        profiler.disable()
        profiler.dump_stats(path)


def _worker(rank: int, world_size: int, port: int, column: str, checkpoint: str, dtype: str, max_len: int,
            max_batch: int, commands, results) -> None:
    """One rank of one column: load the model once, then run every case sent on ``commands``."""
    kind, _, layout, _ = COLUMNS[column]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # megatron's and transformers' start-up notices, once per worker
    try:
        if kind == "hf":
            import transformers

            transformers.utils.logging.disable_progress_bar()
            model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
            run_case = lambda case, threads: _hf_case(model, case, threads)  # noqa: E731
        else:
            import torch.distributed as dist
            from cptoolkit.config import config_from_dict
            from cptoolkit.inference.builder import build_engine
            from cptoolkit.parallel_state import initialize_model_parallel

            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=1800))
            cfg = config_from_dict({
                "parallel": layout, "model": {"checkpoint": checkpoint},
                "runtime": {"device": "cpu", "dtype": dtype, **COLUMN_RUNTIME.get(column, {})},
                "inference": {"prompts": ["unused"], "batch_size": max_batch, "kv_block_size": KV_BLOCK,
                              "max_seq_len": max_len}}, source="<vs_transformers>")
            groups = initialize_model_parallel(tp=layout["tp"], pcp=layout["pcp"], dcp=layout["dcp"],
                                               num_heads=cfg.model.num_attention_heads,
                                               num_kv_heads=cfg.model.num_kv_heads,
                                               timeout=datetime.timedelta(seconds=1800))
            engine = build_engine(cfg, groups, torch.device("cpu"))
            run_case = lambda case, threads: _cp_case(engine, case)  # noqa: E731
        results.put((column, rank, "ready", None))
        while (command := commands.get()) is not None:
            case, threads, profile_path = command
            if profile_path:
                value = _profile_case(lambda c: run_case(c, threads), case, f"{profile_path}.rank{rank}")
            else:
                value = run_case(case, threads)
            results.put((column, rank, "ok", value))
    except BaseException:  # noqa: BLE001 - the parent must see every failure, with its traceback
        results.put((column, rank, "error", traceback.format_exc()))


class Pool:
    """Long-lived workers: one process for transformers (both thread counts), one per rank of each cptoolkit
    column."""

    def __init__(self, checkpoint: str, dtype: str, max_len: int, max_batch: int, columns: list[str],
                 timeout_s: float):
        from tests.multiproc import free_port

        self.results, self.timeout_s, self.procs, self.commands = _CONTEXT.Queue(), timeout_s, [], {}
        self.worker_of = {c: ("hf" if COLUMNS[c][0] == "hf" else c) for c in columns}
        for worker in dict.fromkeys(self.worker_of.values()):
            world_size = 1 if worker == "hf" else COLUMNS[worker][1]
            port, queues = free_port(), []
            for rank in range(world_size):
                commands = _CONTEXT.Queue()
                proc = _CONTEXT.Process(target=_worker, daemon=True,
                                        args=(rank, world_size, port, "hf_1t" if worker == "hf" else worker,
                                              checkpoint, dtype, max_len, max_batch, commands, self.results))
                proc.start()
                self.procs.append(proc)
                queues.append(commands)
            self.commands[worker] = queues
        self._collect({(w, r) for w, qs in self.commands.items() for r in range(len(qs))}, "ready")

    def _collect(self, expected: set, what: str) -> dict:
        got, deadline = {}, time.monotonic() + self.timeout_s
        while len(got) < len(expected):
            try:
                column, rank, status, value = self.results.get(timeout=5.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what}: no answer within {self.timeout_s:.0f} s from "
                                       f"{sorted(expected - set(got))}") from None
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"{what}: worker pid {dead[0].pid} died (exit code {dead[0].exitcode})")
                continue
            worker = "hf" if column.startswith("hf") else column
            if status == "error":
                raise RuntimeError(f"{what}: {column} rank {rank} failed:\n{value}")
            got[worker, rank] = value
        return got

    def run(self, column: str, case: dict, profile_path: str | None = None) -> list[dict]:
        worker = self.worker_of[column]
        for commands in self.commands[worker]:
            commands.put((case, COLUMNS[column][3], profile_path))
        got = self._collect({(worker, r) for r in range(len(self.commands[worker]))}, f"{column} {case['row']}")
        return [got[worker, r] for r in range(len(self.commands[worker]))]

    def close(self) -> None:
        for queues in self.commands.values():
            for commands in queues:
                commands.put(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


# ----------------------------------------------------------------------------- the run

def _row_stats(case: dict, runs: list[list[dict]]) -> dict:
    """One column's repetitions of one row (each a list of per-rank results) -> its figures."""
    walls = [max(r["wall_s"] for r in ranks) for ranks in runs]
    stats = {**summarize(walls), "tokens": runs[-1][0]["tokens"]}
    if case["kind"] == "decode":
        decode = [max(r["decode_s"] for r in ranks) for ranks in runs]
        tokens = runs[-1][0]["decode_tokens"]
        stats.update(decode=summarize(decode), decode_tokens=tokens,
                     tokens_per_s=tokens / summarize(decode)["median_s"],
                     best_tokens_per_s=tokens / min(decode))
    return stats


def run(shape: dict, settings: dict, columns: list[str] | None = None, profile_dir: Path | None = None,
        timeout_s: float = 3600.0, log=print, arch: str = "qwen2") -> dict:
    """Build the checkpoints, run every row on every column for every dtype; the JSON payload."""
    columns = list(columns or DEFAULT_COLUMNS)
    rows_all = cases(settings, shape["vocab_size"])
    max_len = max([len(c["prompts"][0]) + c["new_tokens"] for c in rows_all])
    max_batch = max(len(c["prompts"]) for c in rows_all)
    out = {"config": {"arch": arch, "shape": shape, "settings": {k: list(v) if isinstance(v, tuple) else v
                                                    for k, v in settings.items()},
                      "columns": columns, "threads_per_rank": 1, "kv_block_size": KV_BLOCK,
                      "initializer_range": 0.2, "cpu_count": os.cpu_count()},
           "results": {}}
    with tempfile.TemporaryDirectory(prefix="cptoolkit_vs_hf_") as tmp:
        start = time.perf_counter()
        checkpoints = build_checkpoints(Path(tmp), shape, tuple(settings["dtypes"]), max_len, arch)
        log(f"checkpoints built in {time.perf_counter() - start:.0f} s")
        for dtype in settings["dtypes"]:
            start = time.perf_counter()
            pool = Pool(checkpoints[dtype], dtype, max_len, max_batch, columns, timeout_s)
            log(f"{dtype}: workers ready in {time.perf_counter() - start:.0f} s")
            try:
                warmup = {"row": "warmup", "kind": "decode", "prompts": prompts(16, max_batch, shape["vocab_size"], 9),
                          "new_tokens": 2}
                for column in columns:
                    pool.run(column, warmup)
                runs = {(c["row"], col): [] for c in rows_all for col in columns}
                for rep in range(settings["reps"]):
                    order = columns[rep % len(columns):] + columns[:rep % len(columns)]
                    for case in rows_all:
                        for column in order:
                            runs[case["row"], column].append(pool.run(column, case))
                        log(f"{dtype} rep {rep + 1}/{settings['reps']} {case['row']}: " + ", ".join(
                            f"{col} {max(r['wall_s'] for r in runs[case['row'], col][-1]):.2f}s" for col in order))
                if profile_dir is not None:
                    profile_dir.mkdir(parents=True, exist_ok=True)
                    for case in rows_all:
                        for column in columns:
                            name = f"{dtype}_{column}_{case['row'].replace(' ', '_')}.prof"
                            pool.run(column, case, str(profile_dir / name))
            finally:
                pool.close()
            out["results"][dtype] = _dtype_results(rows_all, columns, runs, dtype)
    return out


def _dtype_results(rows_all: list[dict], columns: list[str], runs: dict, dtype: str) -> list[dict]:
    results = []
    for case in rows_all:
        per_column = {col: _row_stats(case, runs[case["row"], col]) for col in columns}
        reference = per_column.get("hf_1t")
        row = {"row": case["row"], "kind": case["kind"], "prompt_len": len(case["prompts"][0]),
               "batch": len(case["prompts"]), "new_tokens": case["new_tokens"], "columns": per_column,
               "ratios": {}, "same_tokens": {}}
        for col, stats in per_column.items():
            if reference is not None and col != "hf_1t":
                row["same_tokens"][col] = stats["tokens"] == reference["tokens"]
        for col, base in GOALS.items():
            if col in per_column and base in per_column:
                # > 1: cptoolkit is faster than the transformers column it is held against
                if case["kind"] == "prefill":
                    ratio = per_column[base]["median_s"] / per_column[col]["median_s"]
                else:
                    ratio = per_column[col]["tokens_per_s"] / per_column[base]["tokens_per_s"]
                row["ratios"][f"{col}/{base}"] = ratio
        row["misses"] = [name for name, ratio in row["ratios"].items() if ratio < 1.0]
        row["token_misses"] = [c for c, same in row["same_tokens"].items() if not same]
        row["distinct_tokens"] = len({t for seq in (reference or per_column[columns[0]])["tokens"] for t in seq})
        results.append(row)
    return results


def table(payload: dict) -> str:
    columns = payload["config"]["columns"]
    blocks = []
    for dtype, rows in payload["results"].items():
        headers = ["row"] + [COLUMN_TITLES[c] for c in columns] + \
                  [f"{a} / {b}" for a, b in GOALS.items() if a in columns and b in columns] + ["same tokens"]
        lines = []
        for r in rows:
            if r["kind"] == "prefill":
                cells = [f"{r['columns'][c]['median_s']:.3f} s" for c in columns]
            else:
                cells = [f"{r['columns'][c]['tokens_per_s']:.1f} tok/s" for c in columns]
            ratios = [f"{ratio:.2f}x" + (" MISS" if ratio < 1.0 else "") for ratio in r["ratios"].values()]
            same = "all" if not r["token_misses"] else "DIFFER: " + ", ".join(r["token_misses"])
            lines.append([f"{r['row']} ({dtype})"] + cells + ratios + [same])
        blocks.append(format_table(headers, lines))
    return "\n\n".join(blocks)


def fp32_token_misses(payload: dict) -> list[str]:
    return [f"{r['row']}: {c}" for r in payload["results"].get("float32", []) for c in r["token_misses"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['layers']} layers, prefill {QUICK['prefill']}, decode prompts of "
                             f"{QUICK['decode_prompt']} tokens, {QUICK['new_tokens']} new, 1 repetition")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b",
                        help="model shape (default qwen2.5-0.5b; smollm-135m: 30 layers, hidden 576, Llama)")
    parser.add_argument("--layers", type=int, help="transformer layers (default: the shape's; --quick 2)")
    parser.add_argument("--prefill", type=int, nargs="*", help="prefill prompt lengths (default 512 2048 8192)")
    parser.add_argument("--decode-batches", type=int, nargs="*", help="decode batch sizes (default 1 8)")
    parser.add_argument("--decode-prompt", type=int, help="prompt tokens of each decode request (default 128)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per decode request (default 16)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (default 3; --quick 1)")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), help="default: both")
    parser.add_argument("--columns", nargs="+", choices=list(COLUMNS), help="default: the five of DEFAULT_COLUMNS (cp_tp2_gloo: A/B runs only)")
    parser.add_argument("--profile-dir", type=Path,
                        help="after the timed repetitions, run every row once more per column under cProfile "
                             "and write the stats here (one .prof per rank)")
    parser.add_argument("--name", default="vs_transformers", help="JSON file name (default vs_transformers)")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("layers", "prefill", "decode_batches", "decode_prompt", "new_tokens", "reps", "dtypes"):
        if getattr(args, key) is not None:
            settings[key] = tuple(getattr(args, key)) if isinstance(getattr(args, key), list) else getattr(args, key)
    arch, shape = SHAPES[args.shape]
    shape = {**shape, "num_hidden_layers": settings.pop("layers") or shape["num_hidden_layers"]}
    before = machine_info()
    payload = run(shape, settings, args.columns, args.profile_dir, log=lambda line: print(line, flush=True), arch=arch)
    print(table(payload))
    print(f"wrote {write_json(args.name, payload, before, args.results_dir)}")
    misses = fp32_token_misses(payload)
    if misses:
        print("float32 tokens differ from transformers': " + "; ".join(misses))
    return 1 if misses else 0


if __name__ == "__main__":
    from bench.vs_transformers import main as _main  # workers pickle this module's functions by its real name

    sys.exit(_main())
