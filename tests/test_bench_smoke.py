"""Benchmarks at tiny sizes: JSON schema, exact work counts and collective counts (no timing assertions),
and the bench-only contiguous-split ring against float64 attention."""
from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist

from bench import (all_reduce, balance, decode, eager_floor, long_prompt, matmul_plan, moe, prefill_scaling, run_all, sliding_window,
                   vs_transformers)
from bench.common import machine_info, summarize, write_json
from tests.multiproc import run_ranks

STAT_KEYS = {"median_s", "min_s", "max_s", "reps"}


def test_balance_counts_are_exact():
    seq_len = 64
    for row in balance.work_counts((2, 4, 8), seq_len):
        pcp_size, per_rank = row["pcp_size"], row["per_rank_pairs"]
        assert len(per_rank) == pcp_size and sum(per_rank) == seq_len * (seq_len + 1) // 2
        if row["split"] == "dual_chunk_swap":
            assert row["max_over_mean"] == 1.0 and row["max_over_min"] == 1.0, row
            continue
        local_len = seq_len // pcp_size  # the last rank: L full rows of (P-1)L keys plus an L x L triangle
        last_rank_pairs = (pcp_size - 1) * local_len * local_len + local_len * (local_len + 1) // 2
        first_rank_pairs = local_len * (local_len + 1) // 2
        mean = Fraction(seq_len * (seq_len + 1), 2 * pcp_size)
        assert per_rank[-1] == last_rank_pairs and per_rank[0] == first_rank_pairs, row
        assert row["max_over_mean"] == float(last_rank_pairs / mean), row
        assert row["max_over_min"] == last_rank_pairs / first_rank_pairs, row
        assert abs(row["max_over_mean"] - (2 * pcp_size - 1) / pcp_size) < 2 * pcp_size / seq_len


def _contiguous_ring_rank(rank, world_size, seq_len, heads, head_dim):
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, generator=generator) for _ in range(3))
    scale = 1.0 / math.sqrt(head_dim)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1), float("-inf"))
    reference = torch.softmax(scores, dim=-1) @ v.double()
    local_len = seq_len // world_size
    rows = slice(rank * local_len, (rank + 1) * local_len)
    out = prefill_scaling.contiguous_ring_attention(q[:, :, rows].contiguous(), k[:, :, rows].contiguous(),
                                                    v[:, :, rows].contiguous(), dist.group.WORLD, scale)
    diff = (out.double() - reference[:, :, rows]).abs()
    assert diff.max() < 1e-5, f"rank {rank}: max abs diff {diff.max():.2e}, mean {diff.mean():.2e}"
    return float(diff.max())


def test_contiguous_ring_matches_float64_attention():
    assert len(run_ranks(3, _contiguous_ring_rank, 24, 2, 8, timeout_s=60)) == 3


def test_prefill_scaling_schema_and_correctness(tmp_path):
    payload = prefill_scaling.run([32, 64], reps=2, num_heads=2, head_dim=8)
    assert payload["config"]["variants"] == list(prefill_scaling.VARIANTS)
    assert [entry["seq_len"] for entry in payload["results"]] == [32, 64]
    for entry in payload["results"]:
        assert set(entry["variants"]) == set(prefill_scaling.VARIANTS)
        for variant, stats in entry["variants"].items():
            assert STAT_KEYS <= set(stats) and stats["reps"] == 2 and len(stats["per_rank_median_s"]) == 2
            assert stats["min_s"] <= stats["median_s"] <= stats["max_s"]
            if variant == "pcp1":
                assert stats["speedup_vs_pcp1"] == stats["best_speedup_vs_pcp1"] == 1.0
                assert stats["max_abs_diff_rank0"] is None
            else:
                assert stats["max_abs_diff_rank0"] < 1e-5, (entry["seq_len"], variant, stats)
    path = write_json("prefill_scaling", payload, machine_info(), results_dir=tmp_path)
    document = json.loads(path.read_text())
    assert document["benchmark"] == "prefill_scaling" and document["results"] == payload["results"]
    assert {"cpu_count", "loadavg_1m", "torch"} <= set(document["machine_before"])
    assert "| 64 | pcp2_contiguous |" in prefill_scaling.table(payload)


