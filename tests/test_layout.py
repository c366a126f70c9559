"""The pure rank layout: golden tables byte for byte, invariants over every valid layout, validation errors."""
from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path

import pytest

from cptoolkit.layout import BANNER, LEGEND, ParallelLayout, check_nodes, node_crossings, render_layout

# A copy of shared/spec/layout_tables.txt, so a clone without shared/ beside it still checks the tables.
GOLDEN = Path(__file__).parent / "golden/layout_tables.txt"
SHARED_GOLDEN = Path(__file__).parents[2] / "shared/spec/layout_tables.txt"
GOLDEN_CONFIGS = [(2, 2, 2, 8, 2), (2, 2, 2, 8, 1), (2, 2, 4, 8, 2), (2, 2, 4, 8, 1)]


def _strip(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").split("\n")]


def golden_sections() -> tuple[str, list[str]]:
    """The LEGEND block and the four configuration sections, each from its banner to its last line."""
    text = GOLDEN.read_text()
    legend, rest = text.split("\n\n", 1)
    starts = [i for i in range(len(rest)) if rest.startswith(f"{BANNER}\nTP=", i)]
    sections = [rest[a:b].rstrip() for a, b in zip(starts, starts[1:] + [len(rest)])]
    return legend, sections


def test_legend_matches_golden():
    legend, _ = golden_sections()
    assert _strip(LEGEND) == _strip(legend)


@pytest.mark.parametrize("index", range(4))
def test_golden_section_byte_for_byte(index):
    _, sections = golden_sections()
    assert len(sections) == 4
    rendered = render_layout(ParallelLayout(*GOLDEN_CONFIGS[index]))
    assert _strip(rendered) == _strip(sections[index]), f"\n{rendered}\n--- expected ---\n{sections[index]}"


def test_dcp4_keeps_rank_order_tp_major():
    layout = ParallelLayout(tp=2, pcp=2, dcp=4, num_heads=8, num_kv_heads=2)
    assert layout.dcp_groups == [[0, 2, 1, 3]]
    assert [layout.rank_info(r).kv_shard for r in range(4)] == [0, 2, 1, 3]
    assert layout.rank_info(1).kv_heads == (1,) and layout.rank_info(1).dcp_kv_heads == (0, 1)


def test_replication_note_counts_copies():
    note = render_layout(ParallelLayout(tp=4, pcp=2, dcp=2, num_heads=8, num_kv_heads=1))
    assert "NOTE: (k0, s0) and (k0, s1) are each replicated 3 times (since num_gpus" in note
    single = render_layout(ParallelLayout(tp=2, pcp=1, dcp=1, num_heads=4, num_kv_heads=1))
    assert "NOTE: (k0, s0) is replicated once (since" in single
    assert "NOTE" not in render_layout(ParallelLayout(tp=4, pcp=1, dcp=4, num_heads=8, num_kv_heads=1))
    across_groups = render_layout(ParallelLayout(tp=4, pcp=1, dcp=2, num_heads=8, num_kv_heads=1))
    assert "NOTE: (k0, s0) and (k0, s1) are each replicated once (since num_gpus" in across_groups


@pytest.mark.skipif(not SHARED_GOLDEN.is_file(), reason="no shared/ beside this checkout")
def test_golden_copy_equals_the_shared_spec():
    assert GOLDEN.read_text() == SHARED_GOLDEN.read_text()


def test_title_names_mqa_only_for_shared_kv_head():
    assert render_layout(ParallelLayout(1, 1, 1, 1, 1)).split("\n")[1] == "TP=1, PCP=1, DCP=1  (1 query head, 1 KV head)"
    assert render_layout(ParallelLayout(1, 1, 1, 2, 1)).split("\n")[1].endswith("(2 query heads, 1 KV head - MQA)")


def test_dp_rows_and_dp_groups():
    layout = ParallelLayout(tp=2, pcp=2, dcp=2, num_heads=4, num_kv_heads=2, dp=2)
    text = render_layout(layout)
    assert text.split("\n")[1] == "DP=2, TP=2, PCP=2, DCP=2  (4 query heads, 2 KV heads)"
    assert "dp1 pcp1 | 6: q0-1/k0/s1/p1  | 7: q2-3/k1/s1/p1  |" in text
    assert "  DP3:  [3, 7]  3: q2-3/k1, s1, p1 | 7: q2-3/k1, s1, p1" in text
    assert layout.dp_pcp_groups == [[0, 2, 4, 6], [1, 3, 5, 7]]


def _valid_layouts():
    for tp, pcp, dp in itertools.product((1, 2, 4, 8), (1, 2, 4, 8), (1, 2)):
        if dp * tp * pcp > 64:
            continue
        for k, heads in itertools.product((1, 2, 4, 8), (8, 16, 24)):
            for kv in (1, 2, 3, 4, 8, 12, 16, 24):
                try:
                    yield ParallelLayout(tp, pcp, k * pcp, heads, kv, dp=dp)
                except ValueError:
                    continue


def _check_partition(layout, groups, size, kind):
    assert all(len(g) == size for g in groups), f"{layout}: {kind} group sizes"
    counts = Counter(r for g in groups for r in g)
    assert sorted(counts) == list(range(layout.world_size)) and set(counts.values()) == {1}, f"{layout}: {kind}"


def _check_heads(layout):
    kv_group = layout.num_heads // layout.num_kv_heads
    for tp_group in layout.tp_groups:
        infos = [layout.rank_info(r) for r in tp_group]
        assert [h for i in infos for h in i.q_heads] == list(range(layout.num_heads)), f"{layout}: q heads"
        for info in infos:
            needed = {q // kv_group for q in info.q_heads}
            assert needed <= set(info.kv_heads) <= set(info.dcp_kv_heads), f"{layout}: rank {info.rank} kv heads"
        assert {h for i in infos for h in i.kv_heads} == set(range(layout.num_kv_heads)), f"{layout}: kv heads"


def _check_shards(layout):
    for group in layout.pcp_groups:
        assert [layout.rank_info(r).prefill_shard for r in group] == list(range(layout.pcp)), f"{layout}: prefill"
    for group in layout.dcp_groups:
        infos = [layout.rank_info(r) for r in group]
        assert [i.kv_shard for i in infos] == list(range(layout.dcp)), f"{layout}: kv shards of {group}"
        assert [i.dcp_rank for i in infos] == list(range(layout.dcp)), f"{layout}: dcp ranks of {group}"
        assert len({i.dcp_kv_heads for i in infos}) == 1, f"{layout}: group {group} caches different heads"
        if layout.dcp_tp_positions == 1:
            assert all(i.dcp_kv_heads == i.kv_heads for i in infos), f"{layout}: k=1 caches its own heads"
        if layout.dcp_tp_positions == layout.tp:
            assert infos[0].dcp_kv_heads == tuple(range(layout.num_kv_heads)), f"{layout}: k=tp caches all heads"
        assert {i.tp_rank for i in infos} == set(range(infos[0].tp_rank, infos[0].tp_rank + layout.dcp_tp_positions))
    for rank in range(layout.world_size):
        info = layout.rank_info(rank)
        assert layout.global_rank(info.dp_rank, info.pcp_rank, info.tp_rank) == rank, f"{layout}: rank {rank}"


def _holders_from_query_heads(layout) -> Counter:
    """``(kv_head, kv_shard) -> ranks of one DP replica storing it``, from the rules alone: the rank at
    (pcp_rank p, tp_rank t) stores KV shard ``(t mod k) * pcp + p`` of every KV head read by the query
    heads of its DCP group's k TP positions (query head q reads KV head ``q // (num_heads / num_kv_heads)``)."""
    k = layout.dcp // layout.pcp
    q_per_tp_rank, q_per_kv_head = layout.num_heads // layout.tp, layout.num_heads // layout.num_kv_heads
    holders: Counter = Counter()
    for pcp_rank, tp_rank in itertools.product(range(layout.pcp), range(layout.tp)):
        first = tp_rank // k * k
        kv_heads = {q // q_per_kv_head for q in range(first * q_per_tp_rank, (first + k) * q_per_tp_rank)}
        kv_shard = tp_rank % k * layout.pcp + pcp_rank
        holders.update((head, kv_shard) for head in kv_heads)
    return holders


def _check_replication_note(layout, lines):
    """The NOTE appears exactly when some (KV head, KV shard) slice has several holders, for the reason it
    states (num_gpus / DCP > num_kv_heads), and names every replicated slice with its extra copies."""
    holders = _holders_from_query_heads(layout)
    assert layout.kv_replication() == dict(holders), f"{layout}: kv_replication"
    copies = max(holders.values())
    assert (copies > 1) == (layout.tp * layout.pcp > layout.dcp * layout.num_kv_heads), f"{layout}: {holders}"
    notes = [line for line in lines if line.startswith("NOTE: ")]
    assert len(notes) == (copies > 1), f"{layout}: {len(notes)} NOTE lines but {copies} holders per slice"
    if notes:
        assert set(holders.values()) == {copies}, f"{layout}: uneven replication {holders}"
        extra = {1: "once", 2: "twice"}.get(copies - 1, f"{copies - 1} times")
        assert f"replicated {extra} (since" in notes[0], f"{layout}: {notes[0]}"
        assert all(f"(k{head}, s{shard})" in notes[0] for head, shard in holders), f"{layout}: {notes[0]}"


def _check_render(layout):
    lines = render_layout(layout).split("\n")
    first = lines.index("Rank Layout (query heads / KV head / KV shard / prefill shard):")
    header, grid = lines[first + 1], lines[first + 2:first + 3 + 2 * layout.dp * layout.pcp]
    widths = {len(line) for line in grid}
    assert len(widths) == 1 and len(header) <= widths.pop(), f"{layout}: ragged grid\n" + "\n".join(grid)
    _check_replication_note(layout, lines)


def test_every_valid_layout_keeps_invariants():
    layouts = list(_valid_layouts())
    assert len(layouts) > 500
    for layout in layouts:
        _check_partition(layout, layout.tp_groups, layout.tp, "tp")
        _check_partition(layout, layout.pcp_groups, layout.pcp, "pcp")
        _check_partition(layout, layout.dcp_groups, layout.dcp, "dcp")
        _check_partition(layout, layout.dp_groups, layout.dp, "dp")
        _check_partition(layout, layout.dp_pcp_groups, layout.dp * layout.pcp, "dp_pcp")
        _check_heads(layout)
        _check_shards(layout)
        _check_render(layout)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=0), r"tp \(0\) must be a positive integer"),
    (dict(num_kv_heads=-1), r"num_kv_heads \(-1\) must be a positive integer"),
    (dict(dp=1.5), r"dp \(1.5\) must be a positive integer"),
    (dict(dcp=3), r"dcp \(3\) must be k\*pcp with k dividing tp \(tp=2, pcp=2\): valid dcp values are 2, 4$"),
    (dict(dcp=1), r"dcp \(1\) must be k\*pcp .*valid dcp values are 2, 4 \(dcp=1, no decode sharding, needs pcp=1\)$"),
    (dict(dcp=8), r"dcp \(8\) must be k\*pcp .*valid dcp values are 2, 4"),
    (dict(num_heads=7), r"num_heads \(7\) must be a multiple of tp \(2\)"),
    (dict(num_heads=6, num_kv_heads=4), r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"),
    (dict(tp=4, dcp=2, num_heads=24, num_kv_heads=6),
     r"num_kv_heads \(6\) and tp \(4\) must divide one another"),
    (dict(tp=6, pcp=1, dcp=3, num_heads=6, num_kv_heads=3),
     r"dcp/pcp \(3\) and tp/num_kv_heads \(2\) must divide one another .*map evenly"),
])
def test_invalid_layout_names_field_and_rule(kwargs, message):
    args = dict(tp=2, pcp=2, dcp=2, num_heads=8, num_kv_heads=2) | kwargs
    with pytest.raises(ValueError, match=message):
        ParallelLayout(**args)


