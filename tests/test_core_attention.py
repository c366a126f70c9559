"""CPCoreAttention: megatron's core_attention interface, exact causal attention at PCP = DCP = 1, the
drop-in path's rules (megatron's arguments only), and packed (THD) sequences at PCP 1, 2 and 4.

The PCP = DCP = 1 tests run in-process (no collective). PCP > 1 and DCP > 1 through this module are
covered end to end in test_gpt_model.py (cptoolkit's runtime) and test_megatron_dropin.py (a stock
megatron GPTModel); the THD test spawns 4 ranks once.
"""
import dataclasses
import inspect

import pytest
import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from cptoolkit.layers.core_attention import (PREFILL, AttentionPhase, AttentionRuntime, CPCoreAttention,
                                             get_gpt_layer_spec, layer_comm_type)
from cptoolkit.layers.dual_chunk_swap import padded_length, shard_sequence
from tests.multiproc import run_ranks
from tests.test_ring_prefill import _reference_f64


def _config(num_heads=8, num_kv_heads=2, head_dim=8, attention_dropout=0.0):
    return TransformerConfig(num_layers=1, hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
                             num_query_groups=num_kv_heads, kv_channels=head_dim,
                             attention_dropout=attention_dropout, use_cpu_initialization=True)


def _attention(runtime, config=None, **kwargs):
    return CPCoreAttention(config or _config(), 1, AttnMaskType.causal, "self", runtime=runtime, **kwargs)


