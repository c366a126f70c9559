"""The batched sampler equals a row-by-row reference, and a failing row still fails alone.

- For random logits and random mixes of ``SamplingParams`` (greedy, temperature, top-k, top-p, penalties, bias;
  hypothesis), ``sample_each`` over the whole batch gives exactly the tokens of ``_reference_token`` run on each
  row alone with the same seeds (the rules of ``SamplingParams`` written per row, as the library applied them
  before it was batched, with its exponential-race draw), and leaves every generator in the same state.
- The output processor's batched logprobs equal ``top_logprobs`` of each row alone.
- A row whose preparation raises inside the batch fails alone (the batch falls back to rows, generators rewound),
  a row with NaN logits fails on the device, and the other rows draw what they draw without them.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cptoolkit.inference.output_processor import OutputProcessor
from cptoolkit.inference.request import Request
from cptoolkit.inference.sampling import (FAILED_TOKEN, SamplingParams, make_generator, sample_each,
                                          top_logprobs)
from cptoolkit.models.tokenizer import ByteTokenizer

VOCAB = ByteTokenizer.vocab_size  # 258: every id decodes, so the same rows can go through the output processor
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _reference_token(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
                     generator: torch.Generator) -> int:
    """One row's token, step by step as ``SamplingParams`` states the rules, on ``logits [vocab]`` alone."""
    vocab, largest = len(logits), torch.finfo(logits.dtype).max
    values = logits.double()
    if params.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
        seen = seen[seen < vocab]
        scores = values[seen]
        values[seen] = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output), minlength=vocab)[:vocab].double()
        values -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).double()
    for token, bias in params.logit_bias:
        if token < vocab:
            values[token] += bias
    adjusted = values.clamp(-largest, largest).to(logits.dtype) if params.adjusts_logits else logits
    if params.is_greedy:
        return int(torch.argmax(adjusted))
    logits32 = adjusted.float()
    scaled = (logits32 / torch.tensor(params.temperature, dtype=torch.float32)).clamp(-_FLOAT32_MAX, _FLOAT32_MAX)
    if params.top_k or params.top_p < 1:
        order = torch.sort(logits32, descending=True, stable=True).indices  # equal logits: lower id first
        top_k = params.top_k or vocab
        by_rank = scaled[order].clone()
        by_rank[top_k:] = float("-inf")
        weights = torch.exp(by_rank - by_rank[0])
        mass = torch.cumsum(weights, dim=-1)
        kept_by_rank = torch.ones(vocab, dtype=torch.bool)
        if params.top_p < 1:  # the smallest most-likely set whose mass reaches top_p
            kept_by_rank = mass - weights < torch.tensor(params.top_p, dtype=torch.float32) * mass[-1]
        kept_by_rank[top_k:] = False
        kept_by_rank[0] = True
        kept = torch.zeros(vocab, dtype=torch.bool)
        kept[order] = kept_by_rank
        scaled = scaled.masked_fill(~kept, float("-inf"))
    weights = torch.exp(scaled - scaled.max())  # the probabilities, up to a factor
    noise = -torch.log(torch.rand(vocab, generator=generator))  # Exponential(1), from this request's generator
    return int(torch.argmax(weights / noise)) if torch.isfinite(weights).all() else FAILED_TOKEN


def _params(**fields) -> SamplingParams:
    return SamplingParams(max_new_tokens=4, **fields)


params_space = st.one_of(
    st.builds(_params, temperature=st.just(0.0)),
    st.builds(_params, temperature=st.floats(0.05, 3), seed=st.integers(0, 2 ** 20)),
    st.builds(_params, temperature=st.floats(0.05, 3), top_k=st.integers(0, VOCAB + 3),
              top_p=st.floats(0, 1, exclude_min=True), seed=st.integers(0, 2 ** 20)),
    st.builds(_params, temperature=st.sampled_from([0.0, 0.7, 1.0, 1.6]), top_k=st.sampled_from([0, 1, 5, 40]),
              top_p=st.sampled_from([1.0, 0.9, 0.3, 1e-9]), seed=st.integers(0, 2 ** 20),
              repetition_penalty=st.sampled_from([1.0, 1.3, 0.5, 5e-324]),
              presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2),
              logit_bias=st.lists(st.tuples(st.integers(0, VOCAB + 3), st.floats(-100, 100)), max_size=4),
              logprobs=st.sampled_from([None, 0, 3, 20])))
