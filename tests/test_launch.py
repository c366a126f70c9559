"""launch/infer.py as a user runs it: torchrun, the reference config, JSON out; and how it fails."""
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.multiproc import free_port

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _torchrun(nproc: int, script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [*TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), script, *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _reference_config(name: str) -> dict:
    """A shipped config as a dict, its checkpoint path made absolute so that a copy written elsewhere loads it."""
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    raw["model"]["checkpoint"] = str(REPO / "configs" / raw["model"]["checkpoint"])
    return raw


def _small_config(tmp_path: Path, name: str, **inference) -> Path:
    raw = _reference_config(name)
    raw["inference"].update(max_new_tokens=4, **inference)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_reference_job_runs_to_the_end_and_writes_json(tmp_path):
    config = _small_config(tmp_path, "tp2_pcp2_dcp4.yaml")
    output = tmp_path / "result.json"
    done = _torchrun(4, "launch/infer.py", "--config", str(config), "--output", str(output))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "DCP0: [0, 2, 1, 3]" in done.stdout and "decode tokens/s" in done.stdout
    result = json.loads(output.read_text())
    assert set(result) == {"config", "layout", "requests", "metrics"}
    assert len(result["requests"]) == 3 and all(len(r["token_ids"]) == 4 for r in result["requests"])
    assert all(r["metrics"]["time_to_first_token_s"] > 0 for r in result["requests"])
    assert result["metrics"]["attention_collectives_per_layer_step"] == 2.0  # a2a with k = TP


def test_wrong_process_count_is_refused(tmp_path):
    done = _torchrun(2, "launch/infer.py", "--config", str(REPO / "configs/tp2_pcp2_dcp4.yaml"))
    assert done.returncode != 0
    assert "needs dp*pcp*tp = 4 processes but 2 were launched" in done.stdout


def test_malformed_yaml_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parallel: {tp: 2\n")
    done = subprocess.run([sys.executable, "launch/infer.py", "--config", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.yaml: malformed YAML: line" in lines[0] and "Traceback" not in done.stderr


def test_a_failing_rank_ends_the_whole_job_fast():
    start = time.monotonic()
    done = _torchrun(3, "tests/jobs/one_rank_fails.py", timeout=120)
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stdout
    assert time.monotonic() - start < 60


def _one_rank_config(tmp_path: Path, **inference) -> Path:
    raw = _reference_config("tp1_pcp1_dcp1.yaml")
    raw["inference"].update(max_new_tokens=3, **inference)
    path = tmp_path / "one_rank.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _python(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_failed_requests_make_the_job_exit_3_and_are_all_in_the_json(tmp_path):
    config = _one_rank_config(tmp_path, prompts=["fine", "", "x" * 600], batch_size=2)
    output = tmp_path / "result.json"
    done = _python("launch/infer.py", "--config", str(config), "--output", str(output))
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [r["error"] for r in json.loads(output.read_text())["requests"]]
    assert errors[0] is None and "empty prompt" in errors[1] and "exceeds max_seq_len" in errors[2]
    assert "2 of 3 requests failed (requests 1, 2); exit status 3" in done.stdout


def test_a_kv_cache_too_large_for_the_machine_is_one_line(tmp_path):
    config = _one_rank_config(tmp_path, kv_cache_bytes=2 ** 60)
    done = _python("launch/infer.py", "--config", str(config))
    errors = [line for line in done.stdout.splitlines() if "error" in line.lower()]
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert len(errors) == 1 and f"the KV cache needs {2 ** 60:,} bytes per rank" in errors[0] \
        and "inference.kv_cache_bytes" in errors[0], errors


def test_a_config_error_on_four_ranks_is_reported_once_and_fast(tmp_path):
    raw = _reference_config("tp2_pcp2_dcp4.yaml")
    raw["inference"]["temprature"] = 0.5
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump(raw))
    start = time.monotonic()
    done = _torchrun(4, "launch/infer.py", "--config", str(config))
    assert done.returncode != 0 and time.monotonic() - start < 30
    errors = [line for line in done.stdout.splitlines() if "inference.temprature: unknown field" in line]
    assert len(errors) == 1 and errors[0].startswith("[rank 0] error:"), done.stdout


def test_the_reference_job_prints_no_third_party_warnings(tmp_path):
    config = _small_config(tmp_path, "tp2_pcp2_dcp4.yaml")
    done = _torchrun(4, "launch/infer.py", "--config", str(config))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Warning" not in done.stdout + done.stderr and "Megatron" not in done.stdout, \
        done.stdout[:2000] + done.stderr[:2000]


def test_a_frozen_rank_ends_the_job_within_the_collective_timeout(tmp_path):
    """SIGSTOP one worker mid-generation: the others time out in their next collective after
    collective_timeout_s, name it, and end the stopped rank; the job exits non-zero."""
    import os
    import signal

    raw = _reference_config("tp2_pcp2_dcp4.yaml")
    raw["runtime"]["collective_timeout_s"] = 5
    raw["inference"].update(prompts=["hello", "world"], max_new_tokens=400)
    config = tmp_path / "frozen.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [*TORCHRUN, "--nproc-per-node", "4", "--master-addr", "127.0.0.1", "--master-port",
               str(free_port()), "launch/infer.py", "--config", str(config)]
    log = tmp_path / "frozen.log"
    with open(log, "w") as out:
        job = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while "generated 16 tokens" not in log.read_text():
                assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            workers = Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()
            os.kill(int(workers[2]), signal.SIGSTOP)
            stopped_at = time.monotonic()
            returncode = job.wait(timeout=60)
            took = time.monotonic() - stopped_at
        finally:
            if job.poll() is None:
                job.kill()
    text = log.read_text()
    assert returncode != 0 and took < 5 + 10, (took, text[-3000:])
    rank_lines = "\n".join(line for line in text.splitlines() if line.startswith("[rank"))
    assert "timed out (runtime.collective_timeout_s" in text and " from " in text, rank_lines


def test_a_config_without_requests_is_one_line_for_infer(tmp_path):
    raw = _reference_config("tp1_pcp1_dcp1.yaml")
    raw["inference"].pop("prompts")
    config = tmp_path / "no_prompts.yaml"
    config.write_text(yaml.safe_dump(raw))
    done = _python("launch/infer.py", "--config", str(config))
    assert done.returncode == 2 and f"{config}: nothing to generate for: give inference.prompts" in done.stdout, \
        done.stdout
