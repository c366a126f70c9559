"""The decode step's layers without megatron's module chain (``cptoolkit.models.decode_layers``) give the very logits
megatron's modules give: bit for bit, every step, for Llama-shaped models (tied embeddings or not) at batch 1 and 3
with prompts of different lengths; models it cannot replay (TP = 2) are left to megatron's modules. Q/K/V biases
(Qwen2) are covered against transformers by tests/test_hf_families.py and bench/vs_transformers.py."""
import pytest
import torch

import cptoolkit.models.gpt as gpt_module
from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.model_runner import ModelRunner
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.models import decode_layers
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.multiproc import run_ranks

MODEL = {"num_layers": 3, "hidden_size": 64, "num_attention_heads": 8, "num_kv_heads": 2, "ffn_hidden_size": 96,
         "vocab_size": 320, "max_seq_len": 96, "seed": 7}
SHAPES = {"llama": {}, "tied": {"tie_embeddings": True}}
PROMPTS = ["a b a b a b a b", "KV shards merge by log-sum-exp", "x"]


def _decode_logits(rank: int, world_size: int, extra: dict, tp: int, batch: int, fast: bool):
    """Every decode step's logits of a greedy run; whether the model was replayed."""
    cfg = config_from_dict({"parallel": {"tp": tp}, "runtime": {"device": "cpu"}, "model": {**MODEL, **extra},
                            "inference": {"prompts": ["x"], "batch_size": 3, "kv_block_size": 4}}, source="<test>")
    groups = initialize_model_parallel(tp=tp, pcp=1, dcp=1, num_heads=cfg.model.num_attention_heads,
                                       num_kv_heads=cfg.model.num_kv_heads)
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        supported = decode_layers.supports(engine.model)
        if not fast:
            gpt_module.decode_layers.supports = lambda model: False
        steps, decode = [], ModelRunner.decode

        def recording(self, *args):
            logits = decode(self, *args)
            steps.append(logits.clone())
            return logits

        ModelRunner.decode = recording
        engine.generate(PROMPTS[:batch], SamplingParams(temperature=0.0, max_new_tokens=6))
        return steps, supported
    finally:
        destroy_model_parallel()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_replayed_layers_give_megatrons_logits_bit_for_bit(name, batch):
    (fast, supported), = run_ranks(1, _decode_logits, SHAPES[name], 1, batch, True)
    (reference, _), = run_ranks(1, _decode_logits, SHAPES[name], 1, batch, False)
    assert supported, f"{name}: decode_layers.supports is False for a plain dense model at TP=1"
    assert len(fast) == len(reference) == 5
    for step, (got, want) in enumerate(zip(fast, reference)):
        assert torch.equal(got, want), (f"{name}, batch {batch}, step {step}: max abs diff "
                                        f"{(got - want).abs().max().item():.3e}, mean "
                                        f"{(got - want).abs().mean().item():.3e}")


def test_tp2_is_left_to_megatron():
    results = run_ranks(2, _decode_logits, {}, 2, 1, True)
    assert [supported for _, supported in results] == [False, False]
