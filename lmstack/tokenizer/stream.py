"""Streaming detokenisation: turn generated token ids into text deltas one id at a time.

Decoding one token at a time is wrong in two ways: a multi-byte UTF-8 character can be
spread over several tokens (byte-level BPE pieces, SentencePiece ``<0xNN>`` byte-fallback
tokens), and some decoders depend on context (SentencePiece drops the space of the
*first* "▁word" of the text). So each step decodes a short window of ids twice, as
text-generation servers do:

    ids:      ... | prefix_offset ........ read_offset ........ end |
    prefix_text = decode(ids[prefix_offset:read_offset])   # already emitted, used as context
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):]              # emitted unless it ends in U+FFFD

A delta ending in U+FFFD means the last character is still incomplete, so nothing is emitted
and the window grows until the character is whole. After an emission the window slides:
``prefix_offset`` moves to the old ``read_offset``, so the context is always the last
emitted chunk and the cost per step stays a few tokens, not the whole sequence.
``flush()`` emits whatever is still held back (a genuinely invalid byte sequence decodes to
U+FFFD in ``decode`` too). The deltas joined with ``flush()`` equal ``decode(all_ids)``.
"""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    """Text deltas for a growing list of token ids; see the module docstring."""

    def __init__(self, hf_tokenizer: Any, skip_special_tokens: bool = False) -> None:
        self._hf = hf_tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset]), cached

    def _decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _advance(self, new_text: str) -> str:
        delta = new_text[len(self._prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix_offset:self._read_offset])
        return delta

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text (possibly "")."""
        self.ids.append(int(token_id))
        new_text = self._decode(self.ids[self._prefix_offset:])
        if len(new_text) > len(self._prefix_text) and not new_text.endswith("\ufffd"):
            return self._advance(new_text)
        return ""

    def extend(self, token_ids: Any) -> str:
        """Push several ids; return the concatenated deltas."""
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Emit whatever text is still held back (an incomplete character at the end)."""
        new_text = self._decode(self.ids[self._prefix_offset:])
        if len(new_text) > len(self._prefix_text):
            return self._advance(new_text)
        return ""
