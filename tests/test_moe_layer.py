"""The MoE layer against independent references: routing against transformers' own routers (Mixtral, Qwen2-MoE,
DeepSeek-V2 greedy and group-limited, DeepSeek-V3), the layer against a per-token float64 loop, and every expert
layout (EP x ETP inside TP x PCP, 1-4 ranks) in prefill (all-to-all dispatch) and decode (one all-reduce) against
one rank, with the collectives counted; ranks and experts with no rows included."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cptoolkit.layers.core_attention import AttentionPhase, AttentionRuntime
from cptoolkit.models.moe_dims import MoEDims
from cptoolkit.models.tp_sharding import param_kinds
from cptoolkit.moe.layer import MoEGroups, MoELayer, block_rows
from cptoolkit.moe.routing import route
from tests.multiproc import my_group, run_ranks

HIDDEN = 16
DIMS = {
    "mixtral": MoEDims(num_experts=8, top_k=2, ffn_hidden_size=12, moe_layers=(True,), norm_topk_prob=True),
    "qwen2_moe": MoEDims(num_experts=8, top_k=3, ffn_hidden_size=8, moe_layers=(True,),
                         shared_ffn_hidden_size=20, shared_expert_gate=True),
    "deepseek_v2": MoEDims(num_experts=8, top_k=3, ffn_hidden_size=8, moe_layers=(True,), num_groups=4,
                           topk_groups=2, group_score="max", routed_scaling_factor=1.5, shared_ffn_hidden_size=8),
    "deepseek_v3": MoEDims(num_experts=8, top_k=2, ffn_hidden_size=8, moe_layers=(True,), score="sigmoid",
                           norm_topk_prob=True, num_groups=4, topk_groups=2, group_score="top2_sum",
                           score_correction_bias=True, routed_scaling_factor=2.5, shared_ffn_hidden_size=8),
}


class _Config:
    """The two fields of megatron's TransformerConfig ``MoELayer`` reads, plus what ``MegatronModule`` keeps."""

    def __init__(self, dtype=torch.float64):
        self.hidden_size, self.params_dtype = HIDDEN, dtype


