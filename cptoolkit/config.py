"""Run configuration: dataclasses loaded from YAML and validated once, at the edge.

A config file has one of the sections ``inference`` or ``train``, and the sections ``parallel``, ``model``
and ``runtime`` where their defaults do not serve (a section left out takes all its defaults). Unknown keys,
wrong types and broken rules are errors that name the file, the field, the value and the rule (``ConfigError``,
a ``ValueError``). Nothing deeper re-checks or "fixes" a config.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from cptoolkit.errors import ConfigError, require
from cptoolkit.layers.algorithms import (PREFILL_ALGORITHMS, DecodeComm, PrefillComm, history_names,
                                         prefill_algorithm)
from cptoolkit.layout import a2a_size_rule, valid_ep_sizes
from cptoolkit.models.moe_dims import MoEDims

__all__ = ["ConfigError"]  # re-exported: callers import it from here too


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout: TP shards heads, PCP shards prefill tokens, DCP shards the decode KV cache.

    ``prefill_comm``: ``p2p`` (ring), ``all_gather``, ``a2a`` (Ulysses) or ``a2a+p2p`` (hierarchical: a2a inside
    groups of ``hierarchical_a2a_size`` PCP ranks, ring across them; that size is required for it and allowed for
    nothing else); ``decode_comm``: ``a2a`` or ``ag_rs``. Each is a record of ``layers.algorithms`` with its rule on
    the model's heads, checked once the model is known.

    ``ep``: expert parallelism for an MoE model, ``k * pcp`` with ``k`` dividing ``tp`` (null: ``pcp``). Inside each
    replica EP ranks shard the routed experts and ETP = ``tp * pcp / ep`` ranks split each expert's FFN: ``ep = pcp``
    slices experts over TP like the dense MLP, ``ep = tp * pcp`` gives every rank whole experts. The model's expert
    count must be a multiple of it and its expert FFN width of ETP (checked against the checkpoint). A dense model
    takes any valid ``ep``: it has no experts, so the setting changes nothing."""

    tp: int = 1
    pcp: int = 1
    dcp: int = 1
    dp: int = 1
    prefill_comm: PrefillComm = "p2p"
    decode_comm: DecodeComm = "a2a"
    kv_interleave: int = 1
    hierarchical_a2a_size: Optional[int] = None
    ep: Optional[int] = None

    def __post_init__(self):
        for name in ("tp", "pcp", "dcp", "dp", "kv_interleave"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        valid_ep = valid_ep_sizes(self.tp, self.pcp)
        require(self.ep is None or self.ep in valid_ep, "ep", self.ep,
                f"must be k*pcp with k dividing tp (tp={self.tp}, pcp={self.pcp}): valid ep values are "
                f"{', '.join(map(str, valid_ep))} (null: ep = pcp)")
        a = self.hierarchical_a2a_size
        if prefill_algorithm(self.prefill_comm).hierarchical:
            require(a is not None, "hierarchical_a2a_size", a,
                    f"required with prefill_comm {self.prefill_comm!r}: the a2a group size, a divisor of pcp "
                    f"({self.pcp})")
            size_rule = a2a_size_rule(a, self.pcp)
            require(size_rule is None, "hierarchical_a2a_size", a, size_rule)
        else:
            hierarchical = " or ".join(repr(n) for n, algorithm in PREFILL_ALGORITHMS.items() if algorithm.hierarchical)
            require(a is None, "hierarchical_a2a_size", a,
                    f"only allowed with prefill_comm {hierarchical} (prefill_comm is {self.prefill_comm!r})")

    @property
    def world_size(self) -> int:
        return self.dp * self.pcp * self.tp


@dataclass(frozen=True)
class ModelConfig:
    """Either a built-in GPT shape with seeded random weights, or ``checkpoint`` (a Hugging Face
    Llama / Mistral / Qwen2 / Qwen3 / GPT-2 directory or a cptoolkit checkpoint) whose own config.json
    gives the shape. ``head_dim``: null means ``hidden_size / num_attention_heads``."""

    arch: Literal["llama", "gpt2"] = "llama"
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 8
    num_kv_heads: int = 2
    ffn_hidden_size: int = 256
    vocab_size: int = 320
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    head_dim: Optional[int] = None
    seed: int = 1234
    checkpoint: Optional[str] = None

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads",
                     "ffn_hidden_size", "vocab_size", "max_seq_len"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.head_dim is None or self.head_dim >= 1, "head_dim", self.head_dim, "must be >= 1, or null")
        require(self.head_dim is None or self.arch == "gpt2" or self.head_dim % 2 == 0, "head_dim", self.head_dim,
                "must be even for llama (RoPE rotates pairs of dimensions)")
        require(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                self.hidden_size, f"must be a multiple of num_attention_heads ({self.num_attention_heads}) "
                "unless head_dim is given")
        require(self.num_attention_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
                f"must divide num_attention_heads ({self.num_attention_heads})")
        require(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")
        require(self.norm_eps > 0, "norm_eps", self.norm_eps, "must be > 0")


@dataclass(frozen=True)
class InferenceConfig:
    """Requests and sampling for ``launch/infer.py`` (and engine settings for ``launch/serve.py``, which
    takes its requests over HTTP): one of ``prompts``, ``prompt_file`` (one per
    line) or ``messages`` (conversations, each a list of ``{role, content}``, rendered by the checkpoint's
    chat template with the assistant's turn opened; generation stops on every end-of-turn id it declares).

    ``max_seq_len`` caps prompt + generated tokens per request (default and upper bound: the model's
    ``max_seq_len``, e.g. a checkpoint's ``max_position_embeddings``). ``kv_cache_bytes`` is the KV
    cache budget per rank (at least one request of ``max_seq_len`` tokens); by default the cache holds
    ``batch_size`` requests of ``max_seq_len`` tokens, or, for ``launch/infer.py`` (``cptoolkit generate``), whose
    requests are known, the ``batch_size`` longest of them (``inference.builder.kv_cache``).
    ``kv_cache_memory_fraction`` instead budgets that share of the device memory free once the model is loaded
    (the least over the job's ranks, so that every rank has the same blocks). Requests wait for free
    blocks, so a smaller budget queues requests instead of failing them.
    ``prefill_chunk_size`` prefills long prompts chunk by chunk, with decode steps of the running
    requests in between; ``prefix_caching`` reuses the KV blocks of prompt prefixes seen before.
    ``speculative_method: ngram`` turns on speculative decoding with prompt-lookup drafts: up to
    ``num_speculative_tokens`` tokens that followed the latest earlier match of the last
    ``prompt_lookup_max`` .. ``prompt_lookup_min`` tokens, verified in one forward per step
    (``inference.speculative``; greedy tokens are those of plain decoding). ``speculative_method: draft_model``
    takes the drafts from a second checkpoint, ``speculative_model`` (a directory like ``model.checkpoint``, with
    the same vocabulary size, heads and MLP that split over ``parallel.tp``, and room for ``max_seq_len``
    tokens): ``num_speculative_tokens`` greedy steps of that model per decode step, on the same ranks and layout
    (``inference.draft_model``). Its KV cache has as many blocks as the target's (``kv_cache_bytes`` budgets the
    target's; the draft's bytes come on top, in proportion to its layers and KV heads)."""

    prompts: list[str] = field(default_factory=list)
    prompt_file: Optional[str] = None
    messages: list = field(default_factory=list)
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 4
    stop_strings: list[str] = field(default_factory=list)
    kv_block_size: int = 16
    max_seq_len: Optional[int] = None
    kv_cache_bytes: Optional[int] = None
    kv_cache_memory_fraction: Optional[float] = None
    prefill_chunk_size: Optional[int] = None
    prefix_caching: bool = False
    speculative_method: Optional[Literal["ngram", "draft_model"]] = None
    speculative_model: Optional[str] = None
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3

    def __post_init__(self):
        given = [bool(self.prompts), self.prompt_file is not None, bool(self.messages)]
        require(sum(given) <= 1, "prompts", self.prompts, "give at most one of prompts (a list), prompt_file "
                f"(a path) or messages (a list of conversations); given: prompt_file = {self.prompt_file!r}, "
                f"messages = {self.messages!r}")
        for i, conversation in enumerate(self.messages):
            require(isinstance(conversation, list) and bool(conversation), f"messages[{i}]", conversation,
                    "must be a non-empty list of {role, content} messages (one conversation)")
            for j, message in enumerate(conversation):
                require(isinstance(message, dict) and set(message) == {"role", "content"}
                        and all(isinstance(v, str) for v in message.values()), f"messages[{i}][{j}]", message,
                        "must be a mapping of exactly 'role' and 'content', both strings")
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        require(self.temperature >= 0, "temperature", self.temperature, "must be >= 0 (0 = greedy)")
        require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0 = off)")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.kv_block_size >= 1, "kv_block_size", self.kv_block_size, "must be >= 1")
        require(self.max_seq_len is None or self.max_seq_len >= 1, "max_seq_len", self.max_seq_len,
                "must be >= 1 (null = the model's max_seq_len)")
        require(self.kv_cache_bytes is None or self.kv_cache_bytes >= 1, "kv_cache_bytes", self.kv_cache_bytes,
                "must be >= 1 (null = room for batch_size requests of max_seq_len tokens; generate: for its "
                "own requests)")
        require(self.kv_cache_memory_fraction is None or 0 < self.kv_cache_memory_fraction <= 1,
                "kv_cache_memory_fraction", self.kv_cache_memory_fraction, "must be in (0, 1]: the share of the "
                "device memory free once the model is loaded that the KV cache takes (null = off)")
        require(self.kv_cache_bytes is None or self.kv_cache_memory_fraction is None, "kv_cache_memory_fraction",
                self.kv_cache_memory_fraction, f"give it or kv_cache_bytes ({self.kv_cache_bytes}), not both")
        require(self.prefill_chunk_size is None or self.prefill_chunk_size >= 1, "prefill_chunk_size",
                self.prefill_chunk_size, "must be >= 1 (null = prefill each prompt whole)")
        require(self.num_speculative_tokens >= 1, "num_speculative_tokens", self.num_speculative_tokens,
                "must be >= 1 (draft tokens verified per decode step with speculative_method)")
        require((self.speculative_method == "draft_model") == (self.speculative_model is not None),
                "speculative_model", self.speculative_model,
                "the draft checkpoint's directory: required with speculative_method 'draft_model' and allowed "
                f"with nothing else (speculative_method is {self.speculative_method!r})")
        require(1 <= self.prompt_lookup_min <= self.prompt_lookup_max, "prompt_lookup_min", self.prompt_lookup_min,
                f"must be in [1, prompt_lookup_max = {self.prompt_lookup_max}] (n-gram lengths the ngram "
                "proposer matches)")


