"""Hugging Face Llama / GPT-2 checkpoints load into the megatron-core model with transformers' logits,
at TP = 1 and TP = 2, for any position ids; cptoolkit checkpoints round-trip across TP sizes;
tokenizers load from a checkpoint directory; a broken checkpoint is one ``ConfigError`` line.

The transformers models and their logits are made once in the test process; one 2-rank job loads
the saved directories at TP = 2 and, on one-rank groups, at TP = 1, and compares (float32, max abs
diff <= 1e-4; the logits are of order 5).

The error tests copy one good checkpoint (a tiny Llama with its tokenizer), break one thing, and
check the message through the function that meets it first (``load_config`` for config.json, the
loaders for weights and tokenizer) and, for one case of each stage, through ``launch/infer.py``:
exit status 2, one error line naming the file, no traceback.
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from cptoolkit.config import ConfigError, load_config
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.layers.dual_chunk_swap import shard_positions
from cptoolkit.models.checkpoint import hf_to_full, load_model_checkpoint, read_weights, save_checkpoint
from cptoolkit.models.gpt import gpt_forward
from cptoolkit.models.families.registry import SUPPORTED, read_hf_config
from cptoolkit.models.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from tests.multiproc import free_port, run_ranks
from tests.test_gpt_model import megatron_groups

REPO = Path(__file__).resolve().parents[1]

transformers = pytest.importorskip("transformers")

SEQ_LEN = 12
TOLERANCE = 1e-4
NATIVE_SOURCE = "llama_gqa"  # the HF checkpoint re-saved in cptoolkit's format (and Gemma 3, under "gemma3")


def _llama(num_kv_heads: int, tie: bool):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=num_kv_heads, max_position_embeddings=64,
                                      rope_theta=1000.0, tie_word_embeddings=tie, initializer_range=0.2)
    return transformers.LlamaForCausalLM(config)


def _gemma3():
    """A Gemma 3 text model (sandwich and q/k norms off their zero start, local RoPE base on its first layer) with a
    window longer than the sequence, since these position cases feed one rank's tokens at any positions."""
    config = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           max_position_embeddings=64, sliding_window=32, query_pre_attn_scalar=24,
                                           layer_types=["sliding_attention", "full_attention"],
                                           rope_parameters={
                                               "full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
    model = transformers.Gemma3ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.2)
    return model


def _gpt2():
    config = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    return transformers.GPT2LMHeadModel(config)


def _word_tokenizer(eos_token: str | None = "<eos>"):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "<unk>": 1, "hello": 2, "world": 3, "ring": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token, unk_token="<unk>")


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
    models = {"llama_gqa": _llama(2, tie=False), "llama_mqa_tied": _llama(1, tie=True), "gpt2": _gpt2(),
              "gemma3": _gemma3()}
    cases = {}
    for name, model in models.items():
        directory = tmp_path_factory.mktemp(name)
        model.eval().save_pretrained(directory)
        input_ids = torch.randint(model.config.vocab_size, (2, SEQ_LEN))
        with torch.no_grad():
            logits = {pos_name: (positions, model(input_ids, position_ids=positions).logits)
                      for pos_name, positions in _position_cases(2).items()}
        cases[name] = (str(directory), input_ids, logits)
    sharded = Path(shutil.copytree(cases["llama_gqa"][0], tmp_path_factory.mktemp("sharded") / "ckpt"))
    _shard(sharded)
    cases["llama_gqa_sharded"] = (str(sharded), *cases["llama_gqa"][1:])
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
            model = load_model_checkpoint(directory, megatron_groups(tp_group, solo), AttentionRuntime())
            results[tp_name, name] = _compare(model, input_ids, logits)
            if (tp_name, name) == ("TP=2", NATIVE_SOURCE):
                save_checkpoint(model, native_dir, ByteTokenizer())
            if (tp_name, name) == ("TP=2", "gemma3"):
                save_checkpoint(model, f"{native_dir}-gemma3", ByteTokenizer())
    for source, directory in ((NATIVE_SOURCE, native_dir), ("gemma3", f"{native_dir}-gemma3")):
        _, input_ids, logits = cases[source]
        results["TP=1", f"cptoolkit checkpoint of {source} saved at TP=2"] = _compare(
            load_model_checkpoint(directory, megatron_groups(solo, solo), AttentionRuntime()), input_ids, logits)
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
@pytest.mark.parametrize("name", ["llama_gqa", "llama_gqa_sharded", "llama_mqa_tied", "gpt2", "gemma3"])
def test_hf_checkpoint_gives_transformers_logits_for_any_positions(rank_results, tp_name, name):
    for rank, results in enumerate(rank_results):
        _assert_close(results[tp_name, name], f"{tp_name} rank {rank} {name}")


