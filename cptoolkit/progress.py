"""Progress bars for long work (checkpoint loading, prefills of several chunks, training): one policy for all.

A bar is drawn on global rank 0 only, and only when stderr is a terminal (tqdm's own ``disable=None``), so
logs, pipes and CI output never hold carriage-return frames and N ranks never draw N bars.
``CPTOOLKIT_PROGRESS=0`` turns every bar off. Elsewhere ``progress`` returns a disabled tqdm: iterating it
yields the iterable's items, and ``update``, ``set_postfix`` and ``close`` do nothing, so callers need no
branch of their own.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch.distributed as dist
from tqdm import tqdm

DISABLE_ENV = "CPTOOLKIT_PROGRESS"  # "0": no bar anywhere


def _global_rank() -> int:
    """The default group's rank; before it exists, torchrun's ``RANK`` (0 for a plain process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def progress(iterable_or_total: Iterable | int, desc: str, unit: str, **tqdm_kwargs) -> tqdm:
    """A tqdm over an iterable, or (an ``int``) a bar of that total advanced with ``update``; drawn only on
    global rank 0 with stderr a terminal and ``CPTOOLKIT_PROGRESS`` not ``0``, disabled everywhere else.
    ``tqdm_kwargs`` go to tqdm as they are (e.g. ``initial``)."""
    shown = _global_rank() == 0 and os.environ.get(DISABLE_ENV) != "0"
    iterable, total = (None, iterable_or_total) if isinstance(iterable_or_total, int) else (iterable_or_total, None)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None if shown else True, **tqdm_kwargs)
