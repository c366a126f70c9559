"""Who holds what: the pure TP x PCP x DCP (x DP) rank layout, with expert parallelism, and its printed table.

Nothing here touches ``torch.distributed``: the layout can be built, printed and tested on its own,
and ``parallel_state`` turns its rank lists into process groups.

Rules (spec/DESIGN.md):
- Global rank = ``(dp_rank * pcp + pcp_rank) * tp + tp_rank``: TP varies fastest, then PCP, DP outermost.
- TP rank ``t`` owns query heads ``[t*H/TP, (t+1)*H/TP)``. KV heads: with ``KV >= TP`` it owns
  ``[t*KV/TP, (t+1)*KV/TP)``; with ``KV < TP`` it uses head ``t // (TP/KV)`` (replicated on ``TP/KV``
  neighbouring TP ranks).
- PCP shards the prompt: a rank's prefill shard is its PCP rank.
- DCP shards the KV cache along the sequence: ``DCP = k * PCP`` with ``k | TP``. A DCP group spans ``k``
  neighbouring TP positions x all PCP ranks of one DP replica, members ordered TP-major, PCP-minor
  (TP=2, PCP=2, DCP=4 -> ``[0, 2, 1, 3]``); a rank's KV shard is its position in that list. Each member
  stores its shard of the cache for every KV head its group's query heads use (``dcp_kv_heads``).
- ``DCP = 1`` is accepted only with ``PCP = 1`` (then ``k = 1``: no decode sharding). With ``PCP > 1`` it is
  rejected: it is not of the form ``k * PCP``, and an unsharded decode cache would need every PCP rank to
  gather the whole prompt's KV, which no decode path here does.
- Expert parallelism (EP), inside each DP replica: ``EP x ETP = TP * PCP`` with ``EP = k * PCP``, ``k | TP`` (DCP's
  shape rule), so ``ETP = TP / k`` ranks split one expert's FFN. The rank at (pcp_rank, tp_rank) has
  ``ep_rank = pcp_rank * k + tp_rank // ETP`` and ``etp_rank = tp_rank % ETP``; ``ep_rank * ETP + etp_rank`` is its
  rank inside the replica (megatron's expert ``tp-ep`` order). EP rank ``r`` holds routed experts
  ``[r * E/EP, (r+1) * E/EP)``, each sliced in ETP parts (``etp_rank`` takes part ``etp_rank``). ``EP = PCP``
  (the default) keeps experts TP-sliced like the dense MLP (ETP group = TP group); ``EP = TP * PCP`` gives every
  rank ``E/EP`` whole experts. A dense model (``num_experts=None``) may take any valid EP: it has no experts.
- Hierarchical (``a2a+p2p``) prefill, only when ``hierarchical_a2a_size = a`` is given (``a | PCP``): each PCP
  group splits into a2a groups of ``a`` consecutive PCP ranks and ``a`` ring groups taking every ``a``-th PCP
  rank (megatron-core's ``hierarchical_context_parallel_sizes = [a, PCP/a]``). Whether a prefill algorithm can run
  on a layout (the a2a's whole query heads per member) is that algorithm's rule (``layers/algorithms.py``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from cptoolkit.errors import check_positive

BANNER = "=" * 80

LEGEND = "\n".join([
    BANNER,
    "LEGEND",
    BANNER,
    "  q0-3   = query heads 0 through 3",
    "  k0     = KV head 0",
    "  s0     = KV shard 0 (decode sequence shard)",
    "  p0     = prefill sequence shard 0",
    "  [0, 2] = ranks in group",
])
# The line a layout with experts adds before the group line (``legend``).
EXPERTS_LEGEND_LINE = "  e0-3   = routed experts 0 through 3 (with ETP > 1: this rank's part of each one's FFN)"


@dataclass(frozen=True)
class RankInfo:
    """What one global rank holds. ``dcp_rank == kv_shard``; ``prefill_shard == pcp_rank``. ``experts``: the routed
    experts of its EP rank (empty for a dense model), of which it holds part ``etp_rank`` of ``layout.etp``."""

    rank: int
    dp_rank: int
    pcp_rank: int
    tp_rank: int
    dcp_rank: int
    kv_shard: int
    prefill_shard: int
    q_heads: range
    kv_heads: tuple[int, ...]
    dcp_kv_heads: tuple[int, ...]
    ep_rank: int
    etp_rank: int
    experts: range


def divisors(n: int) -> list[int]:
    """The divisors of ``n >= 1``, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_ep_sizes(tp: int, pcp: int) -> list[int]:
    """The EP sizes ``k * pcp`` with ``k | tp``, ascending (DCP's shape rule): ``pcp`` (ETP = tp) to ``tp * pcp``
    (ETP = 1)."""
    return [k * pcp for k in divisors(tp)]


