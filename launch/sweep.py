"""Run several configs with torchrun and compare them in one table (the runner is ``cptoolkit.sweep``).

    .venv/bin/python launch/sweep.py --sweep configs/sweep_layouts.yaml [--out DIR] [--timeout-s 600]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cptoolkit.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
