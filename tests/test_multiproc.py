"""The harness itself: results come back by rank, failures and hangs surface fast."""
import time

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import RankFailed, run_ranks


def _all_reduce_rank(rank, world_size):
    tensor = torch.tensor([float(rank)])
    dist.all_reduce(tensor)
    return rank, tensor.item()


def _rank_one_raises(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # the other ranks would wait forever without the harness


def _sleep_forever(rank, world_size):
    time.sleep(3600)


def test_results_come_back_in_rank_order():
    assert run_ranks(4, _all_reduce_rank) == [(r, 6.0) for r in range(4)]


def test_failing_rank_reports_its_traceback_fast():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 of 2 failed:(.|\n)*boom on purpose"):
        run_ranks(2, _rank_one_raises, collective_timeout_s=30)
    assert time.monotonic() - start < 20


def test_hung_run_times_out():
    with pytest.raises(TimeoutError, match="exceeded 3 s"):
        run_ranks(2, _sleep_forever, timeout_s=3)
