"""Training an MoE model with PCP and expert parallelism equals one rank in float64: the loss, the load-balancing
loss, the step's global expert load (which drives DeepSeek-V3's bias update) and every parameter's gradient
(experts gathered over EP x ETP, the rest over TP), at EP = PCP (experts TP-sliced) and EP = TP·PCP (whole
experts), with DP, odd sequence lengths (PCP padding kept out of the load) and ranks whose TP block has few
rows."""
from __future__ import annotations

import pytest
import torch

from cptoolkit.models.moe_dims import MoEDims
from cptoolkit.models.shape import GPTShape
from tests.multiproc import run_ranks

SHAPE = GPTShape(arch="llama", num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=4,
                 ffn_hidden_size=48, vocab_size=64, max_seq_len=64,
                 moe=MoEDims(num_experts=8, top_k=2, ffn_hidden_size=16, moe_layers=(False, True), score="sigmoid",
                             norm_topk_prob=True, num_groups=4, topk_groups=2, group_score="top2_sum",
                             score_correction_bias=True, routed_scaling_factor=2.0, shared_ffn_hidden_size=16))
# gpt-oss's block: sinks, q/k/v/o biases, a windowed and a full layer, router and expert biases, the clamped
# interleaved SwiGLU (a low limit, so the clamps act); at EP = PCP its experts' down biases live on each ETP group.
GPT_OSS = GPTShape(arch="llama", num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2,
                   ffn_hidden_size=16, vocab_size=64, max_seq_len=64, qkv_bias=True, attention_out_bias=True,
                   attention_sinks=True, sliding_window=5, sliding_layers=(True, False),
                   moe=MoEDims(num_experts=8, top_k=2, ffn_hidden_size=16, moe_layers=(True, True),
                               norm_topk_prob=True, router_bias=True, expert_bias=True, activation="gpt_oss",
                               swiglu_limit=0.05))
SHAPES = {"deepseek": SHAPE, "gpt_oss": GPT_OSS}
WINDOWS = 4
AUX_COEF = 0.5  # large, so a wrong aux gradient shows in every router gradient
# Measured (CPU, gloo): the model is float64 but megatron's vocab-parallel cross entropy and the attention's LSE
# merge round in float32 (as for a dense model), so layouts differ from one rank by up to 5e-8 relative in the
# loss, 1.6e-11 in the aux loss, 7.1e-8 of a parameter's largest gradient entry and 1.5e-10 in the gradient norm;
# the expert load is exactly equal. A wrong reduction or a missing gradient path is off by 1e-3 or more.
LOSS_RTOL, AUX_RTOL, GRAD_RTOL, NORM_RTOL = 2e-7, 1e-10, 5e-7, 1e-8


def _windows() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, SHAPE.vocab_size, (length,), generator=g) for length in (20, 13, 18, 9)]


def _step(rank, world, tp, pcp, ep, dp, aux_coef=AUX_COEF, shape_name="deepseek"):
    from cptoolkit.layers.comm import CommStats
    from cptoolkit.layers.core_attention import AttentionRuntime
    from cptoolkit.models.build import build_gpt_model
    from cptoolkit.models.tp_sharding import gather_full_state_dict, load_full_state_dict
    from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
    from cptoolkit.training.data import get_batch_on_this_pcp_rank, pack_windows
    from cptoolkit.training.trainer import compute_gradients, grad_norm

    shape = SHAPES[shape_name]
    groups = initialize_model_parallel(tp, pcp, pcp, shape.num_attention_heads, shape.num_kv_heads, dp=dp, ep=ep,
                                       num_experts=shape.moe.num_experts)
    try:
        runtime = AttentionRuntime(pcp_group=groups.pcp_group, stats=CommStats())
        model = build_gpt_model(shape, groups.megatron_pg_collection(), runtime, dtype=torch.float64, seed=3)
        full = gather_full_state_dict(model)  # biases off zero (in the full tensors), so their placement matters
        for name, tensor in full.items():
            if name.endswith("bias") and "score_correction" not in name:
                full[name] = torch.linspace(-0.2, 0.3, tensor.numel(), dtype=tensor.dtype).view_as(tensor)
        load_full_state_dict(model, full)
        with torch.no_grad():  # a non-zero correction bias, so it really steers the choice
            for module in model.modules():
                if getattr(module, "score_correction_bias", None) is not None:
                    module.score_correction_bias.copy_(torch.linspace(-0.3, 0.3, shape.moe.num_experts))
        per_replica = WINDOWS // dp
        mine = _windows()[groups.rank_info.dp_rank * per_replica:(groups.rank_info.dp_rank + 1) * per_replica]
        batch = get_batch_on_this_pcp_rank(pack_windows(mine), groups.rank_info.pcp_rank, pcp, pad_id=0)
        result = compute_gradients(model, runtime, batch, groups, aux_loss_coef=aux_coef)
        norm = grad_norm(model, groups)
        params = list(model.parameters())
        weights = [p.data for p in params]
        for param in params:
            param.data = param.grad if param.grad is not None else torch.zeros_like(param)
        try:
            grads = gather_full_state_dict(model)
        finally:
            for param, weight in zip(params, weights):
                param.data = weight
        return {"loss": result.loss, "aux": result.aux_loss, "load": result.expert_load, "norm": norm,
                "grads": grads, "calls": dict(runtime.stats.calls)}
    finally:
        destroy_model_parallel()


