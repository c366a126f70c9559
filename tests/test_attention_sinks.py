"""Attention sinks (gpt-oss) through every attention path, against float64 softmax-with-sink attention.

Head ``h``'s learned logit ``sink[h]`` joins every query's softmax denominator with a zero value (transformers'
``gpt_oss`` ``eager_attention_forward``): the reference appends it as a score column, takes the softmax and
drops that column, in float64 with autograd. Each case draws random sinks, with every fourth head very negative
(its sink changes nothing), one large (it takes most of the weight) and one huge (it takes all of it).

Covered: prefill (``p2p``, ``all_gather``, ``a2a`` at PCP 2 and 4, ``a2a+p2p`` at PCP 4; PCP 1 through
``CPCoreAttention``) forward and backward, the sinks' own gradient summed over the PCP group as the trainer's
all-reduce sums it; DCP decode (both combines, one and three new tokens, sliding windows) and context attention
(both decode and both prefill comms, a window) at DCP 1, 2 and 4; GQA and MQA; odd lengths. ``sinks=None``
staying bit-identical is the other attention tests' job: they run the same code with no sinks.
"""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from cptoolkit.layers.block_attention import use_backend
from cptoolkit.layers.core_attention import AttentionPhase, AttentionRuntime, CPCoreAttention
from cptoolkit.layers.context_attention import context_attention
from cptoolkit.layers.dcp_decode import ContiguousShardCache, DecodeGroup, dcp_decode_attention
from cptoolkit.layers.dual_chunk_swap import padded_length, shard_positions, shard_sequence
from cptoolkit.layers.hierarchical_prefill import new_hierarchical_groups
from cptoolkit.layers.ring_prefill import ring_prefill_attention
from cptoolkit.layers.sliding_window import LocalAttention
from cptoolkit.layout import ParallelLayout
from cptoolkit.models.tp_sharding import COLUMN, FUSED_QKV, PARAM_KINDS, param_kinds
from tests.multiproc import my_group, run_ranks

HEAD_DIM = 8
SCALE = HEAD_DIM ** -0.5
FWD_RTOL, GRAD_RTOL = 1e-5, 1e-4  # relative to the reference's largest magnitude


def _sinks(num_heads: int, gen: torch.Generator) -> torch.Tensor:
    """Random sinks; heads ``1, 5, ..`` very negative (no effect), ``2, 6, ..`` large, ``3, 7, ..`` huge."""
    sinks = torch.randn(num_heads, generator=gen) * 1.5
    sinks[1::4], sinks[2::4], sinks[3::4] = -1e4, 6.0, 60.0
    return sinks