def _reference(q, k, v, scale):
    """float64 softmax attention with a causal mask; ``[s, b, h, d]`` in, ``[s, b, hq*d]`` out."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scale
    seq_len = q.shape[2]
    scores = scores.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.permute(2, 0, 1, 3).reshape(seq_len, q.shape[0], -1)


def test_constructor_and_forward_signatures_match_megatron_dot_product_attention():
    ours = inspect.signature(CPCoreAttention.__init__).parameters
    theirs = inspect.signature(DotProductAttention.__init__).parameters
    extensions = {"runtime": None, "softcap": None, "attention_sinks": False}
    assert [name for name in ours if name not in extensions] == list(theirs)
    for name, param in theirs.items():
        assert ours[name].kind == param.kind and ours[name].default == param.default, name
    # megatron never passes runtime, softcap (an attention-logit cap, Gemma's) or attention_sinks (gpt-oss's): the
    # drop-in builds a runtime from megatron's own arguments, caps nothing and has no sinks.
    for name, default in extensions.items():
        assert ours[name].kind == inspect.Parameter.KEYWORD_ONLY and ours[name].default is default, name
    assert (list(inspect.signature(CPCoreAttention.forward).parameters)
            == list(inspect.signature(DotProductAttention.forward).parameters))


@pytest.mark.parametrize("num_heads,num_kv_heads,seq_len,batch", [(8, 2, 13, 2), (4, 4, 7, 1), (6, 1, 16, 3)])
def test_pcp1_prefill_equals_float64_causal_attention_forward_and_backward(num_heads, num_kv_heads, seq_len, batch):
    torch.manual_seed(seq_len)
    head_dim = 8
    attention = _attention(AttentionRuntime(), _config(num_heads, num_kv_heads, head_dim))
    q = torch.randn(seq_len, batch, num_heads, head_dim, requires_grad=True)
    k = torch.randn(seq_len, batch, num_kv_heads, head_dim, requires_grad=True)
    v = torch.randn(seq_len, batch, num_kv_heads, head_dim, requires_grad=True)
    out = attention(q, k, v, None)
    want = _reference(q, k, v, head_dim ** -0.5)
    assert out.shape == (seq_len, batch, num_heads * head_dim)
    diff = (out.double() - want).abs()
    assert diff.max() < 1e-5, f"forward: max {diff.max():.3g}, mean {diff.mean():.3g}"
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    wanted = torch.autograd.grad(want, (q, k, v), grad_out.double())
    for name, g, w in zip("qkv", got, wanted):
        diff = (g.double() - w).abs()
        assert diff.max() < 1e-5, f"d{name}: max {diff.max():.3g}, mean {diff.mean():.3g}"


def test_prefill_hook_receives_this_layers_kv_in_bhsd_layout():
    seen = []
    runtime = AttentionRuntime()
    attention = CPCoreAttention(_config(), 3, AttnMaskType.causal, "self", runtime=runtime)
    k = torch.randn(5, 2, 2, 8)
    with runtime.use_phase(AttentionPhase(on_prefill_kv=lambda layer, k, v: seen.append((layer, k, v)))):
        attention(torch.randn(5, 2, 8, 8), k, k + 1, None)
    assert runtime.phase is PREFILL
    (layer, k_seen, v_seen), = seen
    assert layer == 3 and k_seen.shape == (2, 2, 5, 8)
    assert torch.equal(k_seen, k.permute(1, 2, 0, 3)) and torch.equal(v_seen, k_seen + 1)


def test_softmax_scale_override_is_used():
    attention = _attention(AttentionRuntime(), softmax_scale=0.5)
    q, k = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 2, 8)
    diff = (attention(q, k, k, None).double() - _reference(q, k, k, 0.5)).abs()
    assert diff.max() < 1e-5, f"max {diff.max():.3g}, mean {diff.mean():.3g}"


def test_invalid_uses_raise_value_errors():
    with pytest.raises(ValueError, match=r"attention_dropout=0.1 .* must be 0.0"):
        _attention(AttentionRuntime(), _config(attention_dropout=0.1))
    with pytest.raises(ValueError, match=r"attention_type='cross'.*causal self-attention only"):
        CPCoreAttention(_config(), 1, AttnMaskType.causal, "cross", runtime=AttentionRuntime())
    with pytest.raises(ValueError, match=r"attn_mask_type=AttnMaskType.padding"):
        CPCoreAttention(_config(), 1, AttnMaskType.padding, "self", runtime=AttentionRuntime())
    q, k = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 2, 8)
    with pytest.raises(ValueError, match=r"AttentionPhase.mode='train' is not one of \('prefill', 'decode'\)"):
        AttentionPhase(mode="train")
    with pytest.raises(ValueError, match=r"AttentionPhase\(mode='decode'\) needs decode_positions and kv_caches"):
        AttentionPhase(mode="decode")
    with pytest.raises(ValueError, match=r"history_lens needs mode='prefill' and the kv_caches"):
        AttentionPhase(history_lens=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="does not support attention_bias"):
        _attention(AttentionRuntime())(q, k, k, None, attention_bias=torch.zeros(1))


def test_layer_spec_puts_cp_core_attention_with_the_shared_runtime_into_megatrons_local_spec():
    runtime = AttentionRuntime()
    for arch in ("llama", "gpt2"):
        core = get_gpt_layer_spec(runtime, arch).submodules.self_attention.submodules.core_attention
        assert core.module is CPCoreAttention and core.params["runtime"] is runtime
    with pytest.raises(ValueError, match=r"arch='bert' is not supported; rule: one of \['gpt2', 'llama'\]"):
        get_gpt_layer_spec(runtime, "bert")


def test_megatron_arguments_only_without_cp_is_exact_causal_attention():
    """The drop-in with megatron's parallel state uninitialized and no pg_collection: PCP = 1."""
    attention = CPCoreAttention(_config(), 1, AttnMaskType.causal, "self")
    assert attention.runtime.pcp_group is None and attention.runtime.prefill_comm == "p2p"
    q, k, v = torch.randn(9, 2, 8, 8), torch.randn(9, 2, 2, 8), torch.randn(9, 2, 2, 8)
    diff = (attention(q, k, v, None).double() - _reference(q, k, v, 8 ** -0.5)).abs()
    assert diff.max() < 1e-5, f"max {diff.max():.3g}, mean {diff.mean():.3g}"


