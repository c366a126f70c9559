"""A bounded property-based fuzz of the server: a few hundred requests over the whole request schema, valid
and invalid values of every field (the sampling edges included: temperature 1e-300, top_p 1e-300,
repetition_penalty 5e-324), against a one-rank server in the test process. Every answer is below 500 and
every error has OpenAI's body; every stream parses and ends with ``[DONE]``; the server is healthy at the
end. Hypothesis is derandomized (a fixed seed), so the run is the same every time. ``bench/serve_fuzz.py``
runs the same requests by the thousand against real ``cptoolkit serve`` jobs."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.inprocess_server import InProcessServer, sse_events
from tests.serve_fuzz_schema import is_openai_error, request_bodies

EXAMPLES = 200


@pytest.fixture(scope="module")
def server():
    with InProcessServer() as running:
        tokenizer = running.engine.tokenizer  # a stand-in chat template, so chat requests reach the engine
        tokenizer.render_chat = lambda messages: tokenizer.encode(
            "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>")
        yield running


def check_answer(response: httpx.Response, stream: bool) -> None:
    """Below 500; an error has OpenAI's body; a 200 stream is events that end with ``[DONE]``, with no error
    event; a 200 answer has choices."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code != 200:
        assert is_openai_error(response), (response.status_code, response.text[:500])
        return
    if stream:
        events = sse_events(response)
        assert events and events[-1] == "[DONE]", response.text[-500:]
        assert not any("error" in event for event in events[:-1]), response.text[-500:]
    else:
        assert response.json()["choices"], response.text[:500]


@settings(derandomize=True, max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(request=request_bodies())
def test_fuzzed_requests_get_a_sound_answer(server, request):
    path, body = request
    # json.dumps: NaN/Infinity and lone surrogates travel as a careless client would send them
    response = httpx.post(f"{server.url}{path}", content=json.dumps(body), timeout=60,
                          headers={"content-type": "application/json"})
    check_answer(response, stream=isinstance(body, dict) and body.get("stream") is True)


def test_the_server_is_healthy_after_the_fuzz(server):
    """Runs after the fuzz (pytest keeps file order): the loop survived and no KV block leaked."""
    assert server.get("/health").status_code == 200 and server.loop_alive and server.failure is None
    assert server.engine.cache.num_free_blocks == server.engine.cache.num_blocks
