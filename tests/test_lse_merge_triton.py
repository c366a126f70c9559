"""The Triton LSE-merge kernels equal lse_merge.py, empty (-inf) partials included.

The kernels run under TRITON_INTERPRET=1 on CPU tensors. The variable must be set before triton is
imported and would change every later triton import in this process, so the checks run in a child
Python process (``_check_all``) and the pytest test only reports its outcome.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

NEG_INF = float("-inf")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _assert_close(name, got, want, tol):
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert torch.equal(got.isneginf(), want.isneginf()), f"{name}: -inf entries differ"
    assert not got.isnan().any(), f"{name}: NaN in the result"
    finite = torch.isfinite(want)
    diff = (got[finite].double() - want[finite].double()).abs()
    assert diff.max() <= tol, f"{name}: max abs diff {diff.max():.3e}, mean {diff.mean():.3e} > {tol}"


def _partials(gen, parts, shape, dtype):
    """Random ``outs [parts, *shape, d]`` and ``lses [parts, *shape]`` with some empty partials:
    per-part -inf entries, and row 0 empty in every part."""
    *rows, head_dim = shape
    outs = torch.randn(parts, *rows, head_dim, generator=gen).to(dtype)
    lses = torch.randn(parts, *rows, generator=gen) * 4
    lses[torch.rand(parts, *rows, generator=gen) < 0.3] = NEG_INF
    lses.view(parts, -1)[:, 0] = NEG_INF
    outs[lses.isneginf()] = 0
    return outs, lses


def _check_merge_many(merge_many, merge_many_triton, gen):
    for parts, shape, dtype, tol in [(1, (1, 2, 3, 8), torch.float32, 1e-6),
                                     (3, (2, 3, 1, 12), torch.float32, 1e-6),
                                     (4, (1, 2, 5, 16), torch.float32, 1e-6),
                                     (5, (2, 1, 2, 8), torch.float16, 2e-3)]:
        outs, lses = _partials(gen, parts, shape, dtype)
        name = f"merge_many n={parts} shape={shape} {dtype}"
        got_out, got_lse = merge_many_triton(outs, lses)
        want_out, want_lse = merge_many(outs, lses)
        _assert_close(f"{name} out", got_out, want_out, tol)
        _assert_close(f"{name} lse", got_lse, want_lse, 1e-5)
        assert got_out.view(-1, shape[-1])[0].eq(0).all(), f"{name}: an all-empty row must give out = 0"


def _check_all():
    """Run in a child process with TRITON_INTERPRET=1; any failed check exits non-zero."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from cptoolkit.layers.lse_merge import merge_many
    from cptoolkit.layers.lse_merge_triton import merge_many_triton

    gen = torch.Generator().manual_seed(0)
    _check_merge_many(merge_many, merge_many_triton, gen)
    print("all triton merge checks passed")


def test_triton_merge_kernels_match_lse_merge_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    child = subprocess.run([sys.executable, "-c", "import tests.test_lse_merge_triton as t; t._check_all()"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"triton checks failed:\n{child.stdout}\n{child.stderr}"
    assert "all triton merge checks passed" in child.stdout
