"""The server's counters, gauges and latency histograms, rendered as Prometheus text (``GET /metrics``).

Written by the coordinator (main thread) and the HTTP handlers, read by ``/metrics``: one lock keeps
each scrape consistent. Latencies are measured on global rank 0 from the moment the HTTP handler
queued the request, so time to first token includes the wait for a free batch slot or KV blocks.
"""
from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import Callable, Optional, Sequence

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are exposed."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, count in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return lines + [f"{name}_sum {self.sum!r}", f"{name}_count {cumulative}"]


def _labels(pairs: tuple) -> str:
    return "{" + ",".join(f'{key}="{value}"' for key, value in pairs) + "}" if pairs else ""


class ServerMetrics:
    """Everything ``/metrics`` exposes; names carry the ``cptoolkit_`` prefix and their unit."""

    def __init__(self, kv_blocks_total: int, expert_load: Optional[Callable[[], dict[int, list[int]]]] = None):
        """``expert_load``: the engine's routed-expert load so far, ``{layer: tokens per expert}`` (its MoE
        layers' ``expert_tokens``); read at each scrape (the counts only grow, so a scrape racing a step reads
        a consistent-enough snapshot: each count is one step behind at most)."""
        self._lock = threading.Lock()
        self._expert_load = expert_load
        self.http_responses: Counter = Counter()   # (endpoint, status) -> count
        self.finished: Counter = Counter()         # finish_reason -> count
        self.prompt_tokens = self.generation_tokens = self.prefix_cache_hit_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.itl = Histogram(ITL_BUCKETS_S)
        self.kv_blocks_total, self.kv_blocks_used, self.prefix_cached_pages = kv_blocks_total, 0, 0
        self.requests_in_engine = self.sequences_waiting = 0
        self.draft_tokens = self.accepted_draft_tokens = 0

    def http_response(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.http_responses[(endpoint, status)] += 1

    def token(self, first_token: bool, latency_s: float) -> None:
        """A generated token: ``latency_s`` is the time to first token or the gap since the last one."""
        with self._lock:
            self.generation_tokens += 1
            (self.ttft if first_token else self.itl).observe(latency_s)

    def request_finished(self, finish_reason: str, prompt_tokens: int, prefix_cache_hit_tokens: int) -> None:
        with self._lock:
            self.finished[finish_reason] += 1
            if finish_reason != "error":
                self.prompt_tokens += prompt_tokens
                self.prefix_cache_hit_tokens += prefix_cache_hit_tokens

    def engine_state(self, requests_in_engine: int, kv_blocks_used: int, prefix_cached_pages: int,
                     draft_tokens: int = 0, accepted_draft_tokens: int = 0, sequences_waiting: int = 0) -> None:
        """The engine's gauges, its speculative-decoding totals so far (drafts verified, accepted), and the
        sequences the coordinator holds back for their turn (fair admission)."""
        with self._lock:
            self.requests_in_engine, self.kv_blocks_used = requests_in_engine, kv_blocks_used
            self.sequences_waiting = sequences_waiting
            self.prefix_cached_pages = prefix_cached_pages
            self.draft_tokens, self.accepted_draft_tokens = draft_tokens, accepted_draft_tokens

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        with self._lock:
            families = [
                ("http_responses_total", "counter", "HTTP responses by endpoint and status",
                 [((("endpoint", e), ("status", s)), n) for (e, s), n in sorted(self.http_responses.items())]),
                ("requests_finished_total", "counter", "Requests the engine finished, by finish reason",
                 [((("finish_reason", r),), n) for r, n in sorted(self.finished.items())]),
                ("prompt_tokens_total", "counter", "Prompt tokens of served requests", [((), self.prompt_tokens)]),
                ("generation_tokens_total", "counter", "Generated tokens", [((), self.generation_tokens)]),
                ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache",
                 [((), self.prefix_cache_hit_tokens)]),
                ("spec_decode_draft_tokens_total", "counter", "Speculative draft tokens verified",
                 [((), self.draft_tokens)]),
                ("spec_decode_accepted_tokens_total", "counter", "Speculative draft tokens accepted",
                 [((), self.accepted_draft_tokens)]),
                ("requests_in_engine", "gauge", "Requests waiting or running in the engine",
                 [((), self.requests_in_engine)]),
                ("sequences_waiting", "gauge", "Sequences of accepted requests waiting for their turn to enter the "
                 "engine (fair admission)", [((), self.sequences_waiting)]),
                ("kv_blocks_used", "gauge", "KV-cache blocks held by requests (per rank)",
                 [((), self.kv_blocks_used)]),
                ("kv_blocks_total", "gauge", "KV-cache blocks (per rank)", [((), self.kv_blocks_total)]),
                ("prefix_cache_pages", "gauge", "Prompt pages kept in the prefix cache",
                 [((), self.prefix_cached_pages)]),
            ]
            if self._expert_load is not None:
                families.append(("moe_expert_tokens_total", "counter",
                                 "Tokens routed to each expert of each MoE layer (each of a token's top-k choices "
                                 "counts once), the replica's whole load",
                                 [((("layer", layer), ("expert", expert)), count)
                                  for layer, counts in sorted(self._expert_load().items())
                                  for expert, count in enumerate(counts)]))
            lines = []
            for name, kind, help_text, samples in families:
                lines += [f"# HELP cptoolkit_{name} {help_text}", f"# TYPE cptoolkit_{name} {kind}"]
                lines += [f"cptoolkit_{name}{_labels(labels)} {value}" for labels, value in samples]
            for name, help_text, histogram in [
                    ("time_to_first_token_seconds", "From queued to first token", self.ttft),
                    ("inter_token_latency_seconds", "Gap between a request's consecutive tokens", self.itl)]:
                lines += [f"# HELP cptoolkit_{name} {help_text}", f"# TYPE cptoolkit_{name} histogram"]
                lines += histogram.lines(f"cptoolkit_{name}")
        return "\n".join(lines) + "\n"
