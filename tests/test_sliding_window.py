"""Sliding-window (and softcapped) prefill attention against unsharded float64 attention, forward and backward.

Every prefill comm (``p2p``, ``all_gather``, ``a2a``, ``a2a+p2p``) at PCP 1, 2, 4 and 8, GQA and MQA, windows
shorter than a chunk, about a shard, and longer than the sequence (then nothing is masked), one softcapped
case, a batch whose lengths are not multiples of 2·PCP. The skipped work is counted, not only masked:
``CommStats.tiles`` must report exactly the chunk tiles that lie wholly outside the window as skipped.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cptoolkit.layers.block_attention import block_coverage
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.dual_chunk_swap import padded_length, shard_sequence
from cptoolkit.layers.hierarchical_prefill import new_hierarchical_groups
from cptoolkit.layers.ring_prefill import ring_prefill_attention
from cptoolkit.layers.sliding_window import LocalAttention, sequence_tiles
from tests.multiproc import run_ranks

SEQ_LENS = (37, 20)
HEAD_DIM = 8
# (query heads, KV heads, window, softcap)
CASES = ((8, 2, 3, None), (8, 1, 11, None), (8, 2, 64, None), (8, 2, 7, 2.0))
FWD_RTOL, GRAD_RTOL = 1e-5, 1e-4


def reference_f64(q, k, v, dout, seq_lens, scale, window, softcap):
    """Per-sequence causal attention over the ``window`` latest positions in float64 with autograd, laid
    out like the padded inputs with zeros at padding."""
    ref = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in
           (("out", q), ("dq", q), ("dk", k), ("dv", v))}
    groups = q.shape[1] // k.shape[1]
    for i, n in enumerate(seq_lens):
        qi, ki, vi = (t[i, :, :n].double().requires_grad_() for t in (q, k, v))
        scores = qi @ ki.repeat_interleave(groups, 0).transpose(-1, -2) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        scores = scores.masked_fill((distance < 0) | (distance >= window), float("-inf"))
        out = torch.softmax(scores, dim=-1) @ vi.repeat_interleave(groups, 0)
        (out * dout[i, :, :n].double()).sum().backward()
        for name, value in (("out", out), ("dq", qi.grad), ("dk", ki.grad), ("dv", vi.grad)):
            ref[name][i, :, :n] = value.detach()
    return ref


def _error(got, want, want_full):
    diff = (got.double() - want).abs()
    return {"rel": float(diff.max() / want_full.abs().max()), "max": float(diff.max())}


def expected_skipped_tiles(comm, pcp_rank, pcp_size, a2a_size, chunk_len, window):
    """The tiles of this rank's forward a window cannot see, counted independently of the planner."""
    if window >= 2 * pcp_size * chunk_len:
        return 0
    if comm == "a2a":  # whole sequence in c-tiles, every rank
        return sequence_tiles(2 * pcp_size * chunk_len, chunk_len, window)[1]
    ring_size, tile = (pcp_size // a2a_size, a2a_size * chunk_len) if comm == "a2a+p2p" else (pcp_size, chunk_len)
    ring_rank = pcp_rank // a2a_size if comm == "a2a+p2p" else pcp_rank
    if window >= 2 * ring_size * tile:
        return 0
    mine = (ring_rank, 2 * ring_size - 1 - ring_rank)
    return sum(block_coverage(tile, tile, offset=(i - j) * tile, causal=True, window=window) == "none"
               for i in mine for j in range(2 * ring_size) if j <= i)


def _run_case(pcp_group, comm, hcp_groups, hq, hkv, window, softcap, seed):
    pcp_rank, pcp_size = dist.get_rank(pcp_group), dist.get_world_size(pcp_group)
    gen = torch.Generator().manual_seed(seed)
    seq_len_padded = padded_length(max(SEQ_LENS), pcp_size)
    q = torch.randn(len(SEQ_LENS), hq, seq_len_padded, HEAD_DIM, generator=gen)
    k, v = (torch.randn(len(SEQ_LENS), hkv, seq_len_padded, HEAD_DIM, generator=gen) for _ in range(2))
    valid = (torch.arange(seq_len_padded) < torch.tensor(SEQ_LENS)[:, None])[:, None, :, None]
    dout = torch.randn(q.shape, generator=gen) * valid
    scale = HEAD_DIM ** -0.5
    ref = reference_f64(q, k, v, dout, SEQ_LENS, scale, window, softcap)

    def local(x):
        return shard_sequence(x, pcp_rank, pcp_size, seq_dim=2)

    q_local, k_local, v_local = (local(t).requires_grad_() for t in (q, k, v))
    stats = CommStats()
    if pcp_size == 1:
        out = LocalAttention.apply(q_local, k_local, v_local, scale, window, softcap, stats)
    else:
        out = ring_prefill_attention(q_local, k_local, v_local, pcp_group=pcp_group, scale=scale, comm=comm,
                                     stats=stats, hcp_groups=hcp_groups, window=window, softcap=softcap)
    skipped = stats.tiles["skipped"]
    out.backward(local(dout))
    a2a_size = hcp_groups.a2a_size if hcp_groups is not None else pcp_size
    want_skipped = (sequence_tiles(seq_len_padded, window, window)[1] if pcp_size == 1 and window < seq_len_padded
                    else 0 if pcp_size == 1 else
                    expected_skipped_tiles(comm, pcp_rank, pcp_size, a2a_size, seq_len_padded // (2 * pcp_size), window))
    return {"case": f"{comm} pcp={pcp_size} hq={hq} hkv={hkv} window={window} softcap={softcap} rank={pcp_rank}",
            "out": _error(out.detach() * local(valid), local(ref["out"]) * local(valid), ref["out"]),
            **{name: _error(t.grad, local(ref[name]), ref[name])
               for name, t in (("dq", q_local), ("dk", k_local), ("dv", v_local))},
            "skipped": skipped, "want_skipped": want_skipped}


def _rank(rank, world_size, comms):
    world = dist.new_group(list(range(world_size)))
    hcp = new_hierarchical_groups(world, 2) if "a2a+p2p" in comms else None
    return [_run_case(world, comm, hcp if comm == "a2a+p2p" else None, *case, seed)
            for comm in comms for seed, case in enumerate(CASES)]


@pytest.mark.parametrize("world_size, comms", [(1, ("local",)), (2, ("p2p", "all_gather", "a2a")),
                                               (4, ("p2p", "all_gather", "a2a", "a2a+p2p")),
                                               (8, ("p2p", "all_gather", "a2a+p2p"))])
def test_windowed_prefill_matches_float64_attention(world_size, comms):
    results = [r for rank_results in run_ranks(world_size, _rank, comms, timeout_s=300) for r in rank_results]
    assert len(results) == world_size * len(comms) * len(CASES)
    for result in results:
        for name, rtol in (("out", FWD_RTOL), ("dq", GRAD_RTOL), ("dk", GRAD_RTOL), ("dv", GRAD_RTOL)):
            assert result[name]["rel"] <= rtol, (f"{result['case']}: {name} relative error {result[name]['rel']:.2e} "
                                                 f"> {rtol:.0e} (max abs {result[name]['max']:.2e})")
        assert result["skipped"] == result["want_skipped"], (
            f"{result['case']}: {result['skipped']} tiles skipped, {result['want_skipped']} lie outside the window")
    assert any(result["skipped"] for result in results), "no case skipped a tile: the windows are too long"


@pytest.mark.parametrize("sq, sk, offset, window", [(40, 40, 0, 3), (37, 29, 11, 5), (33, 48, -6, 4), (30, 30, 30, 7)])
def test_a_block_much_wider_than_its_window_is_computed_band_by_band(sq, sk, offset, window):
    """One block kernel call (what each ring step runs) with a window far narrower than the block: forward and
    backward against float64 masked attention, rows that see no key included."""
    from cptoolkit.layers.block_attention import attention_backward, attention_forward

    gen = torch.Generator().manual_seed(sq + sk + offset)
    q, dout = (torch.randn(2, 4, sq, HEAD_DIM, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, 2, sk, HEAD_DIM, generator=gen) for _ in range(2))
    scale = HEAD_DIM ** -0.5
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    scores = qd @ kd.repeat_interleave(2, 1).transpose(-1, -2) * scale
    distance = torch.arange(sq)[:, None] + offset - torch.arange(sk)[None, :]
    seen = (distance >= 0) & (distance < window)
    weights = torch.nan_to_num(torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1), nan=0.0)
    want = weights @ vd.repeat_interleave(2, 1)
    (want * dout.double()).sum().backward()
    out, lse = attention_forward(q, k, v, causal=True, scale=scale, offset=offset, window=window)
    assert (out.double() - want).abs().max() < 1e-5
    assert torch.isinf(lse[:, :, ~seen.any(1)]).all() and torch.isfinite(lse[:, :, seen.any(1)]).all()
    # A ring passes the rows' merged lse, finite (every row of a sequence sees itself in some block).
    lse = lse.masked_fill(torch.isinf(lse), 0.0)
    grads = attention_backward(dout, q, k, v, out, lse, causal=True, scale=scale, offset=offset, window=window)
    for got, ref in zip(grads, (qd.grad, kd.grad, vd.grad)):
        assert (got.double() - ref).abs().max() < 1e-4 * ref.abs().max()
