"""The fastest of three equivalent ways to compute a linear layer on a few rows, measured once per weight shape.

A decode step computes ``y = x @ W^T`` for ``x [m, k]`` with ``m`` = the batch (1 to a few dozen rows) and a weight
``W [n, k]`` stored row-major, as megatron-core and transformers store it. On a CPU the BLAS kernel picked for that
product depends on the operand order, and no order is fastest everywhere (one core of this project's CI machine,
``bench/matmul_plan.py``): at ``m = 8`` the 151936 x 896 vocabulary projection takes 132 ms as ``x @ W^T`` and 84 ms as
``(W @ x^T)^T`` in float32, 35 ms against 22 ms in bfloat16; at ``m = 2`` in float32 the order reverses (42 against
90 ms); at ``m = 1`` in bfloat16 the two-row product ``W @ [x; x]^T`` beats the one-row one (22 against 33 ms). The
three formulations read the same weight in the same layout (nothing is copied or repacked) and give the same
product up to float rounding (float32: a few ulps of the output; bfloat16: identical in most shapes measured).

``MatmulPlan.measure`` times each formulation for each distinct ``(n, k, dtype)`` of the given weights at each row
bucket (1, 2, 4, ...: the next power of two at or above ``m``), as a forward streams the weights from memory, sums the timings over ``group`` (one all-reduce, so
every rank of a model replica takes the same choice and computes the same bits), and keeps the fastest;
``MatmulPlan.linear`` then computes ``x @ W^T`` the measured way. Rows above the largest bucket, weights that are not
row-major, shapes not measured and non-CPU devices (where the BLAS heuristics and CUDA graphs are left as they are)
use ``x @ W^T``, megatron's own formulation.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

ShapeKey = tuple[int, int, torch.dtype]


def _x_wt(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [m, k] @ W^T``: megatron's (and transformers') formulation."""
    return torch.matmul(x, weight.t())


def _w_xt(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(W @ x^T)^T``: the weight as the left operand, the ``[m, n]`` result copied row-major (so the next layer's
    products see the operand layout they were measured with)."""
    return torch.matmul(weight, x.t()).t().contiguous()


def _w_xt_two_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(W @ [x; x]^T)^T``'s first ``m`` rows: measured for ``m = 1`` only, where BLAS runs a two-column product
    faster than a matrix-vector one."""
    return torch.matmul(weight, torch.cat((x, x)).t())[:, :x.shape[0]].t().contiguous()


FORMULATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "x_wt": _x_wt, "w_xt": _w_xt, "w_xt_two_rows": _w_xt_two_rows}
_NAMES = tuple(FORMULATIONS)
# The largest row bucket measured (rows above it use ``x @ W^T``): from 256 to 8192 rows ``x @ W^T`` was as fast or
# faster in every shape measured (docs/results.md), and a pass over the weights at many rows costs seconds of
# start-up; between 16 and 256 rows a faster formulation may be left unused.
MAX_BUCKET = 16
# Weights of one shape timed per pass: enough that their sum outgrows the caches for the layers of models worth
# tuning, few enough that a 32-layer model's start-up does not time every layer.
WEIGHTS_PER_SHAPE = 8


def row_bucket(rows: int) -> int:
    """The smallest power of two ``>= rows`` (``rows >= 1``)."""
    return 1 << (rows - 1).bit_length()


def _applies(name: str, bucket: int) -> bool:
    return name != "w_xt_two_rows" or bucket == 1


def _seconds(name: str, x: torch.Tensor, weight: torch.Tensor) -> float:
    """The time of one product of formulation ``name``."""
    start = time.perf_counter()
    FORMULATIONS[name](x, weight)
    return time.perf_counter() - start


