"""Multi-head latent attention (DeepSeek-V2/V3) as a megatron-core ``self_attention`` module, over the same
TP x PCP x DCP layout as every other cptoolkit attention.

Per token (``MLADims``): ``kv_down`` makes ``[c (kv_lora_rank) | k_rope (qk_rope_head_dim)]``; ``c`` is
RMS-normed, ``k_rope`` rotated (one RoPE key shared by all heads). ``kv_up`` expands ``c`` per head into
``k_nope (qk_nope_head_dim)`` and ``v (v_head_dim)``; the queries are ``[q_nope | q_rope]`` per head (through
the ``q_lora_rank`` bottleneck and its norm when there is one). The KV cache holds only the *latent*
``[c | k_rope]`` of each token: one "KV head" shared by every query head, sharded over DCP by the usual
position -> shard -> slot rules; nothing of it is per head, so nothing is replicated per TP rank beyond what
DCP removes.

Two exact forms of the same attention (``softmax_scale`` the same in both):

- **expanded** (prefill without a cached history, training): per-head ``k = [k_nope | k_rope]``,
  ``v`` as they are, causal attention over PCP with the layer's ring / all-gather / a2a (``CPCoreAttention``).
  The kernels want ``v`` as wide as ``k``, so ``v`` is zero-padded and the padding cut from the output.
- **absorbed** (decode, and prefill chunks over a cached history): ``q_nope`` is multiplied into latent space
  by ``kv_up``'s key part (``q_abs = [q_nope W_UK | q_rope]``, one ``kv_lora_rank + qk_rope_head_dim`` vector per
  head), so ``q_abs . latent = q_nope . k_nope + q_rope . k_rope``: MQA against the latent itself, with the
  latent as the values too; the first ``kv_lora_rank`` channels of the output, multiplied by ``kv_up``'s value
  part ``W_UV``, are the heads' outputs (the last ``qk_rope_head_dim`` channels, RoPE keys averaged, are
  dropped). DCP decode and context attention run unchanged on it, LSE merge included.

TP splits the heads: ``q_up`` / ``q_proj`` and ``kv_up`` by output rows, ``linear_proj`` by input columns (one
all-reduce); ``q_down``, ``kv_down`` and both norms are replicated, and their outputs enter the TP region through
megatron's ``copy_to_tensor_model_parallel_region`` so their gradients are summed over TP.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from cptoolkit.layers.core_attention import AttentionRuntime, CPCoreAttention
from cptoolkit.layers.mla_dims import MLADims


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE on the last dim of ``x`` (``d`` channels) with ``cos``/``sin`` of ``d / 2`` angles (broadcast).

    ``interleaved``: pairs ``(2i, 2i+1)`` rotate by angle ``i`` (DeepSeek's layout); else ``(i, i + d/2)``.
    Either way the result is laid out as halves ``[x1' | x2']``: queries and keys get the same layout, so
    their dot products equal those of the pairs in place (transformers' ``apply_rotary_pos_emb_interleave``)."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLASelfAttention(MegatronModule):
    """MLA with megatron-core ``SelfAttention``'s call signature: ``hidden_states [s, b, hidden]`` -> ``(out [s,
    b, hidden], None)``; ``rotary_pos_emb [s, b, 1, qk_rope_head_dim]`` are RoPE's angles (``cat(freqs, freqs)``,
    as ``gpt_forward`` makes them). ``runtime`` decides the phase (``AttentionPhase``) like ``CPCoreAttention``'s;
    its ``on_prefill_kv`` hook receives the latent ``[b, 1, s, kv_lora_rank + qk_rope_head_dim]`` as both key and
    value, the layout the KV cache stores (``PagedKVCache(values_are_keys=True)``). ``rope_attention_factor``
    multiplies cos and sin (YaRN's ``attention_factor``: the RoPE part of every score by its square)."""

    def __init__(self, config: TransformerConfig, layer_number: int,
                 pg_collection: Optional[ProcessGroupCollection] = None, cp_comm_type: Optional[str] = None, *,
                 runtime: AttentionRuntime, mla: MLADims, softmax_scale: float, rope_attention_factor: float = 1.0):
        super().__init__(config=config)
        self.tp_group = pg_collection.tp
        tp_size = self.tp_group.size()
        if config.num_attention_heads % tp_size:
            raise ValueError(f"num_attention_heads={config.num_attention_heads} must be a multiple of TP={tp_size}")
        self.mla, self.layer_number, self.rope_attention_factor = mla, layer_number, rope_attention_factor
        self.heads = config.num_attention_heads // tp_size
        hidden, eps, heads = config.hidden_size, config.layernorm_epsilon, self.heads
        if mla.q_lora_rank is None:
            self.linear_q_proj = torch.nn.Linear(hidden, heads * mla.qk_head_dim, bias=False)
        else:
            self.linear_q_down_proj = torch.nn.Linear(hidden, mla.q_lora_rank, bias=False)
            self.q_layernorm = torch.nn.RMSNorm(mla.q_lora_rank, eps=eps)
            self.linear_q_up_proj = torch.nn.Linear(mla.q_lora_rank, heads * mla.qk_head_dim, bias=False)
        self.linear_kv_down_proj = torch.nn.Linear(hidden, mla.latent_dim, bias=False)
        self.kv_layernorm = torch.nn.RMSNorm(mla.kv_lora_rank, eps=eps)
        self.linear_kv_up_proj = torch.nn.Linear(mla.kv_lora_rank, heads * (mla.qk_nope_head_dim + mla.v_head_dim),
                                                 bias=False)
        self.linear_proj = torch.nn.Linear(heads * mla.v_head_dim, hidden, bias=False)
        self.core_attention = CPCoreAttention(config, layer_number, AttnMaskType.causal, "self",
                                              softmax_scale=softmax_scale, cp_comm_type=cp_comm_type,
                                              runtime=runtime)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb: Optional[torch.Tensor] = None, **unused) -> tuple[torch.Tensor, None]:
        m, seq_len, batch = self.mla, hidden_states.shape[0], hidden_states.shape[1]
        if rotary_pos_emb is None:
            raise ValueError("MLASelfAttention needs rotary_pos_emb (RoPE angles per token): "
                             "run it through gpt_forward")
        q_nope, q_rope = self._queries(hidden_states).split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        latent = copy_to_tensor_model_parallel_region(self.linear_kv_down_proj(hidden_states), group=self.tp_group)
        c, k_rope = latent.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        c = self.kv_layernorm(c)
        angles = rotary_pos_emb[..., :m.qk_rope_head_dim // 2].float()
        cos, sin = angles.cos() * self.rope_attention_factor, angles.sin() * self.rope_attention_factor
        q_rope = rotate(q_rope.float(), cos, sin, m.rope_interleave).to(q_nope.dtype)        # [s, b, h, r]
        k_rope = rotate(k_rope.float(), cos[:, :, 0], sin[:, :, 0], m.rope_interleave).to(c.dtype)  # [s, b, r]
        latent = torch.cat([c, k_rope], dim=-1).permute(1, 0, 2).unsqueeze(1)                  # [b, 1, s, L+R]
        phase = self.core_attention.runtime.phase
        if phase.mode == "prefill" and phase.on_prefill_kv is not None:
            cached = latent.detach()
            phase.on_prefill_kv(self.layer_number, cached, cached)  # the same tensor: routed and stored once
        if phase.mode == "prefill" and phase.history_lens is None:
            out = self._expanded(q_nope, q_rope, c, k_rope)
        else:
            out = self._absorbed(q_nope, q_rope, latent, decode=phase.mode == "decode")
        out = out.permute(2, 0, 1, 3).reshape(seq_len, batch, self.heads * m.v_head_dim)      # [s, b, h * v]
        return reduce_from_tensor_model_parallel_region(self.linear_proj(out), group=self.tp_group), None

    def _queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[s, b, h, qk_nope + qk_rope]`` for this rank's heads."""
        if self.mla.q_lora_rank is None:
            q = self.linear_q_proj(copy_to_tensor_model_parallel_region(hidden_states, group=self.tp_group))
        else:
            q_latent = self.q_layernorm(self.linear_q_down_proj(hidden_states))
            q = self.linear_q_up_proj(copy_to_tensor_model_parallel_region(q_latent, group=self.tp_group))
        return q.view(*hidden_states.shape[:2], self.heads, self.mla.qk_head_dim)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_up``'s per-head key and value parts: ``W_UK [h, qk_nope, L]``, ``W_UV [h, v, L]``."""
        m = self.mla
        weight = self.linear_kv_up_proj.weight.view(self.heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        return weight[:, :m.qk_nope_head_dim], weight[:, m.qk_nope_head_dim:]

    def _expanded(self, q_nope, q_rope, c, k_rope) -> torch.Tensor:
        """Per-head K/V from the latent, causal attention over PCP: ``[b, h, s, v]``."""
        m = self.mla
        k_nope, v = self.linear_kv_up_proj(c).view(*c.shape[:2], self.heads, -1).split(
            [m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, self.heads, -1)], dim=-1)
        width = max(m.qk_head_dim, m.v_head_dim)  # the kernels take one head width for q, k and v
        q, k, v = (F.pad(t, (0, width - t.shape[-1])).permute(1, 2, 0, 3) for t in (q, k, v))
        return self.core_attention.attend(q, k, v)[..., :m.v_head_dim]

    def _absorbed(self, q_nope, q_rope, latent, decode: bool) -> torch.Tensor:
        """Queries in latent space against the latent (MQA, the latent as keys and values): ``[b, h, s, v]``."""
        w_uk, w_uv = self._up_weights()
        q = torch.cat([torch.einsum("sbhn,hnl->sbhl", q_nope, w_uk), q_rope], dim=-1).permute(1, 2, 0, 3)
        attend = self.core_attention.decode if decode else self.core_attention.attend_with_history
        out = attend(q, latent, latent)[..., :self.mla.kv_lora_rank]                            # [b, h, s, L]
        return torch.einsum("bhsl,hvl->bhsv", out, w_uv)
