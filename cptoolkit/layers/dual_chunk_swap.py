"""DualChunkSwap: the prefill sequence split that gives every PCP rank the same causal work.

A sequence padded to ``seq_len_padded = 2 * pcp_size * c`` tokens is cut into ``2 * pcp_size``
chunks of ``c`` tokens. PCP rank ``r`` holds chunk ``r`` followed by chunk ``2 * pcp_size - 1 - r``,
a local sequence of ``2c`` tokens. Pairing an early chunk with its mirror image makes the number of
causal (query, key) pairs the same on every rank; a contiguous split gives the last rank about
``2 * pcp_size - 1`` times the work of the first.

Padding invariant: padding is appended at the END of a sequence, so every pad token's position is
larger than every real token's. Under causal masking no real query sees a pad key, so real tokens'
results never depend on padding; pad rows are simply dropped when outputs are restored.

Everything here is pure tensor indexing, no communication: ranks gather shards themselves
(e.g. ``comm.all_gather``) and call :func:`unshard_sequence` / :meth:`DualChunkSwapBatch.restore`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SPLITS = ("dual_chunk_swap", "contiguous")


def _check_rank(pcp_rank: int, pcp_size: int) -> None:
    if pcp_size < 1:
        raise ValueError(f"pcp_size ({pcp_size}) must be at least 1")
    if not 0 <= pcp_rank < pcp_size:
        raise ValueError(f"pcp_rank ({pcp_rank}) must be in [0, pcp_size={pcp_size})")


def chunk_ids(pcp_rank: int, pcp_size: int) -> tuple[int, int]:
    """The two chunks PCP rank ``pcp_rank`` holds, in local order: ``(r, 2 * pcp_size - 1 - r)``."""
    _check_rank(pcp_rank, pcp_size)
    return pcp_rank, 2 * pcp_size - 1 - pcp_rank


def padded_length(seq_len: int, pcp_size: int) -> int:
    """Smallest multiple of ``2 * pcp_size`` that is at least ``seq_len``."""
    if seq_len < 1:
        raise ValueError(f"seq_len ({seq_len}) must be at least 1")
    _check_rank(0, pcp_size)
    num_chunks = 2 * pcp_size
    return -(-seq_len // num_chunks) * num_chunks


def chunk_length(seq_len_padded: int, pcp_size: int) -> int:
    """Tokens per chunk ``c = seq_len_padded / (2 * pcp_size)``."""
    _check_rank(0, pcp_size)
    if seq_len_padded < 1 or seq_len_padded % (2 * pcp_size):
        raise ValueError(f"seq_len_padded ({seq_len_padded}) must be a positive multiple of "
                         f"2 * pcp_size ({2 * pcp_size}); pad the sequence to padded_length() first")
    return seq_len_padded // (2 * pcp_size)


def token_owner(position: int, seq_len_padded: int, pcp_size: int) -> tuple[int, int]:
    """``(pcp_rank, local_index)`` of the rank holding token ``position`` and where it sits locally."""
    c = chunk_length(seq_len_padded, pcp_size)
    if not 0 <= position < seq_len_padded:
        raise ValueError(f"position ({position}) must be in [0, seq_len_padded={seq_len_padded})")
    chunk, offset = divmod(position, c)
    if chunk < pcp_size:
        return chunk, offset
    return 2 * pcp_size - 1 - chunk, c + offset


def last_token_owner(seq_len: int, seq_len_padded: int, pcp_size: int) -> tuple[int, int]:
    """``(pcp_rank, local_index)`` of a sequence's last real token (its next-token logits live there)."""
    return token_owner(seq_len - 1, seq_len_padded, pcp_size)


def shard_positions(seq_len_padded: int, pcp_rank: int, pcp_size: int) -> torch.Tensor:
    """True token positions held by ``pcp_rank``: LongTensor ``[2c]``, chunk ``r`` then its mirror."""
    c = chunk_length(seq_len_padded, pcp_size)
    first, second = chunk_ids(pcp_rank, pcp_size)
    return torch.cat([torch.arange(first * c, (first + 1) * c), torch.arange(second * c, (second + 1) * c)])


def shard_sequence(x: torch.Tensor, pcp_rank: int, pcp_size: int, seq_dim: int) -> torch.Tensor:
    """This rank's shard of a padded per-token tensor: ``x`` with dim ``seq_dim`` of length
    ``seq_len_padded`` becomes the same shape with that dim of length ``2c`` (chunk r, chunk 2P-1-r)."""
    c = chunk_length(x.shape[seq_dim], pcp_size)
    first, second = chunk_ids(pcp_rank, pcp_size)
    return torch.cat([x.narrow(seq_dim, first * c, c), x.narrow(seq_dim, second * c, c)], dim=seq_dim)


