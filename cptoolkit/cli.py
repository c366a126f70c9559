"""The ``cptoolkit`` command: vLLM's flag names over cptoolkit's YAML configs and jobs.

    cptoolkit serve [MODEL] [--config YAML] [-tp N] [-pcp N] [-dcp N] [--max-num-seqs N] [--port 8000] ...
    cptoolkit generate [MODEL] [--config YAML] --prompt TEXT [--prompt TEXT ...] [--max-tokens N] ...
    cptoolkit generate MODEL [--system TEXT] --message TEXT [--message TEXT ...] | --chat FILE.json ...
    cptoolkit train [MODEL] [--config YAML] [-tp N] [-pcp N] [-dp N] [--output losses.json]
    cptoolkit layout [MODEL] [--config YAML] -tp 2 -pcp 2 -dcp 4 [-ep 4] [--legend] [--nproc-per-node N]
    cptoolkit plan --model llama3.1-8b --context 131072 ...      (the flags of python -m cptoolkit.plan)
    cptoolkit chat [--url http://127.0.0.1:8000/v1] [--model NAME] [--system TEXT] [--quick MESSAGE]
    cptoolkit upcycle --checkpoint DENSE_DIR --experts 4 --top-k 2 [--seed 0] --output MOE_DIR

Each flag of ``JOB_FLAGS`` sets one config field over the ``--config`` YAML (or over the config dataclasses'
defaults without one); MODEL, a checkpoint directory, is ``model.checkpoint`` and replaces the YAML's model
shape. The merged config is validated as a file is (``cptoolkit.config``): a bad value is one line naming the
field, the value and the rule, exit status 2. ``serve``, ``generate`` and ``train`` run the jobs of
``cptoolkit.entrypoints`` (what ``launch/*.py`` run) on dp*pcp*tp ranks: one rank in this process, more under
torchrun on the merged config, which the ranks read from this process's memory (no file is left behind;
``cptoolkit.torchrun``: SIGTERM and SIGINT go to the ranks, so a drained server exits 0; torchrun and the ranks
end when this process dies, by any signal).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import yaml

from cptoolkit import chat_client
from cptoolkit.config import Config, ConfigError, config_from_dict, model_moe, read_yaml, with_overrides


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config field, ``section.name``."""

    names: tuple[str, ...]
    field: str
    help: str
    type: Callable[[str], Any] = int
    action: str | type[argparse.Action] = "store"

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        typed = {} if self.action is argparse.BooleanOptionalAction else {"type": self.type}
        parser.add_argument(*self.names, dest=self.dest, action=self.action, default=None,
                            help=f"{self.help} [{self.field}]", **typed)

    @property
    def dest(self) -> str:
        return self.names[0].lstrip("-").replace("-", "_")


TP = Flag(("--tensor-parallel-size", "-tp"), "parallel.tp", "tensor-parallel ranks: shard the heads and the MLP")
PCP = Flag(("--prefill-context-parallel-size", "-pcp"), "parallel.pcp",
           "prefill context-parallel ranks: shard the prompt's tokens (DualChunkSwap)")
DCP = Flag(("--decode-context-parallel-size", "-dcp"), "parallel.dcp",
           "decode context-parallel ranks: shard the KV cache; k*pcp with k dividing tp")
DP = Flag(("--data-parallel-size", "-dp"), "parallel.dp", "data-parallel replicas")
EP = Flag(("--expert-parallel-size", "-ep", "--ep"), "parallel.ep",
          "expert-parallel ranks of an MoE model: shard its routed experts; k*pcp with k dividing tp (default pcp)")
INTERLEAVE = Flag(("--dcp-kv-cache-interleave-size", "--cp-kv-cache-interleave-size"), "parallel.kv_interleave",
                  "consecutive token positions per DCP shard")
MAX_MODEL_LEN = Flag(("--max-model-len",), "inference.max_seq_len",
                     "prompt + generated tokens per request, at most the model's length")
MAX_NUM_SEQS = Flag(("--max-num-seqs",), "inference.batch_size", "requests the engine runs at once")
PREFIX_CACHING = Flag(("--enable-prefix-caching",), "inference.prefix_caching",
                      "reuse the KV blocks of prompt prefixes seen before", action=argparse.BooleanOptionalAction)
