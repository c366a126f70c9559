"""Process start-up for launchers: torchrun environment → process group, rank-aware logging, fail-fast exit.

A launcher is ``arguments → YAML → config → groups → run``; this module holds the pieces every
launcher shares, so ``launch/*.py`` stay thin.
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from cptoolkit.config import ConfigError, RuntimeConfig, model_moe
from cptoolkit.torchrun import end_with_agent

LOG = logging.getLogger("cptoolkit")
_REPO_ROOT = Path(__file__).resolve().parents[1]
_CONFIG_ERROR_GRACE_S = 5.0


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_nproc_per_node() -> int | None:
    """torchrun's processes per node (``LOCAL_WORLD_SIZE``), or None outside torchrun."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value else None


def _check_node_layout(layout, config_source: str) -> None:
    """Refuse a layout whose TP group would span nodes (TP all-reduces every layer), as a ConfigError."""
    from cptoolkit.layout import check_nodes

    nproc_per_node = env_nproc_per_node()
    if nproc_per_node is None:
        return
    try:
        check_nodes(layout, nproc_per_node)
    except ValueError as err:
        raise ConfigError(f"{config_source}: {err}") from None


def setup_logging(rank: int, verbose: bool = False) -> None:
    """Rank 0 logs at INFO, other ranks only warnings and errors; every line says its rank.

    Unless ``verbose``, third-party warnings are silenced: megatron-core warns at import that
    TransformerEngine/Apex are missing and about CUDA-only tuning, which says nothing actionable on a
    CPU run. Call this before anything imports megatron, or the warnings are already out."""
    logging.basicConfig(stream=sys.stdout, format=f"[rank {rank}] %(message)s",
                        level=logging.INFO if rank == 0 or verbose else logging.WARNING, force=True)
    if not verbose:
        warnings.filterwarnings("ignore", module=r"(megatron|torch|transformers|triton)(\.|$)")
        logging.getLogger("megatron").setLevel(logging.WARNING)  # its import-time notes about TE/FSDP


def select_device(runtime: RuntimeConfig) -> torch.device:
    """``auto`` → this rank's CUDA device when CUDA is available, else CPU."""
    if runtime.device == "cuda" or (runtime.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("runtime.device = 'cuda': CUDA is not available on this machine; use cpu or auto")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def collective_timeout(runtime: RuntimeConfig) -> datetime.timedelta:
    """The bound on every collective once start-up is over: pass it to every ``new_group`` created after
    ``end_startup`` (the groups created before it get it from ``end_startup``)."""
    return datetime.timedelta(seconds=runtime.collective_timeout_s)


def startup_timeout(runtime: RuntimeConfig) -> datetime.timedelta:
    """The bound on start-up: rendezvous, ``init_process_group``, group creation, checkpoint loading."""
    return datetime.timedelta(seconds=runtime.startup_timeout_s)


def init_distributed(runtime: RuntimeConfig, expected_world_size: int, config_source: str) -> torch.device:
    """Check the launched world size against the config, then join the default process group
    (NCCL on CUDA, gloo on CPU) with the config's start-up timeout (``end_startup`` lowers it to the
    collective timeout), and learn the local peers' process ids (so a failing rank can end a frozen
    peer; see ``run_main``)."""
    world_size = env_world_size()
    if world_size != expected_world_size:
        raise ConfigError(f"{config_source}: the config needs dp*pcp*tp = {expected_world_size} processes but "
                          f"{world_size} were launched; run torchrun --nproc-per-node {expected_world_size}")
    device = select_device(runtime)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env_rank(),
                                world_size=world_size, timeout=startup_timeout(runtime))
    _remember_local_peers()
    return device


_LOCAL_PEER_PIDS: list[int] = []


def _remember_local_peers() -> None:
    """Collective: every rank shares (host, pid); keep the pids of the other ranks on this host."""
    if dist.get_world_size() == 1:
        return
    me = (socket.gethostname(), os.getpid())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    _LOCAL_PEER_PIDS[:] = [pid for host, pid in everyone if host == me[0] and pid != me[1]]


def _end_local_peers() -> None:
    """SIGKILL this host's other ranks. A frozen rank (stopped, or stuck outside any collective)
    ignores the SIGTERM torchrun sends first, and torchrun waits 30 s before its SIGKILL; a rank
    that fails ends the job now instead."""
    for pid in _LOCAL_PEER_PIDS:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _short_path(filename: str) -> str:
    path = Path(filename)
    return str(path.relative_to(_REPO_ROOT)) if path.is_relative_to(_REPO_ROOT) else filename


