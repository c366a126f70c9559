"""Process groups for a ``ParallelLayout``, a thin Megatron-style facade, and the layout printer CLI.

``initialize_model_parallel`` turns the pure layout (``cptoolkit.layout``) into ``torch.distributed`` groups
and returns them as a frozen ``ParallelGroups``; code that can should take that object explicitly. The
module-level getters (``get_tensor_model_parallel_group`` ...) read one current ``ParallelGroups`` for code
written against Megatron's global-state style.

megatron-core's own global ``parallel_state`` is deliberately left uninitialized: its ``GPTModel``,
``TransformerBlock`` and TP layers take every group from ``ParallelGroups.megatron_pg_collection()`` (a
``GPTModel`` builds, and a ``ColumnParallelLinear`` runs forward and backward on gloo, with no global state -
tests/test_parallel_state.py), and a second copy of the groups in megatron's globals could only drift.

CLI: ``python -m cptoolkit.parallel_state --tp 2 --pcp 2 --dcp 4 --num-heads 8 --num-kv-heads 2 [--dp N]
[--hierarchical-a2a-size A] [--ep N --num-experts E] [--nproc-per-node N] [--legend]`` prints the layout's table
(``render_layout``; the a2a and ring groups only with ``--hierarchical-a2a-size``; each rank's experts and the EP
groups only with ``--num-experts``; each node's ranks and the nodes every group spans only
with ``--nproc-per-node``, which refuses a TP group that spans nodes); invalid arguments print one line on stderr
and exit with status 2.
"""
from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup

from cptoolkit.errors import OneLineParser
from cptoolkit.layers.comm import use_shared_memory
from cptoolkit.layers.hierarchical_prefill import HierarchicalGroups
from cptoolkit.layout import LEGEND, ParallelLayout, RankInfo, layout_report, render_layout

__all__ = [
    "ParallelLayout", "RankInfo", "ParallelGroups", "LEGEND", "render_layout", "validate_world_size",
    "initialize_model_parallel", "destroy_model_parallel", "model_parallel_is_initialized", "get_parallel_groups",
    "get_tensor_model_parallel_group", "get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size",
    "get_prefill_context_parallel_group", "get_prefill_context_parallel_rank",
    "get_prefill_context_parallel_world_size", "get_decode_context_parallel_group",
    "get_decode_context_parallel_rank", "get_decode_context_parallel_world_size",
]


