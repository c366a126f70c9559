"""``cptoolkit generate`` and ``cptoolkit serve`` on one rank, each in a child of the tests' forkserver: the child
runs ``cptoolkit.cli.main`` itself, with torch and megatron already imported, so a job starts in about a second
(a console-script process spends seconds importing them). Used by tests/test_family_entrypoints.py and
tests/test_generate_chat.py.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.multiproc import free_port  # also preloads torch and megatron in the shared forkserver

JOB_TIMEOUT_S = 60
_FORKSERVER = mp.get_context("forkserver")


def _cli_child(argv: list[str], log: str, port: int) -> None:
    """``cptoolkit ARGV`` as one rank in this process, its output in ``log``; exits with the command's status."""
    import torch

    from cptoolkit import cli

    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.exit(cli.main(argv))


def start(argv: list[str], log: Path) -> mp.Process:
    """``cptoolkit ARGV`` started in a forked child, its stdout and stderr in ``log``."""
    process = _FORKSERVER.Process(target=_cli_child, args=(argv, str(log), free_port()), daemon=True)
    process.start()
    return process


def finish(process: mp.Process, log: Path, timeout_s: float = JOB_TIMEOUT_S) -> int:
    """The exit status of ``process``; a test failure with the log's tail when it runs past ``timeout_s``."""
    process.join(timeout_s)
    if process.exitcode is None:
        process.kill()
        process.join()
        pytest.fail(f"still running after {timeout_s} s:\n{log.read_text()[-3000:]}")
    return process.exitcode


def generate(argv: list[str], tmp_path: Path) -> dict:
    """``cptoolkit generate ARGV --output ...`` on one rank: its JSON (the exit status must be 0)."""
    output, log = tmp_path / "generated.json", tmp_path / "generate.log"
    code = finish(start(["generate", *argv, "--output", str(output)], log), log)
    assert code == 0, log.read_text()[-3000:]
    return json.loads(output.read_text())


@contextlib.contextmanager
def serving(argv: list[str], log: Path):
    """``cptoolkit serve ARGV`` on one rank, yielding its base URL once healthy; SIGTERM on leaving, which must
    drain it to exit status 0."""
    port = free_port()
    process = start(["serve", *argv, "--port", str(port)], log)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + JOB_TIMEOUT_S
    try:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert process.is_alive() and time.monotonic() < deadline, f"no server:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield url
        os.kill(process.pid, signal.SIGTERM)
        assert finish(process, log, 30) == 0, log.read_text()[-3000:]
    finally:
        if process.is_alive():
            process.kill()
            process.join()
