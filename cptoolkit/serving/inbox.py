"""Global rank 0's front door between the HTTP thread and the engine loop.

The HTTP handlers (an asyncio loop in uvicorn's thread) ``submit`` requests and ``cancel`` them; the
coordinator (the main thread) ``take``s everything that arrived since its last iteration, in arrival
order, and sends each request's updates back into the request's own ``asyncio.Queue`` with
``deliver`` (thread-safe). Closing the door (a drain) or failing it (the engine died) makes
every later ``submit`` an ``APIError`` 503. The coordinator calls ``take`` once per iteration of its
loop, so the time since the last ``take`` (``stalled_s``) says whether the loop is making progress.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from cptoolkit.inference.request import GenerationResult, TokenEvent
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.serving.protocol import APIError


@dataclass(frozen=True)
class Finished:
    """One choice's last update: its final event and its result (``result.error`` for a rejected one).
    The choice is ``event.request_index`` (= ``result.request_index``), ``0 .. num_choices - 1``."""

    event: TokenEvent
    result: GenerationResult


Update = Union[TokenEvent, Finished, APIError]


@dataclass
class Submission:
    """One prompt of an HTTP request on its way through the engine, sampled ``num_choices`` times (its
    ``n``). ``key`` is the server-wide id that every rank knows it by; ``request_key`` is the key of its
    HTTP request's first prompt (what the coordinator's fair admission takes turns between);
    ``updates`` receives, per choice, a ``TokenEvent`` per token (``request_index`` is the choice) then
    one ``Finished``; or an ``APIError`` 503 when the server fails or drains it away."""

    key: int
    request_key: int
    prompt_ids: list[int]
    sampling: SamplingParams
    num_choices: int
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival_s: float = field(default_factory=time.perf_counter)


def deliver(updates: Sequence[tuple[Submission, Update]]) -> None:
    """Put each update into its request's queue, on the HTTP event loop (one wake-up for the whole
    batch); safe from any thread. If the loop has closed (the HTTP server stopped), nobody is
    listening and the updates are dropped."""
    if not updates:
        return

    def hand_over():
        for submission, update in updates:
            submission.updates.put_nowait(update)

    try:
        updates[0][0].loop.call_soon_threadsafe(hand_over)  # one loop serves every request
    except RuntimeError:
        pass


class Inbox:
    """Submissions and cancellations from the HTTP side, taken in arrival order by the coordinator."""

    def __init__(self):
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._new: list[Submission] = []
        self._cancelled: list[int] = []
        self._keys = itertools.count()
        self._refusal: Optional[APIError] = None
        self._taken_s = time.monotonic()  # when the coordinator last called take

    @property
    def refusal(self) -> Optional[APIError]:
        """Why new requests are refused (draining or failed), or ``None`` while the door is open."""
        return self._refusal

    def submit(self, prompts_ids: Sequence[list[int]], sampling: Sequence[SamplingParams], num_choices: int
               ) -> list[Submission]:
        """Queue one request's prompts for the engine, each with its ``SamplingParams`` (call from the
        handler's event loop): all of them, or none and the refusal (503) once the door is closed."""
        with self._lock:
            if self._refusal is not None:
                raise self._refusal
            loop = asyncio.get_running_loop()
            keys = [next(self._keys) for _ in prompts_ids]
            submissions = [Submission(key, keys[0], ids, params, num_choices, loop)
                           for key, ids, params in zip(keys, prompts_ids, sampling, strict=True)]
            self._new.extend(submissions)
            self._arrived.notify()
        return submissions

    def cancel(self, keys: Sequence[int]) -> None:
        """Cancel these submissions (every choice of each)."""
        with self._lock:
            self._cancelled.extend(keys)
            self._arrived.notify()

    def take(self, wait_s: float) -> tuple[list[Submission], list[int]]:
        """Everything that arrived since the last call: ``(new submissions, cancelled keys)``. With
        nothing there, waits up to ``wait_s`` for something to arrive."""
        with self._lock:
            self._taken_s = time.monotonic()
            if not self._new and not self._cancelled and wait_s > 0:
                self._arrived.wait(wait_s)
            new, cancelled = self._new, self._cancelled
            self._new, self._cancelled = [], []
        return new, cancelled

    def stalled_s(self) -> float:
        """Seconds since the coordinator last called ``take`` (it waits there at most its heartbeat when idle)."""
        return time.monotonic() - self._taken_s

    def close(self, refusal: APIError) -> None:
        """Refuse every later ``submit`` with ``refusal``; what is already queued still gets taken."""
        with self._lock:
            self._refusal = self._refusal or refusal
