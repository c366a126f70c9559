"""DCP decode equals decode without DCP: sharded-KV attention against float64 attention over the
whole history (or its sliding window, softcapped or not), on every layout TP x PCP x DCP up to 8 ranks, both
combine backends."""
import itertools

import pytest
import torch
import torch.distributed as dist

from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.dcp_decode import (
    ContiguousShardCache, DecodeGroup, attend_shard, combine_partials, dcp_decode_attention, gather_new_qkv,
    positions_in_shard, shard_length, shard_of_position, slot_of_position)
from cptoolkit.layout import ParallelLayout
from tests.multiproc import run_ranks

NUM_HEADS, HEAD_DIM, MAX_SEQ_LEN, DECODE_STEPS = 8, 8, 16, 3
# Request 0 starts empty, so at the first steps most members hold none of its tokens; 1 and 3 have
# equal lengths (one kernel call for both).
PREFIX_LENS = torch.tensor([0, 5, 12, 5])
KV_HEADS_BY_TP = {1: (2, 1), 2: (4, 2, 1), 4: (2, 1)}
# (window, softcap): full attention; a window shorter than a shard turn at DCP 4 (so some members see none
# of a token's window); a longer one, softcapped.
WINDOWS = ((None, None), (2, None), (7, 1.5))


def _reference(q, k, v, scale, softcap=None):
    """float64 softmax attention, ``q [hq, 1, d]`` over ``k, v [hkv, s, d]`` (GQA by repetition), scores
    capped by ``softcap``."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(groups, 0), v.double().repeat_interleave(groups, 0)
    scores = q.double() @ k.transpose(1, 2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return torch.softmax(scores, dim=-1) @ v


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
    with pytest.raises(ValueError, match=r"^interleave \(0\) must be a positive integer$"):
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
    with pytest.raises(ValueError, match=r"append expects k_new, v_new \[2, 2, L, 4\]; got \(2, 1, 1, 4\)"):
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
    with pytest.raises(ValueError, match=r"shard_lens must be \[3\] \(one length <= s_max 7 per request\); "
                                         r"got shape \[2\]"):
        attend_shard(q, k, v, torch.tensor([7, 0]), scale=0.3)


def test_new_token_shapes_are_checked():
    dg = DecodeGroup(None, dcp_rank=0, dcp_size=2, tp_positions=1, pcp_size=2)
    q, kv = torch.zeros(2, 4, 1, 8), torch.zeros(2, 2, 1, 8)
    with pytest.raises(ValueError, match=r"decode expects L new tokens per sequence: q \[b, hq, L, d\], k and v "
                                         r"\[b, hkv, L, d\]; got q \(2, 4, 3, 8\), k \(2, 2, 1, 8\)"):
        gather_new_qkv(torch.zeros(2, 4, 3, 8), kv, kv, dg)  # 3 queries but 1 new key per sequence
    with pytest.raises(ValueError, match=r"q and k/v must agree on batch and head_dim"):
        gather_new_qkv(q, kv[..., :4], kv[..., :4], dg)
    q_group, k_group, v_group = gather_new_qkv(q, kv, kv + 1, dg)
    assert q_group is q and k_group is kv and torch.equal(v_group, kv + 1)


def test_unknown_comm_is_rejected_before_any_collective():
    dg = DecodeGroup(None, dcp_rank=0, dcp_size=2, tp_positions=1, pcp_size=2)
    with pytest.raises(ValueError, match=r"^comm \('ring'\) must be one of \['a2a', 'ag_rs'\]$"):
        combine_partials(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1), dg, "ring")


# ---------------------------------------------------------------- multi-rank decode


def _dcp_groups(tp_size, pcp_size, dcp_size):
    """Create every DCP group of the layout in KV-shard order (collective: all ranks, same order), as
    parallel_state does; return this rank's."""
    mine = None
    for ranks in ParallelLayout(tp_size, pcp_size, dcp_size, NUM_HEADS, 1).dcp_groups:
        group = dist.new_group(ranks, sort_ranks=False)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def _expected_comm(dg, comm, batch, hq_local, hkv_local):
    """(calls, bytes sent) per layer and step; nothing depends on the context length."""
    f32, k = 4, dg.tp_positions
    if k == 1:
        if comm == "a2a":
            return {"all_gather": 1}, {"all_gather": batch * hq_local * (HEAD_DIM + 1) * f32}
        return ({"all_gather": 1, "all_reduce": 1},
                {"all_gather": batch * hq_local * f32, "all_reduce": batch * hq_local * HEAD_DIM * f32})
    gather_qkv = batch * (hq_local + 2 * hkv_local) * HEAD_DIM * f32
    if comm == "a2a":
        return ({"all_gather": 1, "all_to_all": 1},
                {"all_gather": gather_qkv, "all_to_all": dg.dcp_size * batch * hq_local * (HEAD_DIM + 1) * f32})
    return ({"all_gather": 2, "reduce_scatter": 1},
            {"all_gather": gather_qkv + batch * k * hq_local * f32,
             "reduce_scatter": dg.dcp_size * batch * hq_local * HEAD_DIM * f32})