def a2a_size_rule(a2a_size: int, pcp: int) -> str | None:
    """Why ``a2a_size`` cannot split a PCP group of ``pcp`` ranks into a2a groups and ring groups (the rule, to
    follow the name and value), or None when it can."""
    if isinstance(a2a_size, bool) or not isinstance(a2a_size, int) or a2a_size < 1 or pcp % a2a_size:
        return (f"must be a positive divisor of pcp ({pcp}): pcp = a2a size x ring size; valid values are "
                f"{', '.join(map(str, divisors(pcp)))}")
    return None


def check_a2a_size(a2a_size: int, pcp: int, name: str = "a2a_size") -> None:
    """Raise ``a2a_size_rule``'s ValueError naming ``name`` and the value."""
    rule = a2a_size_rule(a2a_size, pcp)
    if rule is not None:
        raise ValueError(f"{name} ({a2a_size!r}) {rule}")


def hierarchical_rank_lists(pcp_rank_lists: list[list[int]], a2a_size: int
                            ) -> tuple[list[list[int]], list[list[int]]]:
    """``(a2a groups, ring groups)`` as global-rank lists in group-rank order, for every PCP group
    (each given in PCP-rank order): a2a groups are ``a2a_size`` consecutive PCP ranks, ring groups
    take every ``a2a_size``-th PCP rank."""
    a2a_lists, ring_lists = [], []
    for pcp_ranks in pcp_rank_lists:
        check_a2a_size(a2a_size, len(pcp_ranks))
        a2a_lists += [list(pcp_ranks[g:g + a2a_size]) for g in range(0, len(pcp_ranks), a2a_size)]
        ring_lists += [list(pcp_ranks[i::a2a_size]) for i in range(a2a_size)]
    return a2a_lists, ring_lists