def _reference(q, k, v, sinks, q_positions, window=None):
    """float64 softmax-with-sink attention: ``q [hq, sq, d]`` at positions ``q_positions [sq]`` over ``k``, ``v
    [hkv, sk, d]`` at positions ``0 .. sk-1`` (GQA by repetition), causal, over the ``window`` latest positions;
    ``sinks [hq]``. Differentiable in all four when they are float64 leaves."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(groups, 0), v.double().repeat_interleave(groups, 0)
    scores = q.double() @ k.transpose(1, 2) * SCALE
    distance = q_positions[:, None] - torch.arange(k.shape[1])[None, :]
    seen = distance >= 0
    if window is not None:
        seen &= distance < window
    sink_column = sinks.double()[:, None, None].expand(-1, q.shape[1], 1)
    probs = torch.softmax(torch.cat([scores.masked_fill(~seen, float("-inf")), sink_column], dim=-1), dim=-1)
    return probs[..., :-1] @ v


def _error(got: torch.Tensor, want: torch.Tensor, want_full: torch.Tensor) -> dict:
    """A local result's error, relative to the whole reference's largest magnitude."""
    diff = (got.detach().double() - want.detach()).abs()
    return {"rel": float(diff.max() / want_full.detach().abs().max()), "max": float(diff.max()), "mean": float(diff.mean())}


def _assert_within(where: str, name: str, err: dict, rtol: float) -> None:
    assert err["rel"] <= rtol, (f"{where}: {name} relative error {err['rel']:.2e} > {rtol:.0e} "
                                f"(max abs {err['max']:.2e}, mean abs {err['mean']:.2e})")


# ---------------------------------------------------------------- prefill: ring, all-gather, a2a, a2a+p2p

SEQ_LENS = (13, 6)
PREFILL_HEADS = ((4, 2), (4, 1))  # (query heads, KV heads): GQA, MQA
PREFILL_WINDOWS = (None, 3)


def _prefill_reference(q, k, v, sinks, dout, window):
    """Per-sequence float64 results laid out like the padded inputs (zeros at padding), and ``dsinks [hq]``
    summed over the batch."""
    ref = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in (("out", q), ("dq", q), ("dk", k),
                                                                             ("dv", v))}
    sinks = sinks.double().requires_grad_()
    for i, n in enumerate(SEQ_LENS):
        qi, ki, vi = (t[i, :, :n].double().requires_grad_() for t in (q, k, v))
        out = _reference(qi, ki, vi, sinks, torch.arange(n), window)
        (out * dout[i, :, :n].double()).sum().backward()
        for name, value in (("out", out), ("dq", qi.grad), ("dk", ki.grad), ("dv", vi.grad)):
            ref[name][i, :, :n] = value.detach()
    ref["dsinks"] = sinks.grad
    return ref


def _prefill_case(pcp_group, comm, hcp_groups, hq, hkv, window, seed):
    """One forward + backward with sinks on this rank's DualChunkSwap shard; returns its errors."""
    pcp_rank, pcp_size = dist.get_rank(pcp_group), dist.get_world_size(pcp_group)
    gen = torch.Generator().manual_seed(seed)
    seq_len_padded = padded_length(max(SEQ_LENS), pcp_size)
    q = torch.randn(len(SEQ_LENS), hq, seq_len_padded, HEAD_DIM, generator=gen)
    k, v = (torch.randn(len(SEQ_LENS), hkv, seq_len_padded, HEAD_DIM, generator=gen) for _ in range(2))
    sinks = _sinks(hq, gen)
    valid = (torch.arange(seq_len_padded) < torch.tensor(SEQ_LENS)[:, None])[:, None, :, None]
    dout = torch.randn(q.shape, generator=gen) * valid
    ref = _prefill_reference(q, k, v, sinks, dout, window)

    def local(x):
        return shard_sequence(x, pcp_rank, pcp_size, seq_dim=2)

    q_local, k_local, v_local = (local(t).requires_grad_() for t in (q, k, v))
    sinks_local = sinks.clone().requires_grad_()
    out = ring_prefill_attention(q_local, k_local, v_local, pcp_group=pcp_group, scale=SCALE, comm=comm,
                                 hcp_groups=hcp_groups, window=window, sinks=sinks_local)
    out.backward(local(dout))
    dsinks = sinks_local.grad.clone()
    dist.all_reduce(dsinks, group=pcp_group)  # each rank holds its share, as the trainer's all-reduce sums them
    local_valid = local(valid)
    return {
        "where": f"{comm} pcp={pcp_size} pcp_rank={pcp_rank} hq={hq} hkv={hkv} window={window}",
        "out": _error(out.detach() * local_valid, local(ref["out"]) * local_valid, ref["out"]),
        **{name: _error(t.grad, local(ref[name]), ref[name])
           for name, t in (("dq", q_local), ("dk", k_local), ("dv", v_local))},
        "dsinks": _error(dsinks, ref["dsinks"], ref["dsinks"]),
    }


