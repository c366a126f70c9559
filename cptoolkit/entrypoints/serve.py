"""Serve the OpenAI completions API from a TP x PCP x DCP engine.

    torchrun --nproc-per-node 4 launch/serve.py --config configs/tp2_pcp2_dcp4.yaml --host 127.0.0.1 --port 8000
    python launch/serve.py --config configs/tp1_pcp1_dcp1.yaml --port 8000          # one rank

arguments → YAML → config → groups → engine → serve. Global rank 0 answers HTTP; every rank runs the
same engine loop (``cptoolkit.serving``). The config's ``inference`` section sizes the engine (batch
size, ``max_seq_len``, KV cache, chunked prefill, prefix caching); its prompts and sampling fields are
not used: each request brings its own.

Limits and keys (global rank 0 enforces them; defaults in ``cptoolkit.serving.app``): ``--api-key KEY``
or the environment variable ``CPTOOLKIT_API_KEY`` makes every ``/v1/*`` route answer 401 without
``Authorization: Bearer KEY`` (``/health``, ``/metrics`` and ``/openapi.json`` stay open; prefer the
variable: a flag's value shows in ``ps``); ``--max-request-bytes`` (4 MiB: larger bodies are a 413),
``--max-sequences-per-request`` (256 prompts x n), ``--health-stall-s`` (30: ``/health`` answers 503 once
the engine loop has made no progress for this long).

SIGTERM (or Ctrl-C) to rank 0 — or to every rank — drains: new requests get 503, requests in flight
finish (those left after ``--drain-timeout-s`` are cancelled), then every rank exits 0.

Exit status: 0 after a drain; 2 for a bad config or checkpoint (one line); 1 for anything else, e.g.
a rank that died (the others answer 503 and end within about ``runtime.collective_timeout_s``).
"""
from __future__ import annotations

import argparse
import os

from cptoolkit.config import Config, ConfigError, load_config

API_KEY_ENV = "CPTOOLKIT_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags besides ``--config`` (``cptoolkit serve`` has them too)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--served-model-name", "--model-name", dest="served_model_name",
                        help="the name /v1/models lists and requests must use "
                             "(default: the checkpoint directory's, or cptoolkit-<arch>)")
    parser.add_argument("--drain-timeout-s", type=float, default=20.0,
                        help="on SIGTERM, cancel requests still running after this long (default 20)")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1/* (401 without; /health, "
                                          f"/metrics, /openapi.json stay open); default: ${API_KEY_ENV}, which "
                                          "keeps the key out of ps")
    parser.add_argument("--max-request-bytes", type=int,
                        help="refuse larger request bodies with 413, before reading them (default 4 MiB)")
    parser.add_argument("--max-sequences-per-request", type=int,
                        help="refuse requests of more sequences (prompts x n) with 400 (default 256)")
    parser.add_argument("--health-stall-s", type=float,
                        help="/health answers 503 once the engine loop has made no progress for this long "
                             "(default 30)")
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


def http_options(args: argparse.Namespace):
    """The flags' ``HTTPOptions`` (the key from ``--api-key``, else ``$CPTOOLKIT_API_KEY``); a bad value is a
    ``ConfigError`` naming the flag."""
    from cptoolkit.serving.app import HTTPOptions

    given = {name: getattr(args, name) for name in ("max_request_bytes", "max_sequences_per_request", "health_stall_s")
             if getattr(args, name) is not None}
    try:
        return HTTPOptions(api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV), **given)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run(cfg: Config, args: argparse.Namespace) -> int:
    """This rank's part of serving ``cfg`` (checked) until a drain; 0."""
    from cptoolkit.distributed import end_startup, init_distributed, start_groups
    from cptoolkit.inference.builder import build_engine
    from cptoolkit.serving.server import model_name, serve

    options = http_options(args)  # before the model loads: a bad flag fails in a second
    device = init_distributed(cfg.runtime, cfg.parallel.world_size, cfg.source)
    groups = start_groups(cfg)
    engine = build_engine(cfg, groups, device)
    end_startup(groups, cfg.runtime)
    serve(cfg, engine, args.host, args.port, args.served_model_name or model_name(cfg), args.drain_timeout_s,
          options)
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
