"""Ulysses (a2a) and hierarchical (a2a+p2p) prefill attention against unsharded float64 attention.

Same reference and tolerances as the ring (``test_ring_prefill``): forward and dq/dk/dv of every rank's
DualChunkSwap shard, MHA / GQA / MQA plus a KV head count that neither divides nor is divided by the
a2a size (KV heads replicated), a batch of mixed odd lengths padded at the end (padding gets zero
gradient). One spawn per world size runs every case; the collectives and forward bytes are asserted.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.dual_chunk_swap import padded_length, shard_sequence
from cptoolkit.layers.hierarchical_prefill import (HierarchicalGroups, hierarchical_rank_lists,
                                                   new_hierarchical_groups)
from cptoolkit.layers.ring_prefill import ring_prefill_attention
from cptoolkit.layers.ulysses_a2a import kv_replicas
from tests.multiproc import run_ranks
from tests.test_ring_prefill import _error, _reference_f64

HEADS = {"MHA": (8, 8), "GQA": (8, 2), "MQA": (8, 1), "GQA kv=3": (6, 3)}  # (query heads, KV heads)
SEQ_LENS = (13, 6)
HEAD_DIM = 8
FWD_RTOL, GRAD_RTOL = 1e-5, 1e-4


def _run_case(pcp_group, hcp_groups, hq, hkv, seed):
    """One forward + backward of ``a2a`` (``hcp_groups`` None) or ``a2a+p2p``, with errors and tallies."""
    pcp_rank, pcp_size = dist.get_rank(pcp_group), dist.get_world_size(pcp_group)
    comm, a2a_size = ("a2a", pcp_size) if hcp_groups is None else ("a2a+p2p", hcp_groups.a2a_size)
    gen = torch.Generator().manual_seed(seed)
    seq_len_padded = padded_length(max(SEQ_LENS), pcp_size)
    b = len(SEQ_LENS)
    q = torch.randn(b, hq, seq_len_padded, HEAD_DIM, generator=gen)
    k, v = (torch.randn(b, hkv, seq_len_padded, HEAD_DIM, generator=gen) for _ in range(2))
    valid = (torch.arange(seq_len_padded) < torch.tensor(SEQ_LENS)[:, None])[:, None, :, None]  # [b, 1, S, 1]
    dout = torch.randn(q.shape, generator=gen) * valid
    scale = HEAD_DIM ** -0.5
    ref = _reference_f64(q, k, v, dout, SEQ_LENS, scale)

    def local(x):
        return shard_sequence(x, pcp_rank, pcp_size, seq_dim=2)

    q_local, k_local, v_local = (local(t).requires_grad_() for t in (q, k, v))
    stats = CommStats()
    out = ring_prefill_attention(q_local, k_local, v_local, pcp_group=pcp_group, scale=scale, comm=comm,
                                 stats=stats, hcp_groups=hcp_groups)
    forward_calls, forward_bytes = dict(stats.calls), stats.total_bytes
    stats.reset()
    out.backward(local(dout))
    local_valid = local(valid)
    return {
        "case": f"{comm} a2a={a2a_size} ring={pcp_size // a2a_size} hq={hq} hkv={hkv}", "pcp_rank": pcp_rank,
        "pcp_size": pcp_size, "a2a_size": a2a_size, "hq": hq, "hkv": hkv,
        # bytes of one head of this rank's 2c tokens, for the whole batch
        "head_bytes": q_local[:, 0].numel() * q_local.element_size(),
        "out": _error(out.detach() * local_valid, local(ref["out"]) * local_valid, ref["out"]),
        **{name: _error(t.grad, local(ref[name]), ref[name])
           for name, t in (("dq", q_local), ("dk", k_local), ("dv", v_local))},
        "forward_calls": forward_calls, "forward_bytes": forward_bytes,
        "backward_calls": dict(stats.calls), "backward_a2a_bytes": stats.bytes_sent["all_to_all"],
    }


def _all_cases_rank(rank, world_size, pcp_sizes, a2a_sizes):
    """For each PCP size (PCP groups laid out as in parallel_state: global rank = pcp_rank * tp + tp_rank),
    run ``a2a`` and ``a2a+p2p`` for each inner size ``a`` in ``a2a_sizes[pcp_size]``, for every head layout
    whose query heads ``a`` divides."""
    results = []
    for pcp_size in pcp_sizes:
        tp_size = world_size // pcp_size
        pcp_groups = [dist.new_group([pcp * tp_size + tp for pcp in range(pcp_size)]) for tp in range(tp_size)]
        pcp_group = pcp_groups[rank % tp_size]
        layouts = [(None, pcp_size)] + [(new_hierarchical_groups(pcp_group, a), a) for a in a2a_sizes[pcp_size]]
        for hcp_groups, a2a_size in layouts:
            results += [_run_case(pcp_group, hcp_groups, hq, hkv, seed)
                        for seed, (hq, hkv) in enumerate(HEADS.values()) if hq % a2a_size == 0]
    return results


def _expected_calls(a2a_size, ring_size):
    a2a = {"all_to_all": 4} if a2a_size > 1 else {}  # q, k, v, out forward; dout, dq, dk, dv backward
    ring_forward = {"send_recv": ring_size - 1} if ring_size > 1 else {}
    ring_backward = {"send_recv": 2 * ring_size - 1} if ring_size > 1 else {}
    return {**a2a, **ring_forward}, {**a2a, **ring_backward}


def _expected_forward_bytes(result):
    """In heads of this rank's 2c tokens: the a2a sends q|k|v (KV heads replicated up to
    lcm(hkv, a)) and out, each ring step one K/V block of lcm(hkv, a)/a heads over the group's 2ac tokens."""
    a, ring_size, hq, hkv = result["a2a_size"], result["pcp_size"] // result["a2a_size"], result["hq"], result["hkv"]
    kv_heads_replicated = math.lcm(hkv, a)
    heads = (2 * hq + 2 * kv_heads_replicated if a > 1 else 0) + (ring_size - 1) * 2 * kv_heads_replicated
    return heads * result["head_bytes"]