def unshard_sequence(gathered: torch.Tensor, pcp_size: int, seq_dim: int) -> torch.Tensor:
    """Inverse of :func:`shard_sequence` over all ranks.

    ``gathered`` is ``[pcp_size, *local_shape]`` with entry ``r`` = PCP rank ``r``'s shard;
    ``seq_dim`` indexes ``local_shape`` (local length ``2c``). Returns ``local_shape`` with that dim
    of length ``2 * pcp_size * c``, tokens in original order.
    """
    if gathered.dim() < 2 or gathered.shape[0] != pcp_size:
        raise ValueError(f"gathered must be [pcp_size={pcp_size}, *local_shape]; got {tuple(gathered.shape)}")
    seq_dim = seq_dim % (gathered.dim() - 1)
    local_len = gathered.shape[seq_dim + 1]
    if local_len % 2:
        raise ValueError(f"local sequence length ({local_len}) on dim {seq_dim} must be even (two chunks)")
    c = local_len // 2
    # Chunk j < P is rank j's first half; chunk j >= P is rank (2P-1-j)'s second half.
    first_halves = [gathered[pcp_rank].narrow(seq_dim, 0, c) for pcp_rank in range(pcp_size)]
    second_halves = [gathered[pcp_rank].narrow(seq_dim, c, c) for pcp_rank in reversed(range(pcp_size))]
    return torch.cat(first_halves + second_halves, dim=seq_dim)


def causal_work(pcp_rank: int, pcp_size: int, seq_len_padded: int, split: str = "dual_chunk_swap") -> int:
    """Number of causal (query, key) pairs, key position <= query position, that ``pcp_rank``
    computes when the sequence is split by ``split`` ("dual_chunk_swap" or "contiguous")."""
    if split == "dual_chunk_swap":
        positions = shard_positions(seq_len_padded, pcp_rank, pcp_size)
    elif split == "contiguous":
        local_len = 2 * chunk_length(seq_len_padded, pcp_size)
        _check_rank(pcp_rank, pcp_size)
        positions = torch.arange(pcp_rank * local_len, (pcp_rank + 1) * local_len)
    else:
        raise ValueError(f"split ({split!r}) must be one of {SPLITS}")
    return int((positions + 1).sum())


@dataclass(frozen=True)
class DualChunkSwapBatch:
    """One PCP rank's share of a batch of variable-length sequences, each padded at its end to the
    common ``seq_len_padded``.

    ``input_ids``, ``position_ids`` (true positions; pad tokens continue past the sequence end) and
    ``valid`` (True on real tokens) are ``[b, 2c]``; ``seq_lens`` are the unpadded lengths.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    valid: torch.Tensor
    seq_lens: tuple[int, ...]
    seq_len_padded: int
    pcp_rank: int
    pcp_size: int

    def restore(self, gathered: torch.Tensor, seq_dim: int = 1) -> list[torch.Tensor]:
        """Per-sequence tensors in token order with padding removed.

        ``gathered`` is ``[pcp_size, b, ...]``: every rank's local per-token tensor (hidden states
        ``[b, 2c, h]`` with ``seq_dim=1``, KV ``[b, h, 2c, d]`` with ``seq_dim=2``). Entry ``i`` of the
        result is sequence ``i`` without the batch dim, its sequence dim (``seq_dim - 1``) of length
        ``seq_lens[i]``.
        """
        if seq_dim < 1:
            raise ValueError(f"seq_dim ({seq_dim}) must be at least 1: dim 0 of the local tensor is batch")
        full = unshard_sequence(gathered, self.pcp_size, seq_dim)
        return [full[i].narrow(seq_dim - 1, 0, seq_len) for i, seq_len in enumerate(self.seq_lens)]

    def last_token_owners(self) -> list[tuple[int, int]]:
        """``(pcp_rank, local_index)`` of each sequence's last real token."""
        return [last_token_owner(n, self.seq_len_padded, self.pcp_size) for n in self.seq_lens]


def _split_packed(packed: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    bounds = [int(x) for x in cu_seqlens]
    if packed.dim() != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != packed.numel():
        raise ValueError(f"cu_seqlens ({bounds}) must start at 0 and end at the packed length "
                         f"({packed.numel()}) of a 1-D token tensor")
    return [packed[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def partition_batch(token_ids: list[list[int]] | torch.Tensor, pcp_rank: int, pcp_size: int, pad_id: int,
                    cu_seqlens: torch.Tensor | None = None) -> DualChunkSwapBatch:
    """Pad a batch of sequences at their ends and take ``pcp_rank``'s DualChunkSwap shard.

    ``token_ids`` is a list of token-id lists, or (with ``cu_seqlens [b+1]``) a packed 1-D "thd"
    tensor whose sequence ``i`` is ``token_ids[cu_seqlens[i]:cu_seqlens[i+1]]``.
    """
    if cu_seqlens is None:
        sequences = [torch.as_tensor(ids, dtype=torch.long) for ids in token_ids]
    else:
        sequences = _split_packed(torch.as_tensor(token_ids, dtype=torch.long), cu_seqlens)
    seq_lens = tuple(len(seq) for seq in sequences)
    if not seq_lens or min(seq_lens) < 1:
        raise ValueError(f"every sequence needs at least one token; got lengths {list(seq_lens)}")
    seq_len_padded = padded_length(max(seq_lens), pcp_size)
    input_ids = torch.full((len(sequences), seq_len_padded), pad_id, dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, :len(seq)] = seq
    position_ids = torch.arange(seq_len_padded).expand(len(sequences), -1)
    valid = position_ids < torch.tensor(seq_lens).unsqueeze(1)
    return DualChunkSwapBatch(
        input_ids=shard_sequence(input_ids, pcp_rank, pcp_size, seq_dim=1),
        position_ids=shard_sequence(position_ids, pcp_rank, pcp_size, seq_dim=1),
        valid=shard_sequence(valid, pcp_rank, pcp_size, seq_dim=1),
        seq_lens=seq_lens, seq_len_padded=seq_len_padded, pcp_rank=pcp_rank, pcp_size=pcp_size)