def _prefill_rank(rank, world_size):
    """Every comm, head layout and window on the whole world as one PCP group (a2a+p2p as 2 x 2), then on
    two PCP groups of 2 (laid out as in parallel_state)."""
    results = []
    for pcp_size in (world_size, world_size // 2):
        tp_size = world_size // pcp_size
        pcp_group = my_group([[p * tp_size + t for p in range(pcp_size)] for t in range(tp_size)])
        comms = [("p2p", None), ("all_gather", None), ("a2a", None)]
        if pcp_size == 4:
            comms.append(("a2a+p2p", new_hierarchical_groups(pcp_group, 2)))
        for seed, ((comm, hcp_groups), (hq, hkv), window) in enumerate(
                itertools.product(comms, PREFILL_HEADS, PREFILL_WINDOWS)):
            results.append(_prefill_case(pcp_group, comm, hcp_groups, hq, hkv, window, seed))
    return results


def test_prefill_with_sinks_matches_float64_forward_and_backward_at_pcp_2_and_4():
    results = [r for rank_results in run_ranks(4, _prefill_rank, timeout_s=120) for r in rank_results]
    assert len(results) == 4 * (4 + 3) * len(PREFILL_HEADS) * len(PREFILL_WINDOWS)
    for result in results:
        for name, rtol in (("out", FWD_RTOL), ("dq", GRAD_RTOL), ("dk", GRAD_RTOL), ("dv", GRAD_RTOL),
                           ("dsinks", GRAD_RTOL)):
            _assert_within(result["where"], name, result[name], rtol)


# ---------------------------------------------------------------- PCP = 1: CPCoreAttention and LocalAttention

def _config(num_heads, num_kv_heads, window=None, **kwargs):
    window_fields = {} if window is None else {"window_size": (window - 1, 0)}
    return TransformerConfig(num_layers=1, hidden_size=num_heads * HEAD_DIM, num_attention_heads=num_heads,
                             num_query_groups=num_kv_heads, kv_channels=HEAD_DIM, attention_dropout=0.0,
                             use_cpu_initialization=True,
                             **window_fields, **kwargs)


def _attention(config, runtime, **kwargs):
    return CPCoreAttention(config, 1, AttnMaskType.causal, "self", runtime=runtime, attention_sinks=True, **kwargs)


@pytest.mark.parametrize("num_heads,num_kv_heads,window", [(8, 2, None), (4, 1, 5)])
def test_pcp1_prefill_with_sinks_through_core_attention_forward_and_backward(num_heads, num_kv_heads, window):
    gen = torch.Generator().manual_seed(num_heads)
    attention = _attention(_config(num_heads, num_kv_heads, window), AttentionRuntime())
    with torch.no_grad():
        attention.sinks.copy_(_sinks(num_heads, gen))
    seq_len, batch = 13, 2
    q = torch.randn(seq_len, batch, num_heads, HEAD_DIM, generator=gen, requires_grad=True)
    k, v = (torch.randn(seq_len, batch, num_kv_heads, HEAD_DIM, generator=gen, requires_grad=True) for _ in range(2))
    out = attention(q, k, v, None)
    grad_out = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (q, k, v, attention.sinks), grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, attention.sinks)]
    q64, k64, v64 = (t.permute(1, 2, 0, 3) for t in leaves[:3])  # [s, b, h, d] -> [b, h, s, d]
    want = torch.stack([_reference(q64[i], k64[i], v64[i], leaves[3], torch.arange(seq_len), window)
                        for i in range(batch)]).permute(2, 0, 1, 3).reshape(seq_len, batch, -1)
    wanted = torch.autograd.grad(want, leaves, grad_out.double())
    _assert_within("PCP 1 out", "out", _error(out.detach(), want.detach(), want), FWD_RTOL)
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got, wanted):
        _assert_within("PCP 1", name, _error(g, w, w), GRAD_RTOL)


