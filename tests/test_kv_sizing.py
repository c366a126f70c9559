"""How much KV cache a rank allocates (``inference.builder.kv_cache``): a budget (``inference.kv_cache_bytes``,
``--kv-cache-memory 2GiB``, or ``kv_cache_memory_fraction`` of the free memory, the least over the ranks) gives the
whole blocks that fit in it, and is refused, naming the field and the flag, when it cannot hold one request of
``max_seq_len`` tokens; without one, ``batch_size`` requests of ``max_seq_len``
tokens, or, when the requests are known in advance (``cptoolkit generate``), the ``batch_size`` longest of them.
No process group is needed: the cache reads only the layout side of the groups.
"""
from __future__ import annotations

import re

import pytest
import torch

from cptoolkit import cli
from cptoolkit.inference import builder
from cptoolkit.config import ConfigError, config_from_dict
from cptoolkit.inference.builder import kv_cache
from cptoolkit.layout import ParallelLayout
from cptoolkit.models.from_config import model_shape
from cptoolkit.models.families.registry import hf_shape
from cptoolkit.models.shape import read_config
from cptoolkit.parallel_state import ParallelGroups
from tests.hf_checkpoints import hf_model, save_checkpoint
from tests.multiproc import run_ranks

BLOCK = 16
# The built-in model: 2 KV heads of 64 over 4 layers (ModelConfig's defaults), float32.
SEQ_LEN = 256


def _cache(inference: dict, model: dict | None = None, request_lens=None, parallel: dict | None = None):
    cfg = config_from_dict({"parallel": parallel or {}, "model": model or {}, "runtime": {"device": "cpu"},
                            "inference": {"prompts": ["x"], "kv_block_size": BLOCK, "max_seq_len": SEQ_LEN,
                                          **inference}}, source="<t>")
    shape = hf_shape(read_config(cfg.model.checkpoint), cfg.model.checkpoint) if cfg.model.checkpoint else \
        model_shape(cfg)
    p = cfg.parallel
    layout = ParallelLayout(p.tp, p.pcp, p.dcp, shape.num_attention_heads, shape.num_kv_heads, dp=p.dp)
    groups = ParallelGroups(layout, layout.rank_info(0), *[None] * 7)
    return cfg, shape, kv_cache(cfg, groups, shape, torch.device("cpu"), request_lens)


def _bytes_per_block(cfg, shape) -> int:
    return shape.num_layers * 2 * shape.num_kv_heads * BLOCK * shape.kv_cache_entry[1] * 4  # K and V, float32


def test_a_budget_allocates_the_whole_blocks_that_fit_in_it():
    cfg, shape, _ = _cache({})
    per_block = _bytes_per_block(cfg, shape)
    budget = 40 * per_block + per_block // 2
    _, _, cache = _cache({"kv_cache_bytes": budget})
    assert (cache.num_blocks, cache.bytes_per_rank) == (40, 40 * per_block)


def test_a_budget_smaller_than_one_max_length_request_is_refused_naming_the_field_and_the_flag():
    cfg, shape, _ = _cache({})
    per_block, needed = _bytes_per_block(cfg, shape), SEQ_LEN // BLOCK
    budget = needed * per_block - 1
    with pytest.raises(ConfigError, match="^" + re.escape(
            f"<t>: inference.kv_cache_bytes = {budget} (--kv-cache-memory): {needed - 1} KV blocks of {per_block:,} "
            f"bytes per rank ({BLOCK} tokens of {shape.num_layers} layers), fewer than one request of max_seq_len "
            f"({SEQ_LEN}) tokens needs ({needed} blocks, {needed * per_block:,} bytes); raise it to at least that, "
            "or lower inference.max_seq_len (--max-model-len)") + "$"):
        _cache({"kv_cache_bytes": budget})
    assert _cache({"kv_cache_bytes": budget + 1})[2].num_blocks == needed


def test_without_a_budget_the_cache_holds_batch_size_max_length_requests_or_the_known_ones():
    assert _cache({"batch_size": 3})[2].num_blocks == 3 * SEQ_LEN // BLOCK
    # cptoolkit generate: a 5-token prompt + 16 new tokens is 2 blocks; of 5 requests the 3 longest, capped at
    # max_seq_len (a longer one is refused by the engine).
    assert _cache({"batch_size": 3}, request_lens=[5 + 16])[2].num_blocks == 2
    assert _cache({"batch_size": 3}, request_lens=[21, 40, 17, 1000, 33])[2].num_blocks == 16 + 3 + 3


