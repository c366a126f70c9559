"""The mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3) read and write ``config.json`` as
transformers builds the model, and map the per-expert tensors ``save_pretrained`` writes onto the full state dict's
stacked experts (``cptoolkit.models.families.experts``) with every stored tensor read exactly once; the MoE model
loads them at TP = 1, TP = 2 and EP = 2 and gives them back whole. No forward: the checkpoints are the tiny random
models of ``tests/hf_checkpoints.MOE_FAMILIES``; what cptoolkit would compute differently is refused with the key,
its value and the rule."""
import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from cptoolkit.layers.core_attention import AttentionRuntime

from cptoolkit.models.checkpoint import (CPTOOLKIT_FORMAT, checkpoint_layout, full_tensor_shapes, hf_to_full,
                                         load_model_checkpoint, read_weights, tensor_files)
from cptoolkit.models.families.registry import FAMILIES, read_hf_config, shape_family, write_hf_config
from cptoolkit.models.moe_dims import MoEDims
from cptoolkit.models.shape import GemmaBlock
from cptoolkit.models.tp_sharding import gather_full_state_dict
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.hf_checkpoints import MOE_FAMILIES, hf_config, hf_model
from tests.multiproc import run_ranks
from tests.test_families import READING_ONLY, TINY
from tests.test_gpt_model import megatron_groups

transformers = pytest.importorskip("transformers")

V3_ROUTING = dict(score="sigmoid", group_score="top2_sum", score_correction_bias=True)
# What each tiny checkpoint routes with, from its config arguments and transformers' defaults.
ROUTING = {
    "mixtral": MoEDims(4, 2, 32, (True, True), norm_topk_prob=True),
    "qwen2_moe": MoEDims(4, 2, 32, (True, True), shared_ffn_hidden_size=48, shared_expert_gate=True),
    "qwen3_moe": MoEDims(8, 2, 32, (False, True, False), norm_topk_prob=True),
    "qwen3_moe_mlp_only": MoEDims(4, 2, 32, (True, False, True)),
    "deepseek_v2": MoEDims(4, 2, 32, (True, True), shared_ffn_hidden_size=64),
    "deepseek_v2_group": MoEDims(8, 3, 32, (False, True), routed_scaling_factor=1.5, num_groups=4, topk_groups=2,
                                 shared_ffn_hidden_size=32),
    "deepseek_v3": MoEDims(8, 2, 32, (False, True), norm_topk_prob=True, routed_scaling_factor=2.5, num_groups=4,
                           topk_groups=2, shared_ffn_hidden_size=32, **V3_ROUTING),
    "gpt_oss": MoEDims(4, 2, 32, (True, True), norm_topk_prob=True, router_bias=True, expert_bias=True,
                       activation="gpt_oss", swiglu_limit=1.5),
}
FAMILY = {"mixtral": "mixtral", "qwen2_moe": "qwen_moe", "qwen3_moe": "qwen_moe", "qwen3_moe_mlp_only": "qwen_moe",
          "deepseek_v2": "deepseek", "deepseek_v2_group": "deepseek", "deepseek_v3": "deepseek", "gpt_oss": "gpt_oss"}


def _stored_shapes(directory) -> dict[str, tuple[int, ...]]:
    return tensor_files(directory).shapes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{case: (checkpoint directory, its config.json dict)}, each saved by transformers' save_pretrained."""
    cases = {}
    for seed, name in enumerate(MOE_FAMILIES):
        torch.manual_seed(seed)
        directory = tmp_path_factory.mktemp(name)
        hf_model(name).save_pretrained(directory)
        cases[name] = (directory, json.loads((directory / "config.json").read_text()))
    return cases


def test_every_case_is_checked():
    assert set(ROUTING) == set(FAMILY) == set(MOE_FAMILIES)


def _config(name: str, **changes) -> dict:
    """The tiny checkpoint's config.json dict, with ``changes``."""
    return {**hf_config(name).to_dict(), **changes}


# ----------------------------------------------------------------------------- config.json

