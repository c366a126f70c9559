"""Expert parallelism in the pure layout: golden MoE tables, the EP/ETP rules over every small layout, the refusals.

Rules under test (cptoolkit/layout.py): inside each DP replica EP x ETP = TP * PCP with EP = k * PCP, k | TP, so
ETP = TP / k; the rank at (pcp_rank, tp_rank) has ep_rank = pcp_rank * k + tp_rank // ETP, etp_rank = tp_rank % ETP;
EP rank r holds experts [r * E/EP, (r+1) * E/EP). Every expectation below is derived from these formulas, not
from the layout's own group lists.
"""
from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from cptoolkit.layout import (EXPERTS_LEGEND_LINE, LEGEND, ParallelLayout, layout_report, legend_of, node_crossings,
                              render_layout)

GOLDEN = Path(__file__).parent / "golden/layout_tables_moe.txt"
# (tp, pcp, dcp, num_heads, num_kv_heads, dp, ep, num_experts)
GOLDEN_CONFIGS = [
    (2, 2, 2, 8, 2, 1, 2, 8),   # EP = PCP: experts TP-sliced like the dense MLP (ETP groups = TP groups)
    (2, 2, 2, 8, 2, 1, 4, 8),   # EP = TP*PCP: every rank holds 2 whole experts
    (2, 2, 4, 8, 1, 1, 4, 8),   # with DCP = 4 and MQA
    (4, 2, 4, 8, 2, 1, 8, 16),  # EP = TP*PCP at 8 ranks
    (4, 2, 2, 8, 2, 1, 2, 8),   # EP = PCP at 8 ranks: ETP = 4
    (4, 2, 8, 8, 2, 1, 4, 8),   # EP = 2*PCP: two ETP blocks of 2 per TP group
    (2, 2, 2, 4, 2, 2, 4, 8),   # two DP replicas, each with its own EP groups
]


def _layout(tp, pcp, dcp, heads, kv_heads, dp, ep, experts) -> ParallelLayout:
    return ParallelLayout(tp=tp, pcp=pcp, dcp=dcp, num_heads=heads, num_kv_heads=kv_heads, dp=dp, ep=ep,
                          num_experts=experts)


def moe_tables() -> str:
    """The golden file's text: the MoE LEGEND, then every golden layout's table, two blank lines apart."""
    layouts = [_layout(*config) for config in GOLDEN_CONFIGS]
    tables = [layout_report(layouts[0], legend=True)] + [render_layout(layout) for layout in layouts[1:]]
    return "\n\n\n".join(tables) + "\n"


def test_golden_moe_tables_byte_for_byte():
    assert moe_tables() == GOLDEN.read_text()


def test_golden_tp2_pcp2_ep4_cells_and_groups():
    """One table read against the rules by hand: EP = TP*PCP gives each rank E/4 = 2 whole experts in global
    rank order (PCP-major, unlike DCP's TP-major shards), and no ETP section (each expert on one rank)."""
    text = render_layout(_layout(2, 2, 2, 8, 2, 1, 4, 8))
    assert text.split("\n")[1] == "TP=2, PCP=2, DCP=2, EP=4, ETP=1  (8 query heads, 2 KV heads, 8 routed experts)"
    assert "pcp1 | 2: q0-3/k0/s1/p1/e4-5  | 3: q4-7/k1/s1/p1/e6-7  |" in text
    assert text.endswith("EP Groups (shard experts):\n"
                         "  EP0:  [0, 1, 2, 3]  0: q0-3/k0, s0, p0, e0-1 | 1: q4-7/k1, s0, p0, e2-3 | "
                         "2: q0-3/k0, s1, p1, e4-5 | 3: q4-7/k1, s1, p1, e6-7")
    assert "ETP Groups" not in text


def test_legend_gains_the_experts_line_only_with_experts():
    assert legend_of(ParallelLayout(2, 2, 2, 8, 2)) == LEGEND
    assert legend_of(ParallelLayout(2, 2, 2, 8, 2, ep=4)) == LEGEND  # a dense model: no experts to show
    lines = legend_of(_layout(2, 2, 2, 8, 2, 1, 4, 8)).split("\n")
    assert lines == LEGEND.split("\n")[:-1] + [EXPERTS_LEGEND_LINE, LEGEND.split("\n")[-1]]


# ----------------------------------------------------------------------------- every small layout
def _ep_sizes(tp: int, pcp: int) -> list[int]:
    return [k * pcp for k in range(1, tp + 1) if tp % k == 0]


def _moe_layouts():
    """Every (TP, PCP) with up to 8 ranks per replica, DP 1 and 2, every valid DCP and EP, with E = EP and 3*EP."""
    for tp, pcp, dp in itertools.product(range(1, 9), range(1, 9), (1, 2)):
        if tp * pcp > 8:
            continue
        for dcp, ep in itertools.product(_ep_sizes(tp, pcp), repeat=2):
            for experts in (ep, 3 * ep):
                yield ParallelLayout(tp=tp, pcp=pcp, dcp=dcp, num_heads=2 * tp, num_kv_heads=2 * tp, dp=dp, ep=ep,
                                     num_experts=experts)


