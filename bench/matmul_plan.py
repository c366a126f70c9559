"""The three formulations of a linear layer's product (``cptoolkit.models.matmul_plan``) side by side, one core.

For the weights of a Qwen2.5-0.5B decode step (fused QKV 1152 x 896, output projection 896 x 896, fused gate/up
9728 x 896, down projection 896 x 4864, the 151936 x 896 vocabulary) and of SmolLM-135M's (``--shape``), at 1, 2, 4
and 8 rows, float32 and bfloat16, every layer's own weight (so each product streams its weight from memory, as in
a decode step): the median time per step of each weight kind under ``x @ W^T`` (megatron's and transformers'
formulation), ``(W @ x^T)^T`` and, at one row, ``(W @ [x; x]^T)^T``, each a pass over all the weights, interleaved
per repetition; the formulation a tuning ``MatmulPlan`` settles on when these passes are its forwards; and a step's
products under that plan against ``x @ W^T`` (what the plan would save a decode step if the products ran alone:
inside the model, with attention and the rest between them, the engine's own tuning may choose differently).

    python bench/matmul_plan.py [--shape smollm-135m] [--reps 5] [--quick] [--name matmul_plan]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/matmul_plan.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import add_results_dir_argument, format_table, machine_info, write_json
from cptoolkit.models.matmul_plan import FORMULATIONS, MatmulPlan

# shape -> (layers, [(name, n, k)] per layer, the vocabulary projection (n, k)).
SHAPES = {
    "qwen2.5-0.5b": (24, [("qkv", 1152, 896), ("proj", 896, 896), ("fc1", 9728, 896), ("fc2", 896, 4864)],
                     (151936, 896)),
    "smollm-135m": (30, [("qkv", 960, 576), ("proj", 576, 576), ("fc1", 3072, 576), ("fc2", 576, 1536)],
                    (49152, 576)),
    "tiny": (2, [("qkv", 48, 32), ("proj", 32, 32), ("fc1", 96, 32), ("fc2", 32, 48)], (320, 32)),  # the tests'
}
ROWS = (1, 2, 4, 8)


def _pass(name: str, weights: list[tuple[str, torch.Tensor]], inputs: dict) -> dict[str, float]:
    """One decode step's products, formulation ``name`` on every weight in model order: seconds per weight name."""
    spent: dict[str, float] = {}
    for weight_name, weight in weights:
        x = inputs[(weight.shape[1], weight.dtype)]
        start = time.perf_counter()
        FORMULATIONS[name](x, weight)
        spent[weight_name] = spent.get(weight_name, 0.0) + time.perf_counter() - start
    return spent


def run(shape: str, reps: int) -> dict:
    torch.set_num_threads(1)
    layers, per_layer, vocab = SHAPES[shape]
    sizes = dict((name, (n, k)) for name, n, k in per_layer + [("vocab", *vocab)])
    rows_out, steps = [], []
    for dtype in (torch.float32, torch.bfloat16):
        weights = [(name, torch.randn(n, k).to(dtype)) for _ in range(layers) for name, n, k in per_layer]
        weights.append(("vocab", torch.randn(*vocab).to(dtype)))
        plan = MatmulPlan(tune=True)
        for m in ROWS:
            inputs = {(k, dtype): torch.randn(m, k).to(dtype) for _, k in sizes.values()}
            while m not in plan.choice.get(tuple(weights[-1][1].shape) + (dtype,), {}):  # a pass a decode step
                with plan.tuning():
                    for _, weight in weights:
                        plan.linear(inputs[(weight.shape[1], weight.dtype)], weight)
            names = [f for f in FORMULATIONS if f != "w_xt_two_rows" or m == 1]
            passes = {f: [] for f in names}
            for f in names:
                _pass(f, weights, inputs)
            for rep in range(reps):
                for f in names[rep % len(names):] + names[:rep % len(names)]:
                    passes[f].append(_pass(f, weights, inputs))
            medians = {f: {w: statistics.median(p[w] for p in passes[f]) for w in sizes} for f in names}
            step = {"x_wt": 0.0, "plan": 0.0}
            for weight_name, (n, k) in sizes.items():
                chosen = plan.formulation(m, dict(weights)[weight_name])
                step["x_wt"] += medians["x_wt"][weight_name]
                step["plan"] += medians[chosen][weight_name]
                rows_out.append({"dtype": str(dtype).removeprefix("torch."), "rows": m, "weight": weight_name,
                                 "n": n, "k": k, "count": layers if weight_name != "vocab" else 1,
                                 "median_ms_per_step": {f: round(medians[f][weight_name] * 1e3, 3) for f in names},
                                 "plan": chosen})
            steps.append({"dtype": str(dtype).removeprefix("torch."), "rows": m,
                          "x_wt_ms": round(step["x_wt"] * 1e3, 2), "plan_ms": round(step["plan"] * 1e3, 2),
                          "speedup": round(step["x_wt"] / step["plan"], 3)})
        del weights
    return {"config": {"shape": shape, "reps": reps, "threads": 1, "rows": list(ROWS)}, "products": rows_out,
            "per_step": steps}


def tables(payload: dict) -> str:
    products = format_table(
        ["dtype", "rows", "weight (x count)", "x @ W^T ms", "(W @ x^T)^T ms", "two rows ms", "plan"],
        [[r["dtype"], r["rows"], f"{r['weight']} {r['n']}x{r['k']} (x{r['count']})",
          r["median_ms_per_step"]["x_wt"], r["median_ms_per_step"]["w_xt"],
          r["median_ms_per_step"].get("w_xt_two_rows", "-"), r["plan"]] for r in payload["products"]])
    steps = format_table(["dtype", "rows", "products of a step, x @ W^T ms", "as planned ms", "speedup"],
                         [[s["dtype"], s["rows"], s["x_wt_ms"], s["plan_ms"], s["speedup"]]
                          for s in payload["per_step"]])
    return products + "\n\n" + steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--reps", type=int, help="interleaved passes per formulation (default 5; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="SmolLM-135M's shape, 2 passes (about 30 s)")
    parser.add_argument("--name", default="matmul_plan", help="JSON file name (default matmul_plan)")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    before = machine_info()
    payload = run("smollm-135m" if args.quick else args.shape, args.reps or (2 if args.quick else 5))
    print(tables(payload))
    print(f"wrote {write_json(args.name, payload, before, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