@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_a_moe_config_reads_as_transformers_routes_and_reads_back_what_it_writes(name, checkpoints):
    shape = read_hf_config(checkpoints[name][1])
    assert shape.moe == ROUTING[name]
    assert [f.name for f in FAMILIES if f.owns(shape)] == [FAMILY[name]]
    assert read_hf_config(write_hf_config(shape)) == shape


def test_the_attention_and_dense_layers_of_each_family_are_its_dense_relatives():
    """Mixtral: the Llama block, RoPE base 1e6 by default, experts of intermediate_size (no dense layer); Qwen2-MoE:
    q/k/v biases (unless qkv_bias is false); Qwen3-MoE: q/k norms and head_dim; DeepSeek: MLA; the dense layers of
    the others keep intermediate_size."""
    def read(name, **changes):
        return read_hf_config(_config(name, **changes))

    mixtral, qwen2, qwen3, v3 = read("mixtral"), read("qwen2_moe"), read("qwen3_moe"), read("deepseek_v3")
    assert (mixtral.ffn_hidden_size, mixtral.qkv_bias, mixtral.qk_norm, mixtral.rope_theta) == (32, False, False, 1e6)
    assert (qwen2.ffn_hidden_size, qwen2.qkv_bias, qwen2.qk_norm) == (96, True, False)
    assert (qwen3.ffn_hidden_size, qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim) == (96, False, True, 32)
    assert (v3.ffn_hidden_size, v3.mla.q_lora_rank, v3.num_kv_heads) == (96, 32, 1)
    assert read("qwen2_moe", qkv_bias=False).qkv_bias is False
    unset = {key: value for key, value in _config("mixtral").items() if key not in ("rope_parameters", "rope_theta")}
    assert read_hf_config(unset).rope_theta == 1e6  # MixtralConfig.default_theta


def test_windows_are_read_as_each_moe_family_applies_them():
    """Mixtral windows every layer (as Mistral); Qwen3-MoE every layer with use_sliding_window; Qwen2-MoE the layers
    layer_types marks, else (Qwen2MoeConfig's default) the even layers below max_window_layers."""
    def window(name, **changes):
        shape = read_hf_config(_config(name, **changes))
        assert read_hf_config(write_hf_config(shape)) == shape
        return shape.sliding_window, shape.sliding_layers

    assert window("mixtral", sliding_window=6) == (6, None)
    assert window("qwen3_moe", use_sliding_window=True, sliding_window=6) == (6, None)
    assert window("qwen3_moe", use_sliding_window=False, sliding_window=6) == (None, None)
    assert window("qwen3_moe_mlp_only", use_sliding_window=True, sliding_window=6, max_window_layers=2,
                  layer_types=None) == (6, None)
    assert window("qwen2_moe", use_sliding_window=True, sliding_window=6, max_window_layers=2, num_hidden_layers=3,
                  layer_types=None) == (6, (True, False, False))
    assert window("qwen2_moe", use_sliding_window=True, sliding_window=6,
                  layer_types=["full_attention", "sliding_attention"]) == (6, (False, True))