def _decode_and_compare(rank, layout, dg, num_kv_heads, comm, seed, window, softcap):
    tp_size, pcp_size, dcp_size = layout
    tp = rank % tp_size
    heads = ParallelLayout(tp_size, pcp_size, dcp_size, NUM_HEADS, num_kv_heads)
    batch, total = len(PREFIX_LENS), MAX_SEQ_LEN
    gen = torch.Generator().manual_seed(seed)
    q_steps = torch.randn(DECODE_STEPS, batch, NUM_HEADS, 1, HEAD_DIM, generator=gen)
    k_all = torch.randn(batch, num_kv_heads, total, HEAD_DIM, generator=gen)
    v_all = torch.randn(batch, num_kv_heads, total, HEAD_DIM, generator=gen)
    hq_local = NUM_HEADS // tp_size
    q_heads = slice(tp * hq_local, (tp + 1) * hq_local)
    kv_heads, group_kv_heads = list(heads.kv_heads_of(tp)), list(heads.dcp_kv_heads_of(tp))
    cache = ContiguousShardCache(MAX_SEQ_LEN, batch, len(group_kv_heads), HEAD_DIM, dg)
    cache.write_prefix(k_all[:, group_kv_heads], v_all[:, group_kv_heads], PREFIX_LENS)
    scale = HEAD_DIM ** -0.5
    rows = torch.arange(batch)
    worst = 0.0
    for step in range(DECODE_STEPS):
        positions = PREFIX_LENS + step
        k_new, v_new = k_all[rows, :, positions].unsqueeze(2), v_all[rows, :, positions].unsqueeze(2)
        stats = CommStats()
        out = dcp_decode_attention(q_steps[step][:, q_heads], k_new[:, kv_heads], v_new[:, kv_heads], cache,
                                   positions, dg, comm, scale, stats, window, softcap)
        where = (f"rank {rank} layout TPxPCPxDCP={layout} kv_heads={num_kv_heads} I={dg.interleave} {comm} "
                 f"window={window} softcap={softcap} step {step}")
        for request in range(batch):
            length = int(positions[request]) + 1
            first = max(0, length - (window or length))
            want = _reference(q_steps[step, request], k_all[request, :, first:length],
                              v_all[request, :, first:length], scale, softcap)[q_heads]
            diff = (out[request].double() - want).abs()
            assert diff.max() <= 1e-5, f"{where} request {request}: max {diff.max():.2e}, mean {diff.mean():.2e}"
            worst = max(worst, float(diff.max()))
        calls, bytes_sent = _expected_comm(dg, comm, batch, hq_local, len(kv_heads))
        assert dict(stats.calls) == calls, f"{where}: collectives {dict(stats.calls)} != {calls}"
        assert dict(stats.bytes_sent) == bytes_sent, f"{where}: bytes {dict(stats.bytes_sent)} != {bytes_sent}"
    return worst


