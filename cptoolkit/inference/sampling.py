"""Next-token sampling: logit adjustments (repetition, presence and frequency penalties, logit bias),
greedy, temperature, top-k and top-p, reproducible per request; and the log-probabilities a request
asks to see.

Every rank of a TP x PCP x DCP job runs the same decode step and must pick the same token, or the
ranks' KV caches diverge. Two ways to guarantee it:
- feed ``sample`` identical logits on every rank (e.g. after the TP all-gather of the vocabulary
  shards) with identically seeded generators: sampling is then a deterministic function of
  ``(logits, params, generator state)`` and every rank draws the same tokens; or
- sample on one rank and send the result to the others with ``broadcast_tokens``.

Each request owns one ``torch.Generator`` (``make_generator(seed, request_index)``), created when the
request is admitted and advanced only by that request's own draws, so a request's tokens do not
depend on which other requests share its batch.

Every admitted value samples (``tests/test_sampling_edges.py`` checks the whole space with hypothesis):
- a ``temperature`` below ``GREEDY_TEMPERATURE`` (1e-5, vLLM's threshold) is greedy: dividing by it would
  overflow float32 logits to inf and the softmax to NaN;
- top-p always keeps the most likely token, so a ``top_p`` so small that no token reaches it (1e-300 rounds to 0
  in float32) samples that one token;
- penalties and bias are applied in float64 and a logit pushed past float32's range saturates at its largest
  finite value (``repetition_penalty`` 5e-324 divides a positive logit by a subnormal); temperature scaling
  saturates the same way, so the softmax never sees inf. A sampled row whose logits hold NaN (a model fault)
  raises in ``torch.multinomial``; a greedy one takes the NaN's index, as ``torch.argmax`` ranks NaN first.
``sample_each`` isolates rows: one whose sampling raises gets ``FAILED_TOKEN`` and its message, and the other
rows are sampled as if it were not there.

Log-probabilities (``logprobs``, ``prompt_logprobs``) are those of the model's own distribution: the
log-softmax of the raw logits over the model's whole vocabulary, before penalties, bias and temperature
(vLLM's default ``raw_logprobs``; what ``transformers``' log-softmax of the same logits gives), so a
scored document gets the same figures whatever the sampling settings.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
GREEDY_TEMPERATURE = 1e-5  # temperatures below it sample greedily (vLLM's _SAMPLING_EPS)
FAILED_TOKEN = -1  # the token id ``sample_each`` gives a row whose sampling raised
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _reject(field: str, value, rule: str) -> None:
    raise ValueError(f"SamplingParams.{field} = {value!r} is invalid: {rule}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    ``temperature`` 0 means greedy (argmax, ties to the lowest token id); ``top_k`` 0 and ``top_p`` 1
    switch those filters off. ``stop_token_ids`` / ``stop_strings`` end the request early; lists are
    stored as tuples. ``ignore_eos`` keeps generating past the tokenizer's end-of-sequence ids (benchmarks,
    tests), as vLLM's option of that name does. ``max_new_tokens`` 0 only scores the prompt (with
    ``prompt_logprobs``).

    Logit adjustments, in this order, before temperature: ``repetition_penalty`` (CTRL's, as
    ``transformers`` applies it: over the prompt and the output so far, positive logits divided by it and
    negative ones multiplied; 1 = off), ``frequency_penalty`` and ``presence_penalty`` (OpenAI's: over the
    output so far, ``logit -= frequency * count + presence * (count > 0)``), ``logit_bias`` (``(token_id,
    bias)`` pairs added to those logits; ids past the vocabulary are an error at the edge).
    ``logprobs`` (None = off) returns each generated token's log-probability and that many most likely
    alternatives; ``prompt_logprobs`` the same for every prompt token after the first.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature >= 0:
            _reject("temperature", self.temperature, "it must be a number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            _reject("top_k", self.top_k, "it must be an integer >= 0 (0 = no top-k filter)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            _reject("top_p", self.top_p, "it must be a number in (0, 1] (1 = no nucleus filter)")
        if not _is_int(self.seed) or self.seed < 0:
            _reject("seed", self.seed, "it must be an integer >= 0")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            _reject("max_new_tokens", self.max_new_tokens, "it must be an integer >= 0 (0 = score the prompt only)")
        if not all(_is_int(token_id) and token_id >= 0 for token_id in self.stop_token_ids):
            _reject("stop_token_ids", self.stop_token_ids, "it must be a sequence of integers >= 0")
        if not isinstance(self.ignore_eos, bool):
            _reject("ignore_eos", self.ignore_eos, "it must be true or false")
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) and s for s in self.stop_strings):
            _reject("stop_strings", self.stop_strings, "it must be a sequence of non-empty strings")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            _reject("repetition_penalty", self.repetition_penalty, "it must be a number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                _reject(name, getattr(self, name), "it must be a number in [-2, 2] (0 = off)")
        if not all(len(pair) == 2 and _is_int(pair[0]) and pair[0] >= 0 and _is_number(pair[1])
                   and -100 <= pair[1] <= 100 for pair in self.logit_bias):
            _reject("logit_bias", self.logit_bias, "it must be (token id >= 0, bias in [-100, 100]) pairs")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                _reject(name, value, f"it must be None (off) or an integer in [0, {MAX_LOGPROBS}]")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))

    @property
    def is_greedy(self) -> bool:
        """Argmax sampling: ``temperature`` 0, or below ``GREEDY_TEMPERATURE``."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.repetition_penalty != 1 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def make_generator(seed: int, request_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, request_index)``: the same pair gives the same stream on every rank,
    and distinct requests with one seed get unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{request_index}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
           ) -> torch.Tensor:
    """Pick one token per row of ``logits [b, vocab]``; returns ``[b]`` int64 on ``logits.device``.

    Row ``i`` uses ``params[i]`` and draws from ``generators[i]`` (one draw per non-greedy row; greedy
    rows leave their generator untouched) on the generator's own device, which may differ from
    ``logits.device`` (with CPU generators and CUDA logits the draw runs on the CPU).
    Temperature scales the logits, then top-k keeps the ``top_k`` most likely tokens, then top-p keeps
    the smallest most-likely set whose probability is >= ``top_p`` (at least one token); equal
    probabilities are ranked by lower token id.
    """
    if logits.dim() != 2 or len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(f"sample expects logits [b, vocab] with b params and b generators; got logits "
                         f"{list(logits.shape)}, {len(params)} params, {len(generators)} generators")
    return torch.stack([_sample_row(row, row_params, generator)
                        for row, row_params, generator in zip(logits, params, generators)])


