"""Next-token sampling: logit adjustments (repetition, presence and frequency penalties, logit bias),
greedy, temperature, top-k and top-p, reproducible per request; and the log-probabilities a request
asks to see.

A step samples its whole batch with batched tensor ops and no host round-trip (``sample_each``): the
adjustments as indexed adds over ``[b, vocab]``, greedy rows by one argmax, the others by gpt-fast's
exponential race (``draw``: the argmax of ``weights / noise``), so the engine reads the step's tokens from the
device once. A row's figures depend on that row alone (its own settings decide its ops, never the batch's), so a
request draws the same tokens whichever requests share its batch; ``tests/test_sampling_batched.py`` checks
that against a row-by-row reference.

Every rank of a TP x PCP x DCP job runs the same decode step and must pick the same token, or the
ranks' KV caches diverge. Two ways to guarantee it:
- feed ``sample`` identical logits on every rank (e.g. after the TP all-gather of the vocabulary
  shards) with identically seeded generators: sampling is then a deterministic function of
  ``(logits, params, generator state)`` and every rank draws the same tokens; or
- sample on one rank and send the result to the others with ``broadcast_tokens``.

Each request owns one ``torch.Generator`` (``make_generator(seed, request_index)``), created when the
request is admitted and advanced only by that request's own draws (one noise vector per sampled token), so a
request's tokens do not depend on which other requests share its batch.

Every admitted value samples (``tests/test_sampling_edges.py`` checks the whole space with hypothesis):
- a ``temperature`` below ``GREEDY_TEMPERATURE`` (1e-5, vLLM's threshold) is greedy: dividing by it would
  overflow float32 logits to inf and the softmax to NaN;
- top-p always keeps the most likely token, so a ``top_p`` so small that no token reaches it (1e-300 rounds to 0
  in float32) samples that one token;
- penalties and bias are applied in float64 and a logit pushed past float32's range saturates at its largest
  finite value (``repetition_penalty`` 5e-324 divides a positive logit by a subnormal); temperature scaling
  saturates the same way, so the softmax never sees inf. A sampled row whose logits hold NaN (a model fault)
  gets ``FAILED_TOKEN`` (``NOT_FINITE``); a greedy one takes the NaN's index, as ``torch.argmax`` ranks NaN first.
``sample_each`` isolates rows: one whose sampling fails gets ``FAILED_TOKEN``, and the other rows are sampled as
if it were not there.

Log-probabilities (``logprobs``, ``prompt_logprobs``) are those of the model's own distribution: the
log-softmax of the raw logits over the model's whole vocabulary, before penalties, bias and temperature
(vLLM's default ``raw_logprobs``; what ``transformers``' log-softmax of the same logits gives), so a
scored document gets the same figures whatever the sampling settings.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
GREEDY_TEMPERATURE = 1e-5  # temperatures below it sample greedily (vLLM's _SAMPLING_EPS)
FAILED_TOKEN = -1  # the token id ``sample_each`` gives a row whose sampling failed
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
    """Pick one token per row of ``logits [b, vocab]``, as batched tensor ops with no host round-trip; returns
    ``[b]`` int64 on ``logits.device``.

    Greedy rows (``SamplingParams.is_greedy``) take the argmax and leave their generator untouched; the others
    draw from ``token_weights`` with one draw from ``generators[i]`` each (``draw``). A sampled row whose
    probabilities are not finite (NaN logits: a model fault) gets ``FAILED_TOKEN``. Ties go to the lowest id.
    """
    if logits.dim() != 2 or len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(f"sample expects logits [b, vocab] with b params and b generators; got logits "
                         f"{list(logits.shape)}, {len(params)} params, {len(generators)} generators")
    greedy = [row for row, row_params in enumerate(params) if row_params.is_greedy]
    drawn = [row for row, row_params in enumerate(params) if not row_params.is_greedy]
    if not drawn:
        return logits.max(dim=-1).indices  # torch.argmax's index (the first largest, or the first NaN), faster
    if not greedy:  # no copies of [b, vocab] rows
        return draw(token_weights(logits, params), generators)
    tokens = torch.empty(len(params), dtype=torch.int64, device=logits.device)
    tokens[greedy] = logits[greedy].max(dim=-1).indices
    tokens[drawn] = draw(token_weights(logits[drawn], [params[row] for row in drawn]),
                         [generators[row] for row in drawn])
    return tokens


def sample_each(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator],
                prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]]
                ) -> tuple[torch.Tensor, dict[int, str]]:
    """``adjust_logits`` then ``sample`` for the whole batch, each row as if alone: ``(tokens [b] int64, errors)``.

    ``FAILED_TOKEN`` marks a row whose sampling failed: ``errors[row]`` says why when it raised; a row with no
    entry had probabilities that are not finite (``NOT_FINITE``; only the device knows which, until the tokens
    are read). When the batch raises, every generator is set back to its state before the step and each row
    runs alone, so a row that raises alone fails and every other row draws exactly what it would have drawn.
    """
    states = [generator.get_state() for generator in generators]
    try:
        return sample(adjust_logits(logits, params, prompt_ids, output_ids), params, generators), {}
    except Exception:  # a fault in one request's sampling ends that request, not the batch: find it
        for generator, state in zip(generators, states):
            generator.set_state(state)
    tokens = torch.full((logits.shape[0],), FAILED_TOKEN, dtype=torch.int64, device=logits.device)
    errors: dict[int, str] = {}
    for row in range(logits.shape[0]):
        try:
            adjusted = adjust_logits(logits[row:row + 1], params[row:row + 1], prompt_ids[row:row + 1],
                                     output_ids[row:row + 1])
            tokens[row] = sample(adjusted, params[row:row + 1], generators[row:row + 1])[0]
        except Exception as err:  # noqa: BLE001 - this row's fault, reported in its error
            errors[row] = sampling_failure(err)
    return tokens, errors


def sampling_failure(err: Exception) -> str:
    """The error a request ends with when drawing its token raised ``err``."""
    return f"sampling failed ({type(err).__name__}: {err})"


NOT_FINITE = "sampling failed (its probabilities are not finite: the model's logits hold NaN)"


def token_weights(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """What each non-greedy row of ``logits [n, vocab]`` samples from: ``[n, vocab]`` float32 weights by token id,
    proportional to the probabilities (``draw`` needs no normalising; divide by the row's sum for them).

    Temperature scales the float32 logits (saturating at float32's largest finite value), then top-k keeps the
    ``top_k`` largest logits and top-p the smallest most-likely set of those whose probability mass is >= ``top_p``
    (at least one token), equal logits ranked by lower token id; a kept token weighs ``exp(scaled - max)`` (the
    most likely one 1), the others 0. Each row's figures depend on that row alone (``_kept``), so they are the same
    in any batch. One new ``[n, vocab]`` tensor, the rest in place: on a CPU each fresh one costs page faults.
    """
    temperatures = to_device([p.temperature for p in params], torch.float32, logits.device)
    scaled = (logits.float() / temperatures[:, None]).clamp_(-_FLOAT32_MAX, _FLOAT32_MAX)
    filtered = [row for row, p in enumerate(params) if p.top_k or p.top_p < 1]
    if len(filtered) == len(params):  # the common case: no copies of [n, vocab] rows
        scaled.masked_fill_(~_kept(logits, scaled, params), float("-inf"))
    elif filtered:
        kept = _kept(logits[filtered], scaled[filtered], [params[row] for row in filtered])
        scaled[filtered] = scaled[filtered].masked_fill_(~kept, float("-inf"))
    return scaled.sub_(scaled.max(dim=-1, keepdim=True).values).exp_()


def _kept(logits: torch.Tensor, scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``[m, vocab]`` bool by token id: the tokens top-k and top-p keep (see ``token_weights``) of ``logits`` and
    their temperature-``scaled`` values ``[m, vocab]``.

    The ranking is a ``topk`` of ``_rank_key`` (a full sort only when a row has no top-k), and a row's top-p mass is
    a running sum over its ranks in order, compared with ``top_p`` times the sum of all its kept ranks: each row's
    figures are the same whatever the widest top-k of its batch."""
    vocab = logits.shape[1]
    top_k = [p.top_k or vocab for p in params]
    key = _rank_key(logits)
    order = (torch.topk(key, max(top_k), dim=-1).indices if max(top_k) < vocab  # [m, width] ids by rank
             else torch.sort(key, dim=-1, descending=True).indices)
    in_top_k = torch.arange(order.shape[1], device=logits.device) < to_device(top_k, torch.long, logits.device)[:, None]
    ranked = scaled.gather(1, order).masked_fill_(~in_top_k, float("-inf"))
    weights = torch.exp(ranked - ranked[:, :1])  # rank 0 holds the row's largest scaled logit
    mass = torch.cumsum(weights, dim=-1)  # a running sum: trailing zeros leave it as it is
    # top_p 1 keeps every top-k token, even one whose weight is below the rounding of the running sum
    top_p = to_device([p.top_p if p.top_p < 1 else float("inf") for p in params], torch.float32, logits.device)
    kept = in_top_k & (mass - weights < top_p[:, None] * mass[:, -1:])
    kept[:, 0] = True  # the most likely token survives any top_p > 0
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, order, kept)


def _rank_key(logits: torch.Tensor) -> torch.Tensor:
    """``[m, vocab]`` int64 keys, all distinct, whose descending order ranks ``logits`` by value (as float32) and
    equal values by lower token id: the value's bits made monotonic in the high word (NaN ranked as +inf, -0 as
    +0), ``vocab - 1 - id`` in the low word."""
    values = torch.nan_to_num(logits.float(), nan=float("inf"), posinf=float("inf"), neginf=float("-inf")).add_(0.0)
    bits = values.view(torch.int32)
    sign = bits >> 31
    bits ^= sign.bitwise_and_(0x7FFFFFFF)  # negative floats: flip the magnitude bits to reverse their order
    key = bits.long()
    key <<= 32
    return key.bitwise_or_(torch.arange(logits.shape[1] - 1, -1, -1, device=logits.device))


def draw(weights: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of ``weights [n, vocab]`` (probabilities up to a factor per row), ``[n]`` int64 on
    ``weights.device``, with no host round-trip: the argmax of ``weights / E`` with ``E ~ Exponential(1)`` per token
    (gpt-fast's ``multinomial_sample_one_no_sync``; the least of independent exponentials of rates ``w_i`` is ``j``
    with probability ``w_j / sum w``). Row ``i``'s noise comes from ``generators[i]`` (all on one device, which may
    differ from ``weights``'), so a request's draws depend on its own generator only. A row whose weights hold NaN
    gets ``FAILED_TOKEN`` (the row's maximum is then NaN). ``weights`` is left as it is.
    """
    noise = move(_exponential(weights.shape[1], generators), weights.device)
    best = torch.div(weights, noise, out=noise).max(dim=-1)  # max, not argmax: the same index, 4x faster on a CPU
    return best.indices.masked_fill_(best.values.isnan(), FAILED_TOKEN)


def _exponential(size: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """``[len(generators), size]`` float32 Exponential(1) noise, row ``i`` from ``generators[i]``, on their device,
    as ``-log(U)``: ``U`` in [0, 1) is never 1, so the noise is never 0 (``weights / noise`` stays finite); ``U = 0``
    gives inf, a token that cannot win (probability 2^-24 per token). Faster on a CPU than
    ``Tensor.exponential_``; row ``i`` holds what ``torch.rand(size, generator=generators[i])`` draws."""
    noise = torch.empty(len(generators), size, device=generators[0].device)
    for row, generator in zip(noise, generators):
        row.uniform_(generator=generator)
    return noise.log_().neg_()


def adjust_logits(logits: torch.Tensor, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
                  output_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """``logits [b, vocab]`` with each row's penalties and bias applied (``SamplingParams``' order), as one indexed
    update per kind over the (row, token) entries it changes; row ``i`` penalises ``prompt_ids[i]`` (repetition only) and
    ``output_ids[i]`` (ids past ``vocab`` are ignored). Returns ``logits`` itself when no row adjusts, else a new
    tensor. The adjustments run in float64 and saturate at the logits dtype's largest finite value (see the
    module docstring); a zero logit stays zero under any repetition penalty (transformers' rule: negative logits
    are multiplied, the others divided). A row's settings that are off (penalty 1, 0) leave its logits exact."""
    rows = [row for row, row_params in enumerate(params) if row_params.adjusts_logits]
    if not rows:
        return logits
    vocab, device = logits.shape[1], logits.device
    chosen = [params[row] for row in rows]
    values = logits[rows].double()  # [n, vocab]: a penalty may take a logit far past float32's range
    flat_values = values.view(-1)
    # Each stage touches only the (row, id) entries it changes, as flat indices ``row * vocab + id``.
    seen = [(i * vocab + token, p.repetition_penalty) for i, (row, p) in enumerate(zip(rows, chosen))
            if p.repetition_penalty != 1 for token in set(prompt_ids[row]) | set(output_ids[row]) if token < vocab]
    if seen:
        index, penalty = _entries(seen, device)
        scores = flat_values[index]
        flat_values[index] = torch.where(scores < 0, scores * penalty, scores / penalty)
    counted = [(i * vocab + token, count, p.frequency_penalty, p.presence_penalty)
               for i, (row, p) in enumerate(zip(rows, chosen)) if p.presence_penalty or p.frequency_penalty
               for token, count in Counter(output_ids[row]).items() if token < vocab]
    if counted:
        index, count, frequency, presence = _entries(counted, device)
        flat_values[index] -= frequency * count + presence
    bias = [(i * vocab + token, amount) for i, p in enumerate(chosen) for token, amount in p.logit_bias
            if token < vocab]
    if bias:
        index, amount = _entries(bias, device)
        flat_values.index_add_(0, index, amount)  # in order: a token biased twice adds both, as one row would
    largest = torch.finfo(logits.dtype).max
    if len(rows) == len(params):
        return values.clamp_(-largest, largest).to(logits.dtype)
    adjusted = logits.clone()
    adjusted[rows] = values.clamp_(-largest, largest).to(logits.dtype)
    return adjusted


def _entries(entries: list[tuple], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``[(flat index, value, ...)]`` -> ``(index [t] int64, value [t] float64, ...)`` on ``device``."""
    index, *values = zip(*entries)
    return (to_device(index, torch.long, device), *(to_device(column, torch.float64, device) for column in values))


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host ``values`` as a 1-D tensor on ``device`` (``move``)."""
    return move(torch.tensor(values, dtype=dtype), device)


def move(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. From the CPU to a GPU through pinned memory, so the host does not wait: a copy
    from pageable memory waits for every kernel queued before it (the step's forward, when sampling)."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