def test_rank_out_of_range():
    with pytest.raises(ValueError, match=r"rank \(4\) must be in \[0, world_size=4\)"):
        ParallelLayout(tp=2, pcp=2, dcp=2, num_heads=8, num_kv_heads=2).rank_info(4)


# ----------------------------------------------------------------------------- nodes
def test_node_sections_list_each_nodes_ranks_and_where_every_group_runs():
    layout = ParallelLayout(tp=2, pcp=2, dcp=4, num_heads=8, num_kv_heads=2)
    text = render_layout(layout, nproc_per_node=2)
    assert text.startswith(render_layout(layout) + "\n\n")  # the table itself is unchanged
    assert text[len(render_layout(layout)) + 1:].split("\n") == [
        "",
        "Nodes (2 processes per node; node of rank r = r // 2):",
        "  node0: ranks 0-1  (row pcp0)",
        "  node1: ranks 2-3  (row pcp1)",
        "",
        "Groups and nodes (TP must stay inside a node; the others may cross):",
        "  PCP0: [0, 2]        crosses nodes 0 and 1",
        "  PCP1: [1, 3]        crosses nodes 0 and 1",
        "  TP0:  [0, 1]        inside node0",
        "  TP1:  [2, 3]        inside node1",
        "  DCP0: [0, 2, 1, 3]  crosses nodes 0 and 1"]
    assert "crosses" not in render_layout(layout, nproc_per_node=4).split("Groups and nodes")[1]


