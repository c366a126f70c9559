"""Process start-up for launchers: torchrun environment → process group, rank-aware logging, fail-fast exit.

A launcher is ``arguments → YAML → config → groups → run``; this module holds the pieces every
launcher shares, so ``launch/*.py`` stay thin.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import traceback
import warnings
from typing import Callable

import torch
import torch.distributed as dist

from cptoolkit.config import ConfigError, RuntimeConfig

LOG = logging.getLogger("cptoolkit")


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO, other ranks only warnings and errors; every line says its rank.

    megatron-core warns at import that TransformerEngine/Apex are missing and about CUDA-only
    tuning; on a CPU run those say nothing actionable, so they are silenced."""
    logging.basicConfig(stream=sys.stdout, format=f"[rank {rank}] %(message)s",
                        level=logging.INFO if rank == 0 else logging.WARNING, force=True)
    warnings.filterwarnings("ignore", module=r"megatron\.")


def select_device(runtime: RuntimeConfig) -> torch.device:
    """``auto`` → this rank's CUDA device when CUDA is available, else CPU."""
    if runtime.device == "cuda" or (runtime.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("runtime.device = 'cuda': CUDA is not available on this machine; use cpu or auto")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(runtime: RuntimeConfig, expected_world_size: int, config_source: str) -> torch.device:
    """Check the launched world size against the config, then join the default process group
    (NCCL on CUDA, gloo on CPU) with the config's collective timeout."""
    world_size = env_world_size()
    if world_size != expected_world_size:
        raise ConfigError(f"{config_source}: the config needs dp*pcp*tp = {expected_world_size} processes but "
                          f"{world_size} were launched; run torchrun --nproc-per-node {expected_world_size}")
    device = select_device(runtime)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env_rank(),
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=runtime.collective_timeout_s))
    return device


def run_main(main: Callable[[], int | None]) -> None:
    """Run a launcher's main and exit: 0 on success, 2 on a config/input error (one line, no
    traceback), 1 on any other failure (traceback). Exiting at once lets torchrun tear the other
    ranks down instead of leaving them blocked in a collective."""
    setup_logging(env_rank())
    code = 0
    try:
        code = main() or 0
    except ValueError as err:
        LOG.error("error: %s", err)
        code = 2
    except Exception:  # noqa: BLE001 - any failure must end this rank non-zero, with its traceback
        LOG.error("failed:\n%s", traceback.format_exc())
        code = 1
    finally:
        if dist.is_initialized() and code == 0:
            dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(code) if code else sys.exit(0)
