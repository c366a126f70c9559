"""Data parallelism of the batch API (``Engine.generate`` / ``stream``): each replica serves its share of a batch,
and every rank gets every result.

With ``dp > 1`` replica ``i % dp`` serves request ``i``; the results come back in prompt order through one
``all_gather_object`` on the DP group. With ``dp == 1`` nothing is communicated.
"""
from __future__ import annotations

from typing import Sequence

import torch.distributed as dist

from cptoolkit.inference.request import GenerationResult
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.parallel_state import ParallelGroups


def replica_share(prompts: Sequence[str | list[int]], sampling: SamplingParams | Sequence[SamplingParams],
                  groups: ParallelGroups) -> list[tuple[int, str | list[int], SamplingParams]]:
    """``(index, prompt, params)`` of the prompts this rank's replica serves; ``sampling`` is one
    ``SamplingParams`` for every prompt or one per prompt."""
    params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
    if len(params) != len(prompts):
        raise ValueError(f"sampling: got {len(params)} SamplingParams for {len(prompts)} prompts")
    return [(index, prompt, request_params) for index, (prompt, request_params) in enumerate(zip(prompts, params))
            if index % groups.dp_size == groups.dp_rank]


def gather_results(mine: list[GenerationResult], groups: ParallelGroups) -> list[GenerationResult]:
    """Every request's result in prompt order: this replica's own (``mine``), plus (``dp > 1``) the other
    replicas' via one ``all_gather_object`` on the DP group."""
    if groups.dp_size == 1:
        return mine
    per_replica: list = [None] * groups.dp_size
    dist.all_gather_object(per_replica, mine, group=groups.dp_group)
    return sorted((result for results in per_replica for result in results), key=lambda r: r.request_index)
