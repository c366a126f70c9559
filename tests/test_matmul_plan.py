"""``cptoolkit.models.matmul_plan``: every formulation computes ``x @ W^T`` (against float64); a tuning plan times
each formulation in turn inside ``linear`` and settles on the fastest per shape and bucket of the timings summed
over the group (a fake clock, so the timings and the choice are known); megatron's ``x @ W^T`` wherever nothing is
chosen or timed."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cptoolkit.models import matmul_plan
from cptoolkit.models.matmul_plan import FORMULATIONS, TRIALS, MatmulPlan, row_bucket
from tests.multiproc import run_ranks


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 8), n=st.integers(1, 70), k=st.integers(1, 40), lead=st.sampled_from([(), (1,), (2,)]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2 ** 16))
def test_every_formulation_is_x_times_w_transposed(rows, n, k, lead, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, rows, k, generator=generator).to(dtype)
    weight = torch.randn(n, k, generator=generator).to(dtype)
    want = (x.double() @ weight.double().t())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for name in FORMULATIONS:
        plan = MatmulPlan({(n, k, dtype): {row_bucket(x.numel() // k): name}})
        assert plan.formulation(x.numel() // k, weight) == name
        got = plan.linear(x, weight)
        assert got.shape == (*lead, rows, n) and got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * k ** 0.5, msg=name)


def test_row_bucket_is_the_next_power_of_two():
    assert [row_bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 33)] == [1, 2, 4, 4, 8, 8, 16, 64]


def test_unmeasured_shapes_rows_past_the_buckets_and_transposed_weights_use_megatrons_product():
    weight = torch.randn(6, 4)
    plan = MatmulPlan({(6, 4, torch.float32): {1: "w_xt_two_rows", 2: "w_xt"}})
    assert plan.formulation(1, weight) == "w_xt_two_rows" and plan.formulation(2, weight) == "w_xt"
    assert plan.formulation(3, weight) == "x_wt"  # bucket 4 was not measured
    assert plan.formulation(1, torch.randn(4, 6).t()) == "x_wt"  # not row-major
    assert plan.formulation(1, torch.randn(6, 5)) == "x_wt"  # another shape
    assert plan.formulation(1, weight.double()) == "x_wt"  # another dtype
    assert plan.formulation(17, weight) == "x_wt"  # past MAX_BUCKET
    assert MatmulPlan().formulation(1, weight) == "x_wt"


class FakeClock:
    """A clock that each formulation of ``formulations`` (the module's, wrapped: patch them in) advances by its
    cost (``costs[name]``, or ``costs[name][rows]``), counting the calls of each: the plan's timings are then known
    exactly."""

    def __init__(self, costs: dict):
        self.now, self.calls = 0.0, {name: 0 for name in FORMULATIONS}
        self.formulations = {name: self._advancing(name, formulation, costs[name])
                             for name, formulation in FORMULATIONS.items()}

    def _advancing(self, name, formulation, cost):
        def run(x, weight):
            self.calls[name] += 1
            self.now += cost[x.shape[0]] if isinstance(cost, dict) else cost
            return formulation(x, weight)
        return run

    def __call__(self) -> float:
        return self.now


def test_tuning_times_each_formulation_in_turn_then_settles_on_the_fastest(monkeypatch):
    clock = FakeClock({"x_wt": 3.0, "w_xt": {1: 4.0, 2: 2.0}, "w_xt_two_rows": 1.0})
    monkeypatch.setattr(matmul_plan, "FORMULATIONS", clock.formulations)
    plan = MatmulPlan(tune=True, clock=clock)
    weight, other = torch.randn(6, 4), torch.randn(5, 4)
    plan.linear(torch.randn(1, 4), weight)  # outside a tuning window: x @ W^T, untimed
    assert clock.calls["x_wt"] == 1 and plan.formulation(1, weight) == "x_wt"
    with plan.tuning():
        for _ in range(3 * TRIALS):
            plan.linear(torch.randn(1, 4), weight)
        for _ in range(2 * TRIALS - 1):
            plan.linear(torch.randn(2, 4), weight)
        plan.linear(torch.randn(1, 4), other)
        # bucket 1: each formulation TRIALS times; bucket 2: x_wt, w_xt, x_wt, ...; the other shape: x_wt first
        assert clock.calls == {"x_wt": 1 + TRIALS + TRIALS + 1, "w_xt": TRIALS + TRIALS - 1, "w_xt_two_rows": TRIALS}
        assert plan.formulation(1, weight) is None  # timed, not yet settled
        plan.linear(torch.randn(1, 4), weight)  # complete: x @ W^T, untimed, until settled
        assert clock.calls["x_wt"] == 2 * TRIALS + 3 and plan.choice == {}
    assert plan.choice == {(6, 4, torch.float32): {1: "w_xt_two_rows"}}  # bucket 2 and the other shape: pending
    with plan.tuning():
        plan.linear(torch.randn(2, 4), weight)  # the last timing of bucket 2
    assert plan.choice == {(6, 4, torch.float32): {1: "w_xt_two_rows", 2: "w_xt"}}
    calls = dict(clock.calls)
    plan.linear(torch.randn(1, 4), weight)
    assert clock.calls["w_xt_two_rows"] == calls["w_xt_two_rows"] + 1
    assert plan.formulation(1, other) == "x_wt" and plan.formulation(32, weight) == "x_wt"  # past MAX_BUCKET
    with plan.tuning():
        assert plan.formulation(1, other) is None and plan.formulation(32, weight) == "x_wt"


def test_a_failed_forward_settles_nothing():
    plan = MatmulPlan(tune=True)
    with pytest.raises(RuntimeError, match="rank failed"), plan.tuning():
        for _ in range(3 * TRIALS):
            plan.linear(torch.randn(1, 4), torch.randn(6, 4))
        raise RuntimeError("rank failed mid-forward")
    assert plan.choice == {}


def test_an_untuned_plan_and_every_settled_choice_compute_the_product():
    weight = torch.randn(33, 16)
    assert MatmulPlan().formulation(1, weight) == "x_wt"
    plan = MatmulPlan(tune=True)
    for rows in (1, 2, 3, 4, 5):
        x = torch.randn(rows, 16)
        with plan.tuning():
            for _ in range(3 * TRIALS + 1):
                torch.testing.assert_close(plan.linear(x, weight), x @ weight.t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plan.linear(x, weight), x @ weight.t(), rtol=1e-5, atol=1e-5)
    assert set(plan.choice[(33, 16, torch.float32)]) == {1, 2, 4, 8}


def _settle_on_rank(rank: int, world_size: int):
    import torch.distributed as dist

    # rank 0 finds x @ W^T fastest by a little, rank 1 finds (W @ x^T)^T fastest by a lot: the sum decides.
    costs = [{"x_wt": 1.0, "w_xt": 1.1, "w_xt_two_rows": 9.0}, {"x_wt": 5.0, "w_xt": 1.0, "w_xt_two_rows": 9.0}][rank]
    clock = FakeClock(costs)
    matmul_plan.FORMULATIONS = clock.formulations  # this rank's process only
    plan = MatmulPlan(tune=True, group=dist.group.WORLD, clock=clock)
    with plan.tuning():
        for _ in range(3 * TRIALS):
            plan.linear(torch.randn(1, 4), torch.randn(6, 4))
    return plan.choice


def test_ranks_settle_on_the_fastest_of_their_summed_timings():
    choices = run_ranks(2, _settle_on_rank)
    assert choices[0] == choices[1] == {(6, 4, torch.float32): {1: "w_xt"}}
