"""One home per model family: each module here exports one ``Family`` record, and ``registry`` collects them.

A family is what Hugging Face calls a ``model_type`` (or a few close ones, as Llama and Mistral): the
``config.json`` keys it reads and writes and the extras its block adds to ``GPTShape`` (``deepseek.MLADims``,
``gemma.GemmaBlock``). Pure Python like ``cptoolkit.models.shape``: no torch, no megatron.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Mapping

from cptoolkit.models.shape import GPTShape
from cptoolkit.models.tensor_map import Layout, Shapes


@dataclass(frozen=True)
class Family:
    """A model family as the registry sees it.

    ``architectures``: each HF ``model_type`` of the family -> the ``architectures`` entries it accepts.
    ``read_hf_config(config, model_type)``: the ``GPTShape`` of a ``config.json`` dict whose ``model_type`` is one
    of ``architectures``; a key the family would compute differently is a ``ValueError`` naming the key, its value
    and the rule (never the file: the caller knows which file it read).
    ``owns(shape)``: whether ``shape`` is this family's (it writes its config.json and reads its checkpoints);
    exactly one family of the registry owns each valid ``GPTShape``.
    ``write_hf_config(shape)``: a ``config.json`` dict that ``read_hf_config`` reads back as ``shape``.
    ``tensor_shapes(shape, names)``: every tensor a Hugging Face checkpoint of ``shape`` holds, with its shape;
    ``names`` (the tensors the checkpoint holds) tell a family's variants apart, as GPT-2's prefix.
    ``layout(shape, names)``: the full state dict (megatron's TP=1 names) as rows of those tensors; every stored
    tensor it reads is one of ``tensor_shapes``.
    """

    name: str
    architectures: Mapping[str, tuple[str, ...]]
    read_hf_config: Callable[[dict, str], GPTShape]
    owns: Callable[[GPTShape], bool]
    write_hf_config: Callable[[GPTShape], dict]
    tensor_shapes: Callable[[GPTShape, Collection[str]], Shapes]
    layout: Callable[[GPTShape, Collection[str]], Layout]
