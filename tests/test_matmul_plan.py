"""``cptoolkit.models.matmul_plan``: every formulation computes ``x @ W^T`` (against float64), the plan keeps the
fastest per shape and bucket of the timings summed over the group (timings injected, so the choice is known), and
falls back to megatron's ``x @ W^T`` wherever nothing was measured."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cptoolkit.models import matmul_plan
from cptoolkit.models.matmul_plan import FORMULATIONS, MatmulPlan, row_bucket
from tests.multiproc import run_ranks


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), n=st.integers(1, 70), k=st.integers(1, 40), lead=st.sampled_from([(), (1,), (2,)]),
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
    assert MatmulPlan().formulation(1, weight) == "x_wt"


def test_measure_keeps_the_fastest_per_shape_and_bucket(monkeypatch):
    timed = []

    def seconds(name, x, weight):
        timed.append((name, x.shape[0]))
        return {"x_wt": 3.0, "w_xt": 2.0 if x.shape[0] >= 4 else 4.0, "w_xt_two_rows": 1.0}[name]

    monkeypatch.setattr(matmul_plan, "_seconds", seconds)
    weights = [torch.randn(6, 4), torch.randn(6, 4), torch.randn(5, 8), torch.randn(8, 6).t()]
    plan = MatmulPlan.measure(weights, max_rows=5)
    assert set(plan.choice) == {(6, 4, torch.float32), (5, 8, torch.float32)}  # one per shape; row-major only
    for by_bucket in plan.choice.values():
        assert by_bucket == {1: "w_xt_two_rows", 2: "x_wt", 4: "w_xt", 8: "w_xt"}
    assert ("w_xt_two_rows", 2) not in timed
    assert len(timed) == 3 * 3 * (3 + 2 + 2 + 2)  # 3 row-major weights x (warm-up + 2 passes) x formulations


def _measure_on_rank(rank: int, world_size: int):
    import torch.distributed as dist

    def seconds(name, x, weight):  # rank 0 finds x_wt fastest by a little, rank 1 w_xt by a lot
        return {0: {"x_wt": 1.0, "w_xt": 1.1, "w_xt_two_rows": 9.0},
                1: {"x_wt": 5.0, "w_xt": 1.0, "w_xt_two_rows": 9.0}}[rank][name]

    matmul_plan._seconds = seconds
    return MatmulPlan.measure([torch.randn(6, 4)], max_rows=2, group=dist.group.WORLD).choice


def test_ranks_agree_on_the_fastest_of_their_summed_timings():
    choices = run_ranks(2, _measure_on_rank)
    assert choices[0] == choices[1] == {(6, 4, torch.float32): {1: "w_xt", 2: "w_xt"}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_measured_plan_covers_every_bucket_with_a_formulation_that_computes_the_product(dtype):
    weight = torch.randn(33, 16).to(dtype)
    plan = MatmulPlan.measure([weight, weight.clone()], max_rows=3, reps=1)
    assert set(plan.choice[(33, 16, dtype)]) == {1, 2, 4}
    assert plan.choice[(33, 16, dtype)][2] != "w_xt_two_rows"
    for rows in (1, 2, 3, 4):
        x = torch.randn(rows, 16).to(dtype)
        torch.testing.assert_close(plan.linear(x, weight).float(), (x @ weight.t()).float(), rtol=2e-2, atol=2e-2)
