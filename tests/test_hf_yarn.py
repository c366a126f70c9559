"""YaRN checkpoints made by transformers give transformers' own RoPE, logits and greedy tokens, for every mix of
the fields its ``_compute_yarn_parameters`` reads: a ``factor`` that differs from ``max_position_embeddings /
original_max_position_embeddings`` (transformers warns and uses the explicit factor; Qwen2.5's long-context
recipe writes such configs), a factor equal to that ratio, a null factor (the ratio), ``mscale`` with
``mscale_all_dim``, non-default ``beta_fast`` / ``beta_slow`` without truncation, an explicit
``attention_factor`` (it wins over ``mscale``), and a top-level ``original_max_position_embeddings`` (it wins
over the one in ``rope_parameters``, as in transformers' ``standardize_rope_params``).

transformers multiplies RoPE's cos and sin by the attention factor, so every q·k by its square; cptoolkit
rotates with unscaled cos and sin and multiplies the softmax scale by that square (``build.megatron_config``).
Each model is a tiny random Qwen2 (q/k/v biases) or Llama with the issue's shape (2 layers, hidden 128, 8 heads,
2 KV heads), ``initializer_range=0.2`` and its norms and biases moved off 1 and 0, so every position matters;
the 40-token prompt runs past ``original_max_position_embeddings``. A YaRN field cptoolkit cannot honour is
refused in one line naming the field, its value and the rule.
"""
import copy
import importlib
import math
from types import SimpleNamespace

import pytest
import torch

from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.models.build import megatron_config
from cptoolkit.models.gpt import rotary_freqs
from cptoolkit.models.rope import inv_freq
from cptoolkit.models.families.registry import read_hf_config
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.multiproc import run_ranks
from tests.hf_checkpoints import VOCAB, recorded_logits, word_tokenizer

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, rms_norm_eps=1e-6, initializer_range=0.2, bos_token_id=1, eos_token_id=None,
             pad_token_id=0)
PROMPT_LEN, MAX_NEW = 40, 6
# Logits agree to this fraction of transformers' largest logit, as in tests/test_hf_families.py (measured worst:
# 3.8e-6 at 1 rank, 3.2e-6 at TP2 x PCP2 x DCP4; the same models with unscaled RoPE differ by up to 2.1e-6, so
# this is float32 summation order, not YaRN).
RTOL = 1e-5
ISSUE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
# case -> (rope_parameters, max_position_embeddings, other config keys)
VARIANTS = {
    "issue: factor 4, max / original 16": (ISSUE, 256, {}),
    "factor = max / original": (ISSUE, 64, {}),
    "factor null: max / original": ({**ISSUE, "factor": None}, 128, {}),
    "mscale and mscale_all_dim": ({**ISSUE, "mscale": 1.0, "mscale_all_dim": 0.5}, 256, {}),
    # theta 100 puts dimensions 0.42-4.03 on the ramp (defaults 32 and 1: 0-1.62), at fractional ends untruncated.
    "beta_fast 2, beta_slow 0.25, untruncated": (
        {**ISSUE, "beta_fast": 2, "beta_slow": 0.25, "truncate": False, "rope_theta": 100.0}, 256, {}),
    "explicit attention_factor over mscale": (
        {**ISSUE, "attention_factor": 1.3, "mscale": 1.0, "mscale_all_dim": 0.5}, 256, {}),
    "top-level original_max_position_embeddings": (ISSUE, 256, {"original_max_position_embeddings": 32}),
}
# family -> (config class, model class, rotary embedding module)
FAMILIES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2RotaryEmbedding"),
            "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaRotaryEmbedding")}
CASES = [(family, variant) for family in FAMILIES for variant in VARIANTS]


def _config_keys(variant: str) -> dict:
    """The case's config.json keys (family aside), as a person would write them."""
    rope, max_positions, extra = VARIANTS[variant]
    return {**SIZES, **copy.deepcopy(extra), "max_position_embeddings": max_positions,
            "rope_parameters": copy.deepcopy(rope)}


def _hf_config(family: str, variant: str):
    return getattr(transformers, FAMILIES[family][0])(**_config_keys(variant))


@pytest.mark.parametrize("family, variant", CASES)
def test_rope_cos_sin_and_softmax_scale_are_transformers_own(family, variant):
    """Same inverse frequencies, bit for bit, as transformers' rotary module; cptoolkit's cos and sin times the
    attention factor equal transformers' at positions 0-255; the softmax scale carries the factor's square."""
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    rotary = getattr(modeling, FAMILIES[family][2])(_hf_config(family, variant))
    # The keys as written, not transformers' standardized copy: a top-level original_max_position_embeddings
    # differs here from the one in rope_parameters.
    shape = read_hf_config({**_config_keys(variant), "model_type": family})
    factor = shape.rope_scaling.attention_factor
    assert torch.equal(inv_freq(shape), rotary.inv_freq), variant
    assert factor == rotary.attention_scaling, variant

    positions = torch.arange(256).unsqueeze(0)
    want_cos, want_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)  # [1, s, head_dim]
    rope_only = SimpleNamespace(rotary_pos_emb=SimpleNamespace(inv_freq=inv_freq(shape)))  # what rotary_freqs reads
    angles = rotary_freqs(rope_only, positions)[:, 0, 0]  # [s, head_dim]
    torch.testing.assert_close(angles.cos() * factor, want_cos[0], rtol=0, atol=0)
    torch.testing.assert_close(angles.sin() * factor, want_sin[0], rtol=0, atol=0)
    softmax_scale = megatron_config(shape, 1, torch.float32).softmax_scale
    assert math.isclose(softmax_scale, factor ** 2 / math.sqrt(shape.head_dim), rel_tol=1e-15), variant


