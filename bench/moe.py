"""MoE prefill and decode per rank: whole experts (EP = TP·PCP) vs TP-sliced experts (EP = PCP) vs replicated.

The model (``MODEL``, ``MOE``): llama-style, 4 layers, hidden 512, 8 query / 2 KV heads (GQA, head_dim 64),
vocabulary 512, every layer an MoE of 8 experts, top-2 (softmax, normalised top-k: Mixtral's rule), expert FFN
1024 (SwiGLU); float32, seeded random weights, the same for every variant, so the MoE variants compute one model
(their greedy tokens are compared). ``dense`` is the reference: the same model with a dense SwiGLU MLP of
2048 = top_k x 1024, the MoE's active parameters per token less its router.

Variants of one layout, each its own model and ``Engine``, all built in one job and measured in interleaved rounds
(the order rotating each round), so they see the same machine load:

- ``ep_whole``: EP = TP·PCP, ETP = 1: each rank E/(TP·PCP) whole experts; prefill dispatches every row to its
  experts' ranks (all-gather of counts, all-to-all there and back over the replica);
- ``ep_sliced``: EP = PCP, ETP = TP: each rank its TP slice of E/PCP experts, like the dense MLP; prefill
  dispatches only over PCP (at TP = 1 it is ``ep_whole``, so not listed there);
- ``replicated``: every rank every expert whole (``MoEGroups(tp, ep=None, etp=None)``, built here by hand: no
  layout has it); prefill only: each TP rank computes its share of the rows, one TP all-reduce adds them. Its decode
  would add the replica's copies of every output, so it is not measured;
- ``dense``: the reference row.

Layouts: TP2 and PCP2 on 2 ranks (one core each), TP2xPCP2 on 4 ranks (on 2 cores: oversubscribed, so their
times are not per-core figures; the bytes are exact). DCP = PCP. One thread per rank, gloo on 127.0.0.1.

Per variant and layout: the prefill step (one prompt of ``prompt_len`` tokens, ``max_new_tokens=1``: the engine's
``prefill_time_s``) and the decode step (``batch`` requests of ``decode_prompt`` tokens, ``new_tokens`` each: the
engine's ``decode_time_s / decode_steps``), each the slowest rank's, median over rounds, and its ratio to
``ep_whole``'s: the median of the rounds' ratios (the two ran back to back) and, in parentheses, the ratio of the
least disturbed rounds (the minima); beside them the CPU time of the step (``time.process_time``: every thread of
the rank, user and system, so gloo's copies too, but no waiting for a core or for a peer), the max over ranks,
median over rounds, and its paired ratio: on the shared 2-core machine wall times swing by 2-4x between rounds,
CPU times by ~10 %, so the CPU ratios are the readable ones; the bytes each rank
sends per step (``CommStats``: the MoE layer's collectives and the attention's apart; an all-to-all counts its
whole input, the share a rank keeps included, an all-reduce its tensor once; megatron's own TP all-reduces, e.g. of
the attention output and the dense MLP, are not counted); the MLP weight bytes per rank (routed experts and
router, or the dense MLP); the expert FLOPs per rank per step, from the routing each layer counted
(``expert_tokens``: 6·hidden per (token, slot) and FFN column the rank computes), and their max over mean across
the replica, which the step waits for.

    python bench/moe.py [--quick] [--rounds N] [--prompt-len 2048] [--decode-prompt 256] [--new-tokens 17]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/moe.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from bench.common import add_results_dir_argument, format_table, launch, machine_info, summarize, write_json
from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import attention_runtime, kv_cache
from cptoolkit.inference.engine import Engine
from cptoolkit.inference.metrics import EngineMetrics
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.models.build import build_gpt_model
from cptoolkit.models.from_config import model_shape
from cptoolkit.models.moe_dims import MoEDims
from cptoolkit.models.tokenizer import ByteTokenizer
from cptoolkit.moe.layer import MoELayer, moe_layers
from cptoolkit.parallel_state import ParallelGroups, destroy_model_parallel, initialize_model_parallel

MODEL = {"num_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "num_kv_heads": 2, "ffn_hidden_size": 2048,
         "vocab_size": 512, "max_seq_len": 2048 + 64, "seed": 3}
MOE = MoEDims(num_experts=8, top_k=2, ffn_hidden_size=1024, moe_layers=(True,) * 4, norm_topk_prob=True)
LAYOUTS = {2: ((2, 1), (1, 2)), 4: ((2, 2),)}  # world size -> its (tp, pcp) layouts, measured one after the other
VARIANTS = ("ep_whole", "ep_sliced", "replicated", "dense")
PREFILL_ONLY = ("replicated",)


@dataclass(frozen=True)
class Settings:
    """``prompt_len``: the prefill prompt; ``batch`` requests of ``decode_prompt`` tokens generate ``new_tokens``
    each (``new_tokens - 1`` decode steps); ``rounds`` of every variant, after one warm-up round."""

    prompt_len: int = 2048
    batch: int = 8
    decode_prompt: int = 256
    new_tokens: int = 17
    rounds: int = 9


def variants(tp: int) -> tuple[str, ...]:
    """The variants of a layout: ``ep_sliced`` is ``ep_whole`` at TP = 1."""
    return tuple(v for v in VARIANTS if tp > 1 or v != "ep_sliced")


def _new_group(rank_lists: list[list[int]], rank: int):
    """This rank's group of ``rank_lists`` (every rank creates every group, in list order = group rank)."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks=ranks, sort_ranks=False)
        mine = group if rank in ranks else mine
    return mine


