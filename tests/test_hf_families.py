"""Every supported Hugging Face family generates transformers' own greedy tokens, with transformers' logits,
at one rank and at TP=2 x PCP=2 x DCP=2 and DCP=4; what cptoolkit would compute differently is refused at
load with one line naming the key, its value and the rule.

Each family is a tiny random model that transformers builds and saves itself (``tests/hf_checkpoints.py``:
norm weights and biases moved off their 1 and 0, so a misplaced one shows). RoPE scaling uses
``original_max_position_embeddings=16`` and prompts of 21 and 29 tokens, so prefill and decode run at
positions past it. Across the families every pairing of prefill comm (p2p, all_gather), decode comm (a2a,
ag_rs) and DCP (2, 4) runs. One 1-rank job and one 4-rank job load every family; each rank records the
logits the engine samples from and compares them with transformers' (relative to their largest magnitude).
"""
import json
import re
import shutil

import pytest
import torch

from cptoolkit.config import ConfigError, config_from_dict, load_config
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.models.rope import inv_freq
from cptoolkit.models.families.registry import SUPPORTED, read_hf_config, write_hf_config
from cptoolkit.models.shape import GemmaBlock
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.hf_checkpoints import (FAMILIES, LLAMA_SIZES, VOCAB, YARN, greedy_reference, hf_model, recorded_logits,
                                  save_checkpoint)
from tests.multiproc import run_ranks

transformers = pytest.importorskip("transformers")

PROMPT_LENS = (21, 29)
MAX_NEW = 8
# Logits agree to this fraction of transformers' largest logit (measured worst: 1.9e-6, llama3 at DCP = 4; the
# YaRN models fold their attention factor into the softmax scale where transformers scales cos and sin).
RTOL = 1e-5
# The windowed families prefill in chunks (a window longer than the chunk: Mistral's, Gemma 2's; shorter: Qwen2's,
# Gemma 3's), every prompt twice. Mistral's and Gemma 2's windowed layers live in ring caches that wrap several
# times per sequence (no prefix caching: HybridKVCache); Qwen2's and Gemma 3's with prefix caching, the second run
# attending the window through reused pages.
CHUNKED = {"mistral_swa": (4, False), "qwen2_swa": (8, True), "gemma2": (4, False), "gemma3": (8, True)}
# (tp, pcp, dcp, prefill_comm, decode_comm): every family runs DCP = 2 and DCP = 4, with the comms swapped for
# every other family, so each comm meets each DCP size.
LAYOUTS = ((2, 2, 2, "p2p", "a2a"), (2, 2, 4, "all_gather", "ag_rs"))
SWAPPED = ((2, 2, 2, "all_gather", "ag_rs"), (2, 2, 4, "p2p", "a2a"))
SINGLE_RANK = ((1, 1, 1, "p2p", "a2a"),)


