"""Hugging Face Llama / GPT-2 checkpoints load into the megatron-core model with transformers' logits,
at TP = 1 and TP = 2, for any position ids; cptoolkit checkpoints round-trip across TP sizes;
tokenizers load from a checkpoint directory.

The transformers models and their logits are made once in the test process; one 2-rank job loads
the saved directories at TP = 2 and, on one-rank groups, at TP = 1, and compares (float32, max abs
diff <= 1e-4; the logits are of order 5).
"""
import json

import pytest
import torch
import torch.distributed as dist

from cptoolkit.inference.checkpoint import load_model_checkpoint, read_weights, save_checkpoint
from cptoolkit.inference.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.layers.dual_chunk_swap import shard_positions
from cptoolkit.models.gpt import GPTShape, gpt_forward
from tests.multiproc import run_ranks

transformers = pytest.importorskip("transformers")

SEQ_LEN = 12
TOLERANCE = 1e-4
NATIVE_SOURCE = "llama_gqa"  # the HF checkpoint re-saved in cptoolkit's format


def _llama(num_kv_heads: int, tie: bool):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=num_kv_heads, max_position_embeddings=64,
                                      rope_theta=1000.0, tie_word_embeddings=tie, initializer_range=0.2)
    return transformers.LlamaForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    return transformers.GPT2LMHeadModel(config)


def _position_cases(batch: int) -> dict[str, torch.Tensor]:
    """Contiguous positions; a DualChunkSwap shard's positions (rank 0 of PCP = 2 on 24 tokens:
    chunks 0 and 3); and each row at its own offset, as decode steps of different requests are."""
    contiguous = torch.arange(SEQ_LEN).expand(batch, SEQ_LEN)
    return {"contiguous": contiguous,
            "dual_chunk_swap": shard_positions(2 * SEQ_LEN, 0, 2).expand(batch, SEQ_LEN),
            "row_offsets": contiguous + torch.tensor([[3], [17]])}


@pytest.fixture(scope="module")
def hf_cases(tmp_path_factory):
    """{name: (checkpoint_dir, input_ids, {positions_name: (position_ids, transformers logits)})}."""
    torch.manual_seed(0)
    models = {"llama_gqa": _llama(2, tie=False), "llama_mqa_tied": _llama(1, tie=True), "gpt2": _gpt2()}
    cases = {}
    for name, model in models.items():
        directory = tmp_path_factory.mktemp(name)
        model.eval().save_pretrained(directory)
        input_ids = torch.randint(model.config.vocab_size, (2, SEQ_LEN))
        with torch.no_grad():
            logits = {pos_name: (positions, model(input_ids, position_ids=positions).logits)
                      for pos_name, positions in _position_cases(2).items()}
        cases[name] = (str(directory), input_ids, logits)
    return cases


def _diff(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = (got.double() - want.double()).abs()
    return float(diff.max()), float(diff.mean())


def _compare(model, input_ids, logits_by_positions) -> dict:
    with torch.no_grad():
        return {pos_name: _diff(gpt_forward(model, input_ids, positions, AttentionRuntime()), want)
                for pos_name, (positions, want) in logits_by_positions.items()}


def _hf_rank(rank, world_size, cases, native_dir):
    """Load every HF checkpoint at TP = 2 (the world) and at TP = 1 (this rank alone); save the
    TP = 2 GQA Llama as a cptoolkit checkpoint and load it back at TP = 1."""
    solo = dist.new_group([rank], use_local_synchronization=True)
    results = {}
    for tp_name, tp_group in (("TP=2", dist.group.WORLD), ("TP=1", solo)):
        for name, (directory, input_ids, logits) in cases.items():
            model = load_model_checkpoint(directory, tp_group, AttentionRuntime())
            results[tp_name, name] = _compare(model, input_ids, logits)
            if (tp_name, name) == ("TP=2", NATIVE_SOURCE):
                save_checkpoint(model, native_dir, ByteTokenizer())
    _, input_ids, logits = cases[NATIVE_SOURCE]
    results["TP=1", "cptoolkit checkpoint saved at TP=2"] = _compare(
        load_model_checkpoint(native_dir, solo, AttentionRuntime()), input_ids, logits)
    return results


def _assert_close(by_positions: dict, label: str) -> None:
    assert set(by_positions) == {"contiguous", "dual_chunk_swap", "row_offsets"}
    for pos_name, (max_diff, mean_diff) in by_positions.items():
        assert max_diff <= TOLERANCE, f"{label} positions={pos_name}: max {max_diff:.3g}, mean {mean_diff:.3g}"


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("native") / "ckpt")


