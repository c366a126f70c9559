"""How ``cptoolkit.models`` is put together: one table decides every parameter's TP kind by module type
(never by a name substring), the model's megatron groups come from ``ParallelGroups``, reading a
model's shape needs no megatron, and training and inference reach the model without each other.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.attention import SelfAttention

from cptoolkit.models.tp_sharding import FUSED_QKV, NORM, PARAM_KINDS, param_kinds
from tests.multiproc import run_ranks

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=50,
             max_seq_len=16)

LLAMA_KINDS = {
    "embedding.word_embeddings.weight": "vocab",
    "decoder.layers.0.input_layernorm.weight": "norm",
    "decoder.layers.0.self_attention.linear_qkv.weight": "fused_qkv",
    "decoder.layers.0.self_attention.linear_proj.weight": "row",
    "decoder.layers.0.pre_mlp_layernorm.weight": "norm",
    "decoder.layers.0.mlp.linear_fc1.weight": "gated_column",
    "decoder.layers.0.mlp.linear_fc2.weight": "row",
    "decoder.final_layernorm.weight": "norm",
    "output_layer.weight": "vocab",
}
# GPT-2: biases, learned positions, a plain GELU fc1, and the output layer tied to the embedding.
GPT2_KINDS = {
    "embedding.word_embeddings.weight": "vocab",
    "embedding.position_embeddings.weight": "replicated",
    "decoder.layers.0.input_layernorm.weight": "norm",
    "decoder.layers.0.input_layernorm.bias": "norm",
    "decoder.layers.0.self_attention.linear_qkv.weight": "fused_qkv",
    "decoder.layers.0.self_attention.linear_qkv.bias": "fused_qkv",
    "decoder.layers.0.self_attention.linear_proj.weight": "row",
    "decoder.layers.0.self_attention.linear_proj.bias": "replicated",
    "decoder.layers.0.pre_mlp_layernorm.weight": "norm",
    "decoder.layers.0.pre_mlp_layernorm.bias": "norm",
    "decoder.layers.0.mlp.linear_fc1.weight": "column",
    "decoder.layers.0.mlp.linear_fc1.bias": "column",
    "decoder.layers.0.mlp.linear_fc2.weight": "row",
    "decoder.layers.0.mlp.linear_fc2.bias": "replicated",
    "decoder.final_layernorm.weight": "norm",
    "decoder.final_layernorm.bias": "norm",
}
# Qwen2's q/k/v biases are rows of the fused QKV; Qwen3's q/k norms are one [head_dim] weight for every head.
QWEN2_KINDS = {**LLAMA_KINDS, "decoder.layers.0.self_attention.linear_qkv.bias": "fused_qkv"}
QWEN3_KINDS = {**LLAMA_KINDS, "decoder.layers.0.self_attention.q_layernorm.weight": "norm",
               "decoder.layers.0.self_attention.k_layernorm.weight": "norm"}


def _checkpoint_families(rank, world_size):
    """The kinds of a Qwen2-shaped (q/k/v biases) and a Qwen3-shaped (q/k norms, head_dim 16 != 32 / 4)
    model, built as a checkpoint's shape is."""
    from cptoolkit.layers.core_attention import AttentionRuntime
    from cptoolkit.models.build import new_gpt_model
    from cptoolkit.models.shape import GPTShape
    from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel

    shapes = {"qwen2": GPTShape(arch="llama", num_kv_heads=2, qkv_bias=True, **MODEL),
              "qwen3": GPTShape(arch="llama", num_kv_heads=2, qk_norm=True, head_dim=16, **MODEL)}
    groups = initialize_model_parallel(tp=1, pcp=1, dcp=1, num_heads=4, num_kv_heads=2)
    try:
        models = {family: new_gpt_model(shape, groups.megatron_pg_collection(), AttentionRuntime())
                  for family, shape in shapes.items()}
        return {family: {name: kind.name for name, kind in param_kinds(model).items()}
                for family, model in models.items()}
    finally:
        destroy_model_parallel()


def test_checkpoint_families_new_parameters_have_their_kinds():
    kinds = run_ranks(1, _checkpoint_families, timeout_s=120)[0]
    assert kinds == {"qwen2": QWEN2_KINDS, "qwen3": QWEN3_KINDS}


def _built_models(rank, world_size):
    """Each arch's model from a config through ``model_from_config``: its parameters' kinds and whether its
    megatron groups are the ``ParallelGroups``' own."""
    from cptoolkit.config import config_from_dict
    from cptoolkit.layers.core_attention import AttentionRuntime
    from cptoolkit.models.from_config import model_from_config
    from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel

    results = {}
    for arch, extra in (("llama", dict(num_kv_heads=2)), ("gpt2", dict(num_kv_heads=4, tie_embeddings=True))):
        cfg = config_from_dict({"parallel": {}, "model": dict(MODEL, arch=arch, **extra),
                                "runtime": {"device": "cpu"}, "inference": {"prompts": ["x"]}}, source="<test>")
        groups = initialize_model_parallel(tp=1, pcp=1, dcp=1, num_heads=cfg.model.num_attention_heads,
                                           num_kv_heads=cfg.model.num_kv_heads)
        try:
            model = model_from_config(cfg, groups, AttentionRuntime())
            results[arch] = {
                "kinds": {name: kind.name for name, kind in param_kinds(model).items()},
                "parameters": [name for name, _ in model.named_parameters()],
                "tp group is ParallelGroups.tp_group": model.pg_collection.tp is groups.tp_group,
                "cp group is ParallelGroups.self_group": model.pg_collection.cp is groups.self_group,
            }
        finally:
            destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def built():
    return run_ranks(1, _built_models, timeout_s=120)[0]


