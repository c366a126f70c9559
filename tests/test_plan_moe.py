"""The planner with Mixture-of-Experts models: the named shapes' totals equal the published ones, the layouts take
every valid EP size, and the figures equal what the engine builds and counts.

Checked against the engine: a small MoE model (a dense first layer, then routed experts with a shared expert and
DeepSeek-V3's routing) on 4 gloo ranks, TP2 x PCP2 at EP 2 (experts TP-sliced) and EP 4 (whole experts), run by the
real ``Engine`` (prefill of two prompts, then a decode step): every rank's parameter bytes equal
``plan.weight_bytes``, and every layer's collectives in ``runtime.layer_stats`` equal the planner's (the
attention's and the MoE layer's) in calls and bytes. The one figure that depends on the routing, the bytes of the
all-to-all that returns the experts' rows, is exact as a sum over each EP group (every row dispatched comes back).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from cptoolkit import plan
from cptoolkit.layout import ParallelLayout, valid_ep_sizes
from cptoolkit.models.moe_dims import MoEDims
from cptoolkit.models.shape import GPTShape
from tests.multiproc import run_ranks

GiB = 2 ** 30
ES = {torch.float32: 4, torch.bfloat16: 2}

# Published totals (model cards: DeepSeek-V3 671B without its 14B multi-token-prediction layer, Qwen3-235B-A22B
# 235B, gpt-oss-120b 116.83B: the planner's 116.829B with its sinks, output-projection and expert biases, Mixtral-8x7B
# 46.7B). They are rounded to 3-5 significant figures; a missing part such as a shared expert
# (0.4% of V3), a router of V3 (0.02%, so only at this tolerance with the rest exact) or the output layer is more.
PUBLISHED = {"deepseek-v3": 671e9, "qwen3-235b-a22b": 235e9, "gpt-oss-120b": 116.83e9, "mixtral-8x7b": 46.7e9}
TOTAL_RTOL = 1e-3


def _one_rank(shape: GPTShape, **sizes) -> ParallelLayout:
    layout = dict(tp=1, pcp=1, dcp=1) | sizes
    return ParallelLayout(num_heads=shape.num_attention_heads, num_kv_heads=shape.num_kv_heads,
                          num_experts=shape.moe.num_experts, **layout)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_named_shapes_total_the_published_parameter_counts(name):
    shape = plan.SHAPES[name]
    total = plan.rank_params(shape, _one_rank(shape)).total
    assert abs(total - PUBLISHED[name]) <= TOTAL_RTOL * PUBLISHED[name], f"{name}: {total:,} parameters"


def test_deepseek_v3_by_part_and_per_rank():
    """V3's 671B: 654B in 14,848 routed experts (58 layers x 256 of 3 x 2048 x 7168); on 8 ranks every layout
    splits them 8 ways, whether whole (EP 8) or sliced (EP 1, ETP 8); the rest by TP."""
    shape = plan.SHAPES["deepseek-v3"]
    full = plan.rank_params(shape, _one_rank(shape))
    assert full.routed_experts == 58 * 256 * 3 * 2048 * 7168
    assert full.shared_experts == 58 * 3 * 2048 * 7168 and full.routers == 58 * 256 * (7168 + 1)
    assert full.dense_mlp == 3 * 3 * 18432 * 7168
    for ep in valid_ep_sizes(8, 1):
        eight = plan.rank_params(shape, _one_rank(shape, tp=8, dcp=8, ep=ep))
        assert eight.routed_experts * 8 == full.routed_experts, ep
        assert eight.routers == full.routers and eight.shared_experts * 8 == full.shared_experts


def _work(**changes) -> plan.Workload:
    base = dict(shape=plan.SHAPES["deepseek-v3"], context=131072, batch=2, devices=8, devices_per_node=8,
                memory_per_device=192 * 10 ** 9, dtype="bf16", prefill_chunk=8192)
    return plan.Workload(**(base | changes))


def test_layouts_take_every_valid_ep_and_only_those():
    plans, refused = plan.plan(_work(shape=plan.SHAPES["mixtral-8x7b"], context=32768, devices=16,
                                     prefill_chunk=4096, memory_per_device=80 * GiB))
    seen = {(p.layout.dp, p.layout.tp, p.layout.pcp, p.layout.dcp, p.layout.ep) for p in plans}
    seen |= {(lay.dp, lay.tp, lay.pcp, lay.dcp, lay.ep) for lay, _ in refused}
    for dp, tp, pcp, dcp in {key[:4] for key in seen}:
        eps = sorted(key[4] for key in seen if key[:4] == (dp, tp, pcp, dcp))
        # 8 experts: EP must divide 8; ETP = tp*pcp/ep must divide the expert FFN (14336 = 2^11 * 7: always)
        assert eps == [ep for ep in valid_ep_sizes(tp, pcp) if 8 % ep == 0], (dp, tp, pcp, dcp, eps)
    assert (1, 8, 2, 16, 16) not in seen and (1, 8, 2, 16, 8) in seen


def test_deepseek_v3_on_8_devices():
    """80 GB devices: not in bf16 (its weights alone are 158 GiB per device at best). 192 GB devices, two
    requests of 128k tokens: TP8 alone (experts sliced 8 ways, the latent on every rank) does not fit; TP8 x DCP8
    x EP8 does, storing each token's latent once where TP8 stores it 8 times."""
    plans, _ = plan.plan(_work(memory_per_device=80 * 10 ** 9))
    assert not any(p.fits for p in plans)
    assert min(p.weight_bytes for p in plans) == plan.weight_bytes(plan.SHAPES["deepseek-v3"],
                                                                   _one_rank(plan.SHAPES["deepseek-v3"], tp=8), 2)
    plans, _ = plan.plan(_work())
    by_sizes = {(p.layout.tp, p.layout.pcp, p.layout.dcp, p.layout.ep): p for p in plans}
    tp8, tp8_dcp8_ep8 = by_sizes[8, 1, 1, 1], by_sizes[8, 1, 8, 8]
    assert not tp8.fits and tp8_dcp8_ep8.fits and plans.index(tp8_dcp8_ep8) < plans.index(tp8)
    assert tp8.weight_bytes == tp8_dcp8_ep8.weight_bytes and tp8.kv_cache_bytes == 8 * tp8_dcp8_ep8.kv_cache_bytes
    assert plan.kv_copies(tp8.layout) == 8 and plan.kv_copies(tp8_dcp8_ep8.layout) == 1
    # Decode per step: 58 MoE all-reduces of 2 rows x 7168 bf16 over the replica, and with DCP the attention's
    # combines on all 61 layers.
    assert tp8.decode_per_step.calls == {"moe_all_reduce": 58}
    assert tp8_dcp8_ep8.decode_per_step.calls["moe_all_reduce"] == 58
    assert tp8_dcp8_ep8.decode_per_step.bytes_sent["moe_all_reduce"] == 58 * 2 * 7168 * 2
    # Prefill of an 8192-token chunk per MoE layer: EP8 dispatches 1024 rows x top 8 per rank, and they come back.
    assert tp8_dcp8_ep8.moe_prefill.bytes_sent["moe_all_to_all"] == 2 * 1024 * 8 * 7168 * 2
    assert tp8.moe_prefill.calls == {"moe_all_reduce": 1}


