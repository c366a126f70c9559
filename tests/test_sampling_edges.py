"""Sampling is total, and one request's failure ends that request only.

- Every ``SamplingParams`` the schema admits samples a token of the vocabulary (hypothesis over the whole
  space, with the values that used to crash the server: temperature 1.5899e-211, top_p 1e-300,
  repetition_penalty 5e-324 and 1e-40), with the edge semantics of ``cptoolkit.inference.sampling``.
- In the engine, a request whose sampling or detokenizing raises ends with ``finish_reason`` ``error`` and
  ``error_status`` 500 while every other request generates exactly its tokens of a run without the fault, at
  1 rank and at TP1xPCP2xDCP2 where the fault happens on the first rank only (the token broadcast decides).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cptoolkit.inference.sampling import (FAILED_TOKEN, GREEDY_TEMPERATURE, SamplingParams, adjust_logits,
                                          make_generator, sample, sample_each, token_weights)
from tests.multiproc import run_ranks

VOCAB = 48
CRASHED_THE_SERVER = [dict(temperature=1.5899e-211), dict(top_p=1e-300), dict(repetition_penalty=5e-324),
                      dict(repetition_penalty=1e-40), dict(temperature=5e-324, top_p=5e-324),
                      dict(repetition_penalty=float("inf")), dict(temperature=float("inf")),
                      dict(temperature=1e-5, repetition_penalty=1e-300)]
TINY = st.sampled_from([5e-324, 1e-300, 1.5899e-211, 1e-40, 1e-6, GREEDY_TEMPERATURE, 1.0000001e-5, 1e-3])


def _params(**fields) -> SamplingParams:
    return SamplingParams(max_new_tokens=4, **fields)


params_space = st.builds(
    _params,
    temperature=st.one_of(TINY, st.floats(0, 2), st.floats(0, allow_infinity=True, allow_nan=False)),
    top_k=st.integers(0, VOCAB + 5),
    top_p=st.one_of(TINY, st.floats(0, 1, exclude_min=True)),
    seed=st.integers(0, 2 ** 63 - 1),
    repetition_penalty=st.one_of(TINY, st.floats(0, exclude_min=True, allow_infinity=True, allow_nan=False)),
    presence_penalty=st.floats(-2, 2),
    frequency_penalty=st.floats(-2, 2),
    logit_bias=st.lists(st.tuples(st.integers(0, VOCAB + 3), st.floats(-100, 100)), max_size=4))
logits_space = st.lists(st.floats(-1e4, 1e4, width=32), min_size=VOCAB, max_size=VOCAB).map(torch.tensor)
history_space = st.lists(st.integers(0, VOCAB - 1), max_size=12)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(params=params_space, logits=logits_space, prompt=history_space, output=history_space)
def test_every_admitted_sampling_value_samples_a_token_of_the_vocabulary(params, logits, prompt, output):
    tokens, errors = sample_each(logits.unsqueeze(0), [params], [make_generator(params.seed, 0)], [prompt], [output])
    assert errors == {}, errors
    token = int(tokens[0])
    assert 0 <= token < VOCAB
    adjusted = adjust_logits(logits.unsqueeze(0), [params], [prompt], [output])[0]
    assert torch.isfinite(adjusted).all(), adjusted
    if params.is_greedy:
        assert token == int(torch.argmax(adjusted))
    else:
        weights = token_weights(adjusted.unsqueeze(0), [params])[0]
        assert torch.isfinite(weights).all() and weights.sum() > 0
        assert weights[token] > 0


@pytest.mark.parametrize("fields", CRASHED_THE_SERVER, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_the_values_that_crashed_the_server_sample(fields):
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0)) * 8
    params = [_params(**fields)] * 3
    tokens, errors = sample_each(logits, params, [make_generator(1, i) for i in range(3)],
                                 [list(range(0, VOCAB, 3))] * 3, [[1, 2, 2]] * 3)
    assert errors == {} and all(0 <= t < VOCAB for t in tokens.tolist()), (errors, tokens)


def test_a_temperature_below_the_greedy_threshold_is_greedy_and_draws_nothing():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    for temperature in (1.5899e-211, 5e-324, 9.99e-6):
        generator = make_generator(0, 0)
        before = generator.get_state()
        assert int(sample(logits.unsqueeze(0), [_params(temperature=temperature)], [generator])[0]) == \
            int(torch.argmax(logits))
        assert torch.equal(generator.get_state(), before), "a greedy row must not advance its generator"
    assert not _params(temperature=GREEDY_TEMPERATURE).is_greedy


def test_a_top_p_below_every_probability_keeps_the_most_likely_token():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(4))
    for top_p in (1e-300, 5e-324, 1e-9):
        weights = token_weights(logits.unsqueeze(0), [_params(top_p=top_p)])[0]
        assert weights.nonzero().flatten().tolist() == [int(torch.argmax(logits))], (top_p, weights)
        draws = {int(sample(logits.unsqueeze(0), [_params(top_p=top_p, seed=s)], [make_generator(s, 0)])[0])
                 for s in range(20)}
        assert draws == {int(torch.argmax(logits))}


def test_a_subnormal_repetition_penalty_saturates_the_seen_positive_logits():
    """transformers' rule: a positive seen logit is divided by the penalty, a negative one multiplied; 5e-324
    takes positives past float32 (they saturate at its largest finite value, ties to the lowest id) and negatives
    to -0.0; unseen logits are untouched."""
    logits = torch.tensor([[3.0, -2.0, 0.0, 5.0, 1.0, -1.0]])
    adjusted = adjust_logits(logits, [_params(repetition_penalty=5e-324)], [[0, 1, 2]], [[3]])[0]
    largest = torch.finfo(torch.float32).max
    assert adjusted.tolist() == [largest, -0.0, 0.0, largest, 1.0, -1.0]
    assert int(sample(adjusted.unsqueeze(0), [_params(temperature=0.0)], [make_generator(0, 0)])[0]) == 0
    weights = token_weights(adjusted.unsqueeze(0), [_params(temperature=0.5)])[0]
    assert weights.nonzero().flatten().tolist() == [0, 3], "the two saturated logits share the whole mass"


def test_sample_each_ends_a_faulty_row_and_samples_the_others_as_alone():
    """A NaN row fails on the device (``FAILED_TOKEN``, no exception); more cases in test_sampling_batched.py."""
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5))
    logits[1] = float("nan")  # a model fault in one row
    params = [_params(temperature=0.7, seed=s) for s in range(3)]
    tokens, errors = sample_each(logits, params, [make_generator(s, 0) for s in range(3)], [[]] * 3, [[]] * 3)
    assert errors == {} and int(tokens[1]) == FAILED_TOKEN
    for row in (0, 2):
        alone = sample(logits[row:row + 1], [params[row]], [make_generator(row, 0)])
        assert int(tokens[row]) == int(alone[0])


# ------------------------------------------------------------------ the engine

BASE = {"parallel": {}, "runtime": {"device": "cpu"},
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "num_kv_heads": 2,
                  "ffn_hidden_size": 96, "vocab_size": 320, "max_seq_len": 96, "seed": 7},
        "inference": {"prompts": ["x"], "batch_size": 4, "kv_block_size": 4}}
PROMPTS = ["one request's fault", "ends that request", "and only that one", "the others carry on"]
NAN_REQUEST, DECODE_FAULT_REQUEST, FAULT_AT = 1, 3, 2  # request 1's logits turn NaN at its 3rd token


class _FaultyTokenizer:
    """The engine's tokenizer, except that decoding any ids that hold ``poison`` raises (a detokenizer fault)."""

    def __init__(self, inner, poison: int):
        self.inner, self.poison = inner, poison

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, ids):
        if self.poison in ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        return self.inner.decode(ids)


