"""cptoolkit attention as a megatron-core ``core_attention`` module, and the GPT layer spec using it.

megatron-core's ``SelfAttention`` computes Q/K/V (fused ``linear_qkv``), applies RoPE, then calls its
``core_attention`` submodule with ``[s, b, h, d]`` tensors and projects the ``[s, b, h·d]`` result.
``CPCoreAttention`` is that submodule: it routes to

- prefill, PCP = 1: plain causal block attention (``block_attention.attention_forward``);
- prefill, PCP > 1: DualChunkSwap ring attention (``ring_prefill.ring_prefill_attention``) on the
  rank's two chunks, the K/V of the other chunks arriving over the PCP group;
- decode: DCP sharded-KV decode (``dcp_decode.dcp_decode_attention``) over the decode group.

Which one runs is decided by an ``AttentionRuntime`` shared by every layer of a model and owned by
whoever drives the model (inference engine or trainer); the module itself has no parallel state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.distributed import ProcessGroup

from cptoolkit.layers.block_attention import attention_forward
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.dcp_decode import DecodeGroup, ShardedKVCache, dcp_decode_attention
from cptoolkit.layers.ring_prefill import ring_prefill_attention

ATTENTION_MODES = ("prefill", "decode")
LAYER_NORMS = {"llama": "RMSNorm", "gpt2": "LayerNorm"}

PrefillKVHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class AttentionRuntime:
    """Mutable per-model attention state, shared by every ``CPCoreAttention`` of one model.

    - ``pcp_group``: prefill context-parallel group (``None`` or size 1: the prompt is not sharded).
    - ``decode_group``: the DCP ``DecodeGroup`` (``cptoolkit.layers.dcp_decode``), decode only.
    - ``prefill_comm``: ``"p2p"`` (ring) or ``"all_gather"``; ``decode_comm``: the DCP backend name.
    - ``mode``: ``"prefill"`` (causal attention over the given tokens) or ``"decode"`` (one new token
      per sequence attends to its cache).
    - ``kv_caches``: ``{layer_number: cache}`` read and appended by decode (``dcp_decode``'s
      ``ShardedKVCache`` protocol); ``decode_positions [b]`` (int64): positions of the current
      decode step's tokens. The engine sets both before each decode step.
    - ``on_prefill_kv(layer_number, k [b, hkv, s_local, d], v)``: called with every prefill layer's
      post-RoPE K/V (this rank's shard) so the engine can fill its caches.
    - ``stats``: counts every collective the attention layers issue; ``layer_stats(n)`` is layer
      ``n``'s own count (it also counts into ``stats``).
    """

    pcp_group: Optional[ProcessGroup] = None
    decode_group: Optional[DecodeGroup] = None
    prefill_comm: str = "p2p"
    decode_comm: str = "a2a"
    mode: str = "prefill"
    kv_caches: dict[int, ShardedKVCache] = field(default_factory=dict)
    decode_positions: Optional[torch.Tensor] = None
    on_prefill_kv: Optional[PrefillKVHook] = None
    stats: CommStats = field(default_factory=CommStats)
    per_layer_stats: dict[int, CommStats] = field(default_factory=dict)

    def layer_stats(self, layer_number: int) -> CommStats:
        """Layer ``layer_number``'s collective tally (created on first use, counting into ``stats``)."""
        if layer_number not in self.per_layer_stats:
            self.per_layer_stats[layer_number] = CommStats(parent=self.stats)
        return self.per_layer_stats[layer_number]

    @property
    def pcp_size(self) -> int:
        return 1 if self.pcp_group is None else self.pcp_group.size()


class CPCoreAttention(MegatronModule):
    """Context-parallel core attention with megatron-core 0.16 ``DotProductAttention``'s interface.

    Inputs ``query [s, b, hq, d]``, ``key``/``value [s, b, hkv, d]`` are this TP rank's heads
    (``hq = num_attention_heads / TP``, ``hkv = num_query_groups / TP``) after RoPE; in prefill ``s``
    is the rank's PCP shard of the prompt (its two DualChunkSwap chunks, in position order within
    each chunk), in decode ``s = 1``. Returns ``[s, b, hq·d]``. The causal mask is implied by the
    token positions, so ``attention_mask`` is ignored; dropout, attention bias and packed sequences
    are not supported.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, *,
                 runtime: AttentionRuntime):
        super().__init__(config=config)
        _check_supported(config, attn_mask_type, attention_type, attention_dropout)
        self.layer_number = layer_number
        self.runtime = runtime
        self.softmax_scale = (1.0 / math.sqrt(config.kv_channels) if softmax_scale is None
                              else softmax_scale)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params: Any = None
                ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("CPCoreAttention supports neither attention_bias nor packed_seq_params "
                             "(rule: dense [s, b, h, d] causal self-attention only)")
        # [s, b, h, d] -> [b, h, s, d], the layout of every cptoolkit attention kernel.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.runtime.mode == "prefill":
            out = self._prefill(q, k, v)
        elif self.runtime.mode == "decode":
            out = self._decode(q, k, v)
        else:
            raise ValueError(f"AttentionRuntime.mode={self.runtime.mode!r} is not one of "
                             f"{ATTENTION_MODES}")
        seq_len, batch = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, -1)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over the prompt; ``q [b, hq, s_local, d]`` -> ``[b, hq, s_local, d]``."""
        runtime = self.runtime
        if runtime.on_prefill_kv is not None:
            runtime.on_prefill_kv(self.layer_number, k.detach(), v.detach())
        if runtime.pcp_size == 1:
            out, _ = attention_forward(q, k, v, causal=True, scale=self.softmax_scale)
            return out
        return ring_prefill_attention(q, k, v, pcp_group=runtime.pcp_group, comm=runtime.prefill_comm,
                                      scale=self.softmax_scale, stats=runtime.layer_stats(self.layer_number))

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One new token per sequence: ``q [b, hq, 1, d]``, ``k``/``v [b, hkv, 1, d]`` are appended
        to this layer's cache by its shard owner and attended over the DCP group."""
        runtime = self.runtime
        return dcp_decode_attention(q, k, v, runtime.kv_caches[self.layer_number],
                                    runtime.decode_positions, runtime.decode_group,
                                    runtime.decode_comm, self.softmax_scale, runtime.layer_stats(self.layer_number))


def _check_supported(config: TransformerConfig, attn_mask_type: AttnMaskType, attention_type: str,
                     attention_dropout: Optional[float]) -> None:
    dropout = config.attention_dropout if attention_dropout is None else attention_dropout
    if dropout != 0.0:
        raise ValueError(f"attention_dropout={dropout} is not supported by CPCoreAttention "
                         "(rule: must be 0.0)")
    if attention_type != "self" or attn_mask_type != AttnMaskType.causal:
        raise ValueError(f"CPCoreAttention got attention_type={attention_type!r}, "
                         f"attn_mask_type={attn_mask_type}; rule: causal self-attention only")
    if config.context_parallel_size != 1:
        raise ValueError(f"context_parallel_size={config.context_parallel_size} in the megatron "
                         "config; rule: must be 1, cptoolkit's PCP/DCP run inside CPCoreAttention "
                         "(pass the groups through AttentionRuntime)")


def get_gpt_layer_spec(runtime: AttentionRuntime, arch: str) -> ModuleSpec:
    """megatron-core's local GPT layer spec with ``CPCoreAttention`` as its core attention.

    ``arch="llama"``: RMSNorm (SwiGLU comes from the config's ``gated_linear_unit``);
    ``arch="gpt2"``: LayerNorm. Every layer built from the spec shares ``runtime``.
    """
    if arch not in LAYER_NORMS:
        raise ValueError(f"arch={arch!r} is not supported; rule: one of {sorted(LAYER_NORMS)}")
    spec = get_gpt_layer_local_spec(normalization=LAYER_NORMS[arch])
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=CPCoreAttention, params={"runtime": runtime})
    return spec
