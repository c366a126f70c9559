"""The engine: every TP x PCP x DCP layout generates the same greedy tokens as one rank, and a
checkpoint loaded from disk generates what transformers' own ``generate`` does."""
import copy

import pytest
import torch

from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.multiproc import run_ranks

BASE = {"parallel": {}, "runtime": {"device": "cpu"},
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "num_kv_heads": 2,
                  "ffn_hidden_size": 96, "vocab_size": 320, "max_seq_len": 96, "seed": 7},
        "inference": {"prompts": ["x"], "batch_size": 2, "kv_block_size": 4}}
# Odd lengths, one shorter than 2*PCP, and more prompts than batch slots: requests join the batch
# while others decode (continuous batching), and finish at different steps.
PROMPTS = ["DualChunkSwap balances causal work", "ring", "Decode with DCP=4 equals decode without DCP.",
           "a", "KV shards merge by log-sum-exp"]
MAX_NEW = [5, 7, 3, 4, 6]
# (tp, pcp, dcp, prefill_comm, decode_comm, kv_interleave); the attention layers' own tests cover
# many more layouts, these prove the engine wires every shape (k = 1, k = TP, k < TP) through.
LAYOUTS_4 = {2: [(2, 2, 2, "p2p", "a2a", 1), (2, 2, 4, "all_gather", "ag_rs", 2), (1, 4, 4, "p2p", "a2a", 3),
                 (4, 1, 2, "p2p", "ag_rs", 1)],
             1: [(2, 2, 4, "p2p", "a2a", 1), (2, 2, 2, "all_gather", "ag_rs", 1)]}
LAYOUTS_8 = [(2, 4, 8, "p2p", "a2a", 1)]


def _config(tp=1, pcp=1, dcp=1, prefill_comm="p2p", decode_comm="a2a", kv_interleave=1, **model):
    raw = copy.deepcopy(BASE)
    raw["parallel"] = dict(tp=tp, pcp=pcp, dcp=dcp, prefill_comm=prefill_comm, decode_comm=decode_comm,
                           kv_interleave=kv_interleave)
    raw["model"].update(model)
    return config_from_dict(raw, source="<test>")


def _generate(cfg, prompts, sampling):
    groups = initialize_model_parallel(tp=cfg.parallel.tp, pcp=cfg.parallel.pcp, dcp=cfg.parallel.dcp,
                                       num_heads=cfg.model.num_attention_heads,
                                       num_kv_heads=cfg.model.num_kv_heads)
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        results = engine.generate(prompts, sampling)
        metrics = engine.metrics.summary(engine.cache.bytes_per_rank, cfg.model.num_layers)
        return [r.token_ids for r in results], metrics, [r.error for r in results]
    finally:
        destroy_model_parallel()


def _greedy():
    return [SamplingParams(temperature=0.0, max_new_tokens=n) for n in MAX_NEW]


def _layouts_rank(rank, world_size, layouts, num_kv_heads):
    return {layout: _generate(_config(*layout, num_kv_heads=num_kv_heads), PROMPTS, _greedy())[:2]
            for layout in layouts}


def _reference_rank(rank, world_size, num_kv_heads):
    return _generate(_config(num_kv_heads=num_kv_heads), PROMPTS, _greedy())[:2]


@pytest.fixture(scope="module", params=[2, 1], ids=["gqa", "mqa"])
def reference(request):
    tokens, metrics = run_ranks(1, _reference_rank, request.param)[0]
    assert [len(t) for t in tokens] == MAX_NEW
    return request.param, tokens, metrics


