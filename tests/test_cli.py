"""The ``cptoolkit`` command (cptoolkit/cli.py) as a user runs it: vLLM's flag names over the YAML configs, a bad
value in one line, the golden layout table, the planner, and the jobs — ``generate`` on one rank in the command's
own process, ``serve`` on two ranks under the torchrun the command starts, which SIGTERM drains to exit status 0."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from cptoolkit import cli
from cptoolkit import config as config_module
from cptoolkit.config import ConfigError, InferenceConfig, ParallelConfig, load_config
from cptoolkit.layout import LEGEND
from cptoolkit.models.moe_dims import MoEDims
from cptoolkit.torchrun import children
from tests.multiproc import free_port
from tests.test_layout import _strip, golden_sections

REPO = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).with_name("cptoolkit"))]  # the console script of this interpreter's venv
CONFIG = "configs/tp1_pcp1_dcp1.yaml"  # tiny-gqa, TP=1 x PCP=1 x DCP=1, greedy, 48 new tokens
PROMPT = "the old man"

FLAGS = {
    "serve": ["MODEL", "--config", "--tensor-parallel-size", "-tp", "--prefill-context-parallel-size", "-pcp",
              "--decode-context-parallel-size", "-dcp", "--dcp-kv-cache-interleave-size", "--max-model-len",
              "--enable-prefix-caching", "--no-enable-prefix-caching", "--enable-chunked-prefill",
              "--no-enable-chunked-prefill", "--max-num-batched-tokens", "--max-num-seqs", "--seed",
              "--kv-cache-memory", "--kv-cache-memory-fraction", "--host", "--port", "--served-model-name",
              "--drain-timeout-s", "--verbose"],
    "generate": ["MODEL", "--config", "--tensor-parallel-size", "-tp", "--prefill-context-parallel-size", "-pcp",
                 "--decode-context-parallel-size", "-dcp", "--data-parallel-size", "-dp",
                 "--dcp-kv-cache-interleave-size", "--max-model-len", "--enable-prefix-caching",
                 "--enable-chunked-prefill", "--max-num-batched-tokens", "--max-num-seqs", "--seed", "--prompt",
                 "--max-tokens", "--kv-cache-memory", "--kv-cache-memory-fraction", "--message", "--chat", "--system",
                 "--output", "--verbose"],
    "train": ["MODEL", "--config", "--tensor-parallel-size", "-tp", "--prefill-context-parallel-size", "-pcp",
              "--data-parallel-size", "-dp", "--seed", "--output", "--verbose"],
    "layout": ["MODEL", "--config", "-tp", "-pcp", "-dcp", "-dp", "--expert-parallel-size", "-ep", "--ep", "--legend",
               "--nproc-per-node"],
    "chat": ["--url", "--model", "--api-key", "--system", "--max-tokens", "--temperature", "--quick"],
    "plan": ["--model", "--context", "--batch", "--devices", "--devices-per-node", "--memory-per-device", "--dtype",
             "--prefill-chunk", "--decode-comm", "--prefill-comm", "--json"],
}
PLAN_ARGS = ["--model", "builtin", "--context", "256", "--batch", "2", "--devices", "4", "--devices-per-node", "2",
             "--memory-per-device", "1GiB"]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def _undocumented(help_text: str) -> list[str]:
    """The argument entries of an argparse help text that carry no help of their own."""
    entries = re.findall(r"^  (\S.*)\n((?: {6,}\S.*\n)*)", help_text, flags=re.M)
    return [first for first, more in entries if "  " not in first.strip() and not more]


@pytest.mark.parametrize("command", list(FLAGS))
def test_help_lists_every_flag_with_its_help(capsys, command):
    text = _help(capsys, command)
    missing = [flag for flag in FLAGS[command] if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
    assert not missing and not _undocumented(text), (missing, _undocumented(text), text)


def _merged(*argv: str):
    return cli.merged_config(cli.build_parser().parse_args(list(argv)))


def test_flags_override_the_yaml_fields_they_name_and_leave_the_others(monkeypatch):
    monkeypatch.chdir(REPO)
    _, cfg = _merged("generate", "--config", CONFIG, "-tp", "2", "--prefill-context-parallel-size", "2", "-dcp", "4",
                       "--dcp-kv-cache-interleave-size", "2", "--max-model-len", "256", "--enable-prefix-caching",
                       "--max-num-batched-tokens", "64", "--max-num-seqs", "3", "--seed", "7", "--prompt", "a",
                       "--prompt", "b", "--max-tokens", "5")
    p, inf = cfg.parallel, cfg.inference
    assert (p.tp, p.pcp, p.dcp, p.kv_interleave, p.prefill_comm) == (2, 2, 4, 2, "p2p")
    assert (inf.max_seq_len, inf.prefix_caching, inf.prefill_chunk_size, inf.batch_size, inf.seed) == \
        (256, True, 64, 3, 7)
    assert (inf.prompts, inf.max_new_tokens, inf.temperature) == (["a", "b"], 5, 0.0)
    assert Path(cfg.model.checkpoint).resolve() == REPO / "checkpoints" / "tiny-gqa" and cfg.model.num_kv_heads == 2


def test_without_config_the_defaults_apply_and_model_replaces_the_yaml_model(monkeypatch):
    monkeypatch.chdir(REPO)
    _, cfg = _merged("serve")
    assert cfg.parallel == ParallelConfig() and cfg.inference == InferenceConfig() and cfg.model.checkpoint is None
    _, cfg = _merged("serve", "checkpoints/tiny-gqa", "--config", "configs/demo_infer.yaml", "--seed", "3")
    assert cfg.model.checkpoint == str(REPO / "checkpoints" / "tiny-gqa") and cfg.model.seed == 3
    _, cfg = _merged("train", "--config", "configs/train_tp1_pcp1.yaml", "-pcp", "2", "--seed", "5")
    assert (cfg.parallel.pcp, cfg.parallel.dcp, cfg.train.seed) == (2, 2, 5)


def test_the_ranks_config_is_the_merged_config_wherever_it_is_written(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    raw, cfg = _merged("train", "--config", "configs/train_tp1_pcp1.yaml", "-tp", "2")
    copy = tmp_path / "elsewhere" / "config.yaml"
    copy.parent.mkdir()
    copy.write_text(yaml.safe_dump(raw))
    assert dataclasses.replace(load_config(copy), source=cfg.source) == cfg
    assert Path(cfg.train.save_dir).resolve() == REPO / "out" / "train_tp1_pcp1"  # the YAML's, made absolute


def test_chunked_prefill_flags(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    raw = yaml.safe_load((REPO / CONFIG).read_text())
    raw["model"]["checkpoint"] = str(REPO / "checkpoints" / "tiny-gqa")
    raw["inference"].update(prefill_chunk_size=16, prefix_caching=True)
    config = tmp_path / "chunked.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert _merged("serve", "--config", str(config), "--enable-chunked-prefill")[1].inference.prefill_chunk_size == 16
    inference = _merged("serve", "--config", str(config), "--no-enable-chunked-prefill",
                        "--no-enable-prefix-caching")[1].inference
    assert (inference.prefill_chunk_size, inference.prefix_caching) == (None, False)
    with pytest.raises(ConfigError, match=r"^cptoolkit serve: --enable-chunked-prefill needs a chunk size "
                                          r"\(inference.prefill_chunk_size\): give --max-num-batched-tokens N"):
        _merged("serve", "--enable-chunked-prefill")
    with pytest.raises(ConfigError, match="--no-enable-chunked-prefill contradicts --max-num-batched-tokens 32"):
        _merged("serve", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "32")
    with pytest.raises(ConfigError, match=r"inference.prefill_chunk_size = 6: must be a multiple of "
                                          r"parallel.kv_interleave \* parallel.dcp \(4\)"):
        _merged("serve", "-pcp", "2", "-dcp", "2", "-tp", "2", "--max-num-batched-tokens", "6",
                "--dcp-kv-cache-interleave-size", "2")


def test_a_bad_flag_value_is_one_line_naming_the_field_and_exit_2():
    done = _cli("generate", "--config", CONFIG, "--max-num-seqs", "0")
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr == (f"error: cptoolkit generate --config {CONFIG}: inference.batch_size = 0: must be >= 1 "
                           "(given as --max-num-seqs 0)\n")
    tp3 = _cli("serve", "-tp", "3")
    assert tp3.returncode == 2 and tp3.stderr.count("\n") == 1, tp3
    assert "num_heads (8) must be a multiple of tp (3)" in tp3.stderr


def test_layout_prints_the_golden_tables():
    legend, sections = golden_sections()
    done = _cli("layout", "-tp", "2", "--prefill-context-parallel-size", "2", "-dcp", "4")
    assert done.returncode == 0, done.stderr
    assert _strip(done.stdout) == _strip(sections[2])  # TP=2, PCP=2, DCP=4 (8 query heads, 2 KV heads)
    overridden = _cli("layout", "--config", "configs/tp2_pcp2_dcp4.yaml", "-dcp", "2", "--legend")
    assert overridden.returncode == 0, overridden.stderr
    assert _strip(overridden.stdout) == _strip(f"{LEGEND}\n\n{sections[0]}")  # the YAML's dcp 4, overridden to 2


def test_layout_shows_an_moe_models_experts_over_ep(monkeypatch, capsys):
    """An MoE checkpoint's routed experts (``model_moe``, here 8 for the built-in model's 8 query / 2 KV heads): each
    rank's experts and the EP groups, as the golden MoE tables print them; ``-ep`` picks the EP size (default: pcp).
    A dense model takes any valid ``-ep`` and prints no experts; an EP size the experts do not split over is one
    line naming parallel.ep."""
    experts = MoEDims(num_experts=8, top_k=2, ffn_hidden_size=16, moe_layers=(True,))
    golden = (REPO / "tests" / "golden" / "layout_tables_moe.txt").read_text().split("\n\n\n")
    _, dense_sections = golden_sections()

    def layout(*flags: str) -> tuple[int, str, str]:
        status = cli.main(["layout", "-tp", "2", "-pcp", "2", *flags])
        out, err = capsys.readouterr()
        return status, out, err

    assert layout("-dcp", "4", "-ep", "4") == (0, dense_sections[2] + "\n", "")
    for module in (cli, config_module):
        monkeypatch.setattr(module, "model_moe", lambda model: experts)
    assert layout("-dcp", "2", "--legend") == (0, golden[0] + "\n", "")  # EP = PCP = 2: experts TP-sliced
    assert layout("-dcp", "2", "--expert-parallel-size", "4") == (0, golden[1] + "\n", "")
    status, out, err = layout("-dcp", "2", "--ep", "8")
    assert status == 2 and out == "" and err.count("\n") == 1
    assert "parallel.ep = 8: must be k*pcp with k dividing tp (tp=2, pcp=2): valid ep values are 2, 4" in err
    assert "(given as --expert-parallel-size 8)" in err
    monkeypatch.setattr(config_module, "model_moe", lambda model: dataclasses.replace(experts, num_experts=6))
    status, out, err = layout("-dcp", "2", "-ep", "4")
    assert status == 2 and "must be a multiple of EP (4 = parallel.ep)" in err and "valid ep values for this " \
        "model are 2" in err


def test_plan_runs_python_m_cptoolkit_plan(capsys):
    from cptoolkit import plan

    done = _cli("plan", *PLAN_ARGS)
    assert plan.main(PLAN_ARGS) == 0 and done.returncode == 0, done.stderr
    assert done.stdout == capsys.readouterr().out and "DP  TP  PCP  DCP" in done.stdout
    with pytest.raises(SystemExit) as exited:
        cli.main(["plan", *PLAN_ARGS[:-1], "lots"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("cptoolkit plan: error: --memory-per-device ('lots') must be a size")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict:
    """``cptoolkit generate`` on one rank: the JSON it writes."""
    output = tmp_path_factory.mktemp("generate") / "result.json"
    done = _cli("generate", "--config", CONFIG, "--prompt", PROMPT, "--max-tokens", "8", "--output", str(output))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[rank 0] --- request 0: 'the old man'" in done.stdout
    return json.loads(output.read_text())


def test_generate_on_one_rank_runs_in_the_commands_process(generated):
    (request,) = generated["requests"]
    assert request["prompt"] == PROMPT and len(request["token_ids"]) == 8 and request["text"]  # 8: the flag's, not 48
    assert generated["config"]["source"] == f"cptoolkit generate --config {CONFIG}"
    assert "TP=1, PCP=1, DCP=1" in generated["layout"]


def _wait_until_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        assert process.poll() is None and time.monotonic() < deadline, f"no server:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun's workers run in sessions of their own)."""
    tree, index = [pid], 0
    while index < len(tree):
        tree += children(tree[index])
        index += 1
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def test_serve_on_two_ranks_answers_and_sigterm_drains_to_exit_0(tmp_path, generated):
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        process = subprocess.Popen([*CLI, "serve", "--config", CONFIG, "-tp", "2", "--max-num-seqs", "2", "--port",
                                    str(port), "--served-model-name", "tiny"], cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        _wait_until_healthy(url, process, log)
        (torchrun,) = children(process.pid)
        assert len(children(torchrun)) == 2
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
        assert response.choices[0].text == generated["requests"][0]["text"]  # TP=2 answers as one rank generates
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = process.wait(timeout=60)
        took = time.monotonic() - signalled
    finally:
        _kill_tree(process.pid)
        process.wait()
    text = log.read_text()
    assert code == 0 and took < 30, (code, took, text[-4000:])
    assert "TP=2, PCP=1, DCP=1" in text and "drained; every request answered" in text, text[-4000:]
    assert "SignalException" not in text and "ChildFailedError" not in text, text[-4000:]