@dataclass(frozen=True)
class ParallelLayout:
    """The rank layout of ``dp x pcp x tp`` ranks with decode context parallel size ``dcp``.

    Construction validates every rule and raises ``ValueError`` naming the field, its value and the rule
    (``dcp`` must be ``k * pcp`` with ``k | tp``; so ``dcp = 1`` only with ``pcp = 1``, see the module docstring).
    Group lists (``tp_groups`` ...) hold global ranks; a DCP group lists its members in KV-shard order.
    ``hierarchical_a2a_size`` (``None``: no hierarchical prefill) adds ``hcp_a2a_groups``/``hcp_ring_groups``.
    ``ep`` (``None``: ``pcp``, set at construction) is the expert-parallel size (``k * pcp`` with ``k | tp``; the
    module docstring); ``num_experts`` (``None``: a dense model) must be a multiple of it. The expert FFN width's
    rule (a multiple of ``etp``) is the model's: ``cptoolkit.config`` checks it.
    """

    tp: int
    pcp: int
    dcp: int
    num_heads: int
    num_kv_heads: int
    dp: int = 1
    hierarchical_a2a_size: int | None = None
    ep: int | None = None
    num_experts: int | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pcp", "dcp", "num_heads", "num_kv_heads", "dp"):
            check_positive(name, getattr(self, name))
        self._check_dcp()
        self._check_heads()
        self._check_hierarchical()
        self._check_experts()

    def _check_experts(self) -> None:
        for name, meaning in (("ep", "ep = pcp"), ("num_experts", "a dense model")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} ({value!r}) must be a positive integer or None (None: {meaning})")
        if self.ep is None:
            object.__setattr__(self, "ep", self.pcp)
        valid = valid_ep_sizes(self.tp, self.pcp)
        if self.ep not in valid:
            raise ValueError(f"ep ({self.ep}) must be k*pcp with k dividing tp (tp={self.tp}, pcp={self.pcp}): "
                             f"valid ep values are {', '.join(map(str, valid))}")
        if self.num_experts is not None and self.num_experts % self.ep:
            fitting = [str(size) for size in valid if self.num_experts % size == 0]
            raise ValueError(f"num_experts ({self.num_experts}) must be a multiple of ep ({self.ep}): each EP rank "
                             f"holds num_experts/ep whole experts; valid ep values here are "
                             f"{', '.join(fitting) or 'none'}")

    def _check_dcp(self) -> None:
        k, remainder = divmod(self.dcp, self.pcp)
        if remainder or k == 0 or self.tp % k:
            valid = ", ".join(str(d * self.pcp) for d in divisors(self.tp))
            unsharded = " (dcp=1, no decode sharding, needs pcp=1)" if self.dcp == 1 else ""
            raise ValueError(f"dcp ({self.dcp}) must be k*pcp with k dividing tp (tp={self.tp}, pcp={self.pcp}): "
                             f"valid dcp values are {valid}{unsharded}")

    def _check_heads(self) -> None:
        heads, kv_heads, tp = self.num_heads, self.num_kv_heads, self.tp
        if heads % tp:
            raise ValueError(f"num_heads ({heads}) must be a multiple of tp ({tp}): "
                             "each TP rank owns num_heads/tp query heads")
        if heads % kv_heads:
            raise ValueError(f"num_heads ({heads}) must be a multiple of num_kv_heads ({kv_heads}): "
                             "each KV head serves an equal group of query heads")
        if kv_heads % tp and tp % kv_heads:
            raise ValueError(f"num_kv_heads ({kv_heads}) and tp ({tp}) must divide one another: either each TP "
                             "rank owns num_kv_heads/tp KV heads or each KV head is replicated on tp/num_kv_heads "
                             "TP ranks")
        k, replication = self.dcp_tp_positions, self.kv_head_replication
        if k % replication and replication % k:
            raise ValueError(f"dcp/pcp ({k}) and tp/num_kv_heads ({replication}) must divide one another "
                             f"(tp={tp}, num_kv_heads={kv_heads}, dcp={self.dcp}, pcp={self.pcp}): a DCP group's "
                             "query heads must map evenly onto the distinct KV heads it caches")

    def _check_hierarchical(self) -> None:
        if self.hierarchical_a2a_size is not None:
            check_a2a_size(self.hierarchical_a2a_size, self.pcp, "hierarchical_a2a_size")

    @property
    def world_size(self) -> int:
        return self.dp * self.pcp * self.tp

    @property
    def dcp_tp_positions(self) -> int:
        """``k``: how many neighbouring TP positions one DCP group spans (``dcp / pcp``)."""
        return self.dcp // self.pcp

    @property
    def ep_tp_positions(self) -> int:
        """``k``: EP ranks per PCP rank (``ep / pcp``); each TP group splits into k blocks of ``etp`` neighbours."""
        return self.ep // self.pcp

    @property
    def etp(self) -> int:
        """Expert-TP size: the ranks that split one expert's FFN (``tp * pcp / ep = tp / k``)."""
        return self.tp // self.ep_tp_positions

    @property
    def kv_head_replication(self) -> int:
        """Neighbouring TP ranks that share one KV head: ``tp / num_kv_heads`` when ``num_kv_heads < tp``, else 1."""
        return max(self.tp // self.num_kv_heads, 1)

    def global_rank(self, dp_rank: int, pcp_rank: int, tp_rank: int) -> int:
        return (dp_rank * self.pcp + pcp_rank) * self.tp + tp_rank

    def q_heads_of(self, tp_rank: int) -> range:
        per_rank = self.num_heads // self.tp
        return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)

    def kv_heads_of(self, tp_rank: int) -> tuple[int, ...]:
        """KV heads TP rank ``tp_rank`` computes in its own K/V projection."""
        if self.num_kv_heads >= self.tp:
            per_rank = self.num_kv_heads // self.tp
            return tuple(range(tp_rank * per_rank, (tp_rank + 1) * per_rank))
        return (tp_rank // self.kv_head_replication,)

    def dcp_kv_heads_of(self, tp_rank: int) -> tuple[int, ...]:
        """Distinct KV heads used by the ``k`` TP positions of ``tp_rank``'s DCP group (cached by each member)."""
        k = self.dcp_tp_positions
        first = tp_rank // k * k
        return tuple(sorted({head for t in range(first, first + k) for head in self.kv_heads_of(t)}))

    def ep_rank_of(self, pcp_rank: int, tp_rank: int) -> int:
        """EP rank of the rank at (``pcp_rank``, ``tp_rank``): PCP-major, then its block of ``etp`` TP ranks."""
        return pcp_rank * self.ep_tp_positions + tp_rank // self.etp

    def experts_of(self, ep_rank: int) -> range:
        """Routed experts of EP rank ``ep_rank``: ``[ep_rank * E/EP, (ep_rank + 1) * E/EP)``; empty for a dense
        model."""
        if not 0 <= ep_rank < self.ep:
            raise ValueError(f"ep_rank ({ep_rank}) must be in [0, ep={self.ep})")
        if self.num_experts is None:
            return range(0)
        per_rank = self.num_experts // self.ep
        return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)

    def rank_info(self, rank: int) -> RankInfo:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size={self.world_size})")
        tp_rank = rank % self.tp
        pcp_rank = rank // self.tp % self.pcp
        kv_shard = tp_rank % self.dcp_tp_positions * self.pcp + pcp_rank
        ep_rank = self.ep_rank_of(pcp_rank, tp_rank)
        return RankInfo(rank=rank, dp_rank=rank // (self.tp * self.pcp), pcp_rank=pcp_rank, tp_rank=tp_rank,
                        dcp_rank=kv_shard, kv_shard=kv_shard, prefill_shard=pcp_rank,
                        q_heads=self.q_heads_of(tp_rank), kv_heads=self.kv_heads_of(tp_rank),
                        dcp_kv_heads=self.dcp_kv_heads_of(tp_rank), ep_rank=ep_rank, etp_rank=tp_rank % self.etp,
                        experts=self.experts_of(ep_rank))

    @cached_property
    def tp_groups(self) -> list[list[int]]:
        """One per (dp_rank, pcp_rank): ranks of equal dp and pcp rank, in TP order."""
        return [[self.global_rank(d, p, t) for t in range(self.tp)] for d in range(self.dp) for p in range(self.pcp)]

    @cached_property
    def pcp_groups(self) -> list[list[int]]:
        """One per (dp_rank, tp_rank): ranks of equal dp and tp rank, in PCP order."""
        return [[self.global_rank(d, p, t) for p in range(self.pcp)] for d in range(self.dp) for t in range(self.tp)]

    @cached_property
    def dcp_groups(self) -> list[list[int]]:
        """One per (dp_rank, block of k TP positions): members TP-major, PCP-minor (index = KV shard)."""
        k = self.dcp_tp_positions
        return [[self.global_rank(d, p, t) for t in range(first, first + k) for p in range(self.pcp)]
                for d in range(self.dp) for first in range(0, self.tp, k)]

    @cached_property
    def ep_groups(self) -> list[list[int]]:
        """One per (dp_rank, etp_rank): the ranks of one replica holding the same part of different experts, in
        EP-rank order (PCP-major: ``ep_rank = pcp_rank * k + tp_rank // etp``). EP = PCP: the PCP groups."""
        k, etp = self.ep_tp_positions, self.etp
        return [[self.global_rank(d, p, j * etp + e) for p in range(self.pcp) for j in range(k)]
                for d in range(self.dp) for e in range(etp)]

    @cached_property
    def etp_groups(self) -> list[list[int]]:
        """One per (dp_rank, ep_rank): the ``etp`` neighbouring TP ranks that split the same experts' FFN, in
        ETP-rank order. EP = PCP: the TP groups; EP = TP * PCP: single ranks."""
        k, etp = self.ep_tp_positions, self.etp
        return [[self.global_rank(d, p, j * etp + e) for e in range(etp)]
                for d in range(self.dp) for p in range(self.pcp) for j in range(k)]

    @cached_property
    def dp_groups(self) -> list[list[int]]:
        """One per (pcp_rank, tp_rank): the replicas of one model shard, in DP order."""
        return [[self.global_rank(d, p, t) for d in range(self.dp)] for p in range(self.pcp) for t in range(self.tp)]

    @cached_property
    def replica_groups(self) -> list[list[int]]:
        """One per dp_rank: every rank of one model replica (TP x PCP), in global-rank order."""
        size = self.tp * self.pcp
        return [list(range(d * size, (d + 1) * size)) for d in range(self.dp)]

    @cached_property
    def dp_pcp_groups(self) -> list[list[int]]:
        """One per tp_rank: every rank holding the same weights (DP replicas x PCP shards) - gradient reduction."""
        return [[self.global_rank(d, p, t) for d in range(self.dp) for p in range(self.pcp)] for t in range(self.tp)]

    @cached_property
    def hcp_a2a_groups(self) -> list[list[int]]:
        """Hierarchical prefill's inner groups: ``hierarchical_a2a_size`` consecutive ranks of each PCP group
        (empty without hierarchical prefill)."""
        return [] if self.hierarchical_a2a_size is None else hierarchical_rank_lists(
            self.pcp_groups, self.hierarchical_a2a_size)[0]

    @cached_property
    def hcp_ring_groups(self) -> list[list[int]]:
        """Hierarchical prefill's ring groups: every ``hierarchical_a2a_size``-th rank of each PCP group."""
        return [] if self.hierarchical_a2a_size is None else hierarchical_rank_lists(
            self.pcp_groups, self.hierarchical_a2a_size)[1]

    def kv_replication(self) -> dict[tuple[int, int], int]:
        """``(kv_head, kv_shard) -> number of ranks of one DP replica storing that cache slice``."""
        holders: Counter = Counter()
        for rank in range(self.tp * self.pcp):
            info = self.rank_info(rank)
            holders.update((head, info.kv_shard) for head in info.dcp_kv_heads)
        return dict(holders)


