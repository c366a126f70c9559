"""How a checkpoint's stored tensors make up the model's full state dict: each full tensor (a TP=1 model's
parameter, under megatron's name) is its pieces' rows stacked, each piece rows of one stored tensor (``Rows``).
Each family's module in ``cptoolkit.models.families`` states its checkpoint's tensors (``Shapes``) and their
``Layout``; ``cptoolkit.models.checkpoint`` reads them. Pure Python: no torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cptoolkit.models.shape import GPTShape

Shapes = dict[str, tuple[int, ...]]  # stored tensor name -> its shape


@dataclass(frozen=True)
class Rows:
    """Rows ``start:stop`` of the stored tensor ``name``: one piece of a full tensor, whose rows are its pieces'
    rows stacked and whose other dimensions are the stored tensor's. ``transposed``: the tensor is stored
    ``[in, out]`` (GPT-2's Conv1D), so the piece is its columns ``start:stop`` and its rows are the full
    tensor's columns. ``index``: the stored tensor has one more leading dimension (an expert's slot in a stacked
    ``[E, ...]`` tensor, as gpt-oss stores its experts) and the piece is of its entry ``index``."""

    name: str
    start: int
    stop: int
    transposed: bool = False
    index: Optional[int] = None


Layout = dict[str, tuple[Rows, ...]]  # full tensor name -> its pieces, in order


def whole(shapes: Shapes, name: str, transposed: bool = False, index: Optional[int] = None) -> tuple[Rows]:
    """The stored tensor ``name`` (of shape ``shapes[name]``; with ``index``, its entry ``index``) as the one piece
    of a full tensor."""
    dims = shapes[name][0 if index is None else 1:]
    return (Rows(name, 0, dims[1 if transposed else 0], transposed, index),)


def fused_qkv(shape: GPTShape, q: tuple[str, int], k: tuple[str, int], v: tuple[str, int],
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
