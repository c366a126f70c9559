"""Peers: cptoolkit's causal prefill attention beside other context-parallel attention libraries (CPU, gloo).

Every implementation gets the same seeded inputs (``q [1, hq, S, 64]``, ``k``/``v [1, hkv, S, 64]``, fp32,
causal, scale 1/8), sharded the way it expects: zigzag (DualChunkSwap: chunks ``r`` and ``2P-1-r``) for the
balanced rings, contiguous (rank ``r`` holds ``[r·S/P, (r+1)·S/P)``) for Ulysses and the unbalanced rings,
and converted to its tensor layout (``[b, h, s, d]`` or ``[b, s, h, d]``) before the clock starts.

- ``1 process``: the single-process kernel, ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its
  ``_backward``; what ``F.scaled_dot_product_attention`` dispatches to here) over the whole sequence, on
  rank 0 with one thread while the other ranks wait at a barrier. Every speedup is against it, same run.
- ``cptoolkit <comm>``: ``ring_prefill_attention`` for each of ``PREFILL_ALGORITHMS``; ``a2a+p2p`` uses a2a
  groups of 2 (on 2 ranks: one a2a group and a ring of 1).
- Peers, each through its public API (``PEERS`` below; ``make bench-peers`` installs them into
  ``.venv-peers``). A peer that is not installed, raises, or would not fit in memory shows its reason in
  the table instead of a time; one that runs forward only shows why its backward is missing.
  Not here, because they do not run on CPU through their public API: yunchang 0.6.4 (its torch kernels
  call the CUDA-only ``aten._scaled_dot_product_flash_attention``, inside its own ring whose posted
  send/recv then deadlock the next collective; its forward-only kernels reject the ``deterministic``
  argument ``UlyssesAttention`` passes) and ring-flash-attn (needs CUDA flash-attn).

Every process runs one thread (``torch.set_num_threads(1)``). With 4 ranks on the 2-core machine the ranks
are oversubscribed 2x (4 processes, 2 cores): the ideal speedup is then 2, not 4, and such rank counts run
lengths up to ``--oversubscribed-max-len`` only. The explicit-softmax peers (ringmaster's CPU path,
ring-attention-pytorch; 5-10x slower than one process) run up to ``--slow-max-len``. The default (full)
run takes about 25 minutes on 2 cores; ``FULL_REPS`` gives its repetitions per length.

Each repetition runs every implementation once per mode (``fwd`` under ``no_grad``, then ``fwd+bwd``:
forward with grad and ``torch.autograd.grad`` of a fixed seeded ``dout``), round-robin, after a barrier;
a repetition's time is its slowest rank's. Errors are taken from the first repetition's ``fwd+bwd``
results after the clock stops: max abs difference of the output and of dq, dk, dv (max over ranks and
over the three grads) against a float64 reference of the whole sequence, computed once per shape with
the same flash op in float64 (exact over all rows; blockwise in the kernel's own tiles) in the parent
process and cached in ``--ref-dir``.

    python bench/peers.py [--quick] [--lengths 4096 8192] [--ranks 2 4] [--heads mha gqa] [--reps 3]
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as `python bench/peers.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.common import (RESULTS_DIR, format_table, launch, machine_info, slowest_rank_per_rep, summarize,
                          write_json)
from cptoolkit.layers.algorithms import PREFILL_ALGORITHMS, kv_replicas
from cptoolkit.layers.block_attention import attention_backward, attention_forward
from cptoolkit.layers.dual_chunk_swap import shard_positions, shard_sequence
from cptoolkit.layers.hierarchical_prefill import new_hierarchical_groups
from cptoolkit.layers.ring_prefill import ring_prefill_attention

HEAD_DIM = 64
HEADS = {"mha": (8, 8), "gqa": (8, 2)}  # name -> (query heads, KV heads)
FULL_LENGTHS, QUICK_LENGTHS = (4096, 8192, 16384, 32768), (4096, 8192)
FULL_REPS = {4096: 3, 8192: 3, 16384: 3, 32768: 1}  # the full run: about 25 minutes on 2 cores
A2A_SIZE = 2
MODES = ("fwd", "fwd+bwd")
BASELINE = "1 process"
PEER_PACKAGES = ("deepspeed", "para-attn", "axolotl-ringmaster", "ring-attention-pytorch")


@dataclass
class Setup:
    """What every implementation's builder may use on this rank."""

    world_size: int
    rank: int
    scale: float
    hcp_groups: object = None  # cptoolkit a2a+p2p sub-groups, built once per run


