"""An inference forward's layers without megatron's module chain (``cptoolkit.models.inference_layers``) give the
very logits megatron's modules give: bit for bit, every prefill and decode step, for Llama-shaped models (tied
embeddings or not) at batch 1 and 3 with prompts of different lengths, at TP = 1, TP = 2, TP = 2 x DCP = 2 and
PCP = 2 (ring prefill) x DCP = 2 (prefill in chunks of 8, so later chunks attend to cached history), when the
products are computed megatron's way (``runtime.tune_matmuls: false``); with each of the plan's formulations forced
on every product the greedy tokens are the same and the logits agree to float32 rounding; with the default tuning,
a short generation settles every decode product, the same choice on every rank. Q/K/V biases (Qwen2) are covered
against transformers by tests/test_hf_families.py and bench/vs_transformers.py."""
import pytest
import torch

import cptoolkit.models.gpt as gpt_module
from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.model_runner import ModelRunner
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.models import inference_layers
from cptoolkit.models.matmul_plan import FORMULATIONS, MatmulPlan
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.multiproc import run_ranks

MODEL = {"num_layers": 3, "hidden_size": 64, "num_attention_heads": 8, "num_kv_heads": 2, "ffn_hidden_size": 96,
         "vocab_size": 320, "max_seq_len": 96, "seed": 7}
SHAPES = {"llama": {}, "tied": {"tie_embeddings": True}}
PROMPTS = ["a b a b a b a b", "KV shards merge by log-sum-exp", "x"]


def _step_logits(rank: int, world_size: int, extra: dict, tp: int, pcp: int, dcp: int, batch: int, fast: bool,
                 formulation: str | None = None):
    """Every prefill and decode step's logits and the greedy tokens of a run; whether the model was replayed.
    ``formulation``: the one every product of the plan uses (None: megatron's ``x @ W^T``, no plan measured)."""
    inference = {"prompts": ["x"], "batch_size": 3, "kv_block_size": 4}
    if pcp > 1:
        inference["prefill_chunk_size"] = 8
    cfg = config_from_dict({"parallel": {"tp": tp, "pcp": pcp, "dcp": dcp},
                            "runtime": {"device": "cpu", "tune_matmuls": False}, "model": {**MODEL, **extra},
                            "inference": inference}, source="<test>")
    groups = initialize_model_parallel(tp=tp, pcp=pcp, dcp=dcp, num_heads=cfg.model.num_attention_heads,
                                       num_kv_heads=cfg.model.num_kv_heads)
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        supported = inference_layers.supports(engine.model)
        if formulation is not None:
            engine.model.matmul_plan = MatmulPlan({
                (w.shape[0], w.shape[1], w.dtype): {b: formulation for b in (1, 2, 4)}
                for w in engine.model.parameters() if w.dim() == 2})
        if not fast:
            gpt_module.inference_layers.supports = lambda model: False
        steps, decode, prefill = [], ModelRunner.decode, ModelRunner.prefill

        def recording_decode(self, *args):
            logits = decode(self, *args)
            steps.append(logits.clone())
            return logits

        def recording_prefill(self, *args):
            logits, lengths = prefill(self, *args)
            steps.append(logits.clone())
            return logits, lengths

        ModelRunner.decode, ModelRunner.prefill = recording_decode, recording_prefill
        results = engine.generate(PROMPTS[:batch], SamplingParams(temperature=0.0, max_new_tokens=6))
        return steps, supported, [r.token_ids for r in results]
    finally:
        destroy_model_parallel()


@pytest.mark.parametrize("tp,pcp,dcp,batch,name", [
    (1, 1, 1, 1, "llama"), (1, 1, 1, 3, "llama"), (1, 1, 1, 1, "tied"), (1, 1, 1, 3, "tied"), (2, 1, 1, 3, "llama"),
    (2, 1, 2, 3, "tied"), (1, 2, 2, 3, "llama")])
def test_replayed_layers_give_megatrons_logits_bit_for_bit(tp, pcp, dcp, batch, name):
    world = tp * pcp
    fast = run_ranks(world, _step_logits, SHAPES[name], tp, pcp, dcp, batch, True)
    reference = run_ranks(world, _step_logits, SHAPES[name], tp, pcp, dcp, batch, False)
    for rank, ((got_steps, supported, _), (want_steps, _, _)) in enumerate(zip(fast, reference)):
        assert supported, f"{name}: inference_layers.supports is False for a plain dense model at TP={tp}"
        assert len(got_steps) == len(want_steps) >= 6  # one prefill (or more, in chunks) and 5 decode steps
        for step, (got, want) in enumerate(zip(got_steps, want_steps)):
            assert torch.equal(got, want), (f"{name}, TP={tp} PCP={pcp} DCP={dcp}, rank {rank}, batch {batch}, "
                                            f"step {step}: max abs diff {(got - want).abs().max().item():.3e}")


@pytest.mark.parametrize("formulation", sorted(FORMULATIONS))
def test_every_formulation_of_the_plan_gives_megatrons_tokens(formulation):
    """Every product of up to 4 rows (decode at batch 3, the prefill's last-token logits) as ``formulation``."""
    (planned, _, planned_tokens), = run_ranks(1, _step_logits, {}, 1, 1, 1, 3, True, formulation)
    (reference, _, tokens), = run_ranks(1, _step_logits, {}, 1, 1, 1, 3, False)
    assert planned_tokens == tokens
    for step, (got, want) in enumerate(zip(planned, reference)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{formulation}, step {step}")


def _tuned_choice(rank: int, world_size: int, tp: int, dcp: int):
    cfg = config_from_dict({"parallel": {"tp": tp, "dcp": dcp}, "runtime": {"device": "cpu"}, "model": MODEL,
                            "inference": {"prompts": ["x"], "batch_size": 3, "kv_block_size": 4}}, source="<test>")
    groups = initialize_model_parallel(tp=tp, pcp=1, dcp=dcp, num_heads=cfg.model.num_attention_heads,
                                       num_kv_heads=cfg.model.num_kv_heads)
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=8))
        shapes = {(w.shape[0], w.shape[1], w.dtype) for w in engine.model.parameters() if w.dim() == 2}
        return engine.model.matmul_plan.choice, shapes
    finally:
        destroy_model_parallel()


@pytest.mark.parametrize("tp,dcp", [(1, 1), (2, 2)])
def test_the_engine_tunes_every_decode_product_and_its_ranks_agree(tp, dcp):
    """``runtime.tune_matmuls`` (the default): 7 decode steps at batch 1 settle every replayed layer's shape and the
    vocabulary (one product a step, 3 formulations x 2 timings) at bucket 1, the same choice on every rank."""
    results = run_ranks(tp, _tuned_choice, tp, dcp)
    choice, shapes = results[0]
    # every 2-D parameter is a replayed product's weight (QKV, projection, fc1, fc2) or the vocabulary's (the
    # embedding shares the output layer's shape)
    assert set(choice) == shapes and all(set(by_bucket) == {1} for by_bucket in choice.values()), choice
    assert all(other == choice for other, _ in results[1:])
