"""The paged DCP-sharded KV cache: shards merged back by position are exactly the full K/V.

DCP members are simulated in one process: one cache per shard index, each fed the same calls.
"""
import pytest
import torch

from cptoolkit.inference.kv_cache import KVCacheFull, PagedKVCache
from cptoolkit.layers.dcp_decode import shard_length, shard_of_position, slot_of_position
from tests.multiproc import run_ranks

HKV, HEAD_DIM, BLOCK_SIZE, NUM_LAYERS = 2, 8, 4, 2


def _caches(dcp_size, interleave, num_blocks=32, block_size=BLOCK_SIZE):
    return [PagedKVCache(NUM_LAYERS, HKV, HEAD_DIM, block_size, num_blocks, dcp_rank, dcp_size, interleave,
                         torch.float64) for dcp_rank in range(dcp_size)]


def _merge_shards(caches, layer, request_ids, total_lens):
    """Read every shard of a batch and put each token back at its position: ``[b, 2, hkv, s, d]`` per request."""
    merged = [torch.full((2, HKV, n, HEAD_DIM), float("nan"), dtype=torch.float64) for n in total_lens]
    for cache in caches:
        k_shard, v_shard, shard_lens = cache.view(layer + 1, request_ids).read()
        for row, total_len in enumerate(total_lens):
            positions = torch.arange(total_len)
            owned = positions[shard_of_position(positions, cache.dcp_size, cache.interleave) == cache.dcp_rank]
            expected_len = shard_length(total_len, cache.dcp_rank, cache.dcp_size, cache.interleave)
            assert int(shard_lens[row]) == expected_len == owned.numel(), (cache.dcp_rank, row)
            assert torch.all(k_shard[row, :, expected_len:] == 0) and torch.all(v_shard[row, :, expected_len:] == 0)
            merged[row][0][:, owned] = k_shard[row, :, :expected_len]
            merged[row][1][:, owned] = v_shard[row, :, :expected_len]
    return merged


def _assert_exact(merged, reference, what):
    for row, (got, want) in enumerate(zip(merged, reference)):
        diff = (got - want).abs()
        assert torch.equal(got, want), (f"{what}, request {row}: max abs diff {diff.max().item()}, "
                                        f"mean {diff.mean().item()}")


@pytest.mark.parametrize("planned", [False, True], ids=["view_plans_each_append", "step_planned_once"])
@pytest.mark.parametrize("dcp_size,interleave", [(1, 1), (2, 1), (4, 1), (2, 4), (4, 4), (3, 2)])
def test_prefill_then_decode_reconstructs_the_full_kv(dcp_size, interleave, planned):
    gen = torch.Generator().manual_seed(dcp_size * 10 + interleave)
    prompt_lens, num_decode_steps = [13, 5, 22], 9
    total_lens = [n + num_decode_steps for n in prompt_lens]
    request_ids = ["a", "b", "c"]
    full = [torch.randn(NUM_LAYERS, 2, HKV, n, HEAD_DIM, generator=gen, dtype=torch.float64) for n in total_lens]
    caches = _caches(dcp_size, interleave)
    for cache in caches:
        for request_id, total_len in zip(request_ids, total_lens):
            cache.add_request(request_id, total_len)
        for layer in range(NUM_LAYERS):
            for request_id, kv, n in zip(request_ids, full, prompt_lens):
                cache.fill_prefill(layer + 1, request_id, kv[layer, 0, :, :n], kv[layer, 1, :, :n], torch.arange(n))
    for step in range(num_decode_steps):
        positions = torch.tensor([n + step for n in prompt_lens])
        # The engine's path plans the step once for every layer (PagedKVCache.views); a bare view plans each append.
        views = [cache.views(request_ids, positions[:, None].tolist()) if planned else
                 {layer + 1: cache.view(layer + 1, request_ids) for layer in range(NUM_LAYERS)} for cache in caches]
        for layer in range(NUM_LAYERS):
            k_new = torch.stack([kv[layer, 0, :, p:p + 1] for kv, p in zip(full, positions.tolist())])
            v_new = torch.stack([kv[layer, 1, :, p:p + 1] for kv, p in zip(full, positions.tolist())])
            for cache_views in views:
                cache_views[layer + 1].append(k_new, v_new, positions)
        if step == 3:
            seen = (positions + 1).tolist()
            _assert_exact(_merge_shards(caches, 0, request_ids, seen),
                          [kv[0, :, :, :n] for kv, n in zip(full, seen)], f"layer 0 after decode step {step}")
    for layer in range(NUM_LAYERS):
        _assert_exact(_merge_shards(caches, layer, request_ids, total_lens), [kv[layer] for kv in full],
                      f"layer {layer}, dcp_size {dcp_size}, interleave {interleave}")


