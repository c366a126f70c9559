"""Counted collectives: results in member order for any tensor rank, counts and bytes recorded."""
import torch

from cptoolkit.layers.comm import CommStats, all_gather, all_reduce, all_to_all, reduce_scatter, send_recv
from tests.multiproc import run_ranks


def _exercise_collectives(rank, world_size):
    import torch.distributed as dist

    stats = CommStats()
    group = dist.group.WORLD
    x = torch.full((2, 3, 1), float(rank))
    gathered = all_gather(x, group, stats)
    assert gathered.shape == (world_size, 2, 3, 1)
    assert [gathered[i].unique().item() for i in range(world_size)] == list(range(world_size))
    stacked = torch.stack([torch.full((2, 2), float(rank * 10 + dst)) for dst in range(world_size)])
    reduced = reduce_scatter(stacked, group, stats)
    assert torch.equal(reduced, torch.full((2, 2), float(sum(r * 10 + rank for r in range(world_size)))))
    exchanged = all_to_all(stacked, group, stats)
    assert [exchanged[src].unique().item() for src in range(world_size)] == \
        [float(src * 10 + rank) for src in range(world_size)]
    total = all_reduce(torch.tensor([1.0]), group, stats=stats)
    assert total.item() == world_size
    received, works = send_recv(torch.tensor([float(rank)]), (rank + 1) % world_size,
                                (rank - 1) % world_size, group, stats)
    for work in works:
        work.wait()
    assert received.item() == (rank - 1) % world_size
    return dict(stats.calls), stats.total_bytes


def test_collectives_on_three_ranks():
    for calls, total_bytes in run_ranks(3, _exercise_collectives):
        assert calls == {"all_gather": 1, "reduce_scatter": 1, "all_to_all": 1, "all_reduce": 1, "send_recv": 1}
        assert total_bytes == 4 * (6 + 12 + 12 + 1 + 1)


def test_layer_tally_counts_into_its_parent():
    model_stats = CommStats()
    layer_one, layer_two = CommStats(parent=model_stats), CommStats(parent=model_stats)
    layer_one.record("all_gather", torch.zeros(4))
    layer_two.record("all_to_all", torch.zeros(2, dtype=torch.float64))
    layer_two.record("all_to_all", torch.zeros(2, dtype=torch.float64))
    assert dict(layer_one.calls) == {"all_gather": 1} and dict(layer_two.calls) == {"all_to_all": 2}
    assert dict(model_stats.calls) == {"all_gather": 1, "all_to_all": 2} and model_stats.total_bytes == 16 + 32


def _strided_all_to_all_rank(rank, world_size):
    import torch.distributed as dist

    base = torch.arange(world_size * 6, dtype=torch.float32).reshape(3, world_size, 2) + 100 * rank
    stacked = base.transpose(0, 1)  # [world, 3, 2], not contiguous
    return all_to_all(stacked, dist.group.WORLD).tolist(), stacked.tolist()


def test_all_to_all_of_a_strided_tensor_returns_dense_entries():
    results = run_ranks(2, _strided_all_to_all_rank)
    for rank, (received, _) in enumerate(results):
        for source in range(2):
            assert received[source] == results[source][1][rank], (rank, source)
