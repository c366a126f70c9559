"""The 1-rank engine on one GPU, and megatron's TransformerEngine layer spec with ``CPCoreAttention``.

- The engine built from a config with ``device: cuda``, ``dtype: bfloat16`` and each ``attention_backend``
  (``te`` builds megatron's TE layer spec too) follows the float32 CPU engine of the same seeded weights, by
  ``tests/test_engine.py``'s bf16 rule: teacher-forced logits within 3% of the logit range, and the same
  token wherever float32's best token leads by more than twice that step's error.
- The TE-spec model loads the local-spec model's full state dict (input norms renamed into the fused
  ``layer_norm_weight`` of ``linear_qkv``/``linear_fc1``), gives it back unchanged, and computes the same
  logits as the local-spec model.
"""
import copy

import pytest
import torch

from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.layers.block_attention import kernel_backend, use_backend
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.layers.dual_chunk_swap import partition_batch
from cptoolkit.models.build import init_full_state_dict, new_gpt_model
from cptoolkit.models.gpt import gpt_forward
from cptoolkit.models.tp_sharding import NORM, gather_full_state_dict, load_full_state_dict, param_kinds
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.gpu.devices import BACKENDS, GPU, requires_te
from tests.multiproc import run_ranks
from tests.test_engine import BASE, PROMPTS

pytestmark = GPU


def _config(device: str, dtype: str, attention_backend: str):
    raw = copy.deepcopy(BASE)
    raw["runtime"] = {"device": device, "dtype": dtype, "attention_backend": attention_backend}
    return config_from_dict(raw, source="<gpu test>")


def _teacher_forced_logits(engine, sequences, device):
    logits = []
    for sequence in sequences:
        batch = partition_batch([sequence], 0, 1, pad_id=0)
        with torch.no_grad():
            out = gpt_forward(engine.model, batch.input_ids.to(device), batch.position_ids.to(device), engine.runtime)
        logits.append(out[0, :len(sequence)].float().cpu())
    return logits


def _engines_rank(rank, world_size, backend):
    """float32 CPU engine, then bf16 CUDA engine with ``backend``: greedy tokens of each, both models' logits
    teacher-forced on the float32 sequences, the block backend used on CUDA and linear_qkv's type."""
    torch.cuda.set_device(0)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    runs = {}
    for name, cfg, device, group_backend in (("fp32", _config("cpu", "float32", "auto"), "cpu", None),
                                             ("cuda", _config("cuda", "bfloat16", backend), "cuda", "nccl")):
        groups = initialize_model_parallel(tp=1, pcp=1, dcp=1, num_heads=cfg.model.num_attention_heads,
                                           num_kv_heads=cfg.model.num_kv_heads, backend=group_backend)
        try:
            engine = build_engine(cfg, groups, torch.device(device))
            results = engine.generate(PROMPTS[:3], greedy)
            sequences = runs["fp32"]["sequences"] if name == "cuda" else [
                r.prompt_token_ids + r.token_ids for r in results]
            runs[name] = {"tokens": [r.token_ids for r in results], "sequences": sequences,
                          "prompt_lens": [len(r.prompt_token_ids) for r in results],
                          "logits": _teacher_forced_logits(engine, sequences, device),
                          "kernel_backend": kernel_backend(torch.device(device)),
                          "linear_qkv": type(engine.model.decoder.layers[0].self_attention.linear_qkv).__name__}
        finally:
            destroy_model_parallel()
    return runs


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_rank_bf16_cuda_engine_follows_the_float32_cpu_engine(backend):
    runs = run_ranks(1, _engines_rank, backend, timeout_s=600)[0]
    fp32, cuda = runs["fp32"], runs["cuda"]
    assert cuda["kernel_backend"] == backend
    assert cuda["linear_qkv"] == ("TELayerNormColumnParallelLinear" if backend == "te" else "ColumnParallelLinear")
    worst, decided, checked = 0.0, 0, 0
    for want, got, prompt_len in zip(fp32["logits"], cuda["logits"], fp32["prompt_lens"]):
        want, got = want[prompt_len - 1:], got[prompt_len - 1:]  # the logits that picked generated tokens
        error = (want - got).abs()
        worst = max(worst, float(error.max() / want.abs().max()))
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * error.max(dim=-1).values
        checked += int(clear.sum())
        decided += int((want.argmax(-1) == got.argmax(-1))[clear].sum())
    assert worst <= 0.03, f"{backend}: bf16 CUDA logits differ from fp32 CPU by {worst:.4f} of the range"
    assert checked >= 10 and decided == checked, (backend, decided, checked)


