"""cptoolkit.sweep (launch/sweep.py): sweep-file validation, grid expansion, derived configs, comparison, and one real sweep."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from cptoolkit import sweep
from cptoolkit.sweep import SweepError, SweepRun, derived_config, difference, first_error_line, load_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASELINE = str(CONFIGS / "tp1_pcp1_dcp1.yaml")


def _write(tmp_path: Path, content) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.mark.parametrize("content, match", [
    ("runs: [", r"sweep.yaml: malformed YAML"),
    ([BASELINE], r"top level must be a mapping"),
    ({"runz": []}, r"sweep.yaml: runz: unknown key \(known: base, grid, overrides, runs\)"),
    ({"runs": [{"config": BASELINE}], "base": BASELINE, "grid": {"parallel.tp": [1]}}, r"runs: give either"),
    ({}, r"runs: give either 'runs' \(a list\) or 'base' and 'grid'"),
    ({"runs": []}, r"runs: must be a non-empty list"),
    ({"runs": [BASELINE]}, r"runs\[0\]: must be a mapping with a 'config' key, got str"),
    ({"runs": [{"config": BASELINE, "procs": 2}]}, r"runs\[0\]\.procs: unknown key"),
    ({"runs": [{"config": "missing.yaml"}]}, r"runs\[0\]\.config: config file .*missing.yaml not found"),
    ({"runs": [{"name": "x"}]}, r"runs\[0\]\.config: must be a path"),
    ({"runs": [{"config": BASELINE, "nproc": 0}]}, r"runs\[0\]\.nproc: 0 must be a positive integer"),
    ({"runs": [{"config": BASELINE, "name": "a b"}]}, r"runs\[0\]\.name: 'a b' must be a non-empty name"),
    ({"runs": [{"config": BASELINE, "overrides": {"max_new_tokens": 2}}]},
     r"runs\[0\]\.overrides\.max_new_tokens: keys must be 'section\.field'"),
    ({"runs": [{"config": BASELINE}, {"config": BASELINE}]}, r"run name 'tp1_pcp1_dcp1' is used twice"),
    ({"base": BASELINE, "grid": {"parallel.decode_comm": "a2a"}},
     r"grid\.parallel\.decode_comm: must be a non-empty list"),
    ({"base": BASELINE, "grid": {}}, r"grid: must be a non-empty mapping"),
    ({"runs": [{"config": BASELINE, "reference": "nope"}]},
     r"runs\[0\]\.reference: 'nope' is not the name of a run in this sweep \(names: tp1_pcp1_dcp1\)"),
    ({"grid": {"parallel.decode_comm": ["a2a"]}}, r"base: must be a path"),
])
def test_malformed_sweep_names_file_and_field(tmp_path, content, match):
    with pytest.raises(SweepError, match=match):
        load_sweep(_write(tmp_path, content))


def test_main_reports_malformed_sweep_in_one_line_with_status_2(tmp_path, capsys):
    path = _write(tmp_path, {"runs": [{"config": BASELINE, "nproc": -1}]})
    assert sweep.main(["--sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs[0].nproc: -1 must be a positive integer" in err
    assert sweep.main(["--sweep", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: sweep file not found" in capsys.readouterr().err


def test_grid_expands_every_combination_with_shared_overrides(tmp_path):
    path = _write(tmp_path, {"base": BASELINE, "overrides": {"inference.max_new_tokens": 2},
                             "grid": {"parallel.prefill_comm": ["p2p", "all_gather"],
                                      "parallel.decode_comm": ["a2a", "ag_rs"]}})
    runs = load_sweep(path)
    assert [run.name for run in runs] == ["prefill_comm=p2p,decode_comm=a2a", "prefill_comm=p2p,decode_comm=ag_rs",
                                          "prefill_comm=all_gather,decode_comm=a2a",
                                          "prefill_comm=all_gather,decode_comm=ag_rs"]
    assert runs[2].overrides == {"inference.max_new_tokens": 2, "parallel.prefill_comm": "all_gather",
                                 "parallel.decode_comm": "a2a"}
    assert all(run.nproc is None and run.config_path == Path(BASELINE) for run in runs)


def test_run_overrides_win_over_shared_ones(tmp_path):
    path = _write(tmp_path, {"overrides": {"inference.max_new_tokens": 2, "inference.temperature": 0.0},
                             "runs": [{"config": BASELINE, "name": "r", "nproc": 2,
                                       "overrides": {"inference.max_new_tokens": 5}}]})
    (run,) = load_sweep(path)
    assert run == SweepRun("r", Path(BASELINE), {"inference.max_new_tokens": 5, "inference.temperature": 0.0}, 2)


def test_derived_config_applies_overrides_and_absolutizes_paths(tmp_path):
    config = tmp_path / "cfg" / "c.yaml"
    config.parent.mkdir()
    raw = yaml.safe_load(Path(BASELINE).read_text())
    raw["inference"] = {"prompt_file": "prompts.txt", "max_new_tokens": 4}
    config.write_text(yaml.safe_dump(raw))
    derived = derived_config(SweepRun("r", config, {"inference.max_new_tokens": 2, "parallel.decode_comm": "ag_rs"}))
    assert derived["inference"] == {"prompt_file": str(config.parent / "prompts.txt"), "max_new_tokens": 2}
    assert derived["parallel"]["decode_comm"] == "ag_rs" and derived["parallel"]["tp"] == 1


def test_first_error_line_prefers_the_launcher_error_then_the_exception():
    launcher = "noise\n[rank 1] error: x.yaml: needs 4 processes\nChildFailedError: boom\n"
    assert first_error_line(launcher) == "[rank 1] error: x.yaml: needs 4 processes"
    traceback = ("[rank 0] failed:\nTraceback (most recent call last):\n  File \"a.py\"\nRuntimeError: gloo broke\n"
                 "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    assert first_error_line(traceback) == "RuntimeError: gloo broke"
    assert first_error_line("just\nthe end\n") == "the end"
    assert first_error_line("") == "(no output)"


def test_difference_counts_differing_tokens_and_max_loss_gap():
    ref = {"status": "ok", "kind": "inference", "token_ids": [[1, 2, 3], [4, 5]]}
    assert difference(ref, ref) == 0
    assert difference({**ref, "token_ids": [[1, 9, 3], [4]]}, ref) == 2  # one changed, one missing
    assert difference({"status": "failed", "kind": "inference"}, ref) is None
    train_ref = {"status": "ok", "kind": "train", "losses": [3.0, 2.5]}
    assert difference({**train_ref, "losses": [3.0, 2.75]}, train_ref) == pytest.approx(0.25)
    assert difference({**train_ref, "losses": [3.0]}, train_ref) == float("inf")
    assert difference(train_ref, ref) is None


def test_result_fields_read_train_steps_and_inference_metrics():
    steps = [{"loss": 3.0, "tokens_per_s": 10.0}, {"loss": 2.0, "tokens_per_s": 30.0},
             {"loss": 1.5, "tokens_per_s": 20.0}]
    assert sweep._result_fields("train", {"steps": steps}) == {"losses": [3.0, 2.0, 1.5], "final_loss": 1.5,
                                                                "train_tokens_per_s": 20.0}
    metrics = {"decode_tokens_per_s": 50.0, "prefill_time_s": 0.1, "kv_bytes_per_rank": 4096,
               "collectives_per_decode_step": 4.0, "prompt_tokens": 7}
    fields = sweep._result_fields("inference", {"requests": [{"token_ids": [5, 6]}], "metrics": metrics})
    assert fields == {"token_ids": [[5, 6]], **{k: v for k, v in metrics.items() if k != "prompt_tokens"}}


def test_each_run_is_compared_with_its_named_reference(monkeypatch, tmp_path):
    tokens = {"gqa": [[1, 2]], "gqa_tp2": [[1, 3]], "mqa": [[7, 8]], "mqa_tp2": [[7, 8]]}
    runs = [SweepRun(name, Path(BASELINE), reference="mqa" if name == "mqa_tp2" else None) for name in tokens]
    monkeypatch.setattr(sweep, "execute", lambda run, out_dir, timeout_s, threads_per_rank: {
        "name": run.name, "status": "ok", "kind": "inference", "error": "", "token_ids": tokens[run.name]})
    rows = sweep.run_sweep(runs, tmp_path, echo=lambda line: None)
    assert [(row["reference"], row["diff_vs_reference"]) for row in rows] == [
        ("gqa", 0), ("gqa", 1), ("gqa", 2), ("mqa", 0)]


def test_sweep_runs_configs_and_reports_a_failing_one(tmp_path, capsys):
    """Two tiny runs through torchrun: the reference succeeds; the second is launched on the wrong number
    of processes, fails, and is reported in the table while the sweep goes on."""
    path = _write(tmp_path, {
        "overrides": {"inference.max_new_tokens": 2, "inference.prompts": ["Ring attention"]},
        "runs": [{"config": BASELINE, "name": "reference"},
                 {"config": BASELINE, "name": "wrong_nproc", "nproc": 2},
                 {"config": BASELINE, "name": "invalid", "overrides": {"parallel.decode_comm": "ring"}}]})
    out = tmp_path / "out"
    assert sweep.main(["--sweep", str(path), "--out", str(out), "--timeout-s", "240"]) == 1
    table = capsys.readouterr().out
    with (out / "sweep.csv").open() as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    assert rows["reference"]["status"] == "ok", rows["reference"]["error"]
    assert rows["reference"]["diff_vs_reference"] == "0"
    assert float(rows["reference"]["decode_tokens_per_s"]) > 0 and int(rows["reference"]["kv_bytes_per_rank"]) > 0
    assert rows["wrong_nproc"]["status"] == "failed"
    assert "needs dp*pcp*tp = 1 processes but 2 were launched" in rows["wrong_nproc"]["error"]
    assert rows["invalid"]["status"] == "invalid" and "parallel.decode_comm = 'ring'" in rows["invalid"]["error"]
    assert "| wrong_nproc | failed | 2 |" in table
    result = json.loads((out / "reference" / "result.json").read_text())
    assert len(result["requests"]) == 1 and (out / "sweep.png").stat().st_size > 0
