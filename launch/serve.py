"""Serve the OpenAI completions API from a TP x PCP x DCP engine (the job is ``cptoolkit.entrypoints.serve``).

    torchrun --nproc-per-node 4 launch/serve.py --config configs/tp2_pcp2_dcp4.yaml --host 127.0.0.1 --port 8000
    python launch/serve.py --config configs/tp1_pcp1_dcp1.yaml --port 8000          # one rank
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cptoolkit.entrypoints.serve import launch  # noqa: E402

if __name__ == "__main__":
    launch()
