"""Chat: ``inference.messages`` is rendered by the checkpoint's own chat template (generation prompt added),
and generation stops on every end-of-turn id the checkpoint declares (the tokenizer's eos and each
``eos_token_id`` of ``generation_config.json``), as transformers' ``generate`` does; ``launch/infer.py``
serves such a config end to end. Plain prompts are untouched (``tests/test_engine.py``).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cptoolkit.config import ConfigError, config_from_dict
from cptoolkit.inference.builder import read_prompts
from cptoolkit.models.tokenizer import ByteTokenizer, load_tokenizer
from tests.multiproc import free_port

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64
SPECIAL = {"<eos>": 0, "<unk>": 1, "<|system|>": 2, "<|user|>": 3, "<|assistant|>": 4, "<|end|>": 5}
WORDS = {"hello": 6, "ring": 7, "world": 8, "be": 9, "brief": 10}
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello ring world"}]
# <|system|> be brief <|end|> <|user|> hello ring world <|end|> <|assistant|>
RENDERED = [2, 9, 10, 5, 3, 6, 7, 8, 5, 4]
MAX_NEW = 10


def _chat_tokenizer(chat_template: str | None = TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {**SPECIAL, **WORDS, **{f"w{i}": i for i in range(len(SPECIAL) + len(WORDS), VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                                chat_template=chat_template)


def _generation_config(directory: Path, **values) -> None:
    (directory / "generation_config.json").write_text(json.dumps(values))


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny Llama with the chat tokenizer, whose generation_config.json names a second end-of-turn id,
    ``<|end|>``, which this model (seed 5) says fifth when nothing stops it. Returns (directory, transformers'
    greedy tokens with that generation config)."""
    torch.manual_seed(5)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.2, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("chat")
    model.save_pretrained(directory)
    _chat_tokenizer().save_pretrained(directory)
    with torch.no_grad():
        free = model.generate(torch.tensor([RENDERED]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(RENDERED):]
        end_of_turn = SPECIAL["<|end|>"]
        assert len(free) == MAX_NEW and free.tolist().index(end_of_turn) == 4, free
        model.generation_config.eos_token_id = [0, end_of_turn]
        model.generation_config.save_pretrained(directory)
        stopped = model.generate(torch.tensor([RENDERED]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(RENDERED):]
    assert stopped.tolist() == free[:5].tolist(), stopped  # transformers stops on the listed id
    return directory, stopped.tolist()


# ----------------------------------------------------------------------------- the tokenizer

def test_render_chat_applies_the_checkpoints_template_with_the_generation_prompt(chat_checkpoint):
    tokenizer = load_tokenizer(chat_checkpoint[0])
    assert tokenizer.render_chat(CONVERSATION) == RENDERED
    assert tokenizer.render_chat(CONVERSATION[1:]) == RENDERED[4:]


def test_eos_token_ids_are_the_tokenizers_eos_and_generation_configs(tmp_path):
    _chat_tokenizer().save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).eos_token_ids == (0,)  # no generation_config.json
    for eos, want in ((5, (0, 5)), ([5, 0, 9], (0, 5, 9)), (None, (0,)), (0, (0,))):
        _generation_config(tmp_path, eos_token_id=eos)
        assert load_tokenizer(tmp_path).eos_token_ids == want, eos
    _generation_config(tmp_path, eos_token_id="<|end|>")
    with pytest.raises(ConfigError, match="^" + re.escape(str(tmp_path / "generation_config.json")) +
                       r": eos_token_id='<\|end\|>'; rule: a token id or a list of token ids$"):
        load_tokenizer(tmp_path)
    assert ByteTokenizer().eos_token_ids == (ByteTokenizer.eos_token_id,)


def test_a_tokenizer_without_a_chat_template_cannot_render_messages(tmp_path):
    _chat_tokenizer(chat_template=None).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r": the tokenizer has no chat template \(no chat_template in "
                                          r"tokenizer_config\.json, no chat_template\.jinja\), so it cannot render "
                                          r"messages; use inference\.prompts \(--prompt\)$"):
        load_tokenizer(tmp_path).render_chat(CONVERSATION)
    with pytest.raises(ValueError, match=r"^the built-in model's byte tokenizer has no chat template, so it cannot "
                                         r"render messages; give model\.checkpoint a checkpoint whose tokenizer "
                                         r"has a chat template, or use inference\.prompts \(--prompt\)$"):
        ByteTokenizer().render_chat(CONVERSATION)


# ----------------------------------------------------------------------------- the config

def _config(inference: dict, checkpoint: Path | None = None):
    model = {} if checkpoint is None else {"checkpoint": str(checkpoint)}
    return config_from_dict({"parallel": {}, "model": model, "runtime": {}, "inference": inference}, source="<t>")


@pytest.mark.parametrize("inference,message", [
    ({"messages": [CONVERSATION], "prompts": ["hi"]},
     r"inference\.prompts = \['hi'\]: give at most one of prompts \(a list\), prompt_file \(a path\) or messages"),
    ({"messages": "hello"}, r"inference\.messages = 'hello': must be a list$"),
    ({"messages": [CONVERSATION, []]},
     r"inference\.messages\[1\] = \[\]: must be a non-empty list of \{role, content\} messages"),
    ({"messages": [[{"role": "user", "text": "hi"}]]},
     r"inference\.messages\[0\]\[0\] = \{'role': 'user', 'text': 'hi'\}: must be a mapping of exactly 'role' "
     r"and 'content', both strings$"),
    ({"messages": [[{"role": "user", "content": 3}]]}, r"inference\.messages\[0\]\[0\] = .*: must be a mapping"),
])
def test_messages_are_checked_when_the_config_loads(inference, message):
    with pytest.raises(ConfigError, match=r"^<t>: " + message):
        _config(inference)


def test_messages_need_a_checkpoint_with_a_chat_template():
    with pytest.raises(ConfigError, match=r"^<t>: inference\.messages = .*: needs model\.checkpoint: messages are "
                                          r"rendered by the checkpoint's chat template, and the built-in model's "
                                          r"byte tokenizer has none; use inference\.prompts \(--prompt\)$"):
        _config({"messages": [CONVERSATION]})


def test_read_prompts_renders_each_conversation_and_keeps_plain_prompts(chat_checkpoint):
    directory, _ = chat_checkpoint
    assert read_prompts(_config({"messages": [CONVERSATION, CONVERSATION[1:]]}, directory)) == \
        [RENDERED, RENDERED[4:]]
    assert read_prompts(_config({"prompts": ["hello world"]}, directory)) == ["hello world"]


# ----------------------------------------------------------------------------- end to end

def test_launch_serves_messages_and_stops_on_every_end_of_turn_id(chat_checkpoint, tmp_path):
    """launch/infer.py renders the conversation, and the engine stops where transformers' ``generate`` stops:
    on generation_config.json's second eos id, not only on the tokenizer's."""
    directory, want_tokens = chat_checkpoint
    config = tmp_path / "chat.yaml"
    config.write_text(yaml.safe_dump({"parallel": {}, "model": {"checkpoint": str(directory)},
                                      "runtime": {"device": "cpu"},
                                      "inference": {"messages": [CONVERSATION], "max_new_tokens": MAX_NEW}}))
    output = tmp_path / "out.json"
    port = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "launch/infer.py", "--config", str(config), "--output", str(output)],
                          cwd=REPO, env={**os.environ, **port}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (request,) = json.loads(output.read_text())["requests"]
    assert request["prompt_token_ids"] == RENDERED
    assert request["token_ids"] == want_tokens and request["finish_reason"] == "eos", request
