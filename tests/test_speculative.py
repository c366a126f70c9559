"""Speculative decoding (prompt-lookup drafts verified through DCP decode attention with L queries per sequence).

- ``NgramProposer`` proposes what followed the latest earlier match of the longest suffix n-gram;
- ``accept``: greedy keeps drafts while they are the argmax; sampling's rejection rule emits each token with
  exactly the target distribution (counted over 40,000 seeded draws);
- DCP decode with ``L`` new tokens equals float64 causal attention over the whole history (1, 2, 4 ranks,
  interleave 2, ragged lengths);
- the engine's greedy tokens, with drafts, equal plain decoding's at 1 rank, TP2xPCP1xDCP2, TP1xPCP2xDCP2 and
  TP2xPCP2xDCP4 for the GQA and MQA reference checkpoints and a DeepSeek-V3 (MLA) checkpoint made by
  transformers, with a frequency penalty on one request and logprobs on another (equal to 1e-5); prompts
  repeat their own continuation, so most drafts are accepted and some rejected (both paths run);
- sampled speculative decoding draws the same tokens at every layout for one seed.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist

from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams, make_generator, token_weights
from cptoolkit.inference.speculative import NgramProposer, accept
from cptoolkit.layers.dcp_decode import ContiguousShardCache, DecodeGroup, dcp_decode_attention
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.multiproc import run_ranks

REPO_CHECKPOINTS = ("checkpoints/tiny-gqa", "checkpoints/tiny-mqa")
BASE_PROMPTS = ["The cat sat on", "12 + 7 =", "one two three", "A red ball"]
MAX_NEW = 20
LAYOUTS = {1: [(1, 1, 1)], 2: [(2, 1, 2), (1, 2, 2)], 4: [(2, 2, 4)]}


def test_ngram_proposer_continues_the_latest_match_of_the_longest_suffix():
    proposer = NgramProposer(num_tokens=3, min_n=1, max_n=2)
    # Suffix (5, 6) occurred at 1..2 (followed by 7, 8, 9) and at 6..7 (followed by 1): the latest wins.
    assert proposer.propose([4, 5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6], limit=8) == [1, 2, 5]
    assert proposer.propose([4, 5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6], limit=2) == [1, 2]
    # No bigram match: the unigram 9 matches at 2, followed by 3, 9.
    assert proposer.propose([1, 2, 9, 3, 9], limit=8) == [3, 9]
    assert proposer.propose([1, 2, 3], limit=8) == []
    assert proposer.propose([7], limit=8) == []
    with pytest.raises(ValueError, match="min_n <= max_n"):
        NgramProposer(num_tokens=2, min_n=3, max_n=2)


def test_greedy_acceptance_keeps_drafts_while_they_are_the_argmax():
    logits = torch.full((4, 6), -5.0)
    logits[0, 2] = logits[1, 4] = logits[2, 1] = logits[3, 5] = 5.0  # argmax per row: 2, 4, 1, 5
    greedy, generator = SamplingParams(temperature=0.0), torch.Generator()
    assert accept(logits, [2, 4, 1], greedy, generator) == [2, 4, 1, 5]  # all accepted + the bonus token
    assert accept(logits, [2, 3, 1], greedy, generator) == [2, 4]  # second rejected, replaced by the argmax
    assert accept(logits[:1], [], greedy, generator) == [2]


def test_sampled_acceptance_emits_the_target_distribution_exactly():
    torch.manual_seed(0)
    logits = torch.randn(2, 5) * 1.5
    params = SamplingParams(temperature=0.8, top_k=4, seed=3)
    want = token_weights(logits[:1], [params])[0]
    want /= want.sum()
    draft = int(torch.argsort(want, descending=True)[1])  # a likely but not the likeliest token
    draws = 40_000
    generator = make_generator(3, 0)
    first = Counter(accept(logits, [draft], params, generator)[0] for _ in range(draws))
    got = torch.tensor([first[token] / draws for token in range(5)])
    # 4 standard deviations of a proportion over 40,000 draws is at most 0.01.
    assert (got - want).abs().max() < 0.01, (got, want)
    assert first[int(torch.argmin(logits[0]))] == 0  # outside top-k: never emitted


def _multi_token_rank(rank, world_size, num_new):
    generator = torch.Generator().manual_seed(0)
    batch, hq, hkv, head_dim, history = 3, 4, 2, 8, 13
    k_full, v_full = (torch.randn(batch, hkv, history + num_new, head_dim, generator=generator) for _ in range(2))
    q = torch.randn(batch, hq, num_new, head_dim, generator=generator)
    group = (DecodeGroup.from_group(dist.group.WORLD, 1, world_size, interleave=2) if world_size > 1
             else DecodeGroup(None, 0, 1, 1, 1))
    cache = ContiguousShardCache(64, batch, hkv, head_dim, group)
    lens = torch.tensor([history, history - 3, history - 7])
    cache.write_prefix(k_full, v_full, lens)
    positions = lens[:, None] + torch.arange(num_new)
    new_k, new_v = (torch.stack([t[i, :, lens[i]:lens[i] + num_new] for i in range(batch)]) for t in (k_full, v_full))
    out = dcp_decode_attention(q, new_k, new_v, cache, positions, group, "a2a", 0.3)
    worst = 0.0
    for i in range(batch):
        for j in range(num_new):
            seen = int(positions[i, j]) + 1
            keys, values = (t[i, :, :seen].double().repeat_interleave(hq // hkv, 0) for t in (k_full, v_full))
            weights = torch.softmax(torch.einsum("hd,hsd->hs", q[i, :, j].double(), keys) * 0.3, dim=-1)
            want = torch.einsum("hs,hsd->hd", weights, values)
            worst = max(worst, float((out[i, :, j].double() - want).abs().max()))
    return worst


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_decode_with_several_new_tokens_equals_float64_causal_attention(world_size):
    for rank, worst in enumerate(run_ranks(world_size, _multi_token_rank, 4)):
        assert worst < 1e-5, f"rank {rank}: {worst:.3g}"


@pytest.fixture(scope="module")
def mla_checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tests.hf_checkpoints import word_tokenizer

    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        kv_lora_rank=24, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        first_k_dense_replace=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=1,
        eos_token_id=None, pad_token_id=0)
    directory = tmp_path_factory.mktemp("mla")
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return str(directory)


def _engine(checkpoint, tp, pcp, dcp, speculative):
    cfg = config_from_dict({
        "parallel": dict(tp=tp, pcp=pcp, dcp=dcp), "model": {"checkpoint": checkpoint},
        "runtime": {"device": "cpu", "dtype": "float32"},
        "inference": {"prompts": ["unused"], "batch_size": 4, "max_seq_len": 160,
                      "speculative_method": "ngram" if speculative else None, "num_speculative_tokens": 4}},
        source="<test>")
    groups = initialize_model_parallel(tp=tp, pcp=pcp, dcp=dcp, num_heads=cfg.model.num_attention_heads,
                                       num_kv_heads=cfg.model.num_kv_heads)
    return build_engine(cfg, groups, torch.device("cpu"))


def _params(temperature=0.0):
    return [SamplingParams(temperature=temperature, seed=5, max_new_tokens=MAX_NEW),
            SamplingParams(temperature=temperature, seed=5, max_new_tokens=MAX_NEW, frequency_penalty=0.5),
            SamplingParams(temperature=temperature, seed=5, max_new_tokens=MAX_NEW, logprobs=2),
            SamplingParams(temperature=temperature, seed=5, max_new_tokens=MAX_NEW - 7)]


def _speculative_rank(rank, world_size, checkpoints):
    out = {}
    for checkpoint in checkpoints:
        for layout in LAYOUTS[world_size]:
            engine = _engine(checkpoint, *layout, speculative=False)
            try:
                # Each prompt followed by its own greedy continuation and itself again: drafts from the lookup.
                base = [engine.tokenizer.encode(p) for p in BASE_PROMPTS]
                first = engine.generate(base, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
                prompts = [b + r.token_ids + b for b, r in zip(base, first)]
                plain = engine.generate(prompts, _params())
            finally:
                destroy_model_parallel()
            engine = _engine(checkpoint, *layout, speculative=True)
            try:
                speculative = engine.generate(prompts, _params())
                sampled = engine.generate(prompts, _params(temperature=0.9))
                metrics = engine.metrics
            finally:
                destroy_model_parallel()
            logprob_error = max(abs(a.logprob - b.logprob) for a, b in
                                zip(plain[2].logprobs, speculative[2].logprobs))
            out[checkpoint, layout] = ([r.token_ids for r in plain], [r.token_ids for r in speculative],
                                       [r.token_ids for r in sampled], logprob_error,
                                       [[t for t, _ in lp.top] for lp in speculative[2].logprobs] ==
                                       [[t for t, _ in lp.top] for lp in plain[2].logprobs],
                                       metrics.draft_tokens, metrics.accepted_draft_tokens)
    return out


@pytest.fixture(scope="module")
def speculative_runs(mla_checkpoint):
    checkpoints = [*REPO_CHECKPOINTS, mla_checkpoint]
    return {world_size: run_ranks(world_size, _speculative_rank, checkpoints, timeout_s=400)
            for world_size in LAYOUTS}


@pytest.mark.parametrize("world_size", list(LAYOUTS))
def test_greedy_speculative_tokens_equal_plain_decoding_at_every_layout(speculative_runs, world_size):
    for rank, results in enumerate(speculative_runs[world_size]):
        for (checkpoint, layout), (plain, speculative, _, logprob_error, same_top, drafts, accepted) in \
                results.items():
            label = f"rank {rank}, {checkpoint}, TPxPCPxDCP {layout}"
            assert speculative == plain, label
            assert logprob_error < 1e-5 and same_top, (label, logprob_error)
            assert drafts > 0, label
            if checkpoint in REPO_CHECKPOINTS:  # trained models continue their own text: both paths run
                assert 0 < accepted < drafts, (label, accepted, drafts)


def test_sampled_speculative_tokens_are_the_same_at_every_layout(speculative_runs):
    reference = {checkpoint: sampled for (checkpoint, _), (_, _, sampled, *_) in speculative_runs[1][0].items()}
    for world_size, per_rank in speculative_runs.items():
        for rank, results in enumerate(per_rank):
            for (checkpoint, layout), (_, _, sampled, *_) in results.items():
                assert sampled == reference[checkpoint], f"rank {rank}, {checkpoint}, {layout}"