class MatmulPlan:
    """``choice[(n, k, dtype)][bucket]``: the formulation (a key of ``FORMULATIONS``) ``linear`` uses for a
    row-major weight ``[n, k]`` of that dtype and ``m`` rows with ``row_bucket(m) == bucket``."""

    def __init__(self, choice: Optional[dict[ShapeKey, dict[int, str]]] = None):
        self.choice = choice or {}

    @classmethod
    def measure(cls, weights: Sequence[torch.Tensor], max_rows: int, group: Optional[dist.ProcessGroup] = None,
                reps: int = 2) -> "MatmulPlan":
        """Time every formulation for each distinct ``(n, k, dtype)`` among ``weights`` (CPU, row-major ones only;
        in the order a forward reads them; the first ``WEIGHTS_PER_SHAPE`` of each shape) at the buckets up to
        ``row_bucket(min(max_rows, MAX_BUCKET))``, and keep the fastest per shape and bucket. A formulation is timed as a decode step meets it: one pass computes it on every weight in
        turn, so each product streams its weight from memory as in the model (timing one weight over and over
        would measure it in cache: at SmolLM-135M's 3072 x 576 gate/up, 8 rows, that picks a formulation 30%
        slower in the model); a shape's time is its share of the pass, the least of ``reps`` passes after a
        warm-up one. The timings are summed over ``group`` (every rank of it must call this with weights of the
        same shapes). Costs ``(reps + 1) x 3`` passes over the weights per bucket: about 4 s for Qwen2.5-0.5B in
        float32 at buckets 1-8 on one core."""
        row_major, per_shape_count = [], {}
        for w in weights:  # at most WEIGHTS_PER_SHAPE of each shape, in forward order
            key = (w.shape[0], w.shape[1], w.dtype) if w.dim() == 2 else None
            if key and w.device.type == "cpu" and w.is_contiguous() and per_shape_count.get(key, 0) < WEIGHTS_PER_SHAPE:
                per_shape_count[key] = per_shape_count.get(key, 0) + 1
                row_major.append(w)
        keys = sorted(per_shape_count, key=str)
        index = {key: i for i, key in enumerate(keys)}
        buckets = [1 << i for i in range(row_bucket(min(max(1, max_rows), MAX_BUCKET)).bit_length())]
        seconds = torch.full((len(keys), len(buckets), len(_NAMES)), float("inf"), dtype=torch.float64)
        with torch.inference_mode():
            for j, bucket in enumerate(buckets):
                inputs = {(k, dtype): torch.ones(bucket, k, dtype=dtype) for _, k, dtype in keys}
                for f, name in enumerate(_NAMES):
                    if not _applies(name, bucket):
                        continue
                    for rep in range(reps + 1):
                        per_shape = torch.zeros(len(keys), dtype=torch.float64)
                        for weight in row_major:
                            i = index[(weight.shape[0], weight.shape[1], weight.dtype)]
                            per_shape[i] += _seconds(name, inputs[(weight.shape[1], weight.dtype)], weight)
                        if rep > 0:
                            seconds[:, j, f] = torch.minimum(seconds[:, j, f], per_shape)
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(seconds, group=group)
        fastest = seconds.argmin(dim=-1).tolist()
        return cls({key: {bucket: _NAMES[fastest[i][j]] for j, bucket in enumerate(buckets)}
                    for i, key in enumerate(keys)})

    def describe(self) -> str:
        """One line per measured shape: ``n x k dtype: bucket=formulation ...`` (empty plan: megatron's product)."""
        if not self.choice:
            return "x @ W^T everywhere (no plan measured)"
        return "; ".join(f"{n}x{k} {str(dtype).removeprefix('torch.')}: "
                         + " ".join(f"{bucket}={name}" for bucket, name in by_bucket.items())
                         for (n, k, dtype), by_bucket in self.choice.items())

    def formulation(self, rows: int, weight: torch.Tensor) -> str:
        """The formulation ``linear`` uses for ``rows`` rows against ``weight``."""
        if not weight.is_contiguous():
            return "x_wt"
        by_bucket = self.choice.get((weight.shape[0], weight.shape[1], weight.dtype))
        return "x_wt" if by_bucket is None else by_bucket.get(row_bucket(rows), "x_wt")

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x [..., k] @ weight^T`` -> ``[..., n]`` (``weight [n, k]``, ``x`` contiguous), computed the measured way."""
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if rows == 0:
            return _x_wt(x, weight)
        out = FORMULATIONS[self.formulation(rows, weight)](x.reshape(rows, x.shape[-1]), weight)
        return out.view(*x.shape[:-1], weight.shape[0])
