"""The block-kernel backend switch (``runtime.attention_backend``), checked where no GPU and no
TransformerEngine exist: which backend computes a block, the config's errors, TE's softmax statistics as
cptoolkit's LSE, the TE parameter kinds (with stand-ins named like TE's classes), megatron's TE layer spec
refused without TE, and that importing cptoolkit never imports TransformerEngine. ``tests/gpu`` runs the
kernels themselves on CUDA.
"""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP

from cptoolkit.config import ConfigError, config_from_dict
from cptoolkit.layers import block_attention, te_backend
from cptoolkit.layers.block_attention import (attention_backward, attention_forward, current_backend,
                                              kernel_backend, set_backend, use_backend)
from cptoolkit.layers.core_attention import AttentionRuntime, CPCoreAttention, get_gpt_layer_spec
from cptoolkit.layers.te_backend import lse_from_te_stats, te_stats_from_lse
from cptoolkit.models.build import init_full_state_dict
from cptoolkit.models.shape import GPTShape
from cptoolkit.models.tp_sharding import load_full_state_dict, param_kinds
from tests.test_models_structure import _bare

REPO = Path(__file__).resolve().parents[1]
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


# ----------------------------------------------------------------------------- which backend computes a block

def test_auto_computes_cpu_blocks_with_torchs_kernel():
    with use_backend("auto"):
        assert kernel_backend(CPU) == "torch"
        q, k, v = (torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
        out, lse = attention_forward(q, k, v, causal=False, scale=0.5)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.5
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), scores.softmax(-1) @ v.double(), rtol=0, atol=1e-5)


def test_auto_takes_te_for_cuda_blocks_only_where_te_imports(monkeypatch):
    with use_backend("auto"):
        assert kernel_backend(CUDA) == ("te" if te_backend.available() else "torch")
        monkeypatch.setattr(te_backend, "available", lambda: True)
        assert (kernel_backend(CUDA), kernel_backend(CPU)) == ("te", "torch")
        monkeypatch.setattr(te_backend, "available", lambda: False)
        assert kernel_backend(CUDA) == "torch"


def test_an_explicit_backend_is_used_whatever_the_device():
    for name in ("torch", "te"):
        with use_backend(name):
            assert (kernel_backend(CPU), kernel_backend(CUDA)) == (name, name)


def test_te_sends_every_block_to_transformer_engine_which_refuses_cpu_tensors():
    """The te path checks its tensors before importing TE, so on CPU it fails with the rule, not an ImportError."""
    q = torch.zeros(1, 2, 4, 8)
    rule = (r"^attention backend 'te' got tensors on cpu torch\.float32(, cpu torch\.float32)+; rule: "
            r"TransformerEngine's fused attention takes CUDA float16/bfloat16 tensors of one dtype")
    with use_backend("te"):
        with pytest.raises(ValueError, match=rule):
            attention_forward(q, q, q, causal=True, scale=1.0)
        with pytest.raises(ValueError, match=rule):
            attention_backward(q, q, q, q, q, q[..., 0], causal=True, scale=1.0)


def test_use_backend_restores_the_previous_backend_even_after_an_error():
    before = current_backend()
    with use_backend("torch"):
        assert current_backend() == "torch"
        with pytest.raises(RuntimeError):
            with use_backend("te"):
                assert current_backend() == "te"
                raise RuntimeError("a failing block")
        assert current_backend() == "torch"
    assert current_backend() == before


def test_unknown_backends_are_refused():
    with pytest.raises(ValueError, match=r"^attention backend 'flash' must be one of \('auto', 'torch', 'te'\)$"):
        set_backend("flash")
    assert block_attention.ATTENTION_BACKENDS == ("auto", "torch", "te")


# ----------------------------------------------------------------------------- runtime.attention_backend

def _runtime_config(**runtime):
    return config_from_dict({"parallel": {}, "model": {}, "runtime": runtime, "inference": {"prompts": ["x"]}},
                            source="run.yaml")


def _one_line_error(**runtime) -> str:
    with pytest.raises(ConfigError) as err:
        _runtime_config(**runtime)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_auto_and_torch_load_anywhere(backend):
    assert _runtime_config(attention_backend=backend).runtime.attention_backend == backend
    assert _runtime_config().runtime.attention_backend == "auto"


def test_te_on_a_cpu_device_or_in_float32_names_the_rule():
    assert _one_line_error(attention_backend="te", device="cpu", dtype="bfloat16") == (
        "run.yaml: runtime.attention_backend = 'te': runs on CUDA only, and device is 'cpu'; set device: cuda "
        "(or auto), or attention_backend: torch")
    assert _one_line_error(attention_backend="te") == (
        "run.yaml: runtime.attention_backend = 'te': TransformerEngine's fused attention takes bfloat16, and "
        "dtype is 'float32'; set dtype: bfloat16, or attention_backend: torch")


