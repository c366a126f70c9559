"""A Mixture-of-Experts block's dimensions and routing rule: ``MoEDims``, the extra of ``GPTShape.moe``.

Pure Python like ``cptoolkit.models.shape``. The layer that computes it is ``cptoolkit.moe.layer``.

Routing of one token ``x`` (every family here is one setting of these fields):

1. ``logits = router.weight @ x`` (float32, ``[num_experts]``), plus ``router.bias`` with ``router_bias``;
2. ``scores``: ``softmax(logits)`` over all experts, or ``sigmoid(logits)`` per expert (``score``);
3. the experts chosen: the ``top_k`` best of ``scores`` (plus DeepSeek-V3's ``e_score_correction_bias`` with
   ``score_correction_bias``: it steers the choice only), limited, with ``num_groups > 1``, to the ``topk_groups``
   groups (``num_experts / num_groups`` consecutive experts each) with the best group score: the best expert's
   score (``group_score="max"``, DeepSeek-V2) or the sum of the best two (``"top2_sum"``, DeepSeek-V3);
4. the weights: the chosen experts' ``scores`` (without the correction bias), renormalised to sum 1 with
   ``norm_topk_prob``, times ``routed_scaling_factor``;
5. ``out = sum_i weight_i * expert_i(x)`` plus the shared expert (a SwiGLU MLP of ``shared_ffn_hidden_size``
   every token takes, 0: none), scaled by ``sigmoid(shared_expert_gate @ x)`` with ``shared_expert_gate``
   (Qwen2-MoE).

Each routed expert is an MLP of ``ffn_hidden_size`` (with ``expert_bias``: biases on both projections) whose
``activation`` is ``swiglu`` (``silu(gate) * up``, its first projection's rows the gate rows then the up rows) or
``gpt_oss`` (its rows interleaved ``gate_0, up_0, gate_1, ...``; ``gate`` clamped above at ``swiglu_limit``, ``up``
to ``[-limit, limit]``, ``(up + 1) * gate * sigmoid(swiglu_alpha * gate)``).
"""
from __future__ import annotations

from dataclasses import dataclass

ROUTER_SCORES = ("softmax", "sigmoid")
ACTIVATIONS = ("swiglu", "gpt_oss")
GROUP_SCORES = ("max", "top2_sum")


@dataclass(frozen=True)
class MoEDims:
    """The routed experts of the layers ``moe_layers`` flags (one bool per layer, in order); the other layers keep
    the dense MLP of ``GPTShape.ffn_hidden_size``. Routing: see the module docstring."""

    num_experts: int
    top_k: int
    ffn_hidden_size: int
    moe_layers: tuple[bool, ...]
    score: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    score_correction_bias: bool = False
    router_bias: bool = False
    shared_ffn_hidden_size: int = 0
    shared_expert_gate: bool = False
    expert_bias: bool = False
    activation: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    def __post_init__(self):
        for name in ("num_experts", "top_k", "ffn_hidden_size", "num_groups", "topk_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoEDims.{name}={value!r}; rule: a positive integer")
        if not isinstance(self.shared_ffn_hidden_size, int) or self.shared_ffn_hidden_size < 0:
            raise ValueError(f"MoEDims.shared_ffn_hidden_size={self.shared_ffn_hidden_size!r}; rule: a non-negative "
                             "integer (0: no shared expert)")
        if self.score not in ROUTER_SCORES:
            raise ValueError(f"MoEDims.score={self.score!r}; rule: one of {ROUTER_SCORES}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoEDims.activation={self.activation!r}; rule: one of {ACTIVATIONS}")
        for name in ("swiglu_alpha", "swiglu_limit"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"MoEDims.{name}={value!r}; rule: a positive number")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"MoEDims.group_score={self.group_score!r}; rule: one of {GROUP_SCORES}")
        if not (isinstance(self.routed_scaling_factor, (int, float)) and self.routed_scaling_factor > 0):
            raise ValueError(f"MoEDims.routed_scaling_factor={self.routed_scaling_factor!r}; rule: a positive number")
        if not isinstance(self.moe_layers, tuple) or not all(isinstance(f, bool) for f in self.moe_layers) \
                or not any(self.moe_layers):
            raise ValueError(f"MoEDims.moe_layers={self.moe_layers!r}; rule: a tuple of one bool per layer, at least "
                             "one True (a model without MoE layers has moe=None)")
        self._check_groups()
        if self.shared_expert_gate and not self.shared_ffn_hidden_size:
            raise ValueError("MoEDims.shared_expert_gate=True with shared_ffn_hidden_size=0; rule: the gate scales a "
                             "shared expert, so it needs one")

    def _check_groups(self) -> None:
        if self.num_experts % self.num_groups:
            raise ValueError(f"MoEDims.num_experts={self.num_experts} must be a multiple of num_groups="
                             f"{self.num_groups} (each group holds num_experts / num_groups consecutive experts)")
        if self.topk_groups > self.num_groups:
            raise ValueError(f"MoEDims.topk_groups={self.topk_groups} must be <= num_groups={self.num_groups}")
        reachable = self.topk_groups * self.experts_per_group
        if self.top_k > reachable:
            raise ValueError(f"MoEDims.top_k={self.top_k} must be <= topk_groups * num_experts / num_groups = "
                             f"{reachable} (the experts of the chosen groups)")
        if self.num_groups > 1 and self.group_score == "top2_sum" and self.experts_per_group < 2:
            raise ValueError(f"MoEDims.group_score='top2_sum' needs >= 2 experts per group; got "
                             f"{self.experts_per_group} (num_experts={self.num_experts}, num_groups={self.num_groups})")

    @property
    def gated_halves(self) -> bool:
        """Whether an expert's first projection is its gate rows then its up rows (else interleaved pairs)."""
        return self.activation == "swiglu"

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    def is_moe_layer(self, layer_number: int) -> bool:
        """Whether layer ``layer_number`` (1 .. num_layers, megatron's numbering) routes to experts."""
        return self.moe_layers[layer_number - 1]
