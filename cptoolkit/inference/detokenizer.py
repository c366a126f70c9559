"""Incremental detokenization: the text of a growing token sequence for a constant amount of work per token.

Decoding the whole output again after every token costs O(n) per token, O(n^2) per request. Instead the text is
kept as a committed part, final, plus a pending tail, and each new token decodes only a short window: the
tokens since the last commit point plus the few before it (``prefix_offset``). The window's text minus the text
of its first part is what the new token added — measured on the same window, so a tokenizer that treats a
window's first token specially (SentencePiece drops its leading space) adds the same text it would in context.
A window whose text ends in U+FFFD (a character whose last bytes have not come yet) stays pending and is
decoded again with the next token; once it ends cleanly it is committed and the window moves on.

Invariant, for the byte-level and BPE tokenizers cptoolkit serves: ``text`` equals ``tokenizer.decode(ids)``
after every token (``tests/test_detokenizer.py`` checks it on random sequences with characters split across
tokens). The work per token is two decodes of the window; a model that emits bytes which never form a
character (a stream of stray continuation bytes) keeps its window open until one does.
"""
from __future__ import annotations

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """The text of ``ids``, one appended token at a time, for any tokenizer with ``decode(list[int]) -> str``."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._committed = ""      # text of ids[:_read_offset], final
        self._pending = ""        # text the tokens after _read_offset add so far (may end in U+FFFD)
        self._prefix_offset = 0   # the window starts here: the tokens of the last commit give it context
        self._read_offset = 0     # the tokens before it are committed
        self._prefix_text = ""    # decode(ids[_prefix_offset:_read_offset])

    @property
    def text(self) -> str:
        return self._committed + self._pending

    def append(self, token_id: int) -> int:
        """Add one token; returns the offset in ``text`` from which the text may differ from before (what a
        stop-string check needs to look at, with its own length of lookback)."""
        changed_from = len(self._committed)
        self.ids.append(token_id)
        window_text = self._tokenizer.decode(self.ids[self._prefix_offset:])
        self._pending = window_text[len(self._prefix_text):]
        if not window_text.endswith(_INCOMPLETE):
            self._committed += self._pending
            self._pending = ""
            last_commit_text = self._tokenizer.decode(self.ids[self._read_offset:])
            if last_commit_text:  # tokens with no text (skipped special tokens) give the next window no context
                self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            self._prefix_text = (last_commit_text if self._prefix_offset < self._read_offset and last_commit_text
                                 else self._tokenizer.decode(self.ids[self._prefix_offset:]))
        return changed_from