def _check_coordinates(layout):
    k = layout.ep // layout.pcp
    etp = layout.tp // k
    assert layout.etp == etp and layout.ep * etp == layout.tp * layout.pcp, f"{layout}: sizes"
    per_rank = layout.num_experts // layout.ep
    for rank in range(layout.world_size):
        info = layout.rank_info(rank)
        ep_rank = info.pcp_rank * k + info.tp_rank // etp
        assert (info.ep_rank, info.etp_rank) == (ep_rank, info.tp_rank % etp), f"{layout}: rank {rank}"
        assert info.experts == range(ep_rank * per_rank, (ep_rank + 1) * per_rank), f"{layout}: rank {rank} experts"
        # megatron's expert order inside the replica: tp_ep rank = ep_rank * ETP + etp_rank
        assert info.ep_rank * etp + info.etp_rank == rank % (layout.tp * layout.pcp), f"{layout}: rank {rank}"


def _check_partition(layout, groups, size, kind):
    assert all(len(g) == size for g in groups), f"{layout}: {kind} group sizes"
    counts = Counter(r for g in groups for r in g)
    assert sorted(counts) == list(range(layout.world_size)) and set(counts.values()) == {1}, f"{layout}: {kind}"


def _check_tiling(layout):
    """In every replica the EP groups and the ETP groups form a grid: each EP group meets each ETP group in
    exactly one rank, and no group leaves its replica."""
    replica_size = layout.tp * layout.pcp
    for replica in range(layout.dp):
        members = set(range(replica * replica_size, (replica + 1) * replica_size))
        ep_groups = [g for g in layout.ep_groups if set(g) <= members]
        etp_groups = [g for g in layout.etp_groups if set(g) <= members]
        assert (len(ep_groups), len(etp_groups)) == (layout.etp, layout.ep), f"{layout}: replica {replica}"
        assert all(len(set(a) & set(b)) == 1 for a in ep_groups for b in etp_groups), f"{layout}: not a grid"


def _check_group_ranks_and_experts(layout):
    for group in layout.ep_groups:
        infos = [layout.rank_info(r) for r in group]
        assert [i.ep_rank for i in infos] == list(range(layout.ep)), f"{layout}: EP group {group} order"
        assert len({i.etp_rank for i in infos}) == 1, f"{layout}: EP group {group} mixes expert parts"
        assert [e for i in infos for e in i.experts] == list(range(layout.num_experts)), f"{layout}: {group}"
    for group in layout.etp_groups:
        infos = [layout.rank_info(r) for r in group]
        assert [i.etp_rank for i in infos] == list(range(layout.etp)), f"{layout}: ETP group {group} order"
        assert len({i.ep_rank for i in infos}) == 1 and len({i.experts for i in infos}) == 1, f"{layout}: {group}"
        assert len({(i.dp_rank, i.pcp_rank) for i in infos}) == 1, f"{layout}: ETP group {group} leaves a TP group"


def _check_extremes(layout):
    if layout.ep == layout.pcp:
        assert layout.etp_groups == layout.tp_groups and layout.ep_groups == layout.pcp_groups, f"{layout}"
    if layout.ep == layout.tp * layout.pcp:
        assert all(len(g) == 1 for g in layout.etp_groups), f"{layout}: ETP groups of EP = TP*PCP"
        assert layout.ep_groups == layout.replica_groups, f"{layout}"


def _check_render(layout):
    lines = render_layout(layout).split("\n")
    first = lines.index("Rank Layout (query heads / KV head / KV shard / prefill shard / experts):")
    grid = lines[first + 2:first + 3 + 2 * layout.dp * layout.pcp]
    assert len({len(line) for line in grid}) == 1, f"{layout}: ragged grid\n" + "\n".join(grid)
    for rank in range(layout.world_size):
        experts = layout.rank_info(rank).experts
        span = f"e{experts[0]}" if len(experts) == 1 else f"e{experts[0]}-{experts[-1]}"
        assert any(f" {rank}: " in line and f"/{span} " in line for line in grid), f"{layout}: rank {rank} cell"
    assert ("EP Groups (shard experts):" in lines) and len([x for x in lines if x.startswith("  EP")]) == len(
        layout.ep_groups), f"{layout}: EP section"
    with_etp = layout.etp > 1 and layout.ep > 1
    assert ("ETP Groups (shard each expert's FFN):" in lines) == with_etp, f"{layout}: ETP section"
    assert {"EP", "ETP"} & set(node_crossings(layout, layout.world_size)) == ({"EP", "ETP"} if with_etp else {"EP"})


def _check_dense_is_unchanged(layout):
    """The same layout without experts prints exactly as before EP existed, whatever its ep."""
    dense = ParallelLayout(layout.tp, layout.pcp, layout.dcp, layout.num_heads, layout.num_kv_heads, dp=layout.dp)
    with_ep = ParallelLayout(layout.tp, layout.pcp, layout.dcp, layout.num_heads, layout.num_kv_heads, dp=layout.dp,
                             ep=layout.ep)
    assert render_layout(with_ep) == render_layout(dense), f"{layout}: a dense layout's table changed with ep"
    assert dense.ep == layout.pcp and all(dense.rank_info(r).experts == range(0) for r in range(dense.world_size))


