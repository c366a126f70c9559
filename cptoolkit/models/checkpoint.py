"""Checkpoints in and out of the megatron-core model: Hugging Face Llama / GPT-2, and cptoolkit's own.

Every format describes the model's *full state dict* (``cptoolkit.models.tp_sharding``: unsharded
tensors under a TP=1 model's parameter names) as row ranges of the tensors in its files (``Rows``): a
full tensor is its pieces' rows stacked. Each rank reads only the index ranges its TP slice needs
(``safe_open(...).get_slice``), one range at a time, straight into its parameters, so any checkpoint
loads at any TP size and no rank holds a whole tensor it does not keep. ``config.json`` is read by
its family (``cptoolkit.models.families.registry``).

- Hugging Face (``config.json`` + ``model.safetensors`` or a sharded ``model.safetensors.index.json``;
  no hub access): the Llama family (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
  ``Qwen3ForCausalLM``: q/k/v/o, gate/up/down, RMSNorm, GQA, Qwen2's q/k/v biases, Qwen3's q/k norms; Gemma 2/3's
  ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM``, the same tensors plus its pre/post feed-forward norms)
  and ``GPT2LMHeadModel`` (Conv1D weights stored ``[in, out]``: their columns are the model's rows).
- cptoolkit: ``save_checkpoint`` writes the full state dict in one ``model.safetensors`` plus a
  ``config.json`` that is a Hugging Face config of the same shape with ``"cptoolkit_format": 1``, so
  the shape is read the same way for both formats.

A checkpoint is user input: every problem with its files (missing, corrupt, malformed JSON, a
missing key or tensor, a tensor of the wrong shape) is a ``ConfigError`` whose one line names the
file, what is wrong and how to fix it. Tensor names and shapes are checked, from the files' headers,
against the shape in ``config.json`` before the model is built or any tensor is read.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cptoolkit.config import ConfigError
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.models.build import new_gpt_model
from cptoolkit.models.gpt import CPGPTModel
from cptoolkit.models.families.registry import hf_shape, write_hf_config
from cptoolkit.models.shape import CONFIG_FILE, RESAVE, GPTShape, read_config, read_json_object
from cptoolkit.models.tp_sharding import Reader, gather_full_state_dict, load_tp_slices

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


def _open(path: Path):
    """``path`` opened for reading tensors, or slices of them, by name; only its header is read here. Read
    with ``pread``, not mapped: a mapped file's pages count in the rank's RSS once touched, and a row-parallel
    slice (some columns of every row) touches every page of its tensor."""
    try:
        return safe_open(path, framework="pt", backend="pread")
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


@dataclass(frozen=True)
class TensorFiles:
    """Where a checkpoint's tensors are, from its files' headers alone (no tensor is read). ``source``: the file
    errors name (``model.safetensors``, or the index of a sharded checkpoint); ``files``: tensor name -> the
    file holding it; ``shapes``: tensor name -> its shape."""

    source: Path
    files: dict[str, Path]
    shapes: Shapes


def tensor_files(checkpoint_dir: str | Path) -> TensorFiles:
    """The tensors of ``model.safetensors``, or of every shard named by its index file."""
    source = _weights_file(Path(checkpoint_dir))
    files, shapes = {}, {}
    for path in [source] if source.name == WEIGHTS_FILE else _shard_files(source):
        with _open(path) as stored:
            for name in stored.keys():
                files[name], shapes[name] = path, tuple(stored.get_slice(name).get_shape())
    return TensorFiles(source, files, shapes)


def read_weights(checkpoint_dir: str | Path) -> StateDict:
    """Every tensor of the checkpoint, whole: for converting or inspecting one (loading a model reads slices)."""
    weights = {}
    for path in dict.fromkeys(tensor_files(checkpoint_dir).files.values()):
        with _open(path) as stored:
            weights.update({name: stored.get_tensor(name) for name in stored.keys()})
    return weights


def _check(shapes: Shapes, expected: Shapes, source: Path, shape: GPTShape) -> None:
    """Every tensor named in ``expected`` exists in ``shapes`` with its expected shape."""
    model = (f"{CONFIG_FILE}'s model ({shape.arch}, {shape.num_layers} layers, hidden {shape.hidden_size}, "
             f"vocab {shape.vocab_size})")
    fix = f"the weights and {CONFIG_FILE} must come from the same model"
    for name, want in expected.items():
        if name not in shapes:
            raise ConfigError(f"{source}: no tensor {name!r}, which {model} needs; {fix}")
        if shapes[name] != want:
            raise ConfigError(f"{source}: tensor {name!r} has shape {shapes[name]}, but {model} "
                              f"needs {want}; {fix}")


# ----------------------------------------------------------------------------- full tensors as stored rows

@dataclass(frozen=True)
class Rows:
    """Rows ``start:stop`` of the stored tensor ``name``: one piece of a full tensor, whose rows are its pieces'
    rows stacked and whose other dimensions are the stored tensor's. ``transposed``: the tensor is stored
    ``[in, out]`` (GPT-2's Conv1D), so the piece is its columns ``start:stop`` and its rows are the full
    tensor's columns."""

    name: str
    start: int
    stop: int
    transposed: bool = False


Layout = dict[str, tuple[Rows, ...]]  # full tensor name -> its pieces, in order


def _read_rows(stored, piece: Rows, start: int, stop: int, columns: slice = slice(None)) -> torch.Tensor:
    """Rows ``start:stop`` of ``piece``'s stored tensor (indices into it), only the full tensor's ``columns``
    of them. ``stored``: the tensor, or its ``safe_open(...).get_slice`` (which reads just what it is indexed
    with); both index alike."""
    if piece.transposed:
        return stored[columns, start:stop].t()
    return stored[start:stop] if columns == slice(None) else stored[start:stop, columns]


def _pieces_in(pieces: tuple[Rows, ...], start: int, stop: int):
    """The stored rows holding the full tensor's rows ``start:stop``: ``(piece, first, last)`` per piece crossed."""
    offset = 0
    for piece in pieces:
        length = piece.stop - piece.start
        first, last = max(start, offset), min(stop, offset + length)
        if first < last:
            yield piece, piece.start + first - offset, piece.start + last - offset
        offset += length


def _full_shapes(layout: Layout, shapes: Shapes) -> Shapes:
    """The full tensors' shapes: their pieces' rows, then the stored tensors' other dimensions."""
    def other_dims(piece: Rows) -> tuple[int, ...]:
        return shapes[piece.name][:1] if piece.transposed else shapes[piece.name][1:]

    return {name: (sum(p.stop - p.start for p in pieces), *other_dims(pieces[0])) for name, pieces in layout.items()}


def _whole(shapes: Shapes, name: str, transposed: bool = False) -> tuple[Rows]:
    """The stored tensor ``name`` (of shape ``shapes[name]``) as the one piece of a full tensor."""
    return (Rows(name, 0, shapes[name][1 if transposed else 0], transposed),)


def _fused_qkv(shape: GPTShape, q: tuple[str, int], k: tuple[str, int], v: tuple[str, int],
               transposed: bool = False) -> tuple[Rows, ...]:
    """megatron's fused QKV over separate q, k and v rows: per KV head, its query heads' rows, then its key
    rows, then its value rows. ``q``, ``k``, ``v``: ``(tensor name, first row)``, so GPT-2's one ``c_attn``
    (``[q | k | v]`` over all heads) is three of them."""
    head_dim = shape.head_dim
    q_rows = shape.num_attention_heads // shape.num_kv_heads * head_dim
    pieces = []
    for kv_head in range(shape.num_kv_heads):
        pieces += [Rows(q[0], q[1] + kv_head * q_rows, q[1] + (kv_head + 1) * q_rows, transposed),
                   Rows(k[0], k[1] + kv_head * head_dim, k[1] + (kv_head + 1) * head_dim, transposed),
                   Rows(v[0], v[1] + kv_head * head_dim, v[1] + (kv_head + 1) * head_dim, transposed)]
    return tuple(pieces)


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
        if shape.gemma is not None:
            shapes.update({hf + "pre_feedforward_layernorm.weight": (hidden,),
                           hf + "post_feedforward_layernorm.weight": (hidden,)})
    return shapes


def _llama_qkv(shape: GPTShape, layer_prefix: str, suffix: str) -> tuple[Rows, ...]:
    """The fused QKV ``weight`` or ``bias`` of one layer over its ``q_proj``, ``k_proj`` and ``v_proj``."""
    return _fused_qkv(shape, *((f"{layer_prefix}self_attn.{name}_proj.{suffix}", 0) for name in "qkv"))


def llama_layout(shape: GPTShape) -> Layout:
    """The full state dict as rows of a Llama-family checkpoint's tensors: fused QKV per KV group (its biases
    alike), fc1 = [gate; up], q/k norms as megatron's ``q_layernorm``/``k_layernorm``."""
    shapes = llama_tensor_shapes(shape)
    layout = {"embedding.word_embeddings.weight": _whole(shapes, "model.embed_tokens.weight"),
              "decoder.final_layernorm.weight": _whole(shapes, "model.norm.weight")}
    if not shape.tie_embeddings:
        layout["output_layer.weight"] = _whole(shapes, "lm_head.weight")
    for layer in range(shape.num_layers):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        if shape.qkv_bias:
            layout[mc + "self_attention.linear_qkv.bias"] = _llama_qkv(shape, hf, "bias")
        if shape.qk_norm:
            layout[mc + "self_attention.q_layernorm.weight"] = _whole(shapes, hf + "self_attn.q_norm.weight")
            layout[mc + "self_attention.k_layernorm.weight"] = _whole(shapes, hf + "self_attn.k_norm.weight")
        layout.update({
            mc + "input_layernorm.weight": _whole(shapes, hf + "input_layernorm.weight"),
            mc + "self_attention.linear_qkv.weight": _llama_qkv(shape, hf, "weight"),
            mc + "self_attention.linear_proj.weight": _whole(shapes, hf + "self_attn.o_proj.weight"),
            mc + "pre_mlp_layernorm.weight": _whole(shapes, hf + "post_attention_layernorm.weight"),
            mc + "mlp.linear_fc1.weight": (_whole(shapes, hf + "mlp.gate_proj.weight")
                                           + _whole(shapes, hf + "mlp.up_proj.weight")),
            mc + "mlp.linear_fc2.weight": _whole(shapes, hf + "mlp.down_proj.weight"),
        })
        if shape.gemma is not None:  # the sandwich norms: Gemma's post_attention_layernorm follows the attention
            post_attention = _whole(shapes, hf + "post_attention_layernorm.weight")
            layout.update({
                mc + "self_attention.linear_proj.post_norm.weight": post_attention,
                mc + "pre_mlp_layernorm.weight": _whole(shapes, hf + "pre_feedforward_layernorm.weight"),
                mc + "mlp.linear_fc2.post_norm.weight": _whole(shapes, hf + "post_feedforward_layernorm.weight"),
            })
    return layout


# DeepSeek's attention tensors (under model.layers.N.self_attn.) -> MLASelfAttention's (under
# decoder.layers.N.self_attention.); the rest of the block is the Llama one.
_MLA_NAMES = {"q_proj": "linear_q_proj", "q_a_proj": "linear_q_down_proj", "q_a_layernorm": "q_layernorm",
              "q_b_proj": "linear_q_up_proj", "kv_a_proj_with_mqa": "linear_kv_down_proj",
              "kv_a_layernorm": "kv_layernorm", "kv_b_proj": "linear_kv_up_proj", "o_proj": "linear_proj"}


def _mla_attention_shapes(shape: GPTShape) -> dict[str, tuple[int, ...]]:
    """One layer's DeepSeek attention tensors (names after ``self_attn.``, without ``.weight``) and shapes."""
    m, hidden, heads = shape.mla, shape.hidden_size, shape.num_attention_heads
    shapes = {"kv_a_proj_with_mqa": (m.latent_dim, hidden), "kv_a_layernorm": (m.kv_lora_rank,),
              "kv_b_proj": (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
              "o_proj": (hidden, heads * m.v_head_dim)}
    if m.q_lora_rank is None:
        return {"q_proj": (heads * m.qk_head_dim, hidden), **shapes}
    return {"q_a_proj": (m.q_lora_rank, hidden), "q_a_layernorm": (m.q_lora_rank,),
            "q_b_proj": (heads * m.qk_head_dim, m.q_lora_rank), **shapes}


def mla_tensor_shapes(shape: GPTShape) -> Shapes:
    """Every tensor a dense DeepSeek-V2/V3 checkpoint of ``shape`` holds, with its shape."""
    shapes = {name: size for name, size in llama_tensor_shapes(shape).items() if ".self_attn." not in name}
    for layer in range(shape.num_layers):
        shapes.update({f"model.layers.{layer}.self_attn.{name}.weight": size
                       for name, size in _mla_attention_shapes(shape).items()})
    return shapes


def mla_layout(shape: GPTShape) -> Layout:
    """The full state dict as a DeepSeek checkpoint's tensors: Llama's embedding, norms and MLP, every
    attention tensor whole under its ``MLASelfAttention`` name."""
    shapes = mla_tensor_shapes(shape)
    layout = {name: pieces for name, pieces in llama_layout(shape).items() if ".self_attention." not in name}
    for layer in range(shape.num_layers):
        for name in _mla_attention_shapes(shape):
            hf = f"model.layers.{layer}.self_attn.{name}.weight"
            layout[f"decoder.layers.{layer}.self_attention.{_MLA_NAMES[name]}.weight"] = _whole(shapes, hf)
    return layout


def llama_to_full(weights: StateDict, shape: GPTShape) -> StateDict:
    """A Llama-family checkpoint's tensors, in memory, as the full state dict (to re-save it in cptoolkit's format)."""
    return {name: torch.cat([_read_rows(weights[p.name], p, p.start, p.stop) for p in pieces])
            for name, pieces in llama_layout(shape).items()}


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


def gpt2_layout(shape: GPTShape, prefix: str) -> Layout:
    """The full state dict as rows of a GPT-2 checkpoint's tensors (``prefix``: ``transformer.`` or none).
    Conv1D weights are stored ``[in, out]`` (so read transposed); ``c_attn`` holds ``[q | k | v]`` over all heads."""
    shapes, hidden = gpt2_tensor_shapes(shape, prefix), shape.hidden_size
    layout = {"embedding.word_embeddings.weight": _whole(shapes, prefix + "wte.weight"),
              "embedding.position_embeddings.weight": _whole(shapes, prefix + "wpe.weight"),
              "decoder.final_layernorm.weight": _whole(shapes, prefix + "ln_f.weight"),
              "decoder.final_layernorm.bias": _whole(shapes, prefix + "ln_f.bias")}
    if not shape.tie_embeddings:
        layout["output_layer.weight"] = _whole(shapes, "lm_head.weight")
    for layer in range(shape.num_layers):
        hf, mc = f"{prefix}h.{layer}.", f"decoder.layers.{layer}."
        c_attn_weight, c_attn_bias = hf + "attn.c_attn.weight", hf + "attn.c_attn.bias"
        layout.update({
            mc + "input_layernorm.weight": _whole(shapes, hf + "ln_1.weight"),
            mc + "input_layernorm.bias": _whole(shapes, hf + "ln_1.bias"),
            mc + "self_attention.linear_qkv.weight": _fused_qkv(
                shape, (c_attn_weight, 0), (c_attn_weight, hidden), (c_attn_weight, 2 * hidden), transposed=True),
            mc + "self_attention.linear_qkv.bias": _fused_qkv(
                shape, (c_attn_bias, 0), (c_attn_bias, hidden), (c_attn_bias, 2 * hidden)),
            mc + "self_attention.linear_proj.weight": _whole(shapes, hf + "attn.c_proj.weight", transposed=True),
            mc + "self_attention.linear_proj.bias": _whole(shapes, hf + "attn.c_proj.bias"),
            mc + "pre_mlp_layernorm.weight": _whole(shapes, hf + "ln_2.weight"),
            mc + "pre_mlp_layernorm.bias": _whole(shapes, hf + "ln_2.bias"),
            mc + "mlp.linear_fc1.weight": _whole(shapes, hf + "mlp.c_fc.weight", transposed=True),
            mc + "mlp.linear_fc1.bias": _whole(shapes, hf + "mlp.c_fc.bias"),
            mc + "mlp.linear_fc2.weight": _whole(shapes, hf + "mlp.c_proj.weight", transposed=True),
            mc + "mlp.linear_fc2.bias": _whole(shapes, hf + "mlp.c_proj.bias"),
        })
    return layout


def hf_tensor_shapes(shape: GPTShape, names) -> Shapes:
    """The tensors a Hugging Face checkpoint of ``shape`` must hold (``names``: those it holds,
    which tell a GPT-2 checkpoint's prefix)."""
    if shape.mla is not None:
        return mla_tensor_shapes(shape)
    if shape.arch == "llama":
        return llama_tensor_shapes(shape)
    return gpt2_tensor_shapes(shape, _gpt2_prefix(names))


def hf_layout(shape: GPTShape, names) -> Layout:
    """The full state dict as rows of a Hugging Face checkpoint's tensors (``names``: as for ``hf_tensor_shapes``)."""
    if shape.mla is not None:
        return mla_layout(shape)
    return llama_layout(shape) if shape.arch == "llama" else gpt2_layout(shape, _gpt2_prefix(names))


def full_tensor_shapes(shape: GPTShape) -> Shapes:
    """The full state dict's tensor shapes (a cptoolkit checkpoint's tensors), from the Hugging Face layout,
    so that layout stays the one place that knows how the two relate."""
    return _full_shapes(hf_layout(shape, []), hf_tensor_shapes(shape, []))


def checkpoint_layout(config: dict, shape: GPTShape, located: TensorFiles) -> Layout:
    """The full state dict as rows of the checkpoint's tensors, after checking that every tensor it needs
    is stored with its shape (a cptoolkit checkpoint stores the full tensors themselves)."""
    if config.get("cptoolkit_format") == CPTOOLKIT_FORMAT:
        expected = full_tensor_shapes(shape)
        _check(located.shapes, expected, located.source, shape)
        return {name: _whole(expected, name) for name in expected}
    _check(located.shapes, hf_tensor_shapes(shape, located.shapes), located.source, shape)
    return hf_layout(shape, located.shapes)


# ----------------------------------------------------------------------------- loading and saving

def _slice_reader(layout: Layout, located: TensorFiles, opened: dict) -> Reader:
    """``load_tp_slices``' reader over the opened files (``opened``: path -> ``safe_open``): indices ``start:stop``
    along ``dim`` of a full tensor, read from only the pieces those rows cross, or (dim 1) those columns of
    every piece."""
    def stored(piece: Rows):
        return opened[located.files[piece.name]].get_slice(piece.name)

    def read(name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        pieces = layout[name]
        if dim == 0:
            blocks = [_read_rows(stored(p), p, first, last) for p, first, last in _pieces_in(pieces, start, stop)]
        else:
            blocks = [_read_rows(stored(p), p, p.start, p.stop, slice(start, stop)) for p in pieces]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    return read


def load_model_checkpoint(checkpoint_dir: str | Path, pg_collection: ProcessGroupCollection,
                          runtime: AttentionRuntime, dtype: torch.dtype = torch.float32
                          ) -> CPGPTModel:
    """Build the model of a Hugging Face or cptoolkit checkpoint directory on ``pg_collection``,
    sharded over its TP group: every rank reads only the rows (or, for a row-parallel weight, the columns)
    of its own TP slice, one range at a time, converting them to ``dtype`` as they are copied into its
    parameters (a progress bar over the tensors on rank 0, on a terminal). Raises ``ConfigError`` for a problem
    with the files, before building the model."""
    directory = Path(checkpoint_dir)
    config = read_config(directory)
    shape = hf_shape(config, directory)
    located = tensor_files(directory)
    layout = checkpoint_layout(config, shape, located)
    model = new_gpt_model(shape, pg_collection, runtime, dtype)
    with ExitStack() as stack:
        opened = {path: stack.enter_context(_open(path)) for path in dict.fromkeys(located.files.values())}
        load_tp_slices(model, _full_shapes(layout, located.shapes), _slice_reader(layout, located, opened),
                       progress_desc=f"loading {directory.name}")
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
        # "dtype" (transformers 5's key) lets runtime.dtype: auto load the weights in the dtype they were saved in.
        weights_dtype = str(next(iter(full.values())).dtype).removeprefix("torch.")
        config = {**write_hf_config(model.shape), "dtype": weights_dtype, "cptoolkit_format": CPTOOLKIT_FORMAT}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(directory)
    dist.barrier()
