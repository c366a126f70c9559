"""Speculative decoding: prompt-lookup (n-gram) drafts and the acceptance rules that keep it exact.

A decode step with drafts feeds every running request its last token followed by its draft tokens
(``L`` tokens per sequence) through one forward: DCP decode attention with ``L`` queries per sequence
(``dcp_decode_attention``: the same collectives as a plain step, each query attending causally over the
DCP-sharded cache). Row ``j`` of a request's logits is the target distribution of the token after its
``j``-th input, so drafts are checked left to right:

- **greedy** (``SamplingParams.is_greedy``: temperature below 1e-5): a draft is accepted while it equals the argmax of its row; the first
  mismatch is replaced by that argmax, and when all are accepted the last row adds one more token. The tokens
  are those plain greedy decoding would produce, ``1 + accepted`` of them per step.
- **sampling**: the drafts are deterministic proposals (``q(d) = 1``), so the standard speculative
  rejection rule becomes: accept draft ``d`` with probability ``p(d)`` (``p`` the row's distribution after
  temperature / top-k / top-p, ``sampling.token_weights`` normalised); on rejection draw from ``p`` with ``d``
  removed, renormalised. Each emitted token is then distributed exactly as ``p`` (``P(d) = p(d)``,
  ``P(x) = (1 - p(d)) p(x) / (1 - p(d)) = p(x)``).

The caller applies each row's penalties with the drafts before it counted as generated, and afterwards
forgets the cache entries of rejected drafts (``PagedKVCache.truncate``): every DCP member computes its own
shard's length, so no communication is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from cptoolkit.inference.sampling import FAILED_TOKEN, NOT_FINITE, SamplingParams, draw, token_weights


@dataclass(frozen=True)
class NgramProposer:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last ``n``
    tokens (``n`` from ``max_n`` down to ``min_n``; the first ``n`` with a match wins), at most
    ``num_tokens`` of them. A pure function of the token ids, so every rank proposes the same drafts."""

    num_tokens: int
    min_n: int = 1
    max_n: int = 3

    def __post_init__(self):
        if not 1 <= self.min_n <= self.max_n or self.num_tokens < 1:
            raise ValueError(f"NgramProposer(num_tokens={self.num_tokens}, min_n={self.min_n}, max_n={self.max_n}): "
                             "rule: num_tokens >= 1 and 1 <= min_n <= max_n")

    def propose(self, token_ids: Sequence[int], limit: int) -> list[int]:
        """Up to ``min(num_tokens, limit)`` draft tokens to follow ``token_ids`` (prompt + generated)."""
        limit = min(limit, self.num_tokens)
        if limit < 1:
            return []
        tokens = torch.tensor(token_ids, dtype=torch.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            # Windows that start before the suffix itself: their continuation is known.
            windows = tokens[:-1].unfold(0, n, 1)
            starts = torch.nonzero((windows == tokens[-n:]).all(dim=1)).flatten()
            if len(starts):
                start = int(starts[-1]) + n
                return tokens[start:start + limit].tolist()
        return []


def accept(logits: torch.Tensor, drafts: Sequence[int], params: SamplingParams,
           generator: torch.Generator) -> list[int]:
    """The tokens one verification step emits for a request: ``logits [len(drafts) + 1, vocab]`` (penalties
    applied), row ``j`` the distribution after the ``j``-th input token. Returns the accepted drafts and one
    more token: a replacement for the first rejected draft, or a bonus token after the last row. Greedy rows
    leave ``generator`` untouched."""
    emitted = []
    for row, draft in enumerate(drafts):
        token = _check_draft(logits[row], draft, params, generator)
        emitted.append(token)
        if token != draft:
            return emitted
    last = logits[len(drafts)]
    emitted.append(int(torch.argmax(last)) if params.is_greedy else _draw_one(_weights(last, params), generator))
    return emitted


def _check_draft(logits: torch.Tensor, draft: int, params: SamplingParams, generator: torch.Generator) -> int:
    """``draft`` if accepted, else the token drawn in its place (see the module docstring)."""
    if params.is_greedy:
        return int(torch.argmax(logits))
    weights = _weights(logits, params)
    is_draft = torch.arange(len(weights), device=weights.device) == draft  # all False for a draft past the vocabulary
    p_draft = float((weights * is_draft).sum() / weights.sum())
    if float(torch.rand((), generator=generator, device=generator.device)) < p_draft:
        return draft
    return _draw_one(weights.masked_fill(is_draft, 0.0), generator)


def _weights(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[vocab]``: what a non-greedy ``params`` samples from ``logits [vocab]`` (``sampling.token_weights``)."""
    return token_weights(logits.unsqueeze(0), [params])[0]


def _draw_one(weights: torch.Tensor, generator: torch.Generator) -> int:
    """One token from ``weights [vocab]``; raises ``ValueError`` when they hold NaN (``sampling.draw``)."""
    token = int(draw(weights.unsqueeze(0), [generator])[0])
    if token == FAILED_TOKEN:
        raise ValueError(NOT_FINITE)
    return token
