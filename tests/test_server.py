"""launch/serve.py as clients use it: the official ``openai`` client against a real server on 127.0.0.1,
at one rank (plain python) and four (torchrun, TP=2 x PCP=2 x DCP=4); what it answers equals the offline
engine's ``generate``; bad requests, disconnects, SIGTERM and a dead rank."""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml

from cptoolkit.models.tokenizer import ByteTokenizer
from tests.multiproc import free_port, run_ranks

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
MODEL = "tiny-gqa"  # /v1/models names the checkpoint directory of the reference configs
MAX_TOKENS = 6
PROMPTS = [f"request {i}: {'context parallelism ' * (i % 5)}splits the sequence"[: 12 + 5 * i] for i in range(32)]
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 11}
SAMPLED_FIELDS = {"temperature": 0.9, "top_p": 0.95, "seed": 11, "extra_body": {"top_k": 50}}  # top_k: not OpenAI's
EOS = (256,)  # the byte tokenizer's, which the server stops on
LOGPROBS = 3
# Prompts scored with echo (lm-eval's loglikelihood requests): one short, one spanning several cache pages.
SCORED = [PROMPTS[3], "context parallelism shards the prompt over ranks; " * 4]
PENALTIES = {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.7,
             "logit_bias": ((ord("e"), 4.0), (ord(" "), -3.0))}
UNPENALIZED = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": ()}
LOGPROB_ATOL = 1e-5  # the server batches requests differently from the offline run
BYTES = ByteTokenizer()  # names tokens as the server does
# The one-rank server runs launch/serve.py with a stand-in chat template on the byte tokenizer (the
# built-in model has none), so /v1/chat/completions can be checked end to end; the four-rank server is
# launch/serve.py untouched, where chat must be a 400 with the tokenizer's own message.
_STUB_TEMPLATE = "''.join(f\"<|{m['role']}|>{m['content']}\\n\" for m in messages) + '<|assistant|>'"
_SERVE_WITH_STUB_TEMPLATE = (
    "import runpy, sys\n"
    "from cptoolkit.models.tokenizer import ByteTokenizer\n"
    f"ByteTokenizer.render_chat = lambda self, messages: self.encode({_STUB_TEMPLATE})\n"
    "sys.argv = ['launch/serve.py', *sys.argv[1:]]\n"
    "runpy.run_path('launch/serve.py', run_name='__main__')\n")


def _stub_chat_prompt(messages: list[dict]) -> str:
    return eval(_STUB_TEMPLATE, {}, {"messages": messages})  # noqa: S307 - the template above, nothing else


def _config(tmp_path: Path, name: str, collective_timeout_s: float = 60, **parallel) -> Path:
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    raw["model"]["checkpoint"] = str(REPO / "configs" / raw["model"]["checkpoint"])  # the copy lives in tmp_path
    raw["inference"].update(batch_size=8, max_seq_len=448)
    raw["parallel"].update(parallel)
    raw["runtime"]["collective_timeout_s"] = collective_timeout_s
    path = tmp_path / f"serve_{name}"
    path.write_text(yaml.safe_dump(raw))
    return path


