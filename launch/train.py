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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cptoolkit.config import load_config  # noqa: E402
from cptoolkit.distributed import env_rank, init_distributed, run_main, start_groups  # noqa: E402

LOG = logging.getLogger("cptoolkit")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config with a 'train' section")
    parser.add_argument("--output", help="write per-step loss, lr, grad norm and tokens/s as JSON here")
    parser.add_argument("--verbose", action="store_true", help="every rank logs; third-party warnings shown")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)  # before megatron is imported: a bad config fails in a second
    from cptoolkit.models.checkpoint import save_checkpoint
    from cptoolkit.models.tokenizer import ByteTokenizer, load_tokenizer
    from cptoolkit.parallel_state import render_layout
    from cptoolkit.training.data import corpus_documents, tokenize_documents
    from cptoolkit.training.trainer import build_trainer, validate_train_config

    config_dir = Path(cfg.source).parent
    tokenizer = load_tokenizer(cfg.model.checkpoint) if cfg.model.checkpoint else ByteTokenizer()
    validate_train_config(cfg, tokenizer.vocab_size)
    documents = tokenize_documents(corpus_documents(cfg.train, config_dir), tokenizer)
    device = init_distributed(cfg.runtime, cfg.parallel.world_size, cfg.source)
    p, m, train = cfg.parallel, cfg.model, cfg.train
    groups = start_groups(cfg)
    # Padding is masked out of the loss, so any valid id pads; EOS exists in every tokenizer.
    trainer = build_trainer(cfg, groups, documents, tokenizer.eos_token_id, device)
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


if __name__ == "__main__":
    arguments = parse_args()
    run_main(lambda: main(arguments), verbose=arguments.verbose)