def _with_ep(groups: ParallelGroups, ep: int) -> ParallelGroups:
    """``groups`` with the EP and ETP groups of EP = ``ep`` (collective: every rank builds every new group)."""
    layout = dataclasses.replace(groups.layout, ep=ep)
    rank = dist.get_rank()
    return dataclasses.replace(groups, layout=layout, rank_info=layout.rank_info(rank),
                               ep_group=_new_group(layout.ep_groups, rank),
                               etp_group=_new_group(layout.etp_groups, rank))


def _engine(cfg, groups: ParallelGroups, variant: str, moe: MoEDims) -> Engine:
    """The engine of one variant (module docstring) on ``groups``, with its own runtime (so its own CommStats)."""
    runtime = attention_runtime(cfg, groups)
    shape = model_shape(cfg) if variant == "dense" else dataclasses.replace(model_shape(cfg), moe=moe)
    pg_collection = groups.megatron_pg_collection()
    if variant == "replicated":  # MoEGroups.from_pg_collection: EP = ETP = 1 inside the replica, all experts whole
        pg_collection.ep = pg_collection.expt_tp = None
    model = build_gpt_model(shape, pg_collection, runtime, torch.float32, seed=cfg.model.seed).eval()
    cache = kv_cache(cfg, groups, shape, torch.device("cpu"))
    return Engine(model, runtime, groups, cache, ByteTokenizer(), max_batch_size=cfg.inference.batch_size)


def mlp_bytes(engine: Engine) -> int:
    """This rank's bytes of every layer's MLP weights (routed experts and router, or the dense MLP)."""
    return sum(p.numel() * p.element_size() for name, p in engine.model.named_parameters() if ".mlp." in name)


def _expert_work(layers: list[MoELayer], tokens_before: list[torch.Tensor]) -> int:
    """(token, slot) rows x FFN columns this rank's routed experts computed since ``tokens_before`` (each layer's
    ``expert_tokens`` then); x 6·hidden it is their FLOPs. ``expert_tokens`` holds what the rank's experts saw:
    the replica's whole load with EP > 1 or in decode, the rank's own rows in a prefill without dispatch."""
    work = 0
    for layer, before in zip(layers, tokens_before):
        placement = layer.placement
        local = slice(placement.first_expert, placement.first_expert + placement.num_local)
        work += int((layer.expert_tokens - before)[local].sum()) * placement.ffn_local
    return work


