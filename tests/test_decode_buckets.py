"""A decode step padded to its batch bucket computes what the unpadded step computes, and its padding touches no
request's cache.

On a GPU the engine pads every decode step to ``decode_bucket(b)`` rows (1, 2, 4, 8, ...), so the step's tensors
take one shape per bucket (``tests/gpu/test_decode_cuda_graph.py`` captures such a step as a CUDA graph); on a CPU
it does not (``ModelRunner.pad_to_buckets``). Here five requests of different lengths (batches 5 -> 8, then 4,
3 -> 4, 2, 1 as they finish) are decoded twice on the CPU, padded and unpadded,
at 1 rank and at TP2 x PCP2 x DCP2, plain and with prompt-lookup drafts (``L > 1`` tokens per row): every decode
step's logits of every request agree within ``RTOL`` of the step's largest logit (float32; the two runs' matmuls
have different row counts), the tokens are identical, and every block a request can hold stores the same K/V
(padding rows write only to the scratch block).
"""
import copy

import pytest
import torch

from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.kv_cache import PagedKVCache
from cptoolkit.inference.model_runner import decode_bucket
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.multiproc import run_ranks

RTOL = 1e-5  # of the step's largest |logit|; measured 0.0 on the 2-core CPU (each row gets the same bits)
BASE = {"parallel": {}, "runtime": {"device": "cpu"},
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "num_kv_heads": 2,
                  "ffn_hidden_size": 96, "vocab_size": 320, "max_seq_len": 96, "seed": 7},
        "inference": {"prompts": ["x"], "batch_size": 5, "kv_block_size": 4}}
PROMPTS = ["a b a b a b a b", "KV shards merge by log-sum-exp", "x", "padded rows keep nothing", "one two one two"]
MAX_NEW = (9, 7, 6, 5, 4)


def test_buckets_are_the_powers_of_two_at_or_above_the_batch():
    assert [decode_bucket(b) for b in range(1, 18)] == [1, 2, 4, 4, 8, 8, 8, 8] + [16] * 8 + [32]
    with pytest.raises(ValueError, match=r"batch = 0 is invalid: a decode step has at least one request"):
        decode_bucket(0)


def test_a_padded_plan_sends_every_token_it_does_not_keep_to_the_scratch_block():
    """DCP shard 1 of 2 keeps positions 1, 3, 5 ...: request 0's token at 4 (shard 0) and the padding row's go to
    the scratch block; request 1's token at 5 to its next slot; the padding row reads nothing."""
    cache = PagedKVCache(1, 1, 2, block_size=2, num_blocks=4, dcp_rank=1, dcp_size=2, interleave=1,
                         dtype=torch.float32)
    for request_id in (0, 1):
        cache.add_request(request_id, max_total_len=8)
    cache.fill_prefill(1, 0, torch.ones(1, 4, 2), torch.ones(1, 4, 2), torch.arange(4))
    cache.fill_prefill(1, 1, torch.ones(1, 5, 2), torch.ones(1, 5, 2), torch.arange(5))
    plan = cache.plan_step([0, 1], [[4], [5]], num_rows=3)
    scratch = cache.scratch_block
    assert scratch == 4 and cache.storage.shape[2] == 5 and cache.bytes_per_rank == 4 * cache.bytes_per_block
    assert plan.blocks.tolist() == [scratch, 3, scratch] and plan.offsets.tolist() == [0, 0, 0]
    assert plan.shard_lens == (2, 3) and plan.num_rows == 3 and plan.read.lens.tolist() == [2, 3, 0]
    with pytest.raises(ValueError, match=r"num_rows = 1 is invalid: it must be an integer >= the 2 requests"):
        cache.plan_step([0, 1], [[4], [5]], num_rows=1)


def _config(world_size: int, case: str):
    raw = copy.deepcopy(BASE)
    if world_size == 4:
        raw["parallel"] = {"tp": 2, "pcp": 2, "dcp": 2}
    if case == "ngram":
        raw["inference"].update(speculative_method="ngram", num_speculative_tokens=3)
    return config_from_dict(raw, source="<test>")


def _run(cfg, groups, pad_to_buckets: bool) -> tuple[list[list[int]], list[dict[int, torch.Tensor]], torch.Tensor]:
    """Greedy generation: each request's tokens, each decode step's ``{request index: logits [L, vocab]}``, and
    the K/V of every block requests can hold ``[layers, planes, num_blocks, ...]``."""
    engine = build_engine(cfg, groups, torch.device("cpu"))
    assert not engine.runner.pad_to_buckets, "a CPU engine pads no decode step"
    engine.runner.pad_to_buckets = pad_to_buckets
    steps, decode = [], engine.runner.decode

    def recording(requests, drafts, metrics):
        logits = decode(requests, drafts, metrics)
        steps.append({r.index: logits[row, :len(d) + 1].clone() for row, (r, d) in enumerate(zip(requests, drafts))})
        return logits

    engine.runner.decode = recording
    results = engine.generate(PROMPTS, [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
                                        for n in MAX_NEW])
    return [r.token_ids for r in results], steps, engine.cache.storage[:, :, :engine.cache.num_blocks].clone()


def _padded_and_unpadded_rank(rank, world_size, case):
    cfg = _config(world_size, case)
    groups = initialize_model_parallel(tp=cfg.parallel.tp, pcp=cfg.parallel.pcp, dcp=cfg.parallel.dcp,
                                       num_heads=cfg.model.num_attention_heads, num_kv_heads=cfg.model.num_kv_heads)
    try:
        padded, unpadded = _run(cfg, groups, pad_to_buckets=True), _run(cfg, groups, pad_to_buckets=False)
    finally:
        destroy_model_parallel()
    (tokens, steps, storage), (want_tokens, want_steps, want_storage) = padded, unpadded
    worst = 0.0
    for step, want_step in zip(steps, want_steps):
        assert step.keys() == want_step.keys(), f"rank {rank}: the steps decoded different requests"
        scale = max(float(w.abs().max()) for w in want_step.values())
        worst = max([worst] + [float((step[i] - want_step[i]).abs().max()) / scale for i in step])
    storage_diff = float((storage - want_storage).abs().max()) / float(want_storage.abs().max())
    return tokens == want_tokens, len(steps) == len(want_steps), worst, storage_diff, len(steps)


@pytest.mark.parametrize("case", ["plain", "ngram"])
@pytest.mark.parametrize("world_size", [1, 4], ids=["1rank", "tp2xpcp2xdcp2"])
def test_a_padded_decode_step_gives_the_unpadded_steps_logits(world_size, case):
    for rank, (same_tokens, same_steps, worst, storage_diff, steps) in enumerate(
            run_ranks(world_size, _padded_and_unpadded_rank, case, timeout_s=300)):
        assert same_tokens and same_steps, f"rank {rank}: padding changed the tokens or the steps"
        assert steps >= 4, f"rank {rank}: only {steps} decode steps ran"
        assert worst <= RTOL, f"rank {rank}: logits differ by {worst:.2e} of the largest (max), RTOL {RTOL}"
        assert storage_diff <= RTOL, f"rank {rank}: a request's cache blocks differ by {storage_diff:.2e}"
