"""The model: megatron-core's ``GPTModel`` (Llama or GPT-2 shaped) with cptoolkit's attention, and its forward.

``gpt_forward`` runs embedding -> decoder -> final norm -> output layer for arbitrary position ids
(DualChunkSwap shards hold non-contiguous positions, decode steps of different requests sit at
different positions), so RoPE is computed here from the model's ``inv_freq`` (``cptoolkit.models.rope``,
every ``rope_type`` of the shape) rather than by megatron's contiguous-position path. It returns
full-vocabulary logits or per-token losses.
Construction is ``cptoolkit.models.build``; the TP split of the weights, ``cptoolkit.models.tp_sharding``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from torch.distributed import ProcessGroup

from cptoolkit.layers.comm import all_gather
from cptoolkit.layers.core_attention import PREFILL, AttentionPhase, AttentionRuntime
from cptoolkit.models import inference_layers, rope
from cptoolkit.models.matmul_plan import MatmulPlan
from cptoolkit.models.shape import GPTShape


class CPGPTModel(GPTModel):
    """megatron-core's ``GPTModel`` that remembers its ``GPTShape`` (``shape``): the vocabulary is
    padded to a multiple of TP inside megatron, and the loaders and ``gpt_forward`` need the real
    sizes. Its RoPE frequencies are the shape's (megatron's ``RotaryEmbedding`` knows no linear or YaRN
    scaling), held in megatron's own ``rotary_pos_emb.inv_freq`` so both forward paths use them; Gemma 3's
    local layers' own (``local_inv_freq``, None otherwise) only ``gpt_forward`` applies. ``matmul_plan`` says how
    the inference forward computes the replayed layers' and the output layer's products (``matmul_plan``:
    megatron's ``x @ W^T`` until the engine gives the model a tuning plan)."""

    def __init__(self, shape: GPTShape, **gpt_model_kwargs):
        super().__init__(**gpt_model_kwargs)
        self.shape = shape
        self.matmul_plan = MatmulPlan()
        if self.position_embedding_type == "rope":
            self.rotary_pos_emb.inv_freq = rope.inv_freq(shape)  # a plain attribute: stays float32 under .to(dtype)
        self.local_inv_freq = rope.local_inv_freq(shape)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` / ``.cuda()`` move the RoPE tables with the parameters, still float32 (plain attributes,
        so a dtype change leaves them alone): a forward reads them where the positions are, with no copy (a copy
        per forward would also keep the decode step out of a CUDA graph)."""
        super()._apply(fn, recurse)
        device = next(self.parameters()).device
        if getattr(self, "position_embedding_type", None) == "rope":
            self.rotary_pos_emb.inv_freq = self.rotary_pos_emb.inv_freq.to(device)
        if getattr(self, "local_inv_freq", None) is not None:
            self.local_inv_freq = self.local_inv_freq.to(device)
        return self


def rotary_freqs(model: CPGPTModel, position_ids: torch.Tensor, inv_freq: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
    """RoPE angles for arbitrary positions: ``position_ids [b, s]`` -> ``[s, b, 1, head_dim]``,
    laid out as megatron's ``apply_rotary_pos_emb`` expects (non-interleaved halves); ``inv_freq`` (default:
    the model's global RoPE) ``[head_dim / 2]``."""
    inv_freq = (model.rotary_pos_emb.inv_freq if inv_freq is None else inv_freq).to(position_ids.device)
    angles = position_ids.t().float().unsqueeze(-1) * inv_freq  # [s, b, head_dim / 2]
    return torch.cat([angles, angles], dim=-1).unsqueeze(2)


class _TPCrossEntropy(torch.autograd.Function):
    """megatron's vocab-parallel cross entropy (its ``VocabParallelCrossEntropy`` steps) with the
    TP group passed explicitly: ``logits [s, b, v_local]``, ``target [s, b]`` -> ``loss [s, b]``
    in float32; three all-reduces over ``tp_group``."""

    @staticmethod
    def forward(ctx, logits, target, tp_group):
        steps = VocabParallelCrossEntropy
        logits, logits_max = steps.calculate_logits_max(logits.clone())
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
        vocab_start = tp_group.rank() * logits.shape[-1]
        target_mask, masked_target, predicted, sum_exp, exp_logits = steps.calculate_predicted_logits(
            logits, target, logits_max, vocab_start, vocab_start + logits.shape[-1])
        dist.all_reduce(predicted, group=tp_group)
        dist.all_reduce(sum_exp, group=tp_group)
        softmax, loss = steps.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, target_mask, masked_target = ctx.saved_tensors
        steps = VocabParallelCrossEntropy
        grad_2d, arange_1d, update, grad_logits = steps.prepare_gradient_calculation_operands(
            softmax, target_mask)
        return steps.calculate_gradients(grad_2d, arange_1d, masked_target, update, grad_logits,
                                         grad_loss), None, None


def _gather_vocab(logits: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """``[s, b, v_local]`` -> ``[s, b, v_padded]`` with one all-gather over ``tp_group``: ``comm.all_gather`` (through
    shared memory where the group has it) when no gradient is to flow back; else ``torch.distributed``'s, and the
    gradient reaches only this rank's slice, as in megatron's gather-from-TP-region (which allocates its buffer with
    ``torch.cuda.current_device()`` and so cannot run on CPU)."""
    if tp_group.size() == 1:
        return logits
    if not logits.requires_grad:
        return all_gather(logits, tp_group).movedim(0, -2).flatten(-2)
    slices = [torch.empty_like(logits) for _ in range(tp_group.size())]
    dist.all_gather(slices, logits.detach().contiguous(), group=tp_group)
    slices[tp_group.rank()] = logits
    return torch.cat(slices, dim=-1)


def _mask_vocab_padding(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Set the logits of padding vocabulary ids (``>= vocab_size``) to -inf on this TP slice."""
    vocab_ids = torch.arange(logits.shape[-1], device=logits.device) + tp_rank * logits.shape[-1]
    return logits.masked_fill(vocab_ids >= vocab_size, float("-inf"))


def gpt_forward(model: CPGPTModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
                runtime: AttentionRuntime, labels: Optional[torch.Tensor] = None,
                logits_index: Optional[torch.Tensor] = None, phase: AttentionPhase = PREFILL,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the model on ``input_ids [b, s]`` at ``position_ids [b, s]`` (any positions).

    ``runtime`` must be the one the model was built with; ``phase`` (set on it for this forward only)
    decides prefill (the tokens attend causally to each other, and to a cached history when
    ``phase.history_lens`` is set; with PCP > 1 they are this rank's DualChunkSwap shard) or decode
    (``s == 1``: each token attends to its sequence's cache). Returns ``logits [b, s, vocab_size]``
    (float32, or float64 for a float64 model; gathered over TP) or, with ``labels [b, s]``, the
    per-token cross-entropy ``[b, s]`` computed on vocab-parallel logits. ``logits_index [b]`` (local
    token index per sequence) computes the logits of those tokens only, ``[b, 1, vocab_size]``: a
    prompt's last token during prefill, without materializing ``s x vocab`` logits. ``padding_mask [b, s]`` (True
    at padding tokens) reaches the MoE layers, which keep padding out of their load statistics.
    """
    hidden = gpt_hidden(model, input_ids, position_ids, runtime, phase, padding_mask)
    if logits_index is not None:  # hidden [s, b, h] -> [1, b, h]: row logits_index[i] of sequence i
        hidden = hidden.gather(0, logits_index.view(1, -1, 1).expand(1, -1, hidden.shape[-1]))
    if labels is not None:
        logits = _local_logits(model, hidden)
        logits = _mask_vocab_padding(logits, model.shape.vocab_size, model.pg_collection.tp.rank())
        return _TPCrossEntropy.apply(logits, labels.t().contiguous(), model.pg_collection.tp).t()
    return gpt_logits(model, hidden)


def gpt_hidden(model: CPGPTModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
               runtime: AttentionRuntime, phase: AttentionPhase = PREFILL,
               padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Embedding -> decoder -> final norm on ``input_ids [b, s]`` at ``position_ids [b, s]`` (see
    ``gpt_forward``): the final hidden states ``[s, b, hidden]``, for ``gpt_logits``."""
    if phase.mode == "decode" and input_ids.shape[1] != 1 and \
            tuple(phase.decode_positions.shape) != tuple(input_ids.shape):
        raise ValueError(f"decode of {input_ids.shape[1]} tokens per sequence needs decode_positions shaped like "
                         f"input_ids {tuple(input_ids.shape)}; got {tuple(phase.decode_positions.shape)}")
    hidden = model.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
    if model.shape.gemma is not None:  # sqrt(hidden) rounded to the weights' dtype, as transformers' Gemma
        hidden = hidden * torch.tensor(model.shape.hidden_size ** 0.5, dtype=hidden.dtype)
    rotary = rotary_freqs(model, position_ids) if model.position_embedding_type == "rope" else None
    if model.local_inv_freq is not None:  # Gemma 3: GemmaSelfAttention picks its layer's angles
        rotary = {"global": rotary, "local": rotary_freqs(model, position_ids, model.local_inv_freq)}
    with runtime.use_phase(phase):
        if not torch.is_grad_enabled() and inference_layers.supports(model):  # megatron's math, not its modules
            return inference_layers.replayed_decoder(model, hidden, rotary)
        return model.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary,
                             padding_mask=padding_mask)


def _local_logits(model: CPGPTModel, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden [s, b, h]`` -> this TP rank's vocabulary slice ``[s, b, vocab_padded / TP]``, float32 or wider;
    capped as ``c * tanh(logits / c)`` with Gemma's ``final_logit_softcapping`` ``c``."""
    output_weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    if torch.is_grad_enabled() or not _plain_output_layer(model):
        logits, _ = model.output_layer(hidden, weight=output_weight)
    else:  # the layer's forward without autograd: this rank's vocabulary slice, the product as the plan says
        logits = model.matmul_plan.linear(hidden, model.output_layer.weight if output_weight is None else output_weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    cap = model.shape.gemma.final_logit_softcapping if model.shape.gemma is not None else None
    return logits if cap is None else cap * torch.tanh(logits / cap)


def _plain_output_layer(model: CPGPTModel) -> bool:
    """Whether ``model.output_layer``'s forward is ``hidden @ W^T`` on this rank's vocabulary slice: no bias, no
    sequence parallelism, no gather."""
    layer = model.output_layer
    return layer.bias is None and not layer.sequence_parallel and not layer.gather_output


def gpt_logits(model: CPGPTModel, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden [s, b, h]`` (from ``gpt_hidden``) -> ``logits [b, s, vocab_size]`` gathered over TP
    (one all-gather on the TP group: every TP rank must call it with the same ``s``)."""
    logits = _gather_vocab(_local_logits(model, hidden), model.pg_collection.tp)
    return logits.transpose(0, 1)[..., :model.shape.vocab_size]