MAX_NUM_BATCHED_TOKENS = Flag(("--max-num-batched-tokens",), "inference.prefill_chunk_size",
                              "chunked prefill: prefill a prompt this many tokens per step (a multiple of "
                              "interleave*dcp)")
MODEL_SEED = Flag(("--seed",), "model.seed",
                  "seed of the built-in model's random weights (requests bring their own sampling seeds)")
SAMPLING_SEED = Flag(("--seed",), "inference.seed", "sampling seed")
TRAIN_SEED = Flag(("--seed",), "train.seed", "seed of the generated corpus and of the batches drawn from it")
PROMPT = Flag(("--prompt",), "inference.prompts", "a prompt to generate for; repeat the flag for several",
              type=str, action="append")
MAX_TOKENS = Flag(("--max-tokens",), "inference.max_new_tokens", "tokens to generate per prompt")


def _size(text: str) -> int:
    """``2GiB``, ``512MiB``, ``1.5GB`` or a number of bytes (``cptoolkit plan``'s sizes)."""
    from cptoolkit.plan import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or a number with a unit such as "
                                         "2GiB, 512MiB or 1.5GB") from None


KV_CACHE_MEMORY = Flag(("--kv-cache-memory",), "inference.kv_cache_bytes",
                       "KV cache per rank, in bytes (2GiB, 512MiB, ...); default: room for --max-num-seqs requests "
                       "of --max-model-len tokens (generate: for its own requests' prompts + --max-tokens)",
                       type=_size)
KV_CACHE_MEMORY_FRACTION = Flag(("--kv-cache-memory-fraction",), "inference.kv_cache_memory_fraction",
                                "KV cache per rank as a share, in (0, 1], of the device memory free once the model "
                                "is loaded (the least over the ranks)", type=float)

JOB_FLAGS = {
    "serve": (TP, PCP, DCP, EP, INTERLEAVE, MAX_MODEL_LEN, MAX_NUM_SEQS, PREFIX_CACHING, MAX_NUM_BATCHED_TOKENS,
              MODEL_SEED, KV_CACHE_MEMORY, KV_CACHE_MEMORY_FRACTION),
    "generate": (TP, PCP, DCP, EP, DP, INTERLEAVE, MAX_MODEL_LEN, MAX_NUM_SEQS, PREFIX_CACHING, MAX_NUM_BATCHED_TOKENS,
                 SAMPLING_SEED, PROMPT, MAX_TOKENS, KV_CACHE_MEMORY, KV_CACHE_MEMORY_FRACTION),
    "train": (TP, PCP, EP, DP, TRAIN_SEED),
    "layout": (TP, PCP, DCP, DP, EP),
}
JOBS = {"serve": "cptoolkit.entrypoints.serve", "generate": "cptoolkit.entrypoints.infer",
        "train": "cptoolkit.entrypoints.train"}
CHUNK_FIELD = "inference.prefill_chunk_size"