def test_cptoolkit_checkpoint_saved_at_tp2_loads_at_tp1_with_the_same_logits(rank_results):
    for rank, results in enumerate(rank_results):
        for source in (NATIVE_SOURCE, "gemma3"):
            _assert_close(results["TP=1", f"cptoolkit checkpoint of {source} saved at TP=2"], f"rank {rank} {source}")


def test_native_checkpoint_files_describe_shape_and_tokenizer(hf_cases, native_dir, rank_results):
    config = json.loads(open(f"{native_dir}/config.json").read())
    hf_config = json.loads(open(f"{hf_cases['llama_gqa'][0]}/config.json").read())
    assert config["cptoolkit_format"] == 1
    assert read_hf_config(config) == read_hf_config(hf_config)
    assert isinstance(load_tokenizer(native_dir), ByteTokenizer)
    weights = read_weights(native_dir)
    assert weights["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((8 + 2 * 2) * 8, 64)
    assert weights["embedding.word_embeddings.weight"].shape == (128, 64)
    # runtime.dtype: auto reads the weights' dtype from config.json's "dtype".
    assert {str(tensor.dtype) for tensor in weights.values()} == {f"torch.{config['dtype']}"}


def test_byte_tokenizer_round_trips_utf8_and_skips_special_ids():
    tokenizer = ByteTokenizer()
    text = "context parallel — Kontext ∥ 上下文"
    ids = tokenizer.encode(text)
    assert max(ids) < 256 and tokenizer.decode(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id]) == text
    assert tokenizer.decode(ids[:-1]).endswith("\ufffd")  # a cut multi-byte character still decodes
    assert tokenizer.vocab_size == 258 and tokenizer.eos_token_id == 256


