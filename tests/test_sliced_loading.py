"""Each rank reads only its own TP slices of a checkpoint, and they are exactly transformers' tensors sliced by hand;
``runtime.dtype: auto`` runs a checkpoint in its weights' dtype.

Five tiny transformers models, every parameter random (so a misplaced row cannot hide behind equal values): a GQA
Llama (untied, odd vocabulary: TP=2 pads it), a Qwen2 with one KV head (its q/k/v rows and biases replicated on
both TP=2 ranks), a Qwen3 (q/k norms, explicit head_dim), a GPT-2 (Conv1D weights stored transposed) and a bfloat16
MQA Llama. One 2-rank job loads each at TP=1 and TP=2, recording every ``get_slice(...)[index]`` the loader makes;
the test process compares each rank's parameters with the hand-sliced tensors (exactly) and counts the elements
each rank read.
"""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import cptoolkit.models.checkpoint as checkpoint
from cptoolkit.config import ConfigError, config_from_dict
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.models.from_config import DTYPES
from cptoolkit.models.shape import GPTShape
from cptoolkit.models.tp_sharding import COLUMN, FUSED_QKV, GATED_COLUMN, NORM, ROW, VOCAB
from tests.multiproc import run_ranks
from tests.test_gpt_model import megatron_groups

transformers = pytest.importorskip("transformers")

VOCAB_SIZE = 101  # odd: TP=2 pads it with one row
LLAMA = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
FAMILIES = {  # name -> (config class, model class, config arguments, dtype)
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", LLAMA, torch.float32),
    "qwen2_mqa_bias": ("Qwen2Config", "Qwen2ForCausalLM", {**LLAMA, "num_attention_heads": 4,
                                                           "num_key_value_heads": 1}, torch.float32),
    "qwen3_qk_norm": ("Qwen3Config", "Qwen3ForCausalLM", {**LLAMA, "num_attention_heads": 4, "head_dim": 32},
                      torch.float32),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=32), torch.float32),
    "llama_mqa_bf16": ("LlamaConfig", "LlamaForCausalLM", {**LLAMA, "num_key_value_heads": 1}, torch.bfloat16),
}
# Stored tensors every TP rank reads whole: norms, GPT-2's positions and the row-parallel layers' biases.
REPLICATED = re.compile(r"norm|ln_|wpe|c_proj\.bias")


def _save(directory: Path, family: str) -> Path:
    config_class, model_class, arguments, dtype = FAMILIES[family]
    torch.manual_seed(len(family))
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**arguments))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
    model.to(dtype).save_pretrained(directory)
    return directory