def test_a_sliding_window_budget_must_leave_the_full_layers_one_max_length_request(tmp_path):
    """Gemma 2: a windowed layer's ring beside a full-attention layer (``HybridKVCache``)."""
    torch.manual_seed(0)
    checkpoint = save_checkpoint(hf_model("gemma2"), tmp_path)
    model, inference = {"checkpoint": checkpoint}, {"batch_size": 2, "max_seq_len": 64}
    _, _, default = _cache(inference, model)
    assert (default.full.num_blocks, default.windowed.num_blocks) == (2 * 64 // BLOCK, 2)
    # One known request of 20 tokens: one ring and the 2 blocks of its length, not batch_size of each.
    _, _, known = _cache(inference, model, request_lens=[20])
    assert (known.full.num_blocks, known.windowed.num_blocks) == (2, 1)
    with pytest.raises(ConfigError, match=r"^<t>: inference\.kv_cache_bytes = 1024 \(--kv-cache-memory\): the "
                                          r"sliding-window layers' rings take [\d,]+ bytes per rank \(2 requests x 1 "
                                          r"blocks\), leaving 0 blocks .* one request of max_seq_len \(64\) tokens "
                                          r"needs 4: raise it"):
        _cache({**inference, "kv_cache_bytes": 1024}, model)
    assert _cache({**inference, "kv_cache_bytes": default.bytes_per_rank}, model)[2].full.num_blocks == 8


def test_kv_cache_memory_takes_sizes_with_units(capsys):
    args = cli.build_parser().parse_args(["serve", "--kv-cache-memory", "1.5GiB"])
    assert cli.overrides(args, {}, "<t>")["inference.kv_cache_bytes"] == 3 * 2 ** 29
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "--kv-cache-memory", "lots"])
    assert "argument --kv-cache-memory: 'lots' is not a size: give bytes, or a number with a unit such as 2GiB" in \
        capsys.readouterr().err


def test_a_fraction_budgets_that_share_of_the_free_memory(monkeypatch):
    cfg, shape, _ = _cache({})
    per_block = _bytes_per_block(cfg, shape)
    monkeypatch.setattr(builder, "_free_memory_bytes", lambda device: 100 * per_block + 7)
    assert _cache({"kv_cache_memory_fraction": 0.25})[2].num_blocks == 25
    with pytest.raises(ConfigError, match="^" + re.escape(
            f"<t>: inference.kv_cache_memory_fraction = 0.1 (--kv-cache-memory-fraction; {10 * per_block:,} of the "
            f"{100 * per_block + 7:,} bytes free on cpu): 10 KV blocks of") + ".* fewer than one request of "
                                                                             r"max_seq_len \(256\) tokens needs"):
        _cache({"kv_cache_memory_fraction": 0.1})


def _fraction_rank(rank, world_size, free_per_rank):
    builder._free_memory_bytes = lambda device: free_per_rank[rank]
    return _cache({"kv_cache_memory_fraction": 0.5})[2].num_blocks


def test_a_fraction_gives_every_rank_the_blocks_of_the_least_free():
    cfg, shape, _ = _cache({})
    per_block = _bytes_per_block(cfg, shape)
    assert run_ranks(2, _fraction_rank, [200 * per_block, 60 * per_block], timeout_s=120) == [30, 30]


@pytest.mark.parametrize("inference, message", [
    ({"kv_cache_memory_fraction": 0}, r"inference\.kv_cache_memory_fraction = 0: must be in \(0, 1\]: the share "
                                      r"of the device memory free once the model is loaded"),
    ({"kv_cache_memory_fraction": 0.5, "kv_cache_bytes": 1024},
     r"inference\.kv_cache_memory_fraction = 0\.5: give it or kv_cache_bytes \(1024\), not both$"),
])
def test_a_fraction_is_checked_when_the_config_loads(inference, message):
    with pytest.raises(ConfigError, match="^<t>: " + message):
        _cache(inference)