def test_balance_measured_schema_and_summary(tmp_path):
    rows = balance.measured_times(seq_len=32, reps=1, num_heads=2, head_dim=8)
    assert [row["split"] for row in rows] == ["dual_chunk_swap", "contiguous"]
    for row in rows:
        per_rank = row["per_rank_median_s"]
        assert len(per_rank) == 2 and min(per_rank) > 0, row
        assert row["max_over_mean"] == pytest.approx(max(per_rank) / (sum(per_rank) / 2), rel=1e-12), row
    payload = {"config": {"count_seq_len": 64}, "exact_counts": balance.work_counts(seq_len=64), "measured": rows}
    write_json("balance", payload, machine_info(), results_dir=tmp_path)
    outcomes = [{"name": "balance", "status": "ok", "seconds": 1.0, "error": ""},
                {"name": "gpu", "status": "skipped", "seconds": 0.0, "error": "no GPU on this machine"}]
    summary = run_all.summary(outcomes, quick=True, results_dir=tmp_path)
    assert "- gpu: skipped in 0 s (no GPU on this machine)" in summary and "## balance" in summary
    assert "| 8 | contiguous |" in summary and "## gpu" not in summary


def test_decode_collectives_and_kv_bytes_do_not_grow_with_context():
    context_lens, num_heads, num_kv_heads, head_dim = [16, 48], 4, 2, 8
    payload = decode.run(context_lens, steps=2, rounds=1, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim)
    expected_calls = {("dcp1", None): {}, ("tp1_pcp2_dcp2", "a2a"): {"all_gather": 1},
                      ("tp1_pcp2_dcp2", "ag_rs"): {"all_gather": 1, "all_reduce": 1},
                      ("tp2_pcp1_dcp2", "a2a"): {"all_gather": 1, "all_to_all": 1},
                      ("tp2_pcp1_dcp2", "ag_rs"): {"all_gather": 2, "reduce_scatter": 1}}
    # The module docstring's counts: k = 1 needs 1 (a2a) or 2 (ag_rs) collectives, k = TP 2 or 3.
    expected_collectives = {("dcp1", None): 0, ("tp1_pcp2_dcp2", "a2a"): 1, ("tp1_pcp2_dcp2", "ag_rs"): 2,
                            ("tp2_pcp1_dcp2", "a2a"): 2, ("tp2_pcp1_dcp2", "ag_rs"): 3}
    rows = payload["results"]
    assert len(rows) == len(context_lens) * len(decode.LAYOUTS)
    for row in rows:
        key = row["layout"], row["comm"]
        assert STAT_KEYS <= set(row) and row["reps"] == 2
        assert row["calls_per_step"] == expected_calls[key], row
        assert row["collectives_per_step"] == expected_collectives[key], row
        tokens_per_rank = row["context_len"] // row["dcp"]
        assert row["kv_bytes_per_rank"] == 2 * tokens_per_rank * num_kv_heads * head_dim * 4, row
        # float32 bytes rank 0 sends per step, whatever the context: every head's partial output and LSE
        # (both comms: a2a packs out|lse, ag_rs sends lse then out), plus, with TP = 2, the gathered
        # new token's q|k|v of this rank's heads.
        sent = 0 if row["comm"] is None else num_heads * (head_dim + 1) * 4
        if row["tp"] == 2:
            sent += (num_heads + 2 * num_kv_heads) // 2 * head_dim * 4
        assert row["bytes_sent_per_step_rank0"] == sent, row
    assert "| 48 | tp2_pcp1_dcp2 | ag_rs |" in decode.table(payload)


def test_summarize_reports_median_and_spread():
    assert summarize([3.0, 1.0, 2.0]) == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0, "reps": 3}


def test_long_prompt_schema_and_same_tokens(tmp_path):
    tiny = {**long_prompt.MODEL, "num_layers": 1, "hidden_size": 64, "ffn_hidden_size": 128, "max_seq_len": 128}
    payload = long_prompt.run((33,), reps=1, model=tiny)
    (row,) = payload["rows"]
    one, two = row["one_rank"], row["pcp2_dcp2"]
    assert len(one["tokens"]) == long_prompt.NEW_TOKENS and one["tokens"] == two["tokens"], (one, two)
    assert len(set(one["tokens"])) > 2, f"a near-constant output proves little: {one['tokens']}"
    assert row["same_tokens"] is True
    assert two["kv_bytes_per_rank"] * 2 == one["kv_bytes_per_rank"]
    for phase in ("prefill", "decode_step"):
        assert row[f"{phase}_speedup"] == one[phase]["median_s"] / two[phase]["median_s"], (phase, row)
    assert "| 33 |" in long_prompt.table(payload)


