"""Tokenizers: a byte-level one for the built-in model, and a checkpoint's own Hugging Face tokenizer.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``eos_token_id``,
``eos_token_ids`` (every id that ends a generation), ``render_chat(messages) -> list[int]``,
``vocab_size``, ``token_text(id) -> str`` (one token as logprobs name it) and ``save(directory)``; the engine, the training data pipeline and the chat front
ends use only these. A checkpoint directory names its tokenizer: Hugging Face tokenizer files, or
``"cptoolkit_tokenizer": "byte"`` in its ``config.json`` (written by ``ByteTokenizer.save``).
Missing or broken tokenizer files are a ``ConfigError`` naming the directory.
"""
from __future__ import annotations

import json
from pathlib import Path

from cptoolkit.config import ConfigError
from cptoolkit.models.shape import read_config, read_json_object

BYTE_TOKENIZER = "byte"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GENERATION_CONFIG_FILE = "generation_config.json"


class ByteTokenizer:
    """UTF-8 bytes are ids ``0..255``; ``256`` is end-of-sequence, ``257`` padding.

    Decoding skips the special ids and replaces invalid UTF-8 (a prefix cut inside a multi-byte
    character) with U+FFFD, so partial generations always decode.
    """

    eos_token_id = 256
    eos_token_ids = (256,)
    pad_token_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """One token as text: its character if the byte is ASCII, ``"<eos>"`` / ``"<pad>"`` for the special
        ids, else OpenAI's notation for a partial character, ``"bytes:\\xNN"``."""
        if token_id == self.eos_token_id:
            return "<eos>"
        if token_id == self.pad_token_id:
            return "<pad>"
        return chr(token_id) if token_id < 128 else f"bytes:\\x{token_id:02x}"

    def render_chat(self, messages: list[dict]) -> list[int]:
        raise ConfigError("the built-in model's byte tokenizer has no chat template, so it cannot render "
                          "messages; give model.checkpoint a checkpoint whose tokenizer has a chat template, "
                          "or use inference.prompts (--prompt)")

    def save(self, directory: str | Path) -> None:
        """Mark ``directory``'s existing ``config.json`` as using this tokenizer."""
        config_path = Path(directory) / "config.json"
        config = json.loads(config_path.read_text())
        config["cptoolkit_tokenizer"] = BYTE_TOKENIZER
        config_path.write_text(json.dumps(config, indent=2) + "\n")


class HFTokenizer:
    """A ``transformers`` tokenizer loaded from a local directory, behind the same small interface.

    ``encode`` adds no special tokens (prompts are continued as written); ``decode`` drops them.
    ``eos_token_ids``: the tokenizer's eos, then ``extra_eos_ids`` (a checkpoint's
    ``generation_config.json`` may name several end-of-turn ids, e.g. Llama 3's ``<|eot_id|>``).
    """

    def __init__(self, tokenizer, extra_eos_ids: tuple[int, ...] = ()):
        self._source = tokenizer.name_or_path or f"tokenizer {type(tokenizer).__name__}"
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{self._source}: the tokenizer has no eos_token; set \"eos_token\" in "
                              "tokenizer_config.json (generation stops on it)")
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.eos_token_ids = tuple(dict.fromkeys((tokenizer.eos_token_id, *extra_eos_ids)))
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token as text (special tokens kept). A token that is part of a multi-byte character decodes
        to U+FFFD alone; it is named by its vocabulary entry instead, so distinct tokens keep distinct names."""
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return self._tokenizer.convert_ids_to_tokens(token_id) if "\ufffd" in text else text

    def render_chat(self, messages: list[dict]) -> list[int]:
        """One conversation (``[{"role": ..., "content": ...}, ...]``) as the prompt ids the checkpoint's
        own chat template makes of it, ending with the template's generation prompt (the assistant's turn)."""
        if not self._tokenizer.chat_template:
            raise ConfigError(f"{self._source}: the tokenizer has no chat template (no chat_template in "
                              "tokenizer_config.json, no chat_template.jinja), so it cannot render messages; "
                              "use inference.prompts (--prompt)")
        return list(self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))

    def save(self, directory: str | Path) -> None:
        self._tokenizer.save_pretrained(str(directory))


def load_tokenizer(checkpoint_dir: str | Path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of ``checkpoint_dir``: ``ByteTokenizer`` if its ``config.json`` says so, else
    its Hugging Face tokenizer files, read locally through ``transformers.AutoTokenizer`` (never
    from the hub)."""
    directory = Path(checkpoint_dir)
    config = read_config(directory) if (directory / "config.json").is_file() else {}
    if config.get("cptoolkit_tokenizer") == BYTE_TOKENIZER:
        return ByteTokenizer()
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
                          "tokenizer with save_pretrained next to the weights")
    for name in TOKENIZER_JSON_FILES:  # transformers' own error would not say which file is broken
        if (directory / name).is_file():
            read_json_object(directory / name)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers and tokenizers raise many types for a bad file
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"{directory}: transformers cannot load the tokenizer files ({type(err).__name__}: "
                          f"{first_line}); save the tokenizer again with save_pretrained") from None
    return HFTokenizer(tokenizer, generation_eos_ids(directory))


def generation_eos_ids(checkpoint_dir: str | Path) -> tuple[int, ...]:
    """The ``eos_token_id`` of the checkpoint's ``generation_config.json`` (an id or a list of ids;
    none when the file or the key is absent)."""
    path = Path(checkpoint_dir) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return ()
    eos = read_json_object(path).get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{path}: eos_token_id={eos!r}; rule: a token id or a list of token ids")
    return tuple(ids)