@dataclass(frozen=True)
class TrainConfig:
    """Training for ``launch/train.py`` on a corpus file (or the generated default corpus). For an MoE model:
    ``moe_aux_loss_coef`` weighs the load-balancing loss, ``moe_bias_update_rate`` is DeepSeek-V3's bias update
    speed (``cptoolkit.training.moe_balance``; 0: off, each)."""

    steps: int = 20
    seq_len: int = 64
    micro_batch_size: int = 2
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 2
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    corpus: Optional[str] = None
    save_dir: Optional[str] = None
    moe_aux_loss_coef: float = 0.0
    moe_bias_update_rate: float = 0.0

    def __post_init__(self):
        for name in ("moe_aux_loss_coef", "moe_bias_update_rate"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0 (0: off)")
        for name in ("steps", "seq_len", "micro_batch_size"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        require(0 <= self.warmup_steps < self.steps, "warmup_steps", self.warmup_steps,
                f"must be in [0, steps={self.steps})")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(self.grad_clip > 0, "grad_clip", self.grad_clip, "must be > 0")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and in what precision the math runs. ``device: auto`` picks CUDA when available.
    ``dtype``: the parameters' and the KV cache's dtype; ``auto`` is resolved when the config loads: the dtype
    of ``model.checkpoint``'s weights (its config.json's ``dtype`` / ``torch_dtype``: bfloat16 weights load as
    bfloat16; float16 is refused, as cptoolkit does not compute in it), float32 for the built-in model.
    ``attention_backend`` computes every attention block (``cptoolkit.layers.block_attention``): ``torch``'s
    flash kernels, TransformerEngine's fused attention (``te``: CUDA, bfloat16, TE installed), or ``auto``
    (``te`` on CUDA where TransformerEngine imports, else ``torch``). ``startup_timeout_s`` bounds start-up:
    rendezvous, process-group creation and checkpoint loading, until every rank is ready; from then on
    ``collective_timeout_s`` bounds every collective (``cptoolkit.distributed.end_startup``). ``tune_matmuls``: on a CPU
    the inference engine times three equivalent formulations of each few-row linear product in its first decode
    steps and keeps the fastest, the same on every rank (``cptoolkit.models.matmul_plan``); false keeps megatron's
    ``x @ W^T`` everywhere (bit for bit megatron's logits). ``shared_memory_collectives``: on a CPU the inference
    engine runs the all-reduces, all-gathers, all-to-alls and reduce-scatters of its TP, PCP and DCP groups through
    shared-memory segments instead of gloo when a group's ranks share one host and each has a core of its own
    (``cptoolkit.layers.shared_memory``; the same bits at 2 ranks)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = "float32"
    collective_timeout_s: float = 120.0
    startup_timeout_s: float = 300.0
    attention_backend: Literal["auto", "torch", "te"] = "auto"
    tune_matmuls: bool = True
    shared_memory_collectives: bool = True

    def __post_init__(self):
        require(self.collective_timeout_s > 0, "collective_timeout_s", self.collective_timeout_s,
                "must be > 0")
        require(self.startup_timeout_s > 0, "startup_timeout_s", self.startup_timeout_s, "must be > 0")
        if self.attention_backend == "te":
            self._check_te_runs_here()

    def _check_te_runs_here(self) -> None:
        """``te`` needs a CUDA device, bfloat16 (``auto`` is checked again once resolved), TransformerEngine installed
        and a GPU (found without importing TE)."""
        import importlib.util

        import torch

        name, value = "attention_backend", self.attention_backend
        require(self.device != "cpu", name, value, "runs on CUDA only, and device is 'cpu'; set device: cuda "
                "(or auto), or attention_backend: torch")
        require(self.dtype in ("bfloat16", "auto"), name, value, f"TransformerEngine's fused attention takes "
                f"bfloat16, and dtype is {self.dtype!r}; set dtype: bfloat16, or attention_backend: torch")
        require(importlib.util.find_spec("transformer_engine") is not None, name, value, "needs TransformerEngine, "
                "and transformer_engine is not installed here; use auto or torch (or install transformer-engine)")
        require(torch.cuda.is_available(), name, value, "needs a CUDA GPU, and torch.cuda.is_available() is False "
                "here; use auto or torch")


@dataclass(frozen=True)
class Config:
    parallel: ParallelConfig
    model: ModelConfig
    runtime: RuntimeConfig
    inference: Optional[InferenceConfig] = None
    train: Optional[TrainConfig] = None
    source: str = "<dict>"


_SECTIONS = {"parallel": ParallelConfig, "model": ModelConfig, "runtime": RuntimeConfig,
             "inference": InferenceConfig, "train": TrainConfig}
# Sections every config has: one left out of the file (or written empty) takes all its defaults.
_DEFAULTED_SECTIONS = ("parallel", "model", "runtime")


def _is_float_text(value: Any) -> bool:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; accept such text for float fields."""
    try:
        return isinstance(value, str) and float(value) == float(value)
    except ValueError:
        return False


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) or _is_float_text(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


_TYPE_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"),
               bool: ("true or false", "booleans"), str: ("a string", "strings")}


def _describe(annotation: Any, plural: bool = False) -> str:
    """A field type as an error message says it: ``an integer``, ``a string or null``, ``a list of strings``."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in typing.get_args(annotation))
    if origin is list:
        return f"a list of {_describe(typing.get_args(annotation)[0], plural=True)}"
    if annotation is type(None):
        return "null"
    singular, plural_name = _TYPE_NAMES.get(annotation, (f"a {annotation.__name__}", f"{annotation.__name__}s"))
    return plural_name if plural else singular


def _build_section(cls: type, raw: Any, section: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{section}: must be a mapping of fields, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{section}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    for key, value in raw.items():
        if not _type_ok(value, hints[key]):
            raise ValueError(f"{section}.{key} = {value!r}: must be {_describe(hints[key])}")
    try:
        values = {k: float(v) if hints[k] is float else v for k, v in raw.items()}
        return cls(**values)
    except ValueError as err:
        raise ValueError(f"{section}.{err}") from None


def _refuse_shape_with_checkpoint(raw_model: dict) -> None:
    """A checkpoint's config.json gives the shape: a shape field beside it would be silently replaced."""
    shape_given = sorted(set(raw_model) - {"checkpoint", "seed"})
    if shape_given:
        name = shape_given[0]
        raise ValueError(f"model.{name} = {raw_model[name]!r}: not allowed with model.checkpoint (its config.json "
                         f"gives the model's shape); remove it (inference.max_seq_len lowers the length)")


def _checkpoint_shape(model: ModelConfig, base_dir: Path) -> ModelConfig:
    """Replace the shape fields by those of the checkpoint's config.json (HF or cptoolkit)."""
    path = Path(model.checkpoint)
    path = path if path.is_absolute() else base_dir / path
    if not (path / "config.json").is_file():
        missing = "" if path.is_dir() else " (no such directory)"
        raise ValueError(f"model.checkpoint = {model.checkpoint!r}: no config.json in {path}{missing}; "
                         "point it at a directory written by save_pretrained or save_checkpoint")
    from cptoolkit.models.families.registry import hf_shape
    from cptoolkit.models.shape import read_config

    shape = hf_shape(read_config(path), path)  # a ConfigError naming config.json itself
    shape_fields = {f.name for f in dataclasses.fields(ModelConfig)} & {f.name for f in dataclasses.fields(shape)}
    return dataclasses.replace(model, checkpoint=str(path),
                               **{name: getattr(shape, name) for name in shape_fields})


def _resolve_auto_dtype(runtime: RuntimeConfig, model: ModelConfig) -> RuntimeConfig:
    """``runtime.dtype: auto`` -> the checkpoint's weights' dtype, or float32 for the built-in model (the
    replaced section is validated again, so ``attention_backend: te`` still needs bfloat16)."""
    if runtime.dtype != "auto":
        return runtime
    from cptoolkit.models.shape import read_config, weights_dtype

    dtype = "float32" if model.checkpoint is None else weights_dtype(read_config(model.checkpoint), model.checkpoint)
    try:
        return dataclasses.replace(runtime, dtype=dtype)
    except ValueError as err:
        raise ValueError(f"runtime.{err} (dtype auto is {dtype!r} here)") from None


def model_moe(model: ModelConfig) -> Optional[MoEDims]:
    """The routed experts of ``model`` (``GPTShape.moe``, read from its checkpoint's config.json); None for a dense
    model. The built-in model is dense."""
    if model.checkpoint is None:
        return None
    from cptoolkit.models.families.registry import hf_shape
    from cptoolkit.models.shape import read_config

    return hf_shape(read_config(model.checkpoint), model.checkpoint).moe


def _check_experts(p: ParallelConfig, moe: Optional[MoEDims]) -> None:
    """The model's routed experts split over ``parallel.ep``: whole experts over EP, each expert's FFN over
    ETP = tp * pcp / ep. Nothing to split for a dense model (``moe`` None)."""
    if moe is None:
        return
    ep = p.pcp if p.ep is None else p.ep
    etp = p.tp * p.pcp // ep
    fitting = [str(size) for size in valid_ep_sizes(p.tp, p.pcp)
               if moe.num_experts % size == 0 and moe.ffn_hidden_size % (p.tp * p.pcp // size) == 0]
    fix = f"valid ep values for this model are {', '.join(fitting) or 'none'}"
    size = "parallel.pcp" if p.ep is None else "parallel.ep"
    require(moe.num_experts % ep == 0, "parallel.ep", p.ep,
            f"the model's num_experts ({moe.num_experts}, model.checkpoint's config.json) must be a multiple of EP "
            f"({ep} = {size}): each EP rank holds num_experts/EP whole experts; {fix}")
    require(moe.ffn_hidden_size % etp == 0, "parallel.ep", p.ep,
            f"the model's expert ffn_hidden_size ({moe.ffn_hidden_size}, model.checkpoint's config.json) must be a "
            f"multiple of ETP = parallel.tp * parallel.pcp / EP ({p.tp}*{p.pcp}/{ep} = {etp}): each ETP rank holds "
            f"an equal slice of every expert's FFN; {fix}")


def _prefill_comm_error(p: ParallelConfig, heads_name: str, num_heads: int) -> Optional[str]:
    """The prefill algorithm's rule (``layers.algorithms``) on ``num_heads`` query heads (``heads_name``) split over
    ``parallel.tp`` (a multiple of it): the error naming the sizes, or None."""
    error = prefill_algorithm(p.prefill_comm).check(num_heads // p.tp, p.pcp, p.hierarchical_a2a_size)
    if error is None:
        return None
    return f"with {heads_name} = {num_heads} over parallel.tp = {p.tp} and parallel.pcp = {p.pcp}, {error}"


def _check_layout(cfg: Config) -> None:
    from cptoolkit.layout import ParallelLayout  # pure: validating a config imports no torch

    p, m = cfg.parallel, cfg.model
    try:
        ParallelLayout(tp=p.tp, pcp=p.pcp, dcp=p.dcp, dp=p.dp, num_heads=m.num_attention_heads,
                       num_kv_heads=m.num_kv_heads)
    except ValueError as err:
        raise ValueError(f"parallel (tp={p.tp}, pcp={p.pcp}, dcp={p.dcp}, dp={p.dp}) with model "
                         f"(num_attention_heads={m.num_attention_heads}, num_kv_heads={m.num_kv_heads}): "
                         f"{err}") from None
    require(m.ffn_hidden_size % p.tp == 0, "model.ffn_hidden_size", m.ffn_hidden_size,
            f"must be a multiple of parallel.tp ({p.tp}) for the column-parallel MLP")
    _check_experts(p, model_moe(m))
    error = _prefill_comm_error(p, "model.num_attention_heads", m.num_attention_heads)
    require(error is None, "parallel.prefill_comm", p.prefill_comm, error)
    if cfg.inference is not None and cfg.inference.messages:
        require(m.checkpoint is not None, "inference.messages", cfg.inference.messages,
                "needs model.checkpoint: messages are rendered by the checkpoint's chat template, and the "
                "built-in model's byte tokenizer has none; use inference.prompts (--prompt)")
    if cfg.inference is not None and cfg.inference.max_seq_len is not None:
        require(cfg.inference.max_seq_len <= m.max_seq_len, "inference.max_seq_len", cfg.inference.max_seq_len,
                f"must be <= model.max_seq_len ({m.max_seq_len})")
    if cfg.inference is not None and cfg.inference.prefill_chunk_size is not None:
        align = p.kv_interleave * p.dcp
        require(cfg.inference.prefill_chunk_size % align == 0, "inference.prefill_chunk_size",
                cfg.inference.prefill_chunk_size, f"must be a multiple of parallel.kv_interleave * parallel.dcp "
                f"({align}) so that every chunk starts on the same DCP shard")
    if cfg.inference is not None and (cfg.inference.prefill_chunk_size or cfg.inference.prefix_caching):
        require(prefill_algorithm(p.prefill_comm).attends_history, "parallel.prefill_comm", p.prefill_comm,
                f"must be {' or '.join(map(repr, history_names()))} with inference.prefill_chunk_size or "
                "inference.prefix_caching: a chunk over a cached history merges by log-sum-exp, which the other "
                "algorithms do not return")
    if cfg.inference is not None and cfg.inference.prefix_caching:
        require(cfg.inference.kv_block_size % p.kv_interleave == 0, "inference.kv_block_size",
                cfg.inference.kv_block_size, f"must be a multiple of parallel.kv_interleave ({p.kv_interleave}) "
                "for prefix caching (a cached page fills one block on every DCP member)")
    if cfg.train is not None:
        require(m.num_kv_heads % p.tp == 0, "model.num_kv_heads", m.num_kv_heads,
                f"must be a multiple of parallel.tp ({p.tp}) for training: KV heads replicated over TP "
                "ranks are separate parameters and would drift apart")
        require(cfg.train.seq_len % (2 * p.pcp) == 0, "train.seq_len", cfg.train.seq_len,
                f"must be a multiple of 2*parallel.pcp ({2 * p.pcp}) for DualChunkSwap")
        require(cfg.train.seq_len <= m.max_seq_len, "train.seq_len", cfg.train.seq_len,
                f"must be <= model.max_seq_len ({m.max_seq_len})")


def _resolve_draft_model(cfg: Config, base_dir: Path) -> Config:
    """``inference.speculative_model`` made absolute (against ``base_dir``) and checked against the target: its
    config.json exists, its vocabulary size is the target's (its drafts are target token ids), its heads and MLP
    split over ``parallel.tp`` like the target's must (the draft runs on the same ranks and layout), and it has
    positions for the longest request."""
    from cptoolkit.layout import ParallelLayout
    from cptoolkit.models.families.registry import hf_shape
    from cptoolkit.models.shape import check_tp, read_config

    given = cfg.inference.speculative_model
    path = Path(given) if Path(given).is_absolute() else base_dir / given
    name = "inference.speculative_model"
    require((path / "config.json").is_file(), name, given, f"no config.json in {path}"
            f"{'' if path.is_dir() else ' (no such directory)'}; point it at the draft checkpoint's directory "
            "(written by save_pretrained or save_checkpoint)")
    draft = hf_shape(read_config(path), path)
    p, m = cfg.parallel, cfg.model
    require(draft.vocab_size == m.vocab_size, name, given, f"its vocab_size ({draft.vocab_size}) must equal the "
            f"target's ({m.vocab_size}): a draft model proposes token ids of the target's vocabulary")
    try:
        ParallelLayout(tp=p.tp, pcp=p.pcp, dcp=p.dcp, dp=p.dp, num_heads=draft.num_attention_heads,
                       num_kv_heads=draft.num_kv_heads)
        check_tp(draft, p.tp)
    except ValueError as err:
        raise ValueError(f"{name} = {given!r}: the draft runs on the target's layout (parallel.tp = {p.tp}, "
                         f"pcp = {p.pcp}, dcp = {p.dcp}), and its heads or MLP do not split over it: {err}; use a "
                         "draft whose num_attention_heads, num_key_value_heads and intermediate_size fit "
                         "parallel.tp") from None
    longest = cfg.inference.max_seq_len or m.max_seq_len
    require(draft.max_seq_len >= longest, name, given, f"its max_position_embeddings ({draft.max_seq_len}) must be "
            f">= the longest request, inference.max_seq_len (or the target's max_seq_len) = {longest}; lower "
            "inference.max_seq_len")
    error = _prefill_comm_error(p, "its num_attention_heads", draft.num_attention_heads)
    require(error is None, name, given, f"the draft runs parallel.prefill_comm {p.prefill_comm!r} too: {error}")
    return dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, speculative_model=str(path)))


def _training_dcp_default(raw: dict) -> dict:
    """Training has no decode step: its ``parallel.dcp`` defaults to ``pcp`` (the layout's smallest DCP)."""
    parallel = raw.get("parallel")
    if "train" not in raw or not isinstance(parallel, dict) or "dcp" in parallel:
        return raw
    return {**raw, "parallel": {**parallel, "dcp": parallel.get("pcp", 1)}}


def config_from_dict(raw: Any, source: str = "<dict>", base_dir: Path = Path(".")) -> Config:
    """Build and validate a Config from parsed YAML; errors are ConfigError naming ``source``."""
    try:
        if not isinstance(raw, dict):
            raise ValueError(f"top level must be a mapping with sections {', '.join(_SECTIONS)}")
        unknown = sorted(set(raw) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown section (known: {', '.join(_SECTIONS)})")
        if ("inference" in raw) == ("train" in raw):
            raise ValueError("exactly one of the sections 'inference' or 'train' is required")
        raw = _training_dcp_default(raw)
        sections = {name: _build_section(cls, raw.get(name), name) for name, cls in _SECTIONS.items()
                    if name in raw or name in _DEFAULTED_SECTIONS}
        if sections["model"].checkpoint is not None:
            _refuse_shape_with_checkpoint(raw["model"])
            sections["model"] = _checkpoint_shape(sections["model"], base_dir)
        sections["runtime"] = _resolve_auto_dtype(sections["runtime"], sections["model"])
        cfg = Config(**sections, source=source)
        _check_layout(cfg)
        if cfg.inference is not None and cfg.inference.speculative_model is not None:
            cfg = _resolve_draft_model(cfg, base_dir)
        return cfg
    except ConfigError:
        raise  # names its own file (a checkpoint's config.json), not the YAML
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None


def read_yaml(path: str | Path, kind: str = "config") -> Any:
    """Parse a YAML file; a missing file or a syntax error is a ConfigError naming the file (and the
    line and column of the error)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {kind} file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: malformed YAML: {where}{getattr(err, 'problem', err)}") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file. Relative paths inside it resolve against its folder."""
    path = Path(path)
    return config_from_dict(read_yaml(path), source=str(path), base_dir=path.parent)


# The fields that hold paths, relative to the config file's folder.
PATH_FIELDS = (("model", "checkpoint"), ("inference", "prompt_file"), ("inference", "speculative_model"),
               ("train", "corpus"), ("train", "save_dir"))


def with_overrides(raw: Any, overrides: dict[str, Any], base_dir: Path) -> Any:
    """Parsed YAML with ``{"section.field": value}`` overrides set and the relative ``PATH_FIELDS`` made absolute
    against ``base_dir`` (the file's folder), so that a copy written elsewhere loads the same config. A malformed
    ``raw`` (not mappings) is returned as it is, for ``config_from_dict`` to report."""
    if not isinstance(raw, dict):
        return raw
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        section, name = key.split(".")
        current = raw.get(section) or {}
        if isinstance(current, dict):  # else config_from_dict reports the malformed section
            raw[section] = {**current, name: value}
    for section, name in PATH_FIELDS:
        current = raw.get(section)
        value = current.get(name) if isinstance(current, dict) else None
        if isinstance(value, str) and not Path(value).is_absolute():
            current[name] = str(base_dir / value)
    return raw


def main(argv: list[str] | None = None) -> int:
    """``python -m cptoolkit.config CONFIG [--world-size]``: validate a config (one line on error, exit
    2); with ``--world-size`` print the process count it needs (``make run`` uses it for torchrun)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m cptoolkit.config", description=main.__doc__)
    parser.add_argument("config")
    parser.add_argument("--world-size", action="store_true", help="print dp*pcp*tp only")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(cfg.parallel.world_size if args.world_size else f"{cfg.source}: valid, {cfg.parallel.world_size} ranks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