def _check_layouts(reference, per_rank):
    num_kv_heads, want, want_metrics = reference
    for rank, results in enumerate(per_rank):
        for layout, (tokens, metrics) in results.items():
            assert tokens == want, f"rank {rank}, layout {layout}, kv_heads {num_kv_heads}: {tokens} != {want}"
            tp, pcp, dcp, _, decode_comm, _ = layout
            # Every rank of the DCP group stores its shard of the group's KV heads: the cache per rank
            # shrinks by dcp * (kv heads not needed by the group).
            kv_heads_stored = min(num_kv_heads, max(num_kv_heads * (dcp // pcp) // tp, 1))
            assert metrics["kv_bytes_per_rank"] * dcp * num_kv_heads == \
                want_metrics["kv_bytes_per_rank"] * kv_heads_stored, (rank, layout)
            by_layer = metrics["collectives_per_decode_step_by_layer"]
            k = dcp // pcp
            expected = {("a2a", True): 1, ("ag_rs", True): 2, ("a2a", False): 2, ("ag_rs", False): 3}
            assert by_layer == {1: expected[(decode_comm, k == 1)], 2: expected[(decode_comm, k == 1)]}, \
                (rank, layout, by_layer)


def test_four_rank_layouts_generate_the_single_rank_tokens(reference):
    _check_layouts(reference, run_ranks(4, _layouts_rank, LAYOUTS_4[reference[0]], reference[0], timeout_s=300))


def test_eight_rank_layouts_generate_the_single_rank_tokens(reference):
    _check_layouts(reference, run_ranks(8, _layouts_rank, LAYOUTS_8, reference[0], timeout_s=300))


def _sampling_rank(rank, world_size):
    cfg = _config(tp=2, pcp=2, dcp=4) if world_size == 4 else _config()
    sampling = [SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11, max_new_tokens=6)] * 3
    first = _generate(cfg, PROMPTS[:3], sampling)[0]
    again = _generate(cfg, PROMPTS[:3], sampling)[0]
    other_seed = _generate(cfg, PROMPTS[:3], [SamplingParams(temperature=0.9, seed=12, max_new_tokens=6)] * 3)[0]
    return first, again, other_seed


def test_seeded_sampling_is_reproducible_and_identical_on_every_rank():
    per_rank = run_ranks(4, _sampling_rank)
    first, again, other_seed = per_rank[0]
    assert first == again and first != other_seed
    assert all(result == per_rank[0] for result in per_rank), "ranks sampled different tokens"


def _bad_requests_rank(rank, world_size):
    cfg = _config(tp=2, pcp=1, dcp=2)
    prompts = ["fine", "", "y" * 95, "also fine"]
    return _generate(cfg, prompts, SamplingParams(temperature=0.0, max_new_tokens=4))


def test_bad_requests_fail_alone_with_clear_errors():
    tokens, _, errors = run_ranks(2, _bad_requests_rank)[0]
    assert errors[0] is None and errors[3] is None and len(tokens[0]) == len(tokens[3]) == 4
    assert tokens[1] == [] and "empty prompt" in errors[1]
    assert tokens[2] == [] and "prompt of 95 tokens + max_new_tokens 4 = 99 exceeds the model's " \
                               "max_seq_len 96" in errors[2]


# ----------------------------------------------------------------------------- transformers
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    """A tiny random LlamaForCausalLM and a word-level tokenizer, saved as a local checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(3)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_theta=500.0, eos_token_id=0, bos_token_id=1, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(directory)
    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 64)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                                         unk_token="<unk>").save_pretrained(directory)
    prompts = [[int(t) for t in torch.randint(2, 64, (n,))] for n in (5, 11, 2)]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
            expected.append(out[0, len(prompt):].tolist())
    return str(directory), prompts, expected


def _checkpoint_rank(rank, world_size, directory, prompts):
    raw = copy.deepcopy(BASE)
    raw["model"] = {"checkpoint": directory}
    tp, pcp, dcp = (1, 1, 1) if world_size == 1 else (2, 2, 4)
    raw["parallel"] = {"tp": tp, "pcp": pcp, "dcp": dcp}
    return _generate(config_from_dict(raw, source="<test>"), prompts,
                     SamplingParams(temperature=0.0, max_new_tokens=10))[0]


@pytest.mark.parametrize("world_size", [1, 4], ids=["tp1_pcp1_dcp1", "tp2_pcp2_dcp4"])
def test_llama_checkpoint_generates_what_transformers_generates(llama_checkpoint, world_size):
    directory, prompts, expected = llama_checkpoint
    for rank, tokens in enumerate(run_ranks(world_size, _checkpoint_rank, directory, prompts, timeout_s=300)):
        assert tokens == expected, f"rank {rank}: {tokens} != transformers {expected}"



def _stop_conditions_rank(rank, world_size):
    import dataclasses

    cfg = _config()
    groups = initialize_model_parallel(tp=1, pcp=1, dcp=1, num_heads=8, num_kv_heads=2)
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))

        def one(**params):
            return engine.generate(["stop here"], SamplingParams(temperature=0.0, max_new_tokens=12, **params))[0]

        free = one()
        by_id = one(stop_token_ids=(free.token_ids[5],))
        stop_string = free.text[-4:-2]
        by_string = one(stop_strings=(stop_string,))
        stop_events = list(engine.stream(["stop here"], SamplingParams(temperature=0.0, max_new_tokens=12,
                                                                       stop_strings=(stop_string,))))
        events = list(engine.stream(["stop here", "b"], SamplingParams(temperature=0.0, max_new_tokens=12)))
        bf16_cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, dtype="bfloat16"))
        bf16 = build_engine(bf16_cfg, groups, torch.device("cpu")).generate(
            ["stop here"], SamplingParams(temperature=0.0, max_new_tokens=4))[0]
        return free, by_id, stop_string, by_string, stop_events, events, bf16
    finally:
        destroy_model_parallel()


def test_stop_conditions_streaming_and_bfloat16():
    free, by_id, stop_string, by_string, stop_events, events, bf16 = run_ranks(1, _stop_conditions_rank)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    first_stop = free.token_ids.index(free.token_ids[5])
    assert by_id.finish_reason == "eos" and by_id.token_ids == free.token_ids[:first_stop + 1]
    assert by_string.finish_reason == "stop" and by_string.text == free.text[:free.text.index(stop_string)]
    assert "".join(e.text_delta for e in stop_events) == by_string.text  # nothing past the cut was streamed
    streamed = [e for e in events if e.request_index == 0]
    assert [e.token_id for e in streamed] == free.token_ids
    assert "".join(e.text_delta for e in streamed) == free.text
    assert [e.finish_reason for e in streamed] == [None] * 11 + ["length"]
    assert {e.request_index for e in events} == {0, 1}
    assert bf16.finish_reason == "length" and len(bf16.token_ids) == 4


def test_streamed_text_holds_back_an_incomplete_utf8_character():
    from cptoolkit.inference.engine import _Request, _stream_delta
    from cptoolkit.inference.tokenizer import ByteTokenizer

    tokenizer, request = ByteTokenizer(), _Request(0, "p", [1], SamplingParams(), torch.Generator())
    pieces = []
    for byte in "aé€".encode():  # 1 + 2 + 3 bytes
        request.output_ids.append(byte)
        request.text = tokenizer.decode(request.output_ids)
        pieces.append(_stream_delta(request))
    assert pieces == ["a", "", "é", "", "", "€"]