@dataclass(frozen=True)
class Impl:
    """One implementation: how to shard its inputs, its tensor layout, and how to build its call.

    ``build(setup)`` returns ``attn(q, k, v) -> out`` in ``layout``; it may raise (not installed).
    ``kv_repeat(hq, hkv, P)`` is the factor by which K/V heads are repeated before they travel (1: never).
    ``memory_gib(S, hq, P)``: estimated peak of all ranks together, for implementations that materialize
    score matrices; the run skips a shape above ``--memory-gib``.
    """

    name: str
    shard: str  # "zigzag", "contiguous" or "whole"
    layout: str  # of q, k, v (and their grads): "bhsd" or "bshd"
    build: Callable[[Setup], Callable]
    kv_repeat: Callable[[int, int, int], int] = lambda hq, hkv, p: 1
    repeat_note: str = "never"
    memory_gib: Callable[[int, int, int], float] | None = None
    slow: bool = False  # explicit-softmax pure-PyTorch loops, 5-10x slower than one process: capped by --slow-max-len
    out_layout: str | None = None  # of the output (and dout) when it differs from ``layout``

    @property
    def layouts(self) -> tuple[str, str, str, str]:
        """The layouts of ``(q, k, v, dout)``."""
        return (self.layout,) * 3 + (self.out_layout or self.layout,)


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, replicas: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each KV head ``replicas`` times along ``head_dim`` (``repeat_interleave`` keeps GQA grouping)."""
    if replicas == 1:
        return k, v
    return k.repeat_interleave(replicas, head_dim), v.repeat_interleave(replicas, head_dim)


def _single_process(setup: Setup) -> Callable:
    def attn(q, k, v):
        return _FlashCPU.apply(q, k, v, setup.scale)
    return attn


class _FlashCPU(torch.autograd.Function):
    """The CPU flash op with its own backward: the single-process kernel."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = attention_forward(q, k, v, causal=True, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return (*attention_backward(dout, q, k, v, out, lse, causal=True, scale=ctx.scale), None)


def _cptoolkit(comm: str) -> Callable[[Setup], Callable]:
    def build(setup: Setup) -> Callable:
        return functools.partial(ring_prefill_attention, pcp_group=dist.group.WORLD, scale=setup.scale, comm=comm,
                                 hcp_groups=setup.hcp_groups if PREFILL_ALGORITHMS[comm].hierarchical else None)
    return build


def _sdpa_bshd(q, k, v, scale: float):
    """The local kernel handed to the Ulysses peers: SDPA (the CPU flash op) on ``[b, s, h, d]``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _deepspeed_ulysses(setup: Setup) -> Callable:
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    deepspeed.init_distributed(dist_backend="gloo")
    layer = DistributedAttention(functools.partial(_sdpa_bshd, scale=setup.scale), dist.group.WORLD,
                                 scatter_idx=2, gather_idx=1)

    def attn(q, k, v):  # [b, s/P, h, d]; DeepSpeed asserts kv heads >= P
        k, v = _repeat_kv(k, v, kv_replicas(k.shape[2], setup.world_size), head_dim=2)
        return layer(q, k, v, 0)
    return attn


def _para_attn_ulysses(setup: Setup) -> Callable:
    from para_attn.para_attn_interface import ulysses_attn_func

    local = functools.partial(F.scaled_dot_product_attention, enable_gqa=True)

    def attn(q, k, v):  # [b, h, s/P, d]; every head count must divide by P
        k, v = _repeat_kv(k, v, kv_replicas(k.shape[1], setup.world_size), head_dim=1)
        return ulysses_attn_func(q, k, v, is_causal=True, scale=setup.scale, mesh=dist.group.WORLD, attn_func=local)
    return attn


class _TorchRing(torch.autograd.Function):
    """PyTorch's ring loop (``_templated_ring_attention`` and ``_backward``, round-robin load balance on,
    torch's default rotation: K/V all-gathered once, dK/dV rotated by all-to-all) with the CPU flash ops."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp

        out, lse = cp._templated_ring_attention(dist.group.WORLD, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                                                q, k, v, is_causal=True, scale=scale)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = cp._templated_ring_attention_backward(
            dist.group.WORLD, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, dout, "grad_out",
            q, k, v, out, lse, is_causal=True, dropout_p=0.0, scale=ctx.scale)[:3]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _torch_ring(setup: Setup) -> Callable:
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    if not cp._cp_options.enable_load_balance:
        raise RuntimeError("torch's _cp_options.enable_load_balance is off: the zigzag shards need it on")
    return lambda q, k, v: _TorchRing.apply(q, k, v, setup.scale)


