"""Run a job's ranks under torchrun from a parent process that owns SIGTERM and SIGINT (Linux).

torchrun treats a signal it receives as the job's failure: its agent raises ``SignalException``, sends that
signal to the workers, waits for them and exits 1 whatever they then do
(``torch.distributed.elastic.agent.server.api.SimpleElasticAgent.run``, ``launcher.api.launch_agent``). A
server's ranks drain on SIGTERM and exit 0, so the signal must reach the ranks, not torchrun: ``run`` starts
torchrun in a session of its own (a terminal's Ctrl-C reaches this process alone; torchrun already starts each
worker in its own session) and forwards SIGTERM and SIGINT to torchrun's children, the workers. torchrun then
sees its workers end on their own terms, and its exit status is the job's: 0 when every rank exited 0 (a
drained server), 1 when one failed — a job that does not handle the signal (``generate``, ``train``) dies of it,
which torchrun reports as a failure. A signal that comes before the workers exist goes to torchrun itself.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children(pid: int) -> list[int]:
    """The child processes of ``pid``, started by any of its threads (``/proc/<pid>/task/*/children``)."""
    found: list[int] = []
    for children_file in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):  # a thread or the process ended meanwhile
            found += [int(child) for child in children_file.read_text().split()]
    return found


def torchrun_command(module: str, nproc: int, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run`` with ``nproc`` ranks on this machine running ``python -m module argv``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), "-m", module, *argv]


def _forward_to_workers(torchrun: subprocess.Popen):
    def forward(signum: int, _frame) -> None:
        for pid in children(torchrun.pid) or [torchrun.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
    return forward


def run(module: str, nproc: int, argv: list[str]) -> int:
    """Run ``module`` on ``nproc`` ranks under torchrun until it ends, forwarding SIGTERM and SIGINT to the ranks;
    torchrun's exit status (128 + the signal if torchrun itself was killed). ``OMP_NUM_THREADS`` defaults to 1
    per rank, as torchrun would set it (with a warning) for several processes."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    torchrun = subprocess.Popen(torchrun_command(module, nproc, argv), env=env, start_new_session=True)
    previous = {signum: signal.signal(signum, _forward_to_workers(torchrun)) for signum in FORWARDED_SIGNALS}
    try:
        code = torchrun.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code if code >= 0 else 128 - code
