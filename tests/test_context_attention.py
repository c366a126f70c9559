"""Context attention equals causal attention over history + chunk: a prefill chunk attends its requests'
histories, sharded over the DCP group in a real PagedKVCache, and itself; checked against float64
softmax attention over the whole sequence on every layout TP x PCP x DCP up to 8 ranks, both decode
comms, both prefill comms, GQA and MQA, interleave 1 and 2, with the collectives counted; and with sliding
windows shorter than a chunk and reaching into the history, one of them softcapped."""
import itertools

import pytest
import torch

from cptoolkit.inference.kv_cache import PagedKVCache
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.context_attention import context_attention
from cptoolkit.layers.dcp_decode import ContiguousShardCache, DecodeGroup
from cptoolkit.layers.dual_chunk_swap import padded_length, shard_positions, shard_sequence
from cptoolkit.layout import ParallelLayout
from tests.multiproc import my_group, run_ranks

NUM_HEADS, HEAD_DIM, BLOCK_SIZE = 8, 8, 4
# Request 1 has no history (chunk attention alone); no length is a multiple of a shard turn. Chunks
# differ in length too, each padded at its end to one DualChunkSwap length.
HISTORY_LENS = torch.tensor([13, 0, 22, 7])
CHUNK_LENS = (11, 11, 9, 5)
KV_HEADS = (2, 1)  # GQA (4 query heads per KV head) and MQA
TOLERANCE = 1e-5   # relative to the largest reference value


# (window, softcap) of the windowed runs: shorter than every chunk; reaching back into the history, capped
WINDOWS = ((3, None), (12, 2.0))