def test_vs_transformers_schema_and_same_fp32_tokens(tmp_path):
    pytest.importorskip("transformers")
    shape = {**vs_transformers.QWEN25_05B, "num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4,
             "intermediate_size": 256, "vocab_size": 2048}
    settings = dict(prefill=(33,), decode_batches=(1, 3), decode_prompt=16, new_tokens=4, reps=1,
                    dtypes=("float32",))
    payload = vs_transformers.run(shape, settings, log=lambda line: None, timeout_s=120)
    rows = payload["results"]["float32"]
    assert [r["row"] for r in rows] == ["prefill 33", "decode batch 1", "decode batch 3"]
    for row in rows:
        assert set(row["columns"]) == set(vs_transformers.DEFAULT_COLUMNS)
        assert set(row["ratios"]) == {f"{a}/{b}" for a, b in vs_transformers.GOALS.items()
                                      if a in vs_transformers.DEFAULT_COLUMNS}
        assert row["token_misses"] == [] and all(row["same_tokens"].values()), row["same_tokens"]
        for stats in row["columns"].values():
            assert STAT_KEYS <= set(stats) and stats["reps"] == 1
            assert len(stats["tokens"]) == row["batch"] and all(len(t) == row["new_tokens"] for t in stats["tokens"])
            if row["kind"] == "decode":  # the steps after the first token, every request
                assert stats["decode_tokens"] == row["batch"] * (row["new_tokens"] - 1), stats
    assert rows[-1]["distinct_tokens"] > 3, "a near-constant output proves little"
    assert vs_transformers.fp32_token_misses(payload) == []
    path = write_json("vs_transformers", payload, machine_info(), results_dir=tmp_path)
    assert json.loads(path.read_text())["results"]["float32"][0]["row"] == "prefill 33"
    assert "| decode batch 3 (float32) |" in vs_transformers.table(payload)