def test_views_read_any_batch_order_and_subset():
    caches = _caches(2, 1)
    lens = {"x": 7, "y": 12}
    full = {r: torch.randn(2, HKV, n, HEAD_DIM, dtype=torch.float64) for r, n in lens.items()}
    for cache in caches:
        for r, n in lens.items():
            cache.add_request(r, n)
            cache.fill_prefill(2, r, full[r][0], full[r][1], torch.arange(n))
    _assert_exact(_merge_shards(caches, 1, ["y", "x"], [12, 7]), [full["y"], full["x"]], "batch order y, x")
    _assert_exact(_merge_shards(caches, 1, ["x"], [7]), [full["x"]], "batch of x alone")
    _assert_exact(_merge_shards(caches, 0, ["x"], [0]), [full["x"][:, :, :0]], "untouched layer 0")


def test_fill_prefill_accepts_own_positions_only_and_in_chunks():
    n = 18
    kv = torch.randn(2, HKV, n, HEAD_DIM, dtype=torch.float64)
    reference = _caches(4, 2)
    own_positions, chunked = _caches(4, 2), _caches(4, 2)
    for ref, own, chunks in zip(reference, own_positions, chunked):
        for cache in (ref, own, chunks):
            cache.add_request(0, n)
        ref.fill_prefill(1, 0, kv[0], kv[1], torch.arange(n))
        mine = torch.nonzero(shard_of_position(torch.arange(n), 4, 2) == own.dcp_rank).flatten()
        own.fill_prefill(1, 0, kv[0][:, mine.flip(0)], kv[1][:, mine.flip(0)], mine.flip(0))
        for start, end in [(0, 5), (5, 11), (11, n)]:
            chunks.fill_prefill(1, 0, kv[0][:, start:end], kv[1][:, start:end], torch.arange(start, end))
    for caches, what in [(reference, "all positions"), (own_positions, "own positions, reversed"),
                         (chunked, "three chunks")]:
        _assert_exact(_merge_shards(caches, 0, [0], [n]), [kv], what)


def test_out_of_order_writes_are_rejected():
    cache = _caches(2, 1)[1]
    cache.add_request("r", 16)
    kv = torch.randn(2, HKV, 16, HEAD_DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"must continue its stored sequence at shard slot 0 .*got slots \[1, 2\]"):
        cache.fill_prefill(1, "r", kv[0][:, 3:7], kv[1][:, 3:7], torch.arange(3, 7))
    cache.fill_prefill(1, "r", kv[0][:, :4], kv[1][:, :4], torch.arange(4))
    view = cache.view(1, ["r"])
    k_new = torch.randn(1, HKV, 1, HEAD_DIM)
    with pytest.raises(ValueError, match=r"next owned position must map to slot 2 .*got position 7, slot 3"):
        view.append(k_new, k_new, torch.tensor([7]))
    view.append(k_new, k_new, torch.tensor([4]))  # owned by shard 0: ignored here
    assert cache.shard_len(1, "r") == 2
    with pytest.raises(ValueError, match=r"max_total_len = 16\), so .* got position 17"):
        view.append(k_new, k_new, torch.tensor([17]))
    with pytest.raises(ValueError, match=r"max_total_len = 16\), so .* got position 16"):
        view.append(k_new, k_new, torch.tensor([16]))  # shard 0's position: too long on every rank
    with pytest.raises(ValueError, match=r"append: k and v must both have shape \[1, 2, 1, 8\]"):
        view.append(k_new[:, :1], k_new[:, :1], torch.tensor([5]))


