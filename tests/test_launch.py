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


def _small_config(tmp_path: Path, name: str, **inference) -> Path:
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
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