def _first_token_only_in(outputs: list[list[int]], index: int) -> int:
    """The position of the first token of ``outputs[index]`` that no other output holds, nor its own earlier."""
    others = {token for i, tokens in enumerate(outputs) if i != index for token in tokens}
    return next(position for position, token in enumerate(outputs[index])
                if token not in others and token not in outputs[index][:position])


def _isolation_rank(rank, world_size, nan_on_ranks: tuple[int, ...]):
    from cptoolkit.config import config_from_dict
    from cptoolkit.inference import sampler as sampler_module
    from cptoolkit.inference.builder import build_engine
    from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel

    raw = copy.deepcopy(BASE)
    if world_size == 2:
        raw["parallel"] = dict(tp=1, pcp=2, dcp=2)
    cfg = config_from_dict(raw, source="<test>")
    groups = initialize_model_parallel(tp=cfg.parallel.tp, pcp=cfg.parallel.pcp, dcp=cfg.parallel.dcp,
                                       num_heads=8, num_kv_heads=2)
    params = [SamplingParams(temperature=0.9, seed=100 + i, max_new_tokens=6, ignore_eos=True)
              for i in range(len(PROMPTS))]
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        clean = engine.generate(PROMPTS, params)
        real_sample_each = sampler_module.sample_each

        def nan_logits_for_one_request(logits, row_params, generators, prompt_ids, output_ids):
            logits = logits.clone()
            for row, p in enumerate(row_params):
                if p.seed == 100 + NAN_REQUEST and len(output_ids[row]) == FAULT_AT and rank in nan_on_ranks:
                    logits[row] = math.nan
            return real_sample_each(logits, row_params, generators, prompt_ids, output_ids)

        sampler_module.sample_each = nan_logits_for_one_request
        poisoned_at = _first_token_only_in([r.token_ids for r in clean], DECODE_FAULT_REQUEST)
        engine.tokenizer = _FaultyTokenizer(engine.tokenizer, clean[DECODE_FAULT_REQUEST].token_ids[poisoned_at])
        faulty = engine.generate(PROMPTS, params)
        sampler_module.sample_each = real_sample_each
        engine.tokenizer = engine.tokenizer.inner
        after = engine.generate(PROMPTS, params)  # the engine carries on, its cache whole
        return (poisoned_at, [(r.token_ids, r.finish_reason) for r in clean],
                [(r.token_ids, r.finish_reason, r.error, r.error_status) for r in faulty],
                [r.token_ids for r in after], engine.cache.num_free_blocks == engine.cache.num_blocks)
    finally:
        destroy_model_parallel()


