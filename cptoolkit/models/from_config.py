"""Config → model: the one way inference and training get their TP-sharded model."""
from __future__ import annotations

import dataclasses

import torch

from cptoolkit.config import Config
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.models.build import build_gpt_model
from cptoolkit.models.checkpoint import load_model_checkpoint
from cptoolkit.models.gpt import CPGPTModel
from cptoolkit.models.shape import GPTShape
from cptoolkit.parallel_state import ParallelGroups

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def model_shape(cfg: Config) -> GPTShape:
    """The built-in model's shape from ``cfg.model``: the ``GPTShape`` fields a config can set (the
    others, q/k/v biases, q/k norms and RoPE scaling, come only from a checkpoint's config.json)."""
    names = {f.name for f in dataclasses.fields(GPTShape)} & {f.name for f in dataclasses.fields(cfg.model)}
    return GPTShape(**{name: getattr(cfg.model, name) for name in names})


def model_from_config(cfg: Config, groups: ParallelGroups, runtime: AttentionRuntime) -> CPGPTModel:
    """The model of ``cfg.model`` on ``groups.megatron_pg_collection()``, sharded over the TP group:
    loaded from ``model.checkpoint``, else the built-in shape with seeded random weights
    (``model.seed``), in ``cfg.runtime.dtype``."""
    dtype = DTYPES[cfg.runtime.dtype]
    pg_collection = groups.megatron_pg_collection()
    if cfg.model.checkpoint is None:
        return build_gpt_model(model_shape(cfg), pg_collection, runtime, dtype=dtype, seed=cfg.model.seed)
    return load_model_checkpoint(cfg.model.checkpoint, pg_collection, runtime, dtype=dtype)