def _span(prefix: str, heads) -> str:
    heads = list(heads)
    return f"{prefix}{heads[0]}" if len(heads) == 1 else f"{prefix}{heads[0]}-{heads[-1]}"


def _experts(info: RankInfo, separator: str) -> str:
    """``separator + "e0-3"`` for a rank with experts; nothing for a dense model's."""
    return f"{separator}{_span('e', info.experts)}" if info.experts else ""


def _cell(info: RankInfo) -> str:
    return (f"{info.rank}: {_span('q', info.q_heads)}/{_span('k', info.kv_heads)}/s{info.kv_shard}/p{info.prefill_shard}"
            f"{_experts(info, '/')}")


def _member(info: RankInfo) -> str:
    return (f"{info.rank}: {_span('q', info.q_heads)}/{_span('k', info.kv_heads)}, s{info.kv_shard}, "
            f"p{info.prefill_shard}{_experts(info, ', ')}")


def _title(layout: ParallelLayout) -> str:
    sizes = f"TP={layout.tp}, PCP={layout.pcp}, DCP={layout.dcp}"
    if layout.dp > 1:
        sizes = f"DP={layout.dp}, {sizes}"
    query = f"{layout.num_heads} query head" + ("s" if layout.num_heads > 1 else "")
    kv = f"{layout.num_kv_heads} KV head" + ("s" if layout.num_kv_heads > 1 else "")
    if layout.num_kv_heads == 1 < layout.num_heads:  # one KV head for all query heads; with one query head it is MHA
        kv += " - MQA"
    if layout.num_experts is None:
        return f"{sizes}  ({query}, {kv})"
    experts = f"{layout.num_experts} routed expert" + ("s" if layout.num_experts > 1 else "")
    return f"{sizes}, EP={layout.ep}, ETP={layout.etp}  ({query}, {kv}, {experts})"