class Server:
    """A launch/serve.py job: its process (torchrun or python), port, log and clients."""

    def __init__(self, command: list[str], port: int, log: Path, env: dict | None = None):
        self.port, self.log = port, log
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
                                            env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 180
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not come up:\n{self.tail()}")
            time.sleep(0.2)

    @classmethod
    def python(cls, config: Path, log: Path, stub_chat_template: bool = False) -> "Server":
        port = free_port()
        script = ["-c", _SERVE_WITH_STUB_TEMPLATE] if stub_chat_template else ["launch/serve.py"]
        return cls([sys.executable, *script, "--config", str(config), "--port", str(port)], port, log,
                   env={"MASTER_PORT": str(free_port())})

    @classmethod
    def torchrun(cls, nproc: int, config: Path, log: Path) -> "Server":
        port = free_port()
        return cls([*TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port",
                    str(free_port()), "launch/serve.py", "--config", str(config), "--port", str(port)], port, log)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self, timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=timeout)

    def workers(self) -> list[int]:
        """The rank processes: torchrun's children in rank order, or the python process itself."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [int(pid) for pid in children] if self.process.args[2:3] == ["torch.distributed.run"] \
            else [self.process.pid]

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        match = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def wait_for_metric(self, name: str, value: float, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} stayed {self.metric(name)}, expected {value}"
            time.sleep(0.1)

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def stop(self) -> None:
        """Kill the ranks, then torchrun (its workers run in sessions of their own and would outlive it)."""
        if self.process.poll() is None:
            for pid in self.workers():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
        self.process.wait()


def _offline_rank(rank, world_size, config_path: str, prompts: list, chat_prompts: list) -> dict:
    """The offline engine on the server's config: greedy for every prompt in one ``generate``, and each
    sampled prompt alone (index 0, as the server seeds it)."""
    from cptoolkit.config import load_config
    from cptoolkit.inference.builder import build_engine
    from cptoolkit.inference.sampling import SamplingParams
    from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel

    cfg = load_config(config_path)
    p, m = cfg.parallel, cfg.model
    groups = initialize_model_parallel(tp=p.tp, pcp=p.pcp, dcp=p.dcp, num_heads=m.num_attention_heads,
                                       num_kv_heads=m.num_kv_heads)
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        greedy = SamplingParams(temperature=0.0, max_new_tokens=MAX_TOKENS)
        sampled = SamplingParams(max_new_tokens=MAX_TOKENS, **SAMPLED)
        reference = {"greedy": [r.text for r in engine.generate(prompts + chat_prompts, greedy)],
                     "sampled": [engine.generate([prompt], sampled)[0].text for prompt in prompts[:2]]}
        scoring = SamplingParams(temperature=0.0, max_new_tokens=0, prompt_logprobs=LOGPROBS, stop_token_ids=EOS)
        with_logprobs = SamplingParams(temperature=0.0, max_new_tokens=MAX_TOKENS, logprobs=LOGPROBS,
                                       stop_token_ids=EOS)
        three = SamplingParams(max_new_tokens=MAX_TOKENS, stop_token_ids=EOS, **SAMPLED)
        penalized = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=EOS, **PENALTIES)
        reference.update(
            scored=[r.prompt_logprobs for r in engine.generate([list(p.encode()) for p in SCORED], scoring)],
            generated=engine.generate([prompts[2]], with_logprobs)[0],
            three_choices=[r.text for r in engine.generate([prompts[4]] * 3, three)],
            penalized=engine.generate([prompts[6]], penalized)[0].text,
            unpenalized=engine.generate([prompts[6]], dataclasses.replace(penalized, **UNPENALIZED))[0].text)
        return reference
    finally:
        destroy_model_parallel()


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one_rank")
    config = _config(tmp, "tp1_pcp1_dcp1.yaml")
    reference = run_ranks(1, _offline_rank, str(config), PROMPTS, [_stub_chat_prompt(CHAT)])[0]
    server = Server.python(config, tmp / "server.log", stub_chat_template=True)
    yield server, reference
    server.stop()


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("four_ranks")
    config = _config(tmp, "tp2_pcp2_dcp4.yaml")
    reference = run_ranks(4, _offline_rank, str(config), PROMPTS, [], timeout_s=240)[0]
    server = Server.torchrun(4, config, tmp / "server.log")
    yield server, reference
    server.stop()


CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is DCP?"}]


def _complete(client: openai.OpenAI, prompt, stream: bool, **fields) -> tuple[str, str, dict]:
    """(text, finish_reason, usage) of one completion, streamed or not."""
    fields = {"max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    if not stream:
        response = client.completions.create(model=MODEL, prompt=prompt, **fields)
        choice = response.choices[0]
        return choice.text, choice.finish_reason, response.usage.model_dump(exclude_none=True)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                            stream_options={"include_usage": True}, **fields))
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finish[-1] is not None and not any(finish[:-1]), finish
    return text, finish[-1], chunks[-1].usage.model_dump(exclude_none=True)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def test_completions_streamed_or_not_equal_the_offline_engine(one_rank):
    server, reference = one_rank
    client = server.client()
    assert [model.id for model in client.models.list()] == [MODEL]
    for stream in (False, True):
        text, finish_reason, usage = _complete(client, PROMPTS[3], stream)
        assert (text, finish_reason) == (reference["greedy"][3], "length")
        assert usage == _usage(len(PROMPTS[3].encode()), MAX_TOKENS)
    token_ids = list(PROMPTS[3].encode())
    assert _complete(client, token_ids, stream=False)[0] == reference["greedy"][3]
    sampled = [_complete(client, PROMPTS[0], stream=False, **SAMPLED_FIELDS)[0] for _ in range(2)]
    assert sampled == [reference["sampled"][0]] * 2


def test_chat_streamed_or_not_uses_the_chat_template(one_rank):
    server, reference = one_rank
    client = server.client()
    want = reference["greedy"][len(PROMPTS)]
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert response.choices[0].message.role == "assistant" and response.choices[0].message.content == want
    assert response.usage.prompt_tokens == len(_stub_chat_prompt(CHAT).encode())
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


@pytest.mark.parametrize("layout", ["one_rank", "four_ranks"])
def test_32_concurrent_requests_all_answered_as_the_offline_engine(layout, request):
    server, reference = request.getfixturevalue(layout)
    client = server.client()
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda i: _complete(client, PROMPTS[i], stream=i % 2 == 1), range(len(PROMPTS))))
    for i, (text, finish_reason, usage) in enumerate(answers):
        assert text == reference["greedy"][i], (layout, i)
        assert finish_reason == "length" and usage == _usage(len(PROMPTS[i].encode()), MAX_TOKENS), (i, usage)
    sampled = _complete(client, PROMPTS[1], stream=True, **SAMPLED_FIELDS)[0]
    assert sampled == reference["sampled"][1]
    assert server.metric("cptoolkit_kv_blocks_used") == 0


def test_streams_flow_while_the_engine_is_busy(one_rank):
    """Eight streams at once: each one's tokens arrive while it decodes, not in a burst at its end
    (the engine thread must let the HTTP thread run between steps)."""
    server, _ = one_rank
    client = server.client()

    def chunk_times(i: int) -> list[float]:
        start = time.perf_counter()
        stream = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=48, temperature=0, stream=True)
        return [time.perf_counter() - start for chunk in stream if chunk.choices[0].text]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for times in pool.map(chunk_times, range(8)):
            assert times[-1] - times[0] > 0.5 * times[-1], f"first chunk at {times[0]:.3f} s, last {times[-1]:.3f} s"


def _error(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.body


BAD_FIELDS = {
    "n": ({"n": 17}, "n: Input should be less than or equal to 16"),
    "best_of": ({"n": 2, "best_of": 3}, "best_of: 3 is not supported: cptoolkit returns every choice it samples"),
    "suffix": ({"suffix": "end"}, "suffix: is not supported: cptoolkit has no fill-in-the-middle models"),
    "penalty": ({"presence_penalty": 2.5}, "presence_penalty: Input should be less than or equal to 2"),
    "logprobs": ({"logprobs": 21}, "logprobs: Input should be less than or equal to 20"),
    "logit_bias range": ({"logit_bias": {"65": 101}}, "logit_bias: 65: 101.0: each bias must be in [-100, 100]"),
    "logit_bias key": ({"logit_bias": {"A": 1}}, "keys are token ids (strings of digits)"),
    "logit_bias id": ({"logit_bias": {"258": 1}}, "logit_bias: token id 258 is outside the vocabulary [0, 258)"),
    "stream batch": ({"prompt": ["a", "b"], "stream": True}, "stream: a stream carries one prompt"),
    "stream echo": ({"echo": True, "logprobs": 1, "stream": True}, "stream: echo with logprobs is answered whole"),
    "temperature": ({"temperature": -1}, "temperature: Input should be greater than or equal to 0"),
    "top_p": ({"top_p": 0}, "top_p: Input should be greater than 0"),
    "max_tokens": ({"max_tokens": "many"}, "max_tokens: Input should be a valid integer"),
    "unknown": ({"temprature": 0.5}, "temprature: unknown field"),
    "too long": ({"max_tokens": 440}, "exceeds max_seq_len 448"),
}


def test_bad_requests_are_400_and_disturb_no_other_request(one_rank):
    server, reference = one_rank
    client = server.client()
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True)
    for name, (fields, message) in BAD_FIELDS.items():
        status, body = _error(lambda: client.completions.create(model=MODEL, prompt=PROMPTS[0], extra_body=fields))
        assert status == 400 and body["type"] == "invalid_request_error" and message in body["message"], (name, body)
    status, body = _error(lambda: client.completions.create(model="gpt-4", prompt="x"))
    assert status == 404 and body["code"] == "model_not_found", body
    bad_json = httpx.post(f"{server.url}/v1/completions", content=b'{"model": ', timeout=10,
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"], bad_json.text
    assert "".join(chunk.choices[0].text for chunk in stream) == reference["greedy"][5]


def _assert_logprob_entry(got_logprob, got_top: dict, want) -> None:
    """An OpenAI completions logprob entry (logprob, {token text: logprob}) against the engine's TokenLogprob."""
    assert abs(got_logprob - want.logprob) <= LOGPROB_ATOL, (got_logprob, want)
    name = BYTES.token_text
    want_top = {name(token_id): logprob for token_id, logprob in want.top} | {name(want.token_id): want.logprob}
    assert got_top.keys() == want_top.keys(), (got_top, want)
    assert all(abs(got_top[token] - want_top[token]) <= LOGPROB_ATOL for token in want_top), (got_top, want)


