"""The LSE merge is exact: merging attention over key parts equals attention over all keys."""
import torch

from cptoolkit.layers.block_attention import attention_forward
from cptoolkit.layers.lse_merge import merge_lse, merge_many, merge_two

NEG_INF = float("-inf")


def _reference(q, k, v, scale):
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    return torch.softmax(scores, -1) @ v.double(), torch.logsumexp(scores, -1)


def test_merge_two_equals_attention_over_the_union():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    scale = 8 ** -0.5
    out_a, lse_a = attention_forward(q, k[:, :, :4], v[:, :, :4], causal=False, scale=scale)
    out_b, lse_b = attention_forward(q, k[:, :, 4:], v[:, :, 4:], causal=False, scale=scale)
    out, lse = merge_two(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = _reference(q, k, v, scale)
    assert (out.double() - ref_out).abs().max() < 1e-5
    assert (lse.double() - ref_lse).abs().max() < 1e-5


def test_merge_many_equals_attention_over_the_union():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    parts = [attention_forward(q, k[:, :, i:i + 3], v[:, :, i:i + 3], causal=False, scale=0.25)
             for i in range(0, 12, 3)]
    out, lse = merge_many(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    ref_out, ref_lse = _reference(q, k, v, 0.25)
    assert (out.double() - ref_out).abs().max() < 1e-5
    assert (lse.double() - ref_lse).abs().max() < 1e-5


def test_empty_part_is_the_identity_and_never_nan():
    out_a, lse_a = torch.randn(1, 1, 3, 4), torch.tensor([[[0.5, NEG_INF, NEG_INF]]])
    out_b, lse_b = torch.zeros(1, 1, 3, 4), torch.tensor([[[NEG_INF, 1.5, NEG_INF]]])
    out, lse = merge_two(out_a, lse_a, out_b, lse_b)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[..., 0, :], out_a[..., 0, :])
    assert torch.equal(out[..., 1, :], out_b[..., 1, :])
    assert lse.tolist() == [[[0.5, 1.5, NEG_INF]]]
    many_out, many_lse = merge_many(torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]))
    assert not many_out.isnan().any()
    assert torch.allclose(many_out[..., :2, :], out[..., :2, :])
    assert many_lse.tolist() == lse.tolist()


def test_merge_lse_is_log_add_exp():
    a = torch.tensor([0.0, 100.0, -100.0, NEG_INF])
    b = torch.tensor([0.0, 99.0, NEG_INF, NEG_INF])
    assert torch.allclose(merge_lse(a, b)[:3], torch.logaddexp(a, b)[:3])
    assert merge_lse(a, b)[3] == NEG_INF
