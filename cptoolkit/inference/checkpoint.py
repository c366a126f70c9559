"""Checkpoints in and out of the megatron-core model: Hugging Face Llama / GPT-2, and cptoolkit's own.

Every format is turned into the model's *full state dict* (``cptoolkit.models.gpt``: unsharded
tensors under a TP=1 model's parameter names); ``load_full_state_dict`` then cuts each rank's TP
slice, so any checkpoint loads at any TP size.

- Hugging Face (``config.json`` + ``model.safetensors`` or a sharded ``model.safetensors.index.json``;
  no hub access): ``LlamaForCausalLM`` (q/k/v/o, gate/up/down, RMSNorm, GQA) and ``GPT2LMHeadModel``
  (Conv1D weights stored ``[in, out]``, transposed here).
- cptoolkit: ``save_checkpoint`` writes the full state dict in one ``model.safetensors`` plus a
  ``config.json`` that is a Hugging Face config of the same shape with ``"cptoolkit_format": 1``, so
  the shape is read the same way for both formats.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed import ProcessGroup

from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.models.gpt import (CPGPTModel, GPTShape, fuse_qkv, gather_full_state_dict,
                                  load_full_state_dict, new_gpt_model)

CPTOOLKIT_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

StateDict = dict[str, torch.Tensor]


def read_config(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"checkpoint directory {str(checkpoint_dir)!r} has no config.json")
    return json.loads(path.read_text())


def read_weights(checkpoint_dir: str | Path) -> StateDict:
    """All tensors of ``model.safetensors``, or of every shard named by its index file."""
    directory = Path(checkpoint_dir)
    if (directory / WEIGHTS_FILE).is_file():
        return load_file(directory / WEIGHTS_FILE)
    if (directory / WEIGHTS_INDEX_FILE).is_file():
        shard_files = sorted(set(json.loads((directory / WEIGHTS_INDEX_FILE).read_text())["weight_map"].values()))
        return {name: tensor for shard in shard_files for name, tensor in load_file(directory / shard).items()}
    raise ValueError(f"checkpoint directory {str(directory)!r} has neither {WEIGHTS_FILE} nor "
                     f"{WEIGHTS_INDEX_FILE}")


def _taker(weights: StateDict, checkpoint_dir: str | Path) -> Callable[[str], torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise ValueError(f"checkpoint {str(checkpoint_dir)!r} lacks tensor {name!r}")
        return weights[name]
    return take


def llama_to_full(weights: StateDict, shape: GPTShape, checkpoint_dir: str | Path = "") -> StateDict:
    """``LlamaForCausalLM`` tensors -> the full state dict (fused QKV per KV group, fc1 = [gate; up])."""
    take = _taker(weights, checkpoint_dir)
    heads, kv_heads, head_dim = shape.num_attention_heads, shape.num_kv_heads, shape.head_dim
    full = {"embedding.word_embeddings.weight": take("model.embed_tokens.weight"),
            "decoder.final_layernorm.weight": take("model.norm.weight")}
    if not shape.tie_embeddings:
        full["output_layer.weight"] = take("lm_head.weight")
    for layer in range(shape.num_layers):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        q = take(hf + "self_attn.q_proj.weight").reshape(heads, head_dim, -1)
        k = take(hf + "self_attn.k_proj.weight").reshape(kv_heads, head_dim, -1)
        v = take(hf + "self_attn.v_proj.weight").reshape(kv_heads, head_dim, -1)
        full.update({
            mc + "input_layernorm.weight": take(hf + "input_layernorm.weight"),
            mc + "self_attention.linear_qkv.weight": fuse_qkv(q, k, v, kv_heads),
            mc + "self_attention.linear_proj.weight": take(hf + "self_attn.o_proj.weight"),
            mc + "pre_mlp_layernorm.weight": take(hf + "post_attention_layernorm.weight"),
            mc + "mlp.linear_fc1.weight": torch.cat([take(hf + "mlp.gate_proj.weight"),
                                                     take(hf + "mlp.up_proj.weight")]),
            mc + "mlp.linear_fc2.weight": take(hf + "mlp.down_proj.weight"),
        })
    return full


def gpt2_to_full(weights: StateDict, shape: GPTShape, checkpoint_dir: str | Path = "") -> StateDict:
    """``GPT2LMHeadModel`` tensors (with or without the ``transformer.`` prefix) -> the full state
    dict. Conv1D weights are ``[in, out]``; ``c_attn`` holds ``[q | k | v]`` over all heads."""
    prefix = "transformer." if "transformer.wte.weight" in weights else ""
    take = _taker(weights, checkpoint_dir)
    heads, head_dim = shape.num_attention_heads, shape.head_dim

    def qkv(tensor: torch.Tensor) -> torch.Tensor:  # [3·hidden, ...] -> megatron's per-head groups
        q, k, v = tensor.reshape(3, heads, head_dim, *tensor.shape[1:])
        return fuse_qkv(q, k, v, heads)

    full = {"embedding.word_embeddings.weight": take(prefix + "wte.weight"),
            "embedding.position_embeddings.weight": take(prefix + "wpe.weight"),
            "decoder.final_layernorm.weight": take(prefix + "ln_f.weight"),
            "decoder.final_layernorm.bias": take(prefix + "ln_f.bias")}
    if not shape.tie_embeddings:
        full["output_layer.weight"] = take("lm_head.weight")
    for layer in range(shape.num_layers):
        hf, mc = f"{prefix}h.{layer}.", f"decoder.layers.{layer}."
        full.update({
            mc + "input_layernorm.weight": take(hf + "ln_1.weight"),
            mc + "input_layernorm.bias": take(hf + "ln_1.bias"),
            mc + "self_attention.linear_qkv.weight": qkv(take(hf + "attn.c_attn.weight").t()),
            mc + "self_attention.linear_qkv.bias": qkv(take(hf + "attn.c_attn.bias")),
            mc + "self_attention.linear_proj.weight": take(hf + "attn.c_proj.weight").t(),
            mc + "self_attention.linear_proj.bias": take(hf + "attn.c_proj.bias"),
            mc + "pre_mlp_layernorm.weight": take(hf + "ln_2.weight"),
            mc + "pre_mlp_layernorm.bias": take(hf + "ln_2.bias"),
            mc + "mlp.linear_fc1.weight": take(hf + "mlp.c_fc.weight").t(),
            mc + "mlp.linear_fc1.bias": take(hf + "mlp.c_fc.bias"),
            mc + "mlp.linear_fc2.weight": take(hf + "mlp.c_proj.weight").t(),
            mc + "mlp.linear_fc2.bias": take(hf + "mlp.c_proj.bias"),
        })
    return full


HF_CONVERTERS = {"llama": llama_to_full, "gpt2": gpt2_to_full}


def load_model_checkpoint(checkpoint_dir: str | Path, tp_group: ProcessGroup,
                          runtime: AttentionRuntime, dtype: torch.dtype = torch.float32
                          ) -> CPGPTModel:
    """Build the model of a Hugging Face or cptoolkit checkpoint directory, sharded over
    ``tp_group`` (every rank reads the file and keeps its own TP slice)."""
    config = read_config(checkpoint_dir)
    shape = GPTShape.from_hf_config(config)
    weights = read_weights(checkpoint_dir)
    if config.get("cptoolkit_format") == CPTOOLKIT_FORMAT:
        full = weights
    else:
        full = HF_CONVERTERS[shape.arch](weights, shape, checkpoint_dir)
    model = new_gpt_model(shape, tp_group, runtime, dtype)
    load_full_state_dict(model, full)
    return model


def save_checkpoint(model: CPGPTModel, checkpoint_dir: str | Path, tokenizer) -> None:
    """Write ``model`` and ``tokenizer`` as a cptoolkit checkpoint that loads at any TP size.

    Collective: every rank calls it. Each TP group assembles the full weights (one all-gather per
    parameter over the model's TP group); global rank 0 writes ``model.safetensors``,
    ``config.json`` and the tokenizer (``tokenizer.save``); a barrier on the default group makes
    the files visible to every rank on return.
    """
    full = gather_full_state_dict(model)
    if dist.get_rank() == 0:
        directory = Path(checkpoint_dir)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.contiguous() for name, tensor in full.items()}, directory / WEIGHTS_FILE)
        config = {**model.shape.to_hf_config(), "cptoolkit_format": CPTOOLKIT_FORMAT}
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(directory)
    dist.barrier()
