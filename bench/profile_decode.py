"""Where a decode step's time goes: cptoolkit at 1 rank against ``transformers``' ``generate`` at 1 thread.

Both sides load one random checkpoint (``bench.vs_transformers``' shapes) in one process with one thread, run the
same greedy decode (``--batch`` prompts of ``--prompt`` tokens, ``--new-tokens`` new) interleaved ``--reps`` times,
then once more each under ``torch.profiler``. Printed per decode step (ms): the wall time, the self CPU time of
the operators grouped (matmuls, attention kernel, index/gather/scatter, copies and casts, elementwise, other ops)
and the rest (Python and dispatch outside any operator); with ``--functions`` also cProfile's cumulative time of
the named cptoolkit functions.

    python bench/profile_decode.py --shape smollm-135m --batch 1 8 --dtype float32
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.vs_transformers import KV_BLOCK, SHAPES, build_checkpoints, prompts

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm"),
    "attention kernel": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_flash_attention",
                         "aten::logsumexp", "aten::softmax", "aten::_softmax"),
    "index/gather/scatter": ("aten::index", "aten::gather", "aten::index_put", "aten::scatter", "aten::_index_put",
                             "aten::index_select", "aten::embedding"),
    "copy/cast/alloc": ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone",
                        "aten::empty", "aten::zeros", "aten::cat", "aten::masked_fill", "aten::fill_",
                        "aten::zero_", "aten::full"),
}
FUNCTIONS = ("dcp_decode_attention", "read", "append", "attend_shard", "gpt_forward", "decode_step", "sample",
             "apply_rotary_pos_emb", "_apply_rotary_pos_emb_bshd", "forward")


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    return "elementwise/other ops"


def load_cptoolkit(checkpoint: str, dtype: str, max_len: int, max_batch: int):
    import torch.distributed as dist

    from cptoolkit.config import config_from_dict
    from cptoolkit.inference.builder import build_engine
    from cptoolkit.parallel_state import initialize_model_parallel
    from tests.multiproc import free_port

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=600))
    cfg = config_from_dict({"parallel": dict(tp=1, pcp=1, dcp=1), "model": {"checkpoint": checkpoint},
                            "runtime": {"device": "cpu", "dtype": dtype},
                            "inference": {"prompts": ["unused"], "batch_size": max_batch, "kv_block_size": KV_BLOCK,
                                          "max_seq_len": max_len}}, source="<profile_decode>")
    groups = initialize_model_parallel(tp=1, pcp=1, dcp=1, num_heads=cfg.model.num_attention_heads,
                                       num_kv_heads=cfg.model.num_kv_heads)
    return build_engine(cfg, groups, torch.device("cpu"))


def run_hf(model, batch_prompts: list[list[int]], new_tokens: int, on_first_decode=None) -> tuple[float, list]:
    """(seconds of the decode steps after the first token, tokens); ``on_first_decode()`` is called once the
    prompt's forward is done."""
    import transformers

    stamps = []

    class Stamps(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            if not stamps and on_first_decode is not None:
                on_first_decode()
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(batch_prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, logits_processor=transformers.LogitsProcessorList([Stamps()]),
                             pad_token_id=0, eos_token_id=None)
    return stamps[-1] - stamps[0], out[:, ids.shape[1]:].tolist()


def run_cp(engine, batch_prompts: list[list[int]], new_tokens: int, on_first_decode=None) -> tuple[float, list]:
    """As ``run_hf``: ``on_first_decode()`` is called before the first decode step."""
    from cptoolkit.inference.sampling import SamplingParams

    engine.metrics = type(engine.metrics)()
    decode = engine._decode
    if on_first_decode is not None:
        def first_decode(requests):
            engine._decode = decode
            on_first_decode()
            return decode(requests)
        engine._decode = first_decode
    try:
        results = engine.generate(batch_prompts, SamplingParams(temperature=0.0, max_new_tokens=new_tokens))
    finally:
        engine._decode = decode
    return engine.metrics.decode_time_s, [r.token_ids for r in results]


def op_breakdown(fn, top: int = 0) -> tuple[dict[str, float], float]:
    """Run ``fn(on_first_decode)`` with torch.profiler on from its first decode step: ``({group: ms in total},
    decode seconds)``; prints the ``top`` operators by self time, with their input shapes."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=top > 0)
    decode_s, _ = fn(prof.start)
    prof.stop()
    if top:
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=top,
                                                                  max_name_column_width=40))
    groups: dict[str, float] = {}
    for event in prof.key_averages():
        groups[group_of(event.key)] = groups.get(group_of(event.key), 0.0) + event.self_cpu_time_total / 1e3
    return groups, decode_s


def function_times(fn, names: tuple[str, ...], steps: int) -> dict[str, float]:
    """cProfile's cumulative ms per step of the functions ``names``, from the first decode step of ``fn``."""
    profiler = cProfile.Profile()
    fn(profiler.enable)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    out: dict[str, float] = {}
    for (filename, _, name), (_, _, _, cumulative, _) in stats.items():
        if name in names and ("cptoolkit" in filename or "megatron" in filename or "transformers" in filename):
            key = f"{name} ({Path(filename).parent.name}/{Path(filename).name})"
            out[key] = out.get(key, 0.0) + cumulative * 1e3 / steps
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--functions", action="store_true", help="also cProfile the named functions")
    parser.add_argument("--ops", type=int, default=0, help="print the top N operators (by self time) of each side")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import transformers
    import warnings

    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    arch, shape = SHAPES[args.shape]
    shape = {**shape, "num_hidden_layers": args.layers or shape["num_hidden_layers"]}
    max_len = args.prompt + args.new_tokens
    with tempfile.TemporaryDirectory(prefix="cptoolkit_profile_") as tmp:
        checkpoint = build_checkpoints(Path(tmp), shape, (args.dtype,), max_len, arch)[args.dtype]
        hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, args.dtype)).eval()
        engine = load_cptoolkit(checkpoint, args.dtype, max_len, max(args.batch))
        print(f"{args.shape} {shape['num_hidden_layers']} layers {args.dtype}, 1 thread, load "
              f"{os.getloadavg()[0]:.1f}, {time.strftime('%H:%M UTC', time.gmtime())}")
        for batch in args.batch:
            batch_prompts = prompts(args.prompt, batch, shape["vocab_size"], 2 + batch)
            sides = {"transformers": lambda hook=None: run_hf(hf, batch_prompts, args.new_tokens, hook),
                     "cptoolkit": lambda hook=None: run_cp(engine, batch_prompts, args.new_tokens, hook)}
            steps = args.new_tokens - 1
            tokens = {name: fn()[1] for name, fn in sides.items()}  # warm-up
            times = {name: [] for name in sides}
            for _ in range(args.reps):
                for name, fn in sides.items():
                    times[name].append(fn()[0] * 1e3 / steps)
            medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
            print(f"\nbatch {batch}: ms per decode step (median of {args.reps}, interleaved): "
                  + ", ".join(f"{n} {m:.1f}" for n, m in medians.items())
                  + f"; cptoolkit / transformers speed {medians['transformers'] / medians['cptoolkit']:.2f}x; "
                  f"same tokens: {tokens['transformers'] == tokens['cptoolkit']}")
            breakdowns = {name: op_breakdown(fn, args.ops) for name, fn in sides.items()}
            rows = sorted({g for b, _ in breakdowns.values() for g in b})
            print(f"{'ms per decode step (operators self time)':44s}" + "".join(f"{n:>14s}" for n in sides))
            for group in rows:
                print(f"{group:44s}" + "".join(f"{breakdowns[n][0].get(group, 0.0) / steps:14.2f}" for n in sides))
            outside = {n: breakdowns[n][1] * 1e3 / steps - sum(breakdowns[n][0].values()) / steps for n in sides}
            print(f"{'outside operators (Python, dispatch)':44s}" + "".join(f"{outside[n]:14.2f}" for n in sides))
            print(f"{'decode wall per step (profiled)':44s}" + "".join(f"{breakdowns[n][1] * 1e3 / steps:14.2f}"
                                                                       for n in sides))
            if args.functions:
                for name, fn in sides.items():
                    for key, ms in sorted(function_times(fn, FUNCTIONS, steps).items(), key=lambda kv: -kv[1]):
                        print(f"  {name} {key}: {ms:.2f} ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