def _grid(layout: ParallelLayout) -> list[str]:
    """The rank table: one row per (dp, pcp) rank, one column per TP rank.

    Cells are ``" " + text`` left-justified to the longest text + 3. The header follows the golden tables:
    ``tp0`` starts at its column's left edge, every later label 3 characters into its column.
    """
    rows = [(f"pcp{p}" if layout.dp == 1 else f"dp{d} pcp{p}", [layout.global_rank(d, p, t) for t in range(layout.tp)])
            for d in range(layout.dp) for p in range(layout.pcp)]
    label_width = max(len(label) for label, _ in rows)
    cell_width = max(len(_cell(layout.rank_info(r))) for r in range(layout.world_size)) + 3
    header = ""
    for t in range(layout.tp):
        column_start = label_width + 2 + t * (cell_width + 1)
        header = header.ljust(column_start + (3 if t else 0)) + f"tp{t}"
    border = " " * (label_width + 1) + "+" + "+".join(["-" * cell_width] * layout.tp) + "+"
    experts = "" if layout.num_experts is None else " / experts"
    lines = [f"Rank Layout (query heads / KV head / KV shard / prefill shard{experts}):", header, border]
    for label, ranks in rows:
        cells = "|".join((" " + _cell(layout.rank_info(r))).ljust(cell_width) for r in ranks)
        lines += [f"{label.ljust(label_width)} |{cells}|", border]
    return lines


