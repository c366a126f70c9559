"""The fastest of three equivalent ways to compute a linear layer on a few rows, timed in the model's own forwards.

A decode step computes ``y = x @ W^T`` for ``x [m, k]`` with ``m`` = the batch (1 to a few dozen rows) and a weight
``W [n, k]`` stored row-major, as megatron-core and transformers store it. On a CPU the BLAS kernel picked for that
product depends on the operand order, and no order is fastest everywhere (one core of this project's CI machine,
``bench/matmul_plan.py``, docs/results.md): at ``m = 8`` the 151936 x 896 vocabulary projection takes 132 ms as
``x @ W^T`` and 84 ms as ``(W @ x^T)^T`` in float32, 35 ms against 22 ms in bfloat16; at ``m = 2`` in float32 the
order reverses (42 against 90 ms); at ``m = 1`` in bfloat16 the two-row product ``W @ [x; x]^T`` beats the one-row one
(22 against 33 ms). The three formulations read the same weight in the same layout (nothing is copied or repacked)
and give the same product up to float rounding (float32: a few ulps of the output; bfloat16: identical in most
shapes measured).

Which one wins also depends on what runs around the product: timed alone, over and over, a weight sits in the caches;
even a pass over every weight of a model, as a step streams them, picked for SmolLM-135M's 3072 x 576 gate/up at 8
rows the formulation that made its decode step 5% slower than the other (140 against 133 ms a step). So a
``MatmulPlan`` with ``tune=True`` times the formulations in the model's own decode forwards (``tuning``: the
engine's decode steps, which run the same products on every rank of the replica): the first products of each
``(n, k, dtype)`` and row bucket (1, 2, 4, ..., ``MAX_BUCKET``: the next power of two at or above ``m``) take the
formulations in turn, each timed where it runs, until each has ``TRIALS`` timings; ``settle`` (on leaving the
window, on every rank of the replica at the same point) then sums the least timing of each over the replica's ``group`` (one all-reduce, so every rank
keeps the same choice and computes the same bits) and keeps the fastest. A Qwen2.5-0.5B decode step settles its
layers' shapes in its first step and the vocabulary (one product a step) after ``3 x TRIALS`` steps, at no start-up
cost. Rows above ``MAX_BUCKET``, weights that are not row-major and non-CPU devices (where the BLAS heuristics and
CUDA graphs are left as they are) use ``x @ W^T``, megatron's own formulation, as does a plan without ``tune``
(or outside a ``tuning`` window) for every shape it holds no choice for.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from cptoolkit.layers.comm import all_reduce

LOG = logging.getLogger("cptoolkit")
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
# The largest row bucket timed (rows above it use ``x @ W^T``): from 2048 to 8192 rows ``x @ W^T`` was faster in
# every shape measured, at 256-512 rows in all but one (docs/results.md), and a prefill's products are too costly to
# try slower ways on; between 16 and 256 rows a faster formulation may be left unused.
MAX_BUCKET = 16
# Timings of each formulation before a shape and bucket is settled.
TRIALS = 2


def row_bucket(rows: int) -> int:
    """The smallest power of two ``>= rows`` (``rows >= 1``)."""
    return 1 << (rows - 1).bit_length()


def candidates(bucket: int) -> tuple[str, ...]:
    """The formulations tried at ``bucket`` rows (the two-row product only for one row)."""
    return tuple(name for name in FORMULATIONS if name != "w_xt_two_rows" or bucket == 1)


class MatmulPlan:
    """``choice[(n, k, dtype)][bucket]``: the formulation (a key of ``FORMULATIONS``) ``linear`` uses for a
    row-major weight ``[n, k]`` of that dtype and ``m`` rows with ``row_bucket(m) == bucket``. With ``tune``, the
    pairs without a choice are timed in ``linear`` and chosen by ``settle`` (timings summed over ``group``);
    ``clock`` is the timer (seconds)."""

    def __init__(self, choice: Optional[dict[ShapeKey, dict[int, str]]] = None, tune: bool = False,
                 group: Optional[dist.ProcessGroup] = None, clock: Callable[[], float] = time.perf_counter):
        self.choice = choice or {}
        self.tune, self.group, self.clock = tune, group, clock
        self._in_window = False
        self._timings: dict[tuple[ShapeKey, int], dict[str, list[float]]] = {}
        self._ready: set[tuple[ShapeKey, int]] = set()

    @contextlib.contextmanager
    def tuning(self):
        """The window in which products without a choice are timed (outside it they use ``x @ W^T``): forwards that
        run the very same products on every rank of ``group`` (decode steps; not a prefill, whose prompt scoring
        computes each PCP rank's own rows), then ``settle`` on leaving it."""
        self._in_window = True
        try:
            yield self
        finally:
            self._in_window = False
        self.settle()

    def formulation(self, rows: int, weight: torch.Tensor) -> Optional[str]:
        """The formulation ``linear`` uses for ``rows`` rows against ``weight``; None while it is being timed."""
        return self._formulation(row_bucket(rows), weight)

    def _formulation(self, bucket: int, weight: torch.Tensor) -> Optional[str]:
        if not weight.is_contiguous() or weight.device.type != "cpu" or bucket > MAX_BUCKET:
            return "x_wt"
        chosen = self.choice.get((weight.shape[0], weight.shape[1], weight.dtype), {}).get(bucket)
        return chosen or (None if self.tune and self._in_window else "x_wt")

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x [..., k] @ weight^T`` -> ``[..., n]`` (``weight [n, k]``, ``x`` contiguous), computed the chosen way
        (or, while the shape and bucket are being timed, the next formulation in turn, timed)."""
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if rows == 0:
            return _x_wt(x, weight)
        x2d, bucket = x.reshape(rows, x.shape[-1]), row_bucket(rows)
        name = self._formulation(bucket, weight)
        if name is None:
            out = self._timed(x2d, weight, bucket)
        else:
            out = FORMULATIONS[name](x2d, weight)
        return out.view(*x.shape[:-1], weight.shape[0])

    def _timed(self, x: torch.Tensor, weight: torch.Tensor, bucket: int) -> torch.Tensor:
        pair = ((weight.shape[0], weight.shape[1], weight.dtype), bucket)
        timings = self._timings.setdefault(pair, {name: [] for name in candidates(bucket)})
        # The formulation with the fewest timings, in turn (the same sequence on every rank); once each has
        # TRIALS, the first (x @ W^T), untimed, until ``settle``.
        name = min(timings, key=lambda n: len(timings[n]))
        if len(timings[name]) >= TRIALS:
            return FORMULATIONS[name](x, weight)
        start = self.clock()
        out = FORMULATIONS[name](x, weight)
        timings[name].append(self.clock() - start)
        if all(len(t) >= TRIALS for t in timings.values()):
            self._ready.add(pair)
        return out

    def settle(self) -> None:
        """Choose the fastest formulation of every shape and bucket whose timings are complete: the least timing
        of each, summed over ``group``. Every rank of ``group`` calls this at the same point, after the same
        ``tuning`` windows (so the same pairs are complete on each)."""
        if not self._ready:
            return
        pairs = sorted(self._ready, key=str)
        seconds = torch.full((len(pairs), len(_NAMES)), float("inf"), dtype=torch.float64)
        for i, pair in enumerate(pairs):
            for name, times in self._timings[pair].items():
                seconds[i, _NAMES.index(name)] = min(times)
        if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            all_reduce(seconds, self.group)
        for (key, bucket), fastest in zip(pairs, seconds.argmin(dim=-1).tolist()):
            self.choice.setdefault(key, {})[bucket] = _NAMES[fastest]
            del self._timings[(key, bucket)]
            LOG.info("matmul plan: %d x %d %s at %d row(s): %s", key[0], key[1], str(key[2]).removeprefix("torch."),
                     bucket, _NAMES[fastest])
        self._ready.clear()