def test_keys_transformers_ignores_at_inference_or_builds_no_moe_from_read_as_transformers_builds():
    """Mixtral's router_jitter_noise (training-only noise); a DeepSeek config whose first_k_dense_replace covers
    every layer (dense: its MoE keys are not read); n_shared_experts 0 or null (no shared expert); a Qwen-MoE
    config with no MoE layer (the dense model transformers builds then)."""
    def read(name, **changes):
        return read_hf_config(_config(name, **changes))

    assert read("mixtral", router_jitter_noise=0.1) == read("mixtral")
    assert read("deepseek_v3", first_k_dense_replace=2, moe_layer_freq=2, scoring_func="softmax").moe is None
    assert read("deepseek_v2", first_k_dense_replace=5, norm_topk_prob=True).moe is None
    for shared in (0, None):
        assert read("deepseek_v3", n_shared_experts=shared).moe.shared_ffn_hidden_size == 0
    assert read("deepseek_v3", norm_topk_prob=False).moe.norm_topk_prob is False
    assert read("deepseek_v2_group", n_group=1, topk_group=1).moe.num_groups == 1
    assert read("deepseek_v2", n_group=4, topk_group=1).moe.num_groups == 1  # greedy ignores the groups
    # transformers' attribute_map: the other name of the expert count, as checkpoints written before it say.
    for name, key, alias in (("mixtral", "num_local_experts", "num_experts"),
                             ("qwen3_moe", "num_local_experts", "num_experts"),
                             ("deepseek_v2", "n_routed_experts", "num_experts"),
                             ("deepseek_v3", "n_routed_experts", "num_local_experts")):
        config = _config(name)
        assert read_hf_config({**{k: v for k, v in config.items() if k != key}, alias: config[key]}) == \
            read_hf_config(config), name
    for changes in (dict(num_experts=0), dict(mlp_only_layers=[0, 1])):
        dense = read("qwen2_moe", **changes)
        assert dense.moe is None and shape_family(dense).name == "qwen"
        assert read_hf_config(write_hf_config(dense)) == dense


