"""Checkpoints in and out of the megatron-core model: Hugging Face Llama / GPT-2, and cptoolkit's own.

Every format describes the model's *full state dict* (``cptoolkit.models.tp_sharding``: unsharded
tensors under a TP=1 model's parameter names) as row ranges of the tensors in its files (``Rows``): a
full tensor is its pieces' rows stacked. Each rank reads only the index ranges its TP slice needs
(``safe_open(...).get_slice``), one range at a time, straight into its parameters, so any checkpoint
loads at any TP size and no rank holds a whole tensor it does not keep. ``config.json`` is read by
its family (``cptoolkit.models.families.registry``), which also states the tensors of its
checkpoints and how they make up the full state dict (``Family.tensor_shapes``, ``Family.layout``).

- Hugging Face (``config.json`` + ``model.safetensors`` or a sharded ``model.safetensors.index.json``;
  no hub access): the Llama family (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
  ``Qwen3ForCausalLM``: q/k/v/o, gate/up/down, RMSNorm, GQA, Qwen2's q/k/v biases, Qwen3's q/k norms; Gemma 2/3's
  ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM``, the same tensors plus its pre/post feed-forward norms;
  DeepSeek-V2/V3's MLA tensors), the mixture-of-experts families (``MixtralForCausalLM``, ``Qwen2MoeForCausalLM``,
  ``Qwen3MoeForCausalLM``, DeepSeek's MoE layers: per-expert tensors stacked into one full tensor per layer,
  ``cptoolkit.models.families.experts``) and ``GPT2LMHeadModel`` (Conv1D weights stored ``[in, out]``: their
  columns are the model's rows; so are each expert's down projection's).
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
from cptoolkit.models.families import Family
from cptoolkit.models.families.registry import checkpoint_family, hf_shape, shape_family, write_hf_config
from cptoolkit.models.shape import CONFIG_FILE, RESAVE, GPTShape, read_config, read_json_object
from cptoolkit.models.tensor_map import Layout, Rows, Shapes, whole
from cptoolkit.models.tp_sharding import Reader, gather_full_state_dict, load_tp_slices

CPTOOLKIT_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

StateDict = dict[str, torch.Tensor]


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

def _read_rows(stored, piece: Rows, start: int, stop: int, columns: slice = slice(None)) -> torch.Tensor:
    """Rows ``start:stop`` of ``piece``'s stored tensor (indices into it), only the full tensor's ``columns``
    of them. ``stored``: the tensor, or its ``safe_open(...).get_slice`` (which reads just what it is indexed
    with); both index alike. A piece with an ``index`` reads that entry of the stored tensor's leading dimension."""
    lead = () if piece.index is None else (piece.index,)
    if piece.transposed:
        return stored[(*lead, columns, slice(start, stop))].t()
    rows = (*lead, slice(start, stop))
    return stored[rows] if columns == slice(None) else stored[(*rows, columns)]


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
        dims = shapes[piece.name][0 if piece.index is None else 1:]
        return dims[:1] if piece.transposed else dims[1:]

    return {name: (sum(p.stop - p.start for p in pieces), *other_dims(pieces[0])) for name, pieces in layout.items()}


# ----------------------------------------------------------------------------- Hugging Face formats

def hf_to_full(weights: StateDict, shape: GPTShape, family: Family | None = None) -> StateDict:
    """A Hugging Face checkpoint's tensors, in memory, as the full state dict (to re-save it in cptoolkit's format,
    or to inspect one full tensor such as a MoE layer's stacked experts); ``family``: as for ``hf_layout``."""
    return {name: torch.cat([_read_rows(weights[p.name], p, p.start, p.stop) for p in pieces])
            for name, pieces in hf_layout(shape, weights, family).items()}


def hf_tensor_shapes(shape: GPTShape, names, family: Family | None = None) -> Shapes:
    """The tensors a Hugging Face checkpoint of ``shape`` must hold (``names``: those it holds,
    which tell a GPT-2 checkpoint's prefix); ``family``: as for ``hf_layout``."""
    return (family or shape_family(shape)).tensor_shapes(shape, names)


def hf_layout(shape: GPTShape, names, family: Family | None = None) -> Layout:
    """The full state dict as rows of a Hugging Face checkpoint's tensors (``names``: as for ``hf_tensor_shapes``).
    ``family``: the one that read the checkpoint's config.json (``checkpoint_family``), which knows its tensors;
    default: the one that owns ``shape`` (two families may read the same shape from differently stored tensors,
    as Phi-3's fused projections hold a Llama block)."""
    return (family or shape_family(shape)).layout(shape, names)


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
        return {name: whole(expected, name) for name in expected}
    family = checkpoint_family(config)
    _check(located.shapes, hf_tensor_shapes(shape, located.shapes, family), located.source, shape)
    return hf_layout(shape, located.shapes, family)


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


def write_checkpoint(full: StateDict, hf_config: dict, checkpoint_dir: str | Path, tokenizer) -> None:
    """Write the full state dict ``full`` as a cptoolkit checkpoint: ``model.safetensors``, ``config.json`` (the
    model's ``hf_config`` marked ``cptoolkit_format``, with the weights' ``dtype``) and the tokenizer
    (``tokenizer.save``). One process's job: no collective."""
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in full.items()}, directory / WEIGHTS_FILE)
    # "dtype" (transformers 5's key) lets runtime.dtype: auto load the weights in the dtype they were saved in.
    weights_dtype = str(next(iter(full.values())).dtype).removeprefix("torch.")
    config = {**hf_config, "dtype": weights_dtype, "cptoolkit_format": CPTOOLKIT_FORMAT}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(directory)


def save_checkpoint(model: CPGPTModel, checkpoint_dir: str | Path, tokenizer) -> None:
    """Write ``model`` and ``tokenizer`` as a cptoolkit checkpoint that loads at any TP size.

    Collective: every rank calls it. Each TP group assembles the full weights (one all-gather per
    parameter over the model's TP group; routed experts over their EP and ETP groups); global rank 0 writes them
    (``write_checkpoint``); a barrier on the default group makes the files visible to every rank on return.
    """
    full = gather_full_state_dict(model)
    if dist.get_rank() == 0:
        write_checkpoint(full, write_hf_config(model.shape), checkpoint_dir, tokenizer)
    dist.barrier()