def _reference(q, k, v, scale, window=None, softcap=None):
    """float64 causal softmax attention, ``q, k, v [h, s, d]`` (GQA by repetition), over each query's
    ``window`` latest positions, scores capped by ``softcap``."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(groups, 0), v.double().repeat_interleave(groups, 0)
    scores = q.double() @ k.transpose(1, 2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    distance = torch.arange(q.shape[1])[:, None] - torch.arange(k.shape[1])[None, :]
    mask = (distance >= 0) & (distance < (window or k.shape[1]))
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


# ---------------------------------------------------------------- one rank, no processes


def test_one_rank_attends_history_and_chunk_without_collectives():
    """DCP = PCP = 1 on a ContiguousShardCache that already holds the chunk too: only each request's
    first ``history_lens`` tokens are read from it."""
    gen = torch.Generator().manual_seed(0)
    history_lens, chunk, scale = torch.tensor([5, 0, 9]), 6, 0.3
    total = int(history_lens.max()) + chunk
    q = torch.randn(3, 4, total, HEAD_DIM, generator=gen)
    k, v = (torch.randn(3, 2, total, HEAD_DIM, generator=gen) for _ in range(2))
    dg = DecodeGroup(None, dcp_rank=0, dcp_size=1, tp_positions=1, pcp_size=1)
    cache = ContiguousShardCache(total, 3, 2, HEAD_DIM, dg)
    cache.write_prefix(k, v, history_lens + chunk)

    def chunk_of(x):
        return torch.stack([x[i, :, h:h + chunk] for i, h in enumerate(history_lens.tolist())])

    stats = CommStats()
    out = context_attention(chunk_of(q), chunk_of(k), chunk_of(v), cache, history_lens, dg, None, "p2p", "ag_rs",
                            scale, stats)
    for request, history in enumerate(history_lens.tolist()):
        seq = history + chunk
        want = _reference(q[request, :, :seq], k[request, :, :seq], v[request, :, :seq], scale)[:, history:]
        diff = (out[request].double() - want).abs()
        assert diff.max() <= TOLERANCE * want.abs().max(), f"request {request}: max {diff.max():.2e}"
    assert stats.total_calls == 0


def test_bad_arguments_are_rejected_before_any_collective():
    dg = DecodeGroup(None, dcp_rank=0, dcp_size=2, tp_positions=2, pcp_size=1)  # group KV heads: 2 x 2
    q, kv = torch.zeros(1, 4, 4, HEAD_DIM), torch.zeros(1, 2, 4, HEAD_DIM)
    cache = ContiguousShardCache(16, 1, 4, HEAD_DIM, dg)
    cache.write_prefix(torch.zeros(1, 4, 16, HEAD_DIM), torch.zeros(1, 4, 16, HEAD_DIM), torch.tensor([3]))
    good = dict(q=q, k=kv, v=kv, kv_cache=cache, history_lens=torch.tensor([3]), dg=dg, pcp_group=None,
                prefill_comm="p2p", decode_comm="a2a", scale=0.3)
    bad = [
        (dict(prefill_comm="a2a"), r"prefill_comm \('a2a'\) must be one of \('p2p', 'all_gather'\): context"),
        (dict(decode_comm="ring"), r"decode_comm \('ring'\) must be one of \['a2a', 'ag_rs'\]"),
        (dict(q=q[0]), r"expects q \[b, hq, 2c, d\] and k, v \[b, hkv, 2c, d\].*got q \(4, 4, 8\)"),
        (dict(q=torch.zeros(1, 3, 4, HEAD_DIM)), r"query heads a multiple of KV heads; got q \(1, 3, 4, 8\)"),
        (dict(q=q[:, :, :3], k=kv[:, :, :3], v=kv[:, :, :3]), r"local chunk length \(3\) must be even"),
        (dict(history_lens=torch.tensor([3], dtype=torch.int32)),
         r"history_lens must be int64 \[1\] with entries >= 0"),
        (dict(dg=DecodeGroup(None, 0, 2, 1, 2)),
         r"pcp_group's size \(1\) must equal the decode group's pcp_size \(2\)"),
        (dict(k=kv[:, :1], v=kv[:, :1]), r"the cache holds 4 KV heads but the DCP group's query heads read 2"),
        (dict(history_lens=torch.tensor([5])),
         r"request 0 has history_lens 5, of which shard 0 stores 3, but its cache holds 2: store the whole history"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            context_attention(**{**good, **change})


# ---------------------------------------------------------------- multi-rank


def _expected_comm(layout, decode_comm, prefill_comm, batch, hq_local, hkv_local, local_len):
    """(calls, bytes sent) of one call, float32; no term depends on the history lengths."""
    tp_size, pcp_size, dcp_size = layout
    k, f32 = dcp_size // pcp_size, 4
    calls, sent = {}, {}

    def add(name, count, nbytes):
        calls[name] = calls.get(name, 0) + count
        sent[name] = sent.get(name, 0) + nbytes

    if dcp_size > 1:
        add("all_gather", 1, batch * hq_local * local_len * HEAD_DIM * f32)  # the queries
        if decode_comm == "a2a":
            add("all_to_all", 1, dcp_size * batch * hq_local * local_len * (HEAD_DIM + 1) * f32)
        else:
            add("all_gather", 1, batch * k * hq_local * pcp_size * local_len * f32)
            add("reduce_scatter", 1, dcp_size * batch * hq_local * local_len * HEAD_DIM * f32)
    kv_bytes = 2 * batch * hkv_local * local_len * HEAD_DIM * f32
    if pcp_size > 1 and prefill_comm == "p2p":
        add("send_recv", pcp_size - 1, (pcp_size - 1) * kv_bytes)
    if pcp_size > 1 and prefill_comm == "all_gather":
        add("all_gather", 1, kv_bytes)
    return calls, sent


def _paged_cache(dg, k_all, v_all, history_lens, chunk_len_padded, chunk_lens, holds_chunk):
    """One layer's cache of this member's shard; with ``holds_chunk`` it already stores the chunk's
    K/V too (as the engine does before attention), which context attention must not read."""
    batch, hkv_group = k_all.shape[:2]
    cache = PagedKVCache(1, hkv_group, HEAD_DIM, BLOCK_SIZE, 64, dg.dcp_rank, dg.dcp_size, dg.interleave,
                         torch.float32)
    for request, (history, chunk) in enumerate(zip(history_lens.tolist(), chunk_lens)):
        cache.add_request(request, history + chunk_len_padded)
        stored = history + chunk if holds_chunk else history
        if stored:
            cache.fill_prefill(1, request, k_all[request, :, :stored], v_all[request, :, :stored],
                               torch.arange(stored))
    return cache.view(1, range(batch))


def _attend_and_compare(rank, layout, dg, pcp_group, num_kv_heads, decode_comm, prefill_comm, holds_chunk,
                        history_lens, seed, window=None, softcap=None):
    """One call of context attention on this rank: returns ``(max abs, max relative)`` error. A window's ring
    skips the K/V blocks it cannot see, so its send_recv count is not checked (tests/test_sliding_window.py
    counts its tiles); every other collective is."""
    tp_size, pcp_size, dcp_size = layout
    tp, pcp_rank = rank % tp_size, rank // tp_size
    heads = ParallelLayout(tp_size, pcp_size, dcp_size, NUM_HEADS, num_kv_heads)
    batch = len(history_lens)
    chunk_len_padded = padded_length(max(CHUNK_LENS), pcp_size)
    total = int(history_lens.max()) + chunk_len_padded
    gen = torch.Generator().manual_seed(seed)
    q_all = torch.randn(batch, NUM_HEADS, total, HEAD_DIM, generator=gen)
    k_all, v_all = (torch.randn(batch, num_kv_heads, total, HEAD_DIM, generator=gen) for _ in range(2))
    q_heads, kv_heads = list(heads.q_heads_of(tp)), list(heads.kv_heads_of(tp))
    group_kv_heads = list(heads.dcp_kv_heads_of(tp))

    def chunk_shard(x, head_ids):
        chunk = torch.stack([x[i, head_ids, h:h + chunk_len_padded] for i, h in enumerate(history_lens.tolist())])
        return shard_sequence(chunk, pcp_rank, pcp_size, seq_dim=2)

    cache = _paged_cache(dg, k_all[:, group_kv_heads], v_all[:, group_kv_heads], history_lens, chunk_len_padded,
                         CHUNK_LENS, holds_chunk)
    scale = HEAD_DIM ** -0.5
    stats = CommStats()
    out = context_attention(chunk_shard(q_all, q_heads), chunk_shard(k_all, kv_heads), chunk_shard(v_all, kv_heads),
                            cache, history_lens, dg, pcp_group, prefill_comm, decode_comm, scale, stats, window,
                            softcap)
    where = (f"rank {rank} TPxPCPxDCP={layout} kv_heads={num_kv_heads} I={dg.interleave} {decode_comm} "
             f"{prefill_comm} cache holds chunk={holds_chunk} history={history_lens.tolist()} window={window} "
             f"softcap={softcap}")
    positions = shard_positions(chunk_len_padded, pcp_rank, pcp_size)  # chunk-relative
    worst_abs = worst_rel = 0.0
    for request, (history, chunk) in enumerate(zip(history_lens.tolist(), CHUNK_LENS)):
        seq = history + chunk
        want = _reference(q_all[request, :, :seq], k_all[request, :, :seq], v_all[request, :, :seq], scale, window,
                          softcap)
        real = positions < chunk
        if not real.any():  # this PCP rank holds only padding of this request's chunk
            continue
        want = want[q_heads][:, history + positions[real]]
        diff = (out[request][:, real].double() - want).abs()
        rel = float(diff.max() / want.abs().max())
        assert rel <= TOLERANCE, (f"{where} request {request}: max {diff.max():.2e}, mean {diff.mean():.2e}, "
                                  f"relative {rel:.2e}")
        worst_abs, worst_rel = max(worst_abs, float(diff.max())), max(worst_rel, rel)
    calls, bytes_sent = _expected_comm(layout, decode_comm, prefill_comm, batch, len(q_heads), len(kv_heads),
                                       chunk_len_padded // pcp_size)
    if window is not None:
        for counts in (calls, bytes_sent, stats.calls, stats.bytes_sent):
            counts.pop("send_recv", None)
    assert dict(stats.calls) == calls, f"{where}: collectives {dict(stats.calls)} != {calls}"
    assert dict(stats.bytes_sent) == bytes_sent, f"{where}: bytes {dict(stats.bytes_sent)} != {bytes_sent}"
    return worst_abs, worst_rel


# (KV heads, interleave, decode comm, prefill comm, cache already holds the chunk)
CASES = list(itertools.product(KV_HEADS, (1, 2), ("a2a", "ag_rs"), ("p2p", "all_gather"), (False, True)))
# The windows run with GQA and interleave 2 on p2p + a2a, with MQA and interleave 1 on all_gather + ag_rs.
WINDOWED_CASES = [(2, 2, "a2a", "p2p", True), (1, 1, "ag_rs", "all_gather", False)]


def _check_layouts(rank, world_size, layouts):
    """Every case of every layout, then the first case again on a batch with no history at all (same
    collectives: their count and bytes never depend on the history), then every window (``WINDOWS``) on a
    case of each prefill comm. Returns ``(calls checked, worst
    abs error, worst relative error)`` of this rank."""
    calls, worst_abs, worst_rel = 0, 0.0, 0.0
    for layout_index, layout in enumerate(layouts):
        tp_size, pcp_size, dcp_size = layout
        groups = ParallelLayout(tp_size, pcp_size, dcp_size, NUM_HEADS, 1)
        dcp_group, pcp_group = my_group(groups.dcp_groups), my_group(groups.pcp_groups)
        runs = [(case, HISTORY_LENS, (None, None)) for case in CASES] + \
            [(CASES[0], torch.zeros_like(HISTORY_LENS), (None, None))] + \
            [(case, HISTORY_LENS, window) for case in WINDOWED_CASES for window in WINDOWS]
        for run_index, ((num_kv_heads, interleave, *comms_and_cache), history_lens, window) in enumerate(runs):
            replication = ParallelLayout(tp_size, pcp_size, dcp_size, NUM_HEADS, num_kv_heads).kv_head_replication
            dg = DecodeGroup.from_group(dcp_group, dcp_size // pcp_size, pcp_size, interleave, replication)
            errors = _attend_and_compare(rank, layout, dg, pcp_group if pcp_size > 1 else None, num_kv_heads,
                                         *comms_and_cache, history_lens, 1000 * layout_index + run_index, *window)
            calls, worst_abs, worst_rel = calls + 1, max(worst_abs, errors[0]), max(worst_rel, errors[1])
    return calls, worst_abs, worst_rel


def _run_layouts(world_size, layouts, **kwargs):
    expected = len(layouts) * (len(CASES) + 1 + len(WINDOWED_CASES) * len(WINDOWS))
    results = run_ranks(world_size, _check_layouts, layouts, **kwargs)
    for rank, (calls, worst_abs, worst_rel) in enumerate(results):
        assert calls == expected and worst_rel <= TOLERANCE, \
            f"rank {rank}: {calls} of {expected} calls, worst abs {worst_abs:.2e}, relative {worst_rel:.2e}"


def test_context_attention_matches_unsharded_attention_on_2_ranks():
    _run_layouts(2, [(1, 2, 2), (2, 1, 2)])


def test_context_attention_matches_unsharded_attention_on_4_ranks():
    _run_layouts(4, [(2, 2, 2), (2, 2, 4), (1, 4, 4)])


def test_context_attention_matches_unsharded_attention_on_8_ranks():
    _run_layouts(8, [(4, 2, 8), (2, 4, 8), (4, 2, 4)], timeout_s=240)