def _error(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- flags -> config

def _chunked_prefill(args: argparse.Namespace, raw: dict, source: str) -> dict[str, Any]:
    """``--max-num-batched-tokens N`` sets the chunk size; ``--no-enable-chunked-prefill`` clears it;
    ``--enable-chunked-prefill`` only insists that a chunk size is set (by that flag or the YAML)."""
    enable, chunk = args.enable_chunked_prefill, args.max_num_batched_tokens
    if enable is False and chunk is not None:
        raise ConfigError(f"{source}: --no-enable-chunked-prefill contradicts --max-num-batched-tokens {chunk} "
                          f"(the prefill chunk size, {CHUNK_FIELD}); give one of them")
    if enable is False:
        return {CHUNK_FIELD: None}
    inference = raw.get("inference")
    yaml_chunk = inference.get("prefill_chunk_size") if isinstance(inference, dict) else None
    if enable and chunk is None and yaml_chunk is None:
        raise ConfigError(f"{source}: --enable-chunked-prefill needs a chunk size ({CHUNK_FIELD}): give "
                          "--max-num-batched-tokens N or set it in the --config YAML")
    return {}


SPECULATIVE_FIELDS = {"method": "inference.speculative_method",
                      "model": "inference.speculative_model",
                      "num_speculative_tokens": "inference.num_speculative_tokens",
                      "prompt_lookup_max": "inference.prompt_lookup_max",
                      "prompt_lookup_min": "inference.prompt_lookup_min"}


def _speculative(text: str, source: str) -> dict[str, Any]:
    """``--speculative-config JSON`` -> the ``inference`` fields its keys name (``SPECULATIVE_FIELDS``); the
    values are validated with the merged config. A relative ``model`` path is relative to the working directory,
    like MODEL's."""
    try:
        given = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}: --speculative-config {text!r} is not JSON ({err})") from None
    if not isinstance(given, dict):
        raise ConfigError(f"{source}: --speculative-config {text!r} must be a JSON object")
    unknown = sorted(set(given) - set(SPECULATIVE_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: --speculative-config key {unknown[0]!r} is not supported; rule: one of "
                          f"{', '.join(SPECULATIVE_FIELDS)}")
    if isinstance(given.get("model"), str):
        given["model"] = str(Path(given["model"]).resolve())
    return {SPECULATIVE_FIELDS[key]: value for key, value in given.items()}


def _read_chat(path: str, source: str) -> list:
    """``--chat FILE``: one conversation, an OpenAI messages list (or a request body with ``messages``)."""
    if not Path(path).is_file():
        raise ConfigError(f"{source}: --chat {path}: no such file")
    try:
        chat = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}: --chat {path}: not JSON ({err})") from None
    chat = chat.get("messages") if isinstance(chat, dict) else chat
    if not isinstance(chat, list) or not chat:
        raise ConfigError(f"{source}: --chat {path}: must hold a non-empty JSON list of {{\"role\", \"content\"}} "
                          "messages (an OpenAI messages list), or an object with one under \"messages\"")
    return chat


def _requests(args: argparse.Namespace, source: str) -> dict[str, Any]:
    """generate's request flags -> the ``inference`` fields; given, they replace the YAML's requests. ``--prompt``
    sets ``prompts``; each ``--message TEXT`` is one conversation of one user turn and ``--chat FILE`` one more, all
    in ``messages`` (rendered by the checkpoint's chat template), each opened by ``--system``'s turn."""
    chats = [[{"role": "user", "content": text}] for text in args.message or []]
    if args.chat is not None:
        chats.append(_read_chat(args.chat, source))
    if args.prompt and chats:
        raise ConfigError(f"{source}: --prompt and --message/--chat both given: a request is a plain prompt or a "
                          "chat; give one kind")
    if args.system is not None and not chats:
        raise ConfigError(f"{source}: --system {args.system!r} needs a chat: give --message TEXT or --chat FILE")
    if args.prompt:
        return {"inference.prompt_file": None, "inference.messages": []}
    if not chats:
        return {}
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return {"inference.messages": [system + chat for chat in chats], "inference.prompts": [],
            "inference.prompt_file": None}


def overrides(args: argparse.Namespace, raw: dict, source: str) -> dict[str, Any]:
    """``{"section.field": value}`` for every config flag given on the command line."""
    given = {flag.field: getattr(args, flag.dest) for flag in JOB_FLAGS[args.command]
             if getattr(args, flag.dest) is not None}
    if args.command == "generate":
        given.update(_requests(args, source))
    if hasattr(args, "enable_chunked_prefill"):
        given.update(_chunked_prefill(args, raw, source))
    if getattr(args, "speculative_config", None) is not None:
        given.update(_speculative(args.speculative_config, source))
    return given


def _base_config(args: argparse.Namespace) -> tuple[Any, Path]:
    """The ``--config`` YAML and the folder its paths are relative to; without one, empty sections (the config
    dataclasses' defaults) and the working directory."""
    if args.config is not None:
        return read_yaml(args.config), Path(args.config).resolve().parent
    job_section = "train" if args.command == "train" else "inference"
    return {"parallel": {}, "model": {}, "runtime": {}, job_section: {}}, Path.cwd()


def _with_model(raw: Any, model: str | None) -> Any:
    """MODEL replaces the YAML's model section but its ``seed``: a checkpoint's config.json gives the shape."""
    if model is None or not isinstance(raw, dict) or not isinstance(raw.get("model") or {}, dict):
        return raw
    kept = {key: value for key, value in (raw.get("model") or {}).items() if key == "seed"}
    return {**raw, "model": {**kept, "checkpoint": str(Path(model).resolve())}}


