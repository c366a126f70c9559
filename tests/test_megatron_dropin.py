"""CPCoreAttention as a true drop-in: a stock megatron-core GPTModel with megatron's own CP settings.

The model is megatron's own ``GPTModel`` from megatron's own ``get_gpt_layer_local_spec()`` with only
``core_attention = ModuleSpec(module=CPCoreAttention)`` changed, built with megatron's arguments only
(``TransformerConfig(context_parallel_size=CP, cp_comm_type=...)`` and a ``pg_collection``). Its
embedding, RoPE (with megatron's own CP slicing), decoder, output layer and ``labels=`` loss run on a
batch split by megatron's ``get_batch_on_this_cp_rank``; the logits, the per-token loss and, after
summing every gradient over the CP group (what megatron's DDP does), the gradients equal those of the
same weights at CP = 1 on the same TP group.

One spawn per world size runs every case (TP1 x CP2 on 2 ranks; TP1 x CP4 and TP2 x CP2 on 4 ranks;
GQA and MQA; every cp_comm_type, ``a2a+p2p`` at CP = 4 as 2 x 2, its groups from each of the three places a
megatron user can get them: cptoolkit's, CPCoreAttention's own from the config, and megatron's own
``initialize_model_parallel(hierarchical_context_parallel_sizes=[2, 2])``).

Mixture-of-Experts (one spawn per world size): the same stock model from megatron's MoE block spec
(``get_gpt_decoder_block_spec``, i.e. ``get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)``
per MoE layer) with megatron's own MoE layer (``TopKRouter`` with the load-balancing aux loss, ``SequentialMLP``
experts, the ``allgather`` dispatcher, a shared expert and ``moe_layer_freq = [1, 0]`` in some cases) and
megatron's expert groups from ``initialize_model_parallel(expert_model_parallel_size=EP)``: TP1 x CP2 and
TP2 x CP2 (with megatron's sequence parallelism), EP 1 and EP 2. Logits, per-token loss and gradients (summed as
megatron's DDP does: expert weights over the expert-DP group, sequence-parallel weights over TP) equal CP = 1,
EP = 1 with the same weights; the aux loss is in the gradients.

megatron-core 0.16.1 is GPU-bound in two places a CPU run reaches; the ranks of this test (only they)
neutralise exactly those calls, see ``_allow_megatron_rope_on_cpu``. Its MoE path adds one more
(``_allow_megatron_moe_on_cpu``: the router's TransformerEngine GEMM name), and sequence parallelism two
(``_allow_megatron_sequence_parallel_on_cpu``: the CUDA RNG tracker; ``_SequenceParallelTorchNorm``: the
norm, whose sequence-parallel versions are Apex / TE only).
"""
from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import run_ranks

VOCAB, SEQ_LEN, BATCH = 64, 16, 2
HEADS, HEAD_DIM = 8, 8
LOGIT_RTOL, GRAD_RTOL = 1e-5, 1e-4
# (tp, cp, num_kv_heads, cp_comm_type, hcp source); None is megatron's default comm type (p2p).
# hcp source for a2a+p2p: "pg" = cptoolkit's parallel_state groups passed as pg_collection.hcp, "config" =
# built by CPCoreAttention from config.hierarchical_context_parallel_sizes; "megatron" = built by megatron's
# initialize_model_parallel(hierarchical_context_parallel_sizes=...) and passed as
# ProcessGroupCollection.use_mpu_process_groups().hcp, "megatron-global" = the same groups read by
# CPCoreAttention from megatron's parallel_state (no pg_collection); "window" = the stock groups with megatron's
# sliding window, window_size = WINDOW on every other layer (window_attn_skip_freq = 2: layer 1 windowed,
# layer 2 full), the CP = 1 reference windowed alike (tests/test_sliding_window.py checks it against float64).
WINDOW = (4, 0)
CASES = {
    2: [(1, 2, kv, comm, None) for kv in (2, 1) for comm in (None, "all_gather", "a2a")],
    4: [(1, 4, kv, comm, None) for kv in (2, 1) for comm in ("p2p", "all_gather", "a2a")]
       + [(1, 4, 2, "a2a+p2p", "pg"), (1, 4, 1, "a2a+p2p", "config")]
       + [(1, 4, 2, "a2a+p2p", "megatron"), (1, 4, 1, "a2a+p2p", "megatron-global")]
       + [(2, 2, kv, comm, None) for kv in (2, 1) for comm in ("p2p", "all_gather", "a2a")]
       + [(1, 4, 2, "p2p", "window"), (1, 4, 1, "all_gather", "window"), (2, 2, 2, "a2a", "window")],
}
MEGATRON_HCP = ("megatron", "megatron-global")


