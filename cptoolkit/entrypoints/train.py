"""Train a GPT with TP x PCP (x DP) prefill context parallelism.

    torchrun --nproc-per-node N launch/train.py --config configs/train_tp2_pcp2.yaml [--output losses.json]

arguments → YAML → config → corpus → groups → trainer → losses and checkpoint. Rank 0 prints the
layout and one progress line per step; ``--output`` writes every step's loss, learning rate, gradient
norm and tokens/s as JSON; with ``train.save_dir`` the trained weights are saved as a cptoolkit
checkpoint (loadable by launch/infer.py through ``model.checkpoint``, at any TP x PCP x DCP layout).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from cptoolkit.config import Config, load_config

LOG = logging.getLogger("cptoolkit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags besides ``--config`` (``cptoolkit train`` has them too)."""
    parser.add_argument("--output", help="write per-step loss, lr, grad norm and tokens/s as JSON here")
    parser.add_argument("--verbose", action="store_true", help="every rank logs; third-party warnings shown")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config with a 'train' section")
    add_arguments(parser)
    return parser.parse_args(argv)


def _tokenizer(cfg: Config):
    from cptoolkit.models.tokenizer import ByteTokenizer, load_tokenizer

    return load_tokenizer(cfg.model.checkpoint) if cfg.model.checkpoint else ByteTokenizer()


def check(cfg: Config) -> None:
    """Refuse a config without a ``train`` section or whose model cannot train on the tokenizer's ids
    (``validate_train_config``; imports megatron)."""
    from cptoolkit.training.trainer import validate_train_config

    validate_train_config(cfg, _tokenizer(cfg).vocab_size)


def run(cfg: Config, args: argparse.Namespace) -> int:
    """This rank's part of training ``cfg`` (checked), then the checkpoint and ``--output``; 0."""
    from cptoolkit.distributed import end_startup, env_rank, init_distributed, start_groups
    from cptoolkit.models.checkpoint import save_checkpoint
    from cptoolkit.parallel_state import render_layout
    from cptoolkit.training.data import corpus_documents, tokenize_documents
    from cptoolkit.training.trainer import build_trainer

    config_dir = Path(cfg.source).parent
    tokenizer = _tokenizer(cfg)
    documents = tokenize_documents(corpus_documents(cfg.train, config_dir), tokenizer)
    device = init_distributed(cfg.runtime, cfg.parallel.world_size, cfg.source)
    p, m, train = cfg.parallel, cfg.model, cfg.train
    groups = start_groups(cfg)
    # Padding is masked out of the loss, so any valid id pads; EOS exists in every tokenizer.
    trainer = build_trainer(cfg, groups, documents, tokenizer.eos_token_id, device)
    end_startup(groups, cfg.runtime)
    LOG.info("model: %s, %d layers, hidden %d; corpus: %d documents, %d tokens; global batch %d x <= %d tokens",
             m.arch, m.num_layers, m.hidden_size, len(documents), sum(d.numel() for d in documents),
             p.dp * train.micro_batch_size, train.seq_len)
    history = trainer.run()
    if train.save_dir is not None:
        save_dir = Path(train.save_dir) if Path(train.save_dir).is_absolute() else config_dir / train.save_dir
        save_checkpoint(trainer.model, save_dir, tokenizer)
        LOG.info("checkpoint saved to %s", save_dir)
    if args.output and env_rank() == 0:
        Path(args.output).write_text(json.dumps({
            "config": {"source": cfg.source, **dataclasses.asdict(cfg)},
            "layout": render_layout(groups.layout),
            "steps": [dataclasses.asdict(metrics) for metrics in history]}, indent=2))
    return 0


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)  # before megatron is imported: a bad config fails in a second
    check(cfg)
    return run(cfg, args)


def launch(argv=None) -> None:
    """``launch/train.py`` and ``python -m cptoolkit.entrypoints.train``: parse the flags, run this rank, exit."""
    from cptoolkit.distributed import run_main

    args = parse_args(argv)
    run_main(lambda: main(args), verbose=args.verbose)


if __name__ == "__main__":
    launch()