def test_cp_comm_type_of_each_layer():
    config = _config()
    assert layer_comm_type(None, config, 1) == "p2p"  # megatron's default
    assert layer_comm_type("a2a", config, 1) == "a2a"
    config.cp_comm_type = ["all_gather", "a2a+p2p", "a2a"]  # per layer, layers numbered from 1
    assert [layer_comm_type(None, config, n) for n in (1, 2, 3)] == ["all_gather", "a2a+p2p", "a2a"]
    assert CPCoreAttention(config, 3, AttnMaskType.causal, "self").runtime.prefill_comm == "a2a"
    with pytest.raises(ValueError, match=r"^cp_comm_type of layer 1 \('ring'\) must be one of \['a2a', 'a2a\+p2p', "
                                         r"'all_gather', 'p2p'\]$"):
        CPCoreAttention(_config(), 1, AttnMaskType.causal, "self", cp_comm_type="ring")


def test_megatron_cp_settings_must_match_the_groups():
    cp2 = dataclasses.replace(_config(), context_parallel_size=2)
    with pytest.raises(ValueError, match=r"^context_parallel_size \(2\) must equal the size of megatron's CP group "
                                         r"\(1, pg_collection.cp or parallel_state's\)"):
        CPCoreAttention(cp2, 1, AttnMaskType.causal, "self")
    with pytest.raises(ValueError, match=r"^context_parallel_size \(2\) must be 1 or the runtime's PCP size \(1\)"):
        _attention(AttentionRuntime(), cp2)
    with pytest.raises(ValueError, match=r"^cp_comm_type \('a2a'\) must equal the runtime's prefill_comm \('p2p'\)"):
        _attention(AttentionRuntime(), cp_comm_type="a2a")


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _packed(seq_lens, padded):
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=_cu(seq_lens), cu_seqlens_kv=_cu(seq_lens),
                           cu_seqlens_q_padded=None if padded is None else _cu(padded),
                           cu_seqlens_kv_padded=None if padded is None else _cu(padded),
                           max_seqlen_q=max(padded or seq_lens), max_seqlen_kv=max(padded or seq_lens))


THD_SEQ_LENS = (5, 13, 8)  # odd lengths, one shorter than 2·PCP at PCP = 4
THD_HEADS = {"GQA": (8, 2), "MQA": (8, 1)}


