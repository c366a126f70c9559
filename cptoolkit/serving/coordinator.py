"""The serving loop every rank of the replica runs in lock step.

The engine has no collective of its own to agree on what to do next: every rank must call
``add_request`` / ``cancel`` / ``step`` identically. So each iteration global rank 0 decides, and
tells the others:

1. rank 0 takes what its ``Inbox`` received since the last iteration, decides which sequences to hand
   to the engine now (fair admission, below: each with its token ids and ``SamplingParams``, seeds
   included), which to cancel and whether to stop, as ``Orders``;
2. one ``broadcast_object_list`` of the ``Orders`` from rank 0 on the control group (gloo, every rank
   of the replica, so it works beside NCCL and never spins a GPU while idle);
3. every rank applies them in order (``add_request`` / ``cancel``), then, with work left, ``step``s;
4. every rank collects the results of the requests that finished (so no rank keeps them); rank 0
   also sends each ``TokenEvent`` to its HTTP request.

Requests are known to every rank by the ``Submission.key`` rank 0 gave them; each rank maps keys to
its engine's request ids, which agree because the calls do. A submission with ``n`` choices is ``n``
engine requests (sequences): choice 0 as submitted, choices ``1 .. n-1`` reusing its prompt's cache
pages (``prompt_source``, while choice 0 is still in the engine) and scoring nothing of the prompt again
(choice 0's prompt logprobs are the prompt's). With nothing to do rank 0 waits for the inbox up to
``heartbeat_s`` before broadcasting empty ``Orders``, so idle ranks sleep in the broadcast instead of
spinning, and no broadcast waits anywhere near the collective timeout.

Fair admission (rank 0): the engine admits its waiting requests first come, first served, so rank 0
keeps each HTTP request's sequences until their turn and hands them over round-robin, one sequence per
HTTP request per turn, keeping at most ``engine.max_batch_size`` handed-over sequences that have not
started (no event yet: waiting in the engine or still prefilling). Bound: a request arriving while ``R``
other requests have sequences waiting here has its first sequence handed over after at most ``R`` others
(one round), and it then waits behind at most ``max_batch_size`` started-before sequences in the engine's
queue: so it starts once at most ``R + max_batch_size`` sequences have started before it, whatever the
size of the requests before it (a 1024-sequence request delays it by one sequence per round, not 1024).
Sequences that wait here were never given to the engine: cancelling them (a client left, a drain ran out
of time) only drops them, on rank 0.

Drain (``request_drain``, from SIGTERM): rank 0 closes the inbox (later requests: 503), lets the
requests in flight finish, cancels whatever is left after ``drain_timeout_s``, then broadcasts
``stop`` and every rank returns. A failure (a peer died, a collective timed out) fails every request
in flight with a 503 on rank 0 and is re-raised, for the launcher to end the job.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from cptoolkit.inference.engine import Engine
from cptoolkit.inference.request import TokenEvent
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.serving.inbox import Finished, Inbox, Submission, Update, deliver
from cptoolkit.serving.metrics import ServerMetrics
from cptoolkit.serving.protocol import APIError

LOG = logging.getLogger("cptoolkit")
# Time for the HTTP thread to write the 503s of a failed server before the process ends.
_FAILURE_FLUSH_S = 1.0


@dataclass(frozen=True)
class NewSequence:
    """One choice of a submission, handed to the engine (choice 0's ``sampling`` is the submission's)."""

    key: int
    choice: int
    prompt_ids: list[int]
    sampling: SamplingParams


@dataclass(frozen=True)
class Orders:
    """What rank 0 broadcasts before every iteration; every rank applies it identically."""

    new: tuple[NewSequence, ...] = ()
    cancel: tuple[int, ...] = ()  # keys
    stop: bool = False


class Coordinator:
    """One rank's side of the lock-step loop. ``inbox`` and ``metrics`` are given on global rank 0
    only (the rank that serves HTTP); ``control_group`` spans the replica (``None`` at one rank)."""

    def __init__(self, engine: Engine, control_group: Optional[dist.ProcessGroup], heartbeat_s: float,
                 drain_timeout_s: float, inbox: Optional[Inbox] = None, metrics: Optional[ServerMetrics] = None):
        self.engine, self.control_group = engine, control_group
        self.heartbeat_s, self.drain_timeout_s = heartbeat_s, drain_timeout_s
        self.inbox, self.metrics = inbox, metrics
        self._engine_ids: dict[int, dict[int, int]] = {}  # key -> choice -> unfinished engine request id (every rank)
        self._keys: dict[int, int] = {}              # engine request id -> key (every rank)
        self._submissions: dict[int, Submission] = {}   # key -> submission (rank 0)
        self._open_choices: dict[int, int] = {}         # key -> choices not finished yet (rank 0)
        # request_key -> its (submission, choice) not handed over yet, in order (rank 0)
        self._waiting: dict[int, deque[tuple[Submission, int]]] = {}
        self._turns: deque[int] = deque()               # request_keys with waiting sequences, next turn first (rank 0)
        self._unstarted: set[tuple[int, int]] = set()   # (key, choice) handed over, no event yet (rank 0)
        self._last_token_s: dict[tuple[int, int], float] = {}  # (key, choice) -> when its last token was routed
        self._drain_requested = False
        self._drain_deadline: Optional[float] = None

    def request_drain(self) -> None:
        """Start a drain at the next iteration. Only sets a flag, so a signal handler may call it; on
        ranks other than 0 it does nothing (rank 0 decides for the replica)."""
        self._drain_requested = True

    def run(self) -> None:
        """Serve until rank 0 orders a stop (after a drain)."""
        try:
            while True:
                orders = self._exchange(self._decide() if self.inbox is not None else None)
                self._apply(orders)
                if orders.stop:
                    return
                updates = self._collect(self.engine.step()) if self.engine.has_unfinished_requests() else []
                if self.inbox is not None:
                    # The gauges first: a client that has seen this step's tokens sees its KV blocks too.
                    cache = self.engine.cache
                    self.metrics.engine_state(len(self._engine_ids), cache.num_blocks - cache.num_free_blocks,
                                              cache.pool.num_cached_pages, self.engine.metrics.draft_tokens,
                                              self.engine.metrics.accepted_draft_tokens,
                                              sum(map(len, self._waiting.values())))
                    deliver([self._route(key, event, finished) for key, event, finished in updates])
        except BaseException as err:
            if self.inbox is not None:
                first_line = (str(err).splitlines() or [""])[0]
                self._fail_in_flight(f"the engine failed ({type(err).__name__}: {first_line})")
            raise

    # ------------------------------------------------------------------ rank 0
    def _decide(self) -> Orders:
        if self._drain_requested and self._drain_deadline is None:
            self.inbox.close(APIError(503, "the server is shutting down: not accepting new requests"))
            self._drain_deadline = time.monotonic() + self.drain_timeout_s
            LOG.info("draining: %d requests in flight, new requests refused", len(self._submissions))
        draining = self._drain_deadline is not None
        idle = not self.engine.has_unfinished_requests() and not self._turns
        new, cancelled = self.inbox.take(self.heartbeat_s if idle and not draining else 0.0)
        for submission in new:
            self._submissions[submission.key] = submission
            self._open_choices[submission.key] = submission.num_choices
            if submission.request_key not in self._waiting:
                self._waiting[submission.request_key] = deque()
                self._turns.append(submission.request_key)
            self._waiting[submission.request_key].extend((submission, c) for c in range(submission.num_choices))
        if draining and time.monotonic() > self._drain_deadline:
            cancelled += [key for key in self._submissions if key not in cancelled]
        self._drop_waiting(set(cancelled))
        stop = draining and idle and not new and not self._submissions
        return Orders(self._hand_over(), tuple(cancelled), stop)

    def _hand_over(self) -> tuple[NewSequence, ...]:
        """The sequences to give the engine now: round-robin over the HTTP requests with waiting
        sequences, one each per turn, while fewer than ``max_batch_size`` handed-over sequences have not
        started (see the module docstring for the bound this gives)."""
        handed = []
        while self._turns and len(self._unstarted) < self.engine.max_batch_size:
            request_key = self._turns.popleft()
            submission, choice = self._waiting[request_key].popleft()
            handed.append(NewSequence(submission.key, choice, submission.prompt_ids, submission.sampling))
            self._unstarted.add((submission.key, choice))
            if self._waiting[request_key]:
                self._turns.append(request_key)
            else:
                del self._waiting[request_key]
        return tuple(handed)

    def _drop_waiting(self, keys: set[int]) -> None:
        """Cancel the sequences of ``keys`` that were never handed over: they end here (the others are
        cancelled in the engine, by the orders); a drain's cancellation is answered 503."""
        if not keys:
            return
        dropped: dict[int, int] = {}
        for request_key in list(self._waiting):
            kept = deque(item for item in self._waiting[request_key] if item[0].key not in keys)
            for submission, _ in self._waiting[request_key]:
                if submission.key in keys:
                    dropped[submission.key] = dropped.get(submission.key, 0) + 1
            if kept:
                self._waiting[request_key] = kept
            else:
                del self._waiting[request_key]
                self._turns.remove(request_key)
        updates = []
        for key, count in dropped.items():
            submission = self._submissions[key]
            for _ in range(count):
                self.metrics.request_finished("cancelled", 0, 0)
            self._open_choices[key] -= count
            if not self._open_choices[key]:
                del self._submissions[key], self._open_choices[key]
            updates.append((submission, APIError(503, "the request was cancelled: the server is shutting down")))
        deliver(updates)

    def _route(self, key: int, event: TokenEvent, finished: Optional[Finished]) -> tuple[Submission, Update]:
        """The update ``event`` makes for its HTTP request; counts its token and, when a choice ends, the
        engine request (the submission is done when its last choice is)."""
        submission, choice = self._submissions[key], (key, event.request_index)
        self._unstarted.discard(choice)
        if event.token_id is not None:
            now = time.perf_counter()
            last = self._last_token_s.get(choice)
            self.metrics.token(last is None, now - (submission.arrival_s if last is None else last))
            self._last_token_s[choice] = now
        if finished is None:
            return submission, event
        self._open_choices[key] -= 1
        if not self._open_choices[key]:
            del self._submissions[key], self._open_choices[key]
        self._last_token_s.pop(choice, None)
        result = finished.result
        self.metrics.request_finished(result.finish_reason, len(result.prompt_token_ids),
                                      result.metrics.cached_prompt_tokens if result.metrics else 0)
        if result.finish_reason == "cancelled":
            return submission, APIError(503, "the request was cancelled: the server is shutting down")
        return submission, finished

    def _fail_in_flight(self, reason: str) -> None:
        """Answer every request in flight, and every later one, with a 503; give the HTTP thread a
        moment to write them before the launcher ends the process."""
        LOG.error("%s; answering 503 to %d requests in flight", reason, len(self._submissions))
        self.inbox.close(APIError(503, reason))
        new, _ = self.inbox.take(0.0)
        deliver([(submission, APIError(503, reason)) for submission in [*self._submissions.values(), *new]])
        self._submissions.clear()
        self._open_choices.clear()
        self._waiting.clear()
        self._turns.clear()
        time.sleep(_FAILURE_FLUSH_S)

    # ------------------------------------------------------------------ every rank
    def _exchange(self, orders: Optional[Orders]) -> Orders:
        """Rank 0's ``orders`` on every rank: one ``broadcast_object_list`` on the control group."""
        if self.control_group is None:
            return orders
        box = [orders]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def _apply(self, orders: Orders) -> None:
        for new in orders.new:
            # index = the choice: choice 0's sampler is seeded by the seed alone, so it draws the same
            # tokens as the same prompt and seed through Engine.generate, whatever else runs; choice j as
            # Engine.generate's request j would. A sibling shares choice 0's prompt pages while choice 0 is
            # in the engine (the same on every rank: every rank saw the same events); else it prefills its own.
            choices = self._engine_ids.setdefault(new.key, {})
            sampling, source = new.sampling, None
            if new.choice > 0:
                sampling, source = dataclasses.replace(new.sampling, prompt_logprobs=None), choices.get(0)
            request_id = self.engine.add_request(new.prompt_ids, sampling, index=new.choice, prompt_source=source)
            choices[new.choice] = request_id
            self._keys[request_id] = new.key
        for key in orders.cancel:
            for request_id in self._engine_ids.get(key, {}).values():
                self.engine.cancel(request_id)

    def _collect(self, events: list[TokenEvent]) -> list[tuple[int, TokenEvent, Optional[Finished]]]:
        """``(key, event, Finished or None)`` per event; the results of finished requests are taken
        from the engine on every rank, so that no rank keeps them."""
        updates = []
        for event in events:
            key, finished = self._keys[event.request_id], None
            if event.finish_reason is not None:
                finished = Finished(event, self.engine.result(event.request_id))
                del self._keys[event.request_id]
                del self._engine_ids[key][event.request_index]
                if not self._engine_ids[key]:
                    del self._engine_ids[key]
            updates.append((key, event, finished))
        return updates