def _ringmaster(setup: Setup) -> Callable:
    from ringmaster.config import RotateMethod
    from ringmaster.ring.loop import ring_attention

    # RotateMethod.ALLTOALL selects ringmaster's P2P ring (the other choice all-gathers K/V).
    return functools.partial(ring_attention, group=dist.group.WORLD, causal=True, scaling=setup.scale, dropout=0.0,
                             provider="math", rotate_method=RotateMethod.ALLTOALL, attn_implementation="math")


def _ringmaster_memory_gib(seq_len: int, hq: int, pcp: int) -> float:
    # Its CPU path materializes [b, hq, S/P, S/P] fp32 scores; the backward holds about 5 such tensors.
    return 5 * hq * (seq_len // pcp) ** 2 * 4 * pcp / 2 ** 30


def _ring_attention_pytorch(setup: Setup) -> Callable:
    from ring_attention_pytorch import ring_flash_attn

    return functools.partial(ring_flash_attn, causal=True, ring_reduce_col=True)  # scale is its own 1/sqrt(d)


_ULYSSES_REPEAT = "to a multiple of P heads (P / gcd(hkv, P) copies) before its all-to-all"
IMPLS = [
    Impl(BASELINE, "whole", "bhsd", _single_process),
    *(Impl(f"cptoolkit {comm}", "zigzag", "bhsd", _cptoolkit(comm),
           kv_repeat={"a2a": lambda hq, hkv, p: kv_replicas(hkv, p),
                      "a2a+p2p": lambda hq, hkv, p: kv_replicas(hkv, min(A2A_SIZE, p))}.get(comm, lambda hq, hkv, p: 1),
           repeat_note=_ULYSSES_REPEAT if comm.startswith("a2a") else "never")
      for comm in PREFILL_ALGORITHMS),
    Impl("torch ring (zigzag)", "zigzag", "bhsd", _torch_ring),
    Impl("deepspeed ulysses", "contiguous", "bshd", _deepspeed_ulysses,
         kv_repeat=lambda hq, hkv, p: kv_replicas(hkv, p), repeat_note=_ULYSSES_REPEAT),
    Impl("para-attn ulysses", "contiguous", "bhsd", _para_attn_ulysses,
         kv_repeat=lambda hq, hkv, p: kv_replicas(hkv, p), repeat_note=_ULYSSES_REPEAT),
    Impl("ringmaster ring (contiguous)", "contiguous", "bhsd", _ringmaster,
         kv_repeat=lambda hq, hkv, p: hq // hkv, repeat_note="to hq heads before the ring (its CPU path)",
         memory_gib=_ringmaster_memory_gib, slow=True, out_layout="bshd"),
    Impl("ring-attention-pytorch (contiguous)", "contiguous", "bshd", _ring_attention_pytorch,
         repeat_note="after each receive, in compute only (nothing extra travels)", slow=True),
]
IMPLS_BY_NAME = {impl.name: impl for impl in IMPLS}


def _seed(seq_len: int, heads: str) -> int:
    return seq_len * 10 + list(HEADS).index(heads)


def make_inputs(seq_len: int, heads: str) -> tuple[torch.Tensor, ...]:
    """The seeded full-sequence ``(q, k, v, dout)`` in fp32 ``[1, h, S, 64]``: identical in every process."""
    hq, hkv = HEADS[heads]
    generator = torch.Generator().manual_seed(_seed(seq_len, heads))
    shapes = ((1, hq, seq_len, HEAD_DIM), (1, hkv, seq_len, HEAD_DIM), (1, hkv, seq_len, HEAD_DIM),
              (1, hq, seq_len, HEAD_DIM))
    return tuple(torch.randn(shape, generator=generator) for shape in shapes)


def reference_path(ref_dir: Path, seq_len: int, heads: str) -> Path:
    return ref_dir / f"ref_{seq_len}_{heads}_{_seed(seq_len, heads)}.pt"


def ensure_reference(ref_dir: Path, seq_len: int, heads: str) -> Path:
    """The float64 ``{out, dq, dk, dv}`` of the whole sequence (CPU flash op in float64), cached on disk."""
    path = reference_path(ref_dir, seq_len, heads)
    if path.is_file():
        return path
    q, k, v, dout = (x.double() for x in make_inputs(seq_len, heads))
    scale = 1.0 / math.sqrt(HEAD_DIM)
    start = time.perf_counter()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, True, scale=scale)
    ref_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"out": out, "dq": dq, "dk": dk, "dv": dv}, path)
    print(f"float64 reference {seq_len} {heads}: {time.perf_counter() - start:.1f} s -> {path}", flush=True)
    return path


