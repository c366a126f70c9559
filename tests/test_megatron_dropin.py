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

megatron-core 0.16.1 is GPU-bound in two places a CPU run reaches; the ranks of this test (only they)
neutralise exactly those calls, see ``_allow_megatron_rope_on_cpu``.
"""
from __future__ import annotations

import re

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
     r"^query heads \(6\) must be a multiple of the a2a group size \(4\): "),
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
