"""Sparse upcycling: a dense model's full state dict -> a mixture-of-experts one that computes the same function.

Every layer's MLP becomes ``num_experts`` routed experts, each an exact copy of it, behind a router whose scores are
a softmax over the experts with the ``top_k`` best renormalised to sum 1 (``norm_topk_prob``, Mixtral's rule). Since
every expert computes the dense MLP and the chosen weights sum to 1, the layer's output is the dense MLP's,
``sum_i w_i·mlp(x) = mlp(x)``, whatever the router says: the upcycled model's logits are the dense model's up to
float rounding (tests/test_upcycle.py). The router is a small seeded random matrix, so different tokens choose
different experts, each expert's gradient comes from its own tokens, and the copies diverge once the model is trained
(Komatsuzaki et al., "Sparse Upcycling", 2022).

Both state dicts are full (megatron's TP=1 names, ``cptoolkit.models.tp_sharding``); the MoE layer's tensors are
those ``cptoolkit.models.families.experts`` describes. Pure tensor work on one process: no model, no process group.
"""
from __future__ import annotations

import dataclasses

import torch

from cptoolkit.models.moe_dims import MoEDims
from cptoolkit.models.shape import GPTShape

# The router's init std, the model init's (``cptoolkit.models.build.INIT_STD``): logits of a few tenths, so routing
# depends on the token from the first step without any expert dominating.
ROUTER_STD = 0.02


def upcycled_shape(shape: GPTShape, num_experts: int, top_k: int) -> GPTShape:
    """``shape`` with every layer's MLP ``num_experts`` experts of its ``ffn_hidden_size``, ``top_k`` per token,
    softmax scores renormalised over the chosen ones. Refuses (``ValueError`` naming the value and the rule) what
    has no exact upcycling: a model that is already a mixture of experts, or whose MLP is not the SwiGLU MLP the
    experts compute."""
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}; rule: a positive integer")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}; rule: each token takes top_k distinct "
                         "experts, so top_k <= num_experts")
    if shape.moe is not None:
        raise ValueError(f"the model is already a mixture of experts (num_experts={shape.moe.num_experts}, "
                         f"top_k={shape.moe.top_k}); rule: upcycling turns a dense model's MLPs into experts: give "
                         "the dense checkpoint")
    if shape.arch != "llama" or shape.gemma is not None:
        mlp = "GPT-2's GELU MLP with biases" if shape.arch != "llama" else "Gemma's GeGLU MLP"
        raise ValueError(f"the model's MLP is {mlp}; rule: the experts are SwiGLU MLPs without biases, so only a "
                         "model of the Llama block's SwiGLU MLP upcycles to exactly its own output")
    moe = MoEDims(num_experts=num_experts, top_k=top_k, ffn_hidden_size=shape.ffn_hidden_size,
                  moe_layers=(True,) * shape.num_layers, score="softmax", norm_topk_prob=True)
    return dataclasses.replace(shape, moe=moe)


def _dense_mlp(full_state_dict: dict[str, torch.Tensor], shape: GPTShape, layer: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s (0-based) dense ``linear_fc1 [2F, h]`` (gate rows, then up rows) and ``linear_fc2
    [h, F]``, checked against ``shape``."""
    prefix, ffn, hidden = f"decoder.layers.{layer}.mlp.", shape.ffn_hidden_size, shape.hidden_size
    tensors = []
    for name, want in (("linear_fc1.weight", (2 * ffn, hidden)), ("linear_fc2.weight", (hidden, ffn))):
        if prefix + name not in full_state_dict:
            raise ValueError(f"the state dict has no {prefix + name!r}; rule: a dense model's full state dict "
                             f"(megatron's TP=1 names) of the given shape ({shape.num_layers} layers)")
        tensor = full_state_dict[prefix + name]
        if tuple(tensor.shape) != want:
            raise ValueError(f"{prefix + name} has shape {tuple(tensor.shape)}; rule: {want} for the given shape "
                             f"(hidden_size={hidden}, ffn_hidden_size={ffn})")
        tensors.append(tensor)
    return tensors[0], tensors[1]


def upcycle(full_state_dict: dict[str, torch.Tensor], shape: GPTShape, num_experts: int, top_k: int, seed: int
            ) -> tuple[dict[str, torch.Tensor], GPTShape]:
    """``(the MoE full state dict, its shape)`` of the dense ``full_state_dict`` of ``shape`` (``upcycled_shape``).

    Per layer ``N``, ``decoder.layers.N.mlp.linear_fc1/linear_fc2`` become ``mlp.experts.fc1_weight [E·2F, h]``
    (``linear_fc1`` once per expert), ``mlp.experts.fc2_weight [E·F, h]`` (``linear_fc2`` transposed, once per
    expert) and ``mlp.router.weight [E, h]``, drawn N(0, ``ROUTER_STD``²) layer by layer from one generator seeded
    with ``seed``. Every other tensor is passed through; the routers take the weights' dtype."""
    moe_shape = upcycled_shape(shape, num_experts, top_k)
    generator = torch.Generator().manual_seed(seed)
    upcycled = dict(full_state_dict)
    for layer in range(shape.num_layers):
        fc1, fc2 = _dense_mlp(full_state_dict, shape, layer)
        prefix = f"decoder.layers.{layer}.mlp."
        del upcycled[prefix + "linear_fc1.weight"], upcycled[prefix + "linear_fc2.weight"]
        router = torch.randn(num_experts, shape.hidden_size, generator=generator) * ROUTER_STD
        upcycled[prefix + "router.weight"] = router.to(fc1.dtype)
        upcycled[prefix + "experts.fc1_weight"] = fc1.repeat(num_experts, 1)
        upcycled[prefix + "experts.fc2_weight"] = fc2.t().repeat(num_experts, 1)
    return upcycled, moe_shape