def _times(extra_copies: int) -> str:
    return {1: "once", 2: "twice"}.get(extra_copies, f"{extra_copies} times")


def _join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def replication_note(layout: ParallelLayout) -> str | None:
    """The NOTE line when some (KV head, KV shard) cache slice is stored by more than one rank of a replica.

    With the layout's rules (k = dcp/pcp and tp/num_kv_heads divide one another) a replica stores
    ``(tp/k) * max(1, k*num_kv_heads/tp)`` copies of ``num_kv_heads`` heads per shard, so replication
    happens exactly when ``tp*pcp/dcp > num_kv_heads``: the reason the note gives."""
    by_copies: dict[int, list[str]] = {}
    for (head, shard), holders in sorted(layout.kv_replication().items()):
        if holders > 1:
            by_copies.setdefault(holders - 1, []).append(f"(k{head}, s{shard})")
    if not by_copies:
        return None
    clauses = [f"{_join_and(pairs)} {'are each' if len(pairs) > 1 else 'is'} replicated {_times(copies)}"
               for copies, pairs in sorted(by_copies.items())]
    return f"NOTE: {'; '.join(clauses)} (since num_gpus = TP * PCP and num_gpus / DCP > num_kv_heads)"


def _group_sections(layout: ParallelLayout) -> list[tuple[str, str, list[list[int]]]]:
    sections = [("PCP Groups (shard sequence during prefill):", "PCP", layout.pcp_groups),
                ("TP Groups (shard heads):", "TP", layout.tp_groups),
                ("DCP Groups (shard KV during decode):", "DCP", layout.dcp_groups)]
    if layout.num_experts is not None:
        sections.append(("EP Groups (shard experts):", "EP", layout.ep_groups))
        if layout.etp > 1 and layout.ep > 1:
            sections.append(("ETP Groups (shard each expert's FFN):", "ETP", layout.etp_groups))
    if layout.dp > 1:
        sections.append(("DP Groups (replicate the model):", "DP", layout.dp_groups))
    if layout.hierarchical_a2a_size is not None:
        sections += [("A2A Groups (a2a+p2p prefill: all-to-all of heads inside):", "A2A", layout.hcp_a2a_groups),
                     ("Ring Groups (a2a+p2p prefill: ring across the a2a groups):", "RING", layout.hcp_ring_groups)]
    return sections


