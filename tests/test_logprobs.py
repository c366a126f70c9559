"""Log-probabilities, penalties, logit bias and shared prompts in the engine.

Prompt logprobs (``echo``) and generated-token logprobs equal transformers' own log-softmax of the same
checkpoint's logits at one rank, and every layout (TP2xPCP2xDCP4, DCP2, chunked prefill) equals the
one-rank figures; penalties pick transformers' tokens (repetition) or follow their formula in float64
(presence, frequency, bias); a request sharing its source's prompt reuses its pages and draws what it
would alone.
"""
import pytest
import torch

from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams, adjust_logits
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.multiproc import run_ranks

transformers = pytest.importorskip("transformers")

VOCAB = 64
EOS = VOCAB  # past the model's vocabulary: every request runs all its tokens
PROMPT_LENS = (23, 9)
MAX_NEW = 5
NUM_TOP = 3
# Relative to the largest |logprob| (measured worst 6e-7 at 4 ranks): fp32 accumulations in another order.
RTOL = 1e-5
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, bos_token_id=1,
             eos_token_id=None, pad_token_id=0)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB)}, "<eos>": EOS}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, prompts, transformers' greedy tokens, its log-softmax over prompt + new tokens)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).eval()
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory)
    _word_tokenizer().save_pretrained(directory)
    prompts = [torch.randint(2, VOCAB, (n,)).tolist() for n in PROMPT_LENS]
    tokens, logprobs = [], []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False)
            tokens.append(out[0, len(prompt):].tolist())
            logprobs.append(torch.log_softmax(model(out).logits[0].double(), dim=-1))
    return str(directory), prompts, tokens, logprobs


def _engine_run(directory, layout, prompts, sampling, chunk=None, prefix_caching=False, siblings=False):
    tp, pcp, dcp = layout
    cfg = config_from_dict({
        "parallel": dict(tp=tp, pcp=pcp, dcp=dcp), "model": {"checkpoint": directory}, "runtime": {"device": "cpu"},
        "inference": {"prompts": ["unused"], "batch_size": 4, "kv_block_size": 4, "prefill_chunk_size": chunk,
                      "prefix_caching": prefix_caching}}, source="<test>")
    groups = initialize_model_parallel(tp=tp, pcp=pcp, dcp=dcp, num_heads=cfg.model.num_attention_heads,
                                       num_kv_heads=cfg.model.num_kv_heads)
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        if not siblings:
            return engine.generate(prompts, sampling)
        source = engine.add_request(prompts[0], sampling, index=0)
        sibling = engine.add_request(prompts[0], sampling, index=1, prompt_source=source)
        alone = engine.add_request(prompts[0], sampling, index=1)
        while engine.has_unfinished_requests():
            engine.step()
        return [engine.result(i) for i in (source, sibling, alone)]
    finally:
        destroy_model_parallel()


def _figures(results):
    """Per request: tokens, prompt [(token, logprob, top)] and output [(token, logprob, top)] as plain lists."""
    def plain(entries):
        if entries is None:
            return None
        return [None if e is None else (e.token_id, e.logprob, list(e.top)) for e in entries]
    return [(r.token_ids, plain(r.prompt_logprobs), plain(r.logprobs)) for r in results]


SCORING = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, logprobs=NUM_TOP, prompt_logprobs=NUM_TOP)


def _layouts_rank(rank, world_size, directory, prompts, runs):
    return {name: _figures(_engine_run(directory, layout, prompts, SCORING, chunk))
            for name, (layout, chunk) in runs.items()}


def _check_against_transformers(figures, prompts, want_tokens, want_logprobs, label):
    for index, (tokens, prompt_lp, output_lp) in enumerate(figures):
        want = want_logprobs[index]
        scale = float(want.abs().max())
        assert tokens == want_tokens[index], f"{label}, request {index}: {tokens} != {want_tokens[index]}"
        sequence = prompts[index] + tokens
        assert prompt_lp[0] is None and len(prompt_lp) == len(prompts[index])
        # Entry t scores sequence[t] from position t - 1's distribution: prompt tokens then output tokens.
        entries = [(t, e) for t, e in enumerate(prompt_lp) if t > 0] + \
                  [(len(prompts[index]) + i, e) for i, e in enumerate(output_lp)]
        for position, (token, logprob, top) in entries:
            row = want[position - 1]
            assert token == sequence[position], f"{label}: position {position} scores token {token}"
            assert abs(logprob - float(row[token])) <= RTOL * scale, \
                f"{label}, request {index}, position {position}: {logprob} != transformers {float(row[token])}"
            want_top = torch.topk(row, NUM_TOP)
            assert [t for t, _ in top] == want_top.indices.tolist(), f"{label}, position {position}: top ids"
            assert max(abs(v - w) for (_, v), w in zip(top, want_top.values.tolist())) <= RTOL * scale


def test_prompt_and_token_logprobs_equal_transformers_log_softmax_at_one_rank(checkpoint):
    directory, prompts, want_tokens, want_logprobs = checkpoint
    runs = {"1 rank": ((1, 1, 1), None), "1 rank chunk 8": ((1, 1, 1), 8)}
    results = run_ranks(1, _layouts_rank, directory, prompts, runs)[0]
    for name, figures in results.items():
        _check_against_transformers(figures, prompts, want_tokens, want_logprobs, name)


def test_logprobs_at_tp2_pcp2_dcp4_and_dcp2_equal_transformers(checkpoint):
    """Each PCP rank scores its own DualChunkSwap tokens; every rank ends with every figure."""
    directory, prompts, want_tokens, want_logprobs = checkpoint
    runs = {"tp2 pcp2 dcp4": ((2, 2, 4), None), "tp2 pcp2 dcp2 chunk 8": ((2, 2, 2), 8),
            "tp1 pcp4 dcp4": ((1, 4, 4), None)}
    for rank, results in enumerate(run_ranks(4, _layouts_rank, directory, prompts, runs, timeout_s=240)):
        for name, figures in results.items():
            _check_against_transformers(figures, prompts, want_tokens, want_logprobs, f"rank {rank}, {name}")