@pytest.mark.parametrize("layout", ["one_rank", "four_ranks"])
def test_echo_scores_the_prompt_as_lm_eval_asks(layout, request):
    """lm-eval's loglikelihood request: a batch of token-id prompts, echo, max_tokens 1 (or 0), logprobs;
    every prompt token after the first has the offline engine's logprob and top alternatives (the
    four-rank server scores each prompt over PCP = 2), and ``tok == max(top)`` finds the greedy tokens."""
    server, reference = request.getfixturevalue(layout)
    prompts = [list(prompt.encode()) for prompt in SCORED]
    for max_tokens in (0, 1):
        response = server.client().completions.create(model=MODEL, prompt=prompts, echo=True, max_tokens=max_tokens,
                                                      logprobs=LOGPROBS, temperature=0)
        assert [choice.index for choice in response.choices] == [0, 1]
        assert response.usage.prompt_tokens == sum(map(len, prompts))
        assert response.usage.completion_tokens == max_tokens * len(prompts)
        for choice, prompt, want in zip(response.choices, SCORED, reference["scored"]):
            assert choice.text.startswith(prompt) and len(choice.text) >= len(prompt)
            logprobs = choice.logprobs
            assert logprobs.tokens[:len(prompt)] == list(prompt) and len(logprobs.tokens) == len(prompt) + max_tokens
            assert logprobs.text_offset[:len(prompt)] == list(range(len(prompt)))
            assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
            for position in range(1, len(prompt)):
                _assert_logprob_entry(logprobs.token_logprobs[position], logprobs.top_logprobs[position],
                                      want[position])
            greedy = [logprobs.token_logprobs[i] == max(logprobs.top_logprobs[i].values())
                      for i in range(1, len(prompt))]
            assert greedy == [want[i].token_id == want[i].top[0][0] for i in range(1, len(prompt))]


