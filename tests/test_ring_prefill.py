"""Ring prefill attention (p2p and all-gather) against unsharded float64 attention, forward and backward.

One spawn per world size runs every case: both comms, MHA / GQA / MQA, a batch of mixed lengths that
are not multiples of 2*PCP (padded at the end; only real tokens are compared with the per-sequence
unpadded reference, and padding must receive zero gradient). The ring backward hands the flash kernel a
dense LSE even when a step computes only some of the local query rows.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.dual_chunk_swap import padded_length, shard_sequence
from cptoolkit.layers.ring_prefill import ring_prefill_attention
from tests.multiproc import run_ranks

HEADS = {"MHA": (4, 4), "GQA": (4, 2), "MQA": (4, 1)}  # (query heads, KV heads)
SEQ_LENS = (13, 6)
HEAD_DIM = 8
FWD_RTOL, GRAD_RTOL = 1e-5, 1e-4


def _reference_f64(q, k, v, dout, seq_lens, scale):
    """Per-sequence unpadded causal attention in float64 with autograd; results are laid out like the
    padded inputs ``[b, h, S, d]`` with zeros at padding (where the sharded gradients must be zero)."""
    ref = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in
           (("out", q), ("dq", q), ("dk", k), ("dv", v))}
    groups = q.shape[1] // k.shape[1]
    for i, n in enumerate(seq_lens):
        qi, ki, vi = (t[i, :, :n].double().requires_grad_() for t in (q, k, v))
        scores = qi @ ki.repeat_interleave(groups, 0).transpose(-1, -2) * scale
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.softmax(scores, dim=-1) @ vi.repeat_interleave(groups, 0)
        (out * dout[i, :, :n].double()).sum().backward()
        for name, value in (("out", out), ("dq", qi.grad), ("dk", ki.grad), ("dv", vi.grad)):
            ref[name][i, :, :n] = value.detach()
    return ref


def _error(got: torch.Tensor, want: torch.Tensor, want_full: torch.Tensor) -> dict:
    """Errors of a local shard; relative to the whole reference's largest magnitude (a shard's own
    reference can be all zero, e.g. dq of position 0)."""
    diff = (got.double() - want).abs()
    return {"rel": float(diff.max() / want_full.abs().max()), "max": float(diff.max()), "mean": float(diff.mean())}


def _run_case(pcp_group, comm, hq, hkv, seed):
    pcp_rank, pcp_size = dist.get_rank(pcp_group), dist.get_world_size(pcp_group)
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
    out = ring_prefill_attention(q_local, k_local, v_local, pcp_group=pcp_group, scale=scale, comm=comm, stats=stats)
    forward_calls, forward_bytes = dict(stats.calls), stats.total_bytes
    stats.reset()
    out.backward(local(dout))
    local_valid = local(valid)
    return {
        "case": f"{comm} hq={hq} hkv={hkv} pcp={pcp_size}", "pcp_rank": pcp_rank, "pcp_size": pcp_size,
        "comm": comm, "kv_local_bytes": 2 * k_local.numel() * k_local.element_size(),
        "out": _error(out.detach() * local_valid, local(ref["out"]) * local_valid, ref["out"]),
        **{name: _error(t.grad, local(ref[name]), ref[name])
           for name, t in (("dq", q_local), ("dk", k_local), ("dv", v_local))},
        "forward_calls": forward_calls, "forward_bytes": forward_bytes, "backward_calls": dict(stats.calls),
    }


def _all_cases_rank(rank, world_size, comm, pcp_sizes):
    """Run every case on the whole world as one PCP group, then on PCP subgroups of each smaller size
    laid out as in parallel_state (global rank = pcp_rank * tp + tp_rank, PCP groups = equal tp_rank)."""
    results = []
    for pcp_size in pcp_sizes:
        tp_size = world_size // pcp_size
        groups = [dist.new_group([pcp * tp_size + tp for pcp in range(pcp_size)]) for tp in range(tp_size)]
        results += [_run_case(groups[rank % tp_size], comm, hq, hkv, seed)
                    for seed, (hq, hkv) in enumerate(HEADS.values())]
    return results


def _expected_calls(comm, pcp_size):
    if comm == "all_gather":
        return {"all_gather": 1}, {"reduce_scatter": 1}
    if pcp_size == 1:
        return {}, {}
    return {"send_recv": pcp_size - 1}, {"send_recv": 2 * pcp_size - 1}


def _check(results):
    for result in (r for rank_results in results for r in rank_results):
        where = f"{result['case']} pcp_rank={result['pcp_rank']}"
        for name, rtol in (("out", FWD_RTOL), ("dq", GRAD_RTOL), ("dk", GRAD_RTOL), ("dv", GRAD_RTOL)):
            err = result[name]
            assert err["rel"] <= rtol, (f"{where}: {name} relative error {err['rel']:.2e} > {rtol:.0e} "
                                        f"(max abs {err['max']:.2e}, mean abs {err['mean']:.2e})")
        forward, backward = _expected_calls(result["comm"], result["pcp_size"])
        assert result["forward_calls"] == forward, f"{where}: forward collectives {result['forward_calls']}"
        assert result["backward_calls"] == backward, f"{where}: backward collectives {result['backward_calls']}"
        # K/V travel at their own (unrepeated) KV head count: p2p ships one local K/V block per step,
        # all_gather contributes the local K/V once.
        steps = result["pcp_size"] - 1 if result["comm"] == "p2p" else 1
        assert result["forward_bytes"] == steps * result["kv_local_bytes"], f"{where}: {result['forward_bytes']} B"


@pytest.mark.parametrize("comm", ["p2p", "all_gather"])
@pytest.mark.parametrize("world_size, pcp_sizes", [(1, (1,)), (2, (2,)), (4, (4, 2)), (8, (8,))])
def test_ring_prefill_matches_unsharded_float64_attention(comm, world_size, pcp_sizes):
    results = run_ranks(world_size, _all_cases_rank, comm, pcp_sizes, timeout_s=240)
    _check(results)
    assert len(results[0]) == len(HEADS) * len(pcp_sizes)


CPU_FLASH_BACKWARD = "_scaled_dot_product_flash_attention_for_cpu_backward"


def _kernel_lse_layouts_rank(rank, world_size):
    """One p2p ring forward + backward with the CPU flash backward wrapped to record, per call, whether
    its lse is contiguous and how many query rows it has."""
    real_kernel = getattr(torch.ops.aten, CPU_FLASH_BACKWARD)
    calls = []

    def recording_kernel(dout, q, k, v, out, lse, *args, **kwargs):
        calls.append((lse.is_contiguous(), lse.shape[2]))
        return real_kernel(dout, q, k, v, out, lse, *args, **kwargs)

    setattr(torch.ops.aten, CPU_FLASH_BACKWARD, recording_kernel)
    try:
        gen = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(2, 4, 8, HEAD_DIM, generator=gen).requires_grad_() for _ in range(3))
        out = ring_prefill_attention(q, k, v, pcp_group=dist.group.WORLD, scale=HEAD_DIM ** -0.5, comm="p2p")
        out.sum().backward()
    finally:
        setattr(torch.ops.aten, CPU_FLASH_BACKWARD, real_kernel)
    return calls


def test_ring_backward_hands_the_flash_kernel_a_contiguous_lse():
    """Half the ring's steps compute only some local query rows, so the ring passes ``lse[:, :, rows]``,
    a strided view, to the block backward; the CUDA flash backward indexes lse as a dense array
    (the CPU kernel, which runs here, copes with strides, so its inputs are recorded instead)."""
    calls = run_ranks(2, _kernel_lse_layouts_rank, timeout_s=60)
    # Rank 0's second step (K/V of rank 1, src > rank) computes only its later chunk: 4 of 8 rows.
    expected = [[(True, 8), (True, 4)], [(True, 8), (True, 8)]]
    assert calls == expected, f"(lse contiguous, query rows) of each kernel call, per rank: {calls}"


def _invalid_inputs_rank(rank, world_size):
    group = dist.group.WORLD
    q, kv = torch.zeros(1, 4, 6, 8), torch.zeros(1, 2, 6, 8)
    cases = [
        (dict(q=q, k=kv, v=kv, pcp_group=group, comm="ring"), r"comm \('ring'\) must be one of \['a2a', 'a2a\+p2p', 'all_gather', 'p2p'\]"),
        (dict(q=q, k=kv, v=kv, pcp_group=None), r"pcp_group \(None\) must be the PCP process group"),
        (dict(q=q[0], k=kv, v=kv, pcp_group=group), r"q must be \[b, hq, 2c, d\] and k, v \[b, hkv, 2c, d\]"),
        (dict(q=q, k=kv, v=kv[:, :1], pcp_group=group), r"k, v \[b, hkv, 2c, d\] of equal shape"),
        (dict(q=q, k=kv[..., :4], v=kv[..., :4], pcp_group=group), r"must agree on batch, local sequence length and head_dim"),
        (dict(q=q[:, :, :5], k=kv[:, :, :5], v=kv[:, :, :5], pcp_group=group), r"local sequence length \(5\) must be even"),
        (dict(q=q[:, :3], k=kv, v=kv, pcp_group=group), r"query heads \(3\) must be a multiple of KV heads \(2\)"),
    ]
    other_rank_only = dist.new_group([1])
    if rank == 0:
        cases.append((dict(q=q, k=kv, v=kv, pcp_group=other_rank_only),
                      r"this rank \(global 0\) is not a member of pcp_group"))
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ring_prefill_attention(**{"scale": 1.0, **kwargs})
    return len(cases)


def test_invalid_inputs_name_the_rule():
    assert run_ranks(2, _invalid_inputs_rank) == [8, 7]
