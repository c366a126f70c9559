"""Real gloo process groups equal the pure layout's rank lists; megatron-core accepts the pg_collection."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from cptoolkit import parallel_state as ps
from cptoolkit.layout import LEGEND, ParallelLayout, layout_report, render_layout
from tests.multiproc import run_ranks

CONFIGS_4 = [  # (tp, pcp, dcp, num_heads, num_kv_heads, dp)
    (2, 2, 2, 8, 2, 1), (2, 2, 4, 8, 1, 1), (4, 1, 1, 8, 2, 1), (4, 1, 4, 8, 8, 1), (1, 4, 4, 4, 2, 1),
    (1, 2, 2, 4, 4, 2), (2, 1, 2, 4, 1, 2),
]
CONFIGS_8 = [
    (2, 4, 4, 8, 2, 1), (2, 4, 8, 8, 2, 1), (4, 2, 2, 8, 1, 1), (4, 2, 4, 8, 2, 1), (4, 2, 8, 8, 4, 1),
    (8, 1, 8, 16, 2, 1), (1, 8, 8, 4, 1, 1), (2, 2, 2, 4, 2, 2), (2, 2, 4, 4, 1, 2),
]


def _members(group) -> list[int]:
    """Global ranks of ``group`` in group-rank order, learned by an all-gather inside the group."""
    mine = torch.tensor([dist.get_rank()])
    gathered = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return [int(t) for t in gathered]


def _group_of(rank: int, groups: list[list[int]]) -> list[int]:
    return next(g for g in groups if rank in g)


def _check_config(rank: int, config) -> list[str]:
    """Initialize ``config``, compare every group with the layout, destroy. Returns mismatch descriptions."""
    tp, pcp, dcp, heads, kv_heads, dp = config
    groups = ps.initialize_model_parallel(tp, pcp, dcp, heads, kv_heads, dp=dp)
    layout = groups.layout
    expected = {"tp": layout.tp_groups, "pcp": layout.pcp_groups, "dcp": layout.dcp_groups, "dp": layout.dp_groups,
                "dp_pcp": layout.dp_pcp_groups, "self": [[r] for r in range(layout.world_size)]}
    errors = [f"{config} rank {rank} {kind}: got {_members(getattr(groups, f'{kind}_group'))}, "
              f"expected {_group_of(rank, lists)}"
              for kind, lists in expected.items()
              if _members(getattr(groups, f"{kind}_group")) != _group_of(rank, lists)]
    facade = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
              ps.get_prefill_context_parallel_rank(), ps.get_prefill_context_parallel_world_size(),
              ps.get_decode_context_parallel_rank(), ps.get_decode_context_parallel_world_size())
    group_view = tuple(dist.get_rank(g) if i % 2 == 0 else dist.get_world_size(g)
                       for i, g in enumerate([ps.get_tensor_model_parallel_group()] * 2
                                             + [ps.get_prefill_context_parallel_group()] * 2
                                             + [ps.get_decode_context_parallel_group()] * 2))
    info = layout.rank_info(rank)
    wanted = (info.tp_rank, tp, info.pcp_rank, pcp, info.kv_shard, dcp)
    if facade != wanted or group_view != wanted or groups.dcp_tp_positions != dcp // pcp:
        errors.append(f"{config} rank {rank}: facade {facade}, group ranks {group_view}, expected {wanted}")
    ps.destroy_model_parallel()
    if ps.model_parallel_is_initialized():
        errors.append(f"{config} rank {rank}: still initialized after destroy")
    return errors


def _wrong_world_size(rank: int) -> tuple[str, float]:
    start = time.monotonic()
    try:
        ps.initialize_model_parallel(2, 2, 2, 8, 2, dp=3)
    except ValueError as error:
        return str(error), time.monotonic() - start
    return "no error", time.monotonic() - start


def _initialize_twice(rank: int, world_size: int) -> str:
    ps.initialize_model_parallel(world_size, 1, 1, world_size, 1)
    try:
        ps.initialize_model_parallel(world_size, 1, 1, world_size, 1)
    except RuntimeError as error:
        return str(error)
    finally:
        ps.destroy_model_parallel()
    return "no error"


def _all_configs(rank: int, world_size: int, configs) -> dict:
    errors = [e for config in configs for e in _check_config(rank, config)]
    return {"errors": errors, "wrong_world": _wrong_world_size(rank), "twice": _initialize_twice(rank, world_size),
            "initialized": ps.model_parallel_is_initialized()}


@pytest.mark.parametrize("world_size, configs", [(4, CONFIGS_4), (8, CONFIGS_8)])
def test_groups_match_layout(world_size, configs):
    assert all(ParallelLayout(*c[:5], dp=c[5]).world_size == world_size for c in configs)
    results = run_ranks(world_size, _all_configs, configs, timeout_s=180)
    for rank, result in enumerate(results):
        assert not result["errors"], "\n".join(result["errors"])
        message, seconds = result["wrong_world"]
        assert message == f"world size {world_size} != dp*pcp*tp = 3*2*2 = 12: launch 12 ranks or change dp, pcp or tp", \
            f"rank {rank}: {message}"
        assert seconds < 5, f"rank {rank}: validation took {seconds:.1f} s"
        assert result["twice"] == "model parallel groups are already initialized: call destroy_model_parallel() first"
        assert not result["initialized"], f"rank {rank}: a failed initialize left groups behind"


def _check_gpt_model_builds(config, pg_collection) -> None:
    """megatron's GPTModel accepts the collection (every group it reads is present) and shards over its TP group."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=32, max_sequence_length=16,
                     pg_collection=pg_collection)
    assert model.embedding.word_embeddings.num_embeddings_per_partition == 16
    assert model.decoder.layers[0].self_attention.linear_qkv.tp_group is pg_collection.tp
    assert model.cp_group.size() == 1


