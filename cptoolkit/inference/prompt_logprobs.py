"""Prompt log-probabilities (``echo`` with ``logprobs``, lm-eval's loglikelihood) from a PCP-sharded prefill.

Each PCP rank scores the tokens of its own DualChunkSwap shard: the hidden state at chunk position ``p``
predicts prompt token ``start + p + 1``, so a long document is scored in parallel, ``1 / PCP`` of its
tokens per rank, and the full-vocabulary logits are never materialised for more than ``block_tokens``
positions at a time. One all-reduce (sum) over the PCP group then gives every rank every position's
figures: each position is scored by exactly one PCP rank, the others contribute zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.distributed import ProcessGroup

from cptoolkit.inference.request import TokenLogprob
from cptoolkit.inference.sampling import top_logprobs
from cptoolkit.layers.comm import all_reduce
from cptoolkit.models.gpt import CPGPTModel, gpt_logits

BLOCK_TOKENS = 1024


@dataclass(frozen=True)
class ScoredRow:
    """A batch row whose chunk is scored: its prompt, where the chunk starts in it, the chunk's length
    and how many alternatives per token to keep."""

    row: int
    prompt_ids: Sequence[int]
    start: int
    chunk_len: int
    num_top: int


def score_prompt_chunks(model: CPGPTModel, hidden: torch.Tensor, chunk_positions: torch.Tensor,
                        rows: Sequence[ScoredRow], pcp_group: Optional[ProcessGroup],
                        block_tokens: int = BLOCK_TOKENS) -> list[dict[int, TokenLogprob]]:
    """``{prompt position: TokenLogprob}`` of every token the chunk of each of ``rows`` predicts.

    ``hidden [s_local, b, h]`` is this rank's final hidden states of the prefill batch (``gpt_hidden``),
    ``chunk_positions [s_local]`` the chunk positions of its tokens (the DualChunkSwap shard's, equal for
    every row). Every TP and PCP rank of the replica must call this with the same ``rows``.
    """
    if not rows:
        return []
    num_top = max(r.num_top for r in rows)
    width = max(r.chunk_len for r in rows)
    # Per (row, chunk position): [scored flag, target logprob, top logprobs..., top ids...]; float64
    # holds every token id exactly.
    packed = torch.zeros(len(rows), width, 2 + 2 * num_top, dtype=torch.float64, device=hidden.device)
    positions = chunk_positions.to(hidden.device)
    for slot, scored in enumerate(rows):
        prompt = torch.as_tensor(scored.prompt_ids, dtype=torch.long, device=hidden.device)
        local = torch.nonzero((positions < scored.chunk_len) & (positions + scored.start + 1 < len(prompt)))[:, 0]
        for block in local.split(block_tokens):
            chunk_pos = positions[block]
            logits = gpt_logits(model, hidden[block, scored.row:scored.row + 1])[0]  # [n, vocab]
            chosen, top_values, top_ids = top_logprobs(logits, prompt[scored.start + chunk_pos + 1], num_top)
            packed[slot, chunk_pos, 0] = 1.0
            packed[slot, chunk_pos, 1] = chosen.double()
            packed[slot, chunk_pos, 2:2 + top_values.shape[1]] = top_values.double()
            packed[slot, chunk_pos, 2 + num_top:2 + num_top + top_ids.shape[1]] = top_ids.double()
    if pcp_group is not None and pcp_group.size() > 1:
        all_reduce(packed, pcp_group)
    return [_unpack(packed[slot], scored, num_top) for slot, scored in enumerate(rows)]


def _unpack(packed: torch.Tensor, scored: ScoredRow, num_top: int) -> dict[int, TokenLogprob]:
    figures = {}
    for chunk_pos, entry in enumerate(packed.tolist()):
        if not entry[0]:
            continue
        target = scored.start + chunk_pos + 1
        top = tuple((int(token), value) for value, token in
                    zip(entry[2:2 + scored.num_top], entry[2 + num_top:2 + num_top + scored.num_top]))
        figures[target] = TokenLogprob(int(scored.prompt_ids[target]), entry[1], top)
    return figures
