"""Tokenizers: a byte-level one for the built-in model, and a checkpoint's own Hugging Face tokenizer.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``eos_token_id``,
``vocab_size`` and ``save(directory)``; the engine and the training data pipeline use only these.
A checkpoint directory names its tokenizer: Hugging Face tokenizer files, or
``"cptoolkit_tokenizer": "byte"`` in its ``config.json`` (written by ``ByteTokenizer.save``).
"""
from __future__ import annotations

import json
from pathlib import Path

BYTE_TOKENIZER = "byte"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ByteTokenizer:
    """UTF-8 bytes are ids ``0..255``; ``256`` is end-of-sequence, ``257`` padding.

    Decoding skips the special ids and replaces invalid UTF-8 (a prefix cut inside a multi-byte
    character) with U+FFFD, so partial generations always decode.
    """

    eos_token_id = 256
    pad_token_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        """Mark ``directory``'s existing ``config.json`` as using this tokenizer."""
        config_path = Path(directory) / "config.json"
        config = json.loads(config_path.read_text())
        config["cptoolkit_tokenizer"] = BYTE_TOKENIZER
        config_path.write_text(json.dumps(config, indent=2) + "\n")


class HFTokenizer:
    """A ``transformers`` tokenizer loaded from a local directory, behind the same small interface.

    ``encode`` adds no special tokens (prompts are continued as written); ``decode`` drops them.
    """

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; rule: "
                             "generation needs one to stop (set eos_token in the tokenizer config)")
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        self._tokenizer.save_pretrained(str(directory))


def load_tokenizer(checkpoint_dir: str | Path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of ``checkpoint_dir``: ``ByteTokenizer`` if its ``config.json`` says so, else
    its Hugging Face tokenizer files, read locally through ``transformers.AutoTokenizer`` (never
    from the hub)."""
    directory = Path(checkpoint_dir)
    config_path = directory / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()).get("cptoolkit_tokenizer") == BYTE_TOKENIZER:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"checkpoint directory {str(directory)!r} has no tokenizer files "
                         "(tokenizer.json, tokenizer.model or vocab.json); save the tokenizer with "
                         "save_pretrained next to the weights")
    return HFTokenizer(AutoTokenizer.from_pretrained(directory, local_files_only=True))
