"""The floor of an eager PyTorch decode step on one core: the least a step of a model's shape costs when written
as bare torch operations, against which an engine's decode step (cptoolkit's, transformers') can be placed.

The step is a Llama-architecture decoder written as plainly as it can be (``--shape``'s layers, hidden size, heads,
KV heads, MLP and vocabulary; random float32 weights): RMSNorm, one fused QKV product, RoPE, the new token's K/V
written into a preallocated contiguous cache, torch's SDPA over the history, the projection, RMSNorm, the gated MLP,
the output layer. No paging, no batching bookkeeping, no sampler, no module calls. Each product runs as ``x @ W^T``
and, in a second variant, as the fastest of ``cptoolkit.models.matmul_plan``'s formulations for its shape and row
count (timed first, as a tuned plan would settle). Printed per batch size: the step's median milliseconds over
interleaved repetitions (one thread), and the products' share.

    python bench/eager_floor.py [--shape smollm-135m] [--batch 1 8] [--context 160] [--reps 5] [--name eager_floor]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/eager_floor.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench.common import add_results_dir_argument, format_table, machine_info, write_json
from cptoolkit.models.matmul_plan import FORMULATIONS

# shape -> (layers, hidden, heads, KV heads, MLP hidden, vocabulary): bench.vs_transformers' shapes, and the tests'
SHAPES = {"qwen2.5-0.5b": (24, 896, 14, 2, 4864, 151936), "smollm-135m": (30, 576, 9, 3, 1536, 49152),
          "tiny": (2, 32, 4, 2, 48, 320)}
STEPS_PER_REP = 8


class BareDecoder:
    """A decode step in bare torch operations; ``linear(x, w)`` computes every product (``[m, k] @ [n, k]^T``)."""

    def __init__(self, shape: str, batch: int, context: int):
        layers, hidden, heads, kv_heads, ffn, vocab = SHAPES[shape]
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        qkv_rows = (heads + 2 * kv_heads) * self.head_dim
        generator = torch.Generator().manual_seed(0)

        def weight(*size):
            return torch.randn(*size, generator=generator) * 0.05

        self.layers = [dict(norm_1=torch.ones(hidden), qkv=weight(qkv_rows, hidden), proj=weight(hidden, hidden),
                            norm_2=torch.ones(hidden), fc1=weight(2 * ffn, hidden), fc2=weight(hidden, ffn))
                       for _ in range(layers)]
        self.output = weight(vocab, hidden)
        self.cache = [torch.zeros(2, batch, kv_heads, context + STEPS_PER_REP + 1, self.head_dim)
                      for _ in range(layers)]
        self.batch, self.hidden, self.context = batch, hidden, context

    def weights(self) -> list[torch.Tensor]:
        return [w for layer in self.layers for k, w in layer.items() if w.dim() == 2] + [self.output]

    def step(self, x: torch.Tensor, position: int, linear) -> torch.Tensor:
        """``x [b, hidden]`` at ``position`` -> logits ``[b, vocab]``."""
        b, d, half = self.batch, self.head_dim, self.head_dim // 2
        angles = torch.arange(half) * (10000.0 ** (-1.0 / half)) * position
        cos, sin = torch.cat((angles.cos(), angles.cos())), torch.cat((angles.sin(), angles.sin()))
        for layer, cache in zip(self.layers, self.cache):
            h = F.rms_norm(x, (self.hidden,), layer["norm_1"], 1e-6)
            q, k, v = linear(h, layer["qkv"]).split(
                [self.heads * d, self.kv_heads * d, self.kv_heads * d], -1)
            q, k = (t.view(b, -1, 1, d) for t in (q, k))
            q, k = (t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin for t in (q, k))
            cache[0, :, :, position] = k[:, :, 0]
            cache[1, :, :, position] = v.view(b, -1, d)
            attended = F.scaled_dot_product_attention(q, cache[0, :, :, : position + 1], cache[1, :, :, : position + 1],
                                                      enable_gqa=True)
            x = x + linear(attended.reshape(b, -1), layer["proj"])
            gate, up = linear(F.rms_norm(x, (self.hidden,), layer["norm_2"], 1e-6), layer["fc1"]).chunk(2, -1)
            x = x + linear(F.silu(gate) * up, layer["fc2"])
        return linear(x, self.output)


def _fastest_formulations(model: BareDecoder, rows: int, reps: int) -> dict[tuple, str]:
    """For each weight shape, the formulation of least median time over ``reps`` passes over that shape's weights."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for w in model.weights():
        by_shape.setdefault(tuple(w.shape), []).append(w)
    chosen = {}
    for shape, weights in by_shape.items():
        x = torch.randn(rows, shape[1])
        names = [f for f in FORMULATIONS if f != "w_xt_two_rows" or rows == 1]
        times = {f: [] for f in names}
        for _ in range(reps):
            for f in names:
                start = time.perf_counter()
                for w in weights:
                    FORMULATIONS[f](x, w)
                times[f].append(time.perf_counter() - start)
        chosen[shape] = min(names, key=lambda f: statistics.median(times[f]))
    return chosen


def run(shape: str, batches: list[int], context: int, reps: int) -> dict:
    torch.set_num_threads(1)
    rows_out = []
    for batch in batches:
        model = BareDecoder(shape, batch, context)
        chosen = _fastest_formulations(model, batch, reps=3)
        variants = {"x @ W^T": lambda x, w: x @ w.T,
                    "fastest formulation": lambda x, w: FORMULATIONS[chosen[tuple(w.shape)]](x, w)}
        products_only = {name: [] for name in variants}
        steps = {name: [] for name in variants}
        x = torch.randn(batch, model.hidden) * 0.1
        for rep in range(reps + 1):  # the first repetition warms up, unrecorded
            for name, linear in variants.items() if rep % 2 else reversed(list(variants.items())):
                spent = [0.0]

                def timed_linear(a, w, linear=linear, spent=spent):
                    start = time.perf_counter()
                    out = linear(a, w)
                    spent[0] += time.perf_counter() - start
                    return out

                start = time.perf_counter()
                for position in range(context, context + STEPS_PER_REP):
                    model.step(x, position, timed_linear)
                if rep:
                    steps[name].append((time.perf_counter() - start) / STEPS_PER_REP)
                    products_only[name].append(spent[0] / STEPS_PER_REP)
        for name in variants:
            rows_out.append({"batch": batch, "products": name, "step_ms": round(statistics.median(steps[name]) * 1e3, 2),
                             "products_ms": round(statistics.median(products_only[name]) * 1e3, 2)})
        del model
    return {"config": {"shape": shape, "shape_dims": SHAPES[shape], "context": context, "reps": reps,
                       "steps_per_rep": STEPS_PER_REP, "threads": 1, "dtype": "float32"}, "rows": rows_out}


def table(payload: dict) -> str:
    return format_table(["batch", "products", "step ms", "of which products ms", "tokens/s"],
                        [[r["batch"], r["products"], r["step_ms"], r["products_ms"],
                          round(r["batch"] * 1e3 / r["step_ms"], 1)] for r in payload["rows"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=136, help="tokens already in the cache (default 136: the "
                        "middle of vs_transformers' 128-token prompts and 16 new tokens)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions of 8 steps (default 5; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="SmolLM-135M's shape, 1 repetition")
    parser.add_argument("--name", default="eager_floor", help="JSON file name (default eager_floor)")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    before = machine_info()
    payload = run("smollm-135m" if args.quick else args.shape, args.batch, args.context,
                  args.reps or (1 if args.quick else 5))
    print(table(payload))
    print(f"wrote {write_json(args.name, payload, before, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