def validate_world_size(layout: ParallelLayout, world_size: int) -> None:
    """Raise ValueError unless ``world_size == dp * pcp * tp``."""
    if world_size != layout.world_size:
        raise ValueError(f"world size {world_size} != dp*pcp*tp = {layout.dp}*{layout.pcp}*{layout.tp} = "
                         f"{layout.world_size}: launch {layout.world_size} ranks or change dp, pcp or tp")


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups for ``layout``; in every group, group rank = position in the layout's list.

    - ``tp_group``: ranks of equal (dp, pcp) rank, in TP order (attention heads, MLP shards).
    - ``pcp_group``: ranks of equal (dp, tp) rank, in PCP order (prefill sequence shards; ring attention).
    - ``dcp_group``: ``k`` neighbouring TP positions x all PCP ranks, TP-major, PCP-minor; group rank = KV shard
      (collectives on it return entries in KV-shard order).
    - ``dp_group``: ranks of equal (pcp, tp) rank: the model replicas.
    - ``dp_pcp_group``: ranks of equal tp rank: every rank holding the same weights (gradient reduction).
    - ``self_group``: this rank alone (megatron-core's pipeline and context-parallel groups, see
      ``megatron_pg_collection``).
    - ``hcp_groups``: this rank's a2a and ring sub-groups of ``pcp_group`` for ``a2a+p2p`` prefill, only when the
      layout has a ``hierarchical_a2a_size`` (else ``None``).
    - ``ep_group``: the ranks of this replica with this rank's ``etp_rank``, in EP-rank order (they hold the same
      part of different experts: the expert all-to-all runs here). ``etp_group``: the ranks of this replica with
      this rank's ``ep_rank``, in ETP-rank order (they split the same experts' FFN). Both are built by
      ``initialize_model_parallel`` for every layout, a dense model's too (EP = PCP by default); ``None`` only in
      a ``ParallelGroups`` built by hand from a layout (sizing code that reads only the layout).
    """

    layout: ParallelLayout
    rank_info: RankInfo
    tp_group: ProcessGroup
    pcp_group: ProcessGroup
    dcp_group: ProcessGroup
    dp_group: ProcessGroup
    dp_pcp_group: ProcessGroup
    replica_group: ProcessGroup
    self_group: ProcessGroup
    hcp_groups: HierarchicalGroups | None = None
    ep_group: ProcessGroup | None = None
    etp_group: ProcessGroup | None = None

    @property
    def tp_rank(self) -> int:
        return self.rank_info.tp_rank

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def dp_rank(self) -> int:
        return self.rank_info.dp_rank

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def replica_first_rank(self) -> int:
        """Global rank of this replica's (pcp 0, tp 0) rank: the one that samples for the replica."""
        return self.layout.global_rank(self.dp_rank, 0, 0)

    @property
    def pcp_rank(self) -> int:
        return self.rank_info.pcp_rank

    @property
    def pcp_size(self) -> int:
        return self.layout.pcp

    @property
    def dcp_rank(self) -> int:
        return self.rank_info.dcp_rank

    @property
    def dcp_size(self) -> int:
        return self.layout.dcp

    @property
    def dcp_tp_positions(self) -> int:
        return self.layout.dcp_tp_positions

    @property
    def ep_rank(self) -> int:
        return self.rank_info.ep_rank

    @property
    def ep_size(self) -> int:
        return self.layout.ep

    @property
    def etp_rank(self) -> int:
        return self.rank_info.etp_rank

    @property
    def etp_size(self) -> int:
        return self.layout.etp

    def megatron_pg_collection(self):
        """megatron-core's ``ProcessGroupCollection`` for ``GPTModel`` / ``TransformerBlock`` / TP layers.

        ``tp`` is the TP group. ``cp`` is ``self_group`` (size 1): cptoolkit's attention shards the prompt over
        ``pcp_group`` itself and the model code applies RoPE at explicit position ids, so megatron-core must not
        re-slice rotary embeddings or sequences for context parallelism (it would, for a cp group of size > 1).
        ``pp`` and ``embd``/``pos_embd`` are ``self_group`` too (no pipeline parallelism: first stage = last
        stage = this rank, as megatron builds them for pp=1). ``tp_cp`` = ``tp``; ``dp`` is the DP group and
        ``dp_cp`` the DP x PCP group (all holders of the same weights, for gradient reduction).

        Experts (megatron's MoE layer, experts and token dispatchers read these): ``ep`` is the EP group and
        ``expt_tp`` the ETP group; ``tp_ep`` (megatron's expert TP x EP) is the replica group, whose global-rank
        order is megatron's ``ep_rank * ETP + etp_rank``; ``expt_dp`` (the holders of the same expert weights,
        for their gradient reduction) is the DP group, as EP already spans PCP.
        """
        from megatron.core.process_groups_config import ProcessGroupCollection

        return ProcessGroupCollection(tp=self.tp_group, cp=self.self_group, pp=self.self_group,
                                      embd=self.self_group, pos_embd=self.self_group, tp_cp=self.tp_group,
                                      dp=self.dp_group, dp_cp=self.dp_pcp_group, ep=self.ep_group,
                                      expt_tp=self.etp_group, tp_ep=self.replica_group, expt_dp=self.dp_group)


_GROUPS: ParallelGroups | None = None


def _new_groups(rank_lists: list[list[int]], rank: int, backend: str | None,
                timeout: datetime.timedelta | None) -> ProcessGroup:
    """Create one group per rank list (every rank must call this with the same lists); return this rank's.

    ``sort_ranks=False`` keeps each list's order as the group-rank order: torch would otherwise sort it, and a
    DCP group ``[0, 2, 1, 3]`` would give rank 1 group rank 1 instead of its KV shard 2.
    """
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks=ranks, backend=backend, timeout=timeout, sort_ranks=False)
        if rank in ranks:
            mine = group
    return mine


