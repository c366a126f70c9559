"""Incremental detokenization gives, after every token, exactly the text a full decode gives, on random token
sequences of the byte tokenizer and of trained BPE tokenizers (byte-level, as GPT-2/Qwen/Llama 3, and
SentencePiece-style Metaspace, as Llama 2/Mistral/Gemma), with multi-byte characters split across tokens,
special tokens and stray bytes; and each token's decode work stays bounded by its window, not the length."""
from __future__ import annotations

import random

import pytest
import transformers
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from cptoolkit.inference.detokenizer import IncrementalDetokenizer
from cptoolkit.models.tokenizer import ByteTokenizer, HFTokenizer

CORPUS = ["the old man follows a wooden boat again and again", "naïve café — déjà vu, über straße",
          "数据并行 上下文并行 张量并行", "emoji 🚀🔥 and ✓ marks, κόσμε", "count: 1 2 3 4 5 6 7 8 9 10"] * 20


def _byte_level_bpe() -> HFTokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return HFTokenizer(transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>"))


def _metaspace_bpe() -> HFTokenizer:
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<eos>",
                                                                                            *byte_tokens]))
    return HFTokenizer(transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                                                            unk_token="<unk>"))


TOKENIZERS = {"byte": ByteTokenizer(), "byte-level-bpe": _byte_level_bpe(), "metaspace-bpe": _metaspace_bpe()}


def _check_every_prefix(tokenizer, ids: list[int]) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer)
    for length, token in enumerate(ids, 1):
        before = detokenizer.text
        changed_from = detokenizer.append(token)
        want = tokenizer.decode(ids[:length])
        assert detokenizer.text == want, f"after {length} tokens {ids[:length]}: {detokenizer.text!r} != {want!r}"
        assert before[:changed_from] == want[:changed_from], "text before changed_from must not change"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_text_equals_a_full_decode_after_every_token_of_encoded_text(name):
    """Real text, encoded: the tokens a model trained on it would emit."""
    tokenizer = TOKENIZERS[name]
    for text in CORPUS[:5]:
        _check_every_prefix(tokenizer, tokenizer.encode(text + " " + text[::-1]))


@settings(max_examples=600, deadline=None, derandomize=True)
@given(data=st.data())
def test_text_equals_a_full_decode_after_every_token_of_random_ids(data):
    """Random ids: characters cut between tokens, stray continuation bytes, special tokens anywhere."""
    name = data.draw(st.sampled_from(sorted(TOKENIZERS)))
    tokenizer = TOKENIZERS[name]
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), min_size=1, max_size=40))
    _check_every_prefix(tokenizer, ids)


class _CountingTokenizer:
    """Counts the ids every decode is given."""

    def __init__(self, inner):
        self.inner, self.decoded_ids = inner, 0

    def decode(self, ids):
        self.decoded_ids += len(ids)
        return self.inner.decode(ids)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_decode_work_per_token_does_not_grow_with_the_length(name):
    tokenizer = TOKENIZERS[name]
    rng = random.Random(0)
    text = " ".join(rng.choice(CORPUS) for _ in range(150))
    ids = tokenizer.encode(text)
    counting = _CountingTokenizer(tokenizer)
    detokenizer = IncrementalDetokenizer(counting)
    work = []
    for token in ids:
        before = counting.decoded_ids
        detokenizer.append(token)
        work.append(counting.decoded_ids - before)
    assert detokenizer.text == tokenizer.decode(ids)
    # A window holds the last commit's tokens and those of one unfinished character: a few tokens, never the
    # whole output (a full decode per token would reach len(ids) > 500 here).
    assert len(ids) > 500 and max(work) <= 24, (len(ids), max(work))
