"""Speculative decoding (prompt lookup, draft model) vs plain decoding: accepted drafts, tokens per step, speed-up.

The repository's two trained reference checkpoints (``checkpoints/tiny-gqa``, ``tiny-mqa``), greedy, 32 new
tokens, on 1 rank and on TP1 x PCP2 x DCP2 (2 ranks, one core each); the 4 prompts one at a time (batch 1: a
request's own latency) and all at once (batch 4: a step lasts until its slowest row, so a request without
drafts sets the pace). Two workloads:

- ``repeating``: each prompt followed by its own greedy continuation and itself again, the regime prompt
  lookup is for (a document quoted back, code edited in place, retrieval answers): drafts come from the
  earlier copy;
- ``fresh``: the short prompts alone, where lookup finds little and rejected drafts are the cost.

For each: decode tokens/s of plain decoding and of speculative decoding with ``k`` drafts (engine metrics:
decode time only, the slowest rank), measured in interleaved repetitions in one process (the same engine, its
proposer switched on and off), the draft acceptance rate, tokens per request and step, and whether the tokens
equal plain decoding's (they must). Two draft sources (``method``): ``ngram`` (prompt lookup, n-gram 3..1) and
``draft_model``: a checkpoint of the target's embedding, first ``DRAFT_LAYERS`` layer(s), final norm and output
layer (``first_layers``), on the same ranks and layout, switched on and off in the same engine.

    python bench/speculative.py [--quick] [--k 2 4 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/speculative.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from bench.common import (RESULTS_DIR, add_results_dir_argument, format_table, launch, machine_info, new_figure,
                          save_figure, summarize, write_json)
from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.metrics import EngineMetrics
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.inference.speculative import NgramProposer
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = ("tiny-gqa", "tiny-mqa")
BASE_PROMPTS = ["The cat sat on", "12 + 7 =", "one two three", "A red ball"]
NEW_TOKENS = 32
LAYOUTS = {1: (1, 1, 1), 2: (1, 2, 2)}  # world size -> (tp, pcp, dcp)
DRAFT_LAYERS = 1  # the draft model: the target's first layer(s)


def first_layers(checkpoint: Path, num_layers: int, out_dir: Path) -> Path:
    """``out_dir``: a cptoolkit checkpoint of ``checkpoint``'s (a cptoolkit checkpoint's) embedding, first
    ``num_layers`` layers, final norm and output layer; the rest of its config.json unchanged. A draft that agrees
    with its target far more often than an independent random model (layer skipping), at a fraction of its cost."""
    config = json.loads((checkpoint / "config.json").read_text())
    if not 1 <= num_layers <= config["num_hidden_layers"]:
        raise ValueError(f"num_layers = {num_layers}: must be in [1, {config['num_hidden_layers']}] (the layers of "
                         f"{checkpoint})")
    kept = {name: tensor for name, tensor in load_file(checkpoint / "model.safetensors").items()
            if not name.startswith("decoder.layers.") or int(name.split(".")[2]) < num_layers}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(kept, out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": num_layers}, indent=2) + "\n")
    return out_dir


def _timed(engine, prompts, proposer, batch: int, draft=None) -> tuple[list[list[int]], EngineMetrics]:
    """Generate for ``prompts``, ``batch`` at a time, with ``proposer`` or ``draft`` (a ``DraftModel``) or
    neither; the tokens and the engine's metrics summed over batches."""
    engine.runner.proposer, engine.caches.draft, total, tokens = proposer, draft, EngineMetrics(), []
    for start in range(0, len(prompts), batch):
        engine.metrics = EngineMetrics()
        dist.barrier()
        results = engine.generate(prompts[start:start + batch],
                                  SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS))
        tokens += [r.token_ids for r in results]
        for name in ("decode_time_s", "decode_tokens", "decode_rows", "decode_steps", "draft_tokens",
                     "accepted_draft_tokens"):
            setattr(total, name, getattr(total, name) + getattr(engine.metrics, name))
    return tokens, total


def _rank(rank: int, world_size: int, checkpoint: str, ks: list[int], reps: int, draft_dir: str) -> dict:
    tp, pcp, dcp = LAYOUTS[world_size]
    cfg = config_from_dict({"parallel": dict(tp=tp, pcp=pcp, dcp=dcp),
                            "model": {"checkpoint": str(REPO / "checkpoints" / checkpoint)},
                            "runtime": {"device": "cpu"},
                            "inference": {"prompts": ["x"], "batch_size": len(BASE_PROMPTS), "max_seq_len": 256,
                                          "speculative_method": "draft_model", "speculative_model": draft_dir,
                                          "num_speculative_tokens": max(ks)}},
                           source="<bench/speculative>")
    groups = initialize_model_parallel(tp=tp, pcp=pcp, dcp=dcp, num_heads=cfg.model.num_attention_heads,
                                       num_kv_heads=cfg.model.num_kv_heads)
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        draft = engine.caches.draft  # switched on per variant (``_timed``); its drafts per step set per variant
        base = [engine.tokenizer.encode(p) for p in BASE_PROMPTS]
        continuations, _ = _timed(engine, base, None, len(base))
        workloads = {"repeating": [b + c + b for b, c in zip(base, continuations)], "fresh": base}
        out = {}
        for (workload, prompts), batch in [(w, b) for w in workloads.items() for b in (1, len(BASE_PROMPTS))]:
            runs = {"plain": []} | {k: [] for k in ks} | {f"draft{k}": [] for k in ks}
            for _ in range(reps):  # interleaved: every variant once per repetition
                for variant in runs:
                    proposer = NgramProposer(variant, 1, 3) if isinstance(variant, int) else None
                    if str(variant).startswith("draft"):
                        draft.num_tokens = int(variant[len("draft"):])
                    runs[variant].append(_timed(engine, prompts, proposer, batch,
                                                draft if str(variant).startswith("draft") else None))
            out[workload, batch] = {str(variant): {"tokens": measured[-1][0],
                                            "decode_time_s": [m.decode_time_s for _, m in measured],
                                            "decode_tokens": measured[-1][1].decode_tokens,
                                            "decode_rows": measured[-1][1].decode_rows,
                                            "decode_steps": measured[-1][1].decode_steps,
                                            "draft_tokens": measured[-1][1].draft_tokens,
                                            "accepted": measured[-1][1].accepted_draft_tokens}
                             for variant, measured in runs.items()}
        return out
    finally:
        destroy_model_parallel()