def test_generated_logprobs_streamed_or_not_and_chat_top_logprobs(one_rank):
    server, reference = one_rank
    client, want = server.client(), reference["generated"]
    response = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0,
                                         logprobs=LOGPROBS)
    logprobs = response.choices[0].logprobs
    tokens = [BYTES.token_text(token_id) for token_id in want.token_ids]
    assert logprobs.tokens == tokens
    assert logprobs.text_offset == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    for got_logprob, got_top, entry in zip(logprobs.token_logprobs, logprobs.top_logprobs, want.logprobs, strict=True):
        _assert_logprob_entry(got_logprob, got_top, entry)
    chunks = [chunk.choices[0] for chunk in client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0, logprobs=LOGPROBS, stream=True)]
    streamed = [entry for chunk in chunks if chunk.logprobs for entry in zip(
        chunk.logprobs.tokens, chunk.logprobs.token_logprobs, chunk.logprobs.text_offset)]
    assert streamed == list(zip(logprobs.tokens, logprobs.token_logprobs, logprobs.text_offset))
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob  # greedy


@pytest.mark.parametrize("layout", ["one_rank", "four_ranks"])
def test_n_choices_and_penalties_equal_the_offline_engine(layout, request):
    """``n = 3`` (the prompt prefilled once, its pages shared) draws choice j as the offline engine's request
    j with the same seed, streamed or not; penalties and logit_bias as the offline engine applies them."""
    server, reference = request.getfixturevalue(layout)
    client = server.client()
    response = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=MAX_TOKENS, n=3, **SAMPLED_FIELDS)
    assert [choice.text for choice in sorted(response.choices, key=lambda c: c.index)] == reference["three_choices"]
    assert response.usage.completion_tokens == 3 * MAX_TOKENS and response.usage.prompt_tokens == len(PROMPTS[4])
    texts = {}
    for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=MAX_TOKENS, n=3, stream=True,
                                           **SAMPLED_FIELDS):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[i] for i in range(3)] == reference["three_choices"]
    bias = {str(token_id): value for token_id, value in PENALTIES["logit_bias"]}
    penalized = client.completions.create(
        model=MODEL, prompt=PROMPTS[6], max_tokens=12, temperature=0, presence_penalty=PENALTIES["presence_penalty"],
        frequency_penalty=PENALTIES["frequency_penalty"], logit_bias=bias,
        extra_body={"repetition_penalty": PENALTIES["repetition_penalty"]})
    assert penalized.choices[0].text == reference["penalized"]
    assert reference["penalized"] != reference["unpenalized"]  # the penalties change this generation
    assert server.metric("cptoolkit_kv_blocks_used") == 0