row_space = st.tuples(params_space, st.lists(st.integers(0, VOCAB - 1), max_size=10),
                      st.lists(st.integers(0, VOCAB - 1), max_size=10))


def _logits(seed: int, rows: int, scale: float, dtype: torch.dtype, ties: bool = True) -> torch.Tensor:
    """``[rows, VOCAB]`` random logits; with ``ties`` every 7th equals its right neighbour (top-k and top-p rank
    equal logits by token id)."""
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale
    if ties:
        logits[:, 0:252:7] = logits[:, 1:253:7]
    return logits.to(dtype)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(rows=st.lists(row_space, min_size=1, max_size=7), seed=st.integers(0, 2 ** 16),
       scale=st.sampled_from([0.5, 3.0, 40.0]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_the_batched_sampler_draws_the_tokens_of_the_row_by_row_reference(rows, seed, scale, dtype):
    params, prompts, outputs = (list(column) for column in zip(*rows))
    logits = _logits(seed, len(rows), scale, dtype)
    batched_generators = [make_generator(p.seed, row) for row, p in enumerate(params)]
    reference_generators = [make_generator(p.seed, row) for row, p in enumerate(params)]
    tokens, errors = sample_each(logits, params, batched_generators, prompts, outputs)
    want = [_reference_token(logits[row], params[row], prompts[row], outputs[row], reference_generators[row])
            for row in range(len(rows))]
    assert errors == {} and tokens.tolist() == want, (tokens.tolist(), want, params)
    for row, (batched, reference) in enumerate(zip(batched_generators, reference_generators)):
        assert torch.equal(batched.get_state(), reference.get_state()), f"row {row}: generators diverged"


@settings(max_examples=40, deadline=None, derandomize=True)
@given(num_tops=st.lists(st.sampled_from([None, 0, 1, 5, 20]), min_size=1, max_size=6), seed=st.integers(0, 2 ** 16))
def test_batched_logprobs_equal_each_rows_own(num_tops, seed):
    # No ties: torch.topk lists equal log-probabilities in an unspecified order, batched or not.
    logits = _logits(seed, len(num_tops), 3.0, torch.float32, ties=False)
    requests = [Request.new(row, row, [1, 2], _params(logprobs=n), ByteTokenizer()) for row, n in enumerate(num_tops)]
    token_ids = torch.randint(0, VOCAB, (len(num_tops),), generator=torch.Generator().manual_seed(seed)).tolist()
    events = OutputProcessor(ByteTokenizer()).append_tokens(requests, token_ids, logits)
    for row, (event, num_top) in enumerate(zip(events, num_tops)):
        if num_top is None:
            assert event.logprob is None
            continue
        chosen, top_values, top_ids = top_logprobs(logits[row:row + 1], torch.tensor([token_ids[row]]), num_top)
        assert event.logprob.token_id == token_ids[row] and event.logprob.logprob == float(chosen[0])
        assert event.logprob.top == tuple(zip(top_ids[0].tolist(), top_values[0].tolist())), (row, num_top)


def test_a_row_that_raises_in_the_batch_fails_alone_and_the_others_draw_as_without_it():
    logits = _logits(0, 4, 3.0, torch.float32)
    logits[2] = float("nan")  # a model fault, found on the device
    params = [_params(temperature=0.8, seed=s, top_p=0.9, frequency_penalty=0.5) for s in range(4)]
    outputs = [[3, 3, 5], [4, "not a token id"], [1], [9, 9]]  # row 1's history raises while adjusting
    generators = [make_generator(p.seed, row) for row, p in enumerate(params)]
    tokens, errors = sample_each(logits, params, generators, [[1, 2]] * 4, outputs)
    assert list(errors) == [1] and errors[1].startswith("sampling failed (TypeError"), errors
    assert tokens[1] == FAILED_TOKEN and tokens[2] == FAILED_TOKEN  # row 2: not finite, known from the token
    for row in (0, 3):
        generator = make_generator(params[row].seed, row)
        assert int(tokens[row]) == _reference_token(logits[row], params[row], [1, 2], outputs[row], generator)
        assert torch.equal(generators[row].get_state(), generator.get_state()), f"row {row} drew twice"


def test_a_row_whose_logprobs_raise_fails_alone():
    logits = _logits(1, 3, 3.0, torch.float32)
    requests = [Request.new(row, row, [1, 2], _params(logprobs=2), ByteTokenizer()) for row in range(3)]
    token_ids = [5, VOCAB + 7, 9]  # row 1's token is past the logits' vocabulary: scoring it raises
    events = OutputProcessor(ByteTokenizer()).append_tokens(requests, token_ids, logits)
    assert [e.finish_reason for e in events] == [None, "error", None]
    assert requests[1].error.startswith(f"processing token {VOCAB + 7} failed"), requests[1].error
    for row in (0, 2):
        chosen, _, _ = top_logprobs(logits[row:row + 1], torch.tensor([token_ids[row]]), 2)
        assert events[row].logprob.logprob == float(chosen[0])


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_a_rows_tokens_do_not_depend_on_its_batch(rows):
    """Row 0 of a batch of ``rows`` (mixed settings) draws what it draws alone, step after step."""
    logits = _logits(2, rows, 3.0, torch.float32)
    mixes = [_params(temperature=0.9, top_k=40, top_p=0.9, seed=1), _params(temperature=0.0),
             _params(temperature=1.2, seed=2, repetition_penalty=1.3), _params(temperature=0.6, seed=3, top_p=0.5)]
    params = [mixes[row % len(mixes)] for row in range(rows)]
    together = [make_generator(p.seed, row) for row, p in enumerate(params)]
    alone = make_generator(params[0].seed, 0)
    for _ in range(3):
        tokens, _ = sample_each(logits, params, together, [[1]] * rows, [[2]] * rows)
        token, _ = sample_each(logits[:1], params[:1], [alone], [[1]], [[2]])
        assert int(tokens[0]) == int(token[0])


def test_a_draw_that_raises_midway_rewinds_the_rows_that_drew_before_it(monkeypatch):
    """Every row draws before row 2's generator raises: the rows then run alone from their states before the
    step, so they draw once, as without row 2."""
    import cptoolkit.inference.sampling as sampling

    logits = _logits(3, 4, 3.0, torch.float32)
    params = [_params(temperature=0.9, seed=s) for s in range(4)]
    generators = [make_generator(p.seed, row) for row, p in enumerate(params)]
    real_exponential = sampling._exponential

    def broken_for_row_2(size, row_generators):
        noise = real_exponential(size, row_generators)  # every row draws, then row 2's fault shows
        if any(generator is generators[2] for generator in row_generators):
            raise RuntimeError("a generator on no usable device")
        return noise

    monkeypatch.setattr(sampling, "_exponential", broken_for_row_2)
    tokens, errors = sample_each(logits, params, generators, [[]] * 4, [[]] * 4)
    assert list(errors) == [2] and "RuntimeError: a generator on no usable device" in errors[2]
    for row in (0, 1, 3):
        generator = make_generator(params[row].seed, row)
        assert int(tokens[row]) == _reference_token(logits[row], params[row], [], [], generator)
        assert torch.equal(generators[row].get_state(), generator.get_state()), f"row {row} drew twice"