def _scoring_only_rank(rank, world_size, directory, prompts):
    sampling = SamplingParams(temperature=0.0, max_new_tokens=0, prompt_logprobs=0)
    return _figures(_engine_run(directory, (1, 1, 1), prompts, sampling, prefix_caching=True))


def test_max_new_tokens_zero_scores_the_prompt_only_and_skips_the_prefix_cache(checkpoint):
    directory, prompts, _, want_logprobs = checkpoint
    # The same prompt twice with prefix caching on: the second must still score every token.
    figures = run_ranks(1, _scoring_only_rank, directory, [prompts[0], prompts[0]])[0]
    for tokens, prompt_lp, output_lp in figures:
        assert tokens == [] and output_lp is None
        assert all(entry is not None for entry in prompt_lp[1:])
        got = torch.tensor([logprob for _, logprob, _ in prompt_lp[1:]], dtype=torch.float64)
        want = want_logprobs[0][torch.arange(len(prompts[0]) - 1), torch.tensor(prompts[0][1:])]
        assert float((got - want).abs().max()) <= RTOL * float(want_logprobs[0].abs().max())


def _siblings_rank(rank, world_size, directory, prompts, layout, prefix_caching):
    sampling = SamplingParams(temperature=1.0, seed=3, max_new_tokens=MAX_NEW)
    results = _engine_run(directory, layout, prompts, sampling, prefix_caching=prefix_caching, siblings=True)
    return [(r.token_ids, r.metrics.cached_prompt_tokens) for r in results]


@pytest.mark.parametrize("world_size, layout", [(1, (1, 1, 1)), (4, (2, 2, 2))])
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_request_sharing_its_sources_prompt_reuses_its_pages_and_draws_what_it_would_alone(
        checkpoint, world_size, layout, prefix_caching):
    directory, prompts, _, _ = checkpoint
    for rank, ((source, _), (sibling, reused), (alone, alone_reused)) in enumerate(
            run_ranks(world_size, _siblings_rank, directory, prompts, layout, prefix_caching, timeout_s=180)):
        page_tokens = 4 * layout[2]
        assert reused == (len(prompts[0]) - 1) // page_tokens * page_tokens > 0, f"rank {rank}: reused {reused}"
        assert alone_reused == (reused if prefix_caching else 0), f"rank {rank}: unrelated request reused pages"
        assert sibling == alone, f"rank {rank}: sibling {sibling} != the same request alone {alone}"
        assert sibling != source, f"rank {rank}: index 1 drew index 0's tokens"


def _penalised_rank(rank, world_size, directory, prompts, layout, sampling):
    return [r.token_ids for r in _engine_run(directory, layout, prompts, sampling)]


@pytest.mark.parametrize("world_size, layout", [(1, (1, 1, 1)), (4, (2, 2, 4))])
def test_repetition_penalty_generates_transformers_tokens(checkpoint, tmp_path, world_size, layout):
    directory, prompts, _, _ = checkpoint
    model = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        want = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                               repetition_penalty=1.8)[0, len(p):].tolist() for p in prompts]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=12, repetition_penalty=1.8)
    for rank, got in enumerate(run_ranks(world_size, _penalised_rank, directory, prompts, layout, sampling,
                                         timeout_s=180)):
        assert got == want, f"rank {rank}: {got} != transformers {want}"


def test_presence_frequency_penalties_and_bias_follow_openais_formula():
    torch.manual_seed(1)
    logits = torch.randn(3, 11, dtype=torch.float64)
    prompt, output = [[1, 2], [3], [4]], [[5, 5, 7], [], [9, 9]]
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=-0.25, logit_bias=((7, 3.0), (0, -1.0))),
              SamplingParams(), SamplingParams(repetition_penalty=2.0)]
    got = adjust_logits(logits, params, prompt, output)
    want = logits.clone()
    for token in range(11):
        count = output[0].count(token)
        want[0, token] -= -0.25 * count + 0.5 * (count > 0)
    want[0, 7] += 3.0
    want[0, 0] -= 1.0
    for token in {4, 9}:
        want[2, token] = want[2, token] / 2 if want[2, token] > 0 else want[2, token] * 2
    assert torch.equal(got, want)
    assert adjust_logits(logits, [SamplingParams()] * 3, prompt, output) is logits


def _biased_rank(rank, world_size, directory, prompts):
    sampling = SamplingParams(temperature=0.0, max_new_tokens=4, logit_bias=((17, 100.0),))
    return [r.token_ids for r in _engine_run(directory, (1, 1, 1), prompts, sampling)]


def test_a_large_logit_bias_forces_its_token(checkpoint):
    directory, prompts, _, _ = checkpoint
    assert run_ranks(1, _biased_rank, directory, prompts)[0] == [[17] * 4, [17] * 4]


@pytest.mark.parametrize("field, value, rule", [
    ("logprobs", 21, r"in \[0, 20\]"), ("prompt_logprobs", -1, r"in \[0, 20\]"),
    ("repetition_penalty", 0.0, r"> 0"), ("presence_penalty", 2.5, r"\[-2, 2\]"),
    ("frequency_penalty", -3, r"\[-2, 2\]"), ("logit_bias", ((1, 101.0),), r"bias in \[-100, 100\]"),
    ("max_new_tokens", -1, r">= 0")])
def test_bad_sampling_fields_are_refused_with_the_rule(field, value, rule):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field} = .* is invalid: .*{rule}"):
        SamplingParams(**{field: value})