def merged_config(args: argparse.Namespace) -> tuple[dict, Config]:
    """The config the command line asks for: as a dict with absolute paths (what the ranks are given) and
    validated. Raises ``ConfigError`` naming the field, the value and the rule."""
    source = f"cptoolkit {args.command}" + (f" --config {args.config}" if args.config else "")
    raw, base_dir = _base_config(args)
    raw = _with_model(raw, args.model)
    raw = with_overrides(raw, overrides(args, raw if isinstance(raw, dict) else {}, source), base_dir)
    try:
        return raw, config_from_dict(raw, source=source, base_dir=base_dir)
    except ConfigError as err:
        raise ConfigError(_name_flags(str(err), args)) from None


def _name_flags(message: str, args: argparse.Namespace) -> str:
    """``message`` with the flag behind each field it names, as the user typed it (``inference.batch_size = 0:
    must be >= 1 (given as --max-num-seqs 0)``)."""
    given = [f"{flag.names[0]} {getattr(args, flag.dest)}" for flag in JOB_FLAGS[args.command]
             if getattr(args, flag.dest) is not None and f"{flag.field} = " in message]
    if args.command == "generate" and "inference.messages" in message:
        given += [name for name in ("--message", "--chat") if getattr(args, name[2:]) is not None]
    return f"{message} (given as {', '.join(given)})" if given else message


def _require_requests(cfg: Config) -> None:
    """``generate`` needs something to generate for, named as this command spells it."""
    inf = cfg.inference
    if not (inf.prompts or inf.prompt_file or inf.messages):
        raise ConfigError(f"{cfg.source}: nothing to generate for: give --prompt TEXT or --message TEXT (or "
                          "inference.prompts, prompt_file or messages in the --config YAML)")


# ----------------------------------------------------------------------------- commands

def _launcher_argv(job, args: argparse.Namespace) -> list[str]:
    """The job's own flags (``job.add_arguments``, each ``--<dest>``) with the values parsed here."""
    probe = argparse.ArgumentParser(add_help=False)
    job.add_arguments(probe)
    argv: list[str] = []
    for dest in vars(probe.parse_args([])):
        value, flag = getattr(args, dest), "--" + dest.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def _run_here(job, cfg: Config, args: argparse.Namespace) -> NoReturn:
    """One rank: check and run the job in this process under ``run_main``, as its launcher does (logging set up
    first, one line and status 2 for a ``ConfigError``); ``run_main`` exits with the job's status."""
    from cptoolkit.distributed import run_main
    from cptoolkit.torchrun import free_port

    def check_and_run() -> int:
        job.check(cfg)
        return job.run(cfg, args)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))  # the process group's store, even for one rank
    run_main(check_and_run, verbose=args.verbose)


@contextlib.contextmanager
def _config_in_memory(raw: dict, command: str) -> Iterator[str]:
    """The merged config as a path the ranks read, ``/proc/<this pid>/fd/<n>``: an anonymous memory file
    (``memfd_create``) of this process, never on disk, so it ends with this process however that dies (a
    temporary file would outlive a SIGKILL). The ranks read it at start-up, while this process waits for them."""
    with os.fdopen(os.memfd_create(f"cptoolkit-{command}-config.yaml"), "w") as memory_file:
        memory_file.write(yaml.safe_dump(raw, sort_keys=False))
        memory_file.flush()
        yield f"/proc/{os.getpid()}/fd/{memory_file.fileno()}"


def _run_job(args: argparse.Namespace) -> int:
    """serve / generate / train: validate the merged config, then run its ranks here (one) or under torchrun."""
    job = importlib.import_module(JOBS[args.command])
    try:
        raw, cfg = merged_config(args)
        if args.command == "generate":
            _require_requests(cfg)
    except ConfigError as err:
        return _error(err)
    if cfg.parallel.world_size == 1:
        _run_here(job, cfg, args)  # exits
    from cptoolkit import torchrun
    from cptoolkit.distributed import setup_logging

    setup_logging(0, args.verbose)  # the train check imports megatron: its warnings are silenced as on a rank
    try:
        job.check(cfg)
    except ConfigError as err:
        return _error(err)
    with _config_in_memory(raw, args.command) as config_path:
        return torchrun.run(JOBS[args.command], cfg.parallel.world_size,
                            ["--config", config_path, *_launcher_argv(job, args)])


