"""The engine's sampler: one token per request (or a verification's tokens), the same on every rank of a replica.

Each rank samples (``sampling.sample_each``) or verifies drafts (``speculative.accept``) on its own logits, then
the replica's first rank's tokens are broadcast over the replica group (``sampling.broadcast_tokens``), so every
rank appends the same tokens even if the ranks' float rounding differed. A row whose sampling raised on the first
rank is ``FAILED_TOKEN`` there, and every rank fails that request alike (the engine module's failure isolation):
the decision travels in the broadcast that already follows sampling, with no collective of its own.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from cptoolkit.inference.request import Request
from cptoolkit.inference.sampling import (FAILED_TOKEN, adjust_logits, broadcast_tokens, sample_each,
                                          sampling_failure)
from cptoolkit.inference.speculative import accept
from cptoolkit.parallel_state import ParallelGroups

# A row that failed on the replica's first rank while this rank's own draw succeeded: the broadcast decides.
_FAILED_ON_FIRST_RANK = "sampling failed on the replica's first rank (its log says why)"


class Sampler:
    """Samples ids below ``vocab_size`` (the ids the tokenizer can decode) for this rank's replica (``groups``)."""

    def __init__(self, groups: ParallelGroups, vocab_size: int, device: torch.device):
        self.groups, self.vocab_size, self.device = groups, vocab_size, device

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> tuple[torch.Tensor, dict[int, str]]:
        """One token per row of ``logits [b, vocab_size]``, the same on every rank of the replica (the first
        rank's, broadcast), and ``{row: error}`` for the rows whose sampling failed there (``FAILED_TOKEN``)."""
        tokens, errors = sample_each(logits[:, :self.vocab_size], [r.sampling for r in requests],
                                     [r.generator for r in requests], [r.prompt_ids for r in requests],
                                     [r.output_ids for r in requests])
        tokens = self._broadcast(tokens.contiguous())
        return tokens, _failures(tokens == FAILED_TOKEN, errors)

    def verify(self, logits: torch.Tensor, requests: list[Request], drafts: list[list[int]]
               ) -> tuple[torch.Tensor, dict[int, str]]:
        """Speculative decoding's acceptance (``speculative.accept``) on ``logits [b, L, vocab]``: ``emitted [b, L]``,
        each row's accepted drafts and one more token, then ``FAILED_TOKEN`` padding (the first rank's, broadcast),
        and ``{row: error}`` for the rows whose acceptance raised there (all ``FAILED_TOKEN``)."""
        emitted = torch.full((len(requests), logits.shape[1]), FAILED_TOKEN, dtype=torch.int64, device=self.device)
        errors: dict[int, str] = {}
        for row, (request, draft) in enumerate(zip(requests, drafts)):
            try:
                # Row j's penalties count the drafts before it as generated.
                adjusted = torch.cat([adjust_logits(logits[row, j:j + 1, :self.vocab_size], [request.sampling],
                                                    [request.prompt_ids], [request.output_ids + draft[:j]])
                                      for j in range(len(draft) + 1)])
                tokens = accept(adjusted, draft, request.sampling, request.generator)
                emitted[row, :len(tokens)] = torch.tensor(tokens)
            except Exception as err:  # one request's fault ends that request, not the batch
                errors[row] = sampling_failure(err)
        emitted = self._broadcast(emitted)
        return emitted, _failures((emitted == FAILED_TOKEN).all(dim=1), errors)

    def _broadcast(self, tokens: torch.Tensor) -> torch.Tensor:
        """The replica's first rank's ``tokens``, on every rank of the replica group."""
        if dist.is_initialized() and dist.get_world_size(self.groups.replica_group) > 1:
            return broadcast_tokens(tokens, self.groups.replica_group, src=self.groups.replica_first_rank)
        return tokens


def _failures(failed: torch.Tensor, local_errors: dict[int, str]) -> dict[int, str]:
    """``{row: error}`` for the rows ``failed [b]`` marks in the broadcast tokens: this rank's own error where its
    draw failed too, else the first rank's verdict."""
    return {row: local_errors.get(row, _FAILED_ON_FIRST_RANK) for row in failed.nonzero().flatten().tolist()}