@pytest.mark.parametrize("arch,want", [("llama", LLAMA_KINDS), ("gpt2", GPT2_KINDS)])
def test_every_parameter_of_a_built_model_has_its_kind(built, arch, want):
    assert sorted(built[arch]["parameters"]) == sorted(want)
    assert built[arch]["kinds"] == want


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_model_takes_its_megatron_groups_from_parallel_groups(built, arch):
    assert built[arch]["tp group is ParallelGroups.tp_group"]
    assert built[arch]["cp group is ParallelGroups.self_group"]


def _bare(cls: type, **members) -> torch.nn.Module:
    """An instance of ``cls`` holding only ``members`` (parameters or submodules): ``param_kinds`` reads
    module types and parameter names, nothing that megatron's constructors set up."""
    module = cls.__new__(cls)
    torch.nn.Module.__init__(module)
    for name, member in members.items():
        setattr(module, name, member)
    return module


class TELayerNormColumnParallelLinear(torch.nn.Module):
    """Stands in for TransformerEngine's linear with a fused input norm: its ``layer_norm_weight`` sits
    inside ``linear_qkv``, where a name-substring rule (``"linear_qkv" in name``) would split it as QKV."""


def _te_attention() -> torch.nn.Module:
    linear_qkv = _bare(TELayerNormColumnParallelLinear, weight=torch.nn.Parameter(torch.zeros(48, 16)),
                       layer_norm_weight=torch.nn.Parameter(torch.ones(16)))
    return _bare(SelfAttention, linear_qkv=linear_qkv)


def test_a_te_fused_norm_inside_linear_qkv_is_classified_by_its_module_type(monkeypatch):
    with pytest.raises(ValueError, match=r"^linear_qkv\.layer_norm_weight: no TP kind for parameter "
                                         r"'layer_norm_weight' of a TELayerNormColumnParallelLinear \(the "
                                         r"'linear_qkv' of a SelfAttention\); rule: every \(module type, "
                                         r"parameter\) must be in cptoolkit\.models\.tp_sharding\.PARAM_KINDS"):
        param_kinds(_te_attention())
    monkeypatch.setitem(PARAM_KINDS, (TELayerNormColumnParallelLinear, "layer_norm_weight"), NORM)
    assert param_kinds(_te_attention()) == {"linear_qkv.weight": FUSED_QKV, "linear_qkv.layer_norm_weight": NORM}


def test_a_column_parallel_linear_whose_owner_is_not_listed_is_refused():
    """Its row layout depends on what its owner computes, so no owner entry means no guess."""
    linear = _bare(ColumnParallelLinear, weight=torch.nn.Parameter(torch.zeros(8, 4)))
    with pytest.raises(ValueError, match=r"^proj\.weight: no TP kind for parameter 'weight' of a "
                                         r"ColumnParallelLinear \(the 'proj' of a Module\)"):
        param_kinds(_bare(torch.nn.Module, proj=linear))


def _imported_after(statement: str, prefix: str) -> list[str]:
    """The modules starting with ``prefix`` that a fresh interpreter holds after running ``statement``."""
    script = (f"import sys\n{statement}\n"
              f"print('\\n'.join(sorted(m for m in sys.modules if m.startswith({prefix!r}))))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_reading_a_checkpoint_config_imports_no_megatron(tmp_path):
    from cptoolkit.models.families.registry import write_hf_config
    from cptoolkit.models.shape import GPTShape

    shape = GPTShape(arch="llama", num_kv_heads=2, **MODEL)
    (tmp_path / "config.json").write_text(json.dumps(write_hf_config(shape)))
    (tmp_path / "run.yaml").write_text(f"parallel: {{}}\nmodel: {{checkpoint: {tmp_path}}}\nruntime: {{device: cpu}}\n"
                                       "inference: {prompts: [x]}\n")
    statement = ("import cptoolkit.models.shape, cptoolkit.models.families.registry, cptoolkit.models.tokenizer\n"
                 "from cptoolkit.config import load_config\n"
                 f"assert load_config({str(tmp_path / 'run.yaml')!r}).model.hidden_size == {shape.hidden_size}")
    assert _imported_after(statement, "megatron") == []


@pytest.mark.parametrize("package,other", [("cptoolkit.training.trainer", "cptoolkit.inference"),
                                           ("cptoolkit.inference.builder", "cptoolkit.training")])
def test_training_and_inference_reach_the_model_without_each_other(package, other):
    assert _imported_after(f"import {package}", other) == []
