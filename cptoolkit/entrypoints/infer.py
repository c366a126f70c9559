"""Generate text with a TP x PCP x DCP layout.

    torchrun --nproc-per-node N launch/infer.py --config configs/tp2_pcp2_dcp4.yaml [--output result.json]

arguments → YAML → config → groups → engine → report. Rank 0 prints the layout, progress, every
request's text and a metrics table; ``--output`` writes the same as JSON.

Exit status: 0 when every request finished; 3 when any request failed (each failure is in the text
and the JSON, and the others still ran); 2 for a bad config, checkpoint or prompt file (one line);
1 for anything else (a traceback, and the whole job ends).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from cptoolkit.config import Config, ConfigError, load_config

LOG = logging.getLogger("cptoolkit")
REQUESTS_FAILED = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags besides ``--config`` (``cptoolkit generate`` has them too)."""
    parser.add_argument("--output", help="write prompts, token ids, texts and metrics as JSON here")
    parser.add_argument("--verbose", action="store_true", help="every rank logs; third-party warnings shown")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config with an 'inference' section")
    add_arguments(parser)
    return parser.parse_args(argv)


def metrics_table(metrics: dict) -> str:
    rows = [("prompt tokens", f"{metrics['prompt_tokens']}"),
            ("generated tokens", f"{metrics['generated_tokens']}"),
            ("prefill time", f"{metrics['prefill_time_s'] * 1e3:.1f} ms"),
            ("decode tokens/s", f"{metrics['decode_tokens_per_s']:.1f}"),
            ("KV cache per rank", f"{metrics['kv_bytes_per_rank']:,} bytes ({metrics['kv_blocks_per_rank']} "
                                  f"blocks of {metrics['kv_block_tokens']} tokens)"),
            ("collectives per decode step", f"{metrics['collectives_per_decode_step']:.1f} "
                                            f"({metrics['attention_collectives_per_layer_step']:.1f} per layer)")]
    if metrics["draft_tokens"]:
        rows.append(("speculative decoding", f"{metrics['draft_acceptance_rate']:.1%} of {metrics['draft_tokens']} "
                                             f"drafts accepted, {metrics['tokens_per_request_step']:.2f} tokens per "
                                             "request and step"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def check(cfg: Config) -> None:
    """Refuse a config without an ``inference`` section."""
    if cfg.inference is None:
        raise ConfigError(f"{cfg.source}: launch/infer.py needs an 'inference' section (this is a train config)")


def run(cfg: Config, args: argparse.Namespace) -> int:
    """This rank's part of generating for every request of ``cfg`` (checked); the exit status. In ``--output``
    each request has its ``prompt`` (text; null for a chat) and ``messages`` (the chat's conversation; null for a
    prompt)."""
    from cptoolkit.distributed import end_startup, env_rank, init_distributed, start_groups
    from cptoolkit.inference.builder import build_engine, read_prompts, sampling_params
    from cptoolkit.parallel_state import render_layout

    prompts = read_prompts(cfg)
    device = init_distributed(cfg.runtime, cfg.parallel.world_size, cfg.source)
    m = cfg.model
    groups = start_groups(cfg)
    engine = build_engine(cfg, groups, device, requests=prompts)
    end_startup(groups, cfg.runtime)
    LOG.info("model: %s, %d layers, hidden %d; KV cache %s bytes per rank; %d requests",
             m.arch, m.num_layers, m.hidden_size, f"{engine.cache.bytes_per_rank:,}", len(prompts))
    finished, generated = [], [0]

    def show_progress(event):
        generated[0] += event.token_id is not None
        if event.token_id is not None and generated[0] % 16 == 0:
            LOG.info("generated %d tokens, %d/%d requests finished", generated[0], len(finished), len(prompts))
        if event.finish_reason is not None:
            finished.append(event.request_index)
            LOG.info("request %d finished (%s) [%d/%d]", event.request_index, event.finish_reason,
                     len(finished), len(prompts))

    results = engine.generate(prompts, sampling_params(cfg), on_event=show_progress)
    chats = cfg.inference.messages or [None] * len(results)  # the conversation of each chat request
    for result in results:
        shown = f"error: {result.error}" if result.error else repr(result.text)
        asked = result.prompt if chats[result.request_index] is None else chats[result.request_index][-1]["content"]
        LOG.info("--- request %d: %r\n    -> %s", result.request_index, asked, shown)
    metrics = {**engine.metrics.summary(engine.cache.bytes_per_rank, m.num_layers),
               "kv_blocks_per_rank": engine.cache.num_blocks, "kv_block_tokens": engine.cache.block_size}
    LOG.info("\n%s", metrics_table(metrics))
    if args.output and env_rank() == 0:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({
            "config": {"source": cfg.source, **dataclasses.asdict(cfg)},
            "layout": render_layout(groups.layout),
            "requests": [{"prompt": r.prompt, "messages": chats[r.request_index],
                          "prompt_token_ids": r.prompt_token_ids, "token_ids": r.token_ids,
                          "text": r.text, "finish_reason": r.finish_reason, "error": r.error,
                          "metrics": r.metrics.to_dict()} for r in results],
            "metrics": metrics}, indent=2))
        LOG.info("wrote %s", args.output)
    failed = [r.request_index for r in results if r.error]
    if failed and env_rank() == 0:
        LOG.error("%d of %d requests failed (requests %s); exit status %d", len(failed), len(results),
                  ", ".join(map(str, failed)), REQUESTS_FAILED)
    return REQUESTS_FAILED if failed else 0


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)  # before megatron is imported: a bad config fails in a second
    check(cfg)
    return run(cfg, args)


def launch(argv=None) -> None:
    """``launch/infer.py`` and ``python -m cptoolkit.entrypoints.infer``: parse the flags, run this rank, exit."""
    from cptoolkit.distributed import run_main

    args = parse_args(argv)
    run_main(lambda: main(args), verbose=args.verbose)


if __name__ == "__main__":
    launch()