def _layout(args: argparse.Namespace) -> int:
    """Print the rank layout of the merged config (its model's heads, and an MoE checkpoint's routed experts over
    ``parallel.ep``), as ``python -m cptoolkit.parallel_state``."""
    from cptoolkit.layout import ParallelLayout, layout_report

    try:
        _, cfg = merged_config(args)
        p, m, moe = cfg.parallel, cfg.model, model_moe(cfg.model)
        layout = ParallelLayout(tp=p.tp, pcp=p.pcp, dcp=p.dcp, dp=p.dp, num_heads=m.num_attention_heads,
                                num_kv_heads=m.num_kv_heads, hierarchical_a2a_size=p.hierarchical_a2a_size,
                                ep=p.ep, num_experts=None if moe is None else moe.num_experts)
        print(layout_report(layout, nproc_per_node=args.nproc_per_node, legend=args.legend))
    except ValueError as err:  # a ConfigError, or a TP group across nodes
        return _error(err)
    return 0


def _upcycled_weights(args: argparse.Namespace) -> tuple[dict, dict, Any]:
    """``(the upcycled full state dict, its config.json dict, the tokenizer)`` of ``args.checkpoint``; a
    ``ConfigError`` naming the flag, the value and the rule for what cannot be upcycled or written, before any
    tensor is read."""
    from cptoolkit.models.checkpoint import (CPTOOLKIT_FORMAT, checkpoint_layout, hf_to_full, read_weights,
                                             tensor_files)
    from cptoolkit.models.families.registry import checkpoint_family, hf_shape, write_hf_config
    from cptoolkit.models.shape import read_config
    from cptoolkit.models.tokenizer import load_tokenizer
    from cptoolkit.models.upcycle import upcycle, upcycled_shape

    source, output = Path(args.checkpoint), Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"cptoolkit upcycle: --output {output}: exists and is not an empty directory; rule: the "
                          "upcycled checkpoint is written to a new or empty directory; remove it or choose another")
    config = read_config(source)
    shape = hf_shape(config, source)
    try:
        moe_config = write_hf_config(upcycled_shape(shape, args.experts, args.top_k))
    except ValueError as err:
        raise ConfigError(f"cptoolkit upcycle --checkpoint {source} --experts {args.experts} --top-k {args.top_k}: "
                          f"{err}") from None
    tokenizer = load_tokenizer(source)
    checkpoint_layout(config, shape, tensor_files(source))  # a missing or misshapen tensor, named, before reading
    weights = read_weights(source)
    full = (weights if config.get("cptoolkit_format") == CPTOOLKIT_FORMAT
            else hf_to_full(weights, shape, checkpoint_family(config)))
    upcycled, _ = upcycle(full, shape, args.experts, args.top_k, args.seed)
    return upcycled, moe_config, tokenizer


def _upcycle(args: argparse.Namespace) -> int:
    """Write ``--checkpoint``'s dense model upcycled into a mixture of experts (``cptoolkit.models.upcycle``) as a
    cptoolkit checkpoint with the same tokenizer, in the files ``save_checkpoint`` writes; one line, exit 0."""
    from cptoolkit.distributed import setup_logging

    setup_logging(0)  # before the checkpoint reader imports megatron: its import-time warnings stay silent
    from cptoolkit.models.checkpoint import WEIGHTS_FILE, write_checkpoint

    try:
        upcycled, moe_config, tokenizer = _upcycled_weights(args)
    except ConfigError as err:
        return _error(err)
    output = Path(args.output)
    write_checkpoint(upcycled, moe_config, output, tokenizer)
    print(f"{args.checkpoint} upcycled into {args.experts} experts, top-{args.top_k} (router seed {args.seed}): "
          f"{output} ({(output / WEIGHTS_FILE).stat().st_size / 2**20:.1f} MiB)")
    return 0


