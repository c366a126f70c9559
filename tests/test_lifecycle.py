"""No process outlives its job: ``cptoolkit serve`` on two ranks (tiny-gqa, TP=2) whose parent or torchrun is
SIGKILLed leaves no torchrun, no rank and no temporary file; start-up waits for a late rank up to
``runtime.startup_timeout_s``, not ``collective_timeout_s``; a stopped rank ends the job within the collective
timeout."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cptoolkit.config import ConfigError, config_from_dict
from cptoolkit.torchrun import children
from tests.multiproc import free_port

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("cptoolkit"))
GONE_WITHIN_S = 10  # the bound on "every process of the job has ended" after a SIGKILL
COLLECTIVE_TIMEOUT_S = 3
LATE_RANK_S = 6  # longer than COLLECTIVE_TIMEOUT_S: start-up must wait for it anyway


def _identity(pid: int) -> tuple[int, str] | None:
    """``(pid, start time)`` of a live process (a zombie has ended), or None."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else (pid, fields[19])
    return None


def _alive(identities: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return [identity for identity in identities if _identity(identity[0]) == identity]


class ServeJob:
    """``cptoolkit serve`` on two ranks with its own temporary directory; remembers every process of the job
    (the command, torchrun, the ranks) by pid and start time, so that ``kill_all`` ends exactly those."""

    def __init__(self, tmp_path: Path, runtime: dict):
        raw = yaml.safe_load((REPO / "configs" / "tp1_pcp1_dcp1.yaml").read_text())
        raw["model"]["checkpoint"] = str(REPO / "checkpoints" / "tiny-gqa")
        raw["runtime"].update(runtime)
        config = tmp_path / "serve.yaml"
        config.write_text(yaml.safe_dump(raw))
        self.tmpdir, self.log, self.port = tmp_path / "tmp", tmp_path / "serve.log", free_port()
        self.tmpdir.mkdir()
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [CLI, "serve", "--config", str(config), "-tp", "2", "--max-num-seqs", "2", "--port", str(self.port)],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                # torch's compile cache is meant to outlive jobs: kept out of the folder that must end empty
                env={**os.environ, "TMPDIR": str(self.tmpdir), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
        self.processes = [_identity(self.process.pid)]

    def wait_for_ranks(self, timeout_s: float = 60) -> tuple[int, list[int]]:
        """torchrun's pid and its two ranks' (rank order), as soon as both ranks exist."""
        deadline = time.monotonic() + timeout_s
        while True:
            torchrun = children(self.process.pid)
            ranks = children(torchrun[0]) if torchrun else []
            if len(ranks) == 2:
                self.processes += [identity for identity in map(_identity, [torchrun[0], *ranks]) if identity]
                return torchrun[0], ranks
            assert self.process.poll() is None and time.monotonic() < deadline, self.tail()
            time.sleep(0.02)

    def wait_until_healthy(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            assert self.process.poll() is None and time.monotonic() < deadline, self.tail()
            time.sleep(0.2)

    def wait_until_gone(self, timeout_s: float) -> float:
        """Seconds until no process of the job is left; fails naming the survivors after ``timeout_s``."""
        start = time.monotonic()
        while _alive(self.processes):
            survivors = {pid: Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:120]
                         for pid, _ in _alive(self.processes)}
            assert time.monotonic() - start < timeout_s, f"alive {timeout_s} s after the kill: {survivors}"
            time.sleep(0.05)
        return time.monotonic() - start

    def kill_all(self) -> None:
        for pid, _ in _alive(self.processes):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGCONT)
        self.process.wait()

    def tail(self) -> str:
        return self.log.read_text()[-4000:]


@pytest.fixture
def serve_job(tmp_path, request):
    job = ServeJob(tmp_path, getattr(request, "param", {}))
    try:
        yield job
    finally:
        job.kill_all()


def test_startup_timeout_is_validated_naming_field_value_and_rule():
    with pytest.raises(ConfigError, match=r"^<dict>: runtime.startup_timeout_s = 0.0: must be > 0$"):
        config_from_dict({"runtime": {"startup_timeout_s": 0}, "inference": {}})
    assert config_from_dict({"inference": {}}).runtime.startup_timeout_s == 300


def test_sigkill_to_the_cptoolkit_process_ends_torchrun_and_every_rank_and_leaves_no_file(serve_job):
    serve_job.wait_for_ranks()
    serve_job.wait_until_healthy()
    serve_job.process.kill()
    took = serve_job.wait_until_gone(GONE_WITHIN_S)
    assert list(serve_job.tmpdir.iterdir()) == [], "left in TMPDIR"
    print(f"parent SIGKILL: every process gone after {took:.2f} s")


def test_sigkill_to_torchrun_ends_every_rank(serve_job):
    torchrun, _ = serve_job.wait_for_ranks()
    serve_job.wait_until_healthy()
    os.kill(torchrun, signal.SIGKILL)
    took = serve_job.wait_until_gone(GONE_WITHIN_S)
    assert serve_job.process.wait() == 128 + signal.SIGKILL, serve_job.tail()
    print(f"torchrun SIGKILL: every process gone after {took:.2f} s")


@pytest.mark.parametrize("serve_job", [{"collective_timeout_s": COLLECTIVE_TIMEOUT_S, "startup_timeout_s": 120}],
                         indirect=True)
def test_startup_waits_for_a_late_rank_and_a_stopped_rank_ends_the_job_within_the_collective_timeout(serve_job):
    """Rank 1 stopped for ``LATE_RANK_S`` at start-up: the job still comes up (start-up is bounded by
    ``startup_timeout_s``, not the 3 s collective timeout). Rank 1 stopped mid-generation: rank 0's next
    collective times out after ``collective_timeout_s``, and the whole job exits non-zero soon after."""
    _, ranks = serve_job.wait_for_ranks()
    os.kill(ranks[1], signal.SIGSTOP)
    time.sleep(LATE_RANK_S)
    os.kill(ranks[1], signal.SIGCONT)
    serve_job.wait_until_healthy()

    def long_completion():
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"http://127.0.0.1:{serve_job.port}/v1/completions", timeout=60,
                       json={"model": "tiny-gqa", "prompt": "the old man", "max_tokens": 400, "ignore_eos": True})

    client = threading.Thread(target=long_completion, daemon=True)
    client.start()
    deadline = time.monotonic() + 30
    while "cptoolkit_requests_in_engine 1" not in httpx.get(f"http://127.0.0.1:{serve_job.port}/metrics").text:
        assert time.monotonic() < deadline, serve_job.tail()
        time.sleep(0.1)
    # The request is generating: every decode step all-reduces over TP, so rank 0 waits for rank 1.
    os.kill(ranks[1], signal.SIGSTOP)
    stopped_at = time.monotonic()
    returncode = serve_job.process.wait(timeout=60)
    took = time.monotonic() - stopped_at
    assert returncode != 0 and took < COLLECTIVE_TIMEOUT_S + 10, (returncode, took, serve_job.tail())
    assert "timed out (runtime.collective_timeout_s" in serve_job.log.read_text(), serve_job.tail()
    serve_job.wait_until_gone(GONE_WITHIN_S)
    print(f"stopped rank: the job exited {returncode} after {took:.2f} s (collective timeout {COLLECTIVE_TIMEOUT_S} s)")


def _listeners(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} write them) listening on ``port``, IPv4 and IPv6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # TCP_LISTEN
                found.append(address)
    return found


def test_the_rendezvous_store_listens_on_every_interface_as_the_docs_warn():
    """torch 2.13 binds torchrun's TCPStore to the wildcard address even with ``--master-addr 127.0.0.1``: the
    multi-node page (docs/multinode.md) says so and how to firewall it. Once this fails, torch binds it: update both."""
    port = free_port()
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr",
                              "127.0.0.1", "--master-port", str(port), "--log-dir", os.devnull, "--no-python",
                              "sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _listeners(port):
            assert agent.poll() is None and time.monotonic() < deadline, "torchrun's store never listened"
            time.sleep(0.1)
        assert set(_listeners(port)) <= {"0" * 8, "0" * 32} and _listeners(port), _listeners(port)
    finally:
        for pid in children(agent.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        agent.kill()
        agent.wait()