def test_a_tp_group_across_nodes_is_refused_and_warned_with_the_rule():
    layout = ParallelLayout(tp=4, pcp=2, dcp=2, num_heads=8, num_kv_heads=2)
    rule = (r"^tp \(4\) must divide nproc_per_node \(2\): TP all-reduces every layer, so a TP group must stay inside "
            r"a node, but TP0 \[0, 1, 2, 3\] spans nodes 0 and 1; keep tp <= nproc_per_node and a divisor of it$")
    with pytest.raises(ValueError, match=rule):
        check_nodes(layout, 2)
    assert re.search(rule[1:], render_layout(layout, nproc_per_node=2).split("\n")[-1])
    assert render_layout(layout, nproc_per_node=2).split("\n")[-1].startswith("WARNING: tp (4) must divide")
    with pytest.raises(ValueError, match=r"^world size \(8 = dp\*pcp\*tp\) must be a multiple of nproc_per_node \(3\)"):
        check_nodes(layout, 3)
    with pytest.raises(ValueError, match=r"^nproc_per_node \(0\) must be a positive integer$"):
        check_nodes(layout, 0)


def test_node_rules_over_every_valid_layout():
    """TP stays inside nodes exactly when tp divides nproc_per_node; node_crossings counts, per group kind,
    the groups whose ranks r have more than one r // nproc_per_node."""
    for layout in _valid_layouts():
        for nproc in (n for n in (1, 2, 3, 4, 8, 16) if layout.world_size % n == 0):
            crossings = node_crossings(layout, nproc)
            for kind, groups in (("TP", layout.tp_groups), ("PCP", layout.pcp_groups), ("DCP", layout.dcp_groups)):
                spans = [len({rank // nproc for rank in group}) > 1 for group in groups]
                assert crossings[kind] == (sum(spans), len(groups)), f"{layout} nproc={nproc} {kind}"
            tp_inside = nproc % layout.tp == 0
            assert (crossings["TP"][0] == 0) == tp_inside, f"{layout} nproc={nproc}"
            if tp_inside:
                check_nodes(layout, nproc)
            else:
                with pytest.raises(ValueError, match=r"must divide nproc_per_node"):
                    check_nodes(layout, nproc)