def test_a_step_is_planned_and_checked_once_for_every_layer():
    cache = _caches(2, 1)[1]
    cache.add_request("r", 16)
    cache.add_request("half", 16)
    kv = torch.randn(2, HKV, 16, HEAD_DIM, dtype=torch.float64)
    for layer in range(1, NUM_LAYERS + 1):
        cache.fill_prefill(layer, "r", kv[0][:, :4], kv[1][:, :4], torch.arange(4))
    with pytest.raises(ValueError, match=r"next owned position must map to slot 2 .*got position 7, slot 3"):
        cache.views(["r"], [[7]])
    with pytest.raises(ValueError, match=r"max_total_len = 16\), so .* got positions \[15, 16\], slots \[7, 8\]"):
        cache.views(["r"], [[15, 16]])
    cache.fill_prefill(1, "half", kv[0][:, :2], kv[1][:, :2], torch.arange(2))
    with pytest.raises(ValueError, match=r"request 'half' stores \[1, 0\] tokens per layer on shard 1; a step is "
                                         r"planned once for every layer, so every layer must hold the same tokens"):
        cache.views(["r", "half"], [[5], [2]])
    views = cache.views(["r"], [[5]])
    assert len({id(view._plan) for view in views.values()}) == 1
    k_new = torch.randn(1, HKV, 1, HEAD_DIM, dtype=torch.float64)
    for view in views.values():
        view.append(k_new, k_new, torch.tensor([5]))
        k_shard, _, lens = view.read()
        assert lens.tolist() == [3] and torch.equal(k_shard[0, :, 2], k_new[0, :, 0])
    with pytest.raises(ValueError, match=r"a step plan appends once to every layer: it must be planned for 1 new "
                                         r"tokens on the stored tokens \(3,\)"):
        views[1].append(k_new, k_new, torch.tensor([7]))


def test_freeing_returns_blocks_and_reused_blocks_hold_new_data():
    cache = _caches(2, 1, num_blocks=6)[0]
    assert cache.num_free_blocks == 6 and cache.used_bytes == 0
    cache.add_request("old", 20)  # 10 shard tokens -> 3 blocks of 4
    assert cache.num_free_blocks == 3 and cache.used_bytes == 3 * cache.bytes_per_block
    old = torch.ones(HKV, 20, HEAD_DIM)
    cache.fill_prefill(1, "old", old, old, torch.arange(20))
    cache.free_request("old")
    assert cache.num_free_blocks == 6 and cache.used_bytes == 0
    cache.add_request("new", 24)  # 12 shard tokens -> 3 blocks, taken from the free list
    new = torch.randn(HKV, 5, HEAD_DIM, dtype=torch.float64)
    cache.fill_prefill(1, "new", new, new, torch.arange(5))
    k_shard, _, lens = cache.view(1, ["new"]).read()
    assert lens.tolist() == [3] and torch.equal(k_shard[0], new[:, [0, 2, 4]])
    with pytest.raises(KeyError, match="request 'old' is not in the KV cache of DCP rank 0"):
        cache.free_request("old")


def test_over_capacity_raises_kv_cache_full_and_reserves_nothing():
    cache = _caches(4, 1, num_blocks=5)[1]
    cache.add_request("first", 64)  # 16 shard tokens -> 4 blocks
    with pytest.raises(KVCacheFull, match=r"KV cache full on DCP rank 1: request 'second' needs 2 blocks "
                                          r"\(max_total_len = 20\), 0 of them cached, but only 1 of 5 blocks are free"):
        cache.add_request("second", 20)  # the fullest shard (0) holds 5 of 20 tokens: 2 blocks on every member
    assert cache.num_free_blocks == 1 and not cache.can_admit(20) and cache.can_admit(13)
    cache.add_request("third", 13)  # shard 0 holds positions 0, 4, 8, 12 -> 1 block on every member
    assert cache.num_free_blocks == 0


