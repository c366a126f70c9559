"""The engine's output processor: sampled tokens become request state and ``TokenEvent``s.

For each token: its logprobs (when asked; one batched op for the step's rows that asked), the output ids, the text (``IncrementalDetokenizer``: O(1) work per
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
from cptoolkit.inference.sampling import top_logprobs

LOG = logging.getLogger("cptoolkit")


class OutputProcessor:
    """Appends tokens to requests; ``tokenizer`` gives ``eos_token_ids`` (its decoding is the detokenizers')."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def append_tokens(self, requests: list[Request], token_ids: list[int], token_logits: torch.Tensor,
                      failures: Optional[dict[int, str]] = None) -> list[TokenEvent]:
        """Append ``token_ids [b]`` to their requests; ``token_logits [b, vocab]`` (raw) give the logprobs of the
        requests that asked, all in one batched op. Rows in ``failures`` and rows whose logprobs, detokenizing or
        stop check raise end their request with an error (see the module docstring); the others are unaffected."""
        failures = failures or {}
        logprobs, errors = self._logprobs(requests, token_ids, token_logits, failures)
        events, now = [], time.perf_counter()
        for row, (request, token) in enumerate(zip(requests, token_ids)):
            if row in failures or row in errors:
                events.append(self.fail(request, failures.get(row) or errors[row]))
                continue
            try:
                events.append(self._append_token(request, token, logprobs.get(row), now))
            except Exception as err:  # one request's fault ends that request, not the batch
                events.append(self.fail(request, _processing_failure(token, err)))
        return events

    def append_verified(self, requests: list[Request], drafts: list[list[int]], emitted: list[list[int]],
                        failures: dict[int, str], logits: torch.Tensor, metrics: EngineMetrics) -> list[TokenEvent]:
        """Append each request's verified tokens (``emitted``: ``Sampler.verify``'s accepted drafts and one more token)
        in order, stopping at its end; ``logits [b, L, vocab]`` give their logprobs. Counts the drafts, the accepted
        ones and the appended tokens in ``metrics``."""
        events = []
        for row, (request, draft, tokens) in enumerate(zip(requests, drafts, emitted)):
            metrics.draft_tokens += len(draft)
            if row in failures:
                events.append(self.fail(request, failures[row]))
                continue
            metrics.accepted_draft_tokens += len(tokens) - 1
            for j, token in enumerate(tokens):
                events += self.append_tokens([request], [token], logits[row, j:j + 1])
                metrics.decode_tokens += 1
                if request.finish_reason is not None:
                    break
        return events

    def fail(self, request: Request, error: str) -> TokenEvent:
        """End running ``request`` with an internal error (500); the scheduler frees its blocks."""
        LOG.warning("request %d failed and was ended, the others carry on: %s", request.index, error)
        request.finish_reason, request.error, request.error_status = "error", error, 500
        return TokenEvent(request.index, None, "", "error", request.request_id)

    def _append_token(self, request: Request, token: int, logprob: Optional[TokenLogprob], now: float) -> TokenEvent:
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
    def _logprobs(requests: list[Request], token_ids: list[int], logits: torch.Tensor, failures: dict[int, str]
                  ) -> tuple[dict[int, TokenLogprob], dict[int, str]]:
        """``({row: TokenLogprob}, {row: error})`` for the rows whose request asked for logprobs: one batched
        ``top_logprobs`` over them (``logits [b, vocab]``, raw); if it raises, each row alone, so that only the rows
        that raise alone fail."""
        rows = [row for row, r in enumerate(requests) if r.sampling.logprobs is not None and row not in failures]
        try:
            return _token_logprobs(rows, requests, token_ids, logits), {}
        except Exception:  # one request's fault ends that request, not the batch: find it
            pass
        logprobs, errors = {}, {}
        for row in rows:
            try:
                logprobs.update(_token_logprobs([row], requests, token_ids, logits))
            except Exception as err:  # noqa: BLE001 - this row's fault, reported in its error
                errors[row] = _processing_failure(token_ids[row], err)
        return logprobs, errors

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


def _token_logprobs(rows: list[int], requests: list[Request], token_ids: list[int], logits: torch.Tensor
                    ) -> dict[int, TokenLogprob]:
    """``{row: TokenLogprob}`` of ``rows``: the chosen tokens' log-probabilities and each row's
    ``sampling.logprobs`` best alternatives, from one ``top_logprobs`` call (``logits [b, vocab]``)."""
    if not rows:
        return {}
    num_top = max(requests[row].sampling.logprobs for row in rows)
    chosen = torch.tensor([token_ids[row] for row in rows], device=logits.device)
    chosen_logprob, top_values, top_ids = (t.tolist() for t in top_logprobs(logits[rows], chosen, num_top))
    return {row: TokenLogprob(token_ids[row], chosen_logprob[i],
                              tuple(zip(top_ids[i], top_values[i]))[:requests[row].sampling.logprobs])
            for i, row in enumerate(rows)}


def _processing_failure(token: int, err: Exception) -> str:
    return f"processing token {token} failed ({type(err).__name__}: {err})"
