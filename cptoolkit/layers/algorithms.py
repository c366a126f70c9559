"""The attention algorithms, one record each: name, validity rule, what it needs, its communication model and the
function that runs it.

Prefill (``parallel.prefill_comm``, megatron's ``cp_comm_type``): how a PCP group attends its DualChunkSwap shards.
Decode (``parallel.decode_comm``): how a DCP group combines the partials of its KV shards. Config validation
(``cptoolkit.config``), dispatch (``ring_prefill_attention``, ``context_attention``, ``combine_partials``,
``runtime_from_megatron``) and the planner (``cptoolkit.plan``) read these records; none of them compares names.

Pure: no torch here, so the config and the planner import it cheaply. A record names the function that runs it
(``module:attribute``), imported on first use.

The communication models count what one rank sends per layer, in the planner's terms, each collective as
``CommStats`` names it; tests/test_plan.py checks them against the collectives the layers count.
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

from cptoolkit.layout import a2a_size_rule

FLOAT32_BYTES = 4  # decode partials (out, lse) travel in float32 whatever the model's dtype


@functools.cache
def _load(path: str) -> Callable:
    module, _, attribute = path.partition(":")
    target = importlib.import_module(module)
    for name in attribute.split("."):
        target = getattr(target, name)
    return target


@dataclass(frozen=True)
class Collective:
    """``calls`` collectives ``name`` (as ``CommStats`` counts it), each sending ``nbytes`` from this rank."""

    name: str
    nbytes: int
    calls: int = 1


def kv_replicas(num_kv_heads: int, a2a_size: int) -> int:
    """How many times each KV head is repeated so that ``a2a_size`` members each get whole KV heads."""
    return a2a_size // math.gcd(num_kv_heads, a2a_size)


def _whole_heads(q_heads: int, a2a_size: int, size_name: str) -> Optional[str]:
    """The one head rule of an all-to-all of ``a2a_size`` members (Ulysses)."""
    if q_heads % a2a_size == 0:
        return None
    return (f"query heads per TP rank ({q_heads}) must be a multiple of the a2a group size ({a2a_size}{size_name}): "
            f"each member attends whole query heads (KV heads need no such rule: each is replicated "
            f"{a2a_size} / gcd(kv_heads, {a2a_size}) times); use p2p or all_gather, or an a2a group size that "
            "divides the query heads")


def _any_layout(q_heads: int, pcp: int, a2a_size: Optional[int]) -> Optional[str]:
    return None


def _ulysses_rule(q_heads: int, pcp: int, a2a_size: Optional[int]) -> Optional[str]:
    return _whole_heads(q_heads, pcp, " = pcp")


def _hierarchical_rule(q_heads: int, pcp: int, a2a_size: Optional[int]) -> Optional[str]:
    if a2a_size is None:
        return "needs the a2a group size (hierarchical_a2a_size), a divisor of pcp"
    size_rule = a2a_size_rule(a2a_size, pcp)
    if size_rule is not None:
        return f"the a2a group size ({a2a_size!r}) {size_rule}"
    return _whole_heads(q_heads, a2a_size, " = hierarchical_a2a_size")


@dataclass(frozen=True)
class PrefillTraffic:
    """One rank's prefill attention of one layer, in the terms the communication models take: ``pcp`` ranks,
    ``q_heads`` and ``kv_heads`` of this rank (MLA's expanded form: one KV head per query head), ``head_bytes`` one
    head's local tokens (batch x padded tokens / pcp x head width x bytes per element)."""

    pcp: int
    q_heads: int
    kv_heads: int
    head_bytes: int

    @property
    def kv_bytes(self) -> int:
        """This rank's stacked K and V."""
        return 2 * self.kv_heads * self.head_bytes

    @property
    def a2a_kv_bytes(self) -> int:
        """K or V as the whole-PCP all-to-all sends it: each KV head repeated ``kv_replicas`` times."""
        return self.kv_heads * kv_replicas(self.kv_heads, self.pcp) * self.head_bytes


@dataclass(frozen=True)
class PrefillAlgorithm:
    """A prefill algorithm over the PCP group.

    - ``name``: ``parallel.prefill_comm`` / megatron's ``cp_comm_type``.
    - ``rule(q_heads per TP rank, pcp, a2a group size or None)``: why this layout cannot run it, or None.
    - ``hierarchical``: runs on the a2a and ring sub-groups of the PCP group (``hcp_groups``, sized by
      ``parallel.hierarchical_a2a_size``, which it requires and nothing else allows).
    - ``run``: the differentiable attention, ``(q, k, v, groups, scale, stats, window, softcap, sinks) -> out``.
    - ``history_forward`` (None: none): a forward returning ``(out, lse, ...)``, so that a chunk's attention merges
      with a cached history (``context_attention``): whether it attends a history.
    - ``collectives(PrefillTraffic)`` / ``held_bytes(PrefillTraffic)``: the forward's collectives per layer and the
      K/V it holds at once (the planner's activation estimate); None where the planner does not model it.
    """

    name: str
    rule: Callable[[int, int, Optional[int]], Optional[str]]
    hierarchical: bool
    run_path: str
    history_path: Optional[str]
    collectives: Optional[Callable[[PrefillTraffic], tuple[Collective, ...]]]
    held_bytes: Optional[Callable[[PrefillTraffic], int]]

    def check(self, q_heads: int, pcp: int, a2a_size: Optional[int] = None) -> Optional[str]:
        """This algorithm's rule on a layout; None when it can run there."""
        return self.rule(q_heads, pcp, a2a_size)

    @property
    def run(self) -> Callable:
        return _load(self.run_path)

    @property
    def attends_history(self) -> bool:
        return self.history_path is not None

    @property
    def history_forward(self) -> Callable:
        return _load(self.history_path)


PREFILL_ALGORITHMS = {algorithm.name: algorithm for algorithm in (
    # K/V blocks travel around the ring, send/recv overlapped with compute: pcp-1 send_recv forward.
    PrefillAlgorithm("p2p", _any_layout, hierarchical=False,
                     run_path="cptoolkit.layers.ring_p2p:RingP2PAttention.apply",
                     history_path="cptoolkit.layers.ring_p2p:ring_forward",
                     collectives=lambda t: (Collective("send_recv", t.kv_bytes, calls=t.pcp - 1),),
                     held_bytes=lambda t: 2 * t.kv_bytes),  # the block in use and the one arriving
    # One all-gather of K/V forward.
    PrefillAlgorithm("all_gather", _any_layout, hierarchical=False,
                     run_path="cptoolkit.layers.allgather_prefill:AllGatherPrefillAttention.apply",
                     history_path="cptoolkit.layers.allgather_prefill:allgather_forward",
                     collectives=lambda t: (Collective("all_gather", t.kv_bytes),),
                     held_bytes=lambda t: t.pcp * t.kv_bytes),  # the whole chunk's
    # Ulysses: all-to-alls trade the sequence shard for a head shard: q, k, v and back the output.
    PrefillAlgorithm("a2a", _ulysses_rule, hierarchical=False,
                     run_path="cptoolkit.layers.ulysses_a2a:UlyssesAttention.apply", history_path=None,
                     collectives=lambda t: (Collective("all_to_all", t.q_heads * t.head_bytes, calls=2),
                                            Collective("all_to_all", t.a2a_kv_bytes, calls=2)),
                     held_bytes=lambda t: 2 * t.q_heads * t.head_bytes + 2 * t.a2a_kv_bytes),
    # a2a inside groups of hierarchical_a2a_size consecutive PCP ranks, the ring across them.
    PrefillAlgorithm("a2a+p2p", _hierarchical_rule, hierarchical=True,
                     run_path="cptoolkit.layers.hierarchical_prefill:HierarchicalPrefillAttention.apply",
                     history_path=None, collectives=None, held_bytes=None),
)}
PrefillComm = Literal[tuple(PREFILL_ALGORITHMS)]


@dataclass(frozen=True)
class DecodeTraffic:
    """One rank's combine of one decode layer: a DCP group of ``dcp`` members over ``tp_positions`` (``k``) TP
    positions; each member's partial holds ``rows`` query rows (the batch's new tokens) of the group's ``k *
    q_heads`` heads, ``width`` channels wide."""

    dcp: int
    tp_positions: int
    rows: int
    q_heads: int
    width: int

    @property
    def slices(self) -> int:
        """Head slices this member sends: one per member (``k > 1``), or its whole partial (``k = 1``: every
        member owns every head)."""
        return 1 if self.tp_positions == 1 else self.dcp


@dataclass(frozen=True)
class DecodeAlgorithm:
    """How a DCP group combines its members' partials ``(out, lse)`` into each member's own rows.

    - ``name``: ``parallel.decode_comm``.
    - ``combine``: ``(out, lse, dg, stats, split_tokens) -> (out, lse)`` of this member's rows
      (``dcp_decode.combine_partials``).
    - ``collectives(DecodeTraffic)``: what the combine sends per decode layer and step.
    """

    name: str
    combine_path: str
    collectives: Callable[[DecodeTraffic], tuple[Collective, ...]]

    @property
    def combine(self) -> Callable:
        return _load(self.combine_path)


DECODE_ALGORITHMS = {algorithm.name: algorithm for algorithm in (
    # Packed (out, lse) head slices straight to their owners (an all-gather when every member owns every head),
    # merged there.
    DecodeAlgorithm("a2a", "cptoolkit.layers.dcp_decode:combine_a2a", lambda t: (
        Collective("all_gather" if t.tp_positions == 1 else "all_to_all",
                   t.slices * t.rows * t.q_heads * (t.width + 1) * FLOAT32_BYTES),)),
    # All-gather the LSEs, rescale locally, sum the outputs with an all-reduce or a reduce-scatter.
    DecodeAlgorithm("ag_rs", "cptoolkit.layers.dcp_decode:combine_ag_rs", lambda t: (
        Collective("all_gather", t.rows * t.tp_positions * t.q_heads * FLOAT32_BYTES),
        Collective("all_reduce" if t.tp_positions == 1 else "reduce_scatter",
                   t.slices * t.rows * t.q_heads * t.width * FLOAT32_BYTES))),
)}
DecodeComm = Literal[tuple(DECODE_ALGORITHMS)]


def _lookup(records: dict, name: str, field: str):
    if name not in records:
        raise ValueError(f"{field} ({name!r}) must be one of {sorted(records)}")
    return records[name]


def prefill_algorithm(name: str, field: str = "prefill_comm") -> PrefillAlgorithm:
    """The record of prefill algorithm ``name``; a ValueError naming ``field`` and the known names otherwise."""
    return _lookup(PREFILL_ALGORITHMS, name, field)


def decode_algorithm(name: str, field: str = "decode_comm") -> DecodeAlgorithm:
    """The record of decode algorithm ``name``; a ValueError naming ``field`` and the known names otherwise."""
    return _lookup(DECODE_ALGORITHMS, name, field)


def history_names() -> tuple[str, ...]:
    """The prefill algorithms that attend a history (chunked prefill, prefix caching), in record order."""
    return tuple(name for name, algorithm in PREFILL_ALGORITHMS.items() if algorithm.attends_history)