def test_the_deepseek_v3_tables_in_docs_are_the_planners(capsys):
    text = (Path(__file__).resolve().parents[1] / "docs" / "planner.md").read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text.split("## Mixture-of-Experts models")[1], flags=re.S)
    no_fit, fits = [block for language, block in blocks if not language]
    args = ["--model", "deepseek-v3", "--context", "131072", "--batch", "2", "--devices", "8", "--devices-per-node",
            "8", "--prefill-chunk", "8192", "--memory-per-device"]
    for memory, shown in (("80GB", no_fit), ("192GB", fits)):
        plan.main([*args, memory])
        printed = capsys.readouterr().out.splitlines()
        assert all(line in printed for line in shown.splitlines() if line), (memory, shown)


def test_json_reports_ep_and_the_parts(capsys):
    status = plan.main(["--model", "mixtral-8x7b", "--context", "32768", "--batch", "4", "--devices", "8",
                        "--devices-per-node", "8", "--memory-per-device", "80GiB", "--json"])
    layouts = json.loads(capsys.readouterr().out)["layouts"]
    assert status == 0
    best = layouts[0]
    assert {"ep", "etp", "moe_decode_per_layer_step", "moe_prefill_per_layer_uniform_routing"} <= set(best)
    assert best["ep"] * best["etp"] == best["tp"] * best["pcp"]
    assert sum(best["params_per_rank"].values()) * 2 == best["weight_bytes"]