def sample_each(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator],
                prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]]
                ) -> tuple[torch.Tensor, dict[int, str]]:
    """``adjust_logits`` then ``sample``, row by row in isolation: ``(tokens [b] int64, errors)`` where a row
    whose adjustment or draw raised holds ``FAILED_TOKEN`` and ``errors[row]`` says why; every other row draws
    exactly what ``sample`` would have drawn for it."""
    tokens = torch.full((logits.shape[0],), FAILED_TOKEN, dtype=torch.int64, device=logits.device)
    errors: dict[int, str] = {}
    for row, (row_params, generator) in enumerate(zip(params, generators)):
        try:
            adjusted = adjust_logits(logits[row:row + 1], [row_params], [prompt_ids[row]], [output_ids[row]])
            tokens[row] = _sample_row(adjusted[0], row_params, generator)
        except Exception as err:  # a fault in one request's sampling ends that request, not the batch
            errors[row] = sampling_failure(err)
    return tokens, errors


def sampling_failure(err: Exception) -> str:
    """The error a request ends with when drawing its token raised ``err``."""
    return f"sampling failed ({type(err).__name__}: {err})"


def token_distribution(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """What a non-greedy ``params`` samples from ``logits [vocab]``: ``(probs [n], ids [n])``, the kept
    tokens (temperature, then top-k, then top-p; see ``sample``), most likely first. ``probs`` need not sum to
    1 after top-p (draws renormalise)."""
    sorted_logits, sorted_ids = torch.sort(logits.float(), descending=True, stable=True)
    if params.top_k:
        sorted_logits, sorted_ids = sorted_logits[:params.top_k], sorted_ids[:params.top_k]
    scaled = (sorted_logits.double() / params.temperature).clamp(-_FLOAT32_MAX, _FLOAT32_MAX).float()
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1:
        mass_before = torch.cumsum(probs, dim=-1) - probs
        kept = mass_before < params.top_p
        kept[0] = True  # the most likely token survives any top_p > 0
        probs, sorted_ids = probs[kept], sorted_ids[kept]
    return probs, sorted_ids


def draw(probs: torch.Tensor, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of ``ids [n]`` (0-dim int64) with probability ``probs [n]`` (unnormalised) from ``generator``."""
    # torch.multinomial needs its input on the generator's device (CUDA rejects a CPU generator with
    # CUDA probs): draw there, then pick the token id on the logits' device.
    choice = torch.multinomial(probs.to(generator.device), 1, generator=generator)
    return ids[choice.to(ids.device)][0]


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One token id (0-dim int64) from ``logits [vocab]``."""
    if params.is_greedy:
        return torch.argmax(logits)
    return draw(*token_distribution(logits, params), generator)


def adjust_logits(logits: torch.Tensor, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
                  output_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """``logits [b, vocab]`` with each row's penalties and bias applied (``SamplingParams``' order); row
    ``i`` penalises ``prompt_ids[i]`` (repetition only) and ``output_ids[i]``. Rows that adjust nothing
    are left as they are; returns a new tensor when any row changes. The adjustments run in float64 and
    saturate at the logits dtype's largest finite value (see the module docstring); a zero logit stays zero under
    any repetition penalty (transformers' rule: negative logits are multiplied, the others divided)."""
    rows = [row for row, row_params in enumerate(params) if row_params.adjusts_logits]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    for row in rows:
        p = params[row]
        values = logits[row].double()  # a penalty may take a logit far past float32's range
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(prompt_ids[row]) | set(output_ids[row])), dtype=torch.long,
                                device=logits.device)
            seen = seen[seen < vocab]
            scores = values[seen]
            values[seen] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and output_ids[row]:
            counts = torch.bincount(torch.tensor(output_ids[row], dtype=torch.long), minlength=vocab)[:vocab]
            counts = counts.to(device=logits.device, dtype=values.dtype)
            values -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(values.dtype)
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=logits.device)
            bias = torch.tensor([b for _, b in p.logit_bias], dtype=values.dtype, device=logits.device)
            keep = ids < vocab
            values.index_add_(0, ids[keep], bias[keep])
        largest = torch.finfo(logits.dtype).max
        logits[row] = values.clamp(-largest, largest)
    return logits


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, num_top: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's log-probabilities: ``logits [n, vocab]`` and ``chosen [n]`` token ids give
    ``(chosen_logprob [n], top_logprob [n, num_top], top_ids [n, num_top])``, float32 or wider, the top
    ones in descending order."""
    logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    chosen_logprob = logprobs.gather(1, chosen.view(-1, 1).to(logprobs.device)).squeeze(1)
    if num_top == 0:
        empty = logprobs.new_empty(logprobs.shape[0], 0)
        return chosen_logprob, empty, empty.long()
    top_values, top_ids = torch.topk(logprobs, min(num_top, logprobs.shape[-1]), dim=-1)
    return chosen_logprob, top_values, top_ids


def broadcast_tokens(tokens: torch.Tensor, group: ProcessGroup | None, src: int) -> torch.Tensor:
    """Overwrite ``tokens [b]`` on every member of ``group`` with global rank ``src``'s; returns it.

    One broadcast on ``group`` (``None`` = the default group). Use it when ranks might see different
    logits, so that every rank appends the same tokens to its KV cache.
    """
    dist.broadcast(tokens, src=src, group=group)
    return tokens
