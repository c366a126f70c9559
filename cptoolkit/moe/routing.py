"""Token -> experts routing, one function for every family (``MoEDims`` states the rule).

Pure tensor math on one rank: no collectives. Scores are computed in float32 whatever the model's dtype (as
transformers' Mixtral, Qwen-MoE and DeepSeek routers do), so every rank of a replica that sees the same token
chooses the same experts.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from cptoolkit.models.moe_dims import MoEDims


def router_scores(logits: torch.Tensor, dims: MoEDims) -> torch.Tensor:
    """``logits [n, E]`` (float32) -> scores ``[n, E]``: softmax over the experts, or a sigmoid per expert."""
    return logits.softmax(dim=-1) if dims.score == "softmax" else logits.sigmoid()


def _limit_to_groups(choice: torch.Tensor, dims: MoEDims) -> torch.Tensor:
    """``choice [n, E]`` with the experts outside each token's ``topk_groups`` best groups set to -inf; a group
    scores its best expert (``max``) or its best two summed (``top2_sum``)."""
    grouped = choice.view(choice.shape[0], dims.num_groups, dims.experts_per_group)
    if dims.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best_groups = group_scores.topk(dims.topk_groups, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    return choice.masked_fill(~keep.repeat_interleave(dims.experts_per_group, dim=1), float("-inf"))


class Routing(NamedTuple):
    """One routing decision for ``n`` tokens: ``weights [n, top_k]`` and ``experts [n, top_k]`` (int64) of the chosen
    experts, and every expert's ``scores [n, E]`` (softmax or sigmoid, before any bias) for load balancing."""

    weights: torch.Tensor
    experts: torch.Tensor
    scores: torch.Tensor


def route(logits: torch.Tensor, dims: MoEDims, correction_bias: Optional[torch.Tensor] = None) -> Routing:
    """The ``Routing`` of router ``logits [n, E]`` (float32 or wider; weights and scores in its dtype).

    ``correction_bias [E]`` (DeepSeek-V3's ``e_score_correction_bias``) is added to the scores to choose the
    experts only; the weights are the chosen experts' scores, renormalised with ``norm_topk_prob`` (a sigmoid's
    sum gets DeepSeek-V3's ``1e-20`` guard) and scaled by ``routed_scaling_factor``."""
    scores = router_scores(logits, dims)
    choice = scores if correction_bias is None else scores + correction_bias.to(scores.dtype)
    if dims.num_groups > 1:
        choice = _limit_to_groups(choice, dims)
    experts = choice.topk(dims.top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if dims.norm_topk_prob:
        denominator = weights.sum(dim=-1, keepdim=True)
        weights = weights / (denominator + 1e-20 if dims.score == "sigmoid" else denominator)
    return Routing(weights * dims.routed_scaling_factor, experts, scores)