def test_every_small_moe_layout_keeps_the_ep_rules():
    layouts = list(_moe_layouts())
    assert len(layouts) == 360  # sum over (tp, pcp, dp) of 2 * d(tp)^2
    for layout in layouts:
        _check_coordinates(layout)
        _check_partition(layout, layout.ep_groups, layout.ep, "ep")
        _check_partition(layout, layout.etp_groups, layout.etp, "etp")
        _check_tiling(layout)
        _check_group_ranks_and_experts(layout)
        _check_extremes(layout)
        _check_render(layout)
        _check_dense_is_unchanged(layout)


# ----------------------------------------------------------------------------- refusals
def _invalid_ep_cases():
    for tp, pcp in itertools.product(range(1, 9), range(1, 9)):
        if tp * pcp <= 8:
            for ep in set(range(1, 2 * tp * pcp + 1)) - set(_ep_sizes(tp, pcp)):
                yield tp, pcp, ep


def test_every_ep_not_of_the_form_k_pcp_is_refused_with_the_rule():
    cases = list(_invalid_ep_cases())
    assert len(cases) > 100
    for tp, pcp, ep in cases:
        valid = ", ".join(map(str, _ep_sizes(tp, pcp)))
        rule = (rf"^ep \({ep}\) must be k\*pcp with k dividing tp \(tp={tp}, pcp={pcp}\): "
                rf"valid ep values are {valid}$")
        with pytest.raises(ValueError, match=rule):
            ParallelLayout(tp=tp, pcp=pcp, dcp=pcp, num_heads=tp, num_kv_heads=tp, ep=ep)
        with pytest.raises(ValueError, match=rule):  # the rule holds for a dense model too
            ParallelLayout(tp=tp, pcp=pcp, dcp=pcp, num_heads=tp, num_kv_heads=tp, ep=ep, num_experts=ep)


def test_every_expert_count_not_a_multiple_of_ep_is_refused_with_the_rule():
    checked = 0
    for tp, pcp in itertools.product(range(1, 9), range(1, 9)):
        if tp * pcp > 8:
            continue
        for ep in _ep_sizes(tp, pcp):
            for experts in (e for e in range(1, 3 * ep) if e % ep):
                fitting = ", ".join(str(s) for s in _ep_sizes(tp, pcp) if experts % s == 0) or "none"
                with pytest.raises(ValueError, match=rf"^num_experts \({experts}\) must be a multiple of ep \({ep}\): "
                                                     rf"each EP rank holds num_experts/ep whole experts; valid ep "
                                                     rf"values here are {fitting}$"):
                    ParallelLayout(tp=tp, pcp=pcp, dcp=pcp, num_heads=tp, num_kv_heads=tp, ep=ep, num_experts=experts)
                checked += 1
    assert checked > 100


@pytest.mark.parametrize("kwargs, message", [
    (dict(ep=0), r"^ep \(0\) must be a positive integer or None \(None: ep = pcp\)$"),
    (dict(ep=True), r"^ep \(True\) must be a positive integer or None"),
    (dict(ep=2.0), r"^ep \(2.0\) must be a positive integer or None"),
    (dict(num_experts=0), r"^num_experts \(0\) must be a positive integer or None \(None: a dense model\)$"),
    (dict(num_experts="8"), r"^num_experts \('8'\) must be a positive integer or None"),
    (dict(ep=1), r"^ep \(1\) must be k\*pcp with k dividing tp \(tp=2, pcp=2\): valid ep values are 2, 4$"),
    (dict(ep=8, num_experts=8), r"^ep \(8\) must be k\*pcp .*valid ep values are 2, 4$"),
    (dict(ep=4, num_experts=6), r"^num_experts \(6\) must be a multiple of ep \(4\): .*valid ep values here are 2$"),
    (dict(num_experts=3), r"^num_experts \(3\) must be a multiple of ep \(2\): .*valid ep values here are none$"),
])
def test_invalid_expert_layout_names_field_value_and_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelLayout(**{"tp": 2, "pcp": 2, "dcp": 2, "num_heads": 8, "num_kv_heads": 2, **kwargs})


def test_default_ep_is_pcp_and_experts_of_checks_its_rank():
    layout = ParallelLayout(tp=2, pcp=2, dcp=2, num_heads=8, num_kv_heads=2, num_experts=4)
    assert (layout.ep, layout.etp) == (2, 2) and layout == ParallelLayout(2, 2, 2, 8, 2, ep=2, num_experts=4)
    assert [layout.experts_of(r) for r in range(2)] == [range(0, 2), range(2, 4)]
    with pytest.raises(ValueError, match=r"^ep_rank \(2\) must be in \[0, ep=2\)$"):
        layout.experts_of(2)
    assert ParallelLayout(2, 2, 2, 8, 2).experts_of(1) == range(0)