@pytest.mark.parametrize("window", [None, 4])
def test_very_negative_sinks_change_nothing_and_huge_ones_take_all_the_weight(window):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 11, HEAD_DIM, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 11, HEAD_DIM, generator=gen, requires_grad=True) for _ in range(2))
    dout = torch.randn(q.shape, generator=gen)

    def run(sinks):
        out = LocalAttention.apply(q, k, v, SCALE, window, None, None, sinks)
        return out, torch.autograd.grad(out, (q, k, v), dout)

    plain, plain_grads = run(None)
    negative = torch.full((4,), -1e4, requires_grad=True)
    with_sinks, grads = run(negative)
    assert torch.equal(with_sinks, plain)
    assert all(torch.equal(g, p) for g, p in zip(grads, plain_grads))
    huge = torch.full((4,), 1e4)
    assert LocalAttention.apply(q, k, v, SCALE, window, None, None, huge).eq(0).all()


# ---------------------------------------------------------------- DCP decode

NUM_HEADS = 8
PREFIX_LENS = torch.tensor([0, 5, 12])  # request 0 starts empty: most shards hold none of it at first
MAX_SEQ_LEN = 20
# (new tokens per sequence, window): one token, speculative verification of 3, each with a window shorter
# than a shard turn at DCP 4 and one longer.
DECODE_STEPS = ((1, None), (3, None), (1, 2), (3, 5))


def _decode_case(rank, layout, dg, num_kv_heads, comm, num_new, window, seed):
    """One decode step of ``num_new`` tokens per request with sinks; returns the worst error of this rank."""
    tp = rank % layout[0]
    heads = ParallelLayout(*layout, NUM_HEADS, num_kv_heads)
    q_heads, kv_heads, group_kv_heads = (list(heads.q_heads_of(tp)), list(heads.kv_heads_of(tp)),
                                         list(heads.dcp_kv_heads_of(tp)))
    gen = torch.Generator().manual_seed(seed)
    batch = len(PREFIX_LENS)
    q = torch.randn(batch, NUM_HEADS, num_new, HEAD_DIM, generator=gen)
    k_all, v_all = (torch.randn(batch, num_kv_heads, MAX_SEQ_LEN, HEAD_DIM, generator=gen) for _ in range(2))
    sinks = _sinks(NUM_HEADS, gen)
    cache = ContiguousShardCache(MAX_SEQ_LEN, batch, len(group_kv_heads), HEAD_DIM, dg)
    cache.write_prefix(k_all[:, group_kv_heads], v_all[:, group_kv_heads], PREFIX_LENS)
    positions = PREFIX_LENS[:, None] + torch.arange(num_new)  # [b, L]
    rows = torch.arange(batch)[:, None]
    k_new, v_new = (t[rows, :, positions].transpose(1, 2) for t in (k_all, v_all))  # [b, hkv, L, d]
    out = dcp_decode_attention(q[:, q_heads], k_new[:, kv_heads], v_new[:, kv_heads], cache,
                               positions if num_new > 1 else positions[:, 0], dg, comm, SCALE, window=window,
                               sinks=sinks[q_heads])
    where = f"rank {rank} TPxPCPxDCP={layout} kv_heads={num_kv_heads} {comm} L={num_new} window={window}"
    worst = 0.0
    for request in range(batch):
        length = int(positions[request, -1]) + 1
        want = _reference(q[request], k_all[request, :, :length], v_all[request, :, :length], sinks,
                          positions[request], window)[q_heads]
        err = _error(out[request], want, want)
        _assert_within(f"{where} request {request}", "out", err, FWD_RTOL)
        worst = max(worst, err["rel"])
    return worst


DECODE_LAYOUTS = ((2, 2, 4), (1, 4, 4), (2, 2, 2), (4, 1, 2))  # (TP, PCP, DCP): k = 2, 1, 1, 2