def run(ks: list[int], reps: int) -> dict:
    rows = []
    for checkpoint in CHECKPOINTS:
        with tempfile.TemporaryDirectory() as tmp:
            draft_dir = str(first_layers(REPO / "checkpoints" / checkpoint, DRAFT_LAYERS, Path(tmp) / "draft"))
            for world_size, layout in LAYOUTS.items():
                per_rank = launch(world_size, _rank, checkpoint, ks, reps, draft_dir)
                for (workload, batch), variants in per_rank[0].items():
                    def seconds(variant: str) -> dict:
                        return summarize([max(r[workload, batch][variant]["decode_time_s"][i] for r in per_rank)
                                          for i in range(reps)])
                    plain = variants["plain"]
                    plain_time = seconds("plain")
                    for method, k in [(m, k) for m in ("ngram", "draft_model") for k in ks]:
                        variant = str(k) if method == "ngram" else f"draft{k}"
                        spec = variants[variant]
                        spec_time = seconds(variant)
                        rows.append({
                            "checkpoint": checkpoint, "layout": "TPxPCPxDCP " + "x".join(map(str, layout)),
                            "world_size": world_size, "workload": workload, "batch": batch, "method": method, "k": k,
                            "plain_tokens_per_s": plain["decode_tokens"] / plain_time["median_s"],
                            "speculative_tokens_per_s": spec["decode_tokens"] / spec_time["median_s"],
                            "speedup": plain_time["median_s"] / spec_time["median_s"],
                            "acceptance_rate": spec["accepted"] / spec["draft_tokens"] if spec["draft_tokens"] else 0.0,
                            "tokens_per_request_step": spec["decode_tokens"] / max(spec["decode_rows"], 1),
                            "decode_steps": {"plain": plain["decode_steps"], "speculative": spec["decode_steps"]},
                            "same_tokens": spec["tokens"] == plain["tokens"],
                            "plain_decode": plain_time, "speculative_decode": spec_time})
    return {"config": {"checkpoints": CHECKPOINTS, "batch": len(BASE_PROMPTS), "new_tokens": NEW_TOKENS,
                       "greedy": True, "reps": reps, "ks": ks, "prompt_lookup": [1, 3],
                       "draft_model": f"the target's first {DRAFT_LAYERS} layer(s)",
                       "threads_per_rank": 1},
            "rows": rows}


def table(payload: dict) -> str:
    rows = [[r["checkpoint"], r["layout"], r["workload"], r["batch"], r["method"], r["k"],
             f"{r['plain_tokens_per_s']:.0f}",
             f"{r['speculative_tokens_per_s']:.0f}", f"{r['speedup']:.2f}x", f"{r['acceptance_rate']:.0%}",
             f"{r['tokens_per_request_step']:.2f}",
             f"{r['decode_steps']['plain']} → {r['decode_steps']['speculative']}", r["same_tokens"]]
            for r in payload["rows"]]
    return format_table(["checkpoint", "layout", "workload", "batch", "method", "k", "plain tok/s", "speculative tok/s",
                         "speed-up", "drafts accepted", "tokens/request/step", "decode steps", "same tokens"], rows)


def plot(payload: dict, results_dir: Path = RESULTS_DIR) -> Path:
    fig, ax = new_figure("Speculative decoding (prompt lookup, draft model) vs plain, greedy",
                         "draft tokens per step (k)", "decode speed-up over plain")
    def key_of(r: dict) -> tuple:
        return r["checkpoint"], r["layout"], r["workload"], r["batch"], r.get("method", "ngram")
    for key in dict.fromkeys(key_of(r) for r in payload["rows"]):
        points = [r for r in payload["rows"] if key_of(r) == key]
        ax.plot([r["k"] for r in points], [r["speedup"] for r in points], "o-" if key[2] == "repeating" else "s--",
                label=" ".join(map(str, key[:3])) + f" batch {key[3]} {key[4]}")
    ax.axhline(1.0, linestyle=":", color="grey")
    ax.legend(fontsize=7)
    return save_figure(fig, "speculative", results_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k = 4 only, 2 repetitions")
    parser.add_argument("--k", type=int, nargs="+", help="draft tokens per step to measure (default 2 4 8)")
    parser.add_argument("--reps", type=int, help="repetitions (default 2 quick, 3 full)")
    add_results_dir_argument(parser)
    args = parser.parse_args(argv)
    before = machine_info()
    payload = run(args.k or ([4] if args.quick else [2, 4, 8]), args.reps or (2 if args.quick else 3))
    print(table(payload))
    print(f"wrote {write_json('speculative', payload, before, args.results_dir)} and "
          f"{plot(payload, args.results_dir)}")
    return 0 if all(r["same_tokens"] for r in payload["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
