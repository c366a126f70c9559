"""Prefill K/V routing: every DCP member receives exactly its KV-shard tokens for its group's KV heads."""
import itertools

import torch

from cptoolkit.inference.prefill_kv import prefill_route, route_prefill_kv
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.dcp_decode import DecodeGroup, shard_of_position
from cptoolkit.layers.dual_chunk_swap import shard_sequence
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.multiproc import run_ranks

# (tp, pcp, dcp, num_kv_heads); 8 query heads
LAYOUTS = [(2, 2, 4, 2), (2, 2, 2, 2), (1, 4, 4, 2), (4, 1, 4, 1), (4, 1, 2, 2), (2, 2, 4, 1)]


def _route_rank(rank, world_size):
    checked = []
    for (tp, pcp, dcp, kv_heads), interleave in itertools.product(LAYOUTS, (1, 3)):
        groups = initialize_model_parallel(tp=tp, pcp=pcp, dcp=dcp, num_heads=8, num_kv_heads=kv_heads)
        try:
            info = groups.rank_info
            dg = DecodeGroup.from_parallel_groups(groups, interleave)
            seq_len_padded, batch, head_dim = 24, 2, 4
            full = torch.Generator().manual_seed(5)
            full_kv = torch.randn(2, batch, kv_heads, seq_len_padded, head_dim, generator=full)
            mine = full_kv[:, :, list(info.kv_heads)]  # this TP rank's heads ...
            local = shard_sequence(mine, info.pcp_rank, pcp, seq_dim=3)  # ... for its DualChunkSwap chunks
            stats = CommStats()
            k, v, positions = route_prefill_kv(local[0], local[1], seq_len_padded, info.pcp_rank, dg, stats)
            want_positions = torch.nonzero(
                shard_of_position(torch.arange(seq_len_padded), dcp, interleave) == info.dcp_rank).flatten()
            order = torch.argsort(positions)
            assert torch.equal(positions[order], want_positions), (rank, tp, pcp, dcp, positions)
            want = full_kv[:, :, list(info.dcp_kv_heads)][..., want_positions, :]
            assert torch.equal(k[:, :, order], want[0]) and torch.equal(v[:, :, order], want[1]), \
                (rank, tp, pcp, dcp, kv_heads, interleave)
            assert stats.calls == ({"all_to_all": 1} if dcp > 1 else {})
            # Each member sends its own 2c tokens once (padded to the widest message), not dcp copies.
            if dcp > 1:
                width = prefill_route(seq_len_padded, info.pcp_rank, dg).width
                sent_tokens = stats.bytes_sent["all_to_all"] / (4 * 2 * batch * len(info.kv_heads) * head_dim)
                assert sent_tokens == dcp * width <= seq_len_padded // pcp + dcp * interleave, (rank, width)
            checked.append((tp, pcp, dcp, kv_heads, interleave))
        finally:
            destroy_model_parallel()
    return checked


def test_route_delivers_each_members_shard_for_its_group_heads():
    results = run_ranks(4, _route_rank)
    assert all(len(checked) == 2 * len(LAYOUTS) for checked in results)