def _group_lines(layout: ParallelLayout) -> list[str]:
    """``  NAMEi: [ranks]  member | member``; labels padded to the longest label of all sections,
    rank lists and members to the longest of their section, so columns line up."""
    sections = _group_sections(layout)
    label_width = max(len(f"{name}{len(groups) - 1}:") for _, name, groups in sections)
    lines: list[str] = []
    for heading, name, groups in sections:
        lists = [str(group) for group in groups]
        members = [[_member(layout.rank_info(r)) for r in group] for group in groups]
        list_width = max(map(len, lists))
        member_width = max(len(m) for group in members for m in group)
        lines += ["", heading]
        for i, (ranks, descs) in enumerate(zip(lists, members)):
            body = " | ".join(m.ljust(member_width) for m in descs).rstrip()
            lines.append(f"  {f'{name}{i}:'.ljust(label_width)} {ranks.ljust(list_width)}  {body}")
    return lines


def render_layout(layout: ParallelLayout, nproc_per_node: int | None = None) -> str:
    """The layout's section of the golden tables: banner, title, rank grid, NOTE (if any), group lists.

    With ``num_experts`` the title adds ``EP``, ``ETP`` and the experts, each cell and group member its experts
    (``e0-3``), and EP Groups (and, with ETP > 1 and EP > 1, ETP Groups) sections follow the DCP groups.
    With ``dp > 1`` the title starts with ``DP=n``, grid rows are labelled ``dpD pcpP`` and a DP Groups section
    follows the DCP (and expert) groups; with ``hierarchical_a2a_size`` set, A2A and Ring Groups sections follow. With
    ``nproc_per_node`` the node sections follow (``node_lines``). No trailing newline.
    """
    lines = [BANNER, _title(layout), BANNER, "", *_grid(layout)]
    note = replication_note(layout)
    if note:
        lines += ["", note]
    lines += _group_lines(layout)
    if nproc_per_node is not None:
        lines += node_lines(layout, nproc_per_node)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- nodes
# torchrun starts ``nproc_per_node`` processes on every node and numbers them node after node (global rank =
# node rank x nproc_per_node + local rank), so node boundaries are fixed cuts of the global rank order. TP,
# varying fastest, fills a node first: its groups stay inside a node exactly when ``tp`` divides
# ``nproc_per_node``. TP all-reduces twice per layer on every token, so it must; the PCP ring, the DCP group and
# DP may cross nodes (a few collectives per layer, or none per step for DP).

def node_of(rank: int, nproc_per_node: int) -> int:
    return rank // nproc_per_node


def nodes_of(group: list[int], nproc_per_node: int) -> list[int]:
    """The nodes a group's ranks run on, ascending."""
    return sorted({node_of(rank, nproc_per_node) for rank in group})


def node_crossings(layout: ParallelLayout, nproc_per_node: int) -> dict[str, tuple[int, int]]:
    """``{group kind: (its groups that span more than one node, its groups)}`` for every kind the layout prints
    (``PCP``, ``TP``, ``DCP``, and ``EP``, ``ETP``, ``DP``, ``A2A``, ``RING`` when it has them)."""
    return {name: (sum(len(nodes_of(group, nproc_per_node)) > 1 for group in groups), len(groups))
            for _, name, groups in _group_sections(layout)}


def tp_across_nodes_error(layout: ParallelLayout, nproc_per_node: int) -> str | None:
    """The rule a TP group that spans nodes breaks, naming the first such group; ``None`` when none does."""
    for index, group in enumerate(layout.tp_groups):
        nodes = nodes_of(group, nproc_per_node)
        if len(nodes) > 1:
            return (f"tp ({layout.tp}) must divide nproc_per_node ({nproc_per_node}): TP all-reduces every layer, "
                    f"so a TP group must stay inside a node, but TP{index} {group} spans nodes "
                    f"{_join_and([str(n) for n in nodes])}; keep tp <= nproc_per_node and a divisor of it")
    return None