def _check(results, expected_cases):
    cases = [r for rank_results in results for r in rank_results]
    for result in cases:
        where = f"{result['case']} pcp={result['pcp_size']} pcp_rank={result['pcp_rank']}"
        for name, rtol in (("out", FWD_RTOL), ("dq", GRAD_RTOL), ("dk", GRAD_RTOL), ("dv", GRAD_RTOL)):
            err = result[name]
            assert err["rel"] <= rtol, (f"{where}: {name} relative error {err['rel']:.2e} > {rtol:.0e} "
                                        f"(max abs {err['max']:.2e}, mean abs {err['mean']:.2e})")
        forward, backward = _expected_calls(result["a2a_size"], result["pcp_size"] // result["a2a_size"])
        assert result["forward_calls"] == forward, f"{where}: forward collectives {result['forward_calls']}"
        assert result["backward_calls"] == backward, f"{where}: backward collectives {result['backward_calls']}"
        assert result["forward_bytes"] == _expected_forward_bytes(result), f"{where}: {result['forward_bytes']} B"
        # dout, then dq, dk, dv: the transposes of the forward's exchanges.
        a2a_heads = 2 * result["hq"] + 2 * math.lcm(result["hkv"], result["a2a_size"]) if result["a2a_size"] > 1 else 0
        assert result["backward_a2a_bytes"] == a2a_heads * result["head_bytes"], f"{where}: backward all_to_all bytes"
    assert sorted({(r["case"], r["pcp_size"]) for r in cases}) == sorted(expected_cases)
    worst = {name: max(r[name]["rel"] for r in cases) for name in ("out", "dq", "dk", "dv")}
    print(f"max relative errors over {len(cases)} rank-cases: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def _case_names(pcp_size, a2a_sizes):
    layouts = [("a2a", pcp_size)] + [("a2a+p2p", a) for a in a2a_sizes]
    return [(f"{comm} a2a={a} ring={pcp_size // a} hq={hq} hkv={hkv}", pcp_size)
            for comm, a in layouts for hq, hkv in HEADS.values() if hq % a == 0]


# a2a+p2p inner sizes per PCP size; a = 1 (pure ring) and a = P (pure a2a) are the degenerate ends.
@pytest.mark.parametrize("world_size, a2a_sizes", [
    (1, {1: (1,)}),
    (2, {2: (1, 2)}),
    (4, {4: (2, 1, 4), 2: (2,)}),
    (8, {8: (2, 4)}),
])
def test_a2a_and_hierarchical_prefill_match_unsharded_float64_attention(world_size, a2a_sizes):
    results = run_ranks(world_size, _all_cases_rank, tuple(a2a_sizes), a2a_sizes, timeout_s=240)
    _check(results, [name for pcp_size, sizes in a2a_sizes.items() for name in _case_names(pcp_size, sizes)])


def test_kv_heads_are_replicated_to_a_multiple_of_the_a2a_size():
    # (kv heads, a2a size) -> replicas; kv_heads * replicas = lcm(kv heads, a2a size)
    table = {(8, 4): 1, (2, 4): 2, (1, 4): 4, (1, 2): 2, (3, 2): 2, (6, 4): 2, (4, 8): 2}
    assert {key: kv_replicas(*key) for key in table} == table


def test_hierarchical_groups_follow_megatron_order():
    """Megatron's create_hierarchical_groups for sizes [2, 2, ...]: level 1 consecutive, level 2 strided.
    Two PCP groups of TP=2 (global ranks pcp * 2 + tp)."""
    a2a_lists, ring_lists = hierarchical_rank_lists([[0, 2, 4, 6], [1, 3, 5, 7]], 2)
    assert a2a_lists == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert ring_lists == [[0, 4], [2, 6], [1, 5], [3, 7]]
    a2a_lists, ring_lists = hierarchical_rank_lists([list(range(8))], 4)
    assert a2a_lists == [[0, 1, 2, 3], [4, 5, 6, 7]] and ring_lists == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(ValueError, match=r"^a2a_size \(3\) must be a positive divisor of pcp \(4\)"):
        hierarchical_rank_lists([[0, 1, 2, 3]], 3)


def _invalid_inputs_rank(rank, world_size):
    world = dist.group.WORLD
    hcp = new_hierarchical_groups(world, 2)
    q, kv = torch.zeros(1, 8, 4, 8), torch.zeros(1, 2, 4, 8)
    swapped = HierarchicalGroups(a2a_group=hcp.ring_group, ring_group=hcp.a2a_group)
    cases = [
        (dict(q=q[:, :6], comm="a2a"),
         r"^comm 'a2a': query heads per TP rank \(6\) must be a multiple of the a2a group size \(4 = pcp\)"),
        (dict(q=q[:, :3], comm="a2a+p2p", hcp_groups=hcp), r"^comm 'a2a\+p2p': query heads per TP rank \(3\) must "
                                                             r"be a multiple of the a2a group size \(2 = hierarchical"),
        (dict(comm="a2a+p2p"), r"hcp_groups \(None\) must be this rank's HierarchicalGroups for comm 'a2a\+p2p'"),
        (dict(comm="a2a+p2p", hcp_groups=swapped), r"must be the sub-groups of this rank's PCP group \[0, 1, 2, 3\]"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ring_prefill_attention(**{"q": q, "k": kv[:, :1], "v": kv[:, :1], "pcp_group": world, "scale": 1.0,
                                      **kwargs})
    for a2a_size in (3, 0):
        with pytest.raises(ValueError, match=rf"^a2a_size \({a2a_size}\) must be a positive divisor of pcp \(4\)"):
            new_hierarchical_groups(world, a2a_size)
    return len(cases) + 2


def test_invalid_combinations_name_the_rule_on_every_rank():
    assert run_ranks(4, _invalid_inputs_rank) == [6] * 4
