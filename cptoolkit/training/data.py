"""Training data: a corpus of documents, each step's global batch, and one rank's share of it.

Stages, each a plain function of its inputs (no communication, no global state):

1. ``generate_corpus`` (a deterministic text corpus made by the project, no download) or
   ``read_corpus`` (the non-empty lines of ``train.corpus``) -> documents (``str``);
   ``tokenize_documents`` -> one LongTensor per document, ending with the tokenizer's EOS.
2. ``sample_windows``: the *global* batch of a step, ``dp * micro_batch_size`` windows of at most
   ``seq_len + 1`` tokens, drawn from a generator seeded by ``(seed, step)`` so every rank draws the
   same batch and a run is reproducible for any layout. Documents shorter than the window give
   shorter windows: sequences in a batch have variable length.
3. ``pack_windows``: windows -> a packed "thd" ``PackedBatch`` (inputs, next-token labels, loss
   mask, ``cu_seqlens``), the format of megatron's packed sequences.
4. ``get_batch_on_this_pcp_rank``: pad every sequence at its end and keep this PCP rank's two
   DualChunkSwap chunks of inputs, labels, loss mask and position ids (megatron's
   ``get_batch_on_this_cp_rank``), with ``dual_chunk_swap.partition_batch``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cptoolkit.config import ConfigError, TrainConfig
from cptoolkit.layers.dual_chunk_swap import partition_batch

_SUBJECTS = ("the cat", "a dog", "the old man", "my sister", "the robot", "a small bird", "the teacher",
             "our neighbour", "the farmer", "a young girl")
_VERBS = ("sees", "likes", "follows", "paints", "finds", "helps", "calls", "watches")
_OBJECTS = ("the river", "a red ball", "the tall tree", "an apple", "the city", "a green door",
            "the moon", "a wooden boat", "the garden")
_ENDINGS = ("every morning", "at night", "in the rain", "with great care", "again and again", "today")


def _draw(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=generator))


def _sentence(generator: torch.Generator) -> str:
    kind = _draw(3, generator)
    if kind == 0:
        words = (_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)
        return " ".join(choices[_draw(len(choices), generator)] for choices in words) + "."
    a, b = _draw(50, generator), _draw(50, generator)
    if kind == 1:
        return f"{a} plus {b} is {a + b}."
    return "count: " + " ".join(str(b + i) for i in range(1 + a % 8)) + "."


def generate_corpus(num_documents: int = 2000, seed: int = 0) -> list[str]:
    """``num_documents`` short English-like documents of 1-6 sentences (simple subject-verb-object
    sentences, sums, counting runs): learnable structure, lengths from ~10 to ~300 bytes. The same
    ``seed`` gives the same corpus on every machine."""
    if num_documents < 1:
        raise ValueError(f"num_documents ({num_documents}) must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    documents = []
    for _ in range(num_documents):
        num_sentences = 1 + _draw(6, generator)
        documents.append(" ".join(_sentence(generator) for _ in range(num_sentences)))
    return documents


def read_corpus(path: Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, one document each."""
    if not path.is_file():
        raise ConfigError(f"train.corpus = {str(path)!r}: no such file; give a UTF-8 text file with one "
                         f"document per line, or leave train.corpus unset for the generated corpus")
    documents = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not documents:
        raise ConfigError(f"train.corpus = {str(path)!r}: the file has no non-empty line (one document per line)")
    return documents


def corpus_documents(train: TrainConfig, config_dir: Path) -> list[str]:
    """``train.corpus`` (a path relative to the config file's folder, or absolute) read by
    ``read_corpus``, or the generated corpus of seed ``train.seed`` when it is unset."""
    if train.corpus is None:
        return generate_corpus(seed=train.seed)
    path = Path(train.corpus)
    return read_corpus(path if path.is_absolute() else config_dir / path)


def tokenize_documents(documents: list[str], tokenizer) -> list[torch.Tensor]:
    """Each document's token ids followed by ``tokenizer.eos_token_id``: LongTensor ``[n_i + 1]``, so
    even a one-token document has a next-token target."""
    return [torch.tensor(tokenizer.encode(doc) + [tokenizer.eos_token_id], dtype=torch.long)
            for doc in documents]