def _add_config_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="a Hugging Face or cptoolkit checkpoint directory; replaces the YAML's model "
                             "(its config.json gives the shape) [model.checkpoint]")
    parser.add_argument("--config", metavar="YAML",
                        help="config file whose fields the flags override (default: the config defaults)")
    for flag in JOB_FLAGS[command]:
        flag.add_to(parser)
    if command == "generate":
        parser.add_argument("--message", action="append", metavar="TEXT",
                            help="chat: a user message, rendered by the checkpoint's chat template with the "
                                 "assistant's turn opened; repeat the flag for several chats [inference.messages]")
        parser.add_argument("--chat", metavar="FILE",
                            help="chat: a JSON file holding one conversation, an OpenAI messages list "
                                 '([{"role": "user", "content": "..."}, ...]) [inference.messages]')
        parser.add_argument("--system", metavar="TEXT",
                            help="a system message opening every chat of --message / --chat")
    if MAX_NUM_BATCHED_TOKENS in JOB_FLAGS[command]:
        parser.add_argument("--speculative-config", metavar="JSON",
                            help="speculative decoding, as vLLM spells it: "
                                 '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, '
                                 '"prompt_lookup_min": 1}\' (prompt lookup) or \'{"method": "draft_model", '
                                 '"model": DRAFT_DIR, "num_speculative_tokens": 4}\' (a smaller checkpoint of the '
                                 "same vocabulary, run on the same ranks) [inference.speculative_method, "
                                 "inference.speculative_model, inference.num_speculative_tokens, "
                                 "inference.prompt_lookup_max/min]")
        parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                            help=f"prefill long prompts chunk by chunk (the chunk: --max-num-batched-tokens); "
                                 f"--no-enable-chunked-prefill prefills them whole [{CHUNK_FIELD}]")


JOB_HELP = {"serve": "serve the OpenAI completions API (launch/serve.py)",
            "generate": "generate for --prompt TEXT, or chat: --message TEXT or --chat FILE.json rendered by the "
                        "checkpoint's chat template (or the config's prompts or messages) (launch/infer.py)",
            "train": "train on the config's corpus (launch/train.py)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cptoolkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, module in JOBS.items():
        sub = commands.add_parser(command, help=JOB_HELP[command], description=JOB_HELP[command])
        _add_config_arguments(sub, command)
        importlib.import_module(module).add_arguments(sub)
        sub.set_defaults(handler=_run_job)
    sub = commands.add_parser("layout", help="print the rank layout table", description="print the rank layout "
                              "table of the config (its model's query and KV heads, an MoE model's experts)")
    _add_config_arguments(sub, "layout")
    sub.add_argument("--legend", action="store_true", help="print the LEGEND block first")
    sub.add_argument("--nproc-per-node", type=int, help="processes per node: mark the nodes; refuse a TP group "
                                                        "that spans nodes")
    sub.set_defaults(handler=_layout)
    sub = commands.add_parser("chat", help="chat with a running server (cptoolkit serve), as vllm chat does",
                              description="chat with a running server: each line of input is a user turn, the "
                                          "answer streams back, the conversation is kept (cptoolkit.chat_client)")
    chat_client.add_arguments(sub)
    sub.set_defaults(handler=chat_client.run)
    sub = commands.add_parser("upcycle", help="turn a dense checkpoint into a mixture of experts with its output "
                              "(every expert a copy of the MLP)", description="write a dense checkpoint as a mixture "
                              "of experts that computes the same logits: every MLP becomes --experts copies of "
                              "itself behind a seeded random router, softmax over the experts, the --top-k best "
                              "renormalised to sum 1 (cptoolkit.models.upcycle); train it so the experts differ")
    sub.add_argument("--checkpoint", required=True, metavar="DIR",
                     help="the dense model: a cptoolkit or Hugging Face checkpoint directory")
    sub.add_argument("--experts", required=True, type=int, metavar="E", help="experts per layer")
    sub.add_argument("--top-k", required=True, type=int, metavar="K", help="experts each token takes (<= E)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the routers' random weights (default 0)")
    sub.add_argument("--output", required=True, metavar="DIR",
                     help="a new (or empty) directory for the upcycled cptoolkit checkpoint")
    sub.set_defaults(handler=_upcycle)
    commands.add_parser("plan", add_help=False, help="rank the layouts for a model, a context and a cluster "
                                                     "(cptoolkit plan --help: its flags)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``cptoolkit COMMAND ...``; the exit status (one rank of serve / generate / train exits from here)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:  # python -m cptoolkit.plan's own parser, flags and errors
        from cptoolkit.plan import main as plan_main

        return plan_main(argv[1:], prog="cptoolkit plan")
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
