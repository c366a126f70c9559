"""One rank's server: the engine loop on every rank, plus the HTTP front end on global rank 0.

``serve`` is what ``launch/serve.py`` runs once the engine is built. SIGTERM and SIGINT start a drain
(see ``coordinator``); after it every rank returns normally, so the launcher exits 0.
"""
from __future__ import annotations

import functools
import logging
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from cptoolkit.config import Config
from cptoolkit.distributed import collective_timeout, env_rank
from cptoolkit.inference.engine import Engine
from cptoolkit.moe.layer import expert_load, moe_layers
from cptoolkit.serving.app import HTTPOptions, HTTPServer, create_app
from cptoolkit.serving.coordinator import Coordinator
from cptoolkit.serving.inbox import Inbox
from cptoolkit.serving.metrics import ServerMetrics
from cptoolkit.serving.protocol import LengthLimit

LOG = logging.getLogger("cptoolkit")
# A rank other than 0 that fails waits this long before the launcher ends the job (and, with it,
# rank 0): a peer's death reaches rank 0's next collective within one step, and rank 0 then
# answers 503 to every request in flight before it ends the job itself.
_PEER_FAILURE_GRACE_S = 3.0
_MAX_HEARTBEAT_S = 0.5


def model_name(cfg: Config) -> str:
    """The name ``/v1/models`` lists: the checkpoint directory's, or ``cptoolkit-<arch>`` for the built-in model."""
    return Path(cfg.model.checkpoint).name if cfg.model.checkpoint else f"cptoolkit-{cfg.model.arch}"


def length_limit(engine: Engine) -> LengthLimit:
    """``max_seq_len`` and the most tokens one sequence's KV blocks can take of the whole cache (the
    engine's two length rules; ``blocks_for`` grows with the length, so a bisection finds it)."""
    cache, low, high = engine.cache, 0, engine.max_seq_len
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cache.blocks_for(middle) <= cache.num_blocks else (low, middle - 1)
    return LengthLimit(engine.max_seq_len, low)


def expert_load_of(model) -> Optional[Callable[[], dict[int, list[int]]]]:
    """What ``/metrics`` reads for the per-expert load: None for a dense model (no such metric)."""
    return functools.partial(expert_load, model) if moe_layers(model) else None


def serve(cfg: Config, engine: Engine, host: str, port: int, name: str, drain_timeout_s: float,
          options: HTTPOptions = HTTPOptions()) -> None:
    """Serve until drained. Collective: every rank of the job calls it (it creates the control group)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    timeout = collective_timeout(cfg.runtime)
    # gloo whatever the model's backend: the control messages are small Python objects on the host.
    control_group = dist.new_group(backend="gloo", timeout=timeout) if world_size > 1 else None
    heartbeat_s = min(_MAX_HEARTBEAT_S, timeout.total_seconds() / 4)
    is_front = env_rank() == 0
    inbox = Inbox() if is_front else None
    metrics = ServerMetrics(engine.cache.num_blocks, expert_load_of(engine.model)) if is_front else None
    coordinator = Coordinator(engine, control_group, heartbeat_s, drain_timeout_s, inbox, metrics)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: coordinator.request_drain())
    http = None
    if is_front:
        app = create_app(inbox, engine.tokenizer, metrics, name, length_limit(engine), options)
        http = HTTPServer(app, host, port)
        http.start()
        LOG.info("serving %r at http://%s:%d/v1 (%d ranks; KV cache %d blocks per rank; API key %s); SIGTERM "
                 "drains", name, host, port, world_size, engine.cache.num_blocks,
                 "required on /v1" if options.api_key else "off")
    try:
        coordinator.run()
    except Exception:
        if not is_front:
            time.sleep(_PEER_FAILURE_GRACE_S)
        raise
    if http is not None:
        http.stop()
        LOG.info("drained; every request answered")
