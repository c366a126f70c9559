"""bench/speculative.py at its smallest: every row's (prompt lookup and draft model) speculative tokens equal plain
decoding's, prompt-lookup drafts are accepted on the repeating workload, draft-model drafts are proposed every
step, and a step never emits fewer tokens than a plain one (no timing assertions)."""
from __future__ import annotations

import json

from bench import speculative


def test_speculative_bench_same_tokens_and_accepted_drafts(tmp_path):
    assert speculative.main(["--k", "2", "--reps", "1", "--results-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "speculative.json").read_text())["rows"]
    assert {(r["checkpoint"], r["world_size"], r["workload"], r["batch"], r["method"]) for r in rows} == {
        (c, w, wl, b, m) for c in speculative.CHECKPOINTS for w in speculative.LAYOUTS
        for wl in ("repeating", "fresh") for b in (1, len(speculative.BASE_PROMPTS))
        for m in ("ngram", "draft_model")}
    for row in rows:
        assert row["same_tokens"], row
        assert row["tokens_per_request_step"] >= 1 and row["decode_steps"]["speculative"] <= \
            row["decode_steps"]["plain"], row
        if row["method"] == "draft_model":  # k drafts every step: the last step may have room for fewer
            assert row["decode_steps"]["speculative"] >= 1 and row["acceptance_rate"] >= 0, row
        elif row["workload"] == "repeating":
            assert row["acceptance_rate"] > 0.3 and row["tokens_per_request_step"] > 1.5, row
