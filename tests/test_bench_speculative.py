"""bench/speculative.py at its smallest: every row's speculative tokens equal plain decoding's, drafts are
proposed everywhere and accepted on the repeating workload, and a step never emits fewer tokens than a plain
one (no timing assertions)."""
from __future__ import annotations

import json

from bench import speculative


def test_speculative_bench_same_tokens_and_accepted_drafts(tmp_path):
    assert speculative.main(["--k", "2", "--reps", "1", "--results-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "speculative.json").read_text())["rows"]
    assert {(r["checkpoint"], r["world_size"], r["workload"], r["batch"]) for r in rows} == {
        (c, w, wl, b) for c in speculative.CHECKPOINTS for w in speculative.LAYOUTS
        for wl in ("repeating", "fresh") for b in (1, len(speculative.BASE_PROMPTS))}
    for row in rows:
        assert row["same_tokens"], row
        assert row["tokens_per_request_step"] >= 1 and row["decode_steps"]["speculative"] <= \
            row["decode_steps"]["plain"], row
        if row["workload"] == "repeating":
            assert row["acceptance_rate"] > 0.3 and row["tokens_per_request_step"] > 1.5, row
