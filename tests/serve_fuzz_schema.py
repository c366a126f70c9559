"""Hypothesis strategies for fuzzing the server: request bodies over the whole schema of
``/v1/completions`` and ``/v1/chat/completions`` (``cptoolkit.serving.protocol``), each field valid or
not: in-range values, the sampling edges (temperature 1e-300 and 1.5899e-211, top_p 1e-300,
repetition_penalty 5e-324 and 1e-40), out-of-range values, wrong types, NaN and Infinity, lone
surrogates, unknown fields, and bodies that are not objects. Generation stays short (``max_tokens`` at
most 4 when valid) so a fuzz of hundreds of requests takes seconds. Most bodies are valid, so most
requests reach the engine; the rest have one field wrong. ``is_openai_error`` says whether an answer has
OpenAI's error body. Shared by the server tests and ``bench/serve_fuzz.py``."""
from __future__ import annotations

import httpx
from hypothesis import strategies as st

MODEL = "tiny-gqa"
EDGE_FLOATS = [0.0, -0.0, 5e-324, 1e-300, 1.5899e-211, 1e-40, 1e-5, 1e300, float("nan"), float("inf"), -1.0]
VALID_TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["the old man", "count: 3 4", "é", "\x00", "😀"]))
TEXT = st.one_of(VALID_TEXT, st.just("\ud800"))
WRONG = st.sampled_from(["x", [], {}, True, None, 1.5, -7])
SMALL_FLOATS = st.sampled_from([5e-324, 1e-300, 1.5899e-211, 1e-40, 1e-5])


def _field(valid, *invalid):
    """(valid values, invalid ones): the edges of floats and wrong types are always among the invalid."""
    return valid, st.one_of(st.sampled_from(list(invalid) + EDGE_FLOATS), WRONG)


SHARED = {
    "temperature": _field(st.one_of(st.floats(0, 2), SMALL_FLOATS), 2.0001),
    "top_p": _field(st.one_of(st.floats(1e-320, 1), SMALL_FLOATS), 1.0000001),
    "top_k": _field(st.integers(0, 300), -1, 10 ** 12, 2 ** 70),
    "seed": _field(st.integers(0, 2 ** 63 - 1), 2 ** 63, -1),
    "stop": _field(st.one_of(VALID_TEXT.filter(bool), st.lists(VALID_TEXT.filter(bool), max_size=4)), "", ["\ud800"],
                   ["a"] * 5),
    "n": _field(st.integers(1, 3), 0, 17, 10 ** 9),
    "stream": _field(st.booleans()),
    "stream_options": _field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
                             {"include_usage": 1}, {"x": True}),
    "presence_penalty": _field(st.floats(-2, 2), 2.5),
    "frequency_penalty": _field(st.floats(-2, 2), -2.5),
    "repetition_penalty": _field(st.one_of(st.floats(1e-3, 10), SMALL_FLOATS, st.just(1e300))),
    "logit_bias": _field(st.dictionaries(st.integers(0, 257).map(str), st.floats(-100, 100), max_size=4),
                         {"258": 1.0}, {"a": 1.0}, {"1": 101.0}, {"²": 1.0}, {"\ud800": 1.0}, {"1": "x"}),
    "user": _field(VALID_TEXT),
    "ignore_eos": _field(st.booleans()),
    "max_tokens": _field(st.integers(0, 4), 10 ** 9, 2 ** 64, 440),
}
COMPLETION = {
    **SHARED,
    "echo": _field(st.booleans()),
    "logprobs": _field(st.integers(0, 20), 21, -1),
    "best_of": _field(st.none(), 3),
    "suffix": _field(st.none(), "end"),
    "prompt": _field(st.one_of(VALID_TEXT.filter(bool), VALID_TEXT.filter(bool),
                               st.lists(st.integers(0, 257), min_size=1, max_size=12),
                               st.lists(VALID_TEXT.filter(bool), min_size=1, max_size=3),
                               st.lists(st.lists(st.integers(0, 257), min_size=1, max_size=8), min_size=1, max_size=3)),
                     "", [], [-1], [300], "\ud800", ["a", "\ud800"], [[1], "a"], ["a"] * 65),
}
VALID_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
    optional={"content": st.one_of(VALID_TEXT, st.none(),
                                   st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": VALID_TEXT}),
                                            max_size=2)),
              "name": VALID_TEXT})
CHAT = {
    **SHARED,
    "max_completion_tokens": _field(st.integers(1, 4), 0, 10 ** 9),
    "logprobs": _field(st.booleans()),
    "top_logprobs": _field(st.integers(0, 20), 21),
    "messages": _field(st.lists(VALID_MESSAGE, min_size=1, max_size=3), [],
                       [{"role": "robot", "content": "x"}], [{"role": "user", "content": "\ud800"}],
                       [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]),
}
REQUIRED = {"/v1/completions": ("model", "prompt"), "/v1/chat/completions": ("model", "messages")}
UNKNOWN = st.sampled_from(["temprature", "functions", "\ud800", "response_format"])


def _valid_body(fields: dict, required: tuple[str, ...]):
    return st.fixed_dictionaries({"model": st.just(MODEL), **{name: fields[name][0] for name in required[1:]}},
                                 optional={name: valid for name, (valid, _) in fields.items() if name not in required})


def _one_field_wrong(fields: dict, required: tuple[str, ...]):
    """A valid body with one field invalid, missing, or added (an unknown one), or the model misnamed."""
    def wrong(body, name_and_value, unknown, how):
        name, value = name_and_value
        if how == "missing":
            return {key: item for key, item in body.items() if key != name}
        if how == "unknown":
            return {**body, unknown: value}
        if how == "model":
            return {**body, "model": value}
        return {**body, name: value}

    name_and_value = st.sampled_from(sorted(fields)).flatmap(lambda name: st.tuples(st.just(name), fields[name][1]))
    return st.builds(wrong, _valid_body(fields, required), name_and_value, UNKNOWN,
                     st.sampled_from(["invalid", "invalid", "invalid", "missing", "unknown", "model"]))


def request_bodies():
    """``(path, body)``: mostly valid bodies (every field in range, the sampling edges included), some with
    one field wrong, a few that are not objects at all."""
    bodies = []
    for path, fields in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        required = REQUIRED[path]
        bodies += [st.tuples(st.just(path), _valid_body(fields, required)),
                   st.tuples(st.just(path), _valid_body(fields, required)),
                   st.tuples(st.just(path), _one_field_wrong(fields, required))]
    not_objects = st.tuples(st.sampled_from(sorted(REQUIRED)), st.one_of(WRONG, st.lists(st.integers(), max_size=3)))
    return st.one_of(*bodies, not_objects)


def is_openai_error(response: httpx.Response) -> bool:
    """An error response with exactly OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""
    try:
        body = response.json()
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return (set(body) == {"error"} and isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str) and bool(error["message"]) and isinstance(error["type"], str))