def _thd_case(pcp_group, solo_group, comm, hq, hkv, seed):
    """Packed THD forward + backward through the drop-in CPCoreAttention vs per-sequence float64."""
    pcp_rank, pcp_size = dist.get_rank(pcp_group), dist.get_world_size(pcp_group)
    head_dim, scale = 8, 8 ** -0.5
    padded = [padded_length(n, pcp_size) for n in THD_SEQ_LENS]
    gen = torch.Generator().manual_seed(seed)
    # Whole padded sequences [1, h, L, d]; padding holds random values too (it must not leak into real tokens).
    seqs = [{name: torch.randn(1, h, n, head_dim, generator=gen)
             for name, h in (("q", hq), ("k", hkv), ("v", hkv), ("dout", hq))} for n in padded]
    refs = [_reference_f64(t["q"], t["k"], t["v"], t["dout"], (n,), scale) for t, n in zip(seqs, THD_SEQ_LENS)]

    def local_thd(tensors):
        """This rank's DualChunkSwap shard of each sequence, concatenated: [t, h, d] (TE's THD layout)."""
        return torch.cat([shard_sequence(x[0], pcp_rank, pcp_size, seq_dim=1) for x in tensors], 1).permute(1, 0, 2)

    q, k, v = (local_thd([t[name] for t in seqs]).requires_grad_() for name in ("q", "k", "v"))
    config = dataclasses.replace(_config(hq, hkv, head_dim), context_parallel_size=pcp_size, cp_comm_type=comm,
                                 hierarchical_context_parallel_sizes=[2, 2] if comm == "a2a+p2p" else None)
    attention = CPCoreAttention(config, 1, AttnMaskType.causal, "self", cp_comm_type=comm,
                                pg_collection=ProcessGroupCollection(tp=solo_group, cp=pcp_group))
    out = attention(q, k, v, None, packed_seq_params=_packed(THD_SEQ_LENS, padded))
    out.backward(local_thd([t["dout"] for t in seqs]).reshape(out.shape))
    errors = {}
    for name, got in (("out", out.detach().view(q.shape)), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        want = local_thd([ref[name] for ref in refs])
        scale_of = max(float(ref[name].abs().max()) for ref in refs)
        errors[name] = (float((got.double() - want).abs().max()) / scale_of, float((got.double() - want).abs().mean()))
    return errors


def _thd_bad(pcp_group, solo_group) -> list[str]:
    """Packed sequences a PCP > 1 group cannot split: every rank must raise the same one-line error."""
    config = dataclasses.replace(_config(), context_parallel_size=dist.get_world_size(pcp_group))
    attention = CPCoreAttention(config, 1, AttnMaskType.causal, "self",
                                pg_collection=ProcessGroupCollection(tp=solo_group, cp=pcp_group))
    q, k = torch.randn(4, 8, 8), torch.randn(4, 2, 8)
    messages = []
    for params in (_packed((5, 8), None), _packed((5, 8), (6, 10))):
        try:
            attention(q, k, k, None, packed_seq_params=params)
            messages.append("ran")
        except ValueError as error:
            messages.append(str(error))
    return messages


def _thd_rank(rank, world_size):
    solo_group = dist.new_group([rank], use_local_synchronization=True)
    results = {}
    # PCP = 4: the whole world; PCP = 2: groups [0, 2] and [1, 3] (TP = 2 positions, megatron's tp-cp order).
    pcp2_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    for pcp_group, comms in ((dist.group.WORLD, ("p2p", "all_gather", "a2a", "a2a+p2p")),
                             (pcp2_groups[rank % 2], ("p2p", "all_gather", "a2a"))):
        for comm in comms:
            for heads, (hq, hkv) in THD_HEADS.items():
                pcp_size = dist.get_world_size(pcp_group)  # the data differ between PCP groups, not within
                results[pcp_size, comm, heads] = _thd_case(pcp_group, solo_group, comm, hq, hkv,
                                                           seed=rank % (world_size // pcp_size))
    results["bad"] = _thd_bad(dist.group.WORLD, solo_group)
    return results


def test_packed_thd_sequences_every_comm_type_equal_float64_per_sequence():
    per_rank = run_ranks(4, _thd_rank, timeout_s=120)
    failures = []
    for rank, results in enumerate(per_rank):
        bad = results.pop("bad")
        assert bad[0].startswith("packed_seq_params.cu_seqlens_q_padded (None) must be given with context "
                                 "parallelism (PCP=4): pad every sequence to a multiple of 2·PCP = 8"), bad[0]
        assert bad[1].startswith("padded sequence lengths [6, 10] (cu_seqlens_q_padded) must each be a multiple of "
                                 "2·PCP = 8"), bad[1]
        assert len(results) == 2 * (4 + 3)
        for (pcp_size, comm, heads), errors in results.items():
            for name, (rel, mean) in errors.items():
                limit = 1e-5 if name == "out" else 1e-4
                if not rel <= limit:
                    failures.append(f"PCP {pcp_size} {comm} {heads} rank {rank} {name}: max rel {rel:.3g} > {limit}, "
                                    f"mean abs {mean:.3g}")
    assert not failures, "\n".join(failures)


def test_packed_thd_without_context_parallelism_needs_no_padding():
    """PCP = 1: odd packed lengths, no cu_seqlens_*_padded; each sequence attends only to itself."""
    seq_lens = (3, 7, 1)
    q, k, v = torch.randn(11, 8, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    out = CPCoreAttention(_config(), 1, AttnMaskType.causal, "self")(q, k, v, None,
                                                                      packed_seq_params=_packed(seq_lens, None))
    start = 0
    for n in seq_lens:
        rows = slice(start, start + n)
        want = _reference(q[rows, None], k[rows, None], v[rows, None], 8 ** -0.5)[:, 0]
        diff = (out[rows].double() - want).abs()
        assert diff.max() < 1e-5, f"sequence of {n}: max {diff.max():.3g}, mean {diff.mean():.3g}"
        start += n
    with pytest.raises(ValueError, match=r"^packed_seq_params.qkv_format \('sbhd'\) must be 'thd'"):
        CPCoreAttention(_config(), 1, AttnMaskType.causal, "self")(
            q, k, v, None, packed_seq_params=dataclasses.replace(_packed(seq_lens, None), qkv_format="sbhd"))
