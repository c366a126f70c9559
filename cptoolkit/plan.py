"""Which TP x PCP x DCP (x EP, x DP) layout for a model, a context length and a cluster: the layout planner.

    python -m cptoolkit.plan --model llama3.1-8b --context 131072 --batch 4 --devices 16 \\
        --devices-per-node 8 --memory-per-device 80GiB [--dtype bf16] [--prefill-chunk 4096] \\
        [--decode-comm a2a|ag_rs] [--prefill-comm p2p|all_gather|a2a] [--json]

``--model``: a Hugging Face ``config.json`` (or the checkpoint directory holding one), ``builtin`` (the
built-in model of ``configs/``: ``model:`` defaults) or a named shape (``SHAPES``). ``--batch`` requests of
``--context`` tokens each (prompt + generated) are in flight at once; DP replicas share them, ``ceil(batch/dp)``
each (a replica's ``inference.batch_size``). Every layout uses all ``--devices``; an MoE model's layouts take
every valid EP size (``ep = j * pcp``, ``j | tp``, the experts and their FFN dividing evenly).

Per device, one function each (tests/test_plan.py checks every figure the CPU can measure against the code
that allocates or communicates, so the formulas live here once and nowhere else; what differs by attention
algorithm, its collectives and the K/V it holds, lives in its record, ``layers/algorithms.py``):
- ``rank_params`` / ``weight_bytes``: this rank's parameters as megatron-core and ``moe.layer`` build them, by
  part (routed experts: ``E/EP`` experts, ``1/ETP`` of each).
- ``kv_cache_bytes``: ``inference.builder.kv_cache``'s sizing (blocks for the fullest DCP shard).
- ``decode_comm_per_layer``: what ``dcp_decode_attention`` counts in its ``CommStats`` per layer and step.
- ``prefill_comm_per_layer`` (``ring_prefill_attention``, on the PCP group) and ``prefill_route_per_layer``
  (``route_prefill_kv``, the one all-to-all that hands each DCP member its KV shard), per layer of one chunk.
- ``moe_prefill_comm_per_layer`` (the EP dispatch and combine, the TP all-reduce; the combine's size assumes
  uniform routing) and ``moe_decode_comm_per_layer`` (one all-reduce over the replica), per MoE layer.
- ``activation_bytes``: an *estimate* of one layer's transient tensors while prefilling one chunk.
Not counted: TP's own all-reduces around attention and dense MLPs (megatron's, inside a node by the layout rule)
and, for a chunk after the first, the context attention over the cached history (its cost grows with the prefix).
Not modelled: compute (EP's whole experts make larger matrix products than ETP's slices of every expert).

Ranking (``rank_key``): layouts that fit first; then fewest collectives per decode step on groups that cross
nodes (each costs a network round trip per layer); then fewest bytes per device of weights + KV cache (what
every decode step reads); then fewest decode collectives and bytes per step. A layout whose TP group would
span nodes is refused, as ``python -m cptoolkit.parallel_state --nproc-per-node`` refuses it.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cptoolkit.config import InferenceConfig, ModelConfig, ParallelConfig
from cptoolkit.errors import OneLineParser, check_positive
from cptoolkit.inference.kv_cache import window_ring_slots
from cptoolkit.inference.prefill_kv import prefill_route
from cptoolkit.layers.algorithms import (DECODE_ALGORITHMS, FLOAT32_BYTES, PREFILL_ALGORITHMS, Collective,
                                         DecodeTraffic, PrefillAlgorithm, PrefillTraffic, decode_algorithm,
                                         prefill_algorithm)
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.dcp_decode import DecodeGroup, shard_length
from cptoolkit.layers.dual_chunk_swap import padded_length
from cptoolkit.layers.mla_dims import MLADims
from cptoolkit.layout import (ParallelLayout, divisors, node_crossings, nodes_of, tp_across_nodes_error,
                              valid_ep_sizes)
from cptoolkit.models.families.registry import read_hf_config
from cptoolkit.models.moe_dims import MoEDims
from cptoolkit.models.shape import GPTShape, check_tp, padded_vocab_size, read_json_object

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
KV_BLOCK_SIZE = InferenceConfig.kv_block_size  # the engine's defaults
KV_INTERLEAVE = ParallelConfig.kv_interleave
# The prefill algorithms whose collectives the planner models (a2a+p2p's depend on the a2a size, not an option here).
PLANNED_PREFILL_COMMS = tuple(name for name, algorithm in PREFILL_ALGORITHMS.items() if algorithm.collectives)

# Sizes only: the RoPE variant and the routing rule change neither memory nor communication. The MoE shapes are
# their Hugging Face config.json files' dimensions: deepseek-ai/DeepSeek-V3, Qwen/Qwen3-235B-A22B, openai/gpt-oss-120b
# and mistralai/Mixtral-8x7B-v0.1 (huggingface.co/<name>/blob/main/config.json). Their totals are checked against the
# published ones in tests/test_plan_moe.py.
_V3_MLA = MLADims(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  rope_interleave=True)
SHAPES = {
    "llama3.1-8b": GPTShape(arch="llama", num_layers=32, hidden_size=4096, num_attention_heads=32, num_kv_heads=8,
                            ffn_hidden_size=14336, vocab_size=128256, max_seq_len=131072, rope_theta=500000.0),
    "llama3.1-70b": GPTShape(arch="llama", num_layers=80, hidden_size=8192, num_attention_heads=64, num_kv_heads=8,
                             ffn_hidden_size=28672, vocab_size=128256, max_seq_len=131072, rope_theta=500000.0),
    # DeepSeek-V3's attention and latent cache with its dense layers' MLP on all 61 layers (no experts); the whole
    # model is "deepseek-v3".
    "deepseek-v3-dense": GPTShape(arch="llama", num_layers=61, hidden_size=7168, num_attention_heads=128,
                                  num_kv_heads=1, ffn_hidden_size=18432, vocab_size=129280, max_seq_len=163840,
                                  rope_theta=10000.0, head_dim=64, mla=_V3_MLA),
    # 671B without the multi-token-prediction layer (num_nextn_predict_layers, 14B more in the checkpoint): the first
    # first_k_dense_replace = 3 layers dense, then 256 routed experts (top 8) and 1 shared expert of 2048.
    "deepseek-v3": GPTShape(arch="llama", num_layers=61, hidden_size=7168, num_attention_heads=128, num_kv_heads=1,
                            ffn_hidden_size=18432, vocab_size=129280, max_seq_len=163840, rope_theta=10000.0,
                            head_dim=64, mla=_V3_MLA,
                            moe=MoEDims(num_experts=256, top_k=8, ffn_hidden_size=2048,
                                        moe_layers=(False,) * 3 + (True,) * 58, score="sigmoid", norm_topk_prob=True,
                                        routed_scaling_factor=2.5, num_groups=8, topk_groups=4,
                                        group_score="top2_sum", score_correction_bias=True,
                                        shared_ffn_hidden_size=2048)),
    # Every layer MoE (decoder_sparse_step 1, no mlp_only_layers): intermediate_size 12288 is never used.
    "qwen3-235b-a22b": GPTShape(arch="llama", num_layers=94, hidden_size=4096, num_attention_heads=64, num_kv_heads=4,
                                ffn_hidden_size=12288, vocab_size=151936, max_seq_len=40960, rope_theta=1000000.0,
                                norm_eps=1e-6, head_dim=128, qk_norm=True,
                                moe=MoEDims(num_experts=128, top_k=8, ffn_hidden_size=1536, moe_layers=(True,) * 94,
                                            norm_topk_prob=True)),
    # Layers alternate a 128-token window (layer_types starts with sliding_attention) and full attention. Not
    # expressible in GPTShape yet, so not counted: the attention sinks (64 per layer), the output projection's bias
    # and the experts' biases (0.04% of the total).
    "gpt-oss-120b": GPTShape(arch="llama", num_layers=36, hidden_size=2880, num_attention_heads=64, num_kv_heads=8,
                             ffn_hidden_size=2880, vocab_size=201088, max_seq_len=131072, rope_theta=150000.0,
                             head_dim=64, qkv_bias=True, sliding_window=128, sliding_layers=(True, False) * 18,
                             attention_sinks=True, attention_out_bias=True,
                             moe=MoEDims(num_experts=128, top_k=4, ffn_hidden_size=2880, moe_layers=(True,) * 36,
                                         norm_topk_prob=True, router_bias=True, expert_bias=True,
                                         activation="gpt_oss")),
    "mixtral-8x7b": GPTShape(arch="llama", num_layers=32, hidden_size=4096, num_attention_heads=32, num_kv_heads=8,
                             ffn_hidden_size=14336, vocab_size=32000, max_seq_len=32768, rope_theta=1000000.0,
                             moe=MoEDims(num_experts=8, top_k=2, ffn_hidden_size=14336, moe_layers=(True,) * 32,
                                         norm_topk_prob=True)),
}


# ----------------------------------------------------------------------------- memory per device

def _mla_attention_params(shape: GPTShape, tp: int) -> int:
    """One TP rank's ``MLASelfAttention`` parameters: the per-head projections (``q_proj`` or ``q_up``,
    ``kv_up``, ``linear_proj``) split over TP; ``q_down``, ``kv_down`` and their RMSNorms whole on every rank."""
    m, h, heads = shape.mla, shape.hidden_size, shape.num_attention_heads // tp
    q = (h * heads * m.qk_head_dim if m.q_lora_rank is None
         else h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * heads * m.qk_head_dim)
    kv = h * m.latent_dim + m.kv_lora_rank + m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
    return q + kv + heads * m.v_head_dim * h


@dataclass(frozen=True)
class RankParams:
    """One rank's parameters by part, as ``models.build`` makes them (``tp_sharding.PARAM_KINDS``), summed over
    the layers: ``embeddings`` (vocabulary rows padded to a multiple of TP and split; the output layer too unless
    tied; GPT-2's position table), ``attention`` (projections, their biases, Qwen3's q/k norms), ``norms`` (every
    layer's two, Gemma's two post-norms, the final one), ``dense_mlp`` (the layers without experts),
    ``routed_experts`` (``E/EP`` experts' ``1/ETP`` FFN slices on every MoE layer), ``routers`` and
    ``shared_experts`` (the shared expert's ``1/TP`` and its gate) of the MoE layers."""

    embeddings: int
    attention: int
    norms: int
    dense_mlp: int
    routed_experts: int = 0
    routers: int = 0
    shared_experts: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in dataclasses.fields(self))


def _attention_params(shape: GPTShape, tp: int) -> int:
    """One layer's attention on one TP rank: fused QKV rows for ``max(num_kv_heads, tp)`` query groups (KV heads
    replicated when fewer than TP) and the output projection's columns, or MLA's projections; their biases."""
    h, d, llama = shape.hidden_size, shape.head_dim, shape.arch == "llama"
    qkv_rows = (shape.num_attention_heads + 2 * max(shape.num_kv_heads, tp)) * d // tp
    if shape.mla is not None:
        params = _mla_attention_params(shape, tp)
    else:
        params = qkv_rows * h + h * shape.num_attention_heads * d // tp
    if not llama or shape.qkv_bias:
        params += qkv_rows
    if shape.qk_norm:
        params += 2 * d
    if shape.attention_sinks:
        params += shape.num_attention_heads // tp  # one sink per query head of this rank
    # GPT-2's and gpt-oss's linear_proj bias, whole on every rank
    return params + h if not llama or shape.attention_out_bias else params


def _dense_mlp_params(shape: GPTShape, tp: int) -> int:
    """One dense layer's MLP on one TP rank: SwiGLU's ``[gate; up]`` rows (GELU: one) and the down projection's
    columns; GPT-2's biases (fc1's split, fc2's whole)."""
    h, llama, ffn_local = shape.hidden_size, shape.arch == "llama", shape.ffn_hidden_size // tp
    fc1_rows = 2 * ffn_local if llama else ffn_local
    params = fc1_rows * h + h * ffn_local
    return params if llama else params + fc1_rows + h


def rank_params(shape: GPTShape, layout: ParallelLayout) -> RankParams:
    """``RankParams`` of one rank of ``layout`` (every rank holds as many): its TP slice of the dense parts; on
    each MoE layer (``shape.moe``) ``E/EP`` routed experts of ``3 x F/ETP x hidden`` (SwiGLU ``[gate; up]`` and
    down; with ``expert_bias`` also ``2 x F/ETP + hidden``), the router (``E x hidden``, its bias and DeepSeek-V3's correction bias) whole, the shared expert's
    ``3 x S/TP x hidden`` and its gate (``hidden``) whole."""
    h, tp, llama = shape.hidden_size, layout.tp, shape.arch == "llama"
    moe = shape.moe
    moe_layers = 0 if moe is None else sum(moe.moe_layers)
    norm = h if llama else 2 * h  # RMSNorm: weight; LayerNorm: weight and bias
    layer_norms = 2 * norm + (2 * h if shape.gemma is not None else 0)
    embeddings = padded_vocab_size(shape, tp) // tp * h * (1 if shape.tie_embeddings else 2)
    params = RankParams(embeddings=embeddings + (0 if llama else shape.max_seq_len * h),
                        attention=shape.num_layers * _attention_params(shape, tp),
                        norms=shape.num_layers * layer_norms + norm,
                        dense_mlp=(shape.num_layers - moe_layers) * _dense_mlp_params(shape, tp))
    if moe is None:
        return params
    e, ffn_local = moe.num_experts, moe.ffn_hidden_size // layout.etp
    per_expert = 3 * ffn_local * h + (2 * ffn_local + h if moe.expert_bias else 0)
    return dataclasses.replace(
        params, routed_experts=moe_layers * e // layout.ep * per_expert,
        routers=moe_layers * e * (h + moe.router_bias + moe.score_correction_bias),
        shared_experts=moe_layers * (3 * (moe.shared_ffn_hidden_size // tp) * h + h * moe.shared_expert_gate))


def weight_bytes(shape: GPTShape, layout: ParallelLayout, dtype_bytes: int) -> int:
    """Bytes of one rank's parameters (``rank_params``)."""
    return rank_params(shape, layout).total * dtype_bytes


def kv_heads_per_rank(layout: ParallelLayout) -> int:
    """KV heads one rank caches: those of its DCP group's query heads (equal on every rank)."""
    return len(layout.rank_info(0).dcp_kv_heads)


@dataclass(frozen=True)
class CacheEntry:
    """What the KV cache stores per token, layer and KV head: ``planes`` tensors (K and V; MLA's latent is
    key and value at once: one) of ``width`` channels. The same entry is what DCP decode gathers and prefill
    routing sends."""

    planes: int
    width: int

    @staticmethod
    def of(shape: GPTShape) -> "CacheEntry":
        return CacheEntry(*shape.kv_cache_entry)


def kv_cache_bytes(shape: GPTShape, layout: ParallelLayout, max_seq_len: int, batch_size: int, block_size: int,
                   interleave: int, dtype_bytes: int, step_tokens: int = 1) -> int:
    """One rank's KV cache as ``builder.kv_cache`` allocates it (no ``inference.kv_cache_bytes``, no prefix
    caching): for each of ``batch_size`` requests, blocks for the fullest DCP shard's share of ``max_seq_len``
    tokens (shard 0) on every full-attention layer, and on every sliding-window layer the ring that holds the
    window behind a step of ``step_tokens`` (``window_ring_slots``; at most the full share); a block holds the
    ``CacheEntry`` of ``block_size`` tokens of one layer for ``kv_heads_per_rank`` heads."""
    entry = CacheEntry.of(shape)
    layer_block_bytes = entry.planes * kv_heads_per_rank(layout) * block_size * entry.width * dtype_bytes
    full_blocks = -(-shard_length(max_seq_len, 0, layout.dcp, interleave) // block_size)
    windowed = sum(shape.layer_window(n) is not None for n in range(1, shape.num_layers + 1))
    ring_blocks = 0 if not windowed else min(full_blocks, -(-window_ring_slots(
        shape.sliding_window, step_tokens, layout.dcp, interleave) // block_size))
    return batch_size * layer_block_bytes * ((shape.num_layers - windowed) * full_blocks + windowed * ring_blocks)


def kv_copies(layout: ParallelLayout) -> float:
    """How many copies of each cached token's entry one model replica holds: ``tp*pcp`` ranks each store
    ``kv_heads_per_rank`` heads of ``1/dcp`` of the tokens, against ``num_kv_heads`` heads of every token once.
    1 means no replication; TP alone (``dcp = 1``) pays ``tp / num_kv_heads`` when KV heads are fewer than TP
    ranks (MLA's one latent: ``tp``)."""
    return layout.tp * layout.pcp * kv_heads_per_rank(layout) / (layout.dcp * layout.num_kv_heads)


def activation_bytes(shape: GPTShape, layout: ParallelLayout, chunk: int, prefill_comm: str,
                     dtype_bytes: int) -> int:
    """An estimate (an upper bound: peaks do not all coincide) of one layer's transient tensors while one rank
    prefills its DualChunkSwap share of a ``chunk``-token chunk; layers run one after another and inference
    keeps nothing for a backward, so one layer's worth is the peak. Counted: the residual stream and its
    norm, attention-projection and MLP outputs; q|k|v; the float32 attention accumulator and LSE; the K/V
    the prefill comm holds (its record's ``held_bytes``); the MLP's own (``mlp_activation_bytes``); the KV-routing
    buffers."""
    h, es = shape.hidden_size, dtype_bytes
    hq = layout.num_heads // layout.tp
    hkv, d = prefill_heads(shape, layout)
    local = padded_length(chunk, layout.pcp) // layout.pcp
    held_kv = _planned(prefill_comm).held_bytes(PrefillTraffic(layout.pcp, hq, hkv, local * d * es))
    route = 2 * prefill_route_per_layer(layout, CacheEntry.of(shape), 1, chunk, KV_INTERLEAVE, es).total_bytes
    return (4 * local * h * es + local * (hq + 2 * hkv) * d * es + local * hq * (d + 1) * FLOAT32_BYTES
            + held_kv + mlp_activation_bytes(shape, layout, local, es) + route)


def mlp_activation_bytes(shape: GPTShape, layout: ParallelLayout, rows: int, dtype_bytes: int) -> int:
    """The larger MLP's transient tensors for a rank's ``rows`` prefill rows, over the layer kinds the model has.
    Dense: fc1's output and its activation. MoE: of the ``ceil(rows / k) x top_k`` rows the rank routes (and, with
    uniform routing, receives), the dispatched, received, computed and returned copies, the experts' fc1 output
    and activation (``F/ETP`` wide); the shared expert's on every row."""
    sizes = []
    moe = shape.moe
    if moe is None or not all(moe.moe_layers):
        ffn_local = shape.ffn_hidden_size // layout.tp
        fc1_rows = 2 * ffn_local if shape.arch == "llama" else ffn_local
        sizes.append(rows * (fc1_rows + ffn_local))
    if moe is not None:
        routed = -(-rows // layout.ep_tp_positions) * moe.top_k
        sizes.append(routed * (4 * shape.hidden_size + 3 * moe.ffn_hidden_size // layout.etp)
                     + rows * 3 * moe.shared_ffn_hidden_size // layout.tp)
    return max(sizes) * dtype_bytes


# ----------------------------------------------------------------------------- collectives per rank

def _count(stats: CommStats, name: str, nbytes: int, calls: int = 1) -> None:
    """``calls`` collectives ``name`` of ``nbytes`` each, counted as ``CommStats.record`` counts them."""
    stats.calls[name] += calls
    stats.bytes_sent[name] += calls * nbytes


def _count_all(stats: CommStats, collectives: tuple[Collective, ...]) -> None:
    for collective in collectives:
        _count(stats, collective.name, collective.nbytes, collective.calls)


def _planned(prefill_comm: str) -> PrefillAlgorithm:
    """The record of ``prefill_comm``, which the planner must model (``collectives``)."""
    algorithm = prefill_algorithm(prefill_comm)
    if algorithm.collectives is None:
        raise ValueError(f"prefill_comm ({prefill_comm!r}) must be one of {PLANNED_PREFILL_COMMS}: the planner "
                         "does not model the others")
    return algorithm


def decode_comm_per_layer(layout: ParallelLayout, entry: CacheEntry, batch: int, comm: str,
                          dtype_bytes: int) -> CommStats:
    """``dcp_decode_attention``'s ``CommStats`` on one rank for one layer and decode step of ``batch`` requests
    (all on the DCP group; ``k = dcp/pcp``; ``hq``, ``hkv`` this rank's query and KV heads; queries, outputs
    and cache entries ``entry.width`` wide: MLA's absorbed queries are latent-wide). ``k > 1``: one all-gather
    of the new token's q|k|v (q|latent with MLA) in the model's dtype. Then the combine of the float32 partials,
    ``comm``'s record's ``collectives`` (``layers/algorithms.py``). ``dcp = 1``: nothing."""
    algorithm = decode_algorithm(comm, "comm")
    stats = CommStats()
    if layout.dcp == 1:
        return stats
    k, hq, hkv = layout.dcp_tp_positions, layout.num_heads // layout.tp, len(layout.kv_heads_of(0))
    if k > 1:
        _count(stats, "all_gather", batch * (hq + entry.planes * hkv) * entry.width * dtype_bytes)
    _count_all(stats, algorithm.collectives(DecodeTraffic(layout.dcp, k, batch, hq, entry.width)))
    return stats


def prefill_heads(shape: GPTShape, layout: ParallelLayout) -> tuple[int, int]:
    """``(KV heads, head width)`` one rank's prefill attention runs with: its KV heads of ``head_dim``, or for
    MLA's expanded form one K/V per query head, ``max(qk_head_dim, v_head_dim)`` wide (``MLASelfAttention``)."""
    if shape.mla is not None:
        return layout.num_heads // layout.tp, max(shape.mla.qk_head_dim, shape.mla.v_head_dim)
    return len(layout.kv_heads_of(0)), shape.head_dim


def prefill_comm_per_layer(layout: ParallelLayout, head_dim: int, batch: int, seq_len: int, comm: str,
                           dtype_bytes: int, kv_heads: int | None = None) -> CommStats:
    """``ring_prefill_attention``'s forward ``CommStats`` on one rank for one layer of ``batch`` sequences of
    ``seq_len`` tokens: each PCP rank holds ``padded_length(seq_len, pcp) / pcp`` tokens of its ``hq`` query
    and ``hkv`` KV heads (``kv_heads``; None: the layout's, see ``prefill_heads``): ``comm``'s record's
    ``collectives`` (``layers/algorithms.py``). ``pcp = 1``: nothing (the engine attends locally)."""
    algorithm = _planned(comm)
    stats = CommStats()
    pcp = layout.pcp
    if pcp == 1:
        return stats
    hq = layout.num_heads // layout.tp
    hkv = len(layout.kv_heads_of(0)) if kv_heads is None else kv_heads
    head_bytes = batch * padded_length(seq_len, pcp) // pcp * head_dim * dtype_bytes  # one head's local tokens
    _count_all(stats, algorithm.collectives(PrefillTraffic(pcp, hq, hkv, head_bytes)))
    return stats


def prefill_route_per_layer(layout: ParallelLayout, entry: CacheEntry, batch: int, seq_len: int, interleave: int,
                            dtype_bytes: int) -> CommStats:
    """``route_prefill_kv``'s ``CommStats`` on one rank for one layer: one all-to-all on the DCP group sending
    every member a message of the cache entries (K and V, or MLA's latent) for ``batch x hkv`` heads x the
    widest route's tokens (``prefill_route(...).width``). ``dcp = 1``: nothing."""
    stats = CommStats()
    if layout.dcp == 1:
        return stats
    group = DecodeGroup(None, 0, layout.dcp, layout.dcp_tp_positions, layout.pcp, interleave,
                        layout.kv_head_replication)
    width = prefill_route(padded_length(seq_len, layout.pcp), 0, group).width
    hkv = len(layout.kv_heads_of(0))
    _count(stats, "all_to_all", layout.dcp * entry.planes * batch * hkv * width * entry.width * dtype_bytes)
    return stats


COUNTS_BYTES = 8  # the expert counts travel as int64


def moe_prefill_comm_per_layer(layout: ParallelLayout, moe: MoEDims, hidden_size: int, batch: int, seq_len: int,
                               dtype_bytes: int) -> CommStats:
    """``MoELayer``'s prefill ``CommStats`` on one rank for one MoE layer of ``batch`` sequences of ``seq_len``
    tokens: the rank's ``n = batch x padded_length(seq_len, pcp) / pcp`` rows split into ``k = ep / pcp`` TP blocks;
    the rank owning the most, ``ceil(n / k)`` (``block_rows``), routes them. ``ep > 1``: an all-gather of the expert
    counts (``2 x E`` int64) and an all-to-all of its ``ceil(n/k) x top_k`` rows over the EP group, and one back of the rows it
    received. The back one assumes uniform routing: every expert equally likely, each EP rank receives ``1/EP`` of
    the group's rows, as many as it sent (its exact size depends on the routing; the group's total is exact). Then
    ``tp > 1``: an all-reduce of all ``n`` rows over TP."""
    stats = CommStats()
    rows = batch * padded_length(seq_len, layout.pcp) // layout.pcp
    own_rows = -(-rows // layout.ep_tp_positions)
    if layout.ep > 1:
        # each expert's dispatched rows and, beside them, its real (non-padding) ones
        _count(stats, "moe_counts_all_gather", 2 * moe.num_experts * COUNTS_BYTES)
        _count(stats, "moe_all_to_all", own_rows * moe.top_k * hidden_size * dtype_bytes, calls=2)
    if layout.tp > 1:
        _count(stats, "moe_all_reduce", rows * hidden_size * dtype_bytes)
    return stats


def moe_decode_comm_per_layer(layout: ParallelLayout, hidden_size: int, batch: int, dtype_bytes: int) -> CommStats:
    """``MoELayer``'s decode ``CommStats`` on one rank for one MoE layer and step of ``batch`` requests: every rank
    of the replica routes all rows to its own experts, then one all-reduce of ``batch`` rows over the replica's
    ``tp x pcp`` ranks (none for a replica of one rank). No dispatch."""
    stats = CommStats()
    if layout.tp * layout.pcp > 1:
        _count(stats, "moe_all_reduce", batch * hidden_size * dtype_bytes)
    return stats


# ----------------------------------------------------------------------------- one layout, all layouts

@dataclass(frozen=True)
class Workload:
    """What the planner is asked: ``batch`` requests of ``context`` tokens on ``devices`` devices."""

    shape: GPTShape
    context: int
    batch: int
    devices: int
    devices_per_node: int
    memory_per_device: int
    dtype: str  # a key of DTYPE_BYTES
    prefill_chunk: int
    decode_comm: str = "a2a"
    prefill_comm: str = "p2p"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class LayoutPlan:
    """One layout's figures per device. ``decode``: the attention's per layer and step; ``prefill_attention`` and
    ``prefill_route``: per layer of one request's chunk; ``moe_decode`` and ``moe_prefill``: the same per MoE layer
    (``moe_layers`` of the ``layers``; empty for a dense model)."""

    layout: ParallelLayout
    requests_per_replica: int
    params: RankParams
    dtype_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    fits: bool
    decode: CommStats
    prefill_attention: CommStats
    prefill_route: CommStats
    moe_decode: CommStats
    moe_prefill: CommStats
    layers: int
    moe_layers: int
    crossing: dict[str, tuple[int, int]]  # group kind -> (its groups that span nodes, its groups)

    @property
    def weight_bytes(self) -> int:
        return self.params.total * self.dtype_bytes

    @property
    def routed_expert_bytes(self) -> int:
        return self.params.routed_experts * self.dtype_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    @property
    def decode_per_step(self) -> CommStats:
        return _times((self.decode, self.layers), (self.moe_decode, self.moe_layers))

    @property
    def prefill_per_layer(self) -> CommStats:
        """The attention's and the KV routing's, per layer of one chunk."""
        return _times((self.prefill_attention, 1), (self.prefill_route, 1))

    def _crosses(self, kind: str) -> bool:
        return self.crossing.get(kind, (0, 0))[0] > 0

    @property
    def cross_node_decode_calls_per_step(self) -> int:
        """DCP decode on a DCP group, the MoE reduce on a replica, that spans nodes."""
        return (self.decode.total_calls * self.layers * self._crosses("DCP")
                + self.moe_decode.total_calls * self.moe_layers * self._crosses("replica"))

    @property
    def cross_node_prefill_calls_per_chunk(self) -> int:
        """Ring prefill on a PCP group, KV routing on a DCP group, the MoE dispatch on an EP group, that spans nodes
        (TP's all-reduce never does)."""
        dispatch = self.moe_prefill.calls["moe_counts_all_gather"] + self.moe_prefill.calls["moe_all_to_all"]
        return (self.layers * (self.prefill_attention.total_calls * self._crosses("PCP")
                               + self.prefill_route.total_calls * self._crosses("DCP"))
                + self.moe_layers * dispatch * self._crosses("EP"))


def _times(*parts: tuple[CommStats, int]) -> CommStats:
    """The sum of each ``CommStats`` taken ``times`` times."""
    total = CommStats()
    for stats, times in parts:
        for name, calls in stats.calls.items():
            total.calls[name] += calls * times
            total.bytes_sent[name] += stats.bytes_sent[name] * times
    return total


def plan_layout(layout: ParallelLayout, work: Workload) -> LayoutPlan:
    shape, es = work.shape, work.dtype_bytes
    requests = -(-work.batch // layout.dp)
    params = rank_params(shape, layout)
    weights = params.total * es
    kv = kv_cache_bytes(shape, layout, work.context, requests, KV_BLOCK_SIZE, KV_INTERLEAVE, es, work.prefill_chunk)
    activations = activation_bytes(shape, layout, work.prefill_chunk, work.prefill_comm, es)
    entry, (prefill_kv_heads, prefill_width) = CacheEntry.of(shape), prefill_heads(shape, layout)
    crossing = node_crossings(layout, work.devices_per_node)
    moe_decode, moe_prefill, moe_layers = CommStats(), CommStats(), 0
    if shape.moe is not None:
        moe_layers = sum(shape.moe.moe_layers)
        moe_decode = moe_decode_comm_per_layer(layout, shape.hidden_size, requests, es)
        moe_prefill = moe_prefill_comm_per_layer(layout, shape.moe, shape.hidden_size, 1, work.prefill_chunk, es)
        crossing["replica"] = (sum(len(nodes_of(group, work.devices_per_node)) > 1 for group in layout.replica_groups),
                               len(layout.replica_groups))
    return LayoutPlan(
        layout=layout, requests_per_replica=requests, params=params, dtype_bytes=es, kv_cache_bytes=kv,
        activation_bytes=activations, fits=weights + kv + activations <= work.memory_per_device,
        decode=decode_comm_per_layer(layout, entry, requests, work.decode_comm, es),
        prefill_attention=prefill_comm_per_layer(layout, prefill_width, 1, work.prefill_chunk, work.prefill_comm,
                                                 es, kv_heads=prefill_kv_heads),
        prefill_route=prefill_route_per_layer(layout, entry, 1, work.prefill_chunk, KV_INTERLEAVE, es),
        moe_decode=moe_decode, moe_prefill=moe_prefill, layers=shape.num_layers, moe_layers=moe_layers,
        crossing=crossing)


def _valid_layout(work: Workload, dp: int, pcp: int, tp: int, k: int, ep: int | None) -> ParallelLayout | None:
    """The layout if the model, the engine and the workload accept it (the rules that raise elsewhere)."""
    shape, moe = work.shape, work.shape.moe
    try:
        layout = ParallelLayout(tp=tp, pcp=pcp, dcp=k * pcp, num_heads=shape.num_attention_heads,
                                num_kv_heads=shape.num_kv_heads, dp=dp, ep=ep,
                                num_experts=None if moe is None else moe.num_experts)
        check_tp(shape, tp)
    except ValueError:
        return None
    if prefill_algorithm(work.prefill_comm).check(shape.num_attention_heads // tp, pcp) is not None:
        return None
    # The experts' FFN splits over ETP, the shared expert's over TP (config.py, moe.layer).
    if moe is not None and (moe.ffn_hidden_size % layout.etp or moe.shared_ffn_hidden_size % tp):
        return None
    # Chunks start at multiples of interleave * dcp (config.py); every replica serves at least one request.
    return layout if work.prefill_chunk % (KV_INTERLEAVE * layout.dcp) == 0 and dp <= work.batch else None


def plan(work: Workload) -> tuple[list[LayoutPlan], list[tuple[ParallelLayout, str]]]:
    """``(ranked plans of every valid layout, refused layouts with the rule)``: every ``dp x pcp x tp =
    devices``, ``dcp = k * pcp`` (``k | tp``) and, for an MoE model, ``ep = j * pcp`` (``j | tp``) the model allows;
    refused: a TP group spans nodes."""
    plans, refused = [], []
    for dp in divisors(work.devices):
        for pcp in divisors(work.devices // dp):
            tp = work.devices // dp // pcp
            for k, ep in itertools.product(divisors(tp), valid_ep_sizes(tp, pcp) if work.shape.moe else [None]):
                layout = _valid_layout(work, dp, pcp, tp, k, ep)
                if layout is None:
                    continue
                error = tp_across_nodes_error(layout, work.devices_per_node)
                if error:
                    refused.append((layout, error))
                else:
                    plans.append(plan_layout(layout, work))
    return sorted(plans, key=rank_key), refused


def rank_key(candidate: LayoutPlan) -> tuple:
    """The order of the module docstring; ties go to fewer cross-node prefill collectives, then smaller dp, tp,
    pcp, dcp, then (an MoE model's EP sizes) fewer MoE prefill collectives and bytes."""
    layout, decode, moe_prefill = candidate.layout, candidate.decode_per_step, candidate.moe_prefill
    return (not candidate.fits, candidate.cross_node_decode_calls_per_step,
            candidate.weight_bytes + candidate.kv_cache_bytes, decode.total_calls, decode.total_bytes,
            candidate.cross_node_prefill_calls_per_chunk, layout.dp, layout.tp, layout.pcp, layout.dcp,
            moe_prefill.total_calls, moe_prefill.total_bytes, layout.ep)


# ----------------------------------------------------------------------------- output

def _size(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _comm(stats: CommStats) -> str:
    return f"{stats.total_calls} / {_size(stats.total_bytes)}" if stats.total_calls else "-"


def _attention_line(shape: GPTShape) -> str:
    if shape.mla is None:
        return f"{shape.num_attention_heads} query / {shape.num_kv_heads} KV heads of {shape.head_dim}"
    m = shape.mla
    return (f"{shape.num_attention_heads} MLA heads (q_lora {m.q_lora_rank}, qk {m.qk_nope_head_dim}+"
            f"{m.qk_rope_head_dim}, v {m.v_head_dim}), cached latent {m.kv_lora_rank}+{m.qk_rope_head_dim} per token")


def _mlp_line(shape: GPTShape) -> str:
    moe = shape.moe
    if moe is None:
        return f"ffn {shape.ffn_hidden_size}"
    dense = shape.num_layers - sum(moe.moe_layers)
    shared = f" + shared {moe.shared_ffn_hidden_size}" if moe.shared_ffn_hidden_size else ""
    return (f"{sum(moe.moe_layers)} MoE layers of {moe.num_experts} experts (top {moe.top_k}) of ffn "
            f"{moe.ffn_hidden_size}{shared}" + (f", {dense} dense of ffn {shape.ffn_hidden_size}" if dense else ""))


def _row(index: int, p: LayoutPlan, moe: bool) -> list[str]:
    lay = p.layout
    crossing = ", ".join(f"{name} {n}/{total}" for name, (n, total) in p.crossing.items() if n) or "none"
    sizes = [str(lay.dp), str(lay.tp), str(lay.pcp), str(lay.dcp)] + ([str(lay.ep)] if moe else [])
    weights = [_size(p.weight_bytes)] + ([_size(p.routed_expert_bytes)] if moe else [])
    prefill = [_comm(p.prefill_per_layer)] + ([_comm(p.moe_prefill)] if moe else [])
    return [str(index), *sizes, str(p.requests_per_replica), *weights, _size(p.kv_cache_bytes),
            f"{kv_copies(lay):g}", _size(p.activation_bytes), _size(p.total_bytes), _comm(p.decode_per_step),
            *prefill, str(p.cross_node_decode_calls_per_step), crossing]


def render_table(plans: list[LayoutPlan], refused: list, work: Workload) -> str:
    shape, moe = work.shape, work.shape.moe is not None
    lines = [
        f"Model: {shape.arch}, {shape.num_layers} layers, hidden {shape.hidden_size}, {_attention_line(shape)}, "
        f"{_mlp_line(shape)}, vocab {shape.vocab_size}; {work.dtype}",
        f"Work: {work.batch} requests x {work.context} tokens on {work.devices} devices ({work.devices_per_node} per "
        f"node, {_size(work.memory_per_device)} each); decode {work.decode_comm}; prefill {work.prefill_comm} in "
        f"chunks of {work.prefill_chunk} tokens; KV blocks of {KV_BLOCK_SIZE} tokens",
        "Ranked: fits, fewest cross-node collectives per decode step, least weights+KV per device, fewest decode "
        "collectives and bytes per step",
        ""]
    header = (["#", "DP", "TP", "PCP", "DCP"] + (["EP"] if moe else []) + ["req/DP", "weights"]
              + (["experts"] if moe else []) + ["KV cache", "KV copies", "activ.(est)", "total", "decode/step",
                                                "prefill/layer"]
              + (["MoE prefill/layer"] if moe else []) + ["x-node decode/step", "groups across nodes"])
    rows = [_row(index, p, moe) for index, p in enumerate([p for p in plans if p.fits], start=1)]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows] if rows else []:
        lines.append("  ".join(cell.rjust(w) if i < len(row) - 1 else cell for i, (cell, w) in
                               enumerate(zip(row, widths))).rstrip())
    too_big = [p for p in plans if not p.fits]
    lines += ["" if rows else "No layout fits.",
              f"{len(rows)} layouts fit; {len(too_big)} do not fit in {_size(work.memory_per_device)}"
              + (f" (the smallest needs {_size(min(p.total_bytes for p in too_big))})" if too_big else "")
              + f"; {len(refused)} refused (a TP group would span nodes)."]
    lines.append("decode/step and prefill/layer: collectives / bytes sent per device (CommStats), prefill for one "
                 "chunk: attention + KV routing. KV copies: how many times a replica stores each cached token "
                 "(TP without DCP replicates KV heads fewer than its ranks; MLA's one latent on every TP rank).")
    if moe:
        lines.append("experts: the routed experts' part of weights (E/EP experts x 1/ETP of each, ETP = TP*PCP/EP). "
                     "decode/step includes each MoE layer's all-reduce over the replica (TP*PCP ranks). MoE "
                     "prefill/layer: one MoE layer of one chunk on the rank routing the most rows: the EP "
                     "all-to-alls of counts, rows and rows back (assuming uniform routing: each EP rank gets "
                     "1/EP of its group's rows), the TP all-reduce.")
    return "\n".join(lines)


def to_json(plans: list[LayoutPlan], refused: list, work: Workload) -> dict:
    def comm(stats: CommStats) -> dict:
        return {"calls": dict(stats.calls), "bytes": dict(stats.bytes_sent)}

    def layout_json(i: int, p: LayoutPlan) -> dict:
        lay = p.layout
        figures = {"rank": i + 1, "dp": lay.dp, "tp": lay.tp, "pcp": lay.pcp, "dcp": lay.dcp}
        if moe:
            figures |= {"ep": lay.ep, "etp": lay.etp}
        figures |= {"fits": p.fits, "requests_per_replica": p.requests_per_replica,
                    "params_per_rank": dataclasses.asdict(p.params), "weight_bytes": p.weight_bytes,
                    "kv_cache_bytes": p.kv_cache_bytes, "kv_copies": kv_copies(lay),
                    "activation_bytes_estimate": p.activation_bytes, "total_bytes": p.total_bytes,
                    "decode_per_layer_step": comm(p.decode),
                    "decode_per_step": {"calls": p.decode_per_step.total_calls,
                                        "bytes": p.decode_per_step.total_bytes},
                    "prefill_attention_per_layer": comm(p.prefill_attention),
                    "prefill_route_per_layer": comm(p.prefill_route)}
        if moe:
            figures |= {"moe_layers": p.moe_layers, "moe_decode_per_layer_step": comm(p.moe_decode),
                        "moe_prefill_per_layer_uniform_routing": comm(p.moe_prefill)}
        return figures | {"groups_crossing_nodes": {name: n for name, (n, _) in p.crossing.items()},
                          "cross_node_decode_calls_per_step": p.cross_node_decode_calls_per_step}

    moe = work.shape.moe is not None
    return {
        "model": dataclasses.asdict(work.shape),
        "work": {f.name: getattr(work, f.name) for f in dataclasses.fields(work) if f.name != "shape"},
        "layouts": [layout_json(i, p) for i, p in enumerate(plans)],
        "refused": [{"dp": lay.dp, "tp": lay.tp, "pcp": lay.pcp, "dcp": lay.dcp, **({"ep": lay.ep} if moe else {}),
                     "rule": rule} for lay, rule in refused],
    }


# ----------------------------------------------------------------------------- command line

_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80 GB``, ``1.5TiB`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text)
    if not match or match.group(2) not in _UNITS and match.group(2) is not None:
        raise ValueError(f"--memory-per-device ({text!r}) must be a size such as 80GiB, 80GB or 85899345920 "
                         f"(units: {', '.join(u for u in _UNITS if u)})")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def load_shape(model: str) -> GPTShape:
    """``builtin``, a name in ``SHAPES``, or a Hugging Face ``config.json`` (file or its directory)."""
    if model == "builtin":
        defaults = ModelConfig()
        names = {f.name for f in dataclasses.fields(GPTShape)} & {f.name for f in dataclasses.fields(ModelConfig)}
        return GPTShape(**{name: getattr(defaults, name) for name in names})
    if model in SHAPES:
        return SHAPES[model]
    path = Path(model)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"--model ({model!r}) must be 'builtin', one of {', '.join(SHAPES)}, or a config.json "
                         "file or checkpoint directory; no such file")
    config = read_json_object(path)  # a ConfigError naming the file
    try:
        return read_hf_config(config)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def workload_from_args(args: argparse.Namespace) -> Workload:
    shape = load_shape(args.model)
    for name in ("context", "batch", "devices", "devices_per_node"):
        check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.context > shape.max_seq_len:
        raise ValueError(f"--context ({args.context}) must be <= the model's max_seq_len ({shape.max_seq_len}): "
                         "the engine refuses longer requests")
    if args.devices % args.devices_per_node:
        raise ValueError(f"--devices ({args.devices}) must be a multiple of --devices-per-node "
                         f"({args.devices_per_node}): torchrun starts as many processes on every node")
    chunk = args.context if args.prefill_chunk is None else args.prefill_chunk
    check_positive("--prefill-chunk", chunk)
    return Workload(shape=shape, context=args.context, batch=args.batch, devices=args.devices,
                    devices_per_node=args.devices_per_node, memory_per_device=parse_bytes(args.memory_per_device),
                    dtype=args.dtype, prefill_chunk=min(chunk, args.context),
                    decode_comm=args.decode_comm, prefill_comm=args.prefill_comm)


def main(argv: list[str] | None = None, prog: str = "python -m cptoolkit.plan") -> int:
    """Rank the layouts and print the table (or JSON); exit status 0 when one fits, 1 when none does, 2 for a bad
    argument (one line). ``prog`` names the command in messages (``cptoolkit plan`` runs this too)."""
    parser = OneLineParser(prog=prog,
                            description="Rank the TP x PCP x DCP (x EP, x DP) layouts for a model, a context and a cluster.")
    parser.add_argument("--model", required=True, help=f"config.json, checkpoint dir, 'builtin' or {', '.join(SHAPES)}")
    parser.add_argument("--context", type=int, required=True, help="tokens per request (prompt + generated)")
    parser.add_argument("--batch", type=int, required=True, help="requests in flight, shared by the DP replicas")
    parser.add_argument("--devices", type=int, required=True, help="devices in all; every layout uses all of them")
    parser.add_argument("--devices-per-node", type=int, required=True,
                        help="devices (torchrun processes) per node; TP groups stay inside a node")
    parser.add_argument("--memory-per-device", required=True, help="memory of one device, e.g. 80GiB")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16",
                        help="weights' and KV cache's dtype (default bf16)")
    parser.add_argument("--prefill-chunk", type=int, help="tokens per prefill chunk (default: the whole context)")
    parser.add_argument("--decode-comm", choices=tuple(DECODE_ALGORITHMS), default="a2a",
                        help="DCP decode exchange, parallel.decode_comm (default a2a)")
    parser.add_argument("--prefill-comm", choices=PLANNED_PREFILL_COMMS, default="p2p",
                        help="PCP prefill exchange, parallel.prefill_comm (default p2p)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    try:
        work = workload_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    plans, refused = plan(work)
    print(json.dumps(to_json(plans, refused, work), indent=2) if args.json else render_table(plans, refused, work))
    return 0 if any(p.fits for p in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