def sample_windows(documents: list[torch.Tensor], step: int, num_windows: int, seq_len: int,
                   seed: int) -> list[torch.Tensor]:
    """The global batch of ``step``: ``num_windows`` token windows of ``min(len(doc), seq_len + 1)``
    tokens each (a window of ``n + 1`` tokens trains ``n`` next-token predictions).

    Window ``i`` comes from a uniformly drawn document, at a uniformly drawn start when the document
    is longer than the window. Depends only on ``(documents, step, num_windows, seq_len, seed)``.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    doc_ids = torch.randint(len(documents), (num_windows,), generator=generator)
    windows = []
    for doc_id in doc_ids.tolist():
        doc = documents[doc_id]
        window_len = min(doc.numel(), seq_len + 1)
        start = _draw(doc.numel() - window_len + 1, generator)
        windows.append(doc[start:start + window_len])
    return windows


@dataclass(frozen=True)
class PackedBatch:
    """Variable-length sequences packed end to end ("thd" format).

    ``tokens``, ``labels`` (the next token of each input token) ``[t]`` LongTensors, ``loss_mask``
    ``[t]`` bool (False on targets that must not train), ``cu_seqlens [n + 1]``: sequence ``i`` is
    ``[cu_seqlens[i], cu_seqlens[i + 1])``.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    cu_seqlens: torch.Tensor


def pack_windows(windows: list[torch.Tensor]) -> PackedBatch:
    """Windows of ``n_i + 1`` tokens -> a ``PackedBatch`` of sequences of ``n_i`` inputs (all targets
    train)."""
    if not windows or min(w.numel() for w in windows) < 2:
        raise ValueError(f"every window needs at least 2 tokens (an input and its target); got lengths "
                         f"{[w.numel() for w in windows]}")
    lengths = torch.tensor([w.numel() - 1 for w in windows])
    tokens = torch.cat([w[:-1] for w in windows])
    return PackedBatch(tokens=tokens, labels=torch.cat([w[1:] for w in windows]),
                       loss_mask=torch.ones_like(tokens, dtype=torch.bool),
                       cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))


@dataclass(frozen=True)
class TrainBatch:
    """One PCP rank's share of a batch: ``[b, 2c]`` tensors ``input_ids``, ``labels``, ``loss_mask``
    (bool: a real token whose target trains) and ``position_ids`` (true positions in the sequence).

    Sequences are padded at their ends to a common multiple of ``2 * pcp_size``; padded tokens have
    ``loss_mask`` False and, being later than every real token, are never seen by a real token's
    causal attention.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device: torch.device) -> "TrainBatch":
        return TrainBatch(*(t.to(device) for t in (self.input_ids, self.labels, self.loss_mask,
                                                   self.position_ids)))


def get_batch_on_this_pcp_rank(packed: PackedBatch, pcp_rank: int, pcp_size: int, pad_id: int) -> TrainBatch:
    """This PCP rank's DualChunkSwap shard of every sequence of ``packed`` (megatron's
    ``get_batch_on_this_cp_rank``): chunks ``pcp_rank`` and ``2 * pcp_size - 1 - pcp_rank`` of each
    sequence, padded at its end to ``padded_length(longest, pcp_size)``.

    Inputs, labels and loss mask go through the same ``partition_batch`` split, so position ``j`` of
    each output tensor refers to the same token. ``pad_id`` fills padded inputs and labels (any valid
    vocabulary id: padded positions never train, their loss mask is filled with False).
    """
    def shard(values: torch.Tensor, fill: int):
        return partition_batch(values, pcp_rank, pcp_size, pad_id=fill, cu_seqlens=packed.cu_seqlens)

    inputs = shard(packed.tokens, pad_id)
    return TrainBatch(input_ids=inputs.input_ids, labels=shard(packed.labels, pad_id).input_ids,
                      loss_mask=shard(packed.loss_mask.long(), 0).input_ids.bool(),
                      position_ids=inputs.position_ids)