def _allow_megatron_rope_on_cpu() -> None:
    """Neutralise megatron-core 0.16.1's CUDA-only calls on the RoPE path, in this rank process only.

    - ``RotaryEmbedding.get_emb`` moves ``inv_freq`` to ``torch.cuda.current_device()``: made ``"cpu"``.
    - ``rope_utils.get_pos_emb_on_this_cp_rank`` builds its two chunk indices with
      ``torch.tensor(..., pin_memory=True).cuda(non_blocking=True)``: the index is built unpinned and
      ``Tensor.cuda`` returns the tensor itself. The slicing (chunks r and 2P-1-r) is megatron's own.
    """
    from megatron.core.models.common.embeddings import rope_utils

    class TorchWithoutPinnedMemory:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def tensor(*args, pin_memory=False, **kwargs):
            return torch.tensor(*args, **kwargs)

    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    rope_utils.torch = TorchWithoutPinnedMemory()


def _config(tp, cp, num_kv_heads, comm, hierarchical_sizes=None, window=None):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        window_size=window, window_attn_skip_freq=2 if window else None,
        num_layers=2, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_query_groups=num_kv_heads,
        ffn_hidden_size=96, tensor_model_parallel_size=tp, context_parallel_size=cp, cp_comm_type=comm,
        hierarchical_context_parallel_sizes=hierarchical_sizes, use_cpu_initialization=True,
        init_method_std=0.2, hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, cross_entropy_loss_fusion=False)