def test_table_shows_ep_experts_and_moe_prefill(capsys):
    status = plan.main(["--model", "deepseek-v3", "--context", "131072", "--batch", "2", "--devices", "8",
                        "--devices-per-node", "8", "--memory-per-device", "192GB", "--prefill-chunk", "8192"])
    out = capsys.readouterr().out
    assert status == 0
    assert "58 MoE layers of 256 experts (top 8) of ffn 2048 + shared 2048, 3 dense of ffn 18432" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("#"))
    assert header.split()[:7] == ["#", "DP", "TP", "PCP", "DCP", "EP", "req/DP"]
    assert "experts" in header and "MoE prefill/layer" in header and "assuming uniform routing" in out


# ----------------------------------------------------------------------------- the engine
SHAPE = GPTShape("llama", 3, 32, 4, 2, 48, 64, 64,
                 moe=MoEDims(num_experts=8, top_k=2, ffn_hidden_size=16, moe_layers=(False, True, True),
                             score="sigmoid", norm_topk_prob=True, num_groups=4, topk_groups=2,
                             group_score="top2_sum", score_correction_bias=True, routed_scaling_factor=2.0,
                             shared_ffn_hidden_size=16))
GATED = dataclasses.replace(SHAPE, qkv_bias=True, qk_norm=True, head_dim=16, moe=dataclasses.replace(
    SHAPE.moe, moe_layers=(True,) * 3, router_bias=True, shared_expert_gate=True, num_groups=1, topk_groups=1,
    score="softmax", score_correction_bias=False))
PROMPTS, PROMPT_LEN = 2, 12  # PCP 2 pads 12 tokens to 12: 12 rows per rank, an equal share for each TP block


def _engine_rank(rank: int, world_size: int, ep: int, dcp: int) -> dict:
    from cptoolkit.config import config_from_dict
    from cptoolkit.inference.builder import attention_runtime, kv_cache
    from cptoolkit.inference.engine import Engine
    from cptoolkit.inference.sampling import SamplingParams
    from cptoolkit.models.build import build_gpt_model, new_gpt_model
    from cptoolkit.models.tokenizer import ByteTokenizer
    from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel

    groups = initialize_model_parallel(2, 2, dcp, SHAPE.num_attention_heads, SHAPE.num_kv_heads, ep=ep,
                                       num_experts=SHAPE.moe.num_experts, timeout=datetime.timedelta(seconds=60))
    try:
        dense = {name: getattr(SHAPE, name) for name in ("num_layers", "hidden_size", "num_attention_heads",
                                                          "num_kv_heads", "ffn_hidden_size", "vocab_size",
                                                          "max_seq_len")}
        cfg = config_from_dict({"parallel": {"tp": 2, "pcp": 2, "dcp": dcp, "ep": ep}, "model": dense,
                                "runtime": {"device": "cpu"},
                                "inference": {"batch_size": PROMPTS, "kv_block_size": 4}}, source="<test>")
        params = {}
        for shape in (SHAPE, GATED):
            for dtype in (torch.float32, torch.bfloat16):
                model = new_gpt_model(shape, groups.megatron_pg_collection(), attention_runtime(cfg, groups), dtype)
                params[shape is GATED, ES[dtype]] = sum(p.numel() * p.element_size()
                                                                  for p in model.parameters())
        runtime = attention_runtime(cfg, groups)
        model = build_gpt_model(SHAPE, groups.megatron_pg_collection(), runtime, seed=1).eval()
        engine = Engine(model, runtime, groups, kv_cache(cfg, groups, SHAPE, torch.device("cpu")), ByteTokenizer(),
                        max_batch_size=PROMPTS)
        generator = torch.Generator().manual_seed(5)
        for _ in range(PROMPTS):
            engine.add_request(torch.randint(0, SHAPE.vocab_size, (PROMPT_LEN,), generator=generator).tolist(),
                               SamplingParams(temperature=0.0, max_new_tokens=2))
        steps = []
        for _ in range(2):  # the prefill of both prompts, then one decode step of both
            engine.step()
            steps.append({n: {"calls": dict(s.calls), "bytes": dict(s.bytes_sent)}
                          for n, s in sorted(runtime.per_layer_stats.items())})
            for stats in runtime.per_layer_stats.values():
                stats.reset()
        return {"params": params, "prefill": steps[0], "decode": steps[1], "layout": groups.layout}
    finally:
        destroy_model_parallel()


