"""Every error the server answers has OpenAI's body, FastAPI's and Starlette's own parse errors included;
limits name the field the client sent; the OpenAPI schema documents the statuses the server answers; a
request that fails in the engine, and an engine that dies, end their streams with an error event and
``[DONE]``; ``/health`` turns 503 when the engine loop stalls. One-rank servers inside the test process
(``tests/inprocess_server.py``)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time

import httpx
import pytest

from cptoolkit.serving.app import HTTPOptions
from tests.inprocess_server import MODEL, InProcessServer, sse_events
from tests.serve_fuzz_schema import is_openai_error

JSON = {"content-type": "application/json"}
CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture
def server():
    with InProcessServer() as running:
        yield running


def _stub_chat_template(server: InProcessServer) -> None:
    """The byte tokenizer has no chat template: render messages as their contents, so chat reaches the engine."""
    tokenizer = server.engine.tokenizer
    tokenizer.render_chat = lambda messages: tokenizer.encode("".join(m["content"] for m in messages))


PARSE_ERRORS = {
    "invalid UTF-8": (b'{"model": "\xff\xfe"}', JSON, "not valid UTF-8 JSON"),
    "invalid JSON": (b'{"model": ', JSON, "not valid JSON"),
    "nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, JSON, "nested too deeply"),
    "a form": (b"model=tiny-gqa&prompt=x", {"content-type": "application/x-www-form-urlencoded"},
               "sent with Content-Type: application/json"),
    "no content type": (b'{"model": "tiny-gqa", "prompt": "x"}', {}, "sent with Content-Type: application/json"),
    "a JSON list": (b"[]", JSON, "must be a JSON object"),
    "empty": (b"", JSON, "the request body is empty"),
    "a surrogate field name": (b'{"model": "tiny-gqa", "prompt": "x", "\\ud800": 1}', JSON,
                               "a field name in the request body cannot be encoded as UTF-8"),
    "NaN": (b'{"model": "tiny-gqa", "prompt": "x", "temperature": NaN}', JSON, "temperature: Input should be a finite"),
    "a 5000-digit integer": (b'{"model": "tiny-gqa", "prompt": "x", "seed": ' + b"9" * 5000 + b"}", JSON,
                             "could not be parsed as JSON: Exceeds the limit (4300 digits)"),
}


def test_parse_errors_are_400_with_the_openai_body(server):
    for name, (content, headers, message) in PARSE_ERRORS.items():
        response = httpx.post(f"{server.url}/v1/completions", content=content, headers=headers, timeout=30)
        assert response.status_code == 400 and is_openai_error(response), (name, response.status_code, response.text)
        assert message in response.json()["error"]["message"], (name, response.text)
    assert server.get("/health").status_code == 200


def test_unknown_routes_and_wrong_methods_have_the_openai_body(server):
    for method, path, status, message in [("GET", "/v2/completions", 404, "no route GET /v2/completions"),
                                          ("POST", "/v1/embeddings", 404, "no route POST /v1/embeddings"),
                                          ("GET", "/v1/completions", 405, "GET is not allowed on /v1/completions"),
                                          ("DELETE", "/health", 405, "DELETE is not allowed on /health")]:
        response = httpx.request(method, f"{server.url}{path}", timeout=10)
        assert response.status_code == status and is_openai_error(response), (method, path, response.text)
        assert message in response.json()["error"]["message"], response.text


def test_unencodable_text_is_400_naming_the_field(server):
    """A lone surrogate (JSON ``"\\ud800"``) cannot be tokenized: 400 naming the field, not a 500."""
    _stub_chat_template(server)
    cases = {"prompt": {"prompt": "ok \ud800"},
             "stop": {"prompt": "x", "stop": ["\ud800"]},
             "messages.0.content": {"messages": [{"role": "user", "content": "\ud800"}]},
             "messages.0.content.0.text": {"messages": [{"role": "user",
                                                         "content": [{"type": "text", "text": "a\ud800"}]}]}}
    for param, fields in cases.items():
        path = "/v1/chat/completions" if "messages" in fields else "/v1/completions"
        # json.dumps escapes a lone surrogate as "\ud800", as a client's JSON would carry it
        response = httpx.post(f"{server.url}{path}", content=json.dumps({"model": MODEL, **fields}), headers=JSON,
                              timeout=30)
        assert response.status_code == 400 and is_openai_error(response), (param, response.text)
        error = response.json()["error"]
        assert error["param"] == param and "cannot be encoded as UTF-8" in error["message"], (param, error)
    batch = httpx.post(f"{server.url}/v1/completions", content=json.dumps({"model": MODEL, "prompt": ["a", "\udfff"]}),
                       headers=JSON, timeout=30)
    assert batch.status_code == 400 and batch.json()["error"]["param"] == "prompt", batch.text
    assert "prompt 1 of the batch: '\\udfff' at character 0" in batch.json()["error"]["message"], batch.text
    assert server.get("/health").status_code == 200


def test_length_limits_name_the_field_the_client_sent(server):
    _stub_chat_template(server)
    cases = [("/v1/completions", {"prompt": "x", "max_tokens": 10 ** 9}, "max_tokens",
              "max_tokens: 1 prompt tokens + max_tokens 1000000000 = 1000000001 exceeds max_seq_len 448"),
             ("/v1/completions", {"prompt": "x" * 440}, "prompt", "the default max_tokens 16"),
             ("/v1/completions", {"prompt": "x" * 448, "max_tokens": 4}, "prompt", "exceeds max_seq_len 448"),
             ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 10 ** 9}, "max_completion_tokens",
              "max_completion_tokens 1000000000"),
             ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2 ** 40}, "max_tokens", "exceeds max_seq_len"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 448}]}, "messages",
              "448 prompt tokens")]
    for path, fields, param, message in cases:
        response = server.post(path, {"model": MODEL, **fields})
        assert response.status_code == 400 and is_openai_error(response), (fields, response.text)
        assert response.json()["error"]["param"] == param and message in response.json()["error"]["message"], \
            (fields, response.text)
    ok = server.post("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3, ok.text


def test_the_openapi_schema_documents_what_the_server_answers(server):
    schema = server.get("/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = paths[path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "404", "413", "500", "503"}, (path, sorted(responses))
        error_schema = responses["400"]["content"]["application/json"]["schema"]
        assert error_schema == {"$ref": "#/components/schemas/ErrorResponse"}
    assert not [(p, m) for p, operations in paths.items() for m, o in operations.items() if "422" in o["responses"]]
    assert set(paths["/health"]["get"]["responses"]) == {"200", "503"}
    # what the schema promises for a bad field is what the server answers
    response = server.post("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"})
    assert str(response.status_code) in paths["/v1/completions"]["post"]["responses"] and is_openai_error(response)
    assert server.get("/docs").status_code == 404  # the docs UI stays off


def _failing_results(server: InProcessServer, prompt_ids: list[int]) -> None:
    """Make every request of ``prompt_ids`` end as the engine ends one that failed while generating it:
    ``finish_reason`` "error", ``error_status`` 500, its tokens so far kept."""
    real_result = server.engine.result

    def result(request_id):
        real = real_result(request_id)
        if real.prompt_token_ids != prompt_ids:
            return real
        return dataclasses.replace(real, finish_reason="error", error="sampling failed: boom", error_status=500)

    server.engine.result = result


def test_a_request_that_fails_while_generating_gets_its_error_and_the_others_carry_on(server):
    _failing_results(server, list(b"doomed"))
    body = {"model": MODEL, "prompt": "doomed", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    answer = server.post("/v1/completions", body)
    assert answer.status_code == 500 and is_openai_error(answer), answer.text
    assert answer.json()["error"] == {"message": "sampling failed: boom", "type": "server_error", "param": None,
                                      "code": None}
    streamed = server.post("/v1/completions", {**body, "stream": True})
    events = sse_events(streamed)
    assert streamed.status_code == 200 and events[-1] == "[DONE]", streamed.text
    assert events[-2] == {"error": answer.json()["error"]}, events[-2:]
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) != ""  # the tokens before the failure came
    first = server.post("/v1/completions", {**body, "max_tokens": 1, "stream": True})  # fails at its first token
    assert first.status_code == 500 and is_openai_error(first), first.text
    healthy = server.post("/v1/completions", {**body, "prompt": "fine"})
    assert healthy.status_code == 200 and healthy.json()["choices"][0]["finish_reason"] == "length"
    assert server.get("/health").status_code == 200 and server.loop_alive


def test_an_engine_that_dies_ends_every_stream_with_an_error_event_then_done(server):
    """What ``Coordinator._fail_in_flight`` sends when a collective fails: every stream in flight gets the
    503 body as an event, then ``[DONE]``; a request waiting for its whole answer gets the 503 itself."""
    real_step, fail = server.engine.step, threading.Event()

    def step():
        if fail.is_set():
            raise RuntimeError("a collective failed: peer rank 1 died")
        return real_step()

    server.engine.step = step
    body = {"model": MODEL, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    answers: dict = {}
    clients = [threading.Thread(target=lambda i=i: answers.__setitem__(i, server.post(
        "/v1/completions", {**body, "prompt": f"stream {i}", "stream": i < 3}))) for i in range(4)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 30
    while len(server.coordinator._engine_ids) < 4 or server.metrics.generation_tokens < 8:  # all four generating
        assert time.monotonic() < deadline, "the four requests did not all start"
        time.sleep(0.01)
    fail.set()
    for client in clients:
        client.join(timeout=60)
    for i in range(3):
        events = sse_events(answers[i])
        assert answers[i].status_code == 200 and events[-1] == "[DONE]", answers[i].text[-500:]
        assert events[-2]["error"]["type"] == "service_unavailable", events[-2]
        assert "the engine failed (RuntimeError: a collective failed" in events[-2]["error"]["message"]
    assert answers[3].status_code == 503 and is_openai_error(answers[3]), answers[3].text
    server.join_loop(timeout_s=10)
    assert isinstance(server.failure, RuntimeError) and not server.loop_alive
    assert server.get("/health").status_code == 503


def test_health_is_503_while_the_engine_loop_makes_no_progress():
    """The loop stalls (as in a broadcast to a stopped rank): ``/health`` answers 503 once it has not come
    by the inbox for ``health_stall_s``, and 200 again once it moves."""
    with InProcessServer(HTTPOptions(health_stall_s=1.0)) as server:
        assert server.get("/health").status_code == 200
        release, real_exchange = threading.Event(), server.coordinator._exchange
        server.coordinator._exchange = lambda orders: (release.wait(), real_exchange(orders))[1]
        deadline = time.monotonic() + 10
        while (health := server.get("/health")).status_code == 200:
            assert time.monotonic() < deadline, "still 200 after 10 s of a stalled loop"
            time.sleep(0.1)
        assert health.status_code == 503 and is_openai_error(health), health.text
        assert "made no progress for" in health.json()["error"]["message"]
        release.set()
        time.sleep(0.3)
        assert server.get("/health").status_code == 200


def test_a_rank_killed_mid_stream_ends_the_stream_with_an_error_event_then_done(tmp_path):
    """The real thing at 2 ranks (torchrun, PCP2 x DCP2): SIGKILL rank 1 while a stream is in flight; the
    stream ends with the 503 error event, then ``[DONE]``, and the job exits non-zero."""
    from tests.test_server import Server, _config

    server = Server.torchrun(2, _config(tmp_path, "tp1_pcp1_dcp1.yaml", pcp=2, dcp=2), tmp_path / "server.log")
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "a stream", "max_tokens": 400, "ignore_eos": True,
                                "stream": True}) as response:
            lines = response.iter_lines()
            events = [json.loads(next(line for line in lines if line.startswith("data: "))[6:])]
            os.kill(server.workers()[1], signal.SIGKILL)
            events += [line[6:] for line in lines if line.startswith("data: ")]
        returncode = server.process.wait(timeout=60)
    finally:
        server.stop()
    assert events[-1] == "[DONE]", (events[-3:], server.tail())
    error = json.loads(events[-2])["error"]
    assert error["type"] == "service_unavailable" and "the engine failed" in error["message"], error
    assert returncode != 0


def test_a_stopped_rank_turns_health_to_503_within_its_bound(tmp_path):
    """The real thing at 2 ranks: SIGSTOP rank 1, send a request (its step waits for rank 1 in a collective);
    ``/health`` answers 503 within ``--health-stall-s`` 2 plus a poll, long before the collective timeout (60 s)."""
    from tests.multiproc import free_port
    from tests.test_server import TORCHRUN, Server, _config

    config, port = _config(tmp_path, "tp1_pcp1_dcp1.yaml", pcp=2, dcp=2), free_port()
    server = Server([*TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                     str(free_port()), "launch/serve.py", "--config", str(config), "--port", str(port),
                     "--health-stall-s", "2"], port, tmp_path / "server.log")
    try:
        os.kill(server.workers()[1], signal.SIGSTOP)

        def stuck_request():
            with contextlib.suppress(httpx.HTTPError):  # it never gets an answer: the job is killed below
                httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4},
                           timeout=30)

        threading.Thread(target=stuck_request, daemon=True).start()
        started = time.monotonic()
        while (health := httpx.get(f"{server.url}/health", timeout=10)).status_code == 200:
            assert time.monotonic() - started < 20, "/health still 200 20 s after the rank stopped"
            time.sleep(0.2)
        took = time.monotonic() - started
    finally:
        for pid in server.workers():
            os.kill(pid, signal.SIGCONT)
        server.stop()
    assert health.status_code == 503 and is_openai_error(health) and "made no progress" in health.text, health.text
    assert took < 10, took
