"""Every model family cptoolkit reads, keyed by Hugging Face ``model_type``; what reads and writes a
``config.json`` or maps a checkpoint's tensors consults this table instead of testing family names. Adding a
family: one module in this package exporting a ``Family``, and its entry in ``FAMILIES``.

Invariants: each ``model_type`` belongs to one family; each valid ``GPTShape`` is owned by exactly one
family (its ``owns``); ``read_hf_config(write_hf_config(shape)) == shape``. A family may own no shape and only read
(Phi-3: a Llama block stored with fused projections); a checkpoint's tensors are read by the family of its
``model_type`` (``checkpoint_family``).
"""
from __future__ import annotations

from pathlib import Path

from cptoolkit.errors import ConfigError
from cptoolkit.models.families import Family
from cptoolkit.models.families.deepseek import DEEPSEEK
from cptoolkit.models.families.gemma import GEMMA
from cptoolkit.models.families.gpt2 import GPT2
from cptoolkit.models.families.gpt_oss import GPT_OSS
from cptoolkit.models.families.llama import LLAMA
from cptoolkit.models.families.mixtral import MIXTRAL
from cptoolkit.models.families.phi3 import PHI3
from cptoolkit.models.families.qwen import QWEN
from cptoolkit.models.families.qwen_moe import QWEN_MOE
from cptoolkit.models.shape import CONFIG_FILE, GPTShape

# The order lists the supported model_types in refusal messages.
FAMILIES: tuple[Family, ...] = (LLAMA, MIXTRAL, QWEN, QWEN_MOE, GPT2, DEEPSEEK, GEMMA, GPT_OSS, PHI3)
BY_MODEL_TYPE: dict[str, Family] = {model_type: family for family in FAMILIES for model_type in family.architectures}
# The rule a model_type or architecture outside the table breaks (their refusals quote it).
SUPPORTED = (f"one of {', '.join(repr(t) for t in BY_MODEL_TYPE)} (architectures "
              f"{', '.join(dict.fromkeys(a for f in FAMILIES for archs in f.architectures.values() for a in archs))})")


def read_hf_config(config: dict) -> GPTShape:
    """The ``GPTShape`` of a Hugging Face ``config.json`` dict, read by its ``model_type``'s family. Errors name
    the key and the rule but not the file: the caller knows which file it read."""
    if "model_type" not in config:
        raise ValueError(f"missing required key 'model_type'; rule: {SUPPORTED}")
    model_type = config["model_type"]
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(f"model_type={model_type!r} is not supported; rule: {SUPPORTED}")
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise ValueError(f"quantization_config={{'quant_method': {method!r}, ...}} is not supported; rule: cptoolkit "
                         "loads float weights only (float32, bfloat16): a quantized checkpoint's weights would load "
                         "without their scales; dequantize it first (DeepSeek-V3/R1 and Kimi K2's FP8 weights: "
                         "DeepSeek's fp8_cast_bf16.py)")
    family = BY_MODEL_TYPE[model_type]
    accepted = family.architectures[model_type]
    unsupported = [a for a in config.get("architectures") or [] if a not in accepted]
    if unsupported:
        raise ValueError(f"architectures={unsupported!r} is not supported for model_type {model_type!r}; "
                         f"rule: {' or '.join(accepted)}")
    return family.read_hf_config(config, model_type)


def checkpoint_family(config: dict) -> Family:
    """The family that reads a Hugging Face ``config.json`` dict (``read_hf_config`` has accepted it): it knows how
    that checkpoint stores its tensors, which a shape alone may not tell (Phi-3's fused projections)."""
    return BY_MODEL_TYPE[config["model_type"]]


def shape_family(shape: GPTShape) -> Family:
    """The one family that owns ``shape``: it writes its config.json and reads its checkpoints."""
    (family,) = [f for f in FAMILIES if f.owns(shape)]
    return family


def write_hf_config(shape: GPTShape) -> dict:
    """A Hugging Face ``config.json`` dict that ``read_hf_config`` reads back as ``shape``."""
    return shape_family(shape).write_hf_config(shape)


def hf_shape(config: dict, checkpoint_dir: str | Path) -> GPTShape:
    """``read_hf_config(config)``; its errors name the checkpoint's ``config.json``."""
    try:
        return read_hf_config(config)
    except ValueError as err:
        raise ConfigError(f"{Path(checkpoint_dir) / CONFIG_FILE}: {err}") from None