def start_groups(cfg):
    """The process groups of ``cfg.parallel`` (created within the start-up timeout; ``end_startup`` bounds
    their collectives by the collective timeout), refused as a ConfigError if a TP group would span nodes;
    rank 0 logs the node-aware layout table."""
    from cptoolkit.parallel_state import initialize_model_parallel, render_layout

    p, m = cfg.parallel, cfg.model
    moe = model_moe(m)
    groups = initialize_model_parallel(tp=p.tp, pcp=p.pcp, dcp=p.dcp, dp=p.dp, num_heads=m.num_attention_heads,
                                       num_kv_heads=m.num_kv_heads, timeout=startup_timeout(cfg.runtime),
                                       hierarchical_a2a_size=p.hierarchical_a2a_size, ep=p.ep,
                                       num_experts=None if moe is None else moe.num_experts)
    _check_node_layout(groups.layout, cfg.source)
    LOG.info("%s\n", render_layout(groups.layout, nproc_per_node=env_nproc_per_node()))
    return groups


def _member_groups(groups) -> list[dist.ProcessGroup]:
    """This rank's groups of a ``ParallelGroups`` (its ``hcp_groups`` included, when built)."""
    hcp = () if groups.hcp_groups is None else (groups.hcp_groups.a2a_group, groups.hcp_groups.ring_group)
    return [groups.tp_group, groups.pcp_group, groups.dcp_group, groups.dp_group, groups.dp_pcp_group,
            groups.replica_group, groups.self_group, groups.ep_group, groups.etp_group, *hcp]


def end_startup(groups, runtime: RuntimeConfig) -> None:
    """Collective over the default group, once this rank has loaded everything: wait (within the start-up
    timeout) until every rank has, then bound every later collective on the default group and on ``groups``
    by ``runtime.collective_timeout_s``. Before it, a rank that is slow to start (a loaded machine, a large
    checkpoint) is waited for up to ``startup_timeout_s``; after it, a stuck or stopped peer ends the job within
    ``collective_timeout_s``. torch 2.13 has no public call that changes a created group's timeout;
    ``distributed_c10d._set_pg_timeout`` does (gloo and NCCL)."""
    dist.barrier()
    for group in (None, *_member_groups(groups)):
        dist.distributed_c10d._set_pg_timeout(collective_timeout(runtime), group)


def _describe_failure(error: BaseException) -> str:
    """One line for the log. A collective timeout names the ``torch.distributed`` operation and the
    cptoolkit line that issued it (e.g. ``all_gather_single from cptoolkit/layers/comm.py:58``)."""
    first_line = str(error).splitlines()[0] if str(error) else ""
    frames = traceback.extract_tb(error.__traceback__)
    in_torch_dist = [i for i, f in enumerate(frames) if "torch/distributed" in f.filename.replace("\\", "/")]
    if not in_torch_dist or "timed out" not in first_line.lower():
        return f"{type(error).__name__}: {first_line}"
    ops = [frames[i].name for i in in_torch_dist if frames[i].name not in ("wrapper", "_wrapper")]
    caller = frames[in_torch_dist[0] - 1] if in_torch_dist[0] > 0 else None
    where = f" from {_short_path(caller.filename)}:{caller.lineno}" if caller else ""
    return (f"collective {ops[0] if ops else '?'}{where} timed out (runtime.collective_timeout_s; a peer "
            f"rank is stuck or gone): {first_line}")


def run_main(main: Callable[[], int | None], verbose: bool = False) -> None:
    """Run a launcher's main and exit: 0 on success; 2 on a ``ConfigError`` (bad config, checkpoint
    or input: one line from rank 0; another rank reports its own only if rank 0 has not ended the job
    within ``_CONFIG_ERROR_GRACE_S``); 1 on any other
    failure (this rank's traceback, and its local peers are ended so no frozen rank keeps the job
    alive). ``main`` may return a non-zero code itself (e.g. requests that failed). Under torchrun it first
    binds this rank's life to torchrun's (``cptoolkit.torchrun.end_with_agent``)."""
    end_with_agent()  # before anything else: a rank never outlives the torchrun that started it
    rank = env_rank()
    setup_logging(rank, verbose)
    code = 0
    try:
        code = main() or 0
    except ConfigError as err:
        if rank != 0 and not verbose:
            # Usually every rank hits the same config error: rank 0 reports it and its exit makes
            # torchrun end this rank during the wait. Still alive after it, this rank's error is its own.
            time.sleep(_CONFIG_ERROR_GRACE_S)
        LOG.error("error: %s", err)
        code = 2
    except Exception as err:  # noqa: BLE001 - any failure must end this rank non-zero, with its traceback
        LOG.error("failed: %s\n%s", _describe_failure(err), traceback.format_exc())
        code = 1
    finally:
        if dist.is_initialized() and code == 0:
            dist.destroy_process_group()
    sys.stdout.flush()
    if code == 1:
        _end_local_peers()
    os._exit(code) if code else sys.exit(0)
