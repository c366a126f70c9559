"""The engine's model runner: the ``AttentionPhase`` of a step, the forwards of the target (and draft) model, and
the count of their collectives.

- **Prefill** of a batch of prompt chunks: each chunk is padded and split by DualChunkSwap over the PCP group;
  the attention layers hand each layer's K/V to ``prefill_kv.store_prefill_kv``, which routes each token to its
  KV-shard owner over the DCP group (one all-to-all per layer); a draft model prefills the same chunks into its
  own cache. Only each chunk's last token gets logits; the PCP rank holding it contributes them to a sum over
  the PCP group. A request that asks for ``prompt_logprobs`` has every prompt token of the chunk scored where
  its PCP rank holds it (``prompt_logprobs``).
- **Decode**: one forward of every running request's last token (and its drafts: ``L`` tokens per sequence),
  attention over the DCP-sharded cache, the step planned once on the host for every layer
  (``PagedKVCache.views``), so the forward never waits on the host. On a GPU the batch is padded to its bucket
  (``decode_bucket``: 1, 2, 4, 8, ...) with rows that keep and read nothing, so the step's tensors take one shape
  per bucket (and read width): the shapes a CUDA graph captures.
- **Drafts** for speculative decoding: a ``proposer`` (prompt lookup, ``speculative``) or the caches' draft model.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from cptoolkit.inference.caches import EngineCaches
from cptoolkit.inference.metrics import EngineMetrics
from cptoolkit.inference.prefill_kv import store_prefill_kv
from cptoolkit.inference.prompt_logprobs import ScoredRow, score_prompt_chunks
from cptoolkit.inference.request import Request
from cptoolkit.inference.speculative import NgramProposer
from cptoolkit.layers.comm import all_reduce
from cptoolkit.layers.core_attention import AttentionPhase, AttentionRuntime
from cptoolkit.layers.dual_chunk_swap import DualChunkSwapBatch, partition_batch
from cptoolkit.moe.layer import moe_layers
from cptoolkit.models.gpt import CPGPTModel, gpt_forward, gpt_hidden, gpt_logits
from cptoolkit.parallel_state import ParallelGroups


@dataclass(frozen=True)
class DecodeStep:
    """One decode step's forward inputs, padded to its bucket: ``input_ids``, ``positions [num_rows, L]`` int64 on
    the cache's device (the requests' rows first), the ``phase`` whose cache views hold the step's plan, and
    ``is_padding [num_rows, L]`` (bool: padding rows, and draft slots past a row's own drafts), which MoE layers
    leave out of their expert load (None for a model without MoE layers: nothing reads it)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    phase: AttentionPhase
    is_padding: Optional[torch.Tensor]


class ModelRunner:
    """Runs ``model`` (built with ``runtime``) on this rank's ``groups`` over ``caches``; prefill chunks hold at
    most ``chunk_size`` prompt tokens; ``proposer`` drafts by prompt lookup (the caches' draft model otherwise,
    when there is one). ``pad_to_buckets`` pads each decode step to ``decode_bucket`` rows: on a GPU, where a step
    of a fixed shape can be a CUDA graph; not elsewhere, where the padding rows would only cost (a CPU step of 5
    requests padded to 8 runs at the cost of 8: docs/results.md)."""

    def __init__(self, model: CPGPTModel, runtime: AttentionRuntime, groups: ParallelGroups, caches: EngineCaches,
                 chunk_size: int, proposer: Optional[NgramProposer] = None):
        if proposer is not None and caches.draft is not None:
            raise ValueError("proposer and draft_model: give at most one (speculative decoding takes one source of "
                             "drafts)")
        self.model, self.runtime, self.groups, self.caches = model, runtime, groups, caches
        self.chunk_size, self.proposer = chunk_size, proposer
        self.pad_to_buckets = caches.device.type == "cuda"
        self.counts_expert_load = bool(moe_layers(model))  # only MoE layers read a step's padding mask

    def prefill(self, requests: list[Request]) -> tuple[torch.Tensor, list[int]]:
        """Prefill the next chunk of every request over its cached history (``Request.num_cached``); returns the
        logits ``[b, vocab]`` of each chunk's last token (the same on every PCP rank) and the chunk lengths.
        Chunks start at multiples of ``interleave * dcp`` (prefix pages and chunk sizes are such multiples), so
        one DCP routing serves every row."""
        groups, device = self.groups, self.caches.device
        history = [r.num_cached for r in requests]
        chunks = [r.prompt_ids[h:h + self.chunk_size] for r, h in zip(requests, history)]
        batch = partition_batch(chunks, groups.pcp_rank, groups.pcp_size, pad_id=0)
        starts = torch.tensor(history, dtype=torch.int64)
        # DualChunkSwap pads each chunk by up to 2*PCP-1 tokens whose positions may pass the model's
        # last one; no real token attends to a pad (pads come last, attention is causal) and pads are
        # never cached, so their positions are clamped into the model's range.
        positions = (batch.position_ids + starts[:, None]).clamp(max=self.model.shape.max_seq_len - 1)
        owners = batch.last_token_owners()  # (pcp_rank, local index) of each chunk's last token
        ids = [r.request_id for r in requests]
        phase = AttentionPhase(
            mode="prefill",
            history_lens=starts.to(device) if any(history) else None,
            kv_caches=self.caches.views(ids) if any(history) else {},
            on_prefill_kv=functools.partial(store_prefill_kv, self.caches.target, self.runtime.decode_group,
                                            groups.pcp_rank, ids, batch.seq_lens, history, batch.seq_len_padded))
        with torch.no_grad():
            hidden = gpt_hidden(self.model, batch.input_ids.to(device), positions.to(device), self.runtime,
                                phase=phase, padding_mask=~batch.valid.to(device))  # [s_local, b, h]; pads: no MoE load
            last_index = torch.tensor([i for _, i in owners], device=device)
            last_logits = gpt_logits(self.model, hidden.gather(
                0, last_index.view(1, -1, 1).expand(1, -1, hidden.shape[-1])))[:, 0]
            self._score_prompts(hidden, batch, requests, history)
        if self.caches.draft is not None:
            self.caches.draft.prefill(ids, batch, positions, history)
        if groups.pcp_size > 1:  # exactly one PCP rank holds each row; the others contribute zeros
            not_mine = torch.tensor([owner != groups.pcp_rank for owner, _ in owners], device=device)
            all_reduce(last_logits.masked_fill_(not_mine.unsqueeze(1), 0.0), groups.pcp_group)
        return last_logits, [len(chunk) for chunk in chunks]

    def _score_prompts(self, hidden: torch.Tensor, batch: DualChunkSwapBatch, requests: list[Request],
                       history: list[int]) -> None:
        """Record the prompt logprobs of this chunk for the requests that asked for them."""
        rows = [ScoredRow(row, r.prompt_ids, start, chunk_len, r.sampling.prompt_logprobs)
                for row, (r, start, chunk_len) in enumerate(zip(requests, history, batch.seq_lens))
                if r.sampling.prompt_logprobs is not None]
        figures = score_prompt_chunks(self.model, hidden, batch.position_ids[0], rows, self.groups.pcp_group)
        for scored, by_position in zip(rows, figures):
            for position, logprob in by_position.items():
                requests[scored.row].prompt_logprobs[position] = logprob

    def propose(self, requests: list[Request], metrics: EngineMetrics) -> list[list[int]]:
        """Each request's draft tokens (none without a proposer or draft model). Every row writes ``1 + max
        drafts`` positions to the cache, so the request with the least room left (``max_new_tokens`` minus
        generated, >= 1) bounds them all; the same on every rank (the proposer reads only token ids, the draft
        model's argmax reads logits gathered over TP). The draft model's collectives are counted in ``metrics``."""
        draft = self.caches.draft
        if self.proposer is None and draft is None:
            return [[] for _ in requests]
        room = min(r.sampling.max_new_tokens - len(r.output_ids) for r in requests)
        if draft is None:
            return [self.proposer.propose(r.prompt_ids + r.output_ids, room) for r in requests]
        calls_before = draft.runtime.stats.total_calls
        drafts = draft.propose(requests, room)
        metrics.draft_collectives += draft.runtime.stats.total_calls - calls_before
        return drafts

    def decode(self, requests: list[Request], drafts: list[list[int]], metrics: EngineMetrics) -> torch.Tensor:
        """One decode forward (``decode_step``); returns the requests' ``logits [b, L, vocab]``. The step's
        collectives and bytes (in total and by layer) are counted in ``metrics``."""
        stats = self.runtime.stats
        calls_before, bytes_before = stats.total_calls, stats.total_bytes
        layer_calls_before = {layer: s.total_calls for layer, s in self.runtime.per_layer_stats.items()}
        step = self.decode_step(requests, drafts)
        with torch.inference_mode(), self.model.matmul_plan.tuning():
            logits = gpt_forward(self.model, step.input_ids, step.positions, self.runtime, phase=step.phase,
                                 padding_mask=step.is_padding)
        logits = logits[:len(requests)]  # [b, L, vocab]
        metrics.decode_collectives += stats.total_calls - calls_before
        metrics.decode_bytes_sent += stats.total_bytes - bytes_before
        by_layer = metrics.decode_collectives_by_layer
        for layer, layer_stats in self.runtime.per_layer_stats.items():
            by_layer[layer] = by_layer.get(layer, 0) + layer_stats.total_calls - layer_calls_before.get(layer, 0)
        return logits

    def decode_step(self, requests: list[Request], drafts: list[list[int]]) -> DecodeStep:
        """The inputs of one decode forward: each row feeds its last token and its drafts, padded to the longest
        row's (padding is never accepted), with ``pad_to_buckets`` the batch padded to ``decode_bucket(b)`` rows
        (token 0 at positions 0 .. L-1: they keep and read nothing), the step planned on the host
        (``EngineCaches.views``)."""
        num_drafts = max(map(len, drafts))
        num_rows = decode_bucket(len(requests)) if self.pad_to_buckets else len(requests)
        padding = [[0] * (num_drafts + 1)] * (num_rows - len(requests))
        input_ids = torch.tensor([[r.output_ids[-1], *d, *[0] * (num_drafts - len(d))]
                                  for r, d in zip(requests, drafts)] + padding, device=self.caches.device)
        host_positions = [list(range(r.total_len - 1, r.total_len + num_drafts)) for r in requests]
        positions = torch.tensor(host_positions + [list(range(num_drafts + 1))] * len(padding),
                                 device=self.caches.device)
        phase = AttentionPhase(mode="decode", decode_positions=positions[:, 0] if num_drafts == 0 else positions,
                               kv_caches=self.caches.views([r.request_id for r in requests], host_positions, num_rows))
        is_padding = torch.tensor([[j > len(d) for j in range(num_drafts + 1)] for d in drafts]
                                  + [[True] * (num_drafts + 1)] * len(padding),
                                  device=self.caches.device) if self.counts_expert_load else None
        return DecodeStep(input_ids, positions, phase, is_padding)


def decode_bucket(batch: int) -> int:
    """The rows a decode step of ``batch`` requests runs: the next power of two (1, 2, 4, 8, ...), so a server's
    steps take a handful of shapes, one CUDA graph each."""
    if batch < 1:
        raise ValueError(f"batch = {batch} is invalid: a decode step has at least one request")
    return 1 << (batch - 1).bit_length()