def _gpt_model(config, pg_collection):
    """megatron's GPTModel with megatron's local layer spec, core attention swapped for CPCoreAttention."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from cptoolkit.layers.core_attention import CPCoreAttention

    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=CPCoreAttention)
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ_LEN, position_embedding_type="rope",
                    pg_collection=pg_collection)


def _batch():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=gen)
    return {"tokens": tokens, "labels": torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=gen),
            "position_ids": torch.arange(SEQ_LEN).expand(BATCH, SEQ_LEN)}


def _run(model, batch):
    """Logits ``[b, s_local, vocab/tp]``, per-token loss ``[b, s_local]`` and the parameter gradients of the
    summed loss."""
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss.sum().backward()
    return logits, loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _rel(got, want) -> tuple[float, float]:
    diff = (got.double() - want.double()).abs()
    return float(diff.max() / want.abs().max().clamp_min(1e-30)), float(diff.mean())


def _case(rank, case, tp_group, reference_models, solo_group, cptoolkit_hcp):
    """One comm type on megatron's initialized TP x CP groups; returns the relative errors vs CP = 1."""
    from megatron.core import parallel_state as mpu
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.utils import get_batch_on_this_cp_rank

    tp, cp, kv, comm, hcp_source = case
    window = WINDOW if hcp_source == "window" else None
    if (tp, kv, window) not in reference_models:
        # CP = 1 on the same TP group; megatron's loss reads its global TP group, which has the same ranks.
        reference_pg = ProcessGroupCollection(tp=tp_group, cp=solo_group, pp=solo_group, embd=solo_group,
                                              pos_embd=solo_group)
        reference = _gpt_model(_config(tp, 1, kv, None, window=window), reference_pg)
        reference_models[tp, kv, window] = (reference, _run(reference, _batch()))
    reference, (ref_logits, ref_loss, ref_grads) = reference_models[tp, kv, window]

    pg_collection = None  # the stock path: megatron's global groups (use_mpu_process_groups)
    if hcp_source in ("pg", "megatron"):
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    if hcp_source == "pg":
        pg_collection.hcp = [cptoolkit_hcp.a2a_group, cptoolkit_hcp.ring_group]
    sizes = _megatron_hcp_sizes(hcp_source, cp) or ([2, cp // 2] if hcp_source == "config" else None)
    model = _gpt_model(_config(tp, cp, kv, comm, sizes, window), pg_collection)
    model.load_state_dict(reference.state_dict())
    logits, loss, grads = _run(model, get_batch_on_this_cp_rank(_batch()))
    for grad in grads.values():
        dist.all_reduce(grad, group=mpu.get_context_parallel_group())
    want = get_batch_on_this_cp_rank({"logits": ref_logits, "loss": ref_loss})
    errors = {"logits": _rel(logits, want["logits"]), "loss": _rel(loss, want["loss"])}
    errors.update({f"grad {name}": _rel(grads[name], ref_grads[name]) for name in ref_grads})
    attentions = [layer.self_attention.core_attention for layer in model.decoder.layers]
    megatron_hcp = mpu.get_hierarchical_context_parallel_groups(check_initialized=False)
    return {"case": case, "rank": rank, "errors": errors, "windows": [a.window for a in attentions],
            "comm_types": {f"{type(a).__name__}:{a.runtime.prefill_comm}" for a in attentions},
            "same_cp_group": all(a.runtime.pcp_group is mpu.get_context_parallel_group() for a in attentions),
            "megatron_hcp_used": hcp_source not in MEGATRON_HCP or all(
                [a.runtime.hcp_groups.a2a_group, a.runtime.hcp_groups.ring_group] == megatron_hcp
                for a in attentions)}


def _megatron_hcp_sizes(hcp_source, cp):
    """megatron's own ``hierarchical_context_parallel_sizes`` ([a2a, ring]) for a "megatron*" case, else None."""
    return [2, cp // 2] if hcp_source in MEGATRON_HCP else None


# (config changes, comm, hierarchical sizes) -> the one-line ValueError every rank raises building the model.
BAD_AT_CP4 = [
    ({"num_attention_heads": 6, "hidden_size": 48, "num_query_groups": 2}, "a2a", None,
     r"^cp_comm_type 'a2a' of layer 1: query heads per TP rank \(6\) must be a multiple of the a2a group size "
     r"\(4 = pcp\): "),
    ({}, "a2a+p2p", [3, 2], r"^hierarchical_context_parallel_sizes \(\[3, 2\]\) must be \[a2a size, ring size\] "
                            r"with a2a size x ring size = context_parallel_size \(4\)"),
    ({}, "a2a+p2p", None, r"^hierarchical_context_parallel_sizes \(None\) must be"),
]


def _bad_combinations() -> list[str]:
    """Build each BAD_AT_CP4 model; returns the error each raised (or "built")."""
    import dataclasses

    messages = []
    for changes, comm, sizes in (bad[:3] for bad in BAD_AT_CP4):
        config = dataclasses.replace(_config(1, 4, 2, comm, sizes), **changes)
        try:
            _gpt_model(config, None)
            messages.append("built")
        except ValueError as error:
            messages.append(str(error))
    return messages


def _all_cases_rank(rank, world_size, cases):
    """Per TP x CP layout (and megatron hierarchical CP sizes): megatron's own initialize_model_parallel
    (tp-cp order), then every case."""
    from megatron.core import parallel_state as mpu

    from cptoolkit import parallel_state as ps

    _allow_megatron_rope_on_cpu()
    solo_group = dist.new_group([rank], use_local_synchronization=True)
    results = []
    for (tp, cp, megatron_hcp_sizes), layout_cases in _by_layout(cases):
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                      hierarchical_context_parallel_sizes=megatron_hcp_sizes)
        # cptoolkit's own a2a+p2p groups (2 x 2), handed to megatron as pg_collection.hcp in the "pg" case.
        groups = ps.initialize_model_parallel(tp=tp, pcp=cp, dcp=cp, num_heads=HEADS, num_kv_heads=1,
                                              hierarchical_a2a_size=2 if cp == 4 else None)
        reference_models = {}
        results += [_case(rank, case, mpu.get_tensor_model_parallel_group(), reference_models, solo_group,
                          groups.hcp_groups) for case in layout_cases]
        if (tp, cp, megatron_hcp_sizes) == (1, 4, None):
            results.append({"bad": _bad_combinations(), "rank": rank})
        ps.destroy_model_parallel()
        mpu.destroy_model_parallel()
    return results


def _by_layout(cases):
    """``[((tp, cp, megatron's hierarchical sizes or None), cases)]`` in first-seen order (megatron takes the
    sizes as a list, so they are keyed as a tuple and handed back as a list)."""
    layouts = {}
    for case in cases:
        sizes = _megatron_hcp_sizes(case[4], case[1])
        layouts.setdefault((*case[:2], sizes and tuple(sizes)), []).append(case)
    return [((tp, cp, sizes and list(sizes)), layout_cases) for (tp, cp, sizes), layout_cases in layouts.items()]


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_stock_megatron_gpt_model_with_cp_core_attention_equals_cp1(world_size):
    results = run_ranks(world_size, _all_cases_rank, CASES[world_size], timeout_s=120)
    if world_size == 4:
        assert all(sum("bad" in result for result in rank_results) == 1 for rank_results in results)
    failures = []
    for rank_results in results:
        for result in rank_results:
            if "bad" in result:
                for message, (*_, pattern) in zip(result["bad"], BAD_AT_CP4):
                    assert re.search(pattern, message) and "\n" not in message, (result["rank"], message)
                continue
            tp, cp, kv, comm, hcp_source = result["case"]
            assert result["comm_types"] == {f"CPCoreAttention:{comm or 'p2p'}"}, result
            assert result["same_cp_group"], result
            assert result["windows"] == ([WINDOW[0] + 1, None] if hcp_source == "window" else [None, None]), result
            assert result["megatron_hcp_used"], result
            for name, (rel_max, mean) in result["errors"].items():
                limit = GRAD_RTOL if name.startswith("grad") else LOGIT_RTOL
                if not rel_max <= limit:
                    failures.append(f"TP{tp} x CP{cp} kv={kv} {comm} ({hcp_source}) rank {result['rank']} {name}: "
                                    f"max rel {rel_max:.3g} > {limit}, mean abs {mean:.3g}")
    assert not failures, "\n".join(failures)


# --- Mixture-of-Experts: megatron's own MoE layer in the same stock GPTModel --------------------------------------
NUM_EXPERTS, MOE_TOPK, MOE_FFN, SHARED_FFN, AUX_LOSS_COEFF = 4, 2, 32, 48, 0.1


class MoECase(NamedTuple):
    """One MoE layout (expert TP is megatron's default, TP); ``shared_ffn`` None = no shared expert;
    ``layer_freq`` is megatron's ``moe_layer_freq`` (``[1, 0]``: layer 1 MoE, layer 2 dense)."""

    tp: int
    cp: int
    ep: int
    comm: str | None
    shared_ffn: int | None = None
    layer_freq: int | list[int] = 1


# TP x CP with expert parallelism in megatron's own groups: EP 1 (every rank holds every expert) and EP = CP (the
# ranks with different sequence chunks hold different experts; at TP2 each expert TP-split). TP2 runs megatron's
# sequence parallelism, which megatron requires for MoE with TP in training.
# Measured (megatron-core 0.16.1, CPU, float32): logits <= 6.7e-7, loss <= 3e-7, gradients <= 1.5e-6 relative.
MOE_CASES = {
    2: [MoECase(1, 2, 1, None), MoECase(1, 2, 2, "all_gather", SHARED_FFN, [1, 0])],
    4: [MoECase(2, 2, 1, "p2p"), MoECase(2, 2, 2, "a2a", SHARED_FFN, [1, 0])],
}


def _allow_megatron_moe_on_cpu() -> None:
    """Neutralise megatron-core 0.16.1's CUDA-only call on the MoE path, in this rank process only.

    - ``moe_utils`` imports ``te_general_gemm`` only when TransformerEngine (CUDA-only) imports, yet the router's
      gating GEMM (``RouterGatingLinearFunction``, moe_utils.py:1192) tests ``te_general_gemm is not None`` first,
      for every router dtype: ``NameError`` without TE. It is set to ``None``, as megatron's own
      ``extensions/transformer_engine`` defines it without TE, so the router runs its ``torch.mm`` branch.
    - The MoE path's other CUDA-bound calls move or allocate on ``torch.cuda.current_device()``, made ``"cpu"``
      by ``_allow_megatron_rope_on_cpu``: ``Router.gating`` moves the router weight (router.py:90); the
      all-gather / reduce-scatter buffers of the allgather dispatcher and of sequence parallelism
      (tensor_parallel/mappings.py, the global memory buffer).

    Not reached here, so left alone: the alltoall dispatcher's ``torch.cuda.Stream`` (the dispatcher is
    ``allgather``), the expert-bias buffers (no expert bias) and the zero-token crash (every rank has tokens).
    """
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None


def _allow_megatron_sequence_parallel_on_cpu() -> None:
    """Neutralise megatron-core 0.16.1's CUDA RNG tracker, in this rank process only.

    With ``sequence_parallel`` the embedding and the decoder block run inside ``get_cuda_rng_tracker().fork()``
    (dropout differs across TP ranks). The tracker saves and restores the CUDA generator
    (``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``) and is seeded by
    ``model_parallel_cuda_manual_seed`` through ``torch.cuda.get_rng_state``. The two functions read and set the
    CPU generator instead, and the tracker's three named states are set by its own ``set_states`` from seeded CPU
    generators. Dropout is 0 here: no random number is drawn inside a fork.
    """
    from megatron.core.tensor_parallel import random

    random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    names = (random._DATA_PARALLEL_RNG_TRACKER_NAME, random._MODEL_PARALLEL_RNG_TRACKER_NAME,
             random._EXPERT_PARALLEL_RNG_TRACKER_NAME)
    random.get_cuda_rng_tracker().set_states(
        {name: torch.Generator().manual_seed(seed).get_state() for seed, name in enumerate(names)})


class _SequenceParallelTorchNorm:
    """megatron's torch norm (``WrappedTorchNorm``) in a sequence-parallel model, in this test only.

    megatron's sequence-parallel norms are CUDA-only (Apex ``FusedLayerNorm``, ``TENorm``). Without Apex the local
    spec falls back to ``WrappedTorchNorm``, which refuses ``sequence_parallel``: a plain ``torch.nn.LayerNorm``
    lacks the ``sequence_parallel`` mark by which megatron's ``finalize_model_grads`` sums its gradient over TP.
    This builds the same torch norm and marks its parameters as ``FusedLayerNorm`` does; a norm is per token, so
    a sequence shard needs nothing else.
    """

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        norm = WrappedTorchNorm(dataclasses.replace(config, sequence_parallel=False), hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm


def _moe_config(case: MoECase, cp: int, ep: int):
    """``_config`` plus megatron's MoE settings (allgather dispatcher, aux loss); no linear biases (megatron refuses
    expert biases at ETP > 1, and at TP 1 its biased expert MLP adds in place to a TP region's output view)."""
    return dataclasses.replace(
        _config(case.tp, cp, 2, case.comm if cp > 1 else None), add_bias_linear=False,
        num_moe_experts=NUM_EXPERTS, moe_router_topk=MOE_TOPK, moe_ffn_hidden_size=MOE_FFN,
        moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=AUX_LOSS_COEFF,
        moe_shared_expert_intermediate_size=case.shared_ffn, moe_layer_freq=case.layer_freq,
        expert_model_parallel_size=ep, sequence_parallel=case.tp > 1)


def _moe_gpt_model(config, pg_collection):
    """megatron's GPTModel from megatron's MoE block spec (``get_gpt_decoder_block_spec``: per ``moe_layer_freq``,
    ``get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)`` or the dense local spec), core attention
    swapped for CPCoreAttention (and, with sequence parallelism, the norms for ``_SequenceParallelTorchNorm``)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from cptoolkit.layers.core_attention import CPCoreAttention

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    for layer in block.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = ModuleSpec(module=CPCoreAttention)
    if config.sequence_parallel:
        block.layer_norm = _SequenceParallelTorchNorm
        for layer in block.layer_specs:
            layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = _SequenceParallelTorchNorm
    return GPTModel(config, block, vocab_size=VOCAB, max_sequence_length=SEQ_LEN, position_embedding_type="rope",
                    pg_collection=pg_collection)


def _reduce_grads_as_megatron(model, grads, tp_group, dense_group, expert_group) -> None:
    """Sum ``grads`` in place as megatron's DDP and ``finalize_model_grads`` do: a sequence-parallel parameter
    over TP, then an expert parameter (``allreduce`` False) over the expert-DP group, every other over
    ``dense_group`` (megatron's DP x CP group)."""
    params = dict(model.named_parameters())
    for name, grad in grads.items():
        if model.config.sequence_parallel and getattr(params[name], "sequence_parallel", False):
            dist.all_reduce(grad, group=tp_group)
        dist.all_reduce(grad, group=dense_group if getattr(params[name], "allreduce", True) else expert_group)


def _global_expert_name(name: str, first_local_expert: int) -> str:
    """``...experts.local_experts.{j}...`` -> the same parameter's name at EP 1 (expert ``first + j``)."""
    return re.sub(r"(\.experts\.local_experts\.)(\d+)\.",
                  lambda match: f"{match[1]}{int(match[2]) + first_local_expert}.", name)


def _moe_case(rank, case: MoECase, solo_group):
    """One MoE case on megatron's initialized groups; returns the relative errors vs CP = 1, EP = 1."""
    from megatron.core import parallel_state as mpu
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.utils import get_batch_on_this_cp_rank

    # The reference: CP = 1, EP = 1 on the same TP group, every expert TP-split over it.
    tp_group = mpu.get_tensor_model_parallel_group()
    reference_pg = ProcessGroupCollection(tp=tp_group, cp=solo_group, pp=solo_group, embd=solo_group,
                                          pos_embd=solo_group, tp_cp=tp_group, tp_dp_cp=tp_group, ep=solo_group,
                                          expt_tp=tp_group, tp_ep=tp_group, expt_dp=solo_group)
    reference = _moe_gpt_model(_moe_config(case, 1, 1), reference_pg)
    ref_logits, ref_loss, ref_grads = _run(reference, _batch())
    _reduce_grads_as_megatron(reference, ref_grads, tp_group, solo_group, solo_group)

    model = _moe_gpt_model(_moe_config(case, case.cp, case.ep), None)  # the stock path: megatron's global groups
    first_local_expert = mpu.get_expert_model_parallel_rank() * (NUM_EXPERTS // case.ep)
    reference_state = reference.state_dict()
    model.load_state_dict({name: reference_state[_global_expert_name(name, first_local_expert)]
                           for name in model.state_dict()})
    logits, loss, grads = _run(model, get_batch_on_this_cp_rank(_batch()))
    _reduce_grads_as_megatron(model, grads, tp_group, mpu.get_data_parallel_group(with_context_parallel=True),
                              mpu.get_expert_data_parallel_group())
    want = get_batch_on_this_cp_rank({"logits": ref_logits, "loss": ref_loss})
    errors = {"logits": _rel(logits, want["logits"]), "loss": _rel(loss, want["loss"])}
    for name, grad in grads.items():
        errors[f"grad {name}"] = _rel(grad, ref_grads[_global_expert_name(name, first_local_expert)])
    layers = model.decoder.layers
    return {"case": case, "rank": rank, "errors": errors,
            "mlps": [type(layer.mlp).__name__ for layer in layers],
            "local_experts": [len(layer.mlp.experts.local_experts) for layer in layers if hasattr(layer.mlp, "experts")],
            "shared_experts": [layer.mlp.shared_experts is not None for layer in layers if hasattr(layer.mlp, "experts")],
            "comm_types": {layer.self_attention.core_attention.runtime.prefill_comm for layer in layers}}


def _moe_cases_rank(rank, world_size, cases):
    """Per case: megatron's own initialize_model_parallel with its expert sizes, then the case."""
    from megatron.core import parallel_state as mpu

    _allow_megatron_rope_on_cpu()
    _allow_megatron_moe_on_cpu()
    _allow_megatron_sequence_parallel_on_cpu()
    solo_group = dist.new_group([rank], use_local_synchronization=True)
    results = []
    for case in cases:
        mpu.initialize_model_parallel(tensor_model_parallel_size=case.tp, context_parallel_size=case.cp,
                                      expert_model_parallel_size=case.ep)
        results.append(_moe_case(rank, case, solo_group))
        mpu.destroy_model_parallel()
    return results


@pytest.mark.parametrize("world_size", sorted(MOE_CASES))
def test_stock_megatron_moe_gpt_model_with_cp_core_attention_equals_cp1(world_size):
    results = run_ranks(world_size, _moe_cases_rank, MOE_CASES[world_size], timeout_s=120)
    failures = []
    for rank_results in results:
        for result in rank_results:
            case = result["case"]
            moe_layers = [1, 1] if case.layer_freq == 1 else case.layer_freq
            assert result["mlps"] == ["MoELayer" if moe else "MLP" for moe in moe_layers], result
            assert result["local_experts"] == [NUM_EXPERTS // case.ep] * sum(moe_layers), result
            assert result["shared_experts"] == [case.shared_ffn is not None] * sum(moe_layers), result
            assert result["comm_types"] == {case.comm or "p2p"}, result
            for name, (rel_max, mean) in result["errors"].items():
                limit = GRAD_RTOL if name.startswith("grad") else LOGIT_RTOL
                if not rel_max <= limit:
                    failures.append(f"{case} rank {result['rank']} {name}: max rel {rel_max:.3g} > {limit}, "
                                    f"mean abs {mean:.3g}")
    assert not failures, "\n".join(failures)
