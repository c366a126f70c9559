"""Config → model, tokenizer, KV cache and engine for one rank (the stages after the groups exist)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from cptoolkit.config import Config, ConfigError
from cptoolkit.inference.draft_model import DraftModel
from cptoolkit.inference.engine import Engine
from cptoolkit.inference.hybrid_cache import HybridKVCache
from cptoolkit.inference.kv_cache import PagedKVCache, window_ring_slots
from cptoolkit.layers.dcp_decode import shard_length
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.inference.speculative import NgramProposer
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.layers.comm import use_shared_memory
from cptoolkit.layers.dcp_decode import DecodeGroup
from cptoolkit.layers.shared_memory import shared_memory_groups
from cptoolkit.models.checkpoint import load_model_checkpoint
from cptoolkit.models.from_config import DTYPES, model_from_config
from cptoolkit.models.gpt import CPGPTModel
from cptoolkit.models.matmul_plan import MatmulPlan
from cptoolkit.models.families.registry import hf_shape
from cptoolkit.models.shape import GPTShape, read_config
from cptoolkit.models.tokenizer import ByteTokenizer, load_tokenizer
from cptoolkit.parallel_state import ParallelGroups

LOG = logging.getLogger("cptoolkit")


def attention_runtime(cfg: Config, groups: ParallelGroups) -> AttentionRuntime:
    """The attention state every layer shares: PCP group (and, for ``a2a+p2p``, its hierarchical sub-groups)
    for prefill, DCP group for decode. Also selects the block kernels' backend (``runtime.attention_backend``,
    process-wide in ``block_attention``), before the model is built: ``te`` builds megatron's TE layer spec."""
    from cptoolkit.layers.algorithms import prefill_algorithm
    from cptoolkit.layers.block_attention import set_backend

    set_backend(cfg.runtime.attention_backend)
    p = cfg.parallel
    if prefill_algorithm(p.prefill_comm, "parallel.prefill_comm").hierarchical and groups.hcp_groups is None:
        raise ValueError(f"parallel.prefill_comm = {p.prefill_comm!r} needs the hierarchical groups: build the groups "
                         f"with initialize_model_parallel(..., hierarchical_a2a_size={p.hierarchical_a2a_size})")
    decode_group = DecodeGroup.from_parallel_groups(groups, p.kv_interleave)
    return AttentionRuntime(pcp_group=groups.pcp_group, decode_group=decode_group, prefill_comm=p.prefill_comm,
                            hcp_groups=groups.hcp_groups, decode_comm=p.decode_comm)


def max_seq_len(cfg: Config) -> int:
    """Longest request (prompt + generated tokens): ``inference.max_seq_len``, else the model's."""
    return cfg.inference.max_seq_len or cfg.model.max_seq_len


