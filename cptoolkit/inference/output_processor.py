"""The engine's output processor: sampled tokens become request state and ``TokenEvent``s.

For each token: its logprobs (when asked), the output ids, the text (``IncrementalDetokenizer``: O(1) work per
token), then why the request ends (EOS or a stop token, a stop string looked for in the new tail only, or its
length). Everything here is a deterministic function of the broadcast token ids, so a row that raises raises on
every rank alike and ends only its own request (``finish_reason`` ``error``, ``error_status`` 500).
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from cptoolkit.inference.metrics import EngineMetrics
from cptoolkit.inference.request import Request, TokenEvent, TokenLogprob, cut_at_stop, stream_delta
from cptoolkit.inference.sampling import FAILED_TOKEN, top_logprobs

LOG = logging.getLogger("cptoolkit")


class OutputProcessor:
    """Appends tokens to requests; ``tokenizer`` gives ``eos_token_ids`` (its decoding is the detokenizers')."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def append_tokens(self, requests: list[Request], tokens: torch.Tensor, token_logits: torch.Tensor,
                      failures: Optional[dict[int, str]] = None) -> list[TokenEvent]:
        """Append ``tokens [b]`` to their requests; ``token_logits [b, vocab]`` (raw) give the logprobs of the
        requests that asked. Rows in ``failures`` and rows whose logprobs, detokenizing or stop check raise end
        their request with an error (see the module docstring); the others are unaffected."""
        events, now = [], time.perf_counter()
        for row, (request, token) in enumerate(zip(requests, tokens.tolist())):
            if failures and row in failures:
                events.append(self.fail(request, failures[row]))
                continue
            try:
                events.append(self._append_token(request, token, token_logits[row], now))
            except Exception as err:  # one request's fault ends that request, not the batch
                events.append(self.fail(request, f"processing token {token} failed ({type(err).__name__}: {err})"))
        return events

    def append_verified(self, requests: list[Request], drafts: list[list[int]], emitted: torch.Tensor,
                        failures: dict[int, str], logits: torch.Tensor, metrics: EngineMetrics) -> list[TokenEvent]:
        """Append each request's verified tokens (``emitted [b, L]``, ``FAILED_TOKEN`` past them; ``Sampler.verify``)
        in order, stopping at its end; ``logits [b, L, vocab]`` give their logprobs. Counts the drafts, the accepted
        ones and the appended tokens in ``metrics``."""
        events = []
        for row, (request, draft) in enumerate(zip(requests, drafts)):
            metrics.draft_tokens += len(draft)
            if row in failures:
                events.append(self.fail(request, failures[row]))
                continue
            tokens = emitted[row][emitted[row] != FAILED_TOKEN]
            metrics.accepted_draft_tokens += len(tokens) - 1
            for j, token in enumerate(tokens.view(-1, 1)):
                events += self.append_tokens([request], token, logits[row, j:j + 1])
                metrics.decode_tokens += 1
                if request.finish_reason is not None:
                    break
        return events

    def fail(self, request: Request, error: str) -> TokenEvent:
        """End running ``request`` with an internal error (500); the scheduler frees its blocks."""
        LOG.warning("request %d failed and was ended, the others carry on: %s", request.index, error)
        request.finish_reason, request.error, request.error_status = "error", error, 500
        return TokenEvent(request.index, None, "", "error", request.request_id)

    def _append_token(self, request: Request, token: int, logits: torch.Tensor, now: float) -> TokenEvent:
        logprob = self._logprob(logits, torch.tensor(token), request)
        if logprob is not None:
            request.output_logprobs.append(logprob)
        request.output_ids.append(token)
        request.token_times_s.append(now)
        changed_from = request.detokenizer.append(token)
        request.text = request.detokenizer.text
        request.finish_reason = self._finish_reason(request, token, changed_from)
        if request.finish_reason == "stop":
            request.text = cut_at_stop(request.text, request.sampling.stop_strings)
        return TokenEvent(request.index, token, stream_delta(request), request.finish_reason, request.request_id,
                          logprob)

    @staticmethod
    def _logprob(logits: torch.Tensor, token: torch.Tensor, request: Request) -> Optional[TokenLogprob]:
        """``token``'s ``TokenLogprob`` under ``logits [vocab]`` if the request asked for logprobs."""
        num_top = request.sampling.logprobs
        if num_top is None:
            return None
        chosen, top_values, top_ids = top_logprobs(logits.unsqueeze(0), token, num_top)
        return TokenLogprob(int(token), float(chosen[0]), tuple(zip(top_ids[0].tolist(), top_values[0].tolist())))

    def _finish_reason(self, request: Request, token: int, changed_from: int) -> Optional[str]:
        """Why ``request`` ends after ``token`` (None: it goes on). Its text may have changed from offset
        ``changed_from`` only, so a stop string is looked for in that tail and the ``len(stop) - 1`` characters
        before it."""
        if (token in self.tokenizer.eos_token_ids and not request.sampling.ignore_eos) \
                or token in request.sampling.stop_token_ids:
            return "eos"
        if any(stop in request.text[max(changed_from - len(stop) + 1, 0):]
               for stop in request.sampling.stop_strings):
            return "stop"
        if len(request.output_ids) >= request.sampling.max_new_tokens:
            return "length"
        return None
