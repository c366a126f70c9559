"""Checkpoints in and out of the megatron-core model: Hugging Face Llama / GPT-2, and cptoolkit's own.

Every format is turned into the model's *full state dict* (``cptoolkit.models.tp_sharding``: unsharded
tensors under a TP=1 model's parameter names); ``load_full_state_dict`` then cuts each rank's TP
slice, so any checkpoint loads at any TP size. ``config.json`` is read by ``cptoolkit.models.shape``.

- Hugging Face (``config.json`` + ``model.safetensors`` or a sharded ``model.safetensors.index.json``;
  no hub access): the Llama family (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
  ``Qwen3ForCausalLM``: q/k/v/o, gate/up/down, RMSNorm, GQA, Qwen2's q/k/v biases, Qwen3's q/k norms)
  and ``GPT2LMHeadModel`` (Conv1D weights stored ``[in, out]``, transposed here).
- cptoolkit: ``save_checkpoint`` writes the full state dict in one ``model.safetensors`` plus a
  ``config.json`` that is a Hugging Face config of the same shape with ``"cptoolkit_format": 1``, so
  the shape is read the same way for both formats.

A checkpoint is user input: every problem with its files (missing, corrupt, malformed JSON, a
missing key or tensor, a tensor of the wrong shape) is a ``ConfigError`` whose one line names the
file, what is wrong and how to fix it. Tensor names and shapes are checked against the shape in
``config.json`` before any tensor is converted.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cptoolkit.config import ConfigError
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.models.build import new_gpt_model
from cptoolkit.models.gpt import CPGPTModel
from cptoolkit.models.shape import CONFIG_FILE, RESAVE, GPTShape, hf_shape, read_config, read_json_object
from cptoolkit.models.tp_sharding import fuse_qkv, gather_full_state_dict, load_full_state_dict

CPTOOLKIT_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

StateDict = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]


# ----------------------------------------------------------------------------- reading files

def _weights_file(directory: Path) -> Path:
    """``model.safetensors``, or the index of a sharded checkpoint: the file errors name."""
    for name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE):
        if (directory / name).is_file():
            return directory / name
    raise ConfigError(f"{directory}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}; save the weights with "
                      "save_pretrained (safetensors: .bin and .pt weights are not read)")


def _load_safetensors(path: Path) -> StateDict:
    try:
        return load_file(path)
    except SafetensorError as err:
        raise ConfigError(f"{path}: not a readable safetensors file ({err}): it is truncated or corrupt; "
                          "copy it again or re-save the checkpoint") from None


def _shard_files(index: Path) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names, each checked to exist."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ConfigError(f"{index}: no \"weight_map\" object of tensor name -> shard file; {RESAVE}")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise ConfigError(f"{index}: names shard {shard.name!r}, which is not in {index.parent}; "
                              "copy every shard the index lists next to it")
    return shards


def read_weights(checkpoint_dir: str | Path) -> StateDict:
    """All tensors of ``model.safetensors``, or of every shard named by its index file."""
    path = _weights_file(Path(checkpoint_dir))
    if path.name == WEIGHTS_FILE:
        return _load_safetensors(path)
    return {name: tensor for shard in _shard_files(path) for name, tensor in _load_safetensors(shard).items()}


def _checked(weights: StateDict, expected: Shapes, source: Path, shape: GPTShape) -> StateDict:
    """The tensors named in ``expected``, each checked to exist with its expected shape."""
    model = (f"{CONFIG_FILE}'s model ({shape.arch}, {shape.num_layers} layers, hidden {shape.hidden_size}, "
             f"vocab {shape.vocab_size})")
    fix = f"the weights and {CONFIG_FILE} must come from the same model"
    for name, want in expected.items():
        if name not in weights:
            raise ConfigError(f"{source}: no tensor {name!r}, which {model} needs; {fix}")
        if tuple(weights[name].shape) != want:
            raise ConfigError(f"{source}: tensor {name!r} has shape {tuple(weights[name].shape)}, but {model} "
                              f"needs {want}; {fix}")
    return {name: weights[name] for name in expected}


# ----------------------------------------------------------------------------- Hugging Face formats

def llama_tensor_shapes(shape: GPTShape) -> Shapes:
    """Every tensor a Llama-family checkpoint of ``shape`` holds, with its shape."""
    hidden, ffn, vocab = shape.hidden_size, shape.ffn_hidden_size, shape.vocab_size
    q_rows, kv_rows = shape.num_attention_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not shape.tie_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for layer in range(shape.num_layers):
        hf = f"model.layers.{layer}."
        shapes.update({
            hf + "input_layernorm.weight": (hidden,),
            hf + "self_attn.q_proj.weight": (q_rows, hidden),
            hf + "self_attn.k_proj.weight": (kv_rows, hidden),
            hf + "self_attn.v_proj.weight": (kv_rows, hidden),
            hf + "self_attn.o_proj.weight": (hidden, q_rows),
            hf + "post_attention_layernorm.weight": (hidden,),
            hf + "mlp.gate_proj.weight": (ffn, hidden),
            hf + "mlp.up_proj.weight": (ffn, hidden),
            hf + "mlp.down_proj.weight": (hidden, ffn),
        })
        if shape.qkv_bias:
            shapes.update({hf + "self_attn.q_proj.bias": (q_rows,), hf + "self_attn.k_proj.bias": (kv_rows,),
                           hf + "self_attn.v_proj.bias": (kv_rows,)})
        if shape.qk_norm:
            shapes.update({hf + "self_attn.q_norm.weight": (shape.head_dim,),
                           hf + "self_attn.k_norm.weight": (shape.head_dim,)})
    return shapes


def llama_to_full(weights: StateDict, shape: GPTShape) -> StateDict:
    """Llama-family tensors -> the full state dict (fused QKV per KV group, its biases fused alike,
    fc1 = [gate; up], q/k norms as megatron's ``q_layernorm``/``k_layernorm``)."""
    heads, kv_heads, head_dim = shape.num_attention_heads, shape.num_kv_heads, shape.head_dim

    def qkv(hf: str, suffix: str) -> torch.Tensor:  # q/k/v_proj rows, per head -> megatron's query groups
        q, k, v = (weights[f"{hf}self_attn.{name}_proj.{suffix}"] for name in "qkv")
        per_head = (head_dim, *q.shape[1:])
        return fuse_qkv(q.reshape(heads, *per_head), k.reshape(kv_heads, *per_head),
                        v.reshape(kv_heads, *per_head), kv_heads)

    full = {"embedding.word_embeddings.weight": weights["model.embed_tokens.weight"],
            "decoder.final_layernorm.weight": weights["model.norm.weight"]}
    if not shape.tie_embeddings:
        full["output_layer.weight"] = weights["lm_head.weight"]
    for layer in range(shape.num_layers):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        if shape.qkv_bias:
            full[mc + "self_attention.linear_qkv.bias"] = qkv(hf, "bias")
        if shape.qk_norm:
            full[mc + "self_attention.q_layernorm.weight"] = weights[hf + "self_attn.q_norm.weight"]
            full[mc + "self_attention.k_layernorm.weight"] = weights[hf + "self_attn.k_norm.weight"]
        full.update({
            mc + "input_layernorm.weight": weights[hf + "input_layernorm.weight"],
            mc + "self_attention.linear_qkv.weight": qkv(hf, "weight"),
            mc + "self_attention.linear_proj.weight": weights[hf + "self_attn.o_proj.weight"],
            mc + "pre_mlp_layernorm.weight": weights[hf + "post_attention_layernorm.weight"],
            mc + "mlp.linear_fc1.weight": torch.cat([weights[hf + "mlp.gate_proj.weight"],
                                                     weights[hf + "mlp.up_proj.weight"]]),
            mc + "mlp.linear_fc2.weight": weights[hf + "mlp.down_proj.weight"],
        })
    return full


def _gpt2_prefix(names) -> str:
    """``GPT2LMHeadModel`` saves ``transformer.h.0...``; a bare ``GPT2Model`` saves ``h.0...``."""
    return "transformer." if any(name.startswith("transformer.") for name in names) else ""


def gpt2_tensor_shapes(shape: GPTShape, prefix: str) -> Shapes:
    """Every tensor a GPT-2 checkpoint of ``shape`` holds, with its shape (Conv1D: ``[in, out]``)."""
    hidden, ffn, vocab = shape.hidden_size, shape.ffn_hidden_size, shape.vocab_size
    shapes = {prefix + "wte.weight": (vocab, hidden), prefix + "wpe.weight": (shape.max_seq_len, hidden),
              prefix + "ln_f.weight": (hidden,), prefix + "ln_f.bias": (hidden,)}
    if not shape.tie_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for layer in range(shape.num_layers):
        hf = f"{prefix}h.{layer}."
        shapes.update({
            hf + "ln_1.weight": (hidden,), hf + "ln_1.bias": (hidden,),
            hf + "attn.c_attn.weight": (hidden, 3 * hidden), hf + "attn.c_attn.bias": (3 * hidden,),
            hf + "attn.c_proj.weight": (hidden, hidden), hf + "attn.c_proj.bias": (hidden,),
            hf + "ln_2.weight": (hidden,), hf + "ln_2.bias": (hidden,),
            hf + "mlp.c_fc.weight": (hidden, ffn), hf + "mlp.c_fc.bias": (ffn,),
            hf + "mlp.c_proj.weight": (ffn, hidden), hf + "mlp.c_proj.bias": (hidden,),
        })
    return shapes


def gpt2_to_full(weights: StateDict, shape: GPTShape) -> StateDict:
    """GPT-2 tensors (with or without the ``transformer.`` prefix) -> the full state dict.
    Conv1D weights are ``[in, out]``; ``c_attn`` holds ``[q | k | v]`` over all heads."""
    prefix = _gpt2_prefix(weights)
    heads, head_dim = shape.num_attention_heads, shape.head_dim

    def qkv(tensor: torch.Tensor) -> torch.Tensor:  # [3·hidden, ...] -> megatron's per-head groups
        q, k, v = tensor.reshape(3, heads, head_dim, *tensor.shape[1:])
        return fuse_qkv(q, k, v, heads)

    full = {"embedding.word_embeddings.weight": weights[prefix + "wte.weight"],
            "embedding.position_embeddings.weight": weights[prefix + "wpe.weight"],
            "decoder.final_layernorm.weight": weights[prefix + "ln_f.weight"],
            "decoder.final_layernorm.bias": weights[prefix + "ln_f.bias"]}
    if not shape.tie_embeddings:
        full["output_layer.weight"] = weights["lm_head.weight"]
    for layer in range(shape.num_layers):
        hf, mc = f"{prefix}h.{layer}.", f"decoder.layers.{layer}."
        full.update({
            mc + "input_layernorm.weight": weights[hf + "ln_1.weight"],
            mc + "input_layernorm.bias": weights[hf + "ln_1.bias"],
            mc + "self_attention.linear_qkv.weight": qkv(weights[hf + "attn.c_attn.weight"].t()),
            mc + "self_attention.linear_qkv.bias": qkv(weights[hf + "attn.c_attn.bias"]),
            mc + "self_attention.linear_proj.weight": weights[hf + "attn.c_proj.weight"].t(),
            mc + "self_attention.linear_proj.bias": weights[hf + "attn.c_proj.bias"],
            mc + "pre_mlp_layernorm.weight": weights[hf + "ln_2.weight"],
            mc + "pre_mlp_layernorm.bias": weights[hf + "ln_2.bias"],
            mc + "mlp.linear_fc1.weight": weights[hf + "mlp.c_fc.weight"].t(),
            mc + "mlp.linear_fc1.bias": weights[hf + "mlp.c_fc.bias"],
            mc + "mlp.linear_fc2.weight": weights[hf + "mlp.c_proj.weight"].t(),
            mc + "mlp.linear_fc2.bias": weights[hf + "mlp.c_proj.bias"],
        })
    return full


def hf_tensor_shapes(shape: GPTShape, names) -> Shapes:
    """The tensors a Hugging Face checkpoint of ``shape`` must hold (``names``: those it holds,
    which tell a GPT-2 checkpoint's prefix)."""
    if shape.arch == "llama":
        return llama_tensor_shapes(shape)
    return gpt2_tensor_shapes(shape, _gpt2_prefix(names))


HF_CONVERTERS = {"llama": llama_to_full, "gpt2": gpt2_to_full}


def full_tensor_shapes(shape: GPTShape) -> Shapes:
    """The full state dict's tensor shapes (a cptoolkit checkpoint's tensors), found by running the
    HF converter on shape-only ``meta`` tensors, so the converter stays the one place that knows
    how the two layouts relate."""
    hf = {name: torch.empty(size, device="meta") for name, size in hf_tensor_shapes(shape, []).items()}
    return {name: tuple(tensor.shape) for name, tensor in HF_CONVERTERS[shape.arch](hf, shape).items()}


# ----------------------------------------------------------------------------- loading and saving

def load_model_checkpoint(checkpoint_dir: str | Path, pg_collection: ProcessGroupCollection,
                          runtime: AttentionRuntime, dtype: torch.dtype = torch.float32
                          ) -> CPGPTModel:
    """Build the model of a Hugging Face or cptoolkit checkpoint directory on ``pg_collection``,
    sharded over its TP group (every rank reads the files and keeps its own TP slice). Raises
    ``ConfigError`` for a problem with the files, before building the model."""
    directory = Path(checkpoint_dir)
    config = read_config(directory)
    shape = hf_shape(config, directory)
    weights, source = read_weights(directory), _weights_file(directory)
    if config.get("cptoolkit_format") == CPTOOLKIT_FORMAT:
        full = _checked(weights, full_tensor_shapes(shape), source, shape)
    else:
        hf_weights = _checked(weights, hf_tensor_shapes(shape, weights), source, shape)
        full = HF_CONVERTERS[shape.arch](hf_weights, shape)
    model = new_gpt_model(shape, pg_collection, runtime, dtype)
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
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(directory)
    dist.barrier()