def test_hf_tokenizer_loads_from_a_local_directory(tmp_path):
    HFTokenizer(_word_tokenizer()).save(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.eos_token_id == 0 and tokenizer.vocab_size == 5
    assert tokenizer.encode("hello ring world") == [2, 4, 3]
    assert tokenizer.decode([2, 4, 0]) == "hello ring"
    with pytest.raises(ConfigError, match="missing: no tokenizer files"):
        load_tokenizer(tmp_path / "missing")


# ----------------------------------------------------------------------------- broken checkpoints

@pytest.fixture(scope="module")
def good_checkpoint(hf_cases, tmp_path_factory) -> Path:
    """The GQA Llama of ``hf_cases`` (2 layers, hidden 64, vocab 128; loads with transformers' logits)
    plus a tokenizer."""
    directory = Path(shutil.copytree(hf_cases["llama_gqa"][0], tmp_path_factory.mktemp("good") / "ckpt"))
    HFTokenizer(_word_tokenizer()).save(directory)
    return directory


@pytest.fixture
def checkpoint(good_checkpoint, tmp_path) -> Path:
    """A fresh copy of the good checkpoint for a test to break."""
    return Path(shutil.copytree(good_checkpoint, tmp_path / "ckpt"))


def _set_config(directory: Path, **changes) -> None:
    """Change config.json's keys; a value of None drops the key."""
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def _set_tensors(directory: Path, file: str = "model.safetensors", **changes) -> None:
    """Change tensors of a safetensors file; a value of None drops the tensor."""
    weights = load_file(directory / file)
    weights.update(changes)
    save_file({name: t for name, t in weights.items() if t is not None}, directory / file)


def _cut(path: Path, keep: float) -> None:
    """Keep the first ``keep`` fraction of a file's bytes, as an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _shard(directory: Path) -> None:
    """Rewrite model.safetensors as two shards and an index, as save_pretrained does for big models."""
    weights = load_file(directory / "model.safetensors")
    names = sorted(weights)
    parts = dict(zip(SHARDS, (names[:len(names) // 2], names[len(names) // 2:])))
    for shard, part in parts.items():
        save_file({name: weights[name] for name in part}, directory / shard)
    weight_map = {name: shard for shard, part in parts.items() for name in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "model.safetensors").unlink()


def _make_native(directory: Path) -> None:
    """Turn the HF checkpoint into a cptoolkit one (full state dict, "cptoolkit_format": 1)."""
    config = json.loads((directory / "config.json").read_text())
    full = hf_to_full(read_weights(directory), read_hf_config(config))
    save_file({name: tensor.contiguous() for name, tensor in full.items()}, directory / "model.safetensors")
    _set_config(directory, cptoolkit_format=1)


MALFORMED_JSON = '{\n  "model_type": "llama",\n  "hidden_size": 64\n  "vocab_size": 128\n}\n'
MODEL = r"config\.json's model \(llama, 2 layers, hidden 64, vocab 128\)"
SAME_MODEL = r"the weights and config\.json must come from the same model"

# (breaks the checkpoint directory, the message after "^{directory}"); each is met by load_config first.
CONFIG_JSON_CASES = {
    "malformed JSON": (lambda d: (d / "config.json").write_text(MALFORMED_JSON),
                       r"/config\.json: malformed JSON: line 4, column 3: Expecting ',' delimiter; fix the file "
                       r"or save the checkpoint again \(save_pretrained or cptoolkit's save_checkpoint\)$"),
    "not UTF-8": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00garbage"),
                  r"/config\.json: not UTF-8 text, so not JSON \(the file is corrupt\); save the checkpoint "
                  r"again"),
    "not an object": (lambda d: (d / "config.json").write_text("[64, 128]"),
                      r"/config\.json: must hold a JSON object, got a list; save the checkpoint again"),
    "no hidden_size": (lambda d: _set_config(d, hidden_size=None),
                       r"/config\.json: missing required key 'hidden_size'; add it with the value from the "
                       r"model's original config\.json$"),
    "no model_type": (lambda d: _set_config(d, model_type=None),
                      r"/config\.json: missing required key 'model_type'; rule: one of 'llama', 'mistral'"),
    "hidden_size as text": (lambda d: _set_config(d, hidden_size="64"),
                            r"/config\.json: hidden_size='64'; rule: must be a positive integer$"),
    "unsupported model_type": (lambda d: _set_config(d, model_type="gemma"),
                               rf"/config\.json: model_type='gemma' is not supported; rule: {re.escape(SUPPORTED)}$"),
    "unsupported architecture": (lambda d: _set_config(d, architectures=["LlamaForSequenceClassification"]),
                                 r"/config\.json: architectures=\['LlamaForSequenceClassification'\] is not "
                                 r"supported for model_type 'llama'; rule: LlamaForCausalLM$"),
}

# Met by load_model_checkpoint (launch/infer.py loads the weights after load_config).
WEIGHTS_CASES = {
    "no weights file": (lambda d: (d / "model.safetensors").unlink(),
                        r": no model\.safetensors or model\.safetensors\.index\.json; save the weights with "
                        r"save_pretrained \(safetensors: \.bin and \.pt weights are not read\)$"),
    "empty safetensors": (lambda d: (d / "model.safetensors").write_bytes(b""),
                          r"/model\.safetensors: not a readable safetensors file \(.*header too small\): it is "
                          r"truncated or corrupt; copy it again or re-save the checkpoint$"),
    "truncated safetensors": (lambda d: _cut(d / "model.safetensors", 0.5),
                              r"/model\.safetensors: not a readable safetensors file \(.*incomplete metadata.*\): "
                              r"it is truncated or corrupt"),
    "random bytes": (lambda d: (d / "model.safetensors").write_bytes(random.Random(0).randbytes(4096)),
                     r"/model\.safetensors: not a readable safetensors file \(.*\): it is truncated or corrupt"),
    "missing tensor": (lambda d: _set_tensors(d, **{"model.layers.1.mlp.down_proj.weight": None}),
                       rf"/model\.safetensors: no tensor 'model\.layers\.1\.mlp\.down_proj\.weight', which "
                       rf"{MODEL} needs; {SAME_MODEL}$"),
    "tensor of the wrong shape": (lambda d: _set_tensors(d, **{"model.layers.0.self_attn.q_proj.weight":
                                                                torch.zeros(32, 64)}),
                                  rf"/model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has "
                                  rf"shape \(32, 64\), but {MODEL} needs \(64, 64\); {SAME_MODEL}$"),
    "config.json of another vocabulary": (lambda d: _set_config(d, vocab_size=256),
                                          r"/model\.safetensors: tensor 'model\.embed_tokens\.weight' has shape "
                                          r"\(128, 64\), but config\.json's model \(llama, 2 layers, hidden 64, "
                                          r"vocab 256\) needs \(256, 64\)"),
    "index names a missing shard": (lambda d: (_shard(d), (d / SHARDS[1]).unlink()),
                                    rf"/model\.safetensors\.index\.json: names shard '{SHARDS[1]}', which is not "
                                    r"in .*; copy every shard the index lists next to it$"),
    "malformed index": (lambda d: (_shard(d), (d / "model.safetensors.index.json").write_text('{"weight_map": {')),
                        r"/model\.safetensors\.index\.json: malformed JSON: line 1, column 17: "),
    "index without weight_map": (lambda d: (_shard(d), (d / "model.safetensors.index.json").write_text("{}")),
                                 r"/model\.safetensors\.index\.json: no \"weight_map\" object of tensor name -> "
                                 r"shard file; save the checkpoint again"),
    "truncated shard": (lambda d: (_shard(d), _cut(d / SHARDS[0], 0.9)),
                        rf"/{SHARDS[0]}: not a readable safetensors file \(.*\): it is truncated or corrupt"),
    "tensor missing from its shard": (
        lambda d: (_shard(d), _set_tensors(d, SHARDS[1], **{"model.norm.weight": None})),
        r"/model\.safetensors\.index\.json: no tensor 'model\.norm\.weight', which "),
    "cptoolkit checkpoint missing a tensor": (
        lambda d: (_make_native(d), _set_tensors(d, **{"decoder.layers.1.mlp.linear_fc2.weight": None})),
        rf"/model\.safetensors: no tensor 'decoder\.layers\.1\.mlp\.linear_fc2\.weight', which {MODEL} needs"),
    "cptoolkit checkpoint with a tensor of the wrong shape": (
        lambda d: (_make_native(d), _set_tensors(d, **{"decoder.layers.0.self_attention.linear_qkv.weight":
                                                       torch.zeros(64, 64)})),
        rf"/model\.safetensors: tensor 'decoder\.layers\.0\.self_attention\.linear_qkv\.weight' has shape "
        rf"\(64, 64\), but {MODEL} needs \(96, 64\)"),
}

# Met by load_tokenizer (after the weights).
TOKENIZER_CASES = {
    "no tokenizer files": (lambda d: (d / "tokenizer.json").unlink(),
                           r": no tokenizer files \(tokenizer\.json, tokenizer\.model, vocab\.json\); save the "
                           r"tokenizer with save_pretrained next to the weights$"),
    "malformed tokenizer.json": (lambda d: _cut(d / "tokenizer.json", 0.5),
                                 r"/tokenizer\.json: malformed JSON: line \d+, column \d+: "),
    "malformed tokenizer_config.json": (lambda d: (d / "tokenizer_config.json").write_text('{"eos_token": '),
                                        r"/tokenizer_config\.json: malformed JSON: line 1, column 15: "),
    "tokenizer.json transformers cannot read": (lambda d: (d / "tokenizer.json").write_text("{}"),
                                                r": transformers cannot load the tokenizer files \(\w+: .+\); "
                                                r"save the tokenizer again with save_pretrained$"),
    "tokenizer without eos_token": (lambda d: _word_tokenizer(eos_token=None).save_pretrained(d),
                                    r": the tokenizer has no eos_token; set \"eos_token\" in "
                                    r"tokenizer_config\.json \(generation stops on it\)$"),
}


def _run_config(directory: Path, tmp_path: Path) -> Path:
    """A one-rank inference config on the checkpoint ``directory``."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"parallel": {}, "model": {"checkpoint": str(directory)},
                                    "runtime": {"device": "cpu"},
                                    "inference": {"prompts": ["hello world"], "max_new_tokens": 2}}))
    return path


