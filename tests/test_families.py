"""The family registry: every architecture the docs' families table lists has a family, and every family
reads back what it writes (read → write → read) for a tiny ``config.json`` of each of its ``model_type``s."""
import re
from pathlib import Path

import pytest

from cptoolkit.models.families.registry import BY_MODEL_TYPE, FAMILIES, SUPPORTED, read_hf_config, write_hf_config

DOCS = Path(__file__).resolve().parents[1] / "docs" / "families.md"
_LLAMA_BLOCK = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, vocab_size=50, max_position_embeddings=64, rms_norm_eps=1e-6)
# One tiny config.json per model_type, each with the keys that family adds to a default one.
READING_ONLY = {"phi3"}  # families whose shapes another family owns and writes
TINY = {
    "llama": {**_LLAMA_BLOCK, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "mistral": {**_LLAMA_BLOCK, "sliding_window": 8},
    "qwen2": {**_LLAMA_BLOCK, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    "qwen3": {**_LLAMA_BLOCK, "head_dim": 16, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                  "original_max_position_embeddings": 16}},
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=64, layer_norm_epsilon=1e-5),
    "deepseek_v2": {**_LLAMA_BLOCK, "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                    "qk_rope_head_dim": 4, "v_head_dim": 8, "first_k_dense_replace": 2},
    "deepseek_v3": {**_LLAMA_BLOCK, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                    "qk_rope_head_dim": 4, "v_head_dim": 8, "first_k_dense_replace": 2},
    "gemma2": {**_LLAMA_BLOCK, "head_dim": 8, "sliding_window": 8, "query_pre_attn_scalar": 8},
    "mixtral": {**_LLAMA_BLOCK, "sliding_window": 8, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**_LLAMA_BLOCK, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 32, "decoder_sparse_step": 2},
    "qwen3_moe": {**_LLAMA_BLOCK, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16, "norm_topk_prob": True, "mlp_only_layers": [0]},
    "gemma3_text": {**_LLAMA_BLOCK, "head_dim": 8, "sliding_window": 8, "query_pre_attn_scalar": 8,
                    "sliding_window_pattern": 2, "rope_local_base_freq": 100.0},
    "kimi_k2": {**_LLAMA_BLOCK, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                "qk_rope_head_dim": 4, "v_head_dim": 8, "first_k_dense_replace": 1, "n_routed_experts": 4,
                "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_group": 1, "topk_group": 1},
    "phi3": {**_LLAMA_BLOCK, "sliding_window": 8},
    "gpt_oss": {**_LLAMA_BLOCK, "head_dim": 8, "sliding_window": 8, "num_local_experts": 4, "num_experts_per_tok": 2},
}


def _documented_architectures() -> set[str]:
    """The backticked architecture names in the first column of docs/families.md's table."""
    rows = [line for line in DOCS.read_text().splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}


def test_every_documented_architecture_has_a_family_and_every_family_is_documented():
    documented = _documented_architectures()
    accepted = {a for family in FAMILIES for archs in family.architectures.values() for a in archs}
    assert documented - accepted == set(), "docs/families.md lists architectures no family reads"
    undocumented = [f.name for f in FAMILIES if not documented & {a for v in f.architectures.values() for a in v}]
    assert undocumented == [], "families missing from docs/families.md's table"


def test_each_model_type_belongs_to_one_family_and_has_a_tiny_config():
    assert sum(len(family.architectures) for family in FAMILIES) == len(BY_MODEL_TYPE)
    assert set(TINY) == set(BY_MODEL_TYPE)
    # the refusal of an unknown model_type lists every supported one and every architecture
    assert all(repr(t) in SUPPORTED for t in BY_MODEL_TYPE)
    assert all(a in SUPPORTED for f in FAMILIES for archs in f.architectures.values() for a in archs)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_a_family_reads_back_what_it_writes(model_type):
    """The family that reads a model_type owns its shapes and writes them back, except a reading-only family
    (Phi-3), whose shapes another family owns and writes."""
    family = BY_MODEL_TYPE[model_type]
    shape = read_hf_config({"model_type": model_type, **TINY[model_type]})
    owners = [f.name for f in FAMILIES if f.owns(shape)]
    assert owners == [family.name] or (family.name in READING_ONLY and len(owners) == 1), owners
    written = write_hf_config(shape)
    assert family.name in READING_ONLY or BY_MODEL_TYPE[written["model_type"]] is family
    assert read_hf_config(written) == shape


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_a_family_layout_reads_every_tensor_its_checkpoint_holds_and_no_other(model_type):
    family = BY_MODEL_TYPE[model_type]
    shape = read_hf_config({"model_type": model_type, **TINY[model_type]})
    names = ("transformer.wte.weight",) if model_type == "gpt2" else ()  # GPT2LMHeadModel's prefix
    shapes, layout = family.tensor_shapes(shape, names), family.layout(shape, names)
    for name, pieces in layout.items():
        for piece in pieces:
            dims = shapes[piece.name][0 if piece.index is None else 1:]  # an indexed piece reads one leading slot
            stored_rows = dims[1 if piece.transposed else 0]
            assert piece.index is None or 0 <= piece.index < shapes[piece.name][0], f"{name}: {piece}"
            assert 0 <= piece.start < piece.stop <= stored_rows, f"{name}: {piece} outside {shapes[piece.name]}"
    assert {piece.name for pieces in layout.values() for piece in pieces} == set(shapes)