@pytest.mark.skipif(HAVE_TE, reason="transformer_engine is installed here")
def test_te_without_transformer_engine_names_the_rule():
    assert _one_line_error(attention_backend="te", dtype="bfloat16") == (
        "run.yaml: runtime.attention_backend = 'te': needs TransformerEngine, and transformer_engine is not "
        "installed here; use auto or torch (or install transformer-engine)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available here")
def test_te_without_a_gpu_names_the_rule(monkeypatch):
    """TransformerEngine installed (as far as the import system can tell) but no GPU."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: SimpleNamespace(name=name) if name == "transformer_engine"
                        else find_spec(name, *args))
    assert _one_line_error(attention_backend="te", dtype="bfloat16") == (
        "run.yaml: runtime.attention_backend = 'te': needs a CUDA GPU, and torch.cuda.is_available() is False "
        "here; use auto or torch")


# ----------------------------------------------------------------------------- TE's softmax statistics

def test_te_statistics_become_cptoolkits_lse_row_by_row():
    """Query row ``i`` of head ``h`` in batch ``b`` scores its two keys ``x = (0, ln(i + 1))``; TE's statistic,
    ``m + log(sum exp(x - m))`` with ``m = max x``, is by hand ``ln(i + 1) + ln((i + 2)/(i + 1)) = ln(i + 2)``.
    Laid out ``[b, h, sq, 1]`` as TE returns it, it must become the LSE torch's kernel gives for the same
    scores, ``[b, h, sq]``, entry for entry."""
    batch, heads, rows = 2, 3, 4
    ln_next = torch.log(torch.arange(1, rows + 1, dtype=torch.float64))  # ln(i + 1)
    scores = torch.stack([torch.zeros(rows, dtype=torch.float64), ln_next], dim=-1)
    row_max = scores.max(-1).values
    by_hand = row_max + torch.log(torch.exp(scores - row_max[:, None]).sum(-1))  # TE's statistic, as its kernel forms it
    torch.testing.assert_close(by_hand, torch.log(torch.arange(rows, dtype=torch.float64) + 2), rtol=0, atol=1e-12)
    # Distinct values per (b, h) so a transposed or broadcast conversion cannot pass.
    offsets = torch.arange(batch * heads, dtype=torch.float64).view(batch, heads, 1)
    te_stats = (by_hand + offsets).float().unsqueeze(-1)

    # The same scores through torch's kernel: q_i = (ln(i + 1), 0), keys (0, 0) and (1, 0), plus a
    # per-(b, h) third coordinate that adds ``offset`` to both scores (and so to the LSE).
    q = torch.zeros(batch, heads, rows, 3)
    q[..., 0], q[..., 2] = ln_next.float(), offsets.float()
    k = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]]).expand(batch, heads, 2, 3).contiguous()
    with use_backend("torch"):
        _, torch_lse = attention_forward(q, k, torch.zeros_like(k), causal=False, scale=1.0)

    lse = lse_from_te_stats(te_stats)
    assert lse.shape == (batch, heads, rows) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch_lse, rtol=0, atol=1e-6)
    assert lse[1, 2, 3] == pytest.approx(math.log(5) + 5, abs=1e-6)


def test_te_statistics_of_another_layout_are_refused():
    with pytest.raises(ValueError, match=r"must be \[b, h, sq, 1\] float32 \(bshd/sbhd layouts\); got \(6, 2, 1\)"):
        lse_from_te_stats(torch.zeros(6, 2, 1))  # THD's packed [t, h, 1]
    with pytest.raises(ValueError, match=r"got \(1, 2, 3, 1\) torch\.bfloat16"):
        lse_from_te_stats(torch.zeros(1, 2, 3, 1, dtype=torch.bfloat16))


def test_the_backward_gets_a_dense_te_statistic_from_a_strided_lse():
    lse = torch.randn(2, 3, 8)
    rows = lse[:, :, 4:]  # the ring's row slice
    stats = te_stats_from_lse(rows)
    assert stats.shape == (2, 3, 4, 1) and stats.is_contiguous() and stats.dtype == torch.float32
    torch.testing.assert_close(lse_from_te_stats(stats), rows, rtol=0, atol=0)


# ----------------------------------------------------------------------------- TE parameter kinds

MEGATRON_TE = "megatron.core.extensions.transformer_engine"


def _stand_in(path: str) -> type:
    """A module class with TE's import path (``module.QualName``), as ``PARAM_KINDS`` matches TE's classes."""
    module, _, name = path.rpartition(".")
    return type(name, (torch.nn.Module,), {"__module__": module, "__qualname__": name})


TE_LN_LINEAR = _stand_in(f"{MEGATRON_TE}.TELayerNormColumnParallelLinear")
TE_ROW = _stand_in(f"{MEGATRON_TE}.TERowParallelLinear")
TE_COLUMN = _stand_in(f"{MEGATRON_TE}.TEColumnParallelLinear")
TE_LAYER_NORM = _stand_in("transformer_engine.pytorch.module.layernorm.LayerNorm")
TE_RMS_NORM = _stand_in("transformer_engine.pytorch.module.rmsnorm.RMSNorm")
SHAPE = GPTShape(arch="llama", num_layers=1, hidden_size=32, num_attention_heads=4, num_kv_heads=2,
                 ffn_hidden_size=24, vocab_size=50, max_seq_len=16)


def _param(*size) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(*size))


def _te_layer_model(tp_rank: int, tp_size: int) -> torch.nn.Module:
    """The parameters of one layer of megatron's TE GPT spec (with GPT-2-style biases and norm biases),
    TP rank ``tp_rank``'s shapes, under module types named like TE's; plus TE's final norms and a
    TEColumnParallelLinear."""
    hidden, head_dim = SHAPE.hidden_size, SHAPE.head_dim
    qkv_rows = (SHAPE.num_attention_heads + 2 * SHAPE.num_kv_heads) * head_dim // tp_size
    ffn = SHAPE.ffn_hidden_size // tp_size
    attention = _bare(SelfAttention,
                      linear_qkv=_bare(TE_LN_LINEAR, weight=_param(qkv_rows, hidden), bias=_param(qkv_rows),
                                       layer_norm_weight=_param(hidden), layer_norm_bias=_param(hidden)),
                      linear_proj=_bare(TE_ROW, weight=_param(hidden, hidden // tp_size), bias=_param(hidden)))
    mlp = _bare(MLP, config=SimpleNamespace(gated_linear_unit=True),
                linear_fc1=_bare(TE_LN_LINEAR, weight=_param(2 * ffn, hidden), layer_norm_weight=_param(hidden)),
                linear_fc2=_bare(TE_ROW, weight=_param(hidden, ffn)))
    model = _bare(torch.nn.Module, self_attention=attention, mlp=mlp,
                  final_layernorm=_bare(TE_LAYER_NORM, weight=_param(hidden), bias=_param(hidden)),
                  final_rmsnorm=_bare(TE_RMS_NORM, weight=_param(hidden)),
                  linear_q_proj=_bare(TE_COLUMN, weight=_param(hidden // tp_size, hidden),
                                      bias=_param(hidden // tp_size)))
    model.shape = SHAPE
    model.pg_collection = SimpleNamespace(tp=SimpleNamespace(rank=lambda: tp_rank, size=lambda: tp_size))
    return model


TE_KINDS = {
    "self_attention.linear_qkv.weight": "fused_qkv",
    "self_attention.linear_qkv.bias": None,  # SelfAttention's own entry, whatever it is, not TE's
    "self_attention.linear_qkv.layer_norm_weight": "norm",
    "self_attention.linear_qkv.layer_norm_bias": "norm",
    "self_attention.linear_proj.weight": "row",
    "self_attention.linear_proj.bias": "replicated",
    "mlp.linear_fc1.weight": "gated_column",
    "mlp.linear_fc1.layer_norm_weight": "norm",
    "mlp.linear_fc2.weight": "row",
    "final_layernorm.weight": "norm",
    "final_layernorm.bias": "norm",
    "final_rmsnorm.weight": "norm",
    "linear_q_proj.weight": "column",
    "linear_q_proj.bias": "column",
}


def test_every_parameter_of_megatrons_te_layer_has_its_kind():
    from cptoolkit.models.tp_sharding import PARAM_KINDS

    kinds = {name: kind.name for name, kind in param_kinds(_te_layer_model(0, 2)).items()}
    assert sorted(kinds) == sorted(TE_KINDS)
    assert kinds["self_attention.linear_qkv.bias"] == PARAM_KINDS[(SelfAttention, "linear_qkv.bias")].name
    assert {name: kind for name, kind in kinds.items() if TE_KINDS[name]} == {
        name: kind for name, kind in TE_KINDS.items() if kind}


def test_apexs_fused_layer_norm_is_a_norm():
    """megatron's local spec builds it (LayerNorm, GPT-2) where apex is installed, as in NVIDIA's containers."""
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

    norm = _bare(FusedLayerNorm, weight=_param(8), bias=_param(8))
    assert {name: kind.name for name, kind in param_kinds(_bare(torch.nn.Module, norm=norm)).items()} == {
        "norm.weight": "norm", "norm.bias": "norm"}


def test_a_class_merely_named_like_te_elsewhere_is_not_te():
    """The match is on the whole import path, so a look-alike name from another module gets no kind."""
    look_alike = type("TERowParallelLinear", (torch.nn.Module,), {"__module__": "my_project.layers"})
    with pytest.raises(ValueError, match=r"^proj\.weight: no TP kind for parameter 'weight' of a TERowParallelLinear"):
        param_kinds(_bare(torch.nn.Module, proj=_bare(look_alike, weight=_param(4, 4))))


def test_te_fused_norms_go_to_and_come_back_from_the_full_state_dict_at_tp2():
    """Seeded init draws the fused norms whole (weights 1, biases 0); every TP rank loads them whole and the
    column / row / fused-QKV slices reassemble into the full tensors."""
    tp_size = 2
    full = init_full_state_dict(_te_layer_model(0, tp_size), seed=3)
    assert torch.equal(full["self_attention.linear_qkv.layer_norm_weight"], torch.ones(SHAPE.hidden_size))
    assert torch.equal(full["self_attention.linear_qkv.layer_norm_bias"], torch.zeros(SHAPE.hidden_size))
    full = {name: torch.randn(tensor.shape, generator=torch.Generator().manual_seed(i))
            for i, (name, tensor) in enumerate(sorted(full.items()))}
    slices = {name: [] for name in full}
    for tp_rank in range(tp_size):
        model = _te_layer_model(tp_rank, tp_size)
        load_full_state_dict(model, full)
        for name, param in model.named_parameters():
            slices[name].append(param.detach().clone())
    kinds = param_kinds(_te_layer_model(0, tp_size))
    for name, tensor in full.items():
        torch.testing.assert_close(kinds[name].unshard(slices[name], SHAPE), tensor, rtol=0, atol=0, msg=name)
    for name in ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"):
        assert all(torch.equal(part, full[name]) for part in slices[name]), f"{name} must be whole on every rank"


# ----------------------------------------------------------------------------- megatron's TE layer spec

def test_the_layer_spec_follows_the_backend_and_keeps_cptoolkits_core_attention():
    runtime = AttentionRuntime()
    for backend in ("auto", "torch"):
        with use_backend(backend):
            spec = get_gpt_layer_spec(runtime, "llama")
        attention = spec.submodules.self_attention.submodules
        assert attention.linear_qkv is ColumnParallelLinear, backend  # megatron's local spec
        assert attention.core_attention.module is CPCoreAttention
        assert attention.core_attention.params == {"runtime": runtime}


@pytest.mark.skipif(HAVE_TE, reason="transformer_engine is installed here")
def test_the_te_layer_spec_without_transformer_engine_names_the_rule():
    rule = (r"^get_gpt_layer_spec\(transformer_engine=True\): megatron-core found no TransformerEngine here "
            r"\(import transformer_engine failed\); rule: megatron's TE layer spec needs transformer-engine installed")
    with pytest.raises(ImportError, match=rule):
        get_gpt_layer_spec(AttentionRuntime(), "llama", transformer_engine=True)
    with use_backend("te"), pytest.raises(ImportError, match=rule):
        get_gpt_layer_spec(AttentionRuntime(), "gpt2")


# ----------------------------------------------------------------------------- no TransformerEngine import

_PROBE = r'''
import json, pkgutil, sys

attempts = []
IMPORT_MACHINERY = ("importlib", "_frozen_importlib", "_frozen_importlib_external")


class RecordTransformerEngineImports:
    """Notes which module asks for transformer_engine; finds nothing itself, so imports proceed as usual."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformer_engine":
            frame = sys._getframe(1)
            while frame and frame.f_globals.get("__name__", "").split(".")[0] in IMPORT_MACHINERY:
                frame = frame.f_back
            attempts.append(frame.f_globals.get("__name__") if frame else None)
        return None