def _megatron_column_parallel(rank: int, world_size: int) -> tuple[float, float]:
    """A megatron ColumnParallelLinear on the pg_collection's TP group equals the unsharded linear: this rank's
    output columns forward, and the input gradient (all-reduced over the TP group by megatron) backward."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    groups = ps.initialize_model_parallel(tp=2, pcp=1, dcp=1, num_heads=4, num_kv_heads=2)
    pg_collection = groups.megatron_pg_collection()
    assert pg_collection.cp.size() == 1 and pg_collection.pp.size() == 1 and pg_collection.tp.size() == 2
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=4, use_cpu_initialization=True,
                               tensor_model_parallel_size=2, params_dtype=torch.float32)
    torch.manual_seed(0)  # the CPU init draws the full weight on every rank, then keeps this rank's rows
    layer = ColumnParallelLinear(8, 12, config=config, init_method=torch.nn.init.normal_, bias=False,
                                 gather_output=False, keep_master_weight_for_test=True, tp_group=pg_collection.tp)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 3, 8, generator=generator, requires_grad=True)
    upstream = torch.randn(5, 3, 12, generator=generator)
    rows = slice(6 * groups.tp_rank, 6 * (groups.tp_rank + 1))
    output, _ = layer(inputs)
    (output * upstream[..., rows]).sum().backward()
    reference_in = inputs.detach().double().requires_grad_()
    reference = reference_in @ layer.master_weight.double().T
    (reference * upstream.double()).sum().backward()
    _check_gpt_model_builds(config, pg_collection)
    ps.destroy_model_parallel()
    return (float((output.double() - reference[..., rows]).abs().max()),
            float((inputs.grad.double() - reference_in.grad).abs().max()))


def test_megatron_pg_collection_drives_column_parallel_linear():
    errors = run_ranks(2, _megatron_column_parallel, timeout_s=120)
    for rank, (forward_error, backward_error) in enumerate(errors):
        assert forward_error < 1e-5 and backward_error < 1e-5, \
            f"rank {rank}: max abs difference forward {forward_error:.2e}, input grad {backward_error:.2e}"


def test_validate_world_size_message():
    layout = ParallelLayout(tp=2, pcp=2, dcp=2, num_heads=8, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"^world size 6 != dp\*pcp\*tp = 1\*2\*2 = 4: launch 4 ranks"):
        ps.validate_world_size(layout, 6)


def test_initialize_needs_torch_distributed():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized: call torch.distributed.init_process"):
        ps.initialize_model_parallel(1, 1, 1, 4, 1)


def test_facade_before_initialize_raises():
    with pytest.raises(RuntimeError, match="not initialized: call initialize_model_parallel"):
        ps.get_tensor_model_parallel_group()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cptoolkit.parallel_state", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_prints_legend_and_table():
    result = _cli("--tp", "2", "--pcp", "2", "--dcp", "4", "--num-heads", "8", "--num-kv-heads", "1", "--legend")
    assert result.returncode == 0, result.stderr
    expected = f"{LEGEND}\n\n{render_layout(ParallelLayout(2, 2, 4, 8, 1))}\n"
    assert result.stdout == expected


def test_cli_invalid_args_one_line_exit_2():
    result = _cli("--tp", "2", "--pcp", "2", "--dcp", "3", "--num-heads", "8", "--num-kv-heads", "2")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "dcp (3) must be k*pcp with k dividing tp (tp=2, pcp=2): valid dcp values are 2, 4" in result.stderr


# ----------------------------------------------------------------------------- hierarchical (a2a+p2p) groups
def _megatron_hierarchical(ranks: list[int], sizes: list[int]) -> list[list[list[int]]]:
    """megatron-core's ``create_hierarchical_groups`` rule (einops ``(l s u) -> (l u) s`` per level), in numpy:
    an independent derivation of the groups megatron builds for ``hierarchical_context_parallel_sizes``."""
    import numpy as np

    levels = []
    for level, size in enumerate(sizes):
        inner, outer = int(np.prod(sizes[:level])), int(np.prod(sizes[level + 1:]))
        grid = np.array(ranks).reshape(outer, size, inner).transpose(0, 2, 1).reshape(-1, size)
        levels.append(grid.tolist())
    return levels


@pytest.mark.parametrize("tp, pcp, a2a_size", [(1, 4, 2), (2, 4, 2), (2, 2, 2), (1, 8, 2), (1, 8, 4), (2, 4, 1)])
def test_hierarchical_rank_lists_are_megatrons_hcp_groups(tp, pcp, a2a_size):
    layout = ParallelLayout(tp=tp, pcp=pcp, dcp=pcp, num_heads=8, num_kv_heads=2, hierarchical_a2a_size=a2a_size)
    for pcp_ranks in layout.pcp_groups:
        a2a_groups, ring_groups = _megatron_hierarchical(pcp_ranks, [a2a_size, pcp // a2a_size])
        assert [g for g in layout.hcp_a2a_groups if g[0] in pcp_ranks] == a2a_groups
        assert [g for g in layout.hcp_ring_groups if g[0] in pcp_ranks] == ring_groups


def test_layout_prints_hierarchical_groups_only_when_configured():
    plain = ParallelLayout(tp=2, pcp=4, dcp=4, num_heads=8, num_kv_heads=2)
    hierarchical = ParallelLayout(tp=2, pcp=4, dcp=4, num_heads=8, num_kv_heads=2, hierarchical_a2a_size=2)
    assert "A2A" not in render_layout(plain) and plain.hcp_a2a_groups == plain.hcp_ring_groups == []
    text = render_layout(hierarchical)
    head, tail = text.split("\n\nA2A Groups (a2a+p2p prefill: all-to-all of heads inside):\n")
    # The same table and groups as without it (the labels only widen to fit RING0:).
    assert [line.split() for line in head.splitlines()] == [line.split() for line in render_layout(plain).splitlines()]
    assert tail.splitlines() == [
        "  A2A0:  [0, 2]  0: q0-3/k0, s0, p0 | 2: q0-3/k0, s1, p1",
        "  A2A1:  [4, 6]  4: q0-3/k0, s2, p2 | 6: q0-3/k0, s3, p3",
        "  A2A2:  [1, 3]  1: q4-7/k1, s0, p0 | 3: q4-7/k1, s1, p1",
        "  A2A3:  [5, 7]  5: q4-7/k1, s2, p2 | 7: q4-7/k1, s3, p3",
        "",
        "Ring Groups (a2a+p2p prefill: ring across the a2a groups):",
        "  RING0: [0, 4]  0: q0-3/k0, s0, p0 | 4: q0-3/k0, s2, p2",
        "  RING1: [2, 6]  2: q0-3/k0, s1, p1 | 6: q0-3/k0, s3, p3",
        "  RING2: [1, 5]  1: q4-7/k1, s0, p0 | 5: q4-7/k1, s2, p2",
        "  RING3: [3, 7]  3: q4-7/k1, s1, p1 | 7: q4-7/k1, s3, p3"]


@pytest.mark.parametrize("kwargs, message", [
    ({"hierarchical_a2a_size": 3}, r"^hierarchical_a2a_size \(3\) must be a positive divisor of pcp \(4\): pcp = a2a "
                                   r"size x ring size; valid values are 1, 2, 4$"),
    ({"hierarchical_a2a_size": 0}, r"^hierarchical_a2a_size \(0\) must be a positive divisor of pcp \(4\)"),
])
def test_invalid_hierarchical_layout_names_the_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelLayout(**{"tp": 1, "pcp": 4, "dcp": 4, "num_heads": 8, "num_kv_heads": 2, **kwargs})


def _hierarchical_groups_rank(rank: int, world_size: int) -> list[str]:
    import datetime

    errors = []
    for tp, pcp, a2a_size in ((1, 4, 2), (2, 2, 2), (2, 2, 1)):
        groups = ps.initialize_model_parallel(tp, pcp, pcp, 8, 2, hierarchical_a2a_size=a2a_size,
                                              timeout=datetime.timedelta(seconds=17))
        layout = groups.layout
        for kind, lists in (("a2a", layout.hcp_a2a_groups), ("ring", layout.hcp_ring_groups)):
            group = getattr(groups.hcp_groups, f"{kind}_group")
            timeout = group._get_backend(torch.device("cpu")).options._timeout
            if _members(group) != _group_of(rank, lists) or timeout != datetime.timedelta(seconds=17):
                errors.append(f"{(tp, pcp, a2a_size)} rank {rank} {kind}: {_members(group)} (timeout {timeout}), "
                              f"expected {_group_of(rank, lists)} (timeout 17 s)")
        ps.destroy_model_parallel()
    if ps.initialize_model_parallel(2, 2, 2, 8, 2).hcp_groups is not None:
        errors.append(f"rank {rank}: hcp_groups built without hierarchical_a2a_size")
    ps.destroy_model_parallel()
    return errors


def test_initialize_builds_hierarchical_groups_with_the_collective_timeout():
    for errors in run_ranks(4, _hierarchical_groups_rank):
        assert not errors, "\n".join(errors)


def test_cli_lists_hierarchical_groups():
    result = _cli("--tp", "1", "--pcp", "4", "--dcp", "4", "--num-heads", "8", "--num-kv-heads", "2",
                  "--hierarchical-a2a-size", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_layout(ParallelLayout(1, 4, 4, 8, 2, hierarchical_a2a_size=2)) + "\n"
    assert "  A2A1:  [2, 3]" in result.stdout and "  RING1: [1, 3]" in result.stdout


# ----------------------------------------------------------------------------- nodes
def test_cli_marks_nodes_with_nproc_per_node_and_refuses_tp_across_nodes():
    args = ("--tp", "2", "--pcp", "2", "--dcp", "4", "--num-heads", "8", "--num-kv-heads", "2")
    result = _cli(*args, "--nproc-per-node", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_layout(ParallelLayout(2, 2, 4, 8, 2), nproc_per_node=2) + "\n"
    assert "  TP1:  [2, 3]        inside node1" in result.stdout
    refused = _cli(*args, "--nproc-per-node", "1")
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.count("\n") == 1
    assert ("error: tp (2) must divide nproc_per_node (1): TP all-reduces every layer, so a TP group must stay "
            "inside a node, but TP0 [0, 1] spans nodes 0 and 1; keep tp <= nproc_per_node and a divisor of it"
            in refused.stderr)


# ----------------------------------------------------------------------------- expert parallelism
EP_CONFIGS = {  # (tp, pcp, dcp, num_heads, num_kv_heads, dp, ep, num_experts)
    4: [(2, 2, 2, 8, 2, 1, 2, 8), (2, 2, 4, 8, 2, 1, 4, 8), (2, 2, 2, 8, 2, 1, None, None)],
    8: [(2, 2, 2, 4, 2, 2, 2, 8), (2, 2, 4, 4, 2, 2, 4, 8), (4, 2, 8, 8, 2, 1, 4, 8)],
}


def _check_expert_groups(rank: int, config) -> list[str]:
    """The EP and ETP groups' members and group ranks equal the layout's; megatron's collection carries them and
    places this rank's experts (``BaseMoELayer``: EP-group rank x E/EP) where the layout does."""
    from megatron.core import utils as megatron_utils

    tp, pcp, dcp, heads, kv_heads, dp, ep, num_experts = config
    groups = ps.initialize_model_parallel(tp, pcp, dcp, heads, kv_heads, dp=dp, ep=ep, num_experts=num_experts)
    layout, info = groups.layout, groups.rank_info
    errors = []
    for kind, lists, group_rank, size in (("ep", layout.ep_groups, info.ep_rank, layout.ep),
                                          ("etp", layout.etp_groups, info.etp_rank, layout.etp)):
        group = getattr(groups, f"{kind}_group")
        got = (_members(group), dist.get_rank(group), getattr(groups, f"{kind}_rank"), getattr(groups, f"{kind}_size"))
        wanted = (_group_of(rank, lists), group_rank, group_rank, size)
        if got != wanted:
            errors.append(f"{config} rank {rank} {kind}: (members, group rank, rank, size) {got}, expected {wanted}")
    collection = groups.megatron_pg_collection()
    carried = (collection.ep, collection.expt_tp, collection.tp_ep, collection.expt_dp)
    if carried != (groups.ep_group, groups.etp_group, groups.replica_group, groups.dp_group):
        errors.append(f"{config} rank {rank}: megatron's ep/expt_tp/tp_ep/expt_dp are not the EP/ETP/replica/DP groups")
    if megatron_utils.get_pg_rank(collection.tp_ep) != info.ep_rank * layout.etp + info.etp_rank:
        errors.append(f"{config} rank {rank}: tp_ep rank {megatron_utils.get_pg_rank(collection.tp_ep)} is not "
                      f"megatron's ep_rank * ETP + etp_rank = {info.ep_rank * layout.etp + info.etp_rank}")
    if num_experts is not None:
        per_rank = num_experts // megatron_utils.get_pg_size(collection.ep)
        megatron_experts = range(megatron_utils.get_pg_rank(collection.ep) * per_rank,
                                 (megatron_utils.get_pg_rank(collection.ep) + 1) * per_rank)
        if megatron_experts != info.experts:
            errors.append(f"{config} rank {rank}: megatron places experts {megatron_experts}, layout {info.experts}")
    ps.destroy_model_parallel()
    return errors