def _te_name(local_name: str) -> str:
    """A local-spec parameter name in megatron's TE spec: the input norms live in the linear after them."""
    return (local_name.replace(".input_layernorm.", ".self_attention.linear_qkv.layer_norm_")
            .replace(".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_"))


def _te_spec_rank(rank, world_size, arch):
    from cptoolkit.models.shape import GPTShape

    torch.cuda.set_device(0)
    shape = GPTShape(arch=arch, num_layers=2, hidden_size=128, num_attention_heads=4,
                     num_kv_heads=2 if arch == "llama" else 4, ffn_hidden_size=256, vocab_size=320, max_seq_len=64)
    groups = initialize_model_parallel(tp=1, pcp=1, dcp=1, num_heads=4, num_kv_heads=shape.num_kv_heads,
                                       backend="nccl")
    try:
        pg_collection, runtime = groups.megatron_pg_collection(), AttentionRuntime()
        with use_backend("torch"):
            local = new_gpt_model(shape, pg_collection, runtime, torch.bfloat16).cuda().eval()
        with use_backend("te"):
            te_model = new_gpt_model(shape, pg_collection, runtime, torch.bfloat16).cuda().eval()
        full = init_full_state_dict(local, seed=5)
        gen = torch.Generator().manual_seed(6)
        kinds = param_kinds(local)
        # Norm weights away from 1 (and biases from 0), so a norm that went astray changes the logits.
        full = {name: tensor + 0.2 * torch.randn(tensor.shape, generator=gen) if kinds[name] is NORM else tensor
                for name, tensor in full.items()}
        te_full = {_te_name(name): tensor for name, tensor in full.items()}
        load_full_state_dict(local, full)
        load_full_state_dict(te_model, te_full)
        # Gathered over the (NCCL) TP group, in the model's bf16: compared with the full tensors rounded alike.
        round_trip = {name: torch.equal(tensor.cpu(), te_full[name].to(torch.bfloat16))
                      for name, tensor in gather_full_state_dict(te_model).items()}
        input_ids = torch.randint(0, shape.vocab_size, (2, 48), generator=gen).cuda()
        position_ids = torch.arange(48).expand(2, 48).cuda()
        logits = {}
        for name, model, backend in (("local", local, "torch"), ("te", te_model, "te")):
            with use_backend(backend), torch.no_grad():
                logits[name] = gpt_forward(model, input_ids, position_ids, runtime).float().cpu()
        return {"te_kinds": {name: kind.name for name, kind in param_kinds(te_model).items()},
                "round_trip": round_trip, "logits": logits}
    finally:
        destroy_model_parallel()


@requires_te
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_te_layer_spec_loads_the_full_state_dict_and_matches_the_local_spec(arch):
    result = run_ranks(1, _te_spec_rank, arch, timeout_s=600)[0]
    norms = {name: kind for name, kind in result["te_kinds"].items() if "layer_norm_" in name}
    assert norms and set(norms.values()) == {"norm"}, result["te_kinds"]
    assert all(result["round_trip"].values()), [name for name, same in result["round_trip"].items() if not same]
    local, te = result["logits"]["local"], result["logits"]["te"]
    error = float((local - te).abs().max() / local.abs().max())
    assert error <= 0.02, f"{arch}: TE-spec logits differ from the local spec's by {error:.4f} of the range"
