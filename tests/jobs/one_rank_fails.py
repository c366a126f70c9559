"""A job whose rank 1 raises while the others wait in a collective: it must end non-zero, fast."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from cptoolkit.config import RuntimeConfig  # noqa: E402
from cptoolkit.distributed import env_rank, init_distributed, run_main  # noqa: E402


def main():
    init_distributed(RuntimeConfig(device="cpu", collective_timeout_s=600), 3, "<job>")
    if env_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()  # ranks 0 and 2 would wait here for 600 s without the fail-fast exit


if __name__ == "__main__":
    run_main(main)