def _layouts(world_size: int) -> dict[str, tuple]:
    if world_size == 1:
        return {name: SINGLE_RANK for name in FAMILIES}
    return {name: (LAYOUTS, SWAPPED)[i % 2] for i, name in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{family: (checkpoint_dir, prompts, transformers' greedy tokens, transformers' logits per new token)}."""
    cases = {}
    for seed, name in enumerate(FAMILIES):
        torch.manual_seed(seed)
        model = hf_model(name)
        directory = save_checkpoint(model, tmp_path_factory.mktemp(name))
        prompts = [torch.randint(2, VOCAB, (n,)).tolist() for n in PROMPT_LENS]
        tokens, logits = greedy_reference(model, prompts, MAX_NEW)
        cases[name] = (directory, prompts, tokens, logits)
    return cases


def _families_rank(rank, world_size, cases):
    """{(family, layout): (generated tokens, max and mean of |logits - transformers'| / max |transformers'|)}."""
    results = {}
    for name, layouts in _layouts(world_size).items():
        directory, prompts, _, want_logits = cases[name]
        for tp, pcp, dcp, prefill_comm, decode_comm in layouts:
            cfg = config_from_dict({
                "parallel": dict(tp=tp, pcp=pcp, dcp=dcp, prefill_comm=prefill_comm, decode_comm=decode_comm),
                "model": {"checkpoint": directory}, "runtime": {"device": "cpu"},
                "inference": {"prompts": ["unused"], "batch_size": 2, "kv_block_size": 4,
                              "prefill_chunk_size": CHUNKED.get(name, (None,))[0],
                              "prefix_caching": CHUNKED.get(name, (None, False))[1]}},
                source="<test>")
            repeats = 2 if name in CHUNKED else 1
            groups = initialize_model_parallel(tp=tp, pcp=pcp, dcp=dcp, num_heads=cfg.model.num_attention_heads,
                                               num_kv_heads=cfg.model.num_kv_heads)
            try:
                engine = build_engine(cfg, groups, torch.device("cpu"))
                got_logits = recorded_logits(engine)
                generated = engine.generate(prompts * repeats,
                                            SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
            finally:
                destroy_model_parallel()
            diffs = [(torch.stack(got_logits[index]).double() - want.double()).abs() / want.abs().max()
                     for index, want in enumerate(want_logits * repeats)]
            results[name, (tp, pcp, dcp, prefill_comm, decode_comm)] = (
                [r.token_ids for r in generated[:len(prompts)]], [r.token_ids for r in generated[len(prompts):]],
                sum(r.metrics.cached_prompt_tokens for r in generated), max(float(d.max()) for d in diffs),
                float(torch.cat([d.flatten() for d in diffs]).mean()))
    return results


def _check(cases, per_rank):
    for rank, results in enumerate(per_rank):
        assert {name for name, _ in results} == set(FAMILIES)
        for (name, layout), (tokens, repeated, cached, max_err, mean_err) in results.items():
            label, want_tokens = f"rank {rank}, {name}, layout {layout}", cases[name][2]
            assert tokens == want_tokens, f"{label}: {tokens} != transformers {want_tokens}"
            if name in CHUNKED:  # the second run of each prompt: the same tokens, from reused pages if cached
                assert repeated == want_tokens and (cached > 0) == CHUNKED[name][1], (label, repeated, cached)
            assert max_err <= RTOL, (f"{label}: logits differ by max {max_err:.3g}, mean {mean_err:.3g} of "
                                     "transformers' largest logit")


def test_every_family_generates_transformers_tokens_at_one_rank(families):
    _check(families, run_ranks(1, _families_rank, families, timeout_s=120))


def test_every_family_generates_transformers_tokens_at_tp2_pcp2_dcp2_and_dcp4(families):
    _check(families, run_ranks(4, _families_rank, families, timeout_s=240))


# ----------------------------------------------------------------------------- RoPE frequencies

def _rope_cases():
    """(case, transformers config) for every rope_type cptoolkit supports, with explicit and derived
    head_dim and YaRN's three ways to get its attention factor."""
    yarn = {**YARN, "beta_fast": 8, "beta_slow": 2, "truncate": False}
    ropes = {"default": {"rope_type": "default", "rope_theta": 500.0},
             "linear": FAMILIES["llama_linear"][2]["rope_parameters"],
             "llama3": FAMILIES["llama3"][2]["rope_parameters"],
             "yarn": YARN, "yarn betas untruncated": yarn,
             "yarn mscale": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5},
             "yarn attention_factor": {**YARN, "attention_factor": 1.3}}
    for case, rope in ropes.items():
        yield f"llama {case}", transformers.LlamaConfig(**LLAMA_SIZES, rope_parameters=dict(rope))
        yield f"qwen3 head_dim 32 {case}", transformers.Qwen3Config(**LLAMA_SIZES, head_dim=32,
                                                                     rope_parameters=dict(rope))


ROPE_CASES = dict(_rope_cases())


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_frequencies_and_attention_factor_are_transformers_own(case):
    config = ROPE_CASES[case]
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope_type = config.rope_parameters["rope_type"]
    init = LlamaRotaryEmbedding.compute_default_rope_parameters if rope_type == "default" else \
        ROPE_INIT_FUNCTIONS[rope_type]
    want_inv_freq, want_factor = init(config)
    shape = read_hf_config(config.to_dict())
    assert torch.equal(inv_freq(shape), want_inv_freq), case
    assert shape.rope_scaling.attention_factor == want_factor, case
    assert read_hf_config(write_hf_config(shape)) == shape  # a cptoolkit checkpoint keeps the scaling