def initialize_model_parallel(tp: int, pcp: int, dcp: int, num_heads: int, num_kv_heads: int, dp: int = 1,
                              backend: str | None = None, timeout: datetime.timedelta | None = None,
                              hierarchical_a2a_size: int | None = None, ep: int | None = None,
                              num_experts: int | None = None) -> ParallelGroups:
    """Build the layout's groups on every rank and make them the current groups of the facade.

    Collective over the default group: every rank must call it with the same arguments. Invalid sizes or a
    world size other than ``dp * pcp * tp`` raise the same ValueError on every rank before any group is
    created, so nothing hangs. ``backend`` is passed to ``new_group`` (None: the default group's backend).
    ``timeout`` bounds every collective on the new groups (None: torch's default of 30 minutes, *not* the
    default group's timeout, so a launcher must pass its collective timeout here too). ``hierarchical_a2a_size``
    (``parallel.hierarchical_a2a_size``, for ``a2a+p2p`` prefill) also builds ``hcp_groups``. ``ep`` (None: ``pcp``)
    and ``num_experts`` (None: a dense model) set the layout's experts; the EP and ETP groups are built either way.
    """
    global _GROUPS
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
    if _GROUPS is not None:
        raise RuntimeError("model parallel groups are already initialized: call destroy_model_parallel() first")
    layout = ParallelLayout(tp=tp, pcp=pcp, dcp=dcp, num_heads=num_heads, num_kv_heads=num_kv_heads, dp=dp,
                            hierarchical_a2a_size=hierarchical_a2a_size, ep=ep, num_experts=num_experts)
    validate_world_size(layout, dist.get_world_size())
    rank = dist.get_rank()
    hcp_groups = None
    if hierarchical_a2a_size is not None:
        hcp_groups = HierarchicalGroups(a2a_group=_new_groups(layout.hcp_a2a_groups, rank, backend, timeout),
                                        ring_group=_new_groups(layout.hcp_ring_groups, rank, backend, timeout))
    _GROUPS = ParallelGroups(
        layout=layout, rank_info=layout.rank_info(rank),
        tp_group=_new_groups(layout.tp_groups, rank, backend, timeout),
        pcp_group=_new_groups(layout.pcp_groups, rank, backend, timeout),
        dcp_group=_new_groups(layout.dcp_groups, rank, backend, timeout),
        dp_group=_new_groups(layout.dp_groups, rank, backend, timeout),
        dp_pcp_group=_new_groups(layout.dp_pcp_groups, rank, backend, timeout),
        replica_group=_new_groups(layout.replica_groups, rank, backend, timeout),
        self_group=_new_groups([[r] for r in range(layout.world_size)], rank, backend, timeout),
        hcp_groups=hcp_groups,
        ep_group=_new_groups(layout.ep_groups, rank, backend, timeout),
        etp_group=_new_groups(layout.etp_groups, rank, backend, timeout),
    )
    return _GROUPS


def destroy_model_parallel() -> None:
    """Destroy the current groups (this rank's) and clear the facade; a no-op when none are initialized."""
    global _GROUPS
    if _GROUPS is None:
        return
    groups, _GROUPS = _GROUPS, None
    hcp = () if groups.hcp_groups is None else (groups.hcp_groups.a2a_group, groups.hcp_groups.ring_group)
    for group in (groups.tp_group, groups.pcp_group, groups.dcp_group, groups.dp_group, groups.dp_pcp_group,
                  groups.replica_group, groups.self_group, *hcp, groups.ep_group, groups.etp_group):
        use_shared_memory(group, None)
        dist.destroy_process_group(group)


def model_parallel_is_initialized() -> bool:
    return _GROUPS is not None


def get_parallel_groups() -> ParallelGroups:
    if _GROUPS is None:
        raise RuntimeError("model parallel groups are not initialized: call initialize_model_parallel() first")
    return _GROUPS


def get_tensor_model_parallel_group() -> ProcessGroup:
    return get_parallel_groups().tp_group


def get_tensor_model_parallel_rank() -> int:
    return get_parallel_groups().tp_rank


def get_tensor_model_parallel_world_size() -> int:
    return get_parallel_groups().tp_size


def get_prefill_context_parallel_group() -> ProcessGroup:
    return get_parallel_groups().pcp_group


def get_prefill_context_parallel_rank() -> int:
    return get_parallel_groups().pcp_rank


def get_prefill_context_parallel_world_size() -> int:
    return get_parallel_groups().pcp_size


def get_decode_context_parallel_group() -> ProcessGroup:
    return get_parallel_groups().dcp_group


def get_decode_context_parallel_rank() -> int:
    return get_parallel_groups().dcp_rank


def get_decode_context_parallel_world_size() -> int:
    return get_parallel_groups().dcp_size


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m cptoolkit.parallel_state",
                            description="Print the TP x PCP x DCP (x EP) rank layout table.")
    for flag in ("--tp", "--pcp", "--dcp", "--num-heads", "--num-kv-heads"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas (rows labelled dpD pcpP)")
    parser.add_argument("--hierarchical-a2a-size", type=int, help="a2a+p2p prefill: a2a group size (lists the groups)")
    parser.add_argument("--ep", type=int, help="expert-parallel size, k*pcp with k dividing tp (default: pcp)")
    parser.add_argument("--num-experts", type=int,
                        help="routed experts of an MoE model (shows each rank's experts and the EP groups)")
    parser.add_argument("--legend", action="store_true", help="print the LEGEND block first")
    parser.add_argument("--nproc-per-node", type=int,
                        help="processes per node (torchrun's): list each node's ranks and the nodes every group "
                             "spans; refuse a TP group that spans nodes")
    args = parser.parse_args(argv)
    try:
        layout = ParallelLayout(tp=args.tp, pcp=args.pcp, dcp=args.dcp, num_heads=args.num_heads,
                                num_kv_heads=args.num_kv_heads, dp=args.dp,
                                hierarchical_a2a_size=args.hierarchical_a2a_size, ep=args.ep,
                                num_experts=args.num_experts)
        report = layout_report(layout, nproc_per_node=args.nproc_per_node, legend=args.legend)
    except ValueError as error:
        parser.error(str(error))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
