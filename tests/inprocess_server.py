"""A one-rank server inside the test process: the engine of configs/tp1_pcp1_dcp1.yaml (tiny-gqa), the
coordinator's loop in a thread, the app on a free port of 127.0.0.1 — what ``cptoolkit.serving.server.serve``
runs on global rank 0 of a one-rank job, minus the signal handlers. It starts in about a second (no
subprocess, no torchrun), so the serving tests can afford many servers and many requests; a test may
reach into ``engine`` and ``coordinator`` to stall or break the loop.
"""
from __future__ import annotations

import datetime
import json
import threading
from pathlib import Path
from typing import Optional

import httpx
import torch
import torch.distributed as dist
import yaml

from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from cptoolkit.serving.app import HTTPOptions, HTTPServer, create_app
from cptoolkit.serving.coordinator import Coordinator
from cptoolkit.serving.inbox import Inbox
from cptoolkit.serving.metrics import ServerMetrics
from cptoolkit.serving.server import expert_load_of, length_limit
from tests.multiproc import free_port

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-gqa"
HEARTBEAT_S = 0.05


class InProcessServer:
    """Start with ``with InProcessServer(...) as server:``; ``server.url``, ``server.post(...)``. Leaving the
    block drains the loop (or finds it already ended by a failure: ``server.failure``) and frees the port,
    the groups and the process group."""

    def __init__(self, options: HTTPOptions = HTTPOptions(), batch_size: int = 8, max_seq_len: int = 448,
                 drain_timeout_s: float = 5.0, checkpoint: Optional[str] = None):
        """``checkpoint``: another model than tiny-gqa (a directory)."""
        raw = yaml.safe_load((REPO / "configs" / "tp1_pcp1_dcp1.yaml").read_text())
        raw["inference"].update(batch_size=batch_size, max_seq_len=max_seq_len)
        raw["runtime"]["device"] = "cpu"
        if checkpoint is not None:
            raw["model"]["checkpoint"] = checkpoint
        self.cfg = config_from_dict(raw, source="InProcessServer", base_dir=REPO / "configs")
        self.options, self.drain_timeout_s = options, drain_timeout_s
        self.failure: Optional[BaseException] = None

    def __enter__(self) -> "InProcessServer":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
        m = self.cfg.model
        groups = initialize_model_parallel(tp=1, pcp=1, dcp=1, num_heads=m.num_attention_heads,
                                           num_kv_heads=m.num_kv_heads)
        self.engine = build_engine(self.cfg, groups, torch.device("cpu"))
        self.inbox = Inbox()
        self.metrics = ServerMetrics(self.engine.cache.num_blocks, expert_load_of(self.engine.model))
        self.coordinator = Coordinator(self.engine, None, HEARTBEAT_S, self.drain_timeout_s, self.inbox, self.metrics)
        self._loop = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._loop.start()
        app = create_app(self.inbox, self.engine.tokenizer, self.metrics, MODEL, length_limit(self.engine),
                         self.options)
        self.http = HTTPServer(app, "127.0.0.1", free_port())
        self.http.start()
        self.url = f"http://127.0.0.1:{self.http.port}"
        return self

    def _run(self) -> None:
        try:
            self.coordinator.run()
        except BaseException as err:  # noqa: BLE001 - kept for the test to inspect (the loop re-raises)
            self.failure = err

    def __exit__(self, *exc) -> None:
        try:
            self.coordinator.request_drain()
            self._loop.join(timeout=self.drain_timeout_s + 30)
            self.http.stop()
        finally:
            destroy_model_parallel()
            dist.destroy_process_group()

    @property
    def loop_alive(self) -> bool:
        return self._loop.is_alive()

    def join_loop(self, timeout_s: float) -> None:
        """Wait for the engine loop to end (after a failure it first gives the HTTP thread 1 s)."""
        self._loop.join(timeout=timeout_s)

    def post(self, path: str, body: Optional[dict] = None, timeout: float = 60, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=timeout, **kwargs)

    def get(self, path: str, timeout: float = 10, **kwargs) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=timeout, **kwargs)

    def metric(self, name: str) -> float:
        """One unlabelled sample of ``/metrics``."""
        line = next(line for line in self.get("/metrics").text.splitlines() if line.startswith(f"{name} "))
        return float(line.split()[1])


def sse_events(response: httpx.Response) -> list:
    """The ``data:`` payloads of a server-sent-events body: dicts, and the final ``"[DONE]"``."""
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