@pytest.fixture(scope="module")
def references():
    return {name: run_ranks(1, _step, 1, 1, 1, 1, shape_name=name)[0] for name in SHAPES}


@pytest.fixture(scope="module")
def reference(references):
    return references["deepseek"]


@pytest.mark.parametrize("shape_name,tp,pcp,ep,dp", [("deepseek", 2, 2, 2, 1), ("deepseek", 2, 2, 4, 1),
                                                     ("deepseek", 1, 2, 2, 2), ("deepseek", 2, 1, 2, 1),
                                                     ("deepseek", 2, 1, 1, 1), ("gpt_oss", 2, 2, 2, 1),
                                                     ("gpt_oss", 2, 2, 4, 1)])
def test_moe_training_equals_one_rank(references, shape_name, tp, pcp, ep, dp):
    reference = references[shape_name]
    results = run_ranks(tp * pcp * dp, _step, tp, pcp, ep, dp, shape_name=shape_name, timeout_s=180)
    moe_layers = sum(SHAPES[shape_name].moe.moe_layers)
    assert reference["aux"] > 0 and reference["load"].sum() == 2 * moe_layers * sum(len(w) - 1 for w in _windows())
    for rank, got in enumerate(results):
        assert abs(got["loss"] - reference["loss"]) < LOSS_RTOL * reference["loss"], (rank, got["loss"])
        assert abs(got["aux"] - reference["aux"]) < AUX_RTOL * reference["aux"], (rank, got["aux"])
        assert torch.equal(got["load"], reference["load"]), (rank, got["load"], reference["load"])
        assert abs(got["norm"] - reference["norm"]) < NORM_RTOL * reference["norm"], (rank, got["norm"])
        for name, want in reference["grads"].items():
            scale = want.abs().max().item() or 1.0
            diff = (got["grads"][name] - want).abs().max().item()
            assert diff < GRAD_RTOL * scale, f"rank {rank} {name}: max diff {diff:.3g} of {scale:.3g}"


def test_aux_loss_has_a_gradient(reference):
    """The router's gradient with the aux loss differs from without: the loss is not only reported."""
    without = run_ranks(1, _step, 1, 1, 1, 1, aux_coef=0.0)[0]["grads"]
    router = "decoder.layers.1.mlp.router.weight"
    assert (without[router] - reference["grads"][router]).abs().max() > 1e-6


def test_update_expert_bias_moves_toward_balance():
    from cptoolkit.layers.core_attention import AttentionRuntime
    from cptoolkit.moe.layer import MoEGroups, MoELayer
    from cptoolkit.training.moe_balance import update_expert_bias

    class Config:
        hidden_size, params_dtype = 8, torch.float32

    dims = SHAPE.moe
    layer = MoELayer(Config(), dims, MoEGroups(None, None, None, None), AttentionRuntime())
    with torch.no_grad():
        layer.router.score_correction_bias.zero_()
    load = torch.tensor([[9.0, 1.0, 4.0, 4.0, 4.0, 4.0, 4.0, 2.0]])  # mean 4
    update_expert_bias([layer], load, rate=0.01)
    assert layer.router.score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0, 0, 0, 0.01])
