"""What the GPU tests need, as skip marks that say why (every one skips on a CPU-only machine such as CI)."""
import importlib.util

import pytest
import torch
import torch.distributed as dist

CUDA = torch.cuda.is_available()
NUM_GPUS = torch.cuda.device_count() if CUDA else 0

requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False here "
                                                    "(run `make test-gpu` on a GPU machine)")
requires_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                                 reason="needs TransformerEngine: transformer_engine is not installed here")
GPU = [pytest.mark.gpu, requires_cuda]
# One parameter per block-kernel backend; ``te`` skips where TransformerEngine is missing.
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("te", id="te", marks=requires_te)]


def requires_gpus(count: int) -> pytest.MarkDecorator:
    """``count`` GPUs with NCCL (one rank per GPU)."""
    return pytest.mark.skipif(NUM_GPUS < count or not dist.is_nccl_available(),
                              reason=f"needs {count} CUDA GPU(s) with NCCL; this machine has {NUM_GPUS} GPU(s), "
                                     f"NCCL {'available' if dist.is_nccl_available() else 'unavailable'}")


def nccl_world_group(rank: int, world_size: int) -> dist.ProcessGroup:
    """Inside a ``tests.multiproc.run_ranks`` rank (gloo world): bind rank ``r`` to GPU ``r`` and return an
    NCCL group of the whole world (destroyed with the world by the harness)."""
    torch.cuda.set_device(rank)
    return dist.new_group(list(range(world_size)), backend="nccl")
