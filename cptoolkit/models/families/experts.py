"""What the mixture-of-experts families (``mixtral``, ``qwen_moe``, ``deepseek``) share: a MoE layer's tensors in a
Hugging Face checkpoint (one router, per-expert gate/up/down projections, a shared expert) and how they make up the
full state dict's MoE parameters; and the check that a shape's routing (``MoEDims``) is one a family's
``config.json`` can state.

The full state dict of MoE layer ``N`` (megatron's TP=1 names, under ``decoder.layers.N.mlp.``), with ``E`` experts
of ``F`` (``MoEDims.ffn_hidden_size``) and a shared expert of ``S``:

- ``router.weight`` ``[E, hidden]``; ``router.score_correction_bias`` ``[E]`` (``score_correction_bias`` only);
- ``experts.fc1_weight`` ``[E*2*F, hidden]``: expert 0's gate rows, its up rows, then expert 1's, ...;
- ``experts.fc2_weight`` ``[E*F, hidden]``: each expert's down projection transposed (stored ``[hidden, F]``);
- ``shared_experts.linear_fc1.weight`` ``[2*S, hidden]`` (gate rows, then up rows, as the dense MLP's
  ``linear_fc1``), ``shared_experts.linear_fc2.weight`` ``[hidden, S]``;
- ``shared_expert_gate.weight`` ``[1, hidden]`` (``shared_expert_gate`` only).

The layer's norms and attention keep the dense layer's names; a dense layer of a MoE model keeps its dense MLP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from cptoolkit.models.moe_dims import MoEDims
from cptoolkit.models.shape import GPTShape
from cptoolkit.models.tensor_map import Layout, Shapes, whole


@dataclass(frozen=True)
class ExpertNames:
    """Where a family's checkpoint keeps a MoE layer's tensors, under ``model.layers.N.``: the router
    (``{router}.weight``), expert ``e``'s projections (``{experts}.{e}.{gate|up|down}.weight``), the shared expert
    (``{shared}.{gate|up|down}_proj.weight``) and its gate (``{shared_gate}.weight``)."""

    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    shared: str = "mlp.shared_experts"
    shared_gate: str = "mlp.shared_expert_gate"


# transformers' save_pretrained names: Mixtral's legacy block_sparse_moe w1 (gate) / w3 (up) / w2 (down); the Qwen
# and DeepSeek families' mlp.experts, with Qwen2-MoE's one shared_expert (Qwen3-MoE has none) and DeepSeek's
# shared_experts.
MIXTRAL_NAMES = ExpertNames(router="block_sparse_moe.gate", experts="block_sparse_moe.experts",
                            gate="w1", up="w3", down="w2")
QWEN_MOE_NAMES = ExpertNames(shared="mlp.shared_expert")
DEEPSEEK_NAMES = ExpertNames()

# The dense MLP a MoE layer replaces: its Hugging Face tensors and its full state dict entries.
_DENSE_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
_DENSE_FC = ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight")


def _moe_layers(shape: GPTShape) -> list[int]:
    """The 0-based indices of ``shape``'s MoE layers (as Hugging Face numbers them)."""
    return [] if shape.moe is None else [i for i, flag in enumerate(shape.moe.moe_layers) if flag]


def _layer_tensors(shape: GPTShape, hf: str, names: ExpertNames) -> Shapes:
    """One MoE layer's tensors and shapes (``hf``: its ``model.layers.N.`` prefix)."""
    moe, hidden = shape.moe, shape.hidden_size
    ffn, shared = moe.ffn_hidden_size, moe.shared_ffn_hidden_size
    tensors = {f"{hf}{names.router}.weight": (moe.num_experts, hidden)}
    if moe.score_correction_bias:
        tensors[f"{hf}{names.router}.e_score_correction_bias"] = (moe.num_experts,)
    for e in range(moe.num_experts):
        expert = f"{hf}{names.experts}.{e}."
        tensors.update({f"{expert}{names.gate}.weight": (ffn, hidden), f"{expert}{names.up}.weight": (ffn, hidden),
                        f"{expert}{names.down}.weight": (hidden, ffn)})
    if shared:
        tensors.update({f"{hf}{names.shared}.gate_proj.weight": (shared, hidden),
                        f"{hf}{names.shared}.up_proj.weight": (shared, hidden),
                        f"{hf}{names.shared}.down_proj.weight": (hidden, shared)})
    if moe.shared_expert_gate:
        tensors[f"{hf}{names.shared_gate}.weight"] = (1, hidden)
    return tensors


