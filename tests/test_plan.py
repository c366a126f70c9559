"""The layout planner: its memory and communication figures equal what the code allocates and counts.

KV bytes: ``builder.kv_cache`` for every inference config in configs/ (and variants). Weight bytes: the
parameters of the megatron-core model built at TP 1, 2 and 4. Collectives and bytes: ``CommStats`` of real
DCP decode, PCP prefill and prefill KV routing on 4 gloo ranks. Then ranking, refusal and the CLI.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cptoolkit import plan
from cptoolkit.config import config_from_dict
from cptoolkit.layers.mla_dims import MLADims
from cptoolkit.layout import ParallelLayout
from cptoolkit.models.families.registry import write_hf_config
from cptoolkit.models.moe_dims import MoEDims
from cptoolkit.models.shape import GemmaBlock, GPTShape
from tests.multiproc import run_ranks

REPO = Path(__file__).resolve().parents[1]
INFERENCE_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                           if "inference" in yaml.safe_load(p.read_text()))
ES = {torch.float32: 4, torch.bfloat16: 2}


# ----------------------------------------------------------------------------- KV cache = the engine's allocation
@pytest.mark.parametrize("overrides", [
    {},
    {"runtime": {"dtype": "bfloat16"}, "inference": {"max_seq_len": 100, "kv_block_size": 8, "batch_size": 3}},
    {"parallel": {"kv_interleave": 2}, "inference": {"max_seq_len": 37, "kv_block_size": 6, "batch_size": 1}},
], ids=["as-is", "bf16-100-tokens-blocks-of-8", "interleave-2-37-tokens"])
def test_kv_bytes_per_rank_equal_the_engines_cache_for_every_inference_config(overrides, tmp_path):
    from cptoolkit.inference.builder import kv_cache, max_seq_len
    from cptoolkit.models.from_config import DTYPES, model_shape
    from cptoolkit.parallel_state import ParallelGroups

    assert len(INFERENCE_CONFIGS) >= 5, INFERENCE_CONFIGS
    # demo_infer.yaml serves the checkpoint demo_train.yaml writes (`make demo`), which a fresh clone lacks: its
    # config.json is all the sizing reads. The reference configs serve the checkpoints/ the repository ships.
    trained = config_from_dict(yaml.safe_load((REPO / "configs" / "demo_train.yaml").read_text()))
    (tmp_path / "config.json").write_text(json.dumps(write_hf_config(model_shape(trained))))
    for name in INFERENCE_CONFIGS:
        raw = yaml.safe_load((REPO / "configs" / name).read_text())
        if name == "demo_infer.yaml":
            raw["model"]["checkpoint"] = str(tmp_path)
        for section, values in overrides.items():
            raw.setdefault(section, {}).update(values)
        cfg = config_from_dict(raw, source=name, base_dir=REPO / "configs")
        p, shape = cfg.parallel, model_shape(cfg)
        layout = ParallelLayout(p.tp, p.pcp, p.dcp, shape.num_attention_heads, shape.num_kv_heads, dp=p.dp)
        want = plan.kv_cache_bytes(shape, layout, max_seq_len(cfg), cfg.inference.batch_size,
                                   cfg.inference.kv_block_size, p.kv_interleave, ES[DTYPES[cfg.runtime.dtype]])
        for rank in range(layout.world_size):
            # kv_cache reads only the layout side of the groups; no process group is needed to size the cache.
            groups = ParallelGroups(layout, layout.rank_info(rank), *[None] * 7)
            got = kv_cache(cfg, groups, shape, torch.device("cpu")).bytes_per_rank
            assert got == want, f"{name} {overrides} rank {rank}: engine allocates {got:,} bytes, planner {want:,}"


MLA_SHAPE = GPTShape("llama", 2, 64, 8, 1, 96, 320, 64, head_dim=8,
                     mla=MLADims(q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                 v_head_dim=12, rope_interleave=True))


@pytest.mark.parametrize("tp, pcp, dcp", [(1, 1, 1), (4, 1, 1), (8, 1, 1), (2, 2, 4), (8, 1, 8), (4, 2, 2)])
def test_mla_cache_is_one_latent_per_token_over_dcp_and_tp_alone_replicates_it(tp, pcp, dcp):
    """MLA: every rank caches (kv_lora_rank + qk_rope_head_dim) x layers per token of its 1/DCP of the tokens,
    whatever TP is (the engine's allocation equals that formula and the planner's); without DCP each of TP x PCP
    ranks holds the whole latent, which ``kv_copies`` reports."""
    from cptoolkit.inference.builder import kv_cache
    from cptoolkit.parallel_state import ParallelGroups

    tokens, batch, block = 96, 2, 4
    cfg = config_from_dict({"parallel": {"tp": tp, "pcp": pcp, "dcp": dcp}, "runtime": {"dtype": "bfloat16"},
                            "model": {"num_attention_heads": 8, "num_kv_heads": 1},  # the layout check only
                            "inference": {"max_seq_len": tokens, "kv_block_size": block, "batch_size": batch}})
    layout = ParallelLayout(tp, pcp, dcp, MLA_SHAPE.num_attention_heads, 1)
    latent = MLA_SHAPE.mla.kv_lora_rank + MLA_SHAPE.mla.qk_rope_head_dim
    want = batch * tokens // dcp * MLA_SHAPE.num_layers * latent * 2
    assert plan.kv_cache_bytes(MLA_SHAPE, layout, tokens, batch, block, 1, 2) == want
    for rank in range(layout.world_size):
        groups = ParallelGroups(layout, layout.rank_info(rank), *[None] * 7)
        assert kv_cache(cfg, groups, MLA_SHAPE, torch.device("cpu")).bytes_per_rank == want, rank
    assert plan.kv_copies(layout) == tp * pcp / dcp


# ----------------------------------------------------------------------------- weights = the built model
WEIGHT_SHAPES = [
    GPTShape("llama", 2, 64, 8, 2, 96, 321, 64),  # GQA, vocabulary padded for TP
    GPTShape("llama", 1, 64, 8, 1, 96, 320, 64, tie_embeddings=True),  # MQA: the KV head replicated on TP ranks
    GPTShape("gpt2", 2, 64, 4, 4, 256, 323, 48, tie_embeddings=True),  # biases, LayerNorm, positions, tied
    GPTShape("llama", 1, 64, 4, 4, 96, 320, 64, head_dim=32, qkv_bias=True, qk_norm=True),  # Qwen2/3-style
    MLA_SHAPE,  # DeepSeek-V3-style MLA with a query bottleneck
    dataclasses.replace(MLA_SHAPE, mla=dataclasses.replace(MLA_SHAPE.mla, q_lora_rank=None)),  # V2-style
    GPTShape("llama", 2, 64, 4, 2, 96, 321, 64, head_dim=32, qk_norm=True, tie_embeddings=True, sliding_window=8,
             sliding_layers=(True, False), gemma=GemmaBlock(24.0, 5.0, 4.0, 100.0)),  # Gemma 3: post-norms too
    # DeepSeek-V3-style MoE: a dense layer, then routed experts split over ETP = TP, a router with its correction
    # bias, a shared expert (tests/test_plan_moe.py: EP > 1 and the other MoE parts)
    dataclasses.replace(MLA_SHAPE, moe=MoEDims(num_experts=4, top_k=2, ffn_hidden_size=32, moe_layers=(False, True),
                                               score_correction_bias=True, shared_ffn_hidden_size=16)),
]


def _model_bytes(rank: int, world_size: int) -> list[tuple]:
    from cptoolkit.layers.core_attention import AttentionRuntime
    from cptoolkit.models.build import new_gpt_model
    from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel

    measured = []
    for tp in (1, 2, 4):
        for index, shape in enumerate(WEIGHT_SHAPES):
            groups = initialize_model_parallel(tp, 1, 1, shape.num_attention_heads, shape.num_kv_heads,
                                               dp=world_size // tp, timeout=datetime.timedelta(seconds=60))
            for dtype in (torch.float32, torch.bfloat16):
                model = new_gpt_model(shape, groups.megatron_pg_collection(), AttentionRuntime(), dtype)
                got = sum(p.numel() * p.element_size() for p in model.parameters())
                measured.append((tp, index, ES[dtype], got))
            destroy_model_parallel()
    return measured


def test_weight_bytes_equal_the_parameters_of_the_built_model():
    for rank, measured in enumerate(run_ranks(4, _model_bytes, timeout_s=240)):
        for tp, index, es, got in measured:
            shape = WEIGHT_SHAPES[index]
            layout = ParallelLayout(tp, 1, 1, shape.num_attention_heads, shape.num_kv_heads)
            want = plan.weight_bytes(shape, layout, es)
            assert got == want, f"rank {rank} TP={tp} {WEIGHT_SHAPES[index]} {es}-byte: model {got:,}, planner {want:,}"


# ----------------------------------------------------------------------------- collectives = CommStats measured
HEADS, HEAD_DIM, BATCH, PROMPT = 8, 16, 3, 13  # a 13-token prompt is padded to a multiple of 2*PCP
MLA_WIDTH = 24  # an MLA cache entry: kv_lora_rank + qk_rope_head_dim
# (tp, pcp, dcp, dp) on 4 ranks, each with the KV head counts it allows.
COMM_LAYOUTS = [((2, 2, 2, 1), (2, 1)), ((2, 2, 4, 1), (2, 1)), ((1, 2, 2, 2), (2, 1)), ((1, 4, 4, 1), (2, 1)),
                ((4, 1, 4, 1), (4, 1)), ((4, 1, 2, 1), (2, 1))]


def _stats_dict(stats) -> dict:
    return {"calls": dict(stats.calls), "bytes": dict(stats.bytes_sent)}


def _measure_comm(rank: int, world_size: int) -> list[tuple]:
    """``(case, measured, planned)`` for every layout, KV head count, dtype and comm of this rank."""
    from cptoolkit.layers.comm import CommStats
    from cptoolkit.layers.dcp_decode import ContiguousShardCache, DecodeGroup, dcp_decode_attention
    from cptoolkit.inference.prefill_kv import route_prefill_kv
    from cptoolkit.layers.dual_chunk_swap import padded_length
    from cptoolkit.layers.ring_prefill import ring_prefill_attention
    from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel

    out, gen = [], torch.Generator().manual_seed(rank)
    for (tp, pcp, dcp, dp), kv_counts in COMM_LAYOUTS:
        groups = initialize_model_parallel(tp, pcp, dcp, HEADS, kv_counts[0], dp=dp,
                                           timeout=datetime.timedelta(seconds=60))
        # "mla": the one latent per token is key and value at once (``v is k``, one plane, MLA_WIDTH wide),
        # and the expanded prefill attends one K/V per query head.
        for kv, dtype, interleave, variant in [(kv, dtype, i, variant) for kv in kv_counts for dtype in ES
                                               for i in (1, 2) for variant in ("gqa", "mla") if kv == 1 or
                                               variant == "gqa"]:
            layout = ParallelLayout(tp, pcp, dcp, HEADS, kv, dp=dp)
            es, hq, hkv = ES[dtype], HEADS // tp, len(layout.kv_heads_of(0))
            mla = variant == "mla"
            entry = plan.CacheEntry(1, MLA_WIDTH) if mla else plan.CacheEntry(2, HEAD_DIM)
            case = (tp, pcp, dcp, dp, kv, str(dtype), interleave, variant)
            dg = DecodeGroup.from_group(groups.dcp_group, layout.dcp_tp_positions, pcp, interleave,
                                        layout.kv_head_replication)

            def new_kv(heads: int, tokens: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
                k = torch.randn(BATCH, heads, tokens, width, generator=gen).to(dtype)
                return (k, k) if mla else (k, torch.randn(BATCH, heads, tokens, width, generator=gen).to(dtype))

            for comm in ("a2a", "ag_rs"):
                cache = ContiguousShardCache(32, BATCH, len(layout.rank_info(rank).dcp_kv_heads), entry.width, dg,
                                             dtype)
                q = torch.randn(BATCH, hq, 1, entry.width, generator=gen).to(dtype)
                k, v = new_kv(hkv, 1, entry.width)
                stats = CommStats()
                dcp_decode_attention(q, k, v, cache, torch.zeros(BATCH, dtype=torch.int64), dg, comm, 0.25, stats)
                out.append((case + ("decode", comm), _stats_dict(stats),
                            _stats_dict(plan.decode_comm_per_layer(layout, entry, BATCH, comm, es))))
            local = padded_length(PROMPT, pcp) // pcp
            q = torch.randn(BATCH, hq, local, HEAD_DIM, generator=gen).to(dtype)
            prefill_kv_heads = hq if mla else hkv
            k, v = (torch.randn(BATCH, prefill_kv_heads, local, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
            for comm in ("p2p", "all_gather", "a2a") if pcp > 1 else ():
                stats = CommStats()
                ring_prefill_attention(q, k, v, pcp_group=groups.pcp_group, scale=0.25, comm=comm, stats=stats)
                planned = plan.prefill_comm_per_layer(layout, HEAD_DIM, BATCH, PROMPT, comm, es,
                                                      kv_heads=prefill_kv_heads)
                out.append((case + ("prefill", comm), _stats_dict(stats), _stats_dict(planned)))
            stats = CommStats()
            k, v = new_kv(hkv, local, entry.width)
            route_prefill_kv(k, v, padded_length(PROMPT, pcp), groups.pcp_rank, dg, stats)
            out.append((case + ("route", "all_to_all"), _stats_dict(stats),
                        _stats_dict(plan.prefill_route_per_layer(layout, entry, BATCH, PROMPT, interleave, es))))
        destroy_model_parallel()
    return out


def test_decode_prefill_and_routing_comm_equal_measured_commstats():
    results = run_ranks(4, _measure_comm, timeout_s=240)
    cases = {case[-2:] for rank_results in results for case, _, _ in rank_results}
    assert {("decode", "a2a"), ("decode", "ag_rs"), ("prefill", "p2p"), ("prefill", "all_gather"),
            ("prefill", "a2a"), ("route", "all_to_all")} <= cases
    assert {case[7] for rank_results in results for case, _, _ in rank_results} == {"gqa", "mla"}
    for rank, rank_results in enumerate(results):
        for case, measured, planned in rank_results:
            assert measured == planned, f"rank {rank} {case}: measured {measured}, planner {planned}"


# ----------------------------------------------------------------------------- ranking and refusal
def _work(**changes) -> plan.Workload:
    base = dict(shape=plan.SHAPES["llama3.1-8b"], context=131072, batch=4, devices=16, devices_per_node=8,
                memory_per_device=80 * 2 ** 30, dtype="bf16", prefill_chunk=4096)
    return plan.Workload(**(base | changes))


def test_ranking_puts_fitting_layouts_first_then_fewest_cross_node_decode_collectives():
    plans, refused = plan.plan(_work(memory_per_device=10 * 2 ** 30))
    keys = [plan.rank_key(p) for p in plans]
    assert keys == sorted(keys) and any(p.fits for p in plans) and not all(p.fits for p in plans)
    assert [p.fits for p in plans] == sorted((p.fits for p in plans), reverse=True)
    fitting = [p for p in plans if p.fits]
    assert all(p.total_bytes <= 10 * 2 ** 30 for p in fitting) and all(p.total_bytes > 10 * 2 ** 30
                                                                        for p in plans if not p.fits)
    crossing = [p.cross_node_decode_calls_per_step for p in fitting]
    assert crossing == sorted(crossing) and crossing[0] == 0 and crossing[-1] > 0
    best = fitting[0].layout
    assert (best.dp, best.tp) == (2, 8) and fitting[0].crossing["DCP"][0] == 0


def test_layouts_whose_tp_group_spans_nodes_are_refused_with_the_rule():
    plans, refused = plan.plan(_work())
    assert {layout.tp for layout, _ in refused} == {16}
    assert all(8 % p.layout.tp == 0 for p in plans)
    assert all("tp (16) must divide nproc_per_node (8): TP all-reduces every layer" in rule for _, rule in refused)
    # Every layout the model allows on 16 devices is either planned or refused.
    assert len(plans) + len(refused) == 31


# ----------------------------------------------------------------------------- command line
BASE_ARGS = ["--context", "131072", "--batch", "4", "--devices", "16", "--devices-per-node", "8",
             "--memory-per-device", "80GiB"]


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """``python -m cptoolkit.plan`` in this process: (exit status, stdout, stderr)."""
    try:
        status = plan.main(list(args))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_table_and_json_agree_and_a_config_json_equals_its_named_shape(tmp_path, capsys):
    table = subprocess.run([sys.executable, "-m", "cptoolkit.plan", "--model", "llama3.1-8b", *BASE_ARGS,
                            "--prefill-chunk", "4096"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "26 layouts fit" in table.stdout and "5 refused (a TP group would span nodes)" in table.stdout
    (tmp_path / "config.json").write_text(json.dumps(write_hf_config(plan.SHAPES["llama3.1-8b"])))
    status, out, _ = _main(capsys, "--model", str(tmp_path), *BASE_ARGS, "--prefill-chunk", "4096", "--json")
    assert status == 0
    layouts = json.loads(out)["layouts"]
    lines = table.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("#  DP  TP  PCP  DCP"))
    rows = [line.split() for line in lines[header + 1:lines.index("", header)]]
    assert len(rows) == 26 and all(layout["fits"] for layout in layouts)
    for row, layout in zip(rows, layouts):
        assert [int(x) for x in row[:5]] == [layout[key] for key in ("rank", "dp", "tp", "pcp", "dcp")]
    best = layouts[0]
    assert best["kv_cache_bytes"] == 4 * 2 ** 30  # 2 requests x 128k tokens x 32 layers x K,V x 8 heads x 128 / 8
    layout = ParallelLayout(best["tp"], best["pcp"], best["dcp"], 32, 8, dp=best["dp"])
    assert best["weight_bytes"] == plan.weight_bytes(plan.SHAPES["llama3.1-8b"], layout, 2)


def test_cli_builtin_model_and_nothing_fits_exits_1(capsys):
    status, out, _ = _main(capsys, "--model", "builtin", "--context", "512", "--batch", "2", "--devices", "4",
                           "--devices-per-node", "4", "--memory-per-device", "1GiB", "--dtype", "fp32")
    assert status == 0 and "2 layers, hidden 128, 8 query / 2 KV heads" in out
    status, out, _ = _main(capsys, "--model", "llama3.1-8b", *BASE_ARGS[:-1], "8GB")
    assert status == 1 and "No layout fits." in out and "the smallest needs" in out


@pytest.mark.parametrize("args, message", [
    (["--model", "llama-9000"], r"--model \('llama-9000'\) must be 'builtin', one of llama3.1-8b, llama3.1-70b, "
                                r"deepseek-v3-dense, deepseek-v3, qwen3-235b-a22b, gpt-oss-120b, mixtral-8x7b, or "),
    (["--model", "builtin"], r"--context \(131072\) must be <= the model's max_seq_len \(512\)"),
    (["--model", "llama3.1-8b", "--memory-per-device", "80 gigs"],
     r"--memory-per-device \('80 gigs'\) must be a size such as 80GiB"),
    (["--model", "llama3.1-8b", "--devices-per-node", "6"],
     r"--devices \(16\) must be a multiple of --devices-per-node \(6\)"),
    (["--model", "llama3.1-8b", "--batch", "0"], r"--batch \(0\) must be a positive integer"),
    (["--model", "{tmp}/bad.json"], r"bad.json: malformed JSON: line 1"),
    (["--model", "{tmp}/gpt3.json"], r"gpt3.json: model_type='gpt3' is not supported"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "gpt3.json").write_text('{"model_type": "gpt3"}')
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    given = set(args[::2])
    base = [x for i in range(0, len(BASE_ARGS), 2) if BASE_ARGS[i] not in given for x in BASE_ARGS[i:i + 2]]
    status, out, err = _main(capsys, *args, *base)
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("python -m cptoolkit.plan: error: ") and re.search(message, err), err
