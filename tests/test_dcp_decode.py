"""DCP decode: shard layout, decode group, shard cache and per-shard attention, without processes."""
import itertools

import pytest
import torch

from cptoolkit.layers.dcp_decode import (
    ContiguousShardCache, DecodeGroup, attend_shard, combine_partials,
    positions_in_shard, shard_length, shard_of_position, slot_of_position)

NUM_HEADS, HEAD_DIM, MAX_SEQ_LEN, DECODE_STEPS = 8, 8, 16, 3
# Request 0 starts empty, so at the first steps most members hold none of its tokens; 1 and 3 have
# equal lengths (one kernel call for both).
PREFIX_LENS = torch.tensor([0, 5, 12, 5])
KV_HEADS_BY_TP = {1: (2, 1), 2: (4, 2, 1), 4: (2, 1)}


def _reference(q, k, v, scale):
    """float64 softmax attention, ``q [hq, 1, d]`` over ``k, v [hkv, s, d]`` (GQA by repetition)."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(groups, 0), v.double().repeat_interleave(groups, 0)
    return torch.softmax(q.double() @ k.transpose(1, 2) * scale, dim=-1) @ v


# ---------------------------------------------------------------- pure layout, no processes


def test_shards_partition_every_sequence_and_slots_are_dense():
    for dcp_size, interleave, seq_len in itertools.product(range(1, 6), range(1, 4), range(0, 31)):
        shards = [positions_in_shard(seq_len, s, dcp_size, interleave) for s in range(dcp_size)]
        assert sorted(torch.cat(shards).tolist()) == list(range(seq_len))
        for shard, positions in enumerate(shards):
            assert shard_length(seq_len, shard, dcp_size, interleave) == len(positions)
            assert shard_of_position(positions, dcp_size, interleave).eq(shard).all()
            assert slot_of_position(positions, dcp_size, interleave).tolist() == list(range(len(positions)))
        assert shard_length(seq_len, 0, dcp_size, interleave) == max(len(p) for p in shards)


def test_interleave_hands_out_runs_of_tokens_in_turn():
    assert [shard_of_position(t, 2, 2) for t in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert positions_in_shard(10, 1, 4, 1).tolist() == [1, 5, 9]


def test_decode_group_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"dcp_size \(4\) must equal tp_positions \(2\) x pcp_size \(1\) = 2"):
        DecodeGroup(None, dcp_rank=0, dcp_size=4, tp_positions=2, pcp_size=1)
    with pytest.raises(ValueError, match=r"dcp_rank \(2\) must lie in \[0, dcp_size=2\)"):
        DecodeGroup(None, dcp_rank=2, dcp_size=2, tp_positions=1, pcp_size=2)
    with pytest.raises(ValueError, match="interleave must be >= 1, got 0"):
        DecodeGroup(None, dcp_rank=0, dcp_size=2, tp_positions=1, pcp_size=2, interleave=0)
    with pytest.raises(ValueError, match=r"kv_head_replication \(3\) and tp_positions \(2\) must divide one another"):
        DecodeGroup(None, dcp_rank=0, dcp_size=2, tp_positions=2, pcp_size=1, kv_head_replication=3)


def test_group_kv_heads_come_from_one_tp_position_per_distinct_head():
    def sources(k, r):
        return DecodeGroup(None, 0, k, k, 1, kv_head_replication=r).kv_source_tp_positions
    assert sources(4, 1) == (0, 1, 2, 3)
    assert sources(4, 2) == (0, 2)
    assert sources(2, 4) == (0,)


def _cache(dcp_rank=1, dcp_size=2, interleave=2, batch=2):
    dg = DecodeGroup(None, dcp_rank=dcp_rank, dcp_size=dcp_size, tp_positions=1, pcp_size=dcp_size,
                     interleave=interleave)
    return ContiguousShardCache(MAX_SEQ_LEN, batch, num_kv_heads=2, head_dim=4, dg=dg)


def test_cache_stores_only_its_shard_in_slot_order():
    cache = _cache()
    history = torch.randn(2, 2, MAX_SEQ_LEN, 4)
    cache.write_prefix(history, -history, torch.tensor([3, 6]))
    for position in range(6, 9):
        positions = torch.tensor([position - 3, position])
        rows = torch.arange(2)
        new = history[rows, :, positions].unsqueeze(2)
        cache.append(new, -new, positions)
    k_shard, v_shard, shard_lens = cache.read()
    for request, seq_len in enumerate([6, 9]):
        positions = positions_in_shard(seq_len, 1, 2, 2)
        assert shard_lens[request] == len(positions)
        assert torch.equal(k_shard[request, :, :len(positions)], history[request][:, positions])
        assert torch.equal(v_shard[request, :, :len(positions)], -history[request][:, positions])
    assert cache.seq_lens.tolist() == [6, 9]


def test_cache_rejects_bad_appends():
    cache = _cache()
    new = torch.zeros(2, 2, 1, 4)
    with pytest.raises(ValueError, match=r"sequence too long for the cache: position 16 >= max_seq_len 16 \(request 1\)"):
        cache.append(new, new, torch.tensor([0, 16]))
    with pytest.raises(ValueError, match="append out of order: request 0 is at position 2 but the cache holds 0"):
        cache.append(new, new, torch.tensor([2, 0]))
    with pytest.raises(ValueError, match=r"append expects k_new, v_new \[2, 2, 1, 4\]"):
        cache.append(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="positions must be int64 \\[2\\]"):
        cache.append(new, new, torch.tensor([0, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_lens must be \\[2\\] with entries <= min"):
        cache.write_prefix(torch.zeros(2, 2, 20, 4), torch.zeros(2, 2, 20, 4), torch.tensor([17, 0]))


def test_attend_shard_masks_padding_and_empty_shards():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    shard_lens = torch.tensor([7, 0, 3])
    out, lse = attend_shard(q, k, v, shard_lens, scale=0.3)
    assert not out.isnan().any() and not lse.isnan().any()
    assert out[1].eq(0).all() and lse[1].isneginf().all()
    for request in (0, 2):
        length = int(shard_lens[request])
        want = _reference(q[request], k[request, :, :length], v[request, :, :length], 0.3)
        diff = (out[request].double() - want).abs()
        assert diff.max() < 1e-5, f"request {request}: max {diff.max():.2e}, mean {diff.mean():.2e}"
    with pytest.raises(ValueError, match="shard_lens must be \\[3\\] with entries <= s_max 7"):
        attend_shard(q, k, v, torch.tensor([8, 0, 0]), scale=0.3)


def test_unknown_comm_is_rejected_before_any_collective():
    dg = DecodeGroup(None, dcp_rank=0, dcp_size=2, tp_positions=1, pcp_size=2)
    with pytest.raises(ValueError, match=r"comm must be one of \('ag_rs', 'a2a'\), got 'ring'"):
        combine_partials(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1), dg, "ring")