def kv_cache(cfg: Config, groups: ParallelGroups, shape: GPTShape, device: torch.device,
             request_lens: Sequence[int] | None = None) -> PagedKVCache | HybridKVCache:
    """This rank's KV shard: ``inference.kv_cache_bytes`` of blocks when set (refused when that is less than one
    request of ``max_seq_len`` tokens needs), else ``_default_blocks``: enough for ``batch_size`` requests of
    ``max_seq_len`` tokens, or, given ``request_lens`` (prompt + new tokens of each request, when they are known
    in advance), for the ``batch_size`` longest of them. Checked against the device's free memory before
    allocating, so a cache too large for the machine is one ``ConfigError`` line.

    A model with sliding-window layers (and no ``prefix_caching``, whose pages must stay) keeps those layers
    in a ring cache (``HybridKVCache``): ``batch_size`` reservations (fewer when fewer requests are known to
    come) of the slots the window of the longest step sees (a prefill chunk, or a decode step with its drafts),
    whatever the context; ``kv_cache_bytes`` then
    budgets both caches, the full-attention layers getting what the rings leave."""
    if shape.sliding_window is None or cfg.inference.prefix_caching:
        return kv_caches(cfg, [(groups, shape)], device, request_lens)[0]
    inf, p = cfg.inference, cfg.parallel
    windowed_layers = [n for n in range(1, shape.num_layers + 1) if shape.layer_window(n) is not None]
    num_full = shape.num_layers - len(windowed_layers)
    step_tokens = max(inf.prefill_chunk_size or 1, 1 + (inf.num_speculative_tokens if inf.speculative_method else 0))
    ring_slots = window_ring_slots(shape.sliding_window, step_tokens, groups.dcp_size, p.kv_interleave)
    ring_blocks = min(-(-ring_slots // inf.kv_block_size), _full_length_blocks(cfg, groups))
    windowed_bytes_per_block = _bytes_per_block(cfg, groups, shape, len(windowed_layers))
    full_bytes_per_block = _bytes_per_block(cfg, groups, shape, num_full)
    # Requests that can run at once: batch_size, or fewer when fewer are known to come (generate).
    concurrent = inf.batch_size if request_lens is None else max(1, min(inf.batch_size, len(request_lens)))
    windowed_blocks = concurrent * ring_blocks
    budget, budget_name = _budget(cfg, device)
    if budget is None:
        full_blocks = _default_blocks(cfg, groups, request_lens) if num_full else 0
    elif num_full:
        full_blocks = (budget - windowed_blocks * windowed_bytes_per_block) // full_bytes_per_block
        if full_blocks < _full_length_blocks(cfg, groups):
            raise ConfigError(f"{cfg.source}: {budget_name}: "
                              f"the sliding-window layers' rings take {windowed_blocks * windowed_bytes_per_block:,} "
                              f"bytes per rank ({concurrent} requests x {ring_blocks} blocks), leaving "
                              f"{max(full_blocks, 0)} blocks ({full_bytes_per_block:,} bytes each) for the {num_full} "
                              f"full-attention layers; one request of max_seq_len ({max_seq_len(cfg)}) tokens needs "
                              f"{_full_length_blocks(cfg, groups)}: raise it, or lower inference.batch_size "
                              "(--max-num-seqs) or inference.max_seq_len (--max-model-len)")
    else:
        full_blocks, windowed_blocks = 0, budget // windowed_bytes_per_block
        if windowed_blocks < ring_blocks:
            raise ConfigError(f"{cfg.source}: {budget_name}: smaller than one request's ring of {ring_blocks} blocks "
                              f"({windowed_bytes_per_block:,} bytes each per rank) for the sliding-window layers; "
                              "raise it")
    _check_fits(cfg, windowed_blocks * windowed_bytes_per_block + full_blocks * full_bytes_per_block, device, False,
                budget_name)

    def cache(num_layers: int, num_blocks: int, ring: int | None) -> PagedKVCache:
        return PagedKVCache(num_layers=num_layers, num_kv_heads=len(groups.rank_info.dcp_kv_heads),
                            head_dim=shape.kv_cache_entry[1], block_size=inf.kv_block_size, num_blocks=num_blocks,
                            dcp_rank=groups.dcp_rank, dcp_size=groups.dcp_size, interleave=p.kv_interleave,
                            dtype=DTYPES[cfg.runtime.dtype], device=device, values_are_keys=shape.mla is not None,
                            ring_slots=ring)

    return HybridKVCache(cache(num_full, full_blocks, None) if num_full else None,
                         cache(len(windowed_layers), windowed_blocks, ring_blocks * inf.kv_block_size),
                         windowed_layers)


def _full_length_blocks(cfg: Config, groups: ParallelGroups, num_tokens: int | None = None) -> int:
    """Blocks one request of ``num_tokens`` (default ``max_seq_len``) tokens reserves on every member (the fullest
    shard's)."""
    fullest_shard_tokens = shard_length(num_tokens or max_seq_len(cfg), 0, groups.dcp_size,
                                        cfg.parallel.kv_interleave)
    return -(-fullest_shard_tokens // cfg.inference.kv_block_size)


def _default_blocks(cfg: Config, groups: ParallelGroups, request_lens: Sequence[int] | None) -> int:
    """Blocks without a budget: ``batch_size`` requests of ``max_seq_len`` tokens; given the requests' lengths
    (prompt + new tokens), what the ``batch_size`` longest of them reserve at once, each capped at ``max_seq_len``
    (a longer one is refused by the engine), at least one block. So ``cptoolkit generate`` of a 5-token prompt
    reserves its 5 + max_new_tokens tokens, not ``batch_size`` x the model's length."""
    if request_lens is None:
        return cfg.inference.batch_size * _full_length_blocks(cfg, groups)
    longest = sorted((min(n, max_seq_len(cfg)) for n in request_lens), reverse=True)[:cfg.inference.batch_size]
    return max(1, sum(_full_length_blocks(cfg, groups, n) for n in longest if n > 0))


def kv_caches(cfg: Config, models: list[tuple[ParallelGroups, GPTShape]], device: torch.device,
              request_lens: Sequence[int] | None = None) -> list[PagedKVCache]:
    """This rank's KV shard of each of ``models`` (the target first, then a draft model), all with the target's
    number of blocks (``kv_cache``'s sizing), so that a draft's cache admits whatever the target's admits. The
    bytes of all of them together are checked against the device's free memory before any is allocated."""
    block_size = cfg.inference.kv_block_size
    target_groups, target = models[0]
    bytes_per_block = [_bytes_per_block(cfg, groups, shape) for groups, shape in models]
    budget, budget_name = _budget(cfg, device)
    if budget is not None:
        num_blocks = budget // bytes_per_block[0]
        needed = _full_length_blocks(cfg, target_groups)
        if num_blocks < needed:
            raise ConfigError(f"{cfg.source}: {budget_name}: {num_blocks} KV blocks of {bytes_per_block[0]:,} bytes "
                              f"per rank ({block_size} tokens of {target.num_layers} layers), fewer than one request of "
                              f"max_seq_len ({max_seq_len(cfg)}) tokens needs ({needed} blocks, "
                              f"{needed * bytes_per_block[0]:,} bytes); raise it to at least that, or lower "
                              "inference.max_seq_len (--max-model-len)")
    else:
        num_blocks = _default_blocks(cfg, target_groups, request_lens)
    _check_fits(cfg, num_blocks * sum(bytes_per_block), device, len(models) > 1, budget_name)
    return [PagedKVCache(num_layers=shape.num_layers, num_kv_heads=len(groups.rank_info.dcp_kv_heads),
                         head_dim=shape.kv_cache_entry[1], block_size=block_size, num_blocks=num_blocks,
                         dcp_rank=groups.dcp_rank, dcp_size=groups.dcp_size, interleave=cfg.parallel.kv_interleave,
                         dtype=DTYPES[cfg.runtime.dtype], device=device, values_are_keys=shape.mla is not None)
            for groups, shape in models]


def _bytes_per_block(cfg: Config, groups: ParallelGroups, shape: GPTShape, num_layers: int | None = None) -> int:
    """Bytes of one KV block of ``shape`` on this rank: ``num_layers`` (default: every) layer, its planes, the KV
    heads its DCP group uses."""
    planes, head_dim = shape.kv_cache_entry
    return ((shape.num_layers if num_layers is None else num_layers) * planes * len(groups.rank_info.dcp_kv_heads)
            * cfg.inference.kv_block_size * head_dim * torch.empty(0, dtype=DTYPES[cfg.runtime.dtype]).element_size())


def _free_memory_bytes(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def _budget(cfg: Config, device: torch.device) -> tuple[int | None, str | None]:
    """The KV cache budget per rank and the words that name it in a message; ``(None, None)`` without one.
    ``inference.kv_cache_bytes``, or ``kv_cache_memory_fraction`` of the memory free on ``device`` now (the model
    loaded): the least over the job's ranks (one MIN all-reduce on the default group, which every rank reaches
    here, as it builds its cache), so every rank gets the same blocks and every ``BlockPool`` the same decisions."""
    inf = cfg.inference
    if inf.kv_cache_bytes is not None:
        return inf.kv_cache_bytes, f"inference.kv_cache_bytes = {inf.kv_cache_bytes} (--kv-cache-memory)"
    if inf.kv_cache_memory_fraction is None:
        return None, None
    free = _free_memory_bytes(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        least = torch.tensor([free], dtype=torch.int64, device=device)
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        free = int(least.item())
    budget = int(inf.kv_cache_memory_fraction * free)
    return budget, (f"inference.kv_cache_memory_fraction = {inf.kv_cache_memory_fraction} "
                    f"(--kv-cache-memory-fraction; {budget:,} of the {free:,} bytes free on {device})")


def _check_fits(cfg: Config, cache_bytes: int, device: torch.device, with_draft: bool,
                budget_name: str | None) -> None:
    """Refuse a KV cache larger than what the device has free (a CPU allocation that large would be
    killed by the OOM killer, not fail cleanly); ``budget_name`` names the budget that sized it, if any."""
    free = _free_memory_bytes(device)
    if cache_bytes > free:
        sizing = budget_name or f"inference.batch_size ({cfg.inference.batch_size}) x max_seq_len ({max_seq_len(cfg)})"
        caches = " (the target's and the draft model's)" if with_draft else ""
        raise ConfigError(f"{cfg.source}: the KV cache{caches} needs {cache_bytes:,} bytes per rank but {device} has "
                          f"{free:,} bytes free; it is sized by {sizing}: set inference.kv_cache_bytes "
                          "(--kv-cache-memory), or lower inference.max_seq_len (--max-model-len) or "
                          "inference.batch_size (--max-num-seqs)")


def build_engine(cfg: Config, groups: ParallelGroups, device: torch.device,
                 requests: Sequence[str | list[int]] | None = None) -> Engine:
    """Model (checkpoint or seeded built-in), tokenizer, runtime, cache and, with ``speculative_method:
    draft_model``, the draft model and its cache → ``Engine``. ``requests``: the prompts (text or token ids) the
    engine will be given, when known in advance (``cptoolkit generate``): without ``inference.kv_cache_bytes`` the
    cache is sized for them and ``max_new_tokens`` (``_default_blocks``)."""
    runtime = attention_runtime(cfg, groups)
    model = model_from_config(cfg, groups, runtime).to(device).eval()
    tune_matmuls(cfg, model, groups)
    use_shared_memory_collectives(cfg, groups, device)
    tokenizer = ByteTokenizer() if cfg.model.checkpoint is None else load_tokenizer(cfg.model.checkpoint)
    request_lens = None if requests is None else [
        len(tokenizer.encode(p) if isinstance(p, str) else p) + cfg.inference.max_new_tokens for p in requests]
    kw = dict(max_batch_size=cfg.inference.batch_size, max_seq_len=max_seq_len(cfg),
              prefill_chunk_size=cfg.inference.prefill_chunk_size, prefix_caching=cfg.inference.prefix_caching)
    if cfg.inference.speculative_method != "draft_model":
        return Engine(model, runtime, groups, kv_cache(cfg, groups, model.shape, device, request_lens), tokenizer, **kw,
                      proposer=proposer(cfg))
    path = cfg.inference.speculative_model
    draft_shape = hf_shape(read_config(path), path)
    draft_groups = groups_for(groups, draft_shape)
    draft_runtime = attention_runtime(cfg, draft_groups)
    draft = load_model_checkpoint(path, draft_groups.megatron_pg_collection(), draft_runtime,
                                  dtype=DTYPES[cfg.runtime.dtype]).to(device).eval()
    tune_matmuls(cfg, draft, draft_groups)
    cache, draft_cache = kv_caches(cfg, [(groups, model.shape), (draft_groups, draft_shape)], device, request_lens)
    sampled_vocab_size = min(tokenizer.vocab_size, model.shape.vocab_size)
    return Engine(model, runtime, groups, cache, tokenizer, **kw, draft_model=DraftModel(
        draft, draft_runtime, draft_cache, groups.pcp_rank, cfg.inference.num_speculative_tokens, sampled_vocab_size))


def tune_matmuls(cfg: Config, model: CPGPTModel, groups: ParallelGroups) -> None:
    """With ``runtime.tune_matmuls``, give ``model`` a ``MatmulPlan`` that times its few-row products in its own
    decode forwards and settles them over the replica (the model runner's decode step is the ``tuning`` window)."""
    if cfg.runtime.tune_matmuls:
        model.matmul_plan = MatmulPlan(tune=True, group=groups.replica_group)


def use_shared_memory_collectives(cfg: Config, groups: ParallelGroups, device: torch.device) -> None:
    """With ``runtime.shared_memory_collectives`` on a CPU, run the collectives of the TP group (two all-reduces per
    replayed layer, the logits' all-gather), the DCP group (decode's all-gathers, all-to-alls, reduce-scatters) and the
    PCP group (all but the ring's point-to-point exchanges) through shared memory where ``shared_memory_groups`` finds
    it pays; gloo otherwise. Collective on the default group and on these groups."""
    if cfg.runtime.shared_memory_collectives and device.type == "cpu":
        named = {"TP": groups.tp_group, "PCP": groups.pcp_group, "DCP": groups.dcp_group}
        through_shared_memory = []
        for (name, group), shared_memory in zip(named.items(),
                                                shared_memory_groups(list(named.values()), cfg.runtime.collective_timeout_s)):
            use_shared_memory(group, shared_memory)
            through_shared_memory += [name] if shared_memory is not None else []
        if through_shared_memory:
            LOG.info("collectives through shared memory: %s groups", ", ".join(through_shared_memory))


def groups_for(groups: ParallelGroups, shape: GPTShape) -> ParallelGroups:
    """``groups`` (the same process groups) with the layout of ``shape``'s heads: which query and KV heads each
    rank holds, the KV heads its DCP group caches and their replication over TP (a draft model's, on the
    target's ranks)."""
    layout = dataclasses.replace(groups.layout, num_heads=shape.num_attention_heads,
                                 num_kv_heads=shape.num_kv_heads)
    return dataclasses.replace(groups, layout=layout, rank_info=layout.rank_info(groups.rank_info.rank))


def proposer(cfg: Config) -> NgramProposer | None:
    """The prompt-lookup proposer ``inference.speculative_method: ngram`` asks for (None: another method or off)."""
    inf = cfg.inference
    if inf.speculative_method != "ngram":
        return None
    return NgramProposer(inf.num_speculative_tokens, inf.prompt_lookup_min, inf.prompt_lookup_max)


def read_prompts(cfg: Config) -> list[str | list[int]]:
    """``inference.prompts``; or the non-empty lines of ``inference.prompt_file`` (relative to the config);
    or each conversation of ``inference.messages`` as the token ids the checkpoint's chat template renders
    (``render_chat``: the tokenizer's own template, generation prompt added)."""
    if cfg.inference.messages:
        tokenizer = load_tokenizer(cfg.model.checkpoint)
        return [tokenizer.render_chat(conversation) for conversation in cfg.inference.messages]
    if cfg.inference.prompt_file is None:
        if not cfg.inference.prompts:
            raise ConfigError(f"{cfg.source}: nothing to generate for: give inference.prompts (a list), "
                              "inference.prompt_file (a path) or inference.messages (a list of conversations)")
        return list(cfg.inference.prompts)
    path = Path(cfg.inference.prompt_file)
    path = path if path.is_absolute() else Path(cfg.source).parent / path
    if not path.is_file():
        raise ConfigError(f"{cfg.source}: inference.prompt_file = {cfg.inference.prompt_file!r}: no such file")
    return [line for line in path.read_text().splitlines() if line.strip()]


def sampling_params(cfg: Config) -> SamplingParams:
    inf = cfg.inference
    return SamplingParams(temperature=inf.temperature, top_k=inf.top_k, top_p=inf.top_p, seed=inf.seed,
                          max_new_tokens=inf.max_new_tokens, stop_strings=tuple(inf.stop_strings))
