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

No process outlives its parent: torchrun is started through ``python -m cptoolkit.torchrun`` (``exec_torchrun``),
which asks the kernel for SIGKILL when the ``cptoolkit`` process dies (``PR_SET_PDEATHSIG``) and then execs
torchrun in place; each rank does the same against torchrun (``end_with_agent``, called first thing by
``cptoolkit.distributed.run_main``). So SIGKILL to ``cptoolkit`` ends torchrun at once, and torchrun's end ends
every rank. A parent-death signal fires when the *thread* that forked the child ends: ``run`` starts torchrun
from its calling thread, which waits for it, and torchrun's agent starts its workers from its main thread.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
AGENT_PID_VARIABLE = "CPTOOLKIT_TORCHRUN_PID"  # torchrun's pid, for its ranks (set by exec_torchrun)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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


def end_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent ends (``prctl(PR_SET_PDEATHSIG)``); if the parent,
    ``parent_pid``, has already ended (this process was reparented before the call), end now."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def end_with_agent() -> None:
    """In a rank that torchrun started (``TORCHELASTIC_RUN_ID`` is set): end with torchrun. torchrun's pid comes
    from ``exec_torchrun``, which closes the race of a torchrun that dies before this call; a rank of a torchrun
    started otherwise takes its parent now. Elsewhere (one rank in the ``cptoolkit`` process): nothing."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        end_with_parent(int(os.environ.get(AGENT_PID_VARIABLE, os.getppid())))


def torchrun_command(module: str, nproc: int, argv: list[str]) -> list[str]:
    """torchrun (through ``exec_torchrun``, bound to this process's life) with ``nproc`` ranks on this machine
    running ``python -m module argv``. ``--log-dir /dev/null``: torchrun would otherwise leave a
    ``torchelastic_*`` folder in the temporary directory on every run; the ranks' output is not redirected."""
    return [sys.executable, "-m", "cptoolkit.torchrun", str(os.getpid()), "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--log-dir", os.devnull,
            "-m", module, *argv]


def exec_torchrun(argv: list[str]) -> None:
    """``python -m cptoolkit.torchrun PARENT_PID TORCHRUN_ARGS...``: end with PARENT_PID, then become
    ``python -m torch.distributed.run TORCHRUN_ARGS...`` (same pid, so the death signal and
    ``AGENT_PID_VARIABLE`` hold for torchrun)."""
    end_with_parent(int(argv[0]))
    os.environ[AGENT_PID_VARIABLE] = str(os.getpid())
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *argv[1:]])


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


if __name__ == "__main__":
    exec_torchrun(sys.argv[1:])