def _planned(layout: ParallelLayout, layer: int, phase: str) -> dict:
    """The planner's per-layer figures the engine's ``layer_stats`` count (its prefill KV routing runs without a
    tally, so it is left out here; tests/test_plan.py checks it)."""
    es, entry = 4, plan.CacheEntry.of(SHAPE)
    if phase == "prefill":
        parts = [plan.prefill_comm_per_layer(layout, SHAPE.head_dim, PROMPTS, PROMPT_LEN, "p2p", es)]
        if SHAPE.moe.is_moe_layer(layer):
            parts.append(plan.moe_prefill_comm_per_layer(layout, SHAPE.moe, SHAPE.hidden_size, PROMPTS, PROMPT_LEN,
                                                         es))
    else:
        parts = [plan.decode_comm_per_layer(layout, entry, PROMPTS, "a2a", es)]
        if SHAPE.moe.is_moe_layer(layer):
            parts.append(plan.moe_decode_comm_per_layer(layout, SHAPE.hidden_size, PROMPTS, es))
    return {"calls": dict(sum((Counter(part.calls) for part in parts), Counter())),
            "bytes": dict(sum((Counter(part.bytes_sent) for part in parts), Counter()))}


@pytest.mark.parametrize("ep, dcp", [(2, 2), (4, 4)], ids=["EP2-experts-TP-sliced", "EP4-whole-experts"])
def test_planner_equals_the_engines_parameters_and_collectives(ep, dcp):
    results = run_ranks(4, _engine_rank, ep, dcp, timeout_s=240)
    layout = results[0]["layout"]
    assert (layout.ep, layout.etp) == (ep, 4 // ep)
    for rank, got in enumerate(results):
        for (gated, es), measured in got["params"].items():
            want = plan.weight_bytes(GATED if gated else SHAPE, layout, es)
            assert measured == want, f"rank {rank} EP{ep} gated={gated} {es}-byte: model {measured:,}, plan {want:,}"
    for phase in ("prefill", "decode"):
        for layer in range(1, SHAPE.num_layers + 1):
            want = _planned(layout, layer, phase)
            assert any(name.startswith("moe_") for name in want["calls"]) == SHAPE.moe.is_moe_layer(layer)
            for rank, got in enumerate(results):
                measured = got[phase][layer]
                assert measured["calls"] == want["calls"], f"rank {rank} {phase} layer {layer}: {measured}, {want}"
                exact = {name: b for name, b in measured["bytes"].items() if name != "moe_all_to_all"}
                assert exact == {name: b for name, b in want["bytes"].items() if name != "moe_all_to_all"}, \
                    f"rank {rank} {phase} layer {layer}: {measured}, {want}"
            for group in layout.ep_groups:  # the rows dispatched over an EP group all come back
                measured = sum(results[r][phase][layer]["bytes"].get("moe_all_to_all", 0) for r in group)
                assert measured == len(group) * want["bytes"].get("moe_all_to_all", 0), (phase, layer, group)
    rows = PROMPTS * PROMPT_LEN * SHAPE.moe.top_k  # every (token, choice) of the prompts, there and back, in float32
    assert sum(results[r]["prefill"][2]["bytes"]["moe_all_to_all"] for r in layout.ep_groups[0]) == \
        2 * rows * SHAPE.hidden_size * 4
