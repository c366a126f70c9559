"""Generate text with a TP x PCP x DCP layout (the job is ``cptoolkit.entrypoints.infer``).

    torchrun --nproc-per-node N launch/infer.py --config configs/tp2_pcp2_dcp4.yaml [--output result.json]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cptoolkit.entrypoints.infer import launch  # noqa: E402

if __name__ == "__main__":
    launch()