def _starts_with_file(directory: Path, message: str) -> str:
    return "^" + re.escape(str(directory)) + message


def test_the_unbroken_copy_loads(checkpoint, tmp_path):
    cfg = load_config(_run_config(checkpoint, tmp_path))
    m = cfg.model
    assert (m.arch, m.num_layers, m.hidden_size, m.vocab_size, m.checkpoint) == ("llama", 2, 64, 128, str(checkpoint))
    assert load_tokenizer(checkpoint).encode("hello ring") == [2, 4]


@pytest.mark.parametrize("name", CONFIG_JSON_CASES)
def test_config_json_errors_name_the_json_file(checkpoint, tmp_path, name):
    breaks, message = CONFIG_JSON_CASES[name]
    breaks(checkpoint)
    with pytest.raises(ConfigError, match=_starts_with_file(checkpoint, message)):
        load_config(_run_config(checkpoint, tmp_path))
    with pytest.raises(ConfigError, match=_starts_with_file(checkpoint, message)):
        load_model_checkpoint(checkpoint, None, AttentionRuntime())


def test_a_missing_config_json_is_named(checkpoint, tmp_path):
    (checkpoint / "config.json").unlink()
    in_yaml = (rf"run\.yaml: model\.checkpoint = '{re.escape(str(checkpoint))}': no config\.json in .*; point it at "
               r"a directory written by save_pretrained or save_checkpoint$")
    with pytest.raises(ConfigError, match=in_yaml):
        load_config(_run_config(checkpoint, tmp_path))
    not_found = r"/config\.json: not found; a checkpoint directory holds the model's config\.json next to its weights"
    with pytest.raises(ConfigError, match=_starts_with_file(checkpoint, not_found)):
        load_model_checkpoint(checkpoint, None, AttentionRuntime())
    with pytest.raises(ConfigError, match=r"no config\.json in .*/absent \(no such directory\)"):
        load_config(_run_config(checkpoint.parent / "absent", tmp_path))


