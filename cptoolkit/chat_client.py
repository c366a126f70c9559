"""``cptoolkit chat``: talk to a running server's chat endpoint, as ``vllm chat`` does.

    cptoolkit chat [--url http://127.0.0.1:8000/v1] [--model NAME] [--api-key KEY] [--system TEXT]
    cptoolkit chat --quick "one message"          # one turn, the answer on stdout, exit

Each line read from stdin is a user turn; the answer streams to stdout as the server sends it
(``POST /chat/completions`` with ``stream: true``, server-sent events), and the conversation (system turn,
every question and answer) goes with each next request. End of input ends the chat. ``--model`` defaults to
the first model ``GET /models`` lists; ``--api-key`` (or ``CPTOOLKIT_API_KEY``) is sent as ``Authorization:
Bearer``. Exit status: 0; 1 when the server cannot be reached or answers with an error (one line naming the URL
and the server's message).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, TextIO

import httpx

API_KEY_ENV = "CPTOOLKIT_API_KEY"


class ChatError(RuntimeError):
    """The server cannot be reached, or answered with an error: the message says which, and where."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1",
                        help="the server's OpenAI API base URL (default http://127.0.0.1:8000/v1)")
    parser.add_argument("--model", help="the model to ask (default: the first the server lists at /models)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"sent as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    parser.add_argument("--system", metavar="TEXT", help="a system message opening the conversation")
    parser.add_argument("--max-tokens", type=int, help="tokens per answer at most (default: the server's)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    parser.add_argument("--quick", metavar="MESSAGE", help="ask this one message, print the answer and exit")


class ChatClient:
    """One conversation with the server at ``url``: ``ask`` adds the user's turn and the streamed answer."""

    def __init__(self, url: str, model: str | None, api_key: str | None, system: str | None, sampling: dict):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(10.0, read=None))
        self.sampling = sampling
        self.messages = [{"role": "system", "content": system}] if system is not None else []
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        models = self._checked(self._call(lambda: self.http.get("/models"))).json()["data"]
        if not models:
            raise ChatError(f"{self.url}/models lists no model; give --model NAME")
        return models[0]["id"]

    def _call(self, send):
        try:
            return send()
        except httpx.HTTPError as err:
            raise ChatError(f"cannot reach {self.url} ({type(err).__name__}: {err}); is `cptoolkit serve` "
                            "running there?") from None

    def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.status_code != 200:
            response.read()
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise ChatError(f"{self.url} answered {response.status_code}: {message}")
        return response

    def ask(self, text: str) -> Iterator[str]:
        """Send ``text`` as the next user turn; yield the answer's text as it streams. The conversation keeps
        both turns once the answer is complete (a failed turn is dropped)."""
        body = {"model": self.model, "messages": [*self.messages, {"role": "user", "content": text}],
                "stream": True, **self.sampling}
        answer = []
        with self._call(lambda: self.http.stream("POST", "/chat/completions", json=body)) as response:
            for line in self._checked(response).iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    raise ChatError(f"{self.url}: the answer failed: {event['error'].get('message')}")
                piece = event["choices"][0]["delta"].get("content") or ""
                answer.append(piece)
                yield piece
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]


def _answer(client: ChatClient, text: str, out: TextIO) -> None:
    for piece in client.ask(text):
        out.write(piece)
        out.flush()
    out.write("\n")


def run(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """The chat ``args`` asks for, reading turns from ``stdin`` and writing answers to ``out`` (default: the
    process's); the exit status."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    sampling = {key: value for key, value in (("max_tokens", args.max_tokens), ("temperature", args.temperature))
                if value is not None}
    client = None
    try:
        client = ChatClient(args.url, args.model, args.api_key, args.system, sampling)
        if args.quick is not None:
            _answer(client, args.quick, out)
            return 0
        interactive = stdin.isatty()
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line = stdin.readline()
            if not line:
                return 0
            if line.strip():
                _answer(client, line.rstrip("\n"), out)
    except ChatError as err:
        print(f"cptoolkit chat: {err}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.http.close()