def test_older_configs_with_rope_scaling_and_a_top_level_rope_theta_read_the_same():
    """Llama 3.1 / Qwen2.5 config.json files written before transformers 5: ``rope_scaling`` with ``type``
    or ``rope_type``, ``rope_theta`` at the top level."""
    new = read_hf_config(transformers.LlamaConfig(**LLAMA_SIZES, rope_parameters=dict(YARN)).to_dict())
    old = {**write_hf_config(new), "rope_theta": YARN["rope_theta"], "rope_parameters": None,
           "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}
    assert read_hf_config(old) == new


# ----------------------------------------------------------------------------- refused at load

def _hf_config(name: str, **changes) -> dict:
    config = hf_model(name).config.to_dict()
    config.update(changes)
    return config


REFUSED = {
    "dynamic NTK RoPE": (_hf_config("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                               "rope_theta": 1e4}),
                         r"^rope_parameters\.rope_type='dynamic' is not supported; rule: one of \('default', "
                         r"'linear', 'llama3', 'yarn'\): dynamic NTK scaling recomputes the frequencies from the "
                         r"longest position of each forward pass"),
    "longrope": (_hf_config("llama", rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
                 r"^rope_parameters\.rope_type='longrope' is not supported; rule: one of \('default', 'linear', "
                 r"'llama3', 'yarn'\)$"),
    "llama3 without low_freq_factor": (_hf_config("llama", rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                                             "high_freq_factor": 4.0}),
                                       r"^missing required key 'low_freq_factor'"),
    "partial rotary": (_hf_config("llama", partial_rotary_factor=0.5),
                       r"^partial_rotary_factor=0\.5; rule: must be 1\.0 \(RoPE on the whole head\)$"),
    "Qwen3 unknown layer type": (_hf_config("qwen3", use_sliding_window=True,
                                            layer_types=["full_attention", "chunked_attention"]),
                                 r"^layer_types=\['full_attention', 'chunked_attention'\]; rule: a list of 2 entries, "
                                 r"each one of \('full_attention', 'sliding_attention'\)$"),
    "Mistral window of 0": (_hf_config("mistral", sliding_window=0), r"^sliding_window=0; rule: must be a positive "
                                                                     r"integer$"),
    "Llama attention_bias (o_proj bias too)": (_hf_config("llama", attention_bias=True),
                                               r"^attention_bias=True; rule: must be False$"),
    "Qwen3 attention_bias": (_hf_config("qwen3", attention_bias=True), r"^attention_bias=True; rule: must be False$"),
    "Llama mlp_bias": (_hf_config("llama", mlp_bias=True), r"^mlp_bias=True; rule: must be False$"),
    "another family": (_hf_config("llama", model_type="gemma"),
                       rf"^model_type='gemma' is not supported; rule: {re.escape(SUPPORTED)}$"),
    "Gemma 3 bidirectional attention": (_hf_config("gemma3", use_bidirectional_attention=True),
                                        r"^use_bidirectional_attention=True; rule: must be False$"),
    "Gemma 2 attention_bias": (_hf_config("gemma2", attention_bias=True), r"^attention_bias=True; rule: must be "
                                                                         r"False$"),
    "Gemma 2 exact GELU": (_hf_config("gemma2", hidden_activation="gelu"),
                           r"^hidden_activation='gelu'; rule: must be 'gelu_pytorch_tanh'$"),
    "Gemma 3 scaled local RoPE": (
        _hf_config("gemma3", rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                              "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 1e4}}),
        r"^rope_parameters\.sliding_attention\.rope_type='linear'; rule: 'default' \(cptoolkit scales only the "
        r"global layers' RoPE\)$"),
    "Gemma 3 YaRN global RoPE": (
        _hf_config("gemma3", rope_parameters={"full_attention": {**YARN}, "sliding_attention": {"rope_theta": 1e4}}),
        r"^the global layers' rope_type='yarn'; rule: 'default' or 'linear' for gemma3_text"),
    "Gemma 2 softcap of 0": (_hf_config("gemma2", attn_logit_softcapping=0),
                             r"^attn_logit_softcapping=0; rule: must be a positive number$"),
    "a head class": (_hf_config("qwen2_yarn", architectures=["Qwen2ForSequenceClassification"]),
                     r"^architectures=\['Qwen2ForSequenceClassification'\] is not supported for model_type "
                     r"'qwen2'; rule: Qwen2ForCausalLM$"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_what_cptoolkit_would_compute_differently_is_refused_with_key_value_and_rule(name):
    config, message = REFUSED[name]
    with pytest.raises(ValueError, match=message):
        read_hf_config(config)


def test_sliding_windows_are_read_as_transformers_applies_them():
    """Mistral windows every layer; Qwen2/Qwen3 only with use_sliding_window, from max_window_layers on or as
    layer_types says; Llama never; a window no prompt can outgrow is no window."""
    def shape(name, **changes):
        read = read_hf_config(_hf_config(name, **changes))
        return read.sliding_window, read.sliding_layers

    assert shape("mistral", sliding_window=8) == (8, None)
    # config.json's layer_types wins; without it, max_window_layers onwards (the saved dict carries layer_types
    # computed when the window was off: drop it)
    assert shape("qwen2_yarn", use_sliding_window=True, sliding_window=8, max_window_layers=1,
                 layer_types=None) == (8, (False, True))
    assert shape("qwen2_yarn", use_sliding_window=False, sliding_window=8) == (None, None)
    assert shape("qwen3", use_sliding_window=True, sliding_window=8,
                 layer_types=["sliding_attention", "full_attention"]) == (8, (True, False))
    assert shape("llama", sliding_window=8, layer_types=["sliding_attention"] * 2) == (None, None)
    for window in (64, 4096):
        assert shape("mistral", sliding_window=window) == (None, None)
    for name, changes in (("mistral", dict(sliding_window=8)),
                          ("qwen2_yarn", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                              layer_types=None))):
        read = read_hf_config(_hf_config(name, **changes))
        assert read_hf_config(write_hf_config(read)) == read  # a cptoolkit checkpoint keeps the window


def test_gemma_local_layers_rope_and_softcaps_are_read_as_transformers_applies_them():
    """Gemma 2 windows every other layer from the first, Gemma 3 five of every ``sliding_window_pattern`` (or as
    layer_types says); older Gemma 3 configs name the local RoPE base ``rope_local_base_freq``; absent softcaps are
    the family's defaults (Gemma 2: 50 and 30), null ones none; every shape survives a cptoolkit checkpoint."""
    def read(name, **changes):
        return read_hf_config(_hf_config(name, **changes))

    gemma2 = read("gemma2", num_hidden_layers=4, layer_types=None)
    assert (gemma2.sliding_window, gemma2.sliding_layers) == (5, (True, False, True, False))
    assert gemma2.gemma == GemmaBlock(24.0, 3.0, 4.0, None)
    defaults = {key: value for key, value in _hf_config("gemma2").items()
                if key not in ("attn_logit_softcapping", "final_logit_softcapping")}
    assert read_hf_config(defaults).gemma == GemmaBlock(24.0, 50.0, 30.0, None)
    assert read("gemma2", final_logit_softcapping=None).gemma.final_logit_softcapping is None
    gemma3 = read("gemma3", num_hidden_layers=12, layer_types=None, sliding_window_pattern=6)
    assert gemma3.sliding_layers == (True,) * 5 + (False,) + (True,) * 5 + (False,)
    assert (gemma3.qk_norm, gemma3.rope_theta, gemma3.rope_scaling.rope_type) == (True, 1e4, "linear")
    assert gemma3.gemma == GemmaBlock(24.0, None, None, 100.0)
    older = {key: value for key, value in _hf_config("gemma3").items() if key != "rope_parameters"}
    older.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    read_older = read_hf_config(older)
    assert (read_older.rope_theta, read_older.rope_scaling.factor, read_older.gemma.local_rope_theta) == \
        (1e6, 8.0, 1e4)
    for shape in (gemma2, gemma3, read_older, read("gemma2")):
        assert read_hf_config(write_hf_config(shape)) == shape


def test_a_refused_checkpoint_fails_at_load_config_in_one_line_naming_its_config_json(families, tmp_path):
    directory = shutil.copytree(families["mistral"][0], tmp_path / "mistral")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "partial_rotary_factor": 0.5}))
    run = tmp_path / "run.yaml"
    run.write_text(json.dumps({"parallel": {}, "model": {"checkpoint": str(directory)}, "runtime": {},
                               "inference": {"prompts": ["w2"]}}))
    with pytest.raises(ConfigError, match="^" + re.escape(str(directory / "config.json")) +
                       r": partial_rotary_factor=0\.5; rule: must be 1\.0 [^\n]*$"):
        load_config(run)
