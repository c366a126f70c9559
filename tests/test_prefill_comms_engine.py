"""The inference engine with Ulysses (``a2a``) and hierarchical (``a2a+p2p``) prefill generates the
single-rank greedy tokens: TP1 x PCP2 and TP2 x PCP2 with ``a2a``, TP1 x PCP4 as 2 x 2 with ``a2a+p2p``.

The groups come from ``parallel_state.initialize_model_parallel(..., hierarchical_a2a_size=...)`` and reach
the layers through ``builder.attention_runtime``, as in ``launch/infer.py``. Each layer's prefill
collectives are counted, so a run that silently fell back to another algorithm fails too.
"""
from __future__ import annotations

import pytest
import torch

from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import attention_runtime, build_engine
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.multiproc import run_ranks

MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "num_kv_heads": 2, "ffn_hidden_size": 96,
         "vocab_size": 320, "max_seq_len": 96, "seed": 7}
PROMPTS = ["Ulysses trades sequence shards for head shards", "a2a", "hierarchical: a2a inside, ring across"]
MAX_NEW = [5, 3, 4]
# (tp, pcp, prefill_comm, hierarchical_a2a_size) by world size; DCP = PCP.
LAYOUTS = {2: [(1, 2, "a2a", None)], 4: [(2, 2, "a2a", None), (1, 4, "a2a+p2p", 2)]}


def _config(tp=1, pcp=1, prefill_comm="p2p", hierarchical_a2a_size=None):
    parallel = {"tp": tp, "pcp": pcp, "dcp": pcp, "prefill_comm": prefill_comm}
    if hierarchical_a2a_size is not None:
        parallel["hierarchical_a2a_size"] = hierarchical_a2a_size
    return config_from_dict({"parallel": parallel, "model": dict(MODEL), "runtime": {"device": "cpu"},
                             "inference": {"prompts": ["x"], "batch_size": 2, "kv_block_size": 4}}, source="<test>")


def _generate(cfg):
    """Greedy tokens of PROMPTS, and layer 1's all_to_all and send_recv counts over the whole run."""
    p = cfg.parallel
    groups = initialize_model_parallel(tp=p.tp, pcp=p.pcp, dcp=p.dcp, num_heads=MODEL["num_attention_heads"],
                                       num_kv_heads=MODEL["num_kv_heads"],
                                       hierarchical_a2a_size=p.hierarchical_a2a_size)
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        results = engine.generate(PROMPTS, [SamplingParams(temperature=0.0, max_new_tokens=n) for n in MAX_NEW])
        prefill_calls = {name: count for name, count in engine.runtime.layer_stats(1).calls.items()
                         if name in ("all_to_all", "send_recv")}
        return [r.token_ids for r in results], prefill_calls
    finally:
        destroy_model_parallel()


def _layouts_rank(rank, world_size, layouts):
    return {layout: _generate(_config(*layout)) for layout in layouts}


def _reference_rank(rank, world_size):
    return _generate(_config())[0]


@pytest.fixture(scope="module")
def reference_tokens():
    tokens = run_ranks(1, _reference_rank)[0]
    assert [len(t) for t in tokens] == MAX_NEW
    return tokens


@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_a2a_prefill_comms_generate_the_single_rank_tokens(world_size, reference_tokens):
    per_rank = run_ranks(world_size, _layouts_rank, LAYOUTS[world_size], timeout_s=300)
    for rank, results in enumerate(per_rank):
        for layout, (tokens, prefill_calls) in results.items():
            assert tokens == reference_tokens, f"rank {rank}, layout {layout}: {tokens} != {reference_tokens}"
            _, pcp, comm, a2a_size = layout
            # Every prefill call: 4 all-to-alls (q, k, v, out), plus the ring across a2a groups for a2a+p2p
            # (decode at DCP = PCP issues one all_gather per step and neither of these).
            assert prefill_calls.get("all_to_all", 0) > 0, (rank, layout, prefill_calls)
            ring_steps = 0 if comm == "a2a" else pcp // a2a_size - 1
            assert prefill_calls.get("send_recv", 0) == prefill_calls["all_to_all"] // 4 * ring_steps, \
                (rank, layout, prefill_calls)


def test_a2a_plus_p2p_without_hierarchical_groups_is_one_clear_error():
    cfg = _config(1, 1, "a2a+p2p", 1)
    groups = type("Groups", (), {"hcp_groups": None})()
    with pytest.raises(ValueError, match=r"^parallel.prefill_comm = 'a2a\+p2p' needs the hierarchical groups: build "
                                         r"the groups with initialize_model_parallel\(\.\.\., "
                                         r"hierarchical_a2a_size=1\)$"):
        attention_runtime(cfg, groups)
