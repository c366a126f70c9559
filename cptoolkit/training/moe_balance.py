"""Expert load balancing for training an MoE model: the auxiliary loss and DeepSeek-V3's bias update.

Both read the global expert load of one step: for MoE layer ``l`` and expert ``e``, ``C[l, e]`` the (token, slot)
assignments over the whole global batch and ``T`` the tokens routed. Each ``MoELayer`` keeps the routing its
last training forward saw on the rows it owns (``RoutingRecord``: the first rank of each ETP group records, the
others zeros), so one sum over every rank (an all-reduce over TP, then over DP x PCP) counts each token once.

- **Auxiliary loss** (Switch Transformer / megatron-core's ``switch_load_balancing_loss_func``, per layer and
  summed over the layers): ``coef · E / (T² · top_k) · Σ_e C[l, e] · S[l, e]``, where ``S[l, e]`` sums each
  token's scores normalised to 1 (softmax probabilities as they are; sigmoid scores over their sum). ``C`` and
  ``T`` are global constants of the step, ``S`` is a sum over ranks, so each rank's share of the loss is the
  same expression with its own ``S``: the shares sum to the loss, their gradients to its gradient.
- **Bias update** (DeepSeek-V3's auxiliary-loss-free balancing): after the step, every layer's
  ``score_correction_bias[e] += rate · sign(mean_e C[l, e] - C[l, e])`` (overloaded experts become less likely
  to be chosen). The same global ``C`` on every rank keeps the replicated bias identical.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.distributed import ProcessGroup

from cptoolkit.layers import comm
from cptoolkit.layers.comm import CommStats
from cptoolkit.moe.layer import MoELayer


def global_expert_load(layers: list[MoELayer], tp_group: ProcessGroup, dp_pcp_group: ProcessGroup,
                       stats: Optional[CommStats] = None) -> tuple[torch.Tensor, float]:
    """``(C [L, E] float64, T)`` of the last training forward, summed over every rank (an all-reduce over
    ``tp_group``, one over ``dp_pcp_group``). Every rank must call it after the same forward."""
    records = [layer.routing_record for layer in layers]
    if any(record is None for record in records):
        raise ValueError("global_expert_load: an MoE layer has no routing record; rule: call it after a training "
                         "forward (prefill with gradients enabled) of the model")
    load = torch.stack([torch.cat([record.counts, record.counts.new_tensor([record.rows])]) for record in records])
    comm.all_reduce(load, tp_group, stats=stats)
    comm.all_reduce(load, dp_pcp_group, stats=stats)
    # Every layer routes the same tokens, so T is any layer's count.
    return load[:, :-1], float(load[0, -1])


def load_balancing_loss(layers: list[MoELayer], counts: torch.Tensor, num_tokens: float, coef: float
                        ) -> torch.Tensor:
    """This rank's share of the auxiliary loss (module docstring), a differentiable scalar."""
    total = torch.zeros((), dtype=torch.float64)
    for layer, layer_counts in zip(layers, counts):
        dims = layer.dims
        share = (layer_counts.to(layer.routing_record.score_sums.dtype) * layer.routing_record.score_sums).sum()
        total = total + share.double() * dims.num_experts / (num_tokens ** 2 * dims.top_k)
    return coef * total


@torch.no_grad()
def update_expert_bias(layers: list[MoELayer], counts: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's bias update (module docstring) on every layer with a ``score_correction_bias``."""
    for layer, layer_counts in zip(layers, counts):
        bias = layer.router.score_correction_bias
        if bias is not None:
            bias += (rate * torch.sign(layer_counts.mean() - layer_counts)).to(bias.dtype)
