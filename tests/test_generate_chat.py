"""Chat from the command line: ``cptoolkit generate --message / --chat / --system`` renders each conversation
with the checkpoint's chat template and records it in the output JSON; ``cptoolkit chat`` talks to a running
server, keeps the conversation and streams each answer; the generate path's errors name the command and the flag
the user typed.

The checkpoint is a tiny Llama (``tests/hf_checkpoints.py``) whose chat template writes each turn's words and
opens the assistant's turn with ``w1``; every answer is greedy, so ``generate``, the server and ``cptoolkit chat``
must give the same text for the same conversation.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from cptoolkit import chat_client, cli
from tests.cli_jobs import generate, serving
from tests.hf_checkpoints import hf_model, save_checkpoint

CLI = [str(Path(sys.executable).with_name("cptoolkit"))]
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w1{% endif %}"
SYSTEM = "w9"
MAX_TOKENS = 4
KEY = "sesame"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(3)
    return save_checkpoint(hf_model("llama"), tmp_path_factory.mktemp("chat"), chat_template=TEMPLATE)


def _ids(text: str) -> list[int]:
    return [int(word[1:]) for word in text.split()]


@pytest.fixture(scope="module")
def generated(checkpoint, tmp_path_factory) -> dict:
    """``cptoolkit generate`` of two --message chats and one --chat file (with an assistant turn), all opened by
    --system."""
    folder = tmp_path_factory.mktemp("generate")
    chat = folder / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "w2 w3"}, {"role": "assistant", "content": "w7"},
                                {"role": "user", "content": "w4"}]))
    return generate([checkpoint, "--system", SYSTEM, "--message", "w2 w3", "--message", "w5 w6", "--chat", str(chat),
                     "--max-tokens", str(MAX_TOKENS)], folder)


def test_generate_renders_each_chat_with_the_template_and_records_its_messages(generated):
    requests = generated["requests"]
    system = {"role": "system", "content": SYSTEM}
    assert [r["messages"] for r in requests] == [
        [system, {"role": "user", "content": "w2 w3"}], [system, {"role": "user", "content": "w5 w6"}],
        [system, {"role": "user", "content": "w2 w3"}, {"role": "assistant", "content": "w7"},
         {"role": "user", "content": "w4"}]]
    assert [r["prompt_token_ids"] for r in requests] == [_ids("w9 w2 w3 w1"), _ids("w9 w5 w6 w1"),
                                                         _ids("w9 w2 w3 w7 w4 w1")]
    assert all(len(r["token_ids"]) == MAX_TOKENS and r["prompt"] is None for r in requests), requests
    # Sized for these requests (each 4-6 prompt tokens + 4 new: one block of 16), not 4 x the model's 64 tokens.
    assert generated["metrics"]["kv_blocks_per_rank"] == 3


def test_cptoolkit_chat_keeps_the_conversation_and_streams_what_the_server_answers(checkpoint, generated, tmp_path,
                                                                                    capsys):
    first = generated["requests"][0]["text"]
    with serving([checkpoint, "--max-model-len", "64", "--api-key", KEY], tmp_path / "serve.log") as url:
        api = f"{url}/v1"
        quick = cli.build_parser().parse_args(["chat", "--url", api, "--api-key", KEY, "--system", SYSTEM,
                                               "--max-tokens", str(MAX_TOKENS), "--temperature", "0",
                                               "--quick", "w2 w3"])
        assert chat_client.run(quick) == 0
        assert capsys.readouterr().out == first + "\n"  # as cptoolkit generate answered the same chat
        done = subprocess.run([*CLI, "chat", "--url", api, "--system", SYSTEM, "--max-tokens", str(MAX_TOKENS),
                               "--temperature", "0"], input="w2 w3\nw4\n", capture_output=True, text=True,
                              timeout=60, env={**os.environ, chat_client.API_KEY_ENV: KEY})
        assert done.returncode == 0, done.stderr
        answers = done.stdout.splitlines()
        # The second turn carries the first question and answer: the server's answer to that whole conversation.
        conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "w2 w3"},
                        {"role": "assistant", "content": first}, {"role": "user", "content": "w4"}]
        want = httpx.post(f"{api}/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60, json={
            "model": Path(checkpoint).name, "messages": conversation, "max_tokens": MAX_TOKENS,
            "temperature": 0}).json()["choices"][0]["message"]["content"]
        assert answers == [first, want], (answers, first, want)
        refused = subprocess.run([*CLI, "chat", "--url", api, "--quick", "w2"], capture_output=True, text=True,
                                 timeout=60, env={k: v for k, v in os.environ.items() if k != chat_client.API_KEY_ENV})
    assert refused.returncode == 1 and refused.stderr.startswith(f"cptoolkit chat: {api} answered 401: "), refused
    gone = subprocess.run([*CLI, "chat", "--url", api, "--quick", "w2"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and gone.stderr.startswith(f"cptoolkit chat: cannot reach {api} (ConnectError"), gone


def test_help_mentions_chat(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--message TEXT", "--chat FILE", "--system TEXT", "chat template")), text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "chat with a running server" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "error: cptoolkit generate: nothing to generate for: give --prompt TEXT or --message TEXT (or "
         "inference.prompts, prompt_file or messages in the --config YAML)"),
    (["--prompt", "w2", "--message", "w3"], "error: cptoolkit generate: --prompt and --message/--chat both given: a "
                                            "request is a plain prompt or a chat; give one kind"),
    (["--system", "w9", "--prompt", "w2"], "error: cptoolkit generate: --system 'w9' needs a chat: give --message "
                                           "TEXT or --chat FILE"),
    (["--chat", "missing.json"], "error: cptoolkit generate: --chat missing.json: no such file"),
    (["--prompt", "w2", "--max-num-seqs", "0"], "error: cptoolkit generate: inference.batch_size = 0: must be >= 1 "
                                                "(given as --max-num-seqs 0)"),
    (["--message", "w2"], "error: cptoolkit generate: inference.messages = [[{'role': 'user', 'content': 'w2'}]]: "
                          "needs model.checkpoint: messages are rendered by the checkpoint's chat template, and the "
                          "built-in model's byte tokenizer has none; use inference.prompts (--prompt) (given as "
                          "--message)"),
])
def test_generate_errors_name_the_command_and_the_flag(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", *argv]) == 2
    assert capsys.readouterr().err == message + "\n"


def test_a_chat_file_must_hold_a_messages_list(capsys, tmp_path):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps({"role": "user", "content": "w2"}))
    assert cli.main(["generate", "--chat", str(chat)]) == 2
    assert capsys.readouterr().err == (f"error: cptoolkit generate: --chat {chat}: must hold a non-empty JSON list "
                                       'of {"role", "content"} messages (an OpenAI messages list), or an object '
                                       'with one under "messages"\n')
