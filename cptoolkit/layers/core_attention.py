"""cptoolkit attention as a megatron-core ``core_attention`` module, and the GPT layer spec using it.

megatron-core's ``SelfAttention`` computes Q/K/V (fused ``linear_qkv``), applies RoPE, then calls its
``core_attention`` submodule with ``[s, b, h, d]`` tensors and projects the ``[s, b, h·d]`` result.
``CPCoreAttention`` is that submodule: it routes to

- prefill, PCP = 1: plain causal block attention (``block_attention.attention_forward``);
- prefill, PCP > 1: DualChunkSwap context-parallel attention (``ring_prefill.ring_prefill_attention``:
  ``p2p``, ``all_gather``, ``a2a`` or ``a2a+p2p``) on the rank's two chunks over the PCP group;
- decode: DCP sharded-KV decode (``dcp_decode.dcp_decode_attention``) over the decode group.

Which one runs is decided by an ``AttentionRuntime``. Two ways to get one:

- cptoolkit's engine and trainer pass ``runtime=``: one runtime shared by every layer of a model and
  owned by whoever drives it (it switches prefill/decode and holds the KV caches);
- megatron-core builds the module with its own arguments only (the drop-in): ``runtime_from_megatron``
  makes a prefill-only runtime per layer from megatron's CP settings — the PCP group is
  ``pg_collection.cp`` (megatron's global CP group when no collection is passed), the algorithm is
  ``cp_comm_type`` (``None``: ``p2p``), ``a2a+p2p`` takes ``pg_collection.hcp`` (or builds the groups
  from ``config.hierarchical_context_parallel_sizes``). megatron shards the batch and RoPE itself, in
  the same DualChunkSwap order (``megatron.core.utils.get_batch_on_this_cp_rank``).

Sliding windows come from megatron's own config either way: a layer that megatron's
``is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)`` calls
windowed attends, in every phase, to its ``window_size[0] + 1`` latest positions (itself included); causal
layers only (``window_size[1]`` must be 0). ``softcap`` (a spec parameter: Gemma 2's attention logit
softcapping) caps every score as ``softcap * tanh(s / softcap)``. ``attention_sinks=True`` (a spec parameter:
gpt-oss) gives the module a learned ``sinks`` parameter, one logit per query head of this TP rank, which every
path adds to each query's softmax denominator (``lse_merge.add_sinks``).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from megatron.core import parallel_state as mpu
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from torch.distributed import ProcessGroup

from cptoolkit.layers.algorithms import DecodeComm, PrefillComm, prefill_algorithm
from cptoolkit.layers.block_attention import attention_forward, check_sinks, current_backend
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.context_attention import context_attention
from cptoolkit.layers.dcp_decode import DecodeGroup, ShardedKVCache, dcp_decode_attention
from cptoolkit.layers.dual_chunk_swap import shard_positions
from cptoolkit.layers.hierarchical_prefill import HierarchicalGroups, check_groups, new_hierarchical_groups
from cptoolkit.layers.ring_prefill import ring_prefill_attention
from cptoolkit.layers.sliding_window import LocalAttention

ATTENTION_MODES = ("prefill", "decode")
LAYER_NORMS = {"llama": "RMSNorm", "gpt2": "LayerNorm"}

PrefillKVHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True, eq=False)
class AttentionPhase:
    """What one forward pass asks of every attention layer: set once per forward (``gpt_forward``'s
    ``phase``), read by every ``CPCoreAttention``, never mutated in between.

    - ``mode``: ``"prefill"`` (causal attention over the given tokens; training is prefill) or
      ``"decode"`` (one new token per sequence, or ``L`` consecutive ones, attends to its cache).
    - ``kv_caches``: ``{layer_number: cache}`` (``dcp_decode``'s ``ShardedKVCache`` protocol): decode
      appends and reads it; a prefill over a cached history reads it.
    - ``decode_positions [b]`` (int64): positions of a decode step's tokens; ``[b, L]`` for ``L`` tokens
      per sequence (speculative decoding's verification, ``dcp_decode_attention``).
    - ``history_lens [b]`` (int64, prefill only): tokens of each sequence already in ``kv_caches``;
      the given tokens continue at those positions and attend the history too
      (``context_attention``). ``None``: no history.
    - ``on_prefill_kv(layer_number, k [b, hkv, s_local, d], v)``: called with every prefill layer's
      post-RoPE K/V (this rank's shard) before its attention, so the engine can fill its caches.
    """

    mode: str = "prefill"
    kv_caches: Mapping[int, ShardedKVCache] = field(default_factory=dict)
    decode_positions: Optional[torch.Tensor] = None
    history_lens: Optional[torch.Tensor] = None
    on_prefill_kv: Optional[PrefillKVHook] = None

    def __post_init__(self):
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"AttentionPhase.mode={self.mode!r} is not one of {ATTENTION_MODES}")
        if self.mode == "decode" and (self.decode_positions is None or not self.kv_caches):
            raise ValueError("AttentionPhase(mode='decode') needs decode_positions and kv_caches")
        if self.history_lens is not None and (self.mode != "prefill" or not self.kv_caches):
            raise ValueError("AttentionPhase.history_lens needs mode='prefill' and the kv_caches holding the history")


PREFILL = AttentionPhase()


@dataclass
class AttentionRuntime:
    """Per-model attention state, shared by every ``CPCoreAttention`` of one model.

    - ``pcp_group``: prefill context-parallel group (``None`` or size 1: the prompt is not sharded).
    - ``decode_group``: the DCP ``DecodeGroup`` (``cptoolkit.layers.dcp_decode``), decode only.
    - ``prefill_comm``: a prefill algorithm (``algorithms.PREFILL_ALGORITHMS``: ``"p2p"`` ring, ``"all_gather"``,
      ``"a2a"`` or ``"a2a+p2p"``); ``hcp_groups``: this rank's a2a and ring sub-groups of ``pcp_group``, for a
      hierarchical one (``"a2a+p2p"``) only.
    - ``decode_comm``: a decode algorithm (``algorithms.DECODE_ALGORITHMS``: ``"a2a"`` or ``"ag_rs"``).
    - ``phase``: the current forward's ``AttentionPhase`` (``PREFILL`` between forwards); only
      ``gpt_forward`` (``use_phase``) changes it.
    - ``stats``: counts every collective the attention layers issue; ``layer_stats(n)`` is layer
      ``n``'s own count (it also counts into ``stats``).
    """

    pcp_group: Optional[ProcessGroup] = None
    decode_group: Optional[DecodeGroup] = None
    prefill_comm: PrefillComm = "p2p"
    hcp_groups: Optional[HierarchicalGroups] = None
    decode_comm: DecodeComm = "a2a"
    phase: AttentionPhase = PREFILL
    stats: CommStats = field(default_factory=CommStats)
    per_layer_stats: dict[int, CommStats] = field(default_factory=dict)

    @contextlib.contextmanager
    def use_phase(self, phase: AttentionPhase) -> Iterator[None]:
        """``phase`` for the duration of one forward, ``PREFILL`` again afterwards."""
        self.phase = phase
        try:
            yield
        finally:
            self.phase = PREFILL

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
    token positions, so ``attention_mask`` is ignored; dropout and attention bias are not supported.
    Packed sequences (megatron's ``packed_seq_params``, ``qkv_format="thd"``): see ``_packed_prefill``.

    ``runtime=None`` (megatron building the module): the runtime comes from ``config``,
    ``cp_comm_type`` and ``pg_collection`` (``runtime_from_megatron``); a bad combination raises one
    ValueError here, on every rank.

    ``attention_sinks=True``: a learned parameter ``sinks [num_attention_heads / TP]`` in ``config.params_dtype``
    (as megatron's ``softmax_offset`` and transformers' gpt-oss ``sinks``; the sink math runs in float32), this
    TP rank's query heads in megatron's order (``tp_sharding``'s column split); zeros, or
    ``config.init_method`` when ``config.perform_initialization``. Not with the ``te`` attention backend.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, *,
                 runtime: Optional[AttentionRuntime] = None, softcap: Optional[float] = None,
                 attention_sinks: bool = False):
        super().__init__(config=config)
        _check_supported(config, attn_mask_type, attention_type, attention_dropout)
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap={softcap!r}; rule: a positive number (the scores' cap), or None")
        if runtime is None:
            runtime = runtime_from_megatron(config, layer_number, cp_comm_type, pg_collection)
        else:
            _check_runtime(config, cp_comm_type, runtime)
        self.layer_number = layer_number
        self.runtime = runtime
        self.softmax_scale = (1.0 / math.sqrt(config.kv_channels) if softmax_scale is None
                              else softmax_scale)
        self.window = layer_window(config, layer_number)
        self.softcap = softcap
        self.sinks = _new_sinks(config, pg_collection) if attention_sinks else None
        if self.sinks is not None:  # the te rule at build time; each attention path checks the device's backend
            check_sinks(self.sinks, len(self.sinks), current_backend())

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params: Any = None
                ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("CPCoreAttention does not support attention_bias (rule: causal self-attention only)")
        if packed_seq_params is not None:
            return self._packed_prefill(query, key, value, packed_seq_params)
        # [s, b, h, d] -> [b, h, s, d], the layout of every cptoolkit attention kernel.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._prefill(q, k, v) if self.runtime.phase.mode == "prefill" else self.decode(q, k, v)
        seq_len, batch = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, -1)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over the prompt (and its cached history, if any);
        ``q [b, hq, s_local, d]`` -> ``[b, hq, s_local, d]``."""
        phase = self.runtime.phase
        if phase.on_prefill_kv is not None:
            phase.on_prefill_kv(self.layer_number, k.detach(), v.detach())
        return self.attend(q, k, v) if phase.history_lens is None else self.attend_with_history(q, k, v)

    def attend_with_history(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of this rank's shard of a prompt chunk ``[b, h, 2c, d]`` over itself and the
        history in the phase's caches (``context_attention``); the chunk's K/V must be in the caches already."""
        runtime, phase = self.runtime, self.runtime.phase
        return context_attention(q, k, v, phase.kv_caches[self.layer_number], phase.history_lens,
                                 runtime.decode_group, runtime.pcp_group if runtime.pcp_size > 1 else None,
                                 runtime.prefill_comm, runtime.decode_comm, self.softmax_scale,
                                 runtime.layer_stats(self.layer_number), self.window, self.softcap, self.sinks)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Exact causal attention of this rank's DualChunkSwap shard ``[b, h, 2c, d]`` over the PCP group
        (at PCP = 1: of the whole sequence, any length)."""
        runtime = self.runtime
        if runtime.pcp_size == 1:
            if self.window is not None or self.softcap is not None or self.sinks is not None:
                return LocalAttention.apply(q, k, v, self.softmax_scale, self.window, self.softcap,
                                            runtime.layer_stats(self.layer_number), self.sinks)
            out, _ = attention_forward(q, k, v, causal=True, scale=self.softmax_scale)
            return out
        return ring_prefill_attention(q, k, v, pcp_group=runtime.pcp_group, comm=runtime.prefill_comm,
                                      scale=self.softmax_scale, stats=runtime.layer_stats(self.layer_number),
                                      hcp_groups=runtime.hcp_groups, window=self.window, softcap=self.softcap,
                                      sinks=self.sinks)

    def _packed_prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        packed_seq_params: Any) -> torch.Tensor:
        """Packed (THD) causal attention: ``query [t, hq, d]``, ``key``/``value [t, hkv, d]`` -> ``[t, hq·d]``.

        ``t`` holds, sequence after sequence, this rank's DualChunkSwap shard of each packed sequence padded
        to ``cu_seqlens_*_padded`` (TransformerEngine's ``thd_get_partitioned_indices`` layout): chunks ``r``
        and ``2P-1-r`` of every sequence. Each sequence is attended on its own (one context-parallel
        attention call, with its collectives, per sequence); outputs at padding tokens are zero, so no
        gradient flows from them.
        """
        runtime, phase = self.runtime, self.runtime.phase
        if phase.mode != "prefill" or phase.on_prefill_kv is not None or phase.history_lens is not None:
            raise ValueError(f"packed_seq_params with AttentionPhase mode {phase.mode!r}, on_prefill_kv "
                             f"{'set' if phase.on_prefill_kv else 'None'}, history_lens "
                             f"{'set' if phase.history_lens is not None else 'None'}; rule: packed sequences are for plain prefill without a "
                             "cache or KV hook (training, megatron's forward)")
        pcp_rank = 0 if runtime.pcp_group is None else runtime.pcp_group.rank()
        outs = []
        for start, seq_len_padded, seq_len in packed_sequences(packed_seq_params, runtime.pcp_size,
                                                                 query.shape[0]):
            rows = slice(start, start + seq_len_padded // runtime.pcp_size)
            q, k, v = (t[rows].permute(1, 0, 2).unsqueeze(0) for t in (query, key, value))
            out = self.attend(q, k, v)[0].permute(1, 0, 2)  # [2c, hq, d]
            positions = (torch.arange(seq_len_padded) if runtime.pcp_size == 1
                         else shard_positions(seq_len_padded, pcp_rank, runtime.pcp_size))
            padding = positions >= seq_len
            outs.append(out.masked_fill(padding[:, None, None].to(out.device), 0.0))
        return torch.cat(outs).reshape(query.shape[0], -1)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """New tokens: ``q [b, hq, L, d]``, ``k``/``v [b, hkv, L, d]`` (usually ``L = 1``) are appended
        to this layer's cache by their shard owners and attended over the DCP group, causally."""
        runtime, phase = self.runtime, self.runtime.phase
        return dcp_decode_attention(q, k, v, phase.kv_caches[self.layer_number],
                                    phase.decode_positions, runtime.decode_group,
                                    runtime.decode_comm, self.softmax_scale, runtime.layer_stats(self.layer_number),
                                    self.window, self.softcap, self.sinks)


def packed_sequences(packed_seq_params: Any, pcp_size: int, local_tokens: int) -> list[tuple[int, int, int]]:
    """``(local start, padded length, length)`` of every non-empty sequence of megatron's ``PackedSeqParams``.

    Rules (ValueError naming the value): ``qkv_format`` is ``"thd"``; q and kv boundaries are equal
    (self-attention); with ``pcp_size > 1`` the ``cu_seqlens_*_padded`` boundaries are given and every padded
    length is a multiple of ``2·pcp_size`` (DualChunkSwap per sequence; PCP = 1 needs no padding); each length
    fits its padded length; the padded total over ``pcp_size`` is the number of local tokens ``t``.
    """
    p = packed_seq_params
    if p.qkv_format != "thd":
        raise ValueError(f"packed_seq_params.qkv_format ({p.qkv_format!r}) must be 'thd': CPCoreAttention takes "
                         "packed sequences in megatron's THD format only")
    bounds = [[int(x) for x in cu] if cu is not None else None
              for cu in (p.cu_seqlens_q, p.cu_seqlens_kv, p.cu_seqlens_q_padded, p.cu_seqlens_kv_padded)]
    if bounds[0] != bounds[1] or bounds[2] != bounds[3]:
        raise ValueError(f"cu_seqlens_q ({bounds[0]}) / cu_seqlens_kv ({bounds[1]}) and their _padded forms "
                         f"({bounds[2]} / {bounds[3]}) must be equal: packed causal self-attention")
    cu_seqlens, cu_padded = bounds[0], bounds[2]
    if cu_padded is None:
        if pcp_size > 1:
            raise ValueError(f"packed_seq_params.cu_seqlens_q_padded (None) must be given with context parallelism "
                             f"(PCP={pcp_size}): pad every sequence to a multiple of 2·PCP = {2 * pcp_size}, "
                             f"split per sequence by DualChunkSwap (TransformerEngine's THD layout)")
        cu_padded = cu_seqlens
    lengths = [end - start for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    padded = [end - start for start, end in zip(cu_padded[:-1], cu_padded[1:])]
    chunked = pcp_size > 1  # DualChunkSwap needs 2·PCP equal chunks per sequence; PCP = 1 splits nothing
    if len(lengths) != len(padded) or any(chunked and n % (2 * pcp_size) or n < length
                                          for n, length in zip(padded, lengths)):
        raise ValueError(f"padded sequence lengths {padded} (cu_seqlens_q_padded) must each be a multiple of 2·PCP "
                         f"= {2 * pcp_size} and at least the sequence's length {lengths} (cu_seqlens_q)")
    if cu_padded[-1] != local_tokens * pcp_size:
        raise ValueError(f"the THD tensors hold {local_tokens} tokens; rule: cu_seqlens_q_padded[-1] / PCP = "
                         f"{cu_padded[-1]} / {pcp_size} tokens, this rank's share of every padded sequence")
    starts = [start // pcp_size for start in cu_padded[:-1]]
    return [(start, n, length) for start, n, length in zip(starts, padded, lengths) if n > 0]


def layer_window(config: TransformerConfig, layer_number: int) -> Optional[int]:
    """The sliding window of layer ``layer_number`` under megatron's ``window_size`` / ``window_attn_skip_freq``
    (``is_layer_window_attention``): ``window_size[0] + 1`` positions (a query and the ``window_size[0]``
    before it), None for full attention (no window, a skipped layer, or ``window_size[0] == -1``)."""
    if not is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        return None
    left, right = config.window_size
    if right != 0 or not isinstance(left, int) or left < -1:
        raise ValueError(f"window_size={tuple(config.window_size)!r} of layer {layer_number}; rule: (left, 0) with "
                         "left >= 0 tokens before each query, or -1 for no limit: CPCoreAttention is causal, so no "
                         "query sees a later token")
    return None if left == -1 else left + 1


def _heads_per_tp_rank(config: TransformerConfig, pg_collection: Optional[ProcessGroupCollection]) -> int:
    """Query heads of this TP rank: ``num_attention_heads / TP``, TP being megatron's (``pg_collection.tp``, its
    global group, else ``config.tensor_model_parallel_size``)."""
    tp_group = _megatron_group(pg_collection, "tp")
    return config.num_attention_heads // (config.tensor_model_parallel_size if tp_group is None else tp_group.size())


def _new_sinks(config: TransformerConfig, pg_collection: Optional[ProcessGroupCollection]) -> torch.nn.Parameter:
    """The ``sinks`` parameter of ``attention_sinks=True`` (see ``CPCoreAttention``)."""
    sinks = torch.nn.Parameter(torch.zeros(_heads_per_tp_rank(config, pg_collection), dtype=config.params_dtype))
    if config.perform_initialization:
        with torch.no_grad():
            config.init_method(sinks)
    return sinks


def _check_supported(config: TransformerConfig, attn_mask_type: AttnMaskType, attention_type: str,
                     attention_dropout: Optional[float]) -> None:
    dropout = config.attention_dropout if attention_dropout is None else attention_dropout
    if dropout != 0.0:
        raise ValueError(f"attention_dropout={dropout} is not supported by CPCoreAttention "
                         "(rule: must be 0.0)")
    if attention_type != "self" or attn_mask_type != AttnMaskType.causal:
        raise ValueError(f"CPCoreAttention got attention_type={attention_type!r}, "
                         f"attn_mask_type={attn_mask_type}; rule: causal self-attention only")


def _check_runtime(config: TransformerConfig, cp_comm_type: Optional[str], runtime: AttentionRuntime) -> None:
    """With an explicit runtime, megatron's own CP settings may only agree with it."""
    if config.context_parallel_size not in (1, runtime.pcp_size):
        raise ValueError(f"context_parallel_size ({config.context_parallel_size}) must be 1 or the runtime's PCP "
                         f"size ({runtime.pcp_size}): megatron and cptoolkit must shard the sequence alike")
    if cp_comm_type is not None and cp_comm_type != runtime.prefill_comm:
        raise ValueError(f"cp_comm_type ({cp_comm_type!r}) must equal the runtime's prefill_comm "
                         f"({runtime.prefill_comm!r}): with runtime= the runtime chooses the algorithm")


def _megatron_group(pg_collection: Optional[ProcessGroupCollection], name: str):
    """Group ``name`` (``tp``, ``cp`` or ``hcp``) of ``pg_collection``, or megatron's global one when no
    collection is passed; ``None`` when there is none."""
    if pg_collection is not None:
        return getattr(pg_collection, name, None)
    getter = {"tp": mpu.get_tensor_model_parallel_group, "cp": mpu.get_context_parallel_group,
              "hcp": mpu.get_hierarchical_context_parallel_groups}[name]
    return getter(check_initialized=False)


def layer_comm_type(cp_comm_type: Optional[str | list[str]], config: TransformerConfig, layer_number: int) -> str:
    """The prefill algorithm of layer ``layer_number`` (numbered from 1): ``cp_comm_type``, else the config's
    (a string, or megatron's per-layer list), ``None`` meaning ``p2p`` as in megatron."""
    value = config.cp_comm_type if cp_comm_type is None else cp_comm_type
    if isinstance(value, (list, tuple)):
        value = value[layer_number - 1]
    comm = "p2p" if value is None else value
    return prefill_algorithm(comm, f"cp_comm_type of layer {layer_number}").name


@functools.cache
def _built_hierarchical_groups(pcp_group: ProcessGroup, a2a_size: int) -> HierarchicalGroups:
    # Memoized: every a2a+p2p layer of a model shares one set of groups. Building is collective over the
    # world, and every rank builds the same layers in the same order, so every rank misses the cache together.
    return new_hierarchical_groups(pcp_group, a2a_size)


def megatron_hierarchical_groups(config: TransformerConfig, pg_collection: Optional[ProcessGroupCollection],
                                 pcp_group: ProcessGroup) -> HierarchicalGroups:
    """``a2a+p2p``'s groups: megatron's ``hcp`` pair ``[a2a, ring]`` when it has one, else built (once) from
    ``config.hierarchical_context_parallel_sizes = [a2a, ring]``."""
    pcp_size = pcp_group.size()
    hcp = _megatron_group(pg_collection, "hcp")
    if hcp is None:
        sizes = config.hierarchical_context_parallel_sizes
        if sizes is None or len(sizes) != 2 or sizes[0] * sizes[1] != pcp_size:
            raise ValueError(f"hierarchical_context_parallel_sizes ({sizes}) must be [a2a size, ring size] with "
                             f"a2a size x ring size = context_parallel_size ({pcp_size}) for cp_comm_type 'a2a+p2p' "
                             f"(or pass the groups as pg_collection.hcp)")
        return _built_hierarchical_groups(pcp_group, sizes[0])
    if len(hcp) != 2:
        raise ValueError(f"pg_collection.hcp has {len(hcp)} levels; rule: cp_comm_type 'a2a+p2p' needs exactly two, "
                         f"[a2a group, ring group] (hierarchical_context_parallel_sizes of length 2)")
    groups = HierarchicalGroups(a2a_group=hcp[0], ring_group=hcp[1])
    check_groups(groups, pcp_group)
    return groups


def runtime_from_megatron(config: TransformerConfig, layer_number: int, cp_comm_type: Optional[str | list[str]],
                          pg_collection: Optional[ProcessGroupCollection]) -> AttentionRuntime:
    """A prefill-only runtime for one layer built by megatron-core (the drop-in path).

    The PCP group is megatron's CP group (``pg_collection.cp``, or the global one), whose size must be
    ``config.context_parallel_size``; the algorithm is ``layer_comm_type``. Checked here, once per layer on
    every rank: the algorithm's rule on this layer's query heads per TP rank (``algorithms``) and, for a
    hierarchical one (``a2a+p2p``), the groups of ``megatron_hierarchical_groups``.
    """
    pcp_group = _megatron_group(pg_collection, "cp")
    pcp_size = 1 if pcp_group is None else pcp_group.size()
    if config.context_parallel_size != pcp_size:
        raise ValueError(f"context_parallel_size ({config.context_parallel_size}) must equal the size of megatron's "
                         f"CP group ({pcp_size}, pg_collection.cp or parallel_state's): it is the PCP group")
    comm = layer_comm_type(cp_comm_type, config, layer_number)
    if pcp_size == 1:
        return AttentionRuntime(prefill_comm=comm)
    algorithm = prefill_algorithm(comm)
    hcp_groups = megatron_hierarchical_groups(config, pg_collection, pcp_group) if algorithm.hierarchical else None
    error = algorithm.check(_heads_per_tp_rank(config, pg_collection), pcp_size,
                            None if hcp_groups is None else hcp_groups.a2a_size)
    if error is not None:
        raise ValueError(f"cp_comm_type {comm!r} of layer {layer_number}: {error}")
    return AttentionRuntime(pcp_group=pcp_group, prefill_comm=comm, hcp_groups=hcp_groups)


def get_gpt_layer_spec(runtime: AttentionRuntime, arch: str, transformer_engine: Optional[bool] = None
                       ) -> ModuleSpec:
    """megatron-core's GPT layer spec with ``CPCoreAttention`` as its core attention.

    ``transformer_engine=False``: megatron's local spec; ``arch="llama"``: RMSNorm (SwiGLU comes from the
    config's ``gated_linear_unit``), ``arch="gpt2"``: LayerNorm. ``True``: megatron's TransformerEngine spec
    (``get_gpt_layer_with_transformer_engine_spec``): each input norm fused into the ``linear_qkv`` /
    ``linear_fc1`` after it (TE's ``LayerNormLinear``, norm type from the config's ``normalization``), TE's
    row-parallel ``linear_proj``/``linear_fc2``. ``None`` (default): ``True`` exactly when the block kernels'
    backend is ``te`` (``block_attention.current_backend()``, from ``runtime.attention_backend``); ``auto``
    keeps the local spec, because the spec decides the parameter names a checkpoint must have.
    Every layer built from the spec shares ``runtime``.
    """
    if arch not in LAYER_NORMS:
        raise ValueError(f"arch={arch!r} is not supported; rule: one of {sorted(LAYER_NORMS)}")
    if transformer_engine is None:
        transformer_engine = current_backend() == "te"
    spec = (_transformer_engine_layer_spec() if transformer_engine
            else get_gpt_layer_local_spec(normalization=LAYER_NORMS[arch]))
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=CPCoreAttention, params={"runtime": runtime})
    return spec


def _transformer_engine_layer_spec() -> ModuleSpec:
    """megatron's dense TransformerEngine GPT layer spec; ImportError where megatron-core found no TE."""
    from megatron.core.models.gpt import gpt_layer_specs

    if not gpt_layer_specs.HAVE_TE:
        raise ImportError("get_gpt_layer_spec(transformer_engine=True): megatron-core found no TransformerEngine "
                          "here (import transformer_engine failed); rule: megatron's TE layer spec needs "
                          "transformer-engine installed; use the local spec (runtime.attention_backend auto or torch)")
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
