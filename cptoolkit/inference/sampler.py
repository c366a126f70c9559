"""The engine's sampler: one token per request (or a verification's tokens), the same on every rank of a replica.

Each rank samples its batch at once (``sampling.sample_each``: batched tensor ops, no host round-trip) or verifies
drafts row by row (``speculative.accept``) on its own logits, then the replica's first rank's tokens are broadcast
over the replica group (``sampling.broadcast_tokens``), so every rank appends the same tokens even if the ranks'
float rounding differed; the broadcast tokens are then read to the host once, the step's one host transfer. A row
whose sampling failed on the first rank is ``FAILED_TOKEN`` there, and every rank fails that request alike (the
engine module's failure isolation): the decision travels in the broadcast that already follows sampling, with no
collective of its own.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from cptoolkit.inference.request import Request
from cptoolkit.inference.sampling import (FAILED_TOKEN, NOT_FINITE, adjust_logits, broadcast_tokens, sample_each,
                                          sampling_failure)
from cptoolkit.inference.speculative import accept
from cptoolkit.parallel_state import ParallelGroups

# A row that failed on the replica's first rank while this rank's own draw succeeded: the broadcast decides.
_FAILED_ON_FIRST_RANK = "sampling failed on the replica's first rank (its log says why)"


class Sampler:
    """Samples ids below ``vocab_size`` (the ids the tokenizer can decode) for this rank's replica (``groups``)."""

    def __init__(self, groups: ParallelGroups, vocab_size: int, device: torch.device):
        self.groups, self.vocab_size, self.device = groups, vocab_size, device

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], dict[int, str]]:
        """One token id per row of ``logits [b, vocab_size]``, the same on every rank of the replica (the first
        rank's, broadcast), and ``{row: error}`` for the rows whose sampling failed there (``FAILED_TOKEN``)."""
        tokens, errors = sample_each(logits[:, :self.vocab_size], [r.sampling for r in requests],
                                     [r.generator for r in requests], [r.prompt_ids for r in requests],
                                     [r.output_ids for r in requests])
        token_ids = self._broadcast(tokens.contiguous()).tolist()
        # A row that failed with no exception here had non-finite probabilities (sample_each): known only now.
        failed = [row for row, token in enumerate(token_ids) if token == FAILED_TOKEN]
        return token_ids, self._failures(failed, errors, NOT_FINITE)

    def verify(self, logits: torch.Tensor, requests: list[Request], drafts: list[list[int]]
               ) -> tuple[list[list[int]], dict[int, str]]:
        """Speculative decoding's acceptance (``speculative.accept``) on ``logits [b, L, vocab]``, row by row (each
        row's draws depend on its acceptances): each row's accepted drafts and one more token (the first rank's,
        broadcast), and ``{row: error}`` for the rows whose acceptance raised there (no tokens)."""
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
        rows = [[token for token in row if token != FAILED_TOKEN] for row in self._broadcast(emitted).tolist()]
        return rows, self._failures([row for row, tokens in enumerate(rows) if not tokens], errors, _FAILED_ON_FIRST_RANK)

    def _broadcast(self, tokens: torch.Tensor) -> torch.Tensor:
        """The replica's first rank's ``tokens``, on every rank of the replica group."""
        if self._replica_size() > 1:
            return broadcast_tokens(tokens, self.groups.replica_group, src=self.groups.replica_first_rank)
        return tokens

    def _replica_size(self) -> int:
        return dist.get_world_size(self.groups.replica_group) if dist.is_initialized() else 1

    def _failures(self, failed: list[int], local_errors: dict[int, str], silent: str) -> dict[int, str]:
        """``{row: error}`` for the ``failed`` rows of the broadcast tokens: this rank's own error where its sampling
        raised too; else, on the replica's first rank (whose tokens these are), ``silent`` (a failure the device
        found), and on the others the first rank's verdict."""
        first = self._replica_size() == 1 or dist.get_rank() == self.groups.replica_first_rank
        return {row: local_errors.get(row, silent if first else _FAILED_ON_FIRST_RANK) for row in failed}