@pytest.mark.parametrize("name", WEIGHTS_CASES)
def test_weights_errors_name_the_file_and_tensor(checkpoint, name):
    breaks, message = WEIGHTS_CASES[name]
    breaks(checkpoint)
    with pytest.raises(ConfigError, match=_starts_with_file(checkpoint, message)):
        load_model_checkpoint(checkpoint, None, AttentionRuntime())


@pytest.mark.parametrize("name", TOKENIZER_CASES)
def test_tokenizer_errors_name_the_file(checkpoint, name):
    breaks, message = TOKENIZER_CASES[name]
    breaks(checkpoint)
    with pytest.raises(ConfigError, match=_starts_with_file(checkpoint, message)):
        load_tokenizer(checkpoint)


@pytest.mark.parametrize("name", ["malformed JSON", "truncated safetensors", "no tokenizer files"])
def test_launch_reports_a_broken_checkpoint_in_one_line_and_exits_2(checkpoint, tmp_path, name):
    """One case per stage: load_config, the weights, the tokenizer."""
    breaks, message = {**CONFIG_JSON_CASES, **WEIGHTS_CASES, **TOKENIZER_CASES}[name]
    breaks(checkpoint)
    command = [sys.executable, "launch/infer.py", "--config", str(_run_config(checkpoint, tmp_path))]
    port = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # the default 29500 may be taken
    done = subprocess.run(command, cwd=REPO, env={**os.environ, **port}, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    error_lines = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1, output[-3000:]
    assert re.match(r"\[rank 0\] error: " + re.escape(str(checkpoint)) + message, error_lines[0]), error_lines[0]
