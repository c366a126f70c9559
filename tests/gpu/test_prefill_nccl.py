"""Context-parallel prefill on CUDA with NCCL, forward and backward, against unsharded float64 attention
(``tests/test_ring_prefill.py``'s reference and error measure, on bf16 inputs): PCP = 1 on one GPU, and
PCP = 2, 4, 8 where there are that many GPUs; ring (p2p), all-gather and Ulysses (a2a); MHA, GQA, MQA;
both block-kernel backends. One spawn per (GPU count, backend) runs every case.

Tolerances are relative to the whole reference's largest magnitude: a rank's bf16 blocks are merged and
their gradients accumulated in float32, so the error is a few bf16 roundings of one block's.
"""
import pytest
import torch
import torch.distributed as dist

from cptoolkit.layers.block_attention import use_backend
from cptoolkit.layers.dual_chunk_swap import padded_length, shard_sequence
from cptoolkit.layers.ring_prefill import ring_prefill_attention
from tests.gpu.devices import BACKENDS, GPU, nccl_world_group, requires_gpus
from tests.multiproc import run_ranks
from tests.test_ring_prefill import _error, _reference_f64

pytestmark = GPU

HEADS = {"MHA": (8, 8), "GQA": (8, 2), "MQA": (8, 1)}
COMMS = ("p2p", "all_gather", "a2a")
SEQ_LENS = (1000, 333)  # padded at the end to a multiple of 2·PCP; only real tokens are compared
HEAD_DIM = 64
TOL = {"out": 2e-2, "dq": 5e-2, "dk": 5e-2, "dv": 5e-2}


def _case(pcp_group, comm, hq, hkv, seed):
    pcp_rank, pcp_size = dist.get_rank(pcp_group), dist.get_world_size(pcp_group)
    gen = torch.Generator().manual_seed(seed)
    seq_len_padded, batch = padded_length(max(SEQ_LENS), pcp_size), len(SEQ_LENS)
    # Drawn on the CPU (the same on every rank) and rounded to bf16 once: the reference sees the kernels' inputs.
    q = torch.randn(batch, hq, seq_len_padded, HEAD_DIM, generator=gen).bfloat16()
    k, v = (torch.randn(batch, hkv, seq_len_padded, HEAD_DIM, generator=gen).bfloat16() for _ in range(2))
    valid = (torch.arange(seq_len_padded) < torch.tensor(SEQ_LENS)[:, None])[:, None, :, None]
    dout = (torch.randn(q.shape, generator=gen) * valid).bfloat16()
    scale = HEAD_DIM ** -0.5
    ref = _reference_f64(q, k, v, dout, SEQ_LENS, scale)

    def local(x):
        return shard_sequence(x, pcp_rank, pcp_size, seq_dim=2)

    q_local, k_local, v_local = (local(t).cuda().requires_grad_() for t in (q, k, v))
    out = ring_prefill_attention(q_local, k_local, v_local, pcp_group=pcp_group, scale=scale, comm=comm)
    out.backward(local(dout).cuda())
    local_valid = local(valid)
    errors = {"out": _error(out.detach().cpu() * local_valid, local(ref["out"]) * local_valid, ref["out"])}
    errors.update({name: _error(t.grad.cpu(), local(ref[name]), ref[name])
                   for name, t in (("dq", q_local), ("dk", k_local), ("dv", v_local))})
    return {"case": f"{comm} hq={hq} hkv={hkv} pcp={pcp_size} pcp_rank={pcp_rank}", "errors": errors}


def _all_cases_rank(rank, world_size, backend):
    group = nccl_world_group(rank, world_size)
    with use_backend(backend):
        return [_case(group, comm, hq, hkv, seed) for comm in COMMS
                for seed, (hq, hkv) in enumerate(HEADS.values())]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_gpus", [pytest.param(n, marks=requires_gpus(n), id=f"{n}gpu") for n in (1, 2, 4, 8)])
def test_prefill_on_nccl_matches_unsharded_float64_attention(num_gpus, backend):
    results = run_ranks(num_gpus, _all_cases_rank, backend, timeout_s=600, collective_timeout_s=300)
    for rank_results in results:
        assert len(rank_results) == len(COMMS) * len(HEADS)
        for result in rank_results:
            for name, err in result["errors"].items():
                assert err["rel"] <= TOL[name], (f"{backend} {result['case']}: {name} relative error {err['rel']:.2e} "
                                                 f"> {TOL[name]:.0e} (max abs {err['max']:.2e}, mean abs {err['mean']:.2e})")
