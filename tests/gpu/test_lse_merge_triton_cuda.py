"""The Triton LSE merge compiled for the GPU (not the interpreter) equals ``lse_merge.merge_many``: the
checks of ``tests/test_lse_merge_triton.py`` (empty -inf partials, all-empty rows, float32 and float16)
with the kernel's inputs on CUDA, and DCP decode taking that kernel for CUDA partials."""
import torch

from tests.gpu.devices import GPU
from tests.test_lse_merge_triton import _check_merge_many

pytestmark = GPU


def _on_cuda(kernel):
    """``kernel`` run on CUDA copies of its inputs, results brought back for comparison on the CPU."""
    def run(*tensors):
        return tuple(result.cpu() for result in kernel(*(t.cuda() for t in tensors)))
    return run


def test_triton_merge_on_cuda_equals_the_torch_merge():
    from cptoolkit.layers.lse_merge import merge_many
    from cptoolkit.layers.lse_merge_triton import merge_many_triton

    _check_merge_many(merge_many, _on_cuda(merge_many_triton), torch.Generator().manual_seed(0))


def test_the_merge_dispatch_takes_the_triton_kernel_for_cuda_partials(monkeypatch):
    from cptoolkit.layers import lse_merge_triton
    from cptoolkit.layers.lse_merge import merge_many, merge_partials

    calls = []
    real = lse_merge_triton.merge_many_triton
    monkeypatch.setattr(lse_merge_triton, "merge_many_triton", lambda *args: calls.append(args) or real(*args))
    gen = torch.Generator().manual_seed(1)
    outs, lses = torch.randn(4, 2, 8, 1, 64, generator=gen).cuda(), torch.randn(4, 2, 8, 1, generator=gen).cuda()
    got = merge_partials(outs, lses)[0]
    assert len(calls) == 1
    torch.testing.assert_close(got, merge_many(outs, lses)[0], rtol=0, atol=1e-5)