# ----------------------------------------------------------------------------- logits and greedy tokens

def _hf_model(family: str, variant: str):
    config = _hf_config(family, variant)
    model = getattr(transformers, FAMILIES[family][1])(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norms at 1 and q/k/v biases at 0 would hide a misplaced one
                param.add_(torch.randn_like(param) * 0.2)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(family, variant): (checkpoint_dir, prompt, transformers' greedy tokens, its logits per new token)}."""
    cases = {}
    for seed, case in enumerate(CASES):
        torch.manual_seed(seed)
        model = _hf_model(*case)
        directory = tmp_path_factory.mktemp("yarn")
        model.save_pretrained(directory)
        word_tokenizer().save_pretrained(directory)
        prompt = torch.randint(2, VOCAB, (PROMPT_LEN,)).tolist()
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False)
            logits = model(out[:, :-1]).logits[0, PROMPT_LEN - 1:]
        cases[case] = (str(directory), prompt, out[0, PROMPT_LEN:].tolist(), logits)
    return cases


def _generate_rank(rank, world_size, cases, layout):
    """{case: (generated tokens, max and mean of |logits - transformers'| / max |transformers'|)} on this rank,
    at ``layout`` (tp, pcp, dcp)."""
    tp, pcp, dcp = layout
    results = {}
    for case, (directory, prompt, _, want_logits) in cases.items():
        cfg = config_from_dict({"parallel": dict(tp=tp, pcp=pcp, dcp=dcp), "model": {"checkpoint": directory},
                                "runtime": {"device": "cpu"},
                                "inference": {"prompts": ["unused"], "batch_size": 1, "kv_block_size": 4}},
                               source="<test>")
        groups = initialize_model_parallel(tp=tp, pcp=pcp, dcp=dcp, num_heads=cfg.model.num_attention_heads,
                                           num_kv_heads=cfg.model.num_kv_heads)
        try:
            engine = build_engine(cfg, groups, torch.device("cpu"))
            rows = recorded_logits(engine)
            generated = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
        finally:
            destroy_model_parallel()
        diff = (torch.stack(rows[0]).double() - want_logits.double()).abs() / want_logits.abs().max()
        results[case] = (generated[0].token_ids, float(diff.max()), float(diff.mean()))
    return results


def _check(cases, per_rank, layout):
    for rank, results in enumerate(per_rank):
        assert set(results) == set(cases)
        for case, (tokens, max_err, mean_err) in results.items():
            label, want_tokens = f"rank {rank}, {case}, TP x PCP x DCP = {layout}", cases[case][2]
            assert tokens == want_tokens, f"{label}: {tokens} != transformers {want_tokens}"
            assert max_err <= RTOL, (f"{label}: logits differ by max {max_err:.3g}, mean {mean_err:.3g} of "
                                     "transformers' largest logit")


def test_every_yarn_variant_generates_transformers_tokens_at_one_rank(checkpoints):
    _check(checkpoints, run_ranks(1, _generate_rank, checkpoints, (1, 1, 1), timeout_s=120), (1, 1, 1))


def test_the_issue_config_generates_transformers_tokens_at_tp2_pcp2_dcp4(checkpoints):
    issue = {case: checkpoints[case] for case in [("qwen2", "issue: factor 4, max / original 16")]}
    _check(issue, run_ranks(4, _generate_rank, issue, (2, 2, 4), timeout_s=120), (2, 2, 4))


# ----------------------------------------------------------------------------- refused at load

REFUSED = {  # case: (rope_parameters changes, the message)
    "zero attention_factor": ({"attention_factor": 0}, r"^attention_factor=0; rule: must be a positive number$"),
    "negative attention_factor": ({"attention_factor": -1.3},
                                  r"^attention_factor=-1\.3; rule: must be a positive number$"),
    "zero factor": ({"factor": 0}, r"^factor=0; rule: must be a positive number$"),
    "zero original_max_position_embeddings": ({"original_max_position_embeddings": 0},
                                              r"^original_max_position_embeddings=0; rule: must be a positive "
                                              r"integer$"),
    "beta_fast not a number": ({"beta_fast": "fast"}, r"^beta_fast='fast'; rule: must be a positive number$"),
    "negative beta_slow": ({"beta_slow": -1}, r"^beta_slow=-1; rule: must be a positive number$"),
    "mscale not a number": ({"mscale": "x", "mscale_all_dim": 1.0}, r"^mscale='x'; rule: must be a number$"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_yarn_fields_cptoolkit_cannot_honour_are_refused_with_field_value_and_rule(case):
    changes, message = REFUSED[case]
    config = {**_config_keys("issue: factor 4, max / original 16"), "model_type": "qwen2"}
    config["rope_parameters"].update(changes)
    with pytest.raises(ValueError, match=message):
        read_hf_config(config)