def test_chat_without_a_template_is_400_with_the_tokenizers_message(four_ranks):
    server, _ = four_ranks
    status, body = _error(lambda: server.client().chat.completions.create(model=MODEL, messages=CHAT))
    assert status == 400 and "has no chat template" in body["message"], body


def test_a_client_that_disconnects_frees_its_blocks(four_ranks):
    server, _ = four_ranks
    cancelled = server.metric("cptoolkit_requests_finished_total", '{finish_reason="cancelled"}')
    stream = server.client().completions.create(model=MODEL, prompt=PROMPTS[7], max_tokens=400, stream=True,
                                                extra_body={"ignore_eos": True})
    next(iter(stream))
    assert server.metric("cptoolkit_kv_blocks_used") > 0
    stream.close()
    server.wait_for_metric("cptoolkit_kv_blocks_used", 0)
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 400,
                                                           "ignore_eos": True}, timeout=1.0)
    server.wait_for_metric("cptoolkit_kv_blocks_used", 0)
    assert server.metric("cptoolkit_requests_finished_total", '{finish_reason="cancelled"}') == cancelled + 2


@pytest.mark.parametrize("layout", ["one_rank", "four_ranks"])
def test_sigterm_drains_then_every_rank_exits_0(layout, request):
    """SIGTERM to every rank while a stream is in flight: new requests get 503, the stream ends in full."""
    server, _ = request.getfixturevalue(layout)
    client = server.client()
    stream = iter(client.completions.create(model=MODEL, prompt=PROMPTS[9], max_tokens=48, temperature=0,
                                            extra_body={"ignore_eos": True},
                                            stream=True, stream_options={"include_usage": True}))
    chunks = [next(stream)]
    for pid in server.workers():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
        assert time.monotonic() < deadline, "still healthy 10 s after SIGTERM"
        time.sleep(0.05)
    status, body = _error(lambda: client.completions.create(model=MODEL, prompt="late", max_tokens=2))
    assert status == 503 and "shutting down" in body["message"], body
    chunks += list(stream)
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 48, chunks[-2:]
    assert server.process.wait(timeout=60) == 0, server.tail()
    assert "drained; every request answered" in server.log.read_text()


def test_a_dead_rank_makes_the_server_answer_503_and_the_job_exit_fast(tmp_path):
    config = _config(tmp_path, "tp1_pcp1_dcp1.yaml", collective_timeout_s=5, pcp=2, dcp=2)
    server = Server.torchrun(2, config, tmp_path / "server.log")
    try:
        answers: list = []
        waiting = threading.Thread(target=lambda: answers.append(_error(lambda: server.client().completions.create(
            model=MODEL, prompt=PROMPTS[6], max_tokens=400, extra_body={"ignore_eos": True}))))
        waiting.start()
        server.wait_for_metric("cptoolkit_requests_in_engine", 1)
        os.kill(server.workers()[1], signal.SIGKILL)
        killed_at = time.monotonic()
        returncode = server.process.wait(timeout=60)
        took = time.monotonic() - killed_at
        waiting.join(timeout=10)
    finally:
        server.stop()
    assert returncode != 0 and took < 30, (returncode, took, server.tail())
    assert answers and answers[0][0] == 503 and "the engine failed" in answers[0][1]["message"], answers
