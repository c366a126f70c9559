"""The engine's scheduler on its own: no model, no process group, one rank's ``PagedKVCache``."""
from __future__ import annotations

import pytest
import torch

from cptoolkit.inference.caches import EngineCaches
from cptoolkit.inference.kv_cache import PagedKVCache
from cptoolkit.inference.request import Request
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.inference.scheduler import Scheduler
from cptoolkit.models.tokenizer import ByteTokenizer

BLOCK, NUM_BLOCKS, CHUNK = 4, 16, 4


def _scheduler(max_batch_size: int = 4, max_seq_len: int = 32) -> Scheduler:
    cache = PagedKVCache(1, 1, 2, BLOCK, NUM_BLOCKS, 0, 1, 1, torch.float32)
    return Scheduler(EngineCaches(cache), max_batch_size, max_seq_len, vocab_size=258, chunk_size=CHUNK,
                     prefix_caching=False)


def _request(request_id: int, prompt_len: int, max_new_tokens: int = 4) -> Request:
    return Request.new(request_id, request_id, list(range(1, prompt_len + 1)),
                       SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens), ByteTokenizer())


def _run(scheduler: Scheduler) -> tuple[str, list[int]]:
    """One step as the engine runs it, with a token of 7 for every request that gets one."""
    _, prefilling, decoding = scheduler.schedule()
    if prefilling:
        _, rows = scheduler.prefilled(prefilling, [min(CHUNK, len(r.prompt_ids) - r.num_cached) for r in prefilling])
        for row in rows:
            prefilling[row].output_ids.append(7)
        return "prefill", [r.request_id for r in prefilling]
    for request in decoding:
        request.output_ids.append(7)
    return "decode", [r.request_id for r in decoding]


def test_prefill_chunks_and_decode_steps_alternate_while_both_have_work():
    scheduler = _scheduler()
    scheduler.add(_request(0, 3))
    assert _run(scheduler) == ("prefill", [0])
    scheduler.add(_request(1, 12))  # three chunks
    steps = [_run(scheduler) for _ in range(7)]
    assert steps == [("decode", [0]), ("prefill", [1]), ("decode", [0]), ("prefill", [1]), ("decode", [0]),
                     ("prefill", [1]), ("decode", [0, 1])]


def test_admission_waits_for_blocks_and_a_finished_request_frees_them():
    scheduler = _scheduler(max_seq_len=64)
    scheduler.add(_request(0, 40, max_new_tokens=20))  # 15 of the 16 blocks
    scheduler.add(_request(1, 4))                       # 2 blocks: waits
    scheduler.schedule()
    assert [r.request_id for r in scheduler.running] == [0] and len(scheduler.waiting) == 1
    scheduler.running[0].finish_reason = "length"
    scheduler.release_finished()
    scheduler.schedule()
    assert [r.request_id for r in scheduler.running] == [1]


def test_an_invalid_request_ends_at_the_next_step_and_a_cancelled_one_frees_its_blocks():
    scheduler = _scheduler()
    scheduler.add(_request(0, 30, max_new_tokens=8))
    scheduler.add(_request(1, 3))
    _run(scheduler)
    scheduler.cancel(1)
    events, _, _ = scheduler.schedule()
    assert [(e.request_id, e.finish_reason) for e in events] == [(1, "cancelled")]
    assert scheduler.caches.target.num_free_blocks == NUM_BLOCKS
    rejected = scheduler.result(0)
    assert rejected.finish_reason == "error"
    assert "= 38 exceeds max_seq_len 32" in rejected.error


def test_max_batch_size_below_one_names_the_rule():
    with pytest.raises(ValueError, match=r"max_batch_size = 0: must be >= 1"):
        _scheduler(max_batch_size=0)