def check_nodes(layout: ParallelLayout, nproc_per_node: int) -> None:
    """Raise ``ValueError`` unless ``nproc_per_node`` is a positive integer that the world size is a multiple
    of (torchrun starts as many processes on every node) and every TP group stays inside one node."""
    check_positive("nproc_per_node", nproc_per_node)
    if layout.world_size % nproc_per_node:
        raise ValueError(f"world size ({layout.world_size} = dp*pcp*tp) must be a multiple of nproc_per_node "
                         f"({nproc_per_node}): torchrun starts nproc_per_node processes on every node")
    error = tp_across_nodes_error(layout, nproc_per_node)
    if error:
        raise ValueError(error)


def _span_of_ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"


def node_lines(layout: ParallelLayout, nproc_per_node: int) -> list[str]:
    """The node sections: each node's ranks and rank-grid rows, then, for every group, the nodes it spans.

    A layout whose TP group spans nodes gets a WARNING line naming the rule (``tp_across_nodes_error``);
    ``check_nodes`` refuses it instead.
    """
    rows = {}  # node -> labels of the grid rows (one per (dp, pcp) rank) that lie wholly on it
    for d in range(layout.dp):
        for p in range(layout.pcp):
            row = [layout.global_rank(d, p, t) for t in range(layout.tp)]
            nodes = nodes_of(row, nproc_per_node)
            if len(nodes) == 1:
                rows.setdefault(nodes[0], []).append(f"pcp{p}" if layout.dp == 1 else f"dp{d} pcp{p}")
    spans = [_span_of_ranks(list(range(first, min(first + nproc_per_node, layout.world_size))))
             for first in range(0, layout.world_size, nproc_per_node)]
    node_width, span_width = len(f"node{len(spans) - 1}:"), max(map(len, spans))
    lines = ["", f"Nodes ({nproc_per_node} processes per node; node of rank r = r // {nproc_per_node}):"]
    for node, span in enumerate(spans):
        labels = rows.get(node, [])
        grid_rows = f"  ({'row' if len(labels) == 1 else 'rows'} {', '.join(labels)})" if labels else ""
        lines.append(f"  {f'node{node}:'.ljust(node_width)} {span.ljust(span_width)}{grid_rows}".rstrip())
    sections = _group_sections(layout)
    label_width = max(len(f"{name}{len(groups) - 1}:") for _, name, groups in sections)
    list_width = max(len(str(group)) for _, _, groups in sections for group in groups)
    lines += ["", "Groups and nodes (TP must stay inside a node; the others may cross):"]
    for _, name, groups in sections:
        for index, group in enumerate(groups):
            nodes = nodes_of(group, nproc_per_node)
            where = (f"inside node{nodes[0]}" if len(nodes) == 1 else
                     f"crosses nodes {_join_and([str(n) for n in nodes])}")
            lines.append(f"  {f'{name}{index}:'.ljust(label_width)} {str(group).ljust(list_width)}  {where}")
    warning = tp_across_nodes_error(layout, nproc_per_node)
    if warning:
        lines += ["", f"WARNING: {warning}"]
    return lines


def legend_of(layout: ParallelLayout) -> str:
    """The LEGEND block for ``layout``: ``LEGEND``, with ``EXPERTS_LEGEND_LINE`` before its last line when the layout
    has experts."""
    if layout.num_experts is None:
        return LEGEND
    *lines, group_line = LEGEND.split("\n")
    return "\n".join([*lines, EXPERTS_LEGEND_LINE, group_line])


def layout_report(layout: ParallelLayout, nproc_per_node: int | None = None, legend: bool = False) -> str:
    """What the layout printers (``python -m cptoolkit.parallel_state``, ``cptoolkit layout``) print: the LEGEND
    block (with ``legend``; ``legend_of``), then ``render_layout``'s table. With ``nproc_per_node`` the nodes are
    marked and a TP group that would span nodes is refused (``check_nodes``, a ``ValueError``)."""
    if nproc_per_node is not None:
        check_nodes(layout, nproc_per_node)
    table = render_layout(layout, nproc_per_node=nproc_per_node)
    return f"{legend_of(layout)}\n\n{table}" if legend else table