REFUSED = {
    "moe_layer_freq": (_config("deepseek_v3", moe_layer_freq=2),
                       r"^moe_layer_freq=2; rule: must be 1 \(transformers makes every layer from first_k_dense_replace "
                       r"on MoE whatever moe_layer_freq says; DeepSeek's code would make only every moe_layer_freq-th "
                       r"one\)$"),
    "V2 norm_topk_prob": (_config("deepseek_v2", norm_topk_prob=True),
                          r"^norm_topk_prob=True; rule: must be false for deepseek_v2 \(transformers' DeepSeek-V2 never "
                          r"renormalises the top-k weights, DeepSeek's code does: the two disagree\)$"),
    "V2 sigmoid": (_config("deepseek_v2", scoring_func="sigmoid"),
                   r"^scoring_func='sigmoid'; rule: must be 'softmax' for deepseek_v2 \(transformers' deepseek_v2 "
                   r"scores the experts with softmax whatever scoring_func says\)$"),
    "V3 softmax": (_config("deepseek_v3", scoring_func="softmax"),
                   r"^scoring_func='softmax'; rule: must be 'sigmoid' for deepseek_v3"),
    "V3 greedy": (_config("deepseek_v3", topk_method="greedy"),
                  r"^topk_method='greedy'; rule: one of \('noaux_tc',\) for deepseek_v3 \(what transformers "
                  r"computes\)$"),
    "V2 noaux_tc": (_config("deepseek_v2", topk_method="noaux_tc"),
                    r"^topk_method='noaux_tc'; rule: one of \('greedy', 'group_limited_greedy'\) for deepseek_v2"),
    "V2 mlp_bias": (_config("deepseek_v2", mlp_bias=True), r"^mlp_bias=True; rule: must be False$"),
    "V2 groups unset": (_config("deepseek_v2_group", n_group=None),
                        r"^missing required key 'n_group'; add it"),
    "V3 groups that do not divide the experts": (
        _config("deepseek_v3", n_group=3),
        r"^n_routed_experts=8, num_experts_per_tok=2, n_group=3, topk_group=2: MoEDims\.num_experts=8 must be a "
        r"multiple of num_groups=3"),
    "V3 first_k_dense_replace null": (_config("deepseek_v3", first_k_dense_replace=None),
                                      r"^first_k_dense_replace=None; rule: must be a non-negative integer$"),
    "V3 negative shared experts": (_config("deepseek_v3", n_shared_experts=-1),
                                   r"^n_shared_experts=-1; rule: must be a non-negative integer$"),
    "V2 no scaling": (_config("deepseek_v2", routed_scaling_factor=0),
                      r"^routed_scaling_factor=0; rule: must be a positive number$"),
    "Mixtral top-k beyond the experts": (
        _config("mixtral", num_experts_per_tok=5),
        r"^num_local_experts=4, num_experts_per_tok=5: MoEDims\.top_k=5 must be <= topk_groups \* num_experts / "
        r"num_groups = 4"),
    "Mixtral GELU": (_config("mixtral", hidden_act="gelu"), r"^hidden_act='gelu'; rule: must be 'silu'$"),
    "Qwen3-MoE attention_bias": (_config("qwen3_moe", attention_bias=True),
                                 r"^attention_bias=True; rule: must be False$"),
    "Qwen2-MoE mlp_only_layers": (_config("qwen2_moe", mlp_only_layers="1"),
                                  r"^mlp_only_layers='1'; rule: a list of layer indices \(0-based\)$"),
    "Qwen2-MoE decoder_sparse_step 0": (_config("qwen2_moe", decoder_sparse_step=0),
                                        r"^decoder_sparse_step=0; rule: must be a positive integer$"),
    "Qwen2-MoE no shared expert": (_config("qwen2_moe", shared_expert_intermediate_size=0),
                                   r"^shared_expert_intermediate_size=0; rule: must be a positive integer$"),
    "Qwen3-MoE negative experts": (_config("qwen3_moe", num_local_experts=-1),
                                   r"^num_local_experts=-1; rule: must be a non-negative integer$"),
    "gpt-oss attention_bias not a bool": (_config("gpt_oss", attention_bias="yes"),
                                          r"^attention_bias='yes'; rule: true or false$"),
    "gpt-oss swiglu_limit 0": (_config("gpt_oss", swiglu_limit=0), r"^swiglu_limit=0; rule: must be a positive number$"),
    "gpt-oss top-k beyond the experts": (
        _config("gpt_oss", num_experts_per_tok=5),
        r"^num_local_experts=4, num_experts_per_tok=5: MoEDims\.top_k=5 must be <= topk_groups"),
    "Qwen3-MoE expert counts that disagree": (
        _config("qwen3_moe", num_experts=4),
        r"^num_local_experts=8 and num_experts=4 disagree; rule: num_experts is another name for num_local_experts "
        r"\(transformers' attribute_map\): set one of them, or both alike$"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_transformers_computes_differently_or_cannot_build_is_refused_with_key_value_and_rule(case):
    config, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        read_hf_config(config)


def _moe_shape(name: str, **moe_changes):
    shape = read_hf_config(_config(name))
    return dataclasses.replace(shape, moe=dataclasses.replace(shape.moe, **moe_changes))


WRITE_REFUSED = {
    "Mixtral without renormalisation": (_moe_shape("mixtral", norm_topk_prob=False),
                                        r"^MoEDims\.norm_topk_prob=False has no mixtral config\.json; rule: mixtral "
                                        r"routes with norm_topk_prob=True$"),
    "Mixtral with a dense layer": (_moe_shape("mixtral", moe_layers=(False, True)),
                                   r"^MoEDims\.moe_layers=\(False, True\) has no mixtral config\.json"),
    "Mixtral experts of another size": (_moe_shape("mixtral", ffn_hidden_size=16),
                                        r"^GPTShape\.ffn_hidden_size=32 differs from MoEDims\.ffn_hidden_size=16; "
                                        r"rule: equal for Mixtral"),
    "Qwen3-MoE with a shared expert": (_moe_shape("qwen3_moe", shared_ffn_hidden_size=48),
                                       r"^MoEDims\.shared_ffn_hidden_size=48 has no qwen3_moe config\.json; rule: "
                                       r"qwen3_moe routes with shared_ffn_hidden_size=0$"),
    "Qwen2-MoE with sigmoid scores": (_moe_shape("qwen2_moe", score="sigmoid"),
                                      r"^MoEDims\.score='sigmoid' has no qwen2_moe config\.json"),
    "DeepSeek MoE then dense": (_moe_shape("deepseek_v3", moe_layers=(True, False)),
                                r"^MoEDims\.moe_layers=\(True, False\) has no DeepSeek config\.json; rule: dense "
                                r"layers first, then MoE layers to the last \(first_k_dense_replace\)$"),
    "DeepSeek shared expert of no whole number of experts": (
        _moe_shape("deepseek_v3", shared_ffn_hidden_size=48),
        r"^MoEDims\.shared_ffn_hidden_size=48 has no DeepSeek config\.json; rule: a multiple of ffn_hidden_size=32"),
    "DeepSeek softmax renormalised": (_moe_shape("deepseek_v2", norm_topk_prob=True),
                                      r"^MoEDims\.norm_topk_prob=True has no deepseek_v2 config\.json"),
    "DeepSeek with a gated shared expert": (_moe_shape("deepseek_v3", shared_expert_gate=True),
                                            r"^MoEDims\.shared_expert_gate=True has no deepseek_v3 config\.json"),
    "DeepSeek sigmoid without correction bias": (_moe_shape("deepseek_v3", score_correction_bias=False),
                                                 r"^MoEDims\.score_correction_bias=False has no deepseek_v3 "
                                                 r"config\.json"),
    "DeepSeek softmax with half-split RoPE": (
        dataclasses.replace(read_hf_config(_config("deepseek_v2")),
                            mla=dataclasses.replace(read_hf_config(_config("deepseek_v2")).mla, rope_interleave=False)),
        r"^MLADims\.rope_interleave=False with softmax routing has no DeepSeek config\.json"),
    "Gemma with experts": (dataclasses.replace(read_hf_config(_config("mixtral")), gemma=GemmaBlock(16.0)),
                           r"^GPTShape with moe and gemma, or with sliding_layers, has no Hugging Face family"),
}


@pytest.mark.parametrize("case", WRITE_REFUSED)
def test_a_shape_no_family_can_state_is_refused_at_write_never_written_as_another(case):
    shape, message = WRITE_REFUSED[case]
    assert len([f for f in FAMILIES if f.owns(shape)]) == 1
    with pytest.raises(ValueError, match=message):
        write_hf_config(shape)


def test_exactly_one_family_owns_every_shape_dense_or_moe():
    """Every model_type's tiny config (tests/test_families.py), every MoE checkpoint here, and the shapes no family
    can write: one owner each, and each family owns some."""
    tiny = [read_hf_config({"model_type": model_type, **config}) for model_type, config in TINY.items()]
    moe = [read_hf_config(_config(name)) for name in MOE_FAMILIES]
    odd = [shape for shape, _ in WRITE_REFUSED.values()]
    for shape in tiny + moe + odd:
        owners = [f.name for f in FAMILIES if f.owns(shape)]
        assert len(owners) == 1, (owners, shape)
    assert {shape_family(shape).name for shape in tiny} == {f.name for f in FAMILIES} - READING_ONLY


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_a_written_config_builds_in_transformers_the_model_it_was_read_from(name, checkpoints, tmp_path):
    """transformers reads cptoolkit's config.json as the same model: the tensors it saves are the checkpoint's."""
    written = write_hf_config(read_hf_config(checkpoints[name][1]))
    config = transformers.AutoConfig.for_model(**written)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    assert _stored_shapes(tmp_path) == _stored_shapes(checkpoints[name][0])


# ----------------------------------------------------------------------------- checkpoint tensors

@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_tensor_shapes_are_exactly_the_tensors_save_pretrained_writes(name, checkpoints):
    directory, config = checkpoints[name]
    stored = _stored_shapes(directory)
    shape = read_hf_config(config)
    assert shape_family(shape).tensor_shapes(shape, stored) == stored


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_the_layout_reads_every_stored_tensor_exactly_once(name, checkpoints):
    """Each stored tensor's rows (columns, for a piece read transposed; of each leading slot, for a piece with an
    ``index`` into an experts-stacked tensor) are covered by one piece each: no gap, no overlap, one orientation
    per tensor."""
    directory, config = checkpoints[name]
    stored, shape = _stored_shapes(directory), read_hf_config(config)
    layout = shape_family(shape).layout(shape, stored)
    reads = {name: None for name in stored}
    for full_name, pieces in layout.items():
        for piece in pieces:
            dims = stored[piece.name][0 if piece.index is None else 1:]
            slots = [None] if piece.index is None else range(stored[piece.name][0])
            dim = 1 if piece.transposed else 0
            if reads[piece.name] is None:
                reads[piece.name] = (dim, {(slot, row): 0 for slot in slots for row in range(dims[dim])})
            assert reads[piece.name][0] == dim, f"{piece.name} read both transposed and not"
            counts = reads[piece.name][1]
            assert 0 <= piece.start < piece.stop <= dims[dim], f"{full_name}: {piece} outside {stored[piece.name]}"
            for row in range(piece.start, piece.stop):
                counts[piece.index, row] += 1
    unread = [name for name, read in reads.items() if read is None]
    assert unread == []
    twice = {name: sorted(set(counts.values())) for name, (_, counts) in reads.items() if set(counts.values()) != {1}}
    assert twice == {}, "rows read 0 or several times"


def _expected_full_names(shape) -> set[str]:
    """The MLP entries of the full state dict: the dense MLP's on dense layers, the MoE layer's (fixed) names on
    MoE layers."""
    names = set()
    for layer, is_moe in enumerate(shape.moe.moe_layers):
        mlp = f"decoder.layers.{layer}.mlp."
        if not is_moe:
            names |= {mlp + "linear_fc1.weight", mlp + "linear_fc2.weight"}
            continue
        names |= {mlp + "router.weight", mlp + "experts.fc1_weight", mlp + "experts.fc2_weight"}
        if shape.moe.score_correction_bias:
            names.add(mlp + "router.score_correction_bias")
        if shape.moe.shared_ffn_hidden_size:
            names |= {mlp + "shared_experts.linear_fc1.weight", mlp + "shared_experts.linear_fc2.weight"}
        if shape.moe.shared_expert_gate:
            names.add(mlp + "shared_expert_gate.weight")
        if shape.moe.router_bias:
            names.add(mlp + "router.bias")
        if shape.moe.expert_bias:
            names |= {mlp + "experts.fc1_bias", mlp + "experts.fc2_bias"}
    return names


# (router, expert prefix, gate, up, down, shared prefix) of each family's checkpoint, under model.layers.N.
HF_NAMES = {"mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts", "w1", "w3", "w2", None),
            "qwen_moe": ("mlp.gate", "mlp.experts", "gate_proj", "up_proj", "down_proj", "mlp.shared_expert"),
            "deepseek": ("mlp.gate", "mlp.experts", "gate_proj", "up_proj", "down_proj", "mlp.shared_experts")}


@pytest.mark.parametrize("name", [n for n in MOE_FAMILIES if n != "gpt_oss"])
def test_the_full_state_dict_stacks_each_experts_gate_up_rows_and_transposed_down_projection(name, checkpoints):
    """fc1_weight: expert e's gate rows then its up rows, e = 0 .. E-1; fc2_weight: expert e's down projection
    transposed; the shared expert as the dense MLP's linear_fc1/linear_fc2; router, correction bias and shared-expert
    gate whole."""
    directory, config = checkpoints[name]
    shape, stored = read_hf_config(config), read_weights(directory)
    full = hf_to_full(stored, shape)
    assert {n for n in full if ".mlp." in n} == _expected_full_names(shape)
    moe, hidden = shape.moe, shape.hidden_size
    router, experts, gate, up, down, shared = HF_NAMES[FAMILY[name]]
    for layer in (i for i, flag in enumerate(moe.moe_layers) if flag):
        hf, mlp = f"model.layers.{layer}.", f"decoder.layers.{layer}.mlp."
        fc1 = full[mlp + "experts.fc1_weight"].view(moe.num_experts, 2, moe.ffn_hidden_size, hidden)
        fc2 = full[mlp + "experts.fc2_weight"].view(moe.num_experts, moe.ffn_hidden_size, hidden)
        for e in range(moe.num_experts):
            expert = f"{hf}{experts}.{e}."
            assert torch.equal(fc1[e, 0], stored[f"{expert}{gate}.weight"]), (layer, e)
            assert torch.equal(fc1[e, 1], stored[f"{expert}{up}.weight"]), (layer, e)
            assert torch.equal(fc2[e], stored[f"{expert}{down}.weight"].t()), (layer, e)
        assert torch.equal(full[mlp + "router.weight"], stored[f"{hf}{router}.weight"])
        if moe.score_correction_bias:
            assert torch.equal(full[mlp + "router.score_correction_bias"],
                               stored[f"{hf}{router}.e_score_correction_bias"])
        if moe.shared_ffn_hidden_size:
            assert torch.equal(full[mlp + "shared_experts.linear_fc1.weight"],
                               torch.cat([stored[f"{hf}{shared}.gate_proj.weight"],
                                          stored[f"{hf}{shared}.up_proj.weight"]]))
            assert torch.equal(full[mlp + "shared_experts.linear_fc2.weight"], stored[f"{hf}{shared}.down_proj.weight"])
        if moe.shared_expert_gate:
            assert torch.equal(full[mlp + "shared_expert_gate.weight"], stored[f"{hf}mlp.shared_expert_gate.weight"])


def test_kimi_k2_reads_as_deepseek_v3_and_quantized_checkpoints_are_refused():
    """Kimi K2's config.json is DeepSeek-V3's architecture under model_type kimi_k2; DeepSeek-V3/R1's and Kimi K2's
    released weights are FP8 with block scales (``quantization_config``): refused, never loaded without scales."""
    v3 = _config("deepseek_v3")
    assert read_hf_config({**v3, "model_type": "kimi_k2"}) == read_hf_config(v3)
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    with pytest.raises(ValueError, match=r"^quantization_config=\{'quant_method': 'fp8', \.\.\.\} is not supported; "
                                         r"rule: cptoolkit loads float weights only"):
        read_hf_config({**v3, "model_type": "kimi_k2", "quantization_config": fp8})


def test_gpt_oss_stacked_experts_are_read_as_their_slots(checkpoints):
    """gpt-oss's experts-stacked tensors: expert e's fc1 rows are ``gate_up_proj[e]`` transposed (interleaved gate/up
    rows kept), its fc1 bias ``gate_up_proj_bias[e]``, its fc2 rows ``down_proj[e]``; the fc2 biases, the router, the
    sinks and o_proj's bias whole."""
    directory, config = checkpoints["gpt_oss"]
    shape, stored = read_hf_config(config), read_weights(directory)
    full = hf_to_full(stored, shape)
    assert {n for n in full if ".mlp." in n} == _expected_full_names(shape)
    moe, hidden = shape.moe, shape.hidden_size
    for layer in range(shape.num_layers):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        fc1 = full[mc + "mlp.experts.fc1_weight"].view(moe.num_experts, 2 * moe.ffn_hidden_size, hidden)
        fc2 = full[mc + "mlp.experts.fc2_weight"].view(moe.num_experts, moe.ffn_hidden_size, hidden)
        fc1_bias = full[mc + "mlp.experts.fc1_bias"].view(moe.num_experts, -1)
        for e in range(moe.num_experts):
            assert torch.equal(fc1[e], stored[hf + "mlp.experts.gate_up_proj"][e].t()), (layer, e)
            assert torch.equal(fc1_bias[e], stored[hf + "mlp.experts.gate_up_proj_bias"][e]), (layer, e)
            assert torch.equal(fc2[e], stored[hf + "mlp.experts.down_proj"][e]), (layer, e)
        for ours, theirs in (("mlp.experts.fc2_bias", "mlp.experts.down_proj_bias"), ("mlp.router.weight", None),
                             ("mlp.router.bias", None), ("self_attention.core_attention.sinks", "self_attn.sinks"),
                             ("self_attention.linear_proj.bias", "self_attn.o_proj.bias")):
            assert torch.equal(full[mc + ours], stored[hf + (theirs or ours)]), (layer, ours)


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_a_moe_checkpoint_in_cptoolkit_format_reads_back_whole(name, checkpoints, tmp_path):
    """What ``save_checkpoint`` writes (the full state dict and the family's config.json with cptoolkit_format) is
    read back as every full tensor whole, of the shapes the Hugging Face layout gives."""
    directory, config = checkpoints[name]
    shape = read_hf_config(config)
    full = hf_to_full(read_weights(directory), shape)
    save_file({n: t.contiguous() for n, t in full.items()}, tmp_path / "model.safetensors")
    native = {**write_hf_config(shape), "cptoolkit_format": CPTOOLKIT_FORMAT}
    assert read_hf_config(native) == shape
    layout = checkpoint_layout(native, shape, tensor_files(tmp_path))
    assert set(layout) == set(full)
    assert full_tensor_shapes(shape) == {n: tuple(t.shape) for n, t in full.items()}


def _load_rank(rank, world_size, directories):
    """{(layout, case): names whose gathered full tensor differs from the checkpoint's} after loading every case at
    TP = 2 (the world), TP = 1 (this rank alone) and PCP = DCP = 2 with EP = 2 (each rank its half of the experts)."""
    solo = dist.new_group([rank], use_local_synchronization=True)
    differing = {}
    for name, directory in directories.items():
        shape = read_hf_config(json.loads((directory / "config.json").read_text()))
        want = hf_to_full(read_weights(directory), shape)
        for layout, groups in (("TP=2", megatron_groups(dist.group.WORLD, solo)),
                               ("TP=1", megatron_groups(solo, solo))):
            full = gather_full_state_dict(load_model_checkpoint(directory, groups, AttentionRuntime()))
            differing[layout, name] = sorted(n for n in want.keys() | full.keys()
                                             if n not in full or n not in want or not torch.equal(full[n], want[n]))
        parallel = initialize_model_parallel(tp=1, pcp=2, dcp=2, num_heads=shape.num_attention_heads,
                                             num_kv_heads=shape.num_kv_heads, ep=2, num_experts=shape.moe.num_experts)
        try:
            model = load_model_checkpoint(directory, parallel.megatron_pg_collection(),
                                          AttentionRuntime(pcp_group=parallel.pcp_group))
            experts = model.decoder.layers[shape.moe.moe_layers.index(True)].mlp.experts.fc1_weight.shape[0]
            full = gather_full_state_dict(model)
        finally:
            destroy_model_parallel()
        assert experts == shape.moe.num_experts // 2 * 2 * shape.moe.ffn_hidden_size, "EP = 2: half the experts"
        differing["PCP=2 EP=2", name] = sorted(n for n in want.keys() | full.keys()
                                               if n not in full or n not in want or not torch.equal(full[n], want[n]))
    return differing


def test_every_tiny_moe_checkpoint_loads_into_the_moe_model_and_gathers_back_whole(checkpoints):
    """The full state dict's names are the MoE model's parameters, and each rank's slices (TP rows of every expert,
    or EP's whole experts) are the checkpoint's rows: gathered, every tensor equals the layout's."""
    directories = {name: directory for name, (directory, _) in checkpoints.items()}
    for rank, differing in enumerate(run_ranks(2, _load_rank, directories, timeout_s=300)):
        assert {key: names for key, names in differing.items() if names} == {}, f"rank {rank}"
        assert len(differing) == 3 * len(MOE_FAMILIES)


def test_the_tiny_v3_correction_bias_steers_which_experts_are_chosen(checkpoints):
    """The fixture's V3 bias is large enough to change the selection (else a loader that dropped it would pass)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(0)
    model = hf_model("deepseek_v3")
    router = model.model.layers[1].mlp.gate
    assert isinstance(router, DeepseekV3TopkRouter) and router.e_score_correction_bias.abs().min() > 0
    hidden = torch.randn(64, model.config.hidden_size)
    with torch.no_grad():
        steered = router(hidden)[2].sort(dim=-1).values
        router.e_score_correction_bias.zero_()
        unsteered = router(hidden)[2].sort(dim=-1).values
    changed = (steered != unsteered).any(dim=-1).float().mean()
    assert changed >= 0.25, f"the bias changes the experts of only {changed:.0%} of tokens"

