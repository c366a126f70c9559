"""Sliding-window layers keep a bounded cache: a ring ``PagedKVCache`` (``ring_slots``) holds exactly the latest
slots of every request, the same ones a whole-sequence cache holds there, on every DCP member at once (fills in
chunks, decode appends of 1 and several tokens, truncation of rejected drafts); ``builder.kv_cache`` gives a
windowed model's windowed layers a reservation that does not grow with ``max_seq_len``. Exact attention over
the ring is proven end to end by tests/test_hf_families.py (mistral_swa: transformers' tokens with rings that
wrap, at 1 rank and TP2xPCP2xDCP2/4)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import kv_cache
from cptoolkit.inference.hybrid_cache import HybridKVCache
from cptoolkit.inference.kv_cache import PagedKVCache, window_ring_slots
from cptoolkit.layers.dcp_decode import positions_in_shard, shard_length
from cptoolkit.layout import ParallelLayout
from cptoolkit.models.shape import GPTShape
from cptoolkit.parallel_state import ParallelGroups

HEADS, HEAD_DIM, BLOCK = 2, 4, 4


def _caches(dcp_size, interleave, ring_slots):
    def make(rank, ring):
        return PagedKVCache(1, HEADS, HEAD_DIM, BLOCK, 64, rank, dcp_size, interleave, torch.float32,
                            ring_slots=ring)
    return [(make(rank, ring_slots), make(rank, None)) for rank in range(dcp_size)]


def _check_same_latest(pairs, request_ids, step, longest):
    """Each ring holds its shard's latest slots: up to ``capacity`` behind the most it ever stored (``longest[r]``
    tokens: rejected drafts overwrote the slots one ring before them), the same K/V as the whole cache."""
    for rank, (ring, full) in enumerate(pairs):
        ring_view, full_view = ring.view(1, request_ids), full.view(1, request_ids)
        k_ring, v_ring, held = ring_view.read()
        k_full, v_full, lens = full_view.read()
        first = ring_view.first_slots()
        capacity = ring.ring_blocks * BLOCK
        most = torch.tensor([shard_length(longest[r], rank, ring.dcp_size, ring.interleave) for r in request_ids])
        assert torch.equal(first, (most - capacity).clamp(min=0)) and torch.equal(held, lens - first), (rank, step)
        for row in range(len(request_ids)):
            columns = slice(int(first[row]), int(lens[row]))
            assert torch.equal(k_ring[row, :, :int(held[row])], k_full[row, :, columns]), (rank, step, row)
            assert torch.equal(v_ring[row, :, :int(held[row])], v_full[row, :, columns]), (rank, step, row)
            assert k_ring[row, :, int(held[row]):].eq(0).all()


@pytest.mark.parametrize("dcp_size, interleave", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)])
def test_a_ring_holds_the_latest_slots_a_whole_sequence_cache_holds(dcp_size, interleave):
    window, chunk, drafts = 5, 8, 3
    ring_slots = window_ring_slots(window, chunk, dcp_size, interleave)
    pairs = _caches(dcp_size, interleave, ring_slots)
    gen = torch.Generator().manual_seed(dcp_size * 10 + interleave)
    lengths = {0: 0, 1: 0}
    max_total = 90
    for ring, full in pairs:
        for request in lengths:
            ring.add_request(request, max_total)
            full.add_request(request, max_total)
    assert pairs[0][0].ring_blocks * BLOCK < shard_length(max_total, 0, dcp_size, interleave)  # it must wrap
    # Chunked prefill: request 0 in chunks of 8 (37 tokens), request 1 whole (23 tokens).
    for request, total, size in ((0, 37, chunk), (1, 23, 23)):
        for start in range(0, total, size):
            positions = torch.arange(start, min(start + size, total))
            k, v = (torch.randn(HEADS, len(positions), HEAD_DIM, generator=gen) for _ in range(2))
            for ring, full in pairs:
                ring.fill_prefill(1, request, k, v, positions)
                full.fill_prefill(1, request, k, v, positions)
        lengths[request] = total
    longest = dict(lengths)
    _check_same_latest(pairs, [0, 1], "prefill", longest)
    # Decode: one token, then 1 + drafts tokens, then the drafts rejected but one (speculative decoding).
    for step in range(12):
        num_new = 1 if step % 3 == 0 else 1 + drafts
        positions = torch.tensor([[lengths[r] + j for j in range(num_new)] for r in (0, 1)])
        k, v = (torch.randn(2, HEADS, num_new, HEAD_DIM, generator=gen) for _ in range(2))
        for ring, full in pairs:
            for cache in (ring, full):
                cache.view(1, [0, 1]).append(k, v, positions[:, 0] if num_new == 1 else positions)
        for request in (0, 1):
            lengths[request] += num_new
            longest[request] = max(longest[request], lengths[request])
            if num_new > 1:
                lengths[request] -= drafts - 1
                for ring, full in pairs:
                    ring.truncate(request, lengths[request])
                    full.truncate(request, lengths[request])
        _check_same_latest(pairs, [0, 1], step, longest)
    for rank, (ring, _) in enumerate(pairs):  # every member holds its shard's latest positions
        assert ring.shard_len(1, 0) == len(positions_in_shard(lengths[0], rank, dcp_size, interleave))


def test_a_ring_refuses_prefix_pages_and_a_bad_size():
    ring = _caches(1, 1, 6)[0][0]
    with pytest.raises(ValueError, match=r"prefix_keys given to a ring cache \(ring_slots, 2 blocks per request\)"):
        ring.add_request(0, 40, prefix_keys=[b"page"])
    with pytest.raises(ValueError, match=r"ring_slots = 0 is invalid: it must be an integer >= 1"):
        PagedKVCache(1, HEADS, HEAD_DIM, BLOCK, 4, 0, 1, 1, torch.float32, ring_slots=0)


SHAPE = GPTShape(arch="llama", num_layers=4, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                 ffn_hidden_size=96, vocab_size=320, max_seq_len=8192, sliding_window=64,
                 sliding_layers=(True, False, True, True))


def _cache(shape, max_seq_len, tp=2, pcp=2, dcp=4, **inference):
    """The engine's cache of rank 0 for ``shape`` (the config's model section only sizes ``max_seq_len``)."""
    cfg = config_from_dict({"parallel": dict(tp=tp, pcp=pcp, dcp=dcp), "runtime": {},
                            "model": {"num_attention_heads": 4, "hidden_size": 64, "max_seq_len": 8192},
                            "inference": {"prompts": ["x"], "max_seq_len": max_seq_len, "batch_size": 2,
                                          "kv_block_size": 8, **inference}}, source="<test>")
    layout = ParallelLayout(tp, pcp, dcp, shape.num_attention_heads, shape.num_kv_heads)
    groups = ParallelGroups(layout, layout.rank_info(0), *[None] * 7)  # sizing reads only the layout
    return kv_cache(cfg, groups, shape, torch.device("cpu"))


def test_windowed_layers_reserve_the_same_bytes_at_any_context():
    windowed = {n: _cache(SHAPE, n, prefill_chunk_size=256) for n in (512, 2048, 8192)}
    full = {n: _cache(dataclasses.replace(SHAPE, sliding_window=None, sliding_layers=None), n,
                      prefill_chunk_size=256) for n in windowed}
    rings = {n: cache.windowed.bytes_per_rank for n, cache in windowed.items()}
    assert all(isinstance(c, HybridKVCache) for c in windowed.values()) and len(set(rings.values())) == 1, rings
    # The one full layer's cache grows with the context like the full model's (a quarter of its layers).
    for n, cache in windowed.items():
        assert cache.full.bytes_per_rank * 4 == full[n].bytes_per_rank, n
        assert cache.bytes_per_rank == cache.full.bytes_per_rank + rings[n]
    assert windowed[8192].bytes_per_rank < 0.3 * full[8192].bytes_per_rank
    # The ring holds the window behind the longest step: a 256-token chunk and 63 tokens before it, on 4 shards.
    assert windowed[8192].windowed.ring_blocks == -(-window_ring_slots(64, 256, 4, 1) // 8) == 11
    # Every layer windowed: the rings alone. Prefix caching keeps whole sequences (its pages must stay).
    every_layer = _cache(dataclasses.replace(SHAPE, sliding_layers=None), 8192)
    assert every_layer.full is None and every_layer.bytes_per_rank == every_layer.windowed.bytes_per_rank
    assert isinstance(_cache(SHAPE, 8192, prefix_caching=True), PagedKVCache)


def test_the_planner_sizes_the_rings_as_the_engine_allocates_them():
    from cptoolkit import plan

    for shape in (SHAPE, dataclasses.replace(SHAPE, sliding_layers=None)):
        for max_seq_len in (512, 8192):
            layout = ParallelLayout(2, 2, 4, shape.num_attention_heads, shape.num_kv_heads)
            want = _cache(shape, max_seq_len, prefill_chunk_size=256).bytes_per_rank
            assert plan.kv_cache_bytes(shape, layout, max_seq_len, 2, 8, 1, 4, step_tokens=256) == want