@pytest.mark.parametrize("world_size,nan_on_ranks", [(1, (0,)), (2, (0,)), (2, (1,))],
                         ids=["1-rank", "pcp2-fault-on-first-rank", "pcp2-fault-on-other-rank"])
def test_a_request_whose_sampling_or_detokenizing_fails_ends_alone(world_size, nan_on_ranks):
    per_rank = run_ranks(world_size, _isolation_rank, nan_on_ranks, timeout_s=240)
    nan_fails = 0 in nan_on_ranks  # the first rank's draw is the one broadcast to the replica
    for rank, (poisoned_at, clean, faulty, after, cache_freed) in enumerate(per_rank):
        assert cache_freed, f"rank {rank}: blocks leaked"
        assert after == [tokens for tokens, _ in clean], f"rank {rank}: the engine did not carry on"
        for index, ((want, _), (tokens, reason, error, status)) in enumerate(zip(clean, faulty)):
            if index == NAN_REQUEST and nan_fails:
                assert (reason, status, tokens) == ("error", 500, want[:FAULT_AT]), (rank, index, reason, error)
                assert "sampling failed" in error
            elif index == DECODE_FAULT_REQUEST:
                assert (reason, status, tokens) == ("error", 500, want[:poisoned_at + 1]), (rank, index, reason, error)
                assert "UnicodeDecodeError" in error
            else:
                assert (tokens, reason, error) == (want, "length", None), (rank, index, tokens, want, error)
    decisions = [[(tokens, reason, status) for tokens, reason, _, status in faulty] for _, _, faulty, _, _ in per_rank]
    assert all(d == decisions[0] for d in decisions), f"ranks took different decisions: {decisions}"