def _full_weights(dims: MoEDims, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random full (TP=1) weights of one MoE layer, float64, under ``MoELayer``'s parameter names."""
    g = torch.Generator().manual_seed(seed)
    E, Fh, S = dims.num_experts, dims.ffn_hidden_size, dims.shared_ffn_hidden_size
    full = {"router.weight": torch.randn(E, HIDDEN, generator=g, dtype=torch.float64),
            "experts.fc1_weight": torch.randn(E * 2 * Fh, HIDDEN, generator=g, dtype=torch.float64) / 4,
            "experts.fc2_weight": torch.randn(E * Fh, HIDDEN, generator=g, dtype=torch.float64) / 4}
    if dims.score_correction_bias:
        full["router.score_correction_bias"] = torch.rand(E, generator=g, dtype=torch.float64) * 0.5
    if dims.router_bias:
        full["router.bias"] = torch.randn(E, generator=g, dtype=torch.float64)
    if S:
        full["shared_experts.linear_fc1.weight"] = torch.randn(2 * S, HIDDEN, generator=g, dtype=torch.float64) / 4
        full["shared_experts.linear_fc2.weight"] = torch.randn(HIDDEN, S, generator=g, dtype=torch.float64) / 4
    if dims.shared_expert_gate:
        full["shared_expert_gate.weight"] = torch.randn(1, HIDDEN, generator=g, dtype=torch.float64)
    return full


def _swiglu(x, gate_up, down_t):
    gate, up = (x @ gate_up.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down_t


def _reference(x: torch.Tensor, dims: MoEDims, full: dict[str, torch.Tensor]) -> torch.Tensor:
    """The MoE block token by token in float64, its routing written from the families' definitions."""
    Fh = dims.ffn_hidden_size
    out = torch.zeros_like(x)
    for t, row in enumerate(x):
        logits = full["router.weight"] @ row + full.get("router.bias", 0)
        scores = logits.softmax(-1) if dims.score == "softmax" else logits.sigmoid()
        choice = scores + full.get("router.score_correction_bias", 0)
        if dims.num_groups > 1:
            groups = choice.view(dims.num_groups, -1)
            group_score = groups.max(-1).values if dims.group_score == "max" else groups.sort(-1).values[:, -2:].sum(-1)
            kept = set(group_score.argsort(descending=True)[:dims.topk_groups].tolist())
            choice = torch.stack([c if e // dims.experts_per_group in kept else torch.tensor(-1e30, dtype=c.dtype)
                                  for e, c in enumerate(choice)])
        chosen = choice.argsort(descending=True)[:dims.top_k]
        weights = scores[chosen]
        if dims.norm_topk_prob:
            weights = weights / weights.sum()
        weights = weights * dims.routed_scaling_factor
        for e, w in zip(chosen.tolist(), weights):
            gate_up = full["experts.fc1_weight"][e * 2 * Fh:(e + 1) * 2 * Fh]
            down_t = full["experts.fc2_weight"][e * Fh:(e + 1) * Fh]
            out[t] += w * _swiglu(row, gate_up, down_t)
        if dims.shared_ffn_hidden_size:
            shared = _swiglu(row, full["shared_experts.linear_fc1.weight"], full["shared_experts.linear_fc2.weight"].t())
            if dims.shared_expert_gate:
                shared = torch.sigmoid(full["shared_expert_gate.weight"] @ row) * shared
            out[t] += shared
    return out


def _load(layer: MoELayer, full: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> None:
    """This rank's slice of every full tensor, by the parameters' kinds (as checkpoints load)."""
    kinds = param_kinds(layer)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            selection = kinds[name].select(full[name].shape, None, tp_rank, tp_size)
            param.copy_(torch.cat([full[name].narrow(selection.dim, a, b - a) for a, b in selection.ranges],
                                  dim=selection.dim))


def _decode_runtime() -> AttentionRuntime:
    runtime = AttentionRuntime()
    runtime.phase = AttentionPhase(mode="decode", kv_caches={1: object()}, decode_positions=torch.zeros(1))
    return runtime


def _rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- routing vs transformers

def _hf_router(family: str, dims: MoEDims, weight: torch.Tensor, bias: torch.Tensor | None):
    """transformers' own router of ``family`` with ``dims`` and ``weight``: ``rows -> (weights, experts)``."""
    import transformers
    common = dict(hidden_size=HIDDEN, num_experts_per_tok=dims.top_k, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=8)
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter as Router
        config = transformers.MixtralConfig(num_local_experts=dims.num_experts, **common)
    elif family == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter as Router
        config = transformers.Qwen2MoeConfig(num_experts=dims.num_experts, norm_topk_prob=dims.norm_topk_prob,
                                             **common)
    elif family == "deepseek_v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as Router
        config = transformers.DeepseekV2Config(n_routed_experts=dims.num_experts, n_group=dims.num_groups,
                                               topk_group=dims.topk_groups, topk_method="group_limited_greedy",
                                               routed_scaling_factor=dims.routed_scaling_factor, **common)
    else:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as Router
        config = transformers.DeepseekV3Config(n_routed_experts=dims.num_experts, n_group=dims.num_groups,
                                               topk_group=dims.topk_groups, norm_topk_prob=dims.norm_topk_prob,
                                               routed_scaling_factor=dims.routed_scaling_factor, **common)
    router = Router(config).float()
    with torch.no_grad():
        router.weight.copy_(weight)
        if bias is not None:
            router.e_score_correction_bias.copy_(bias)
    return lambda rows: router(rows)[1:]


@pytest.mark.parametrize("family", sorted(DIMS))
def test_route_matches_transformers_routers(family):
    dims = DIMS[family]
    full = {k: v.float() for k, v in _full_weights(dims, seed=3).items()}
    rows = _rows(257, seed=4).float()
    bias = full.get("router.score_correction_bias")
    hf_weights, hf_experts = _hf_router(family, dims, full["router.weight"], bias)(rows)
    weights, experts, _ = route(rows @ full["router.weight"].t(), dims, bias)
    hf_sorted, order = hf_experts.sort(dim=-1)
    ours_sorted, our_order = experts.sort(dim=-1)
    assert torch.equal(ours_sorted, hf_sorted), f"{family}: chosen experts differ"
    torch.testing.assert_close(weights.gather(1, our_order), hf_weights.float().gather(1, order),
                               rtol=1e-6, atol=1e-7)


def test_group_scores_differ_between_v2_and_v3():
    """DeepSeek-V2 scores a group by its best expert, V3 by its best two: the same logits choose other groups."""
    logits = torch.tensor([[0.0, 0.0, 5.0, -9.0, 4.0, 4.0, -9.0, -9.0]])
    v2 = dataclasses.replace(DIMS["deepseek_v2"], top_k=2, num_groups=4, topk_groups=1, score="sigmoid")
    v3 = dataclasses.replace(v2, group_score="top2_sum")
    assert set(route(logits, v2)[1].flatten().tolist()) == {2, 3}  # group 1 holds the best expert
    assert set(route(logits, v3)[1].flatten().tolist()) == {4, 5}


# ----------------------------------------------------------------------------- one rank vs the float64 loop

def _one_rank_layer(dims: MoEDims, full, runtime) -> MoELayer:
    layer = MoELayer(_Config(), dims, MoEGroups(tp=None, ep=None, etp=None, replica=None), runtime)
    _load(layer, full, 0, 1)
    return layer


@pytest.mark.parametrize("family", sorted(DIMS))
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_one_rank_equals_reference(family, phase):
    dims, full = DIMS[family], _full_weights(DIMS[family], seed=1)
    layer = _one_rank_layer(dims, full, _decode_runtime() if phase == "decode" else AttentionRuntime())
    hidden = _rows(3 * 5, seed=2).view(3, 5, HIDDEN)
    out, bias = layer(hidden)
    assert bias is None
    torch.testing.assert_close(out.view(-1, HIDDEN), _reference(hidden.view(-1, HIDDEN), dims, full),
                               rtol=1e-12, atol=1e-12)


def test_block_rows_partition():
    for n in range(0, 9):
        for blocks in range(1, 5):
            spans = [block_rows(n, blocks, b) for b in range(blocks)]
            assert [i for a, b in spans for i in range(a, b)] == list(range(n))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


# ----------------------------------------------------------------------------- every expert layout vs one rank

def _groups(rank: int, tp: int, pcp: int, ep: int) -> MoEGroups:
    """The layout's expert groups for one replica (global rank = pcp_rank * tp + tp_rank), built on every rank."""
    k = ep // pcp
    etp = tp // k
    coords = {r: (r // tp, r % tp) for r in range(tp * pcp)}  # rank -> (pcp_rank, tp_rank)
    ep_rank = {r: p * k + t // etp for r, (p, t) in coords.items()}

    def rank_lists(key, order):
        return [sorted((r for r in coords if key(r) == value), key=order) for value in sorted(set(map(key, coords)))]

    tp_group = my_group(rank_lists(lambda r: coords[r][0], lambda r: coords[r][1]))
    ep_group = my_group(rank_lists(lambda r: coords[r][1] % etp, lambda r: ep_rank[r]))
    etp_group = my_group(rank_lists(lambda r: ep_rank[r], lambda r: coords[r][1] % etp))
    replica = my_group([list(range(tp * pcp))])
    return MoEGroups(tp=tp_group, ep=ep_group, etp=etp_group, replica=replica, pcp_rank=coords[rank][0])


def _layout_rank(rank, world, tp, pcp, ep, family, num_rows, phase):
    torch.manual_seed(0)
    dims, full = DIMS[family], _full_weights(DIMS[family], seed=5)
    groups = _groups(rank, tp, pcp, ep)
    runtime = _decode_runtime() if phase == "decode" else AttentionRuntime()
    layer = MoELayer(_Config(), dims, groups, runtime)
    layer.set_layer_number(1)
    _load(layer, full, rank % tp, tp)
    pcp_rank = rank // tp
    # prefill: each PCP rank its own rows (replicated over TP); decode: the same rows everywhere
    rows = _rows(num_rows, seed=10 + (pcp_rank if phase == "prefill" else 0)).requires_grad_(phase == "prefill")
    out, _ = layer(rows.view(num_rows, 1, HIDDEN))
    expected = _reference(rows.detach(), dims, full)
    grad = None
    if phase == "prefill":
        out.sum().backward()
        grad = rows.grad
    return {"max_diff": (out.view(num_rows, HIDDEN) - expected).abs().max().item() if num_rows else 0.0,
            "calls": dict(runtime.stats.calls), "grad": grad, "rows": rows.detach(),
            "expert_tokens": layer.expert_tokens.clone(),
            "expert_grads": {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}}


LAYOUTS = [(2, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2), (2, 2, 4)]  # (tp, pcp, ep)


@pytest.mark.parametrize("tp,pcp,ep", LAYOUTS)
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_expert_layouts_equal_reference(tp, pcp, ep, phase):
    family = "deepseek_v3" if (tp, pcp, ep) != (2, 2, 2) else "qwen2_moe"
    results = run_ranks(tp * pcp, _layout_rank, tp, pcp, ep, family, 7, phase)
    for rank, result in enumerate(results):
        assert result["max_diff"] < 1e-12, f"rank {rank}: max diff {result['max_diff']}"
    tokens = [r["expert_tokens"] for r in results]
    assert all(torch.equal(t, tokens[0]) for t in tokens), tokens  # the replica's whole load on every rank
    assert int(tokens[0].sum()) == 7 * DIMS[family].top_k * (pcp if phase == "prefill" else 1)
    calls = results[0]["calls"]
    if phase == "decode":
        assert calls == {"moe_all_reduce": 1}, calls
    else:
        expected = {"moe_all_reduce": 1} if tp > 1 else {}
        if ep > 1:
            expected.update(moe_counts_all_gather=1, moe_all_to_all=2)
        assert calls == expected, calls


@pytest.mark.parametrize("tp,pcp,ep", [(2, 2, 4), (2, 1, 2)])
def test_ranks_without_rows(tp, pcp, ep):
    """One row per PCP rank: a TP block with no rows, most experts with none; still exact."""
    results = run_ranks(tp * pcp, _layout_rank, tp, pcp, ep, "mixtral", 1, "prefill")
    assert all(r["max_diff"] < 1e-12 for r in results), [r["max_diff"] for r in results]


def test_prefill_gradients_equal_one_rank():
    """Backward through the dispatch (the reverse all-to-all, the TP copy): input gradients equal one rank's."""
    tp, pcp, ep = 2, 2, 4
    results = run_ranks(tp * pcp, _layout_rank, tp, pcp, ep, "deepseek_v3", 6, "prefill")
    dims, full = DIMS["deepseek_v3"], _full_weights(DIMS["deepseek_v3"], seed=5)
    for rank, result in enumerate(results):
        rows = result["rows"].clone().requires_grad_(True)
        layer = _one_rank_layer(dims, full, AttentionRuntime())
        layer(rows.view(6, 1, HIDDEN))[0].sum().backward()
        torch.testing.assert_close(result["grad"], rows.grad, rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"rank {rank}: {m}")