def _serve(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy generation of ``prompts`` step by step, this rank's view: ``prefill_s`` (the prefill steps' wall
    time), ``decode_step_s`` (mean decode step), the steps of each kind, the collectives' ``calls`` and
    ``bytes_sent`` by phase and name (CommStats deltas around each step), the ``expert_work`` (``_expert_work``)
    by phase and the tokens."""
    engine.metrics = EngineMetrics()
    stats = engine.runtime.stats
    calls = {"prefill": Counter(), "decode": Counter()}
    sent = {"prefill": Counter(), "decode": Counter()}
    steps, work, cpu_s, layers = Counter(), Counter(), Counter(), moe_layers(engine.model)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)  # every row, every step
    ids = [engine.add_request(prompt, sampling) for prompt in prompts]
    dist.barrier()
    while engine.has_unfinished_requests():
        steps_before = engine.metrics.decode_steps
        calls_before, sent_before = Counter(stats.calls), Counter(stats.bytes_sent)
        tokens_before = [layer.expert_tokens.clone() for layer in layers]
        cpu_before = time.process_time()
        engine.step()
        step_cpu_s = time.process_time() - cpu_before
        phase = "decode" if engine.metrics.decode_steps > steps_before else "prefill"
        steps[phase] += 1
        cpu_s[phase] += step_cpu_s
        calls[phase].update(Counter(stats.calls) - calls_before)
        sent[phase].update(Counter(stats.bytes_sent) - sent_before)
        work[phase] += _expert_work(layers, tokens_before)
    metrics = engine.metrics
    decode_steps = max(metrics.decode_steps, 1)
    return {"prefill_s": metrics.prefill_time_s, "decode_step_s": metrics.decode_time_s / decode_steps,
            "decode_rows_per_step": metrics.decode_rows / decode_steps, "steps": dict(steps),
            "calls": {k: dict(v) for k, v in calls.items()},
            "bytes_sent": {k: dict(v) for k, v in sent.items()}, "expert_work": dict(work),
            "cpu_s": dict(cpu_s),
            "tokens": [engine.result(i).token_ids for i in ids]}


def _measure_layout(rank: int, tp: int, pcp: int, settings: Settings, model: dict, moe: MoEDims) -> dict:
    """One rank's ``{variant: {"mlp_bytes", "prefill": [per round], "decode": [per round]}}`` at TP x PCP."""
    raw = {"parallel": {"tp": tp, "pcp": pcp, "dcp": pcp, "ep": tp * pcp}, "model": model,
           "runtime": {"device": "cpu"}, "inference": {"batch_size": settings.batch, "kv_block_size": 64}}
    cfg = config_from_dict(raw, source="<bench/moe>")
    whole = initialize_model_parallel(tp=tp, pcp=pcp, dcp=pcp, num_heads=model["num_attention_heads"],
                                      num_kv_heads=model["num_kv_heads"], ep=tp * pcp, num_experts=moe.num_experts)
    sliced = _with_ep(whole, pcp) if tp > 1 else None
    engines = {}
    try:
        names = variants(tp)
        engines = {name: _engine(cfg, sliced if name == "ep_sliced" else whole, name, moe) for name in names}
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, 256, (settings.prompt_len,), generator=generator).tolist()
        batch = torch.randint(0, 256, (settings.batch, settings.decode_prompt), generator=generator).tolist()
        out = {name: {"mlp_bytes": mlp_bytes(engines[name]), "prefill": [], "decode": []} for name in names}
        for round_index in range(settings.rounds + 1):  # round 0 warms up
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                prefill = _serve(engines[name], [prompt], 1)
                decode = None if name in PREFILL_ONLY else _serve(engines[name], batch, settings.new_tokens)
                if round_index:
                    out[name]["prefill"].append(prefill)
                    out[name]["decode"].append(decode)
        return out
    finally:
        engines.clear()
        destroy_model_parallel()
        if sliced is not None:
            dist.destroy_process_group(sliced.ep_group)
            dist.destroy_process_group(sliced.etp_group)


def _measure_rank(rank: int, world_size: int, settings: Settings, model: dict, moe: MoEDims) -> dict:
    return {f"tp{tp}_pcp{pcp}": _measure_layout(rank, tp, pcp, settings, model, moe)
            for tp, pcp in LAYOUTS[world_size]}