def _run_config(directory: Path, dtype: str = "auto") -> dict:
    return {"parallel": {}, "model": {"checkpoint": str(directory)}, "runtime": {"device": "cpu", "dtype": dtype},
            "inference": {"prompts": ["hi"]}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {family: _save(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


# ----------------------------------------------------------------------------- the hand-sliced reference

def _rows(tensor: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    return tensor.chunk(tp_size)[tp_rank]


def _vocab_rows(tensor: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    padding = -tensor.shape[0] % tp_size
    return _rows(torch.cat([tensor, tensor.new_zeros(padding, *tensor.shape[1:])]), tp_rank, tp_size)


def _qkv(q, k, v, heads: int, kv_heads: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """megatron's fused QKV rows of ``tp_rank``: for each of its query groups (``max(kv_heads, TP)`` in all),
    the group's query heads, then the key and value head the group reads (a KV head is shared by
    ``groups / kv_heads`` neighbouring groups)."""
    groups = max(kv_heads, tp_size)
    head_dim = q.shape[0] // heads
    per_head = [t.reshape(-1, head_dim, *t.shape[1:]) for t in (q, k, v)]
    rows = []
    for group in range(tp_rank * groups // tp_size, (tp_rank + 1) * groups // tp_size):
        kv_head = group * kv_heads // groups
        rows += [*per_head[0][group * heads // groups:(group + 1) * heads // groups],
                 per_head[1][kv_head], per_head[2][kv_head]]
    return torch.cat(rows)


def _llama_expected(hf: dict, config: dict, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    def cols(t):
        return t.chunk(tp_size, dim=1)[tp_rank]

    expected = {"embedding.word_embeddings.weight": _vocab_rows(hf["model.embed_tokens.weight"], tp_rank, tp_size),
                "output_layer.weight": _vocab_rows(hf["lm_head.weight"], tp_rank, tp_size),
                "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    for layer in range(config["num_hidden_layers"]):
        h, m = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        attn = h + "self_attn."
        for suffix in ("weight", "bias"):
            if attn + "q_proj." + suffix in hf:
                expected[m + "self_attention.linear_qkv." + suffix] = _qkv(
                    *(hf[f"{attn}{x}_proj.{suffix}"] for x in "qkv"), heads, kv_heads, tp_rank, tp_size)
        for x in "qk":
            if f"{attn}{x}_norm.weight" in hf:
                expected[f"{m}self_attention.{x}_layernorm.weight"] = hf[f"{attn}{x}_norm.weight"]
        expected.update({
            m + "input_layernorm.weight": hf[h + "input_layernorm.weight"],
            m + "self_attention.linear_proj.weight": cols(hf[attn + "o_proj.weight"]),
            m + "pre_mlp_layernorm.weight": hf[h + "post_attention_layernorm.weight"],
            m + "mlp.linear_fc1.weight": torch.cat([_rows(hf[h + "mlp.gate_proj.weight"], tp_rank, tp_size),
                                                    _rows(hf[h + "mlp.up_proj.weight"], tp_rank, tp_size)]),
            m + "mlp.linear_fc2.weight": cols(hf[h + "mlp.down_proj.weight"]),
        })
    return expected


def _gpt2_expected(hf: dict, config: dict, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """GPT-2's Conv1D weights are stored ``[in, out]``: transposed here, then sliced like Llama's."""
    heads, hidden = config["n_head"], config["n_embd"]
    expected = {"embedding.word_embeddings.weight": _vocab_rows(hf["transformer.wte.weight"], tp_rank, tp_size),
                "embedding.position_embeddings.weight": hf["transformer.wpe.weight"],
                "decoder.final_layernorm.weight": hf["transformer.ln_f.weight"],
                "decoder.final_layernorm.bias": hf["transformer.ln_f.bias"]}
    for layer in range(config["n_layer"]):
        h, m = f"transformer.h.{layer}.", f"decoder.layers.{layer}."
        for suffix in ("weight", "bias"):
            c_attn = hf[h + "attn.c_attn." + suffix]
            c_attn = c_attn.t() if suffix == "weight" else c_attn
            expected[m + "self_attention.linear_qkv." + suffix] = _qkv(*c_attn.split(hidden), heads, heads,
                                                                        tp_rank, tp_size)
        expected.update({
            m + "input_layernorm.weight": hf[h + "ln_1.weight"], m + "input_layernorm.bias": hf[h + "ln_1.bias"],
            m + "self_attention.linear_proj.weight": _rows(hf[h + "attn.c_proj.weight"], tp_rank, tp_size).t(),
            m + "self_attention.linear_proj.bias": hf[h + "attn.c_proj.bias"],
            m + "pre_mlp_layernorm.weight": hf[h + "ln_2.weight"], m + "pre_mlp_layernorm.bias": hf[h + "ln_2.bias"],
            m + "mlp.linear_fc1.weight": _rows(hf[h + "mlp.c_fc.weight"].t(), tp_rank, tp_size),
            m + "mlp.linear_fc1.bias": _rows(hf[h + "mlp.c_fc.bias"], tp_rank, tp_size),
            m + "mlp.linear_fc2.weight": _rows(hf[h + "mlp.c_proj.weight"], tp_rank, tp_size).t(),
            m + "mlp.linear_fc2.bias": hf[h + "mlp.c_proj.bias"],
        })
    return expected


def _expected(directory: Path, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    hf = load_file(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    if config["model_type"] == "gpt2":
        return _gpt2_expected(hf, config, tp_rank, tp_size)
    return _llama_expected(hf, config, tp_rank, tp_size)


# ----------------------------------------------------------------------------- the 2-rank job

class _RecordingSlice:
    def __init__(self, stored, name: str, reads: list):
        self._stored, self._name, self._reads = stored, name, reads

    def get_shape(self):
        return self._stored.get_shape()

    def __getitem__(self, index):
        self._reads.append((self._name, index))
        return self._stored[index]


class _RecordingFile:
    """A ``safe_open`` handle that records, in ``reads``, every ``get_slice(name)[index]`` made through it."""

    def __init__(self, handle, reads: list):
        self._handle, self._reads = handle, reads

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_slice(self, name: str):
        return _RecordingSlice(self._handle.get_slice(name), name, self._reads)

    def get_tensor(self, name: str):
        self._reads.append((name, "whole tensor"))
        return self._handle.get_tensor(name)


def _load_rank(rank, world_size, cases):
    """Load every case at TP=1 (this rank alone) and TP=2; each load's parameters and recorded reads."""
    reads: list = []
    opener = checkpoint.safe_open
    checkpoint.safe_open = lambda *args, **kwargs: _RecordingFile(opener(*args, **kwargs), reads)
    solo = dist.new_group([rank], use_local_synchronization=True)
    results = {}
    for tp_size, tp_group in ((1, solo), (2, dist.group.WORLD)):
        for name, (directory, dtype) in cases.items():
            reads.clear()
            model = checkpoint.load_model_checkpoint(directory, megatron_groups(tp_group, solo), AttentionRuntime(),
                                                     dtype)
            results[tp_size, name] = ({n: p.detach().clone() for n, p in model.named_parameters()}, list(reads))
    return results


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """``[rank][(tp_size, family)] = (parameters, reads)``; each family in the dtype its ``runtime.dtype: auto``
    resolves to."""
    dtypes = {family: DTYPES[config_from_dict(_run_config(directory)).runtime.dtype]
              for family, directory in checkpoints.items()}
    return run_ranks(2, _load_rank, {f: (str(d), dtypes[f]) for f, d in checkpoints.items()}, timeout_s=120)


@pytest.mark.parametrize("tp_size", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_rank_holds_transformers_tensors_sliced_by_hand(checkpoints, loaded, family, tp_size):
    for rank in range(2):
        params, _ = loaded[rank][tp_size, family]
        expected = _expected(checkpoints[family], rank % tp_size, tp_size)
        assert sorted(params) == sorted(expected), f"rank {rank}: parameter names differ"
        for name, want in expected.items():
            got = params[name]
            assert got.dtype == FAMILIES[family][3], f"rank {rank} {name}: dtype {got.dtype}"
            assert got.shape == want.shape, f"rank {rank} {name}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
            diff = (got.double() - want.double()).abs()
            assert torch.equal(got, want), (f"TP={tp_size} rank {rank} {name}: max diff {diff.max():.3g}, "
                                            f"mean {diff.mean():.3g}")


@pytest.mark.parametrize("tp_size", [1, 2])
@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_each_rank_reads_only_its_own_slices_each_element_once(checkpoints, loaded, family, tp_size):
    """No element is read twice by a rank; at TP=2 the ranks split every sharded tensor between them (each
    element read by exactly one) and each reads the replicated ones whole; and a rank reads exactly as many
    elements as its parameters hold from the checkpoint (vocabulary padding is not read)."""
    shapes = {name: t.shape for name, t in load_file(checkpoints[family] / "model.safetensors").items()}
    counts = []
    for rank in range(tp_size):
        params, reads = loaded[rank][tp_size, family]
        assert all(index != "whole tensor" for _, index in reads), f"rank {rank} read a whole tensor"
        count = {name: torch.zeros(shape, dtype=torch.int32) for name, shape in shapes.items()}
        for name, index in reads:
            count[name][index] += 1
        assert all(int(c.max()) <= 1 for c in count.values()), f"rank {rank} read an element twice"
        read_elements = sum(int(c.sum()) for c in count.values())
        vocab_params = [p for n, p in params.items() if "word_embeddings" in n or "output_layer" in n]
        rows = vocab_params[0].shape[0]
        padding_rows = max(0, (rank + 1) * rows - VOCAB_SIZE) - max(0, rank * rows - VOCAB_SIZE)
        padding = padding_rows * sum(p.shape[1] for p in vocab_params)
        assert read_elements == sum(p.numel() for p in params.values()) - padding, f"rank {rank}"
        counts.append(count)
    for name in shapes:
        readers = sum(count[name] for count in counts)
        want = tp_size if REPLICATED.search(name) else 1
        assert bool((readers == want).all()), f"{name}: read {readers.min()}..{readers.max()} times, want {want}"


# ----------------------------------------------------------------------------- every layout's selection

@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("tp_size", [1, 2, 4, 8])
def test_each_kind_selects_the_hand_sliced_rows_at_any_tp(kv_heads, tp_size):
    shape = GPTShape(arch="llama", num_layers=1, hidden_size=32, num_attention_heads=8, num_kv_heads=kv_heads,
                     ffn_hidden_size=16, vocab_size=13, max_seq_len=8)
    q, k, v = torch.randn(8 * 4, 3), torch.randn(kv_heads * 4, 3), torch.randn(kv_heads * 4, 3)
    fused_full = _qkv(q, k, v, 8, kv_heads, 0, 1)  # TP=1: the full tensor, in megatron's group order
    gate_up, row_split, vocab = torch.randn(32, 3), torch.randn(3, 16), torch.randn(13, 3)
    for tp_rank in range(tp_size):
        cases = {
            "fused_qkv": (FUSED_QKV, fused_full, _qkv(q, k, v, 8, kv_heads, tp_rank, tp_size)),
            "gated": (GATED_COLUMN, gate_up, torch.cat([_rows(half, tp_rank, tp_size) for half in gate_up.chunk(2)])),
            "column": (COLUMN, gate_up, _rows(gate_up, tp_rank, tp_size)),
            "row": (ROW, row_split, row_split.chunk(tp_size, dim=1)[tp_rank]),
            "vocab": (VOCAB, vocab, _vocab_rows(vocab, tp_rank, tp_size)),
            "norm": (NORM, vocab, vocab),
        }
        for name, (kind, full, want) in cases.items():
            selection = kind.select(full.shape, shape, tp_rank, tp_size)
            parts = [full.narrow(selection.dim, start, stop - start) for start, stop in selection.ranges]
            padding = [full.new_zeros(selection.padding, *full.shape[1:])] if selection.padding else []
            got = torch.cat(parts + padding, dim=selection.dim)
            assert torch.equal(got, want), f"{name} TP={tp_size} rank {tp_rank}: {selection}"


# ----------------------------------------------------------------------------- runtime.dtype: auto

def test_dtype_auto_is_the_checkpoints_weights_dtype_and_float32_without_one(checkpoints):
    assert config_from_dict(_run_config(checkpoints["llama_mqa_bf16"])).runtime.dtype == "bfloat16"
    assert config_from_dict(_run_config(checkpoints["llama_gqa"])).runtime.dtype == "float32"
    assert config_from_dict(_run_config(checkpoints["llama_mqa_bf16"], "float32")).runtime.dtype == "float32"
    built_in = {"parallel": {}, "model": {}, "runtime": {"dtype": "auto"}, "inference": {"prompts": ["hi"]}}
    assert config_from_dict(built_in).runtime.dtype == "float32"


@pytest.mark.parametrize("key, value", [("dtype", "float16"), ("torch_dtype", "float16"), ("torch_dtype", "int8")])
def test_dtype_auto_refuses_weights_it_does_not_compute_in(checkpoints, tmp_path, key, value):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    config = json.loads((checkpoints["llama_gqa"] / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (directory / "config.json").write_text(json.dumps({**config, key: value}))
    message = (rf"^{re.escape(str(directory))}/config\.json: {key}='{value}' cannot be runtime\.dtype auto; rule: "
               r"auto runs in the weights' dtype, one of \('float32', 'bfloat16', 'float64'\); set runtime\.dtype "
               r"to bfloat16 or float32 to convert the weights as they load$")
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_run_config(directory))
    assert config_from_dict(_run_config(directory, "bfloat16")).runtime.dtype == "bfloat16"