def test_sliding_window_schema_skipped_tiles_and_bounded_cache(tmp_path):
    assert sliding_window.main(["--seq-lens", "512", "--window", "64", "--reps", "1",
                                "--results-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "sliding_window.json").read_text())
    (entry,) = payload["prefill"]
    assert set(entry["times"]) == {name for name, *_ in sliding_window._variants(64)}
    assert all(diff < 1e-5 for diff in entry["max_abs_diff"].values()) and len(entry["max_abs_diff"]) == 4
    assert all(tiles["skipped"] > 0 for name, tiles in entry["tiles"].items() if "window" in name)
    cache = payload["cache"]
    assert len({c["all windowed"] for c in cache}) == 1  # the rings do not grow with the context
    assert [c["full"] for c in cache] == sorted(c["full"] for c in cache) and cache[-1]["full"] > cache[0]["full"]


def test_moe_bytes_calls_and_tokens_per_variant(tmp_path):
    hidden, layers, prompt_len, batch = 32, 2, 64, 3
    model = {**moe.MODEL, "num_layers": layers, "hidden_size": hidden, "ffn_hidden_size": 32, "max_seq_len": 96}
    dims = moe.MoEDims(num_experts=4, top_k=2, ffn_hidden_size=16, moe_layers=(True,) * layers, norm_topk_prob=True)
    settings = moe.Settings(prompt_len=prompt_len, batch=batch, decode_prompt=8, new_tokens=3, rounds=1)
    payload = moe.run(settings, (2, 4), model, dims)
    rows = {(r["layout"], r["variant"]): r for r in payload["rows"]}
    assert set(rows) == {(f"tp{tp}_pcp{pcp}", v) for layouts in moe.LAYOUTS.values() for tp, pcp in layouts
                         for v in moe.variants(tp)}
    experts = payload["config"]["full_expert_bytes"]
    router = layers * dims.num_experts * hidden * 4
    assert experts == layers * dims.num_experts * 3 * hidden * dims.ffn_hidden_size * 4
    for (layout, variant), row in rows.items():
        tp, pcp, prefill, decode = row["tp"], row["pcp"], row["prefill"], row["decode"]
        replica, rows_per_rank = tp * pcp, prompt_len // pcp
        assert row["mlp_bytes_per_rank"] == {"replicated": experts + router, "dense": layers * 3 * hidden * 32 * 4 // tp
                                             }.get(variant, experts // replica + router), row
        assert row.get("same_tokens_as_ep_whole", True) is True, row
        assert (decode is None) == (variant in moe.PREFILL_ONLY), row
        assert all(p["median_s"] > 0 and p["cpu"]["median_s"] > 0 for p in (prefill, decode) if p is not None), row
        if variant == "dense":
            continue
        # Prefill, per layer: EP > 1 dispatches (counts all-gather, all-to-all there and back), TP > 1 all-reduces
        # each rank's whole PCP shard; every (token, slot) goes out once and comes back once per ETP slice.
        ep = {"ep_whole": replica, "ep_sliced": pcp, "replicated": 1}[variant]
        expected = ({"moe_counts_all_gather": layers, "moe_all_to_all": 2 * layers} if ep > 1 else {}) | (
            {"moe_all_reduce": layers} if tp > 1 else {})
        assert prefill["moe_calls_per_step_rank0"] == expected, row
        sent = prefill["bytes_per_step_by_rank"]
        assert len(sent) == replica and prefill["steps"] == 1
        etp = replica // ep if ep > 1 else 1
        assert sum(r.get("moe_all_to_all", 0) for r in sent) == (
            2 * prompt_len * dims.top_k * hidden * 4 * layers * etp if ep > 1 else 0), row
        # Each (token, slot) runs through all of its expert's FFN columns exactly once over the replica.
        assert sum(prefill["expert_work_per_step_by_rank"]) == prompt_len * dims.top_k * dims.ffn_hidden_size * layers
        for r in sent:
            assert r.get("moe_all_reduce", 0) == (rows_per_rank * hidden * 4 * layers if tp > 1 else 0), row
            assert r.get("moe_counts_all_gather", 0) == (2 * dims.num_experts * 8 * layers if ep > 1 else 0), row
        if decode is not None:  # decode: one all-reduce of the batch's rows over the replica per layer and step
            assert decode["steps"] == settings.new_tokens - 1 and decode["decode_rows_per_step"] == batch, row
            assert decode["moe_calls_per_step_rank0"] == {"moe_all_reduce": layers}, row
            assert sum(decode["expert_work_per_step_by_rank"]) == batch * dims.top_k * dims.ffn_hidden_size * layers
            assert all(r["moe_all_reduce"] == batch * hidden * 4 * layers for r in decode["bytes_per_step_by_rank"])
    assert write_json("moe", payload, machine_info(), results_dir=tmp_path).is_file()
    prefill_table, decode_table = moe.table(payload).split("\n\n")
    assert "| tp2_pcp2 (4 procs, 2 cores) | replicated | - |" in prefill_table and "replicated" not in decode_table


def test_matmul_plan_schema_and_step_sums(tmp_path):
    payload = matmul_plan.run("tiny", reps=1)
    assert payload["config"]["shape"] == "tiny" and payload["config"]["rows"] == list(matmul_plan.ROWS)
    layers, per_layer, _ = matmul_plan.SHAPES["tiny"]
    for dtype in ("float32", "bfloat16"):
        for rows in matmul_plan.ROWS:
            products = [p for p in payload["products"] if p["dtype"] == dtype and p["rows"] == rows]
            assert [p["weight"] for p in products] == [name for name, _, _ in per_layer] + ["vocab"]
            assert all(p["plan"] in p["median_ms_per_step"] for p in products)
            assert all(("w_xt_two_rows" in p["median_ms_per_step"]) == (rows == 1) for p in products)
            step, = [s for s in payload["per_step"] if s["dtype"] == dtype and s["rows"] == rows]
            assert step["plan_ms"] == pytest.approx(sum(p["median_ms_per_step"][p["plan"]] for p in products), abs=0.02)
            assert step["x_wt_ms"] == pytest.approx(sum(p["median_ms_per_step"]["x_wt"] for p in products), abs=0.02)
    assert "| float32 | 8 |" in matmul_plan.tables(payload)


def test_all_reduce_bench_schema(tmp_path):
    payload = all_reduce.run("tiny", steps=2, reps=1)
    assert payload["config"]["all_reduces_per_step"] == 2 * matmul_plan.SHAPES["tiny"][0]
    assert [(r["rows"], r["setting"]) for r in payload["rows"]] == [
        (rows, setting) for rows in all_reduce.ROWS for setting in ("idle", "in a decode step")]
    for row in payload["rows"]:
        assert all(row[t]["all_reduce_us"] > 0 and row[t]["step_ms"] > 0 for t in all_reduce.TRANSPORTS)
    assert write_json("all_reduce", payload, machine_info(), results_dir=tmp_path).is_file()
    assert "| 8 | in a decode step |" in all_reduce.table(payload)


def test_eager_floor_steps_agree_across_formulations_and_schema(tmp_path):
    model = eager_floor.BareDecoder("tiny", batch=3, context=5)
    x = torch.randn(3, model.hidden)
    reference = model.step(x, 5, lambda a, w: (a.double() @ w.double().T).float())
    for name, formulation in matmul_plan.FORMULATIONS.items():
        if name != "w_xt_two_rows":
            torch.testing.assert_close(model.step(x, 5, formulation), reference, rtol=1e-4, atol=1e-5, msg=name)
    payload = eager_floor.run("tiny", [1, 3], context=5, reps=1)
    assert [(r["batch"], r["products"]) for r in payload["rows"]] == [
        (b, p) for b in (1, 3) for p in ("x @ W^T", "fastest formulation")]
    assert all(0 < r["products_ms"] < r["step_ms"] for r in payload["rows"])
    assert "| 3 | fastest formulation |" in eager_floor.table(payload)