sys.meta_path.insert(0, RecordTransformerEngineImports())
import torch
import cptoolkit
import cptoolkit.layers
for info in pkgutil.iter_modules(cptoolkit.layers.__path__, "cptoolkit.layers."):
    __import__(info.name)
import cptoolkit.config, cptoolkit.inference.builder, cptoolkit.models.tp_sharding
from cptoolkit.layers.block_attention import attention_forward, current_backend, use_backend

default = current_backend()
q = torch.randn(1, 2, 4, 8)
for backend in ("auto", "torch"):
    with use_backend(backend):
        attention_forward(q, q, q, causal=True, scale=1.0)
print(json.dumps({"default": default, "attempts": attempts,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "transformer_engine")}))
'''


def test_importing_cptoolkit_and_running_cpu_blocks_never_imports_transformer_engine():
    """A fresh interpreter imports the package, every ``cptoolkit.layers`` module (``te_backend`` included),
    config, builder and the TP table, then runs CPU blocks under ``auto`` and ``torch``: no cptoolkit module
    asks for transformer_engine (megatron-core's own optional ``try: import`` may), and the registry starts
    at ``auto``."""
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["default"] == "auto"
    assert [name for name in report["attempts"] if str(name).startswith("cptoolkit")] == [], report["attempts"]
    if not HAVE_TE:
        assert report["loaded"] == []