def _decode_rank(rank, world_size):
    """Returns ``(cases, worst relative error)`` of this rank."""
    cases, worst = 0, 0.0
    for layout_index, layout in enumerate(DECODE_LAYOUTS):
        tp_size, pcp_size, dcp_size = layout
        group = my_group(ParallelLayout(*layout, NUM_HEADS, 1).dcp_groups)
        for case, (num_kv_heads, comm, (num_new, window)) in enumerate(
                itertools.product((2, 1), ("ag_rs", "a2a"), DECODE_STEPS)):
            replication = ParallelLayout(*layout, NUM_HEADS, num_kv_heads).kv_head_replication
            dg = DecodeGroup.from_group(group, dcp_size // pcp_size, pcp_size, 2, replication)
            error = _decode_case(rank, layout, dg, num_kv_heads, comm, num_new, window, 100 * layout_index + case)
            cases, worst = cases + 1, max(worst, error)
    return cases, worst


def test_dcp_decode_with_sinks_matches_float64_at_dcp_2_and_4():
    for rank, (cases, worst) in enumerate(run_ranks(4, _decode_rank, timeout_s=120)):
        assert cases == len(DECODE_LAYOUTS) * 2 * 2 * len(DECODE_STEPS) and worst <= FWD_RTOL, \
            f"rank {rank}: {cases} cases, worst relative error {worst:.2e}"


# ---------------------------------------------------------------- context attention (prefill over a history)

HISTORY_LENS = torch.tensor([13, 0, 7])  # request 1 has no history
CHUNK_LENS = (11, 9, 5)
# (KV heads, decode comm, prefill comm, window)
CONTEXT_CASES = [(2, "a2a", "p2p", None), (1, "ag_rs", "all_gather", None), (2, "ag_rs", "p2p", 3),
                 (1, "a2a", "all_gather", 3)]


def _context_case(rank, layout, dg, pcp_group, num_kv_heads, decode_comm, prefill_comm, window, seed):
    tp_size, pcp_size, _ = layout
    tp, pcp_rank = rank % tp_size, rank // tp_size
    heads = ParallelLayout(*layout, NUM_HEADS, num_kv_heads)
    q_heads, kv_heads, group_kv_heads = (list(heads.q_heads_of(tp)), list(heads.kv_heads_of(tp)),
                                         list(heads.dcp_kv_heads_of(tp)))
    batch, chunk_len_padded = len(HISTORY_LENS), padded_length(max(CHUNK_LENS), pcp_size)
    total = int(HISTORY_LENS.max()) + chunk_len_padded
    gen = torch.Generator().manual_seed(seed)
    q_all = torch.randn(batch, NUM_HEADS, total, HEAD_DIM, generator=gen)
    k_all, v_all = (torch.randn(batch, num_kv_heads, total, HEAD_DIM, generator=gen) for _ in range(2))
    sinks = _sinks(NUM_HEADS, gen)
    cache = ContiguousShardCache(total, batch, len(group_kv_heads), HEAD_DIM, dg)
    cache.write_prefix(k_all[:, group_kv_heads], v_all[:, group_kv_heads], HISTORY_LENS)

    def chunk_shard(x, head_ids):
        chunk = torch.stack([x[i, head_ids, h:h + chunk_len_padded] for i, h in enumerate(HISTORY_LENS.tolist())])
        return shard_sequence(chunk, pcp_rank, pcp_size, seq_dim=2)

    out = context_attention(chunk_shard(q_all, q_heads), chunk_shard(k_all, kv_heads), chunk_shard(v_all, kv_heads),
                            cache, HISTORY_LENS, dg, pcp_group, prefill_comm, decode_comm, SCALE, window=window,
                            sinks=sinks[q_heads])
    where = f"rank {rank} TPxPCPxDCP={layout} kv_heads={num_kv_heads} {decode_comm} {prefill_comm} window={window}"
    positions, worst = shard_positions(chunk_len_padded, pcp_rank, pcp_size), 0.0
    for request, (history, chunk) in enumerate(zip(HISTORY_LENS.tolist(), CHUNK_LENS)):
        real = positions < chunk
        if not real.any():  # this PCP rank holds only padding of this request's chunk
            continue
        seq = history + chunk
        want = _reference(q_all[request, :, :seq], k_all[request, :, :seq], v_all[request, :, :seq], sinks,
                          torch.arange(seq), window)[q_heads][:, history + positions[real]]
        err = _error(out[request][:, real], want, want)
        _assert_within(f"{where} request {request}", "out", err, FWD_RTOL)
        worst = max(worst, err["rel"])
    return worst


CONTEXT_LAYOUTS = ((2, 2, 4), (1, 4, 4), (2, 2, 2), (4, 1, 2))


def _context_rank(rank, world_size):
    cases, worst = 0, 0.0
    for layout_index, layout in enumerate(CONTEXT_LAYOUTS):
        tp_size, pcp_size, dcp_size = layout
        groups = ParallelLayout(*layout, NUM_HEADS, 1)
        dcp_group, pcp_group = my_group(groups.dcp_groups), my_group(groups.pcp_groups)
        for case, (num_kv_heads, *comms, window) in enumerate(CONTEXT_CASES):
            replication = ParallelLayout(*layout, NUM_HEADS, num_kv_heads).kv_head_replication
            dg = DecodeGroup.from_group(dcp_group, dcp_size // pcp_size, pcp_size, 1, replication)
            error = _context_case(rank, layout, dg, pcp_group if pcp_size > 1 else None, num_kv_heads, *comms, window,
                                  100 * layout_index + case)
            cases, worst = cases + 1, max(worst, error)
    return cases, worst


def test_context_attention_with_sinks_matches_float64_at_dcp_2_and_4():
    for rank, (cases, worst) in enumerate(run_ranks(4, _context_rank, timeout_s=120)):
        assert cases == len(CONTEXT_LAYOUTS) * len(CONTEXT_CASES) and worst <= FWD_RTOL, \
            f"rank {rank}: {cases} cases, worst relative error {worst:.2e}"


# ---------------------------------------------------------------- DCP = 1 through CPCoreAttention

def test_dcp1_decode_and_history_prefill_with_sinks_through_core_attention():
    """One rank: a prefill chunk over a cached history (context attention), then two speculative tokens and
    one plain decode token (DCP decode), every phase with the module's sinks."""
    gen = torch.Generator().manual_seed(5)
    num_heads, num_kv_heads, history, chunk, total = 8, 2, 5, 6, 16
    dg = DecodeGroup(None, dcp_rank=0, dcp_size=1, tp_positions=1, pcp_size=1)
    attention = _attention(_config(num_heads, num_kv_heads), AttentionRuntime(decode_group=dg))
    with torch.no_grad():
        attention.sinks.copy_(_sinks(num_heads, gen))
    q = torch.randn(total, 1, num_heads, HEAD_DIM, generator=gen)
    k, v = (torch.randn(total, 1, num_kv_heads, HEAD_DIM, generator=gen) for _ in range(2))
    cache = ContiguousShardCache(total, 1, num_kv_heads, HEAD_DIM, dg)
    cache.write_prefix(k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), torch.tensor([history + chunk]))
    want = _reference(q[:, 0].transpose(0, 1), k[:, 0].transpose(0, 1), v[:, 0].transpose(0, 1),
                      attention.sinks.detach(), torch.arange(total))  # [h, s, d]
    runtime, end = attention.runtime, history + chunk
    phases = [(slice(history, end), AttentionPhase(kv_caches={1: cache}, history_lens=torch.tensor([history]))),
              (slice(end, end + 2), AttentionPhase("decode", {1: cache}, torch.tensor([[end, end + 1]]))),
              (slice(end + 2, end + 3), AttentionPhase("decode", {1: cache}, torch.tensor([end + 2])))]
    for rows, phase in phases:
        with runtime.use_phase(phase), torch.no_grad():
            out = attention(q[rows], k[rows], v[rows], None)  # [s, 1, h*d]
        got = out.view(-1, num_heads, HEAD_DIM).transpose(0, 1)
        _assert_within(f"{phase.mode} rows {rows}", "out", _error(got, want[:, rows], want[:, rows]), FWD_RTOL)


# ---------------------------------------------------------------- the parameter, its TP split, its rules

def test_sinks_parameter_is_this_tp_ranks_heads_in_params_dtype():
    runtime = AttentionRuntime()
    config = _config(8, 2, tensor_model_parallel_size=2, params_dtype=torch.bfloat16, perform_initialization=False)
    sinks = _attention(config, runtime).sinks
    assert isinstance(sinks, torch.nn.Parameter) and sinks.shape == (4,) and sinks.dtype == torch.bfloat16
    assert sinks.eq(0).all()  # no megatron initialization asked for: the model builder loads the values
    drawn = _attention(_config(8, 2, perform_initialization=True, init_method=lambda t: t.fill_(0.5)), runtime).sinks
    assert drawn.eq(0.5).all()
    assert CPCoreAttention(_config(8, 2), 1, AttnMaskType.causal, "self", runtime=runtime).sinks is None


def test_sinks_split_over_tp_like_the_fused_qkv_query_heads():
    """PARAM_KINDS's column split gives each TP rank the sinks of exactly the query heads (in order) whose
    rows FUSED_QKV gives it, with KV heads split or replicated."""
    holder = torch.nn.Module()
    holder.core_attention = _attention(_config(8, 2), AttentionRuntime())
    assert param_kinds(holder)["core_attention.sinks"] is COLUMN is PARAM_KINDS[(CPCoreAttention, "sinks")]
    for num_heads, num_kv_heads, tp_size in ((8, 2, 2), (8, 2, 4), (8, 8, 4), (6, 1, 3), (12, 4, 2)):
        shape = SimpleNamespace(num_attention_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=1)
        group_size = num_heads // num_kv_heads
        # Fused rows (head_dim 1): per KV group its query heads, then k, then v; -1 marks the k/v rows.
        row_heads = torch.tensor([g * group_size + j if j < group_size else -1
                                  for g in range(num_kv_heads) for j in range(group_size + 2)])
        for tp_rank in range(tp_size):
            qkv = FUSED_QKV.select((len(row_heads),), shape, tp_rank, tp_size)
            qkv_heads = torch.cat([row_heads[start:stop] for start, stop in qkv.ranges])
            sink = COLUMN.select((num_heads,), shape, tp_rank, tp_size)
            sink_heads = torch.cat([torch.arange(start, stop) for start, stop in sink.ranges])
            assert sink_heads.tolist() == qkv_heads[qkv_heads >= 0].tolist(), (num_heads, num_kv_heads, tp_rank)


def test_bad_sinks_are_rejected_before_any_work():
    q = torch.zeros(1, 4, 6, HEAD_DIM)
    with pytest.raises(ValueError, match=r"sinks of shape \(3,\) must be \[4\]: one learned logit per query head"):
        LocalAttention.apply(q, q[:, :2], q[:, :2], SCALE, None, None, None, torch.zeros(3))
    rule = r"attention backend 'te' \(TransformerEngine\) does not support attention sinks; rule: sinks run"
    with use_backend("te"):
        with pytest.raises(ValueError, match=rule):
            _attention(_config(4, 2), AttentionRuntime())
        with pytest.raises(ValueError, match=rule):
            LocalAttention.apply(q, q[:, :2], q[:, :2], SCALE, None, None, None, torch.zeros(4))
        dg = DecodeGroup(None, dcp_rank=0, dcp_size=1, tp_positions=1, pcp_size=1)
        with pytest.raises(ValueError, match=rule):
            dcp_decode_attention(q[:, :, :1], q[:, :2, :1], q[:, :2, :1], None, torch.tensor([0]), dg, "a2a", SCALE,
                                 sinks=torch.zeros(4))