@pytest.fixture(scope="module")
def rank_results(hf_cases, native_dir):
    return run_ranks(2, _hf_rank, hf_cases, native_dir, timeout_s=240)


@pytest.mark.parametrize("tp_name", ["TP=1", "TP=2"])
@pytest.mark.parametrize("name", ["llama_gqa", "llama_mqa_tied", "gpt2"])
def test_hf_checkpoint_gives_transformers_logits_for_any_positions(rank_results, tp_name, name):
    for rank, results in enumerate(rank_results):
        _assert_close(results[tp_name, name], f"{tp_name} rank {rank} {name}")


def test_cptoolkit_checkpoint_saved_at_tp2_loads_at_tp1_with_the_same_logits(rank_results):
    for rank, results in enumerate(rank_results):
        _assert_close(results["TP=1", "cptoolkit checkpoint saved at TP=2"], f"rank {rank}")


def test_native_checkpoint_files_describe_shape_and_tokenizer(hf_cases, native_dir, rank_results):
    config = json.loads(open(f"{native_dir}/config.json").read())
    hf_config = json.loads(open(f"{hf_cases['llama_gqa'][0]}/config.json").read())
    assert config["cptoolkit_format"] == 1
    assert GPTShape.from_hf_config(config) == GPTShape.from_hf_config(hf_config)
    assert isinstance(load_tokenizer(native_dir), ByteTokenizer)
    weights = read_weights(native_dir)
    assert weights["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((8 + 2 * 2) * 8, 64)
    assert weights["embedding.word_embeddings.weight"].shape == (128, 64)


def test_missing_files_and_tensors_are_reported(tmp_path, hf_cases):
    with pytest.raises(ValueError, match="has no config.json"):
        load_model_checkpoint(tmp_path, None, AttentionRuntime())
    (tmp_path / "config.json").write_text(json.dumps(GPTShape("gpt2", 1, 32, 4, 4, 128, 101, 64).to_hf_config()))
    with pytest.raises(ValueError, match="has neither model.safetensors nor model.safetensors.index.json"):
        load_model_checkpoint(tmp_path, None, AttentionRuntime())
    from safetensors.torch import save_file
    save_file({"transformer.wte.weight": torch.zeros(101, 32)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks tensor 'transformer.wpe.weight'"):
        load_model_checkpoint(tmp_path, None, AttentionRuntime())


def test_byte_tokenizer_round_trips_utf8_and_skips_special_ids():
    tokenizer = ByteTokenizer()
    text = "context parallel — Kontext ∥ 上下文"
    ids = tokenizer.encode(text)
    assert max(ids) < 256 and tokenizer.decode(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id]) == text
    assert tokenizer.decode(ids[:-1]).endswith("\ufffd")  # a cut multi-byte character still decodes
    assert tokenizer.vocab_size == 258 and tokenizer.eos_token_id == 256


def test_hf_tokenizer_loads_from_a_local_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "<unk>": 1, "hello": 2, "world": 3, "ring": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    HFTokenizer(fast).save(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.eos_token_id == 0 and tokenizer.vocab_size == 5
    assert tokenizer.encode("hello ring world") == [2, 4, 3]
    assert tokenizer.decode([2, 4, 0]) == "hello ring"
    with pytest.raises(ValueError, match="has no tokenizer files"):
        load_tokenizer(tmp_path / "missing")
