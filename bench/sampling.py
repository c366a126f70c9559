"""Sampling one decode step: the batched sampler against the same sampler row by row, side by side.

Times ``sampling.sample_each`` (penalties, bias, temperature, top-k, top-p and the draws: what the engine's sampler
runs per step) on random logits over a 32k vocabulary at batch 1, 8 and 64, for four mixes of settings, three ways
in one run, interleaved per repetition: ``batched`` (the whole batch in one call), ``row by row`` (one call per
row: the per-row path, same code, same tokens) and, with ``--baseline CHECKOUT``, that checkout's own
``sample_each`` (e.g. main's per-row sampler before this change; its draws use ``torch.multinomial``, so its tokens
differ). Each history holds a 128-token prompt and 32 generated tokens. One thread, CPU. The exit status is 1 if
the batched and row-by-row tokens differ.

    python bench/sampling.py [--quick] [--baseline ../main]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as `python bench/sampling.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import add_results_dir_argument, format_table, machine_info, summarize, time_call, write_json
from cptoolkit.inference import sampling

VOCAB = 32768
BATCHES = (1, 8, 64)
PROMPT_TOKENS, OUTPUT_TOKENS = 128, 32
MIXES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top-k + top-p": dict(temperature=0.8, top_k=50, top_p=0.9),
    "penalties + top-p": dict(temperature=0.8, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.3,
                              frequency_penalty=0.3, logit_bias=((5, 2.0), (17, -3.0))),
}


def _load_baseline(checkout: Path):
    """``checkout``'s ``cptoolkit/inference/sampling.py`` as a module of its own (it imports torch only)."""
    spec = importlib.util.spec_from_file_location("baseline_sampling", checkout / "cptoolkit/inference/sampling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _row_by_row(sample_each: Callable) -> Callable:
    """``sample_each`` called once per row, as a per-row sampler would."""
    def run(logits, params, generators, prompts, outputs):
        return torch.cat([sample_each(logits[row:row + 1], params[row:row + 1], generators[row:row + 1],
                                      prompts[row:row + 1], outputs[row:row + 1])[0] for row in range(len(params))]), {}
    return run


def run(reps: int, baseline: Path | None = None) -> dict:
    """Median seconds per step of every (mix, batch, way); returns the JSON payload."""
    torch.set_num_threads(1)
    data = torch.Generator().manual_seed(0)
    logits = torch.randn(max(BATCHES), VOCAB, generator=data) * 3
    prompts = torch.randint(0, VOCAB, (max(BATCHES), PROMPT_TOKENS), generator=data).tolist()
    outputs = torch.randint(0, VOCAB, (max(BATCHES), OUTPUT_TOKENS), generator=data).tolist()
    ways = {"batched": sampling.sample_each, "row by row": _row_by_row(sampling.sample_each)}
    modules = {"batched": sampling, "row by row": sampling}
    if baseline is not None:
        modules["baseline"] = _load_baseline(baseline)
        ways["baseline"] = modules["baseline"].sample_each
    rows, same_tokens = [], True
    for mix, fields in MIXES.items():
        for batch in BATCHES:
            times = {way: [] for way in ways}
            for rep in range(reps + 1):  # the first repetition warms up, untimed
                tokens = {}
                for way in (list(ways) if rep % 2 else list(reversed(ways))):
                    module = modules[way]
                    params = [module.SamplingParams(seed=row, **fields) for row in range(batch)]
                    generators = [module.make_generator(row, row) for row in range(batch)]
                    seconds, (sampled, _) = time_call(lambda: ways[way](
                        logits[:batch], params, generators, prompts[:batch], outputs[:batch]))
                    tokens[way] = sampled.tolist()
                    if rep:
                        times[way].append(seconds)
                same_tokens &= tokens["batched"] == tokens["row by row"]
            stats = {way: summarize(times[way]) for way in ways}
            rows.append({"mix": mix, "batch": batch, "step_s": stats,
                         "row_by_row_over_batched": stats["row by row"]["median_s"] / stats["batched"]["median_s"],
                         **({"baseline_over_batched": stats["baseline"]["median_s"] / stats["batched"]["median_s"]}
                            if baseline is not None else {})})
    return {"config": {"vocab": VOCAB, "batches": list(BATCHES), "mixes": {m: repr(f) for m, f in MIXES.items()},
                       "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS, "reps": reps, "threads": 1,
                       "baseline": str(baseline) if baseline is not None else None},
            "same_tokens": same_tokens, "rows": rows}


def table(payload: dict) -> str:
    with_baseline = payload["config"]["baseline"] is not None
    headers = ["mix", "batch", "batched ms", "row by row ms", "row by row / batched"]
    if with_baseline:
        headers += ["baseline ms", "baseline / batched"]
    lines = []
    for r in payload["rows"]:
        line = [r["mix"], r["batch"], r["step_s"]["batched"]["median_s"] * 1e3,
                r["step_s"]["row by row"]["median_s"] * 1e3, r["row_by_row_over_batched"]]
        if with_baseline:
            line += [r["step_s"]["baseline"]["median_s"] * 1e3, r["baseline_over_batched"]]
        lines.append(line)
    return format_table(headers, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 7")
    parser.add_argument("--baseline", type=Path, help="another cptoolkit checkout whose sample_each to time too")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    before = machine_info()
    payload = run(3 if args.quick else 7, args.baseline.resolve() if args.baseline else None)
    print(table(payload))
    print(f"batched and row-by-row tokens identical: {payload['same_tokens']}")
    print(f"wrote {write_json('sampling', payload, before, args.results_dir)}")
    return 0 if payload["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