def _phase_row(per_rank: list[dict], phase: str) -> dict:
    """One variant's ``phase`` across ranks and rounds: the slowest rank's step time per round (and their summary),
    the same of the ranks' CPU time per step (``cpu``); per rank, the bytes it sends per step by collective and its
    expert work (the same every round: the same prompts, so the last round's); the MoE bytes' max and mean over
    ranks, the other (attention) bytes' max; rank 0's MoE calls per step."""
    key = "prefill_s" if phase == "prefill" else "decode_step_s"
    times = [max(rounds[i][key] for rounds in per_rank) for i in range(len(per_rank[0]))]
    last = [rounds[-1] for rounds in per_rank]
    steps = last[0]["steps"][phase]
    by_rank = [{name: n / steps for name, n in result["bytes_sent"][phase].items()} for result in last]
    moe = [sum(n for name, n in sent.items() if name.startswith("moe_")) for sent in by_rank]
    other = [sum(n for name, n in sent.items() if not name.startswith("moe_")) for sent in by_rank]
    work = [result["expert_work"].get(phase, 0) / steps for result in last]
    cpu_times = [max(rounds[i]["cpu_s"][phase] / rounds[i]["steps"][phase] for rounds in per_rank)
                 for i in range(len(per_rank[0]))]
    return {**summarize(times), "round_times_s": times, "cpu": {**summarize(cpu_times), "round_times_s": cpu_times},
            "steps": steps, "decode_rows_per_step": last[0]["decode_rows_per_step"], "bytes_per_step_by_rank": by_rank,
            "moe_bytes_per_step_max": max(moe), "moe_bytes_per_step_mean": sum(moe) / len(moe),
            "other_bytes_per_step_max": max(other), "expert_work_per_step_by_rank": work,
            "expert_work_max_over_mean": max(work) / (sum(work) / len(work)) if any(work) else None,
            "moe_calls_per_step_rank0": {name: n / steps for name, n in last[0]["calls"][phase].items()
                                         if name.startswith("moe_")}}


def run(settings: Settings, world_sizes=(2, 4), model: dict = MODEL, moe: MoEDims = MOE) -> dict:
    """Launch every world size's layouts; returns the JSON payload (``rows``: one per layout and variant)."""
    rows = []
    for world_size in world_sizes:
        per_rank = launch(world_size, _measure_rank, settings, model, moe)
        for tp, pcp in LAYOUTS[world_size]:
            layout = f"tp{tp}_pcp{pcp}"
            by_rank = [result[layout] for result in per_rank]
            reference = by_rank[0]["ep_whole"]
            for name in variants(tp):
                runs = [r[name] for r in by_rank]
                row = {"layout": layout, "tp": tp, "pcp": pcp, "dcp": pcp, "processes": world_size,
                       "oversubscribed": world_size > 2, "variant": name,
                       "ep": {"ep_whole": tp * pcp, "ep_sliced": pcp}.get(name),
                       "mlp_bytes_per_rank": max(r["mlp_bytes"] for r in runs),
                       "prefill": _phase_row([r["prefill"] for r in runs], "prefill"),
                       "decode": None if name in PREFILL_ONLY else _phase_row([r["decode"] for r in runs], "decode")}
                if name != "dense":  # the same model as ep_whole: the same greedy tokens (rank 0, last round)
                    row["same_tokens_as_ep_whole"] = all(
                        runs[0][phase][-1]["tokens"] == reference[phase][-1]["tokens"]
                        for phase in ("prefill", "decode") if runs[0][phase][-1] is not None)
                rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["layout"] == row["layout"] and r["variant"] == "ep_whole")
        for phase in ("prefill", "decode"):
            if row[phase] is not None:
                row[f"{phase}_vs_ep_whole"] = _paired_ratio(row[phase], base[phase])
                row[f"{phase}_vs_ep_whole_mins"] = row[phase]["min_s"] / base[phase]["min_s"]
                row[f"{phase}_cpu_vs_ep_whole"] = _paired_ratio(row[phase]["cpu"], base[phase]["cpu"])
    return {"config": {"model": model, "moe": dataclasses.asdict(moe), "settings": dataclasses.asdict(settings),
                       "dtype": "float32", "threads_per_rank": 1,
                       "full_expert_bytes": _full_expert_bytes(model, moe)},
            "rows": rows}


def _paired_ratio(phase: dict, base: dict) -> float:
    """The median over rounds of ``phase``'s time over ``base``'s in the same round: the two ran one after the
    other, so a load change between rounds cancels (a ratio of medians would mix rounds)."""
    return statistics.median(t / b for t, b in zip(phase["round_times_s"], base["round_times_s"]))