def test_every_member_reserves_the_same_blocks_and_reuses_cached_pages():
    """Block ids, cache hits and free counts are identical on every DCP member, and a request that reuses
    a cached page reads the first request's K/V there."""
    from cptoolkit.inference.block_pool import page_keys

    caches = _caches(2, 2, num_blocks=8)  # block 4 tokens, interleave 2: a page is 8 positions
    prompt = list(range(100, 120))
    keys = page_keys(prompt, caches[0].page_tokens, 2)
    kv = torch.randn(HKV, 20, HEAD_DIM, dtype=torch.float64)
    for cache in caches:
        assert cache.add_request("first", 24, keys) == 0
        cache.fill_prefill(1, "first", kv, kv, torch.arange(20))
        cache.fill_prefill(2, "first", kv, kv, torch.arange(20))
        cache.register_pages("first", keys)
        cache.free_request("first")  # its two pages stay cached
        assert cache.add_request("second", 30, keys) == 2
        assert cache.shard_len(1, "second") == cache.shard_len(2, "second") == 8
    tables = [list(cache._state("second").block_ids) for cache in caches]
    assert tables[0] == tables[1] and [c.num_free_blocks for c in caches] == [4, 4]
    for cache in caches:
        k_shard, _, lens = cache.view(2, ["second"]).read()
        owned = [t for t in range(16) if (t // 2) % 2 == cache.dcp_rank]
        assert lens.tolist() == [8] and torch.equal(k_shard[0], kv[:, owned])


def test_dcp4_stores_a_quarter_of_the_bytes_for_the_same_max_tokens():
    max_tokens, interleave = 64, 4
    sizes = {}
    for dcp_size in (1, 4):
        blocks = -(-max(shard_length(max_tokens, s, dcp_size, interleave) for s in range(dcp_size))
                   // BLOCK_SIZE)
        for cache in _caches(dcp_size, interleave, num_blocks=blocks):
            cache.add_request("fits exactly", max_tokens)
            assert cache.num_free_blocks == 0
        sizes[dcp_size] = _caches(dcp_size, interleave, num_blocks=blocks)[0].bytes_per_rank
        with pytest.raises(KVCacheFull):
            _caches(dcp_size, interleave, num_blocks=blocks - 1)[0].add_request("too big", max_tokens)
    assert sizes[1] == 4 * sizes[4] == NUM_LAYERS * 2 * 16 * HKV * BLOCK_SIZE * HEAD_DIM * 8


def test_shard_helpers_agree_with_enumeration():
    for dcp_size, interleave in [(1, 1), (2, 1), (4, 1), (2, 4), (4, 4), (3, 2)]:
        for seq_len in range(0, 40):
            positions = torch.arange(seq_len)
            owners = shard_of_position(positions, dcp_size, interleave)
            for shard in range(dcp_size):
                mine = positions[owners == shard]
                assert shard_length(seq_len, shard, dcp_size, interleave) == mine.numel()
                assert slot_of_position(mine, dcp_size, interleave).tolist() == list(range(mine.numel()))


@pytest.mark.parametrize("field,kwargs,rule", [
    ("num_blocks", dict(num_blocks=0), "integer >= 1"),
    ("interleave", dict(interleave=0), "integer >= 1"),
    ("dcp_rank", dict(dcp_rank=4), r"integer in \[0, dcp_size\) = \[0, 4\)"),
])
def test_constructor_validation(field, kwargs, rule):
    args = dict(num_layers=1, num_kv_heads=HKV, head_dim=HEAD_DIM, block_size=BLOCK_SIZE, num_blocks=4,
                dcp_rank=0, dcp_size=4, interleave=1, dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"{field} = .* is invalid: it must be an {rule}"):
        PagedKVCache(**{**args, **kwargs})


def test_add_request_validation():
    cache = _caches(1, 1)[0]
    cache.add_request("r", 8)
    with pytest.raises(ValueError, match="request_id = 'r' is already in the KV cache: free it first"):
        cache.add_request("r", 8)
    with pytest.raises(ValueError, match=r"max_total_len = 0 is invalid: it must be an integer >= 1"):
        cache.add_request("s", 0)


def _decode_through_paged_views(rank, world_size, interleave, comm):
    """Prefill then decode a batch of unequal requests with DCP attention reading this rank's paged
    shard; returns the max and mean abs error over every step against float64 attention over the full
    history."""
    import torch.distributed as dist

    from cptoolkit.layers.dcp_decode import DecodeGroup, dcp_decode_attention
    dg = DecodeGroup.from_group(dist.group.WORLD, tp_positions=1, pcp_size=world_size, interleave=interleave)
    gen = torch.Generator().manual_seed(interleave)  # identical history on every rank
    prompt_lens, num_steps, hq, scale = [9, 2, 15], 6, 4, HEAD_DIM ** -0.5
    total_lens = [n + num_steps for n in prompt_lens]
    q, k, v = (torch.randn(3, heads, max(total_lens), HEAD_DIM, generator=gen, dtype=torch.float64)
               for heads in (hq, HKV, HKV))
    cache = PagedKVCache(1, HKV, HEAD_DIM, BLOCK_SIZE, 16, dg.dcp_rank, world_size, interleave, torch.float64)
    for row, (prompt_len, total_len) in enumerate(zip(prompt_lens, total_lens)):
        cache.add_request(row, total_len)
        cache.fill_prefill(1, row, k[row, :, :prompt_len], v[row, :, :prompt_len], torch.arange(prompt_len))
    errors = []
    for step in range(num_steps):
        positions = torch.tensor(prompt_lens) + step
        pick = (torch.arange(3), slice(None), positions)
        out = dcp_decode_attention(q[pick][:, :, None], k[pick][:, :, None], v[pick][:, :, None],
                                   cache.view(1, [0, 1, 2]), positions, dg, comm, scale)
        for row, position in enumerate(positions.tolist()):
            keys, values = (x[row, :, :position + 1].repeat_interleave(hq // HKV, 0) for x in (k, v))
            scores = torch.einsum("hd,hkd->hk", q[row, :, position], keys) * scale
            expected = torch.einsum("hk,hkd->hd", torch.softmax(scores, -1), values)
            errors.append((out[row, :, 0] - expected).abs())
    errors = torch.cat(errors)
    return errors.max().item(), errors.mean().item()


def test_dcp_decode_attention_over_paged_shards_equals_full_attention():
    for interleave, comm in [(1, "ag_rs"), (3, "a2a")]:
        errors = run_ranks(4, _decode_through_paged_views, interleave, comm, timeout_s=90)
        for rank, (max_error, mean_error) in enumerate(errors):
            # the partials are merged in float32 (dcp_decode), hence float32 rounding on float64 inputs
            assert max_error < 2e-6, (f"interleave {interleave}, {comm}: rank {rank} max abs error {max_error}, "
                                      f"mean {mean_error}")


def test_layers_are_named_by_megatrons_one_based_layer_number():
    cache = _caches(1, 1)[0]
    cache.add_request("r", 8)
    for bad in (0, NUM_LAYERS + 1):
        with pytest.raises(ValueError, match=rf"layer_number = {bad!r} is invalid: it must be in \[1, {NUM_LAYERS}\]"):
            cache.view(bad, ["r"])
    kv = torch.ones(HKV, 3, HEAD_DIM, dtype=torch.float64)
    cache.fill_prefill(NUM_LAYERS, "r", kv, kv, torch.arange(3))
    assert cache.shard_len(NUM_LAYERS, "r") == 3 and cache.shard_len(1, "r") == 0