def _check_layouts(rank, world_size, layouts):
    """Returns ``(cases checked, worst max abs error)`` of this rank."""
    cases, worst = 0, 0.0
    for layout_index, layout in enumerate(layouts):
        tp_size, pcp_size, dcp_size = layout
        group = _dcp_groups(*layout)
        k = dcp_size // pcp_size
        kv_shard = ParallelLayout(tp_size, pcp_size, dcp_size, NUM_HEADS, 1).rank_info(rank).kv_shard
        for case, (num_kv_heads, interleave, comm, (window, softcap)) in enumerate(
                itertools.product(KV_HEADS_BY_TP[tp_size], (1, 2), ("ag_rs", "a2a"), WINDOWS)):
            replication = max(1, tp_size // num_kv_heads)
            dg = DecodeGroup.from_group(group, k, pcp_size, interleave, replication)
            assert dg.dcp_rank == kv_shard, f"rank {rank} {layout}: shard {dg.dcp_rank} != {kv_shard}"
            error = _decode_and_compare(rank, layout, dg, num_kv_heads, comm, 100 * layout_index + case, window,
                                        softcap)
            cases, worst = cases + 1, max(worst, error)
    return cases, worst


def _check_golden_shards_and_bad_input(rank, world_size):
    """TP=2, PCP=2, DCP=4 (layout_tables.txt): ranks 0, 2, 1, 3 hold shards 0, 1, 2, 3."""
    group = _dcp_groups(2, 2, 4)
    dg = DecodeGroup.from_group(group, tp_positions=2, pcp_size=2)
    assert dg.dcp_rank == {0: 0, 2: 1, 1: 2, 3: 3}[rank]
    with pytest.raises(ValueError, match=r"the DCP group has 4 members but tp_positions \(1\) x pcp_size \(2\) = 2"):
        DecodeGroup.from_group(group, tp_positions=1, pcp_size=2)
    pcp_group = _dcp_groups(2, 2, 2)
    with pytest.raises(ValueError, match=r"DCP group ranks \[\d, \d\] must be 2 neighbouring TP positions x 1"):
        DecodeGroup.from_group(pcp_group, tp_positions=2, pcp_size=1)
    sorted_group = dist.new_group([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"ranks \[0, 1, 2, 3\] must be .* in KV-shard order .*sort_ranks=False"):
        DecodeGroup.from_group(sorted_group, tp_positions=2, pcp_size=2)
    history = torch.zeros(1, 2, MAX_SEQ_LEN, HEAD_DIM)
    cache = ContiguousShardCache(MAX_SEQ_LEN, 1, 2, HEAD_DIM, dg)
    cache.write_prefix(history, history, torch.tensor([MAX_SEQ_LEN]))
    # Each TP position's one KV head (GQA, 8 query heads, 2 KV heads) carries its TP rank as value.
    q, kv = torch.ones(1, 4, 1, HEAD_DIM), torch.full((1, 1, 1, HEAD_DIM), float(rank % 2))
    with pytest.raises(ValueError, match="sequence too long for the cache: position 16 >= max_seq_len 16"):
        dcp_decode_attention(q, kv, kv, cache, torch.tensor([MAX_SEQ_LEN]), dg, "a2a", 0.3)
    # Every member raised at the same point, so the group is still in step for the next collective.
    fresh = ContiguousShardCache(MAX_SEQ_LEN, 1, 2, HEAD_DIM, dg)
    out = dcp_decode_attention(q, kv, kv, fresh, torch.tensor([0]), dg, "a2a", 0.3)
    assert torch.equal(out, kv.expand_as(out)), f"rank {rank}: one-token attention must return its own V"
    # A batch row that is empty on every shard (e.g. a padding slot) combines to 0, never NaN.
    for comm in ("ag_rs", "a2a"):
        empty, lse = combine_partials(torch.zeros(1, 8, 1, HEAD_DIM), torch.full((1, 8, 1), float("-inf")), dg, comm)
        assert empty.shape == (1, 4, 1, HEAD_DIM) and empty.eq(0).all(), f"rank {rank} {comm}: {empty}"
        assert lse.shape == (1, 4, 1) and lse.isneginf().all(), f"rank {rank} {comm}: {lse}"


def _run_layouts(world_size, layouts, **kwargs):
    """Every rank checks every (KV heads, interleave, comm) case of every layout."""
    cases = sum(len(KV_HEADS_BY_TP[tp]) * 2 * 2 * len(WINDOWS) for tp, _, _ in layouts)
    for rank, (checked, worst) in enumerate(run_ranks(world_size, _check_layouts, layouts, **kwargs)):
        assert checked == cases and worst <= 1e-5, f"rank {rank}: {checked} of {cases} cases, worst {worst:.2e}"


def test_dcp_decode_matches_unsharded_attention_on_2_ranks():
    _run_layouts(2, [(1, 2, 2), (2, 1, 2)])


def test_dcp_decode_matches_unsharded_attention_on_4_ranks():
    _run_layouts(4, [(2, 2, 2), (2, 2, 4), (1, 4, 4), (4, 1, 2), (4, 1, 4)])


def test_dcp_decode_matches_unsharded_attention_on_8_ranks():
    _run_layouts(8, [(2, 4, 8), (2, 4, 4)], timeout_s=240)


def test_golden_shard_order_and_too_long_sequence_fails_on_every_rank_without_hanging():
    run_ranks(4, _check_golden_shards_and_bad_input)


def test_unsharded_decode_issues_no_collective():
    """DCP = 1: the one shard's partial is already exact, so combining it talks to nobody."""
    dg = DecodeGroup(group=None, dcp_rank=0, dcp_size=1, tp_positions=1, pcp_size=1)
    stats = CommStats()
    out = torch.randn(2, 4, 1, 8)
    for comm in ("a2a", "ag_rs"):
        assert combine_partials(out, torch.zeros(2, 4, 1), dg, comm, stats)[0] is out
    assert stats.total_calls == 0
