"""CPCoreAttention: megatron's core_attention interface, and exact causal attention at PCP = DCP = 1.

Runs in-process: with PCP = 1 the module issues no collective. PCP > 1 and DCP > 1 through this
module are covered end to end in test_gpt_model.py.
"""
import inspect

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from cptoolkit.layers.core_attention import AttentionRuntime, CPCoreAttention, get_gpt_layer_spec


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
    assert [name for name in ours if name != "runtime"] == list(theirs)
    for name, param in theirs.items():
        assert ours[name].kind == param.kind and ours[name].default == param.default, name
    assert ours["runtime"].kind == inspect.Parameter.KEYWORD_ONLY
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
    runtime = AttentionRuntime(on_prefill_kv=lambda layer, k, v: seen.append((layer, k, v)))
    attention = CPCoreAttention(_config(), 3, AttnMaskType.causal, "self", runtime=runtime)
    k = torch.randn(5, 2, 2, 8)
    attention(torch.randn(5, 2, 8, 8), k, k + 1, None)
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
    attention = _attention(AttentionRuntime(mode="train"))
    q, k = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 2, 8)
    with pytest.raises(ValueError, match=r"AttentionRuntime.mode='train' is not one of \('prefill', 'decode'\)"):
        attention(q, k, k, None)
    with pytest.raises(ValueError, match="neither attention_bias nor packed_seq_params"):
        _attention(AttentionRuntime())(q, k, k, None, attention_bias=torch.zeros(1))


def test_layer_spec_puts_cp_core_attention_with_the_shared_runtime_into_megatrons_local_spec():
    runtime = AttentionRuntime()
    for arch in ("llama", "gpt2"):
        core = get_gpt_layer_spec(runtime, arch).submodules.self_attention.submodules.core_attention
        assert core.module is CPCoreAttention and core.params["runtime"] is runtime
    with pytest.raises(ValueError, match=r"arch='bert' is not supported; rule: one of \['gpt2', 'llama'\]"):
        get_gpt_layer_spec(runtime, "bert")
