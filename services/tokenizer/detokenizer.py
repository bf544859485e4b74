"""Incremental detokenization: token ids in, text deltas out, in O(new tokens) per push.

Decoding every generated id on every step would cost O(n) per token (O(n^2) per request), and
decoding each token alone is wrong: byte-level BPE splits one multi-byte UTF-8 character over
several tokens, and many decoders treat a token differently depending on what precedes it.
So, as in vLLM and TGI, only a short window is decoded: `ids[prefix_offset:]`, where
`prefix_offset` is where the previous window read from and `read_offset` is where the text
already emitted ends. The delta is what the window's text adds beyond the text of
`ids[prefix_offset:read_offset]`.

Text that ends with U+FFFD is held back, since a partial character decodes to it and the next
token may complete it. A truly invalid byte is also U+FFFD but never completes; once a few
tokens pile up behind it, the text before the last character boundary is released so the
window stays bounded (see `_release_stable`).

Invariant: the concatenation of all deltas and `flush()` equals
`tokenizer.decode(pushed ids, skip_special_tokens=...)` for any ids, for decoders whose text for a
sequence is a prefix of the text for any extension of it once it ends in a complete character
(byte-level BPE, the default model's tokenizer, is one). With `prompt_token_ids`, the prompt only
gives left context; a character split between prompt and completion counts as completion text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
# vLLM's choice: enough left context for decoders that look back (e.g. leading-space rules).
_PREFIX_CONTEXT_TOKENS = 5
# A valid character spans at most 4 bytes, so at most 3 held tokens (skipped special tokens
# aside) can be waiting on it; holding more means an invalid byte is in the way.
_MAX_HELD_TOKENS = 4


class Decoder(Protocol):
    """The one method used from a Hugging Face tokenizer (so tests can wrap it)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing stream of token ids into text deltas, one request at a time."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - _PREFIX_CONTEXT_TOKENS, 0)
        prompt_text = self._decode(self._prefix_offset, self._read_offset)
        # The prompt may end inside a character; its U+FFFD is replaced once the
        # completion supplies the rest, so it must not count as text already shown.
        self._prefix_text = prompt_text.removesuffix(_REPLACEMENT)

    def push(self, token_ids: Sequence[int]) -> str:
        """Appends generated ids and returns the text they complete (may be empty)."""
        self._ids.extend(token_ids)
        if not token_ids:
            return ""
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if new_text.endswith(_REPLACEMENT):
            return self._release_stable(new_text)
        # Byte-level BPE always extends the prefix text here; a decoder that rewrites earlier
        # text would not, and slicing anyway (as vLLM does) beats stalling the stream.
        return self._advance(new_text, len(self._ids))

    def flush(self) -> str:
        """Returns the held-back text as decoded now, e.g. a truly invalid trailing byte."""
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._prefix_offset, len(self._ids))
        return self._advance(new_text, len(self._ids))

    def _advance(self, text: str, read_offset: int) -> str:
        """Emits `text` (the window's text up to `read_offset`) beyond what was emitted."""
        delta = text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, read_offset
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return delta

    def _release_stable(self, new_text: str) -> str:
        """Releases text up to a character boundary when many tokens are held.

        A split point is a boundary when decoding both sides separately gives the same text
        as decoding them together (a partial character split there would decode to an extra
        U+FFFD), and the text before it is final once the right side starts a new character.
        Only the last few split points are tried: the trailing partial character, if any,
        starts within the last 3 bytes.
        """
        num_ids = len(self._ids)
        if num_ids - self._read_offset <= _MAX_HELD_TOKENS:
            return ""
        for split in range(num_ids - 1, num_ids - _MAX_HELD_TOKENS - 1, -1):
            head = self._decode(self._prefix_offset, split)
            tail = self._decode(split, num_ids)
            if tail and head + tail == new_text and head.startswith(self._prefix_text):
                return self._advance(head, split)
        return ""

    def _decode(self, start: int, stop: int) -> str:
        if start >= stop:
            return ""
        return self._tokenizer.decode(
            self._ids[start:stop], skip_special_tokens=self._skip_special_tokens
        )
