"""Serve the OpenAI completions API from a TP x PCP x DCP engine.

    torchrun --nproc-per-node 4 launch/serve.py --config configs/tp2_pcp2_dcp4.yaml --host 127.0.0.1 --port 8000
    python launch/serve.py --config configs/tp1_pcp1_dcp1.yaml --port 8000          # one rank

arguments → YAML → config → groups → engine → serve. Global rank 0 answers HTTP; every rank runs the
same engine loop (``cptoolkit.serving``). The config's ``inference`` section sizes the engine (batch
size, ``max_seq_len``, KV cache, chunked prefill, prefix caching); its prompts and sampling fields are
not used: each request brings its own.

SIGTERM (or Ctrl-C) to rank 0 — or to every rank — drains: new requests get 503, requests in flight
finish (those left after ``--drain-timeout-s`` are cancelled), then every rank exits 0.

Exit status: 0 after a drain; 2 for a bad config or checkpoint (one line); 1 for anything else, e.g.
a rank that died (the others answer 503 and end within about ``runtime.collective_timeout_s``).
"""
from __future__ import annotations

import argparse

from cptoolkit.config import Config, ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags besides ``--config`` (``cptoolkit serve`` has them too)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--served-model-name", "--model-name", dest="served_model_name",
                        help="the name /v1/models lists and requests must use "
                             "(default: the checkpoint directory's, or cptoolkit-<arch>)")
    parser.add_argument("--drain-timeout-s", type=float, default=20.0,
                        help="on SIGTERM, cancel requests still running after this long (default 20)")
    parser.add_argument("--verbose", action="store_true", help="every rank logs; third-party warnings shown")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config with an 'inference' section")
    add_arguments(parser)
    return parser.parse_args(argv)


def check(cfg: Config) -> None:
    """Refuse a config without an ``inference`` section, or with more than one model replica."""
    if cfg.inference is None:
        raise ConfigError(f"{cfg.source}: launch/serve.py needs an 'inference' section (this is a train config)")
    if cfg.parallel.dp != 1:
        raise ConfigError(f"{cfg.source}: parallel.dp = {cfg.parallel.dp}: launch/serve.py serves one model "
                          "replica; set dp to 1 and start one server per replica")


def run(cfg: Config, args: argparse.Namespace) -> int:
    """This rank's part of serving ``cfg`` (checked) until a drain; 0."""
    from cptoolkit.distributed import init_distributed, start_groups
    from cptoolkit.inference.builder import build_engine
    from cptoolkit.serving.server import model_name, serve

    device = init_distributed(cfg.runtime, cfg.parallel.world_size, cfg.source)
    groups = start_groups(cfg)
    engine = build_engine(cfg, groups, device)
    serve(cfg, engine, args.host, args.port, args.served_model_name or model_name(cfg), args.drain_timeout_s)
    return 0


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)  # before megatron is imported: a bad config fails in a second
    check(cfg)
    return run(cfg, args)


def launch(argv=None) -> None:
    """``launch/serve.py`` and ``python -m cptoolkit.entrypoints.serve``: parse the flags, run this rank, exit."""
    from cptoolkit.distributed import run_main

    args = parse_args(argv)
    run_main(lambda: main(args), verbose=args.verbose)


if __name__ == "__main__":
    launch()
