"""Training data and the pure trainer pieces: corpus, windows, DualChunkSwap batch slicing, LR schedule,
optimizer groups, and the training config rules (all without process groups)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from cptoolkit.config import ConfigError, TrainConfig, config_from_dict, load_config
from cptoolkit.models.tokenizer import ByteTokenizer
from cptoolkit.layers.dual_chunk_swap import unshard_sequence
from cptoolkit.training.data import (PackedBatch, corpus_documents, generate_corpus, get_batch_on_this_pcp_rank,
                                     pack_windows, read_corpus, sample_windows, tokenize_documents)
from cptoolkit.training.trainer import build_optimizer, lr_at_step, validate_train_config

PAD_ID = 999


def test_generated_corpus_is_deterministic_per_seed():
    corpus = generate_corpus(200, seed=5)
    assert corpus == generate_corpus(200, seed=5)
    assert corpus != generate_corpus(200, seed=6)
    lengths = [len(doc) for doc in corpus]
    assert len(corpus) == 200 and min(lengths) >= 5 and max(lengths) > 2 * min(lengths)


def test_corpus_file_resolves_against_the_config_folder(tmp_path):
    (tmp_path / "docs.txt").write_text("first document\n\n  \nsecond one\n")
    assert corpus_documents(TrainConfig(corpus="docs.txt"), tmp_path) == ["first document", "second one"]
    assert corpus_documents(TrainConfig(corpus=None, seed=3), tmp_path) == generate_corpus(seed=3)


def test_corpus_file_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"train.corpus = .*missing.txt.*no such file"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"train.corpus = .*empty.txt.*no non-empty line"):
        read_corpus(tmp_path / "empty.txt")


def test_tokenized_documents_end_with_eos():
    tokenizer = ByteTokenizer()
    (doc,) = tokenize_documents(["hé"], tokenizer)
    assert doc.tolist() == list("hé".encode()) + [tokenizer.eos_token_id]


def test_windows_are_reproducible_slices_of_documents_with_variable_lengths():
    documents = [torch.arange(n) + 1000 * i for i, n in enumerate((3, 10, 50, 200))]
    windows = sample_windows(documents, step=7, num_windows=64, seq_len=16, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(windows, sample_windows(documents, 7, 64, 16, 1)))
    assert any(not torch.equal(a, b) for a, b in zip(windows, sample_windows(documents, 8, 64, 16, 1)))
    lengths = {w.numel() for w in windows}
    assert lengths <= {3, 10, 17} and len(lengths) == 3, lengths
    for window in windows:
        doc = documents[int(window[0]) // 1000]
        start = int(window[0]) % 1000
        assert torch.equal(window, doc[start:start + window.numel()])


def test_pack_windows_rejects_a_window_without_a_target():
    with pytest.raises(ValueError, match=r"at least 2 tokens .* got lengths \[3, 1\]"):
        pack_windows([torch.tensor([1, 2, 3]), torch.tensor([4])])


def _padded_reference(windows: list[torch.Tensor], seq_len_padded: int):
    """Inputs, labels, mask and positions of every window padded to ``seq_len_padded``, built directly."""
    rows = len(windows)
    inputs = torch.full((rows, seq_len_padded), PAD_ID)
    labels = torch.full((rows, seq_len_padded), PAD_ID)
    mask = torch.zeros(rows, seq_len_padded, dtype=torch.bool)
    for i, window in enumerate(windows):
        n = window.numel() - 1
        inputs[i, :n], labels[i, :n], mask[i, :n] = window[:-1], window[1:], True
    return inputs, labels, mask, torch.arange(seq_len_padded).expand(rows, -1)


@pytest.mark.parametrize("pcp_size", [1, 2, 4])
def test_pcp_shards_of_a_variable_length_batch_reassemble_it(pcp_size):
    windows = [torch.randint(256, (n,), generator=torch.Generator().manual_seed(n)) for n in (18, 5, 12, 2)]
    packed = pack_windows(windows)
    shards = [get_batch_on_this_pcp_rank(packed, r, pcp_size, PAD_ID) for r in range(pcp_size)]
    seq_len_padded = shards[0].input_ids.shape[1] * pcp_size
    assert seq_len_padded == -(-17 // (2 * pcp_size)) * 2 * pcp_size
    expected = _padded_reference(windows, seq_len_padded)
    for field, want in zip(("input_ids", "labels", "loss_mask", "position_ids"), expected):
        got = unshard_sequence(torch.stack([getattr(s, field) for s in shards]), pcp_size, seq_dim=1)
        assert torch.equal(got, want), f"pcp_size={pcp_size}: {field} differs after unsharding"
    assert sum(s.num_loss_tokens for s in shards) == 17 + 4 + 11 + 1


def test_pcp_shards_keep_a_partial_loss_mask():
    packed = pack_windows([torch.arange(9), torch.arange(5)])
    mask = packed.loss_mask.clone()
    mask[:3] = False  # e.g. no loss on a prompt
    masked = PackedBatch(packed.tokens, packed.labels, mask, packed.cu_seqlens)
    shards = [get_batch_on_this_pcp_rank(masked, r, 2, PAD_ID) for r in range(2)]
    full = unshard_sequence(torch.stack([s.loss_mask for s in shards]), 2, seq_dim=1)
    assert full[0].tolist() == [False] * 3 + [True] * 5
    assert full[1].tolist() == [True] * 4 + [False] * 4


def test_lr_warms_up_then_decays_by_cosine_to_min_lr():
    train = TrainConfig(steps=12, lr=1e-2, min_lr=1e-3, warmup_steps=4)
    lrs = [lr_at_step(step, train) for step in range(train.steps)]
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert lrs[4] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)
    middle = 4 + (train.steps - 1 - 4) / 2
    assert lr_at_step(middle, train) == pytest.approx((1e-2 + 1e-3) / 2)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    no_warmup = TrainConfig(steps=3, lr=1.0, min_lr=0.0, warmup_steps=0)
    assert [lr_at_step(s, no_warmup) for s in range(3)] == pytest.approx([1.0, 0.5, 0.0])
    assert math.isclose(lr_at_step(0, TrainConfig(steps=1, warmup_steps=0, lr=0.1, min_lr=0.0)), 0.1)


def test_weight_decay_applies_to_matrices_only():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[1].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].bias), id(model[2].weight), id(model[2].bias)}


def _train_config(parallel: dict, model: dict, train: dict | None = None):
    base_model = dict(arch="llama", num_layers=1, hidden_size=32, num_attention_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, vocab_size=260, max_seq_len=64)
    return config_from_dict({"parallel": parallel, "model": {**base_model, **model},
                             "runtime": {},
                             "train": {"seq_len": 32, **(train or {})}}, source="train.yaml")


@pytest.mark.parametrize("parallel, model, train, match", [
    (dict(tp=4, pcp=1, dcp=1), {}, None,
     r"train.yaml: model.num_kv_heads = 2: must be a multiple of parallel.tp \(4\) for training"),
    (dict(tp=2, pcp=1, dcp=1), dict(ffn_hidden_size=65), None,
     r"train.yaml: model.ffn_hidden_size = 65: must be a multiple of parallel.tp \(2\)"),
    (dict(tp=1, pcp=1, dcp=1), dict(vocab_size=200), None,
     r"train.yaml: model.vocab_size = 200: must be >= the tokenizer's vocabulary \(258 ids\)"),
    (dict(tp=1, pcp=1, dcp=1), dict(arch="gpt2"), None,
     r"train.yaml: model: GPTShape.num_kv_heads=2; rule: gpt2 has one KV head per query head"),
])
def test_training_rules_are_checked_before_any_group(parallel, model, train, match):
    with pytest.raises(ConfigError, match=match):
        validate_train_config(_train_config(parallel, model, train), ByteTokenizer.vocab_size)


@pytest.mark.parametrize("parallel, train, match", [
    (dict(tp=1, pcp=4, dcp=4), dict(seq_len=36),
     r"train.seq_len = 36: must be a multiple of 2\*parallel.pcp \(8\) for DualChunkSwap"),
    (dict(tp=3, pcp=1, dcp=1), {},
     r"train.yaml: parallel \(tp=3, pcp=1, dcp=1, dp=1\) with model \(num_attention_heads=4, num_kv_heads=2\): "
     r"num_heads \(4\) must be a multiple of tp \(3\): each TP rank owns num_heads/tp query heads$"),
])
def test_seq_len_and_heads_that_do_not_divide_are_rejected_by_the_config(parallel, train, match):
    with pytest.raises(ConfigError, match=match):
        _train_config(parallel, {}, train)


def test_an_inference_config_is_not_a_train_config():
    cfg = config_from_dict({"parallel": {}, "model": {}, "runtime": {}, "inference": {"prompts": ["hi"]}},
                           source="infer.yaml")
    with pytest.raises(ConfigError, match=r"infer.yaml: launch/train.py needs a 'train' section"):
        validate_train_config(cfg, ByteTokenizer.vocab_size)


def test_shipped_train_configs_differ_only_in_layout_and_save_dir():
    """The three train_*.yaml configs train one model on one data stream (their losses agree to float
    rounding): each passes the training rules, has the layout its name says, and shares everything else."""
    folder = Path(__file__).resolve().parents[1] / "configs"
    configs = {(tp, pcp): load_config(folder / f"train_tp{tp}_pcp{pcp}.yaml")
               for tp, pcp in ((1, 1), (2, 2), (1, 4))}
    for (tp, pcp), cfg in configs.items():
        validate_train_config(cfg, ByteTokenizer.vocab_size)
        assert (cfg.parallel.tp, cfg.parallel.pcp, cfg.parallel.dp) == (tp, pcp, 1), cfg.parallel
        assert Path(cfg.train.save_dir).name == f"train_tp{tp}_pcp{pcp}", cfg.train.save_dir
    first, *others = configs.values()
    for cfg in others:
        assert cfg.model == first.model and cfg.runtime == first.runtime, (cfg.source, first.source)
        assert dataclasses.replace(cfg.train, save_dir=None) == dataclasses.replace(first.train, save_dir=None), (
            f"{cfg.source} and {first.source} train differently: {cfg.train} vs {first.train}")