def _positions(shard: str, seq_len: int, rank: int, world_size: int) -> torch.Tensor:
    if shard == "zigzag":
        return shard_positions(seq_len, rank, world_size)
    if shard == "contiguous":
        local_len = seq_len // world_size
        return torch.arange(rank * local_len, (rank + 1) * local_len)
    return torch.arange(seq_len)


def _native(x: torch.Tensor, shard: str, layout: str, rank: int, world_size: int) -> torch.Tensor:
    """This rank's shard of a full ``[b, h, S, d]`` tensor, in ``layout``, contiguous."""
    if shard == "zigzag":
        x = shard_sequence(x, rank, world_size, seq_dim=2)
    elif shard == "contiguous":
        x = x.narrow(2, rank * x.shape[2] // world_size, x.shape[2] // world_size)
    return (x.transpose(1, 2) if layout == "bshd" else x).contiguous()


def _canonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "bshd" else x


def _error(exc: BaseException) -> str:
    line = (traceback.format_exception_only(type(exc), exc)[-1].strip() or type(exc).__name__)
    return line if len(line) <= 160 else line[:157] + "..."


def _run_once(attn: Callable, tensors: tuple[torch.Tensor, ...], mode: str) -> tuple[float, tuple]:
    """``(seconds, (out, dq, dk, dv))`` of one call; grads are None for ``fwd``."""
    q, k, v, dout = tensors
    dist.barrier()
    if mode == "fwd":
        start = time.perf_counter()
        with torch.no_grad():
            out = attn(q, k, v)
        return time.perf_counter() - start, (out, None, None, None)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    start = time.perf_counter()
    out = attn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    return time.perf_counter() - start, (out.detach(), *grads)


def _errors(results: tuple, impl: Impl, reference: dict, rows: torch.Tensor) -> dict[str, float]:
    """Max abs difference of out and of dq, dk, dv (max of the three) against float64 on this rank's rows."""
    def diff(value, name, layout):
        return float((_canonical(value, layout).double() - reference[name][:, :, rows]).abs().max())

    out, dq, dk, dv = results
    errors = {"out": diff(out, "out", impl.layouts[3])}
    if dq is not None:
        errors["grad"] = max(diff(dq, "dq", impl.layout), diff(dk, "dk", impl.layout), diff(dv, "dv", impl.layout))
    return errors


def _check_shape(impl: Impl, seq_len: int, hq: int, world_size: int, memory_gib: float, slow_max_len: int
                 ) -> str | None:
    if impl.slow and seq_len > slow_max_len:
        return f"skipped: S > --slow-max-len {slow_max_len} (5-10x slower than one process where measured)"
    if impl.memory_gib is not None and impl.memory_gib(seq_len, hq, world_size) > memory_gib:
        return (f"skipped: needs ~{impl.memory_gib(seq_len, hq, world_size):.0f} GiB for its score matrices "
                f"(> --memory-gib {memory_gib:g})")
    return None


def measure_rank(rank: int, world_size: int, shapes: list[tuple[int, str, int]], impl_names: list[str],
                 ref_dir: str, memory_gib: float, slow_max_len: int) -> dict:
    """Per-rank body: ``{(S, heads): {impl: {"times_s": {mode: [..]}, "errors": {..}, "error": str|None,
    "bwd_error": str|None}}}``; rank-0-only implementations report 0 s on the other ranks."""
    setup = Setup(world_size=world_size, rank=rank, scale=1.0 / math.sqrt(HEAD_DIM))
    if "cptoolkit a2a+p2p" in impl_names:
        setup.hcp_groups = new_hierarchical_groups(dist.group.WORLD, min(A2A_SIZE, world_size))
    attns, build_errors = {}, {}
    for name in impl_names:
        try:
            attns[name] = IMPLS_BY_NAME[name].build(setup)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot be built is reported, not fatal
            build_errors[name] = _error(exc)
    results = {}
    for seq_len, heads, reps in shapes:
        full = make_inputs(seq_len, heads)
        reference = torch.load(reference_path(Path(ref_dir), seq_len, heads), mmap=True)
        entry = {name: {"times_s": {mode: [] for mode in MODES}, "errors": {}, "error": build_errors.get(name),
                        "bwd_error": None} for name in impl_names}
        for name in impl_names:
            if entry[name]["error"] is None:
                entry[name]["error"] = _check_shape(IMPLS_BY_NAME[name], seq_len, HEADS[heads][0], world_size,
                                                    memory_gib, slow_max_len)
        shards = {}  # (shard, layout) -> this rank's (q, k, v, dout)
        for rep in range(reps):
            for name in impl_names:
                impl, record = IMPLS_BY_NAME[name], entry[name]
                if record["error"] is not None:
                    continue
                key = (impl.shard, impl.layouts)
                if key not in shards:
                    shards[key] = tuple(_native(x, impl.shard, layout, rank, world_size)
                                        for x, layout in zip(full, impl.layouts))
                for mode in MODES:
                    if mode == "fwd+bwd" and record["bwd_error"] is not None:
                        continue
                    if impl.shard == "whole" and rank != 0:
                        dist.barrier()  # rank 0 runs alone, between two barriers, while this rank waits
                        dist.barrier()
                        record["times_s"][mode].append(0.0)
                        continue
                    try:
                        seconds, outputs = _run_once(attns[name], shards[key], mode)
                    except Exception as exc:  # noqa: BLE001 - a failing peer is reported, the run goes on
                        record["bwd_error" if mode == "fwd+bwd" else "error"] = _error(exc)
                        break
                    finally:
                        if impl.shard == "whole":
                            dist.barrier()
                    if rep == 0:
                        record["errors"].update(_errors(outputs, impl, reference,
                                                        _positions(impl.shard, seq_len, rank, world_size)))
                    record["times_s"][mode].append(seconds)
                    del outputs
            if rep == 0:
                _agree_on_failures(entry, world_size)
        results[(seq_len, heads)] = entry
    return results


def _agree_on_failures(entry: dict, world_size: int) -> None:
    """A failure on any rank marks the implementation failed on every rank (so no rank waits for it)."""
    failures = [None] * world_size
    dist.all_gather_object(failures, {name: (r["error"], r["bwd_error"]) for name, r in entry.items()})
    for name, record in entry.items():
        for key, index in (("error", 0), ("bwd_error", 1)):
            record[key] = record[key] or next((f[name][index] for f in failures if f[name][index]), None)


def _reps_for(seq_len: int, reps: int | None, quick: bool) -> int:
    if reps is not None:
        return reps
    return 2 if quick else FULL_REPS.get(seq_len, 3)


def _peer_versions() -> dict[str, str | None]:
    versions = {}
    for package in PEER_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _summarize_impl(by_rank: list[dict], name: str, baseline: dict) -> dict:
    records = [r[name] for r in by_rank]
    first = records[0]
    stats = {"error": first["error"], "bwd_error": first["bwd_error"], "modes": {}}
    if first["error"] is None:
        errors = {key: max(r["errors"].get(key, 0.0) for r in records) for key in first["errors"]}
        stats["max_abs_error"] = errors
    for mode in MODES:
        per_rank = [r["times_s"][mode] for r in records]
        if not per_rank[0] or first["error"] or (mode == "fwd+bwd" and first["bwd_error"]):
            continue
        step = slowest_rank_per_rep(per_rank)
        stats["modes"][mode] = {**summarize(step),
                                "per_rank_median_s": [summarize(t)["median_s"] for t in per_rank if any(t)]}
    for mode, mode_stats in stats["modes"].items():
        if mode in baseline:
            mode_stats["speedup_vs_1_process"] = baseline[mode]["median_s"] / mode_stats["median_s"]
    return stats


def run(lengths: list[int], ranks: list[int], heads_list: list[str], reps: int | None, quick: bool,
        impl_names: list[str], ref_dir: Path, memory_gib: float, slow_max_len: int, oversubscribed_max_len: int
        ) -> dict:
    """Compute the float64 references, launch each rank count once, and assemble the JSON payload."""
    torch.set_num_threads(os.cpu_count() or 1)
    for seq_len in lengths:
        for heads in heads_list:
            ensure_reference(ref_dir, seq_len, heads)
    torch.set_num_threads(1)
    all_shapes = [(seq_len, heads, _reps_for(seq_len, reps, quick)) for seq_len in lengths for heads in heads_list]
    rows = []
    for world_size in ranks:
        oversubscribed = world_size > (os.cpu_count() or 1)
        shapes = [shape for shape in all_shapes if not oversubscribed or shape[0] <= oversubscribed_max_len]
        start = time.perf_counter()
        per_rank = launch(world_size, measure_rank, shapes, impl_names, str(ref_dir), memory_gib, slow_max_len)
        print(f"{world_size} ranks: {time.perf_counter() - start:.0f} s", flush=True)
        for seq_len, heads, shape_reps in shapes:
            by_rank = [result[(seq_len, heads)] for result in per_rank]
            hq, hkv = HEADS[heads]
            baseline = _summarize_impl(by_rank, BASELINE, {})["modes"]
            impls = {}
            for name in impl_names:
                impl = IMPLS_BY_NAME[name]
                replicas = impl.kv_repeat(hq, hkv, world_size)
                local_kv_bytes = 2 * hkv * (seq_len // world_size) * HEAD_DIM * 4
                impls[name] = {**_summarize_impl(by_rank, name, baseline), "shard": impl.shard,
                               "layout": impl.layout, "kv_repeat": replicas,
                               "extra_kv_bytes_per_rank": (replicas - 1) * local_kv_bytes,
                               "kv_repeat_note": impl.repeat_note}
            rows.append({"ranks": world_size, "seq_len": seq_len, "heads": heads, "hq": hq, "hkv": hkv,
                         "reps": shape_reps, "impls": impls})
    return {"config": {"head_dim": HEAD_DIM, "batch": 1, "dtype": "float32", "causal": True, "heads": HEADS,
                       "threads_per_process": 1, "cpu_count": os.cpu_count(), "a2a_size": A2A_SIZE,
                       "oversubscription": {str(p): round(p / (os.cpu_count() or 1), 2) for p in ranks},
                       "slow_max_len": slow_max_len, "oversubscribed_max_len": oversubscribed_max_len,
                       "reference": "float64 CPU flash op (fwd + bwd) over the whole sequence, all rows",
                       "peer_versions": _peer_versions(), "torch": torch.__version__},
            "results": rows}


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(payload: dict) -> str:
    rows = []
    for entry in payload["results"]:
        for name, stats in entry["impls"].items():
            fwd, both = stats["modes"].get("fwd", {}), stats["modes"].get("fwd+bwd", {})
            errors = stats.get("max_abs_error", {})
            extra = stats["extra_kv_bytes_per_rank"]
            note = stats["error"] or (f"no backward: {stats['bwd_error']}" if stats["bwd_error"] else "")
            rows.append([entry["ranks"], entry["seq_len"], entry["heads"], name,
                         _cell(fwd.get("median_s"), ".3g"), _cell(fwd.get("speedup_vs_1_process"), ".2f"),
                         _cell(both.get("median_s"), ".3g"), _cell(both.get("speedup_vs_1_process"), ".2f"),
                         _cell(errors.get("out"), ".1e"), _cell(errors.get("grad"), ".1e"),
                         f"x{stats['kv_repeat']} (+{extra / 2 ** 20:.1f} MiB)" if extra else "-", note])
    return format_table(["ranks", "S", "heads", "implementation", "fwd s", "fwd speedup", "fwd+bwd s",
                         "fwd+bwd speedup", "max err out", "max err grads", "K/V repeat (extra/rank)", "note"],
                        rows)


def plot(payload: dict, path: Path) -> Path:
    """Speedup over one process vs length: one panel per (ranks, mode), solid MHA, dashed GQA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({entry["ranks"] for entry in payload["results"]})
    fig, axes = plt.subplots(len(ranks), len(MODES), figsize=(12, 4.2 * len(ranks)), squeeze=False)
    names = [name for name in payload["results"][0]["impls"] if name != BASELINE]
    colors = dict(zip(names, plt.get_cmap("tab10").colors))
    for row, world_size in enumerate(ranks):
        for col, mode in enumerate(MODES):
            ax = axes[row][col]
            for name in names:
                for heads, style in (("mha", "-"), ("gqa", "--")):
                    points = [(e["seq_len"], e["impls"][name]["modes"][mode]["speedup_vs_1_process"])
                              for e in payload["results"] if e["ranks"] == world_size and e["heads"] == heads
                              and "speedup_vs_1_process" in e["impls"][name]["modes"].get(mode, {})]
                    if points:
                        ax.plot(*zip(*points), style, marker="o", color=colors[name],
                                label=f"{name} ({heads})")
            ax.axhline(min(world_size, payload["config"]["cpu_count"]), color="grey", linestyle=":")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{world_size} ranks, {mode}")
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel("speedup over 1 process")
            ax.grid(True, alpha=0.3)
    fig.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" takes in the legend below the panels
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}, 2 repetitions")
    parser.add_argument("--lengths", type=int, nargs="+", help=f"default {FULL_LENGTHS}")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="rank counts (default 2 4)")
    parser.add_argument("--heads", nargs="+", choices=sorted(HEADS), default=list(HEADS),
                        help="mha: 8 query / 8 KV heads; gqa: 8 query / 2 KV heads (default both)")
    parser.add_argument("--reps", type=int, help=f"repetitions per shape (default {FULL_REPS}; 2 with --quick)")
    parser.add_argument("--impls", nargs="+", choices=list(IMPLS_BY_NAME), default=list(IMPLS_BY_NAME),
                        metavar="NAME", help="implementations to run (default all)")
    parser.add_argument("--memory-gib", type=float, default=10.0,
                        help="skip an implementation whose estimated peak over all ranks exceeds this (default 10)")
    parser.add_argument("--slow-max-len", type=int, default=4096,
                        help="longest sequence for the explicit-softmax peers (default 4096)")
    parser.add_argument("--oversubscribed-max-len", type=int, default=16384,
                        help="longest sequence for rank counts above the core count (default 16384)")
    parser.add_argument("--ref-dir", type=Path, default=Path(tempfile.gettempdir()) / "cptoolkit-peers-ref",
                        help="cache of the float64 references")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "peers.json", help="JSON output")
    parser.add_argument("--plot", type=Path, default=RESULTS_DIR / "peers.png", help="PNG output")
    args = parser.parse_args(argv)
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    for world_size in args.ranks:
        if any(n % (2 * world_size) for n in lengths):
            parser.error(f"--lengths must be multiples of 2 x ranks = {2 * world_size}")
    impl_names = [BASELINE] + [name for name in args.impls if name != BASELINE]
    before = machine_info()
    payload = run(list(lengths), args.ranks, args.heads, args.reps, args.quick, impl_names, args.ref_dir,
                  args.memory_gib, args.slow_max_len, args.oversubscribed_max_len)
    print(table(payload))
    json_path = write_json(args.out.stem, payload, before, args.out.parent)
    print(f"wrote {json_path} and {plot(payload, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