def expert_tensor_shapes(shape: GPTShape, dense: Shapes, names: ExpertNames) -> Shapes:
    """``dense`` (the tensors of ``shape``'s checkpoint with every layer dense) with each MoE layer's dense MLP
    tensors replaced by its router's, its experts' and its shared expert's."""
    shapes = dict(dense)
    for layer in _moe_layers(shape):
        hf = f"model.layers.{layer}."
        for name in _DENSE_MLP:
            del shapes[hf + name]
        shapes.update(_layer_tensors(shape, hf, names))
    return shapes


def expert_layout(shape: GPTShape, dense: Layout, names: ExpertNames) -> Layout:
    """``dense`` (the full state dict of ``shape`` with every layer dense, as checkpoint rows) with each MoE
    layer's ``linear_fc1``/``linear_fc2`` replaced by its router, stacked experts and shared expert (module
    docstring)."""
    layout = dict(dense)
    for layer in _moe_layers(shape):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}.mlp."
        for name in _DENSE_FC:
            del layout[f"decoder.layers.{layer}.{name}"]
        shapes = _layer_tensors(shape, hf, names)
        experts = [f"{hf}{names.experts}.{e}." for e in range(shape.moe.num_experts)]
        layout[mc + "router.weight"] = whole(shapes, f"{hf}{names.router}.weight")
        if shape.moe.score_correction_bias:
            layout[mc + "router.score_correction_bias"] = whole(shapes, f"{hf}{names.router}.e_score_correction_bias")
        layout[mc + "experts.fc1_weight"] = tuple(
            piece for expert in experts for projection in (names.gate, names.up)
            for piece in whole(shapes, f"{expert}{projection}.weight"))
        layout[mc + "experts.fc2_weight"] = tuple(
            piece for expert in experts for piece in whole(shapes, f"{expert}{names.down}.weight", transposed=True))
        if shape.moe.shared_ffn_hidden_size:
            shared = f"{hf}{names.shared}."
            layout[mc + "shared_experts.linear_fc1.weight"] = (whole(shapes, shared + "gate_proj.weight")
                                                               + whole(shapes, shared + "up_proj.weight"))
            layout[mc + "shared_experts.linear_fc2.weight"] = whole(shapes, shared + "down_proj.weight")
        if shape.moe.shared_expert_gate:
            layout[mc + "shared_expert_gate.weight"] = whole(shapes, f"{hf}{names.shared_gate}.weight")
    return layout


def require_routing(moe: MoEDims, config_name: str, **supported) -> None:
    """Refuse to write ``moe`` as a ``config_name`` config.json unless each field named in ``supported`` has its
    value there: what that family's transformers model computes whatever its keys say. Bias-free SwiGLU experts
    unless ``supported`` says otherwise (only gpt-oss's have biases and its own activation)."""
    for field, value in {"expert_bias": False, "activation": "swiglu", **supported}.items():
        if getattr(moe, field) != value:
            raise ValueError(f"MoEDims.{field}={getattr(moe, field)!r} has no {config_name} config.json; rule: "
                             f"{config_name} routes with {field}={value!r}")


def moe_dims(keys: Mapping[str, str], **fields) -> MoEDims:
    """``MoEDims(**fields)`` read from a config.json whose key ``keys[field]`` holds each field: a refusal (top-k
    beyond the experts, groups that do not divide them, ...) names those keys and values before MoEDims' rule."""
    try:
        return MoEDims(**fields)
    except ValueError as err:
        named = ", ".join(f"{key}={fields[field]!r}" for field, key in keys.items())
        raise ValueError(f"{named}: {err}") from None


def non_negative_key(config: dict, key: str, default: int) -> int:
    """``config[key]`` (``default`` when absent), which must be a non-negative integer: a count that may be 0, or
    a layer index. Unlike ``positive_key``, an explicit null is refused, not read as the default."""
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key}={value!r}; rule: must be a non-negative integer")
    return value


def aliased_key(config: dict, key: str, alias: str) -> str:
    """The name under which ``config`` sets ``key``: ``key`` itself, or ``alias`` when only that is set (transformers'
    ``attribute_map`` reads either, e.g. Qwen3-MoE's ``num_experts`` for ``num_local_experts``). Both set to different
    values is refused: which one transformers keeps differs from family to family."""
    if key in config and alias in config and config[key] != config[alias]:
        raise ValueError(f"{key}={config[key]!r} and {alias}={config[alias]!r} disagree; rule: {alias} is another "
                         f"name for {key} (transformers' attribute_map): set one of them, or both alike")
    return alias if alias in config and key not in config else key
