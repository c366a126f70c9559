"""Run a function on N CPU ranks (gloo on 127.0.0.1) and return what each rank returned.

A rank that raises fails the whole run at once with that rank's traceback; the others are killed.
A run that outlives its deadline is killed too, so no test can hang on a stuck collective.
Children are forked from a forkserver that has imported torch once, so a rank starts in well
under a second and never inherits an OpenMP pool from the test process.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable

_CONTEXT = mp.get_context("forkserver")
# megatron-core costs seconds of CPU to import: once in the forkserver instead of once per rank.
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed", "megatron.core.models.gpt.gpt_model"])


class RankFailed(RuntimeError):
    """A rank raised: the message carries its rank and traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, world_size, port, collective_timeout_s, fn, args, kwargs, results):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout_s))
        value = fn(rank, world_size, *args, **kwargs)
        # Pickled here, not by the queue's feeder thread: a tensor would otherwise travel as a
        # shared-memory handle that dies with this process before the parent opens it.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, with its traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size: int, fn: Callable[..., Any], *args, timeout_s: float = 120.0,
              collective_timeout_s: float = 60.0, **kwargs) -> list[Any]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    ``fn`` must be a module-level function (it is pickled by reference). Returns the list of
    per-rank return values, indexed by rank. Raises RankFailed with the first failing rank's
    traceback, or TimeoutError when the run exceeds ``timeout_s``.
    """
    results = _CONTEXT.Queue()
    port = free_port()
    procs = [
        _CONTEXT.Process(target=_rank_main, daemon=True,
                         args=(rank, world_size, port, collective_timeout_s, fn, args, kwargs, results))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{world_size}-rank run of {fn.__name__} exceeded {timeout_s:.0f} s; "
                                   f"ranks that finished: {sorted(values)}")
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
                if dead:
                    raise RankFailed(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                                     "before reporting") from None
                continue
            if status == "error":
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{value}")
            values[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(values) == world_size else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [values[rank] for rank in range(world_size)]


def my_group(rank_lists: list[list[int]]):
    """Inside a rank of ``run_ranks``: create every group of ``rank_lists`` in order (collective: every rank calls
    it with the same lists), each list's order its group-rank order; return this rank's."""
    import torch.distributed as dist

    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks, sort_ranks=False)
        if dist.get_rank() in ranks:
            mine = group
    return mine