def _expert_configs(rank: int, world_size: int, configs) -> list[str]:
    return [error for config in configs for error in _check_expert_groups(rank, config)]


@pytest.mark.parametrize("world_size", [4, 8])
def test_expert_groups_match_layout(world_size):
    configs = EP_CONFIGS[world_size]
    assert all(ParallelLayout(*c[:5], dp=c[5], ep=c[6], num_experts=c[7]).world_size == world_size for c in configs)
    for errors in run_ranks(world_size, _expert_configs, configs, timeout_s=180):
        assert not errors, "\n".join(errors)


def test_cli_prints_experts_and_refuses_an_invalid_ep():
    args = ("--tp", "2", "--pcp", "2", "--dcp", "4", "--num-heads", "8", "--num-kv-heads", "2")
    result = _cli(*args, "--ep", "4", "--num-experts", "8", "--legend")
    assert result.returncode == 0, result.stderr
    assert result.stdout == layout_report(ParallelLayout(2, 2, 4, 8, 2, ep=4, num_experts=8), legend=True) + "\n"
    assert "  EP0:  [0, 1, 2, 3]  0: q0-3/k0, s0, p0, e0-1 | 1: q4-7/k1, s2, p0, e2-3 |" in result.stdout
    refused = _cli(*args, "--ep", "3", "--num-experts", "8")
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.count("\n") == 1
    assert "error: ep (3) must be k*pcp with k dividing tp (tp=2, pcp=2): valid ep values are 2, 4" in refused.stderr


def _start_groups_with_experts(rank: int, world_size: int) -> list[tuple]:
    """``distributed.start_groups`` (what every launcher calls) passes ``parallel.ep`` and the model's expert count."""
    from unittest import mock

    from cptoolkit.config import config_from_dict
    from cptoolkit.distributed import start_groups
    from cptoolkit.models.moe_dims import MoEDims

    raw = {"parallel": {"tp": 2, "pcp": 2, "dcp": 2, "ep": 4}, "model": {}, "inference": {"prompts": ["x"]}}
    seen = []
    for moe in (None, MoEDims(num_experts=8, top_k=2, ffn_hidden_size=16, moe_layers=(True, True))):
        with mock.patch("cptoolkit.distributed.model_moe", return_value=moe):
            groups = start_groups(config_from_dict(raw))
        seen.append((groups.layout.ep, groups.layout.num_experts, dist.get_world_size(groups.ep_group)))
        ps.destroy_model_parallel()
    return seen


def test_start_groups_passes_ep_and_the_models_experts():
    for seen in run_ranks(4, _start_groups_with_experts, timeout_s=120):
        assert seen == [(4, None, 4), (4, 8, 4)]
