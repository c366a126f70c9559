"""Train a GPT with TP x PCP (x DP) prefill context parallelism (the job is ``cptoolkit.entrypoints.train``).

    torchrun --nproc-per-node N launch/train.py --config configs/train_tp2_pcp2.yaml [--output losses.json]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cptoolkit.entrypoints.train import launch  # noqa: E402

if __name__ == "__main__":
    launch()