def _full_expert_bytes(model: dict, moe: MoEDims) -> int:
    """Every routed expert of every MoE layer, float32: 3 matrices of hidden x ffn (gate, up, down)."""
    return sum(moe.moe_layers) * moe.num_experts * 3 * model["hidden_size"] * moe.ffn_hidden_size * 4


def table(payload: dict) -> str:
    """Two markdown tables, prefill then decode (the replicated experts have no decode row)."""
    hidden = payload["config"]["model"]["hidden_size"]

    def layout(row: dict) -> str:
        return row["layout"] + (" (4 procs, 2 cores)" if row["oversubscribed"] else "")

    def cells(row: dict, phase: str, flop_unit: float) -> list:
        stats, dense = row[phase], row["variant"] == "dense"
        work = max(stats["expert_work_per_step_by_rank"]) * 6 * hidden / flop_unit
        return [f"{stats['median_s'] * 1e3:.1f} ({stats['min_s'] * 1e3:.0f}-{stats['max_s'] * 1e3:.0f})",
                f"{row[f'{phase}_vs_ep_whole']:.2f} ({row[f'{phase}_vs_ep_whole_mins']:.2f})",
                f"{stats['cpu']['median_s'] * 1e3:.1f} ({stats['cpu']['min_s'] * 1e3:.0f}-{stats['cpu']['max_s'] * 1e3:.0f})",
                f"{row[f'{phase}_cpu_vs_ep_whole']:.2f}",
                "-" if dense else f"{stats['moe_bytes_per_step_max'] / 2 ** 10:,.0f}",
                f"{stats['other_bytes_per_step_max'] / 2 ** 10:,.0f}",
                "-" if dense else f"{work:.2f} ({stats['expert_work_max_over_mean']:.2f})",
                row.get("same_tokens_as_ep_whole", "-")]

    prefill = [[layout(r), r["variant"], r["ep"] or "-", f"{r['mlp_bytes_per_rank'] / 2 ** 20:.1f}",
                *cells(r, "prefill", 1e9)] for r in payload["rows"]]
    decode = [[layout(r), r["variant"], r["ep"] or "-", *cells(r, "decode", 1e6)]
              for r in payload["rows"] if r["decode"] is not None]
    sent = ["MoE KiB sent/rank", "attention KiB sent/rank"]
    return "\n\n".join([
        format_table(["layout", "variant", "EP", "MLP MiB/rank", "prefill ms (min-max)", "/ ep_whole (mins)", "CPU ms (min-max)",
                      "CPU / ep_whole", *sent,
                      "expert GFLOP/rank (max/mean)", "same tokens"], prefill),
        format_table(["layout", "variant", "EP", "decode step ms (min-max)", "/ ep_whole (mins)",
                      "CPU ms (min-max)", "CPU / ep_whole",
                      *[f"{name}/step" for name in sent], "expert MFLOP/rank/step (max/mean)", "same tokens"],
                     decode)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="prompt 512, 2 rounds, 9 new tokens")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 9; quick 2)")
    parser.add_argument("--prompt-len", type=int, help="prefill prompt tokens (default 2048; quick 512)")
    parser.add_argument("--decode-prompt", type=int, help="tokens of each decode request's prompt (default 256)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per decode request (default 17; quick 9)")
    parser.add_argument("--world-sizes", type=int, nargs="+", choices=sorted(LAYOUTS), default=sorted(LAYOUTS))
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    base = Settings(prompt_len=512, rounds=2, new_tokens=9) if args.quick else Settings()
    settings = dataclasses.replace(base, **{name: value for name, value in (
        ("rounds", args.rounds), ("prompt_len", args.prompt_len), ("decode_prompt", args.decode_prompt),
        ("new_tokens", args.new_tokens)) if value is not None})
    before = machine_info()
    payload = run(settings, tuple(args.world_sizes))
    print(table(payload))
    print(f"wrote {write_json('moe', payload, before, args.results_dir)}")
    return 0 if all(r.get("same_tokens_as_ep_whole", True) for r in payload["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
