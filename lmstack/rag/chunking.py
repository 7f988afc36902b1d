"""Splitting a document into chunks: token windows with overlap, on sentence and section boundaries.

Design. A document is first cut into *sections* (structure-aware): Markdown headings
(``#`` .. ``######`` outside code fences; the heading path, "Guide > Install > Linux", goes in
``meta["section"]``), or sections a reader found itself and passes in (HTML headings, PDF pages
with ``meta["page"]``; see ``lmstack.rag.ingest``). A heading section shorter than
``min_section_tokens`` (a title directly followed by a subheading) is merged into the next one.
Each section is tokenised once with the embedding tokenizer (``encode_batch`` over all sections,
truncation off); its token offsets give every window's character span, so no sentence is ever
re-tokenised and the cost is linear in the text.

Windows of at most ``chunk_tokens`` tokens end on the last sentence boundary that leaves the
window at least half full, else on the last word boundary (a word longer than the window is cut
between its tokens). The next window starts at most ``overlap_tokens`` tokens earlier, at a
sentence start when one falls in that range, else at a word start. Cuts fall between
pre-tokenizer words, so re-tokenising a chunk's text gives the same token count.

Invariants (``tests/test_rag_chunking.py``, with hypothesis): ``text[start:end] == chunk text``;
every non-whitespace character is in some chunk (characters the tokenizer drops, such as
control characters, ride along with their neighbours); no chunk has more than ``chunk_tokens``
tokens (plus the model's special tokens); consecutive chunks share at most ``overlap_tokens``.

References: LlamaIndex's ``SentenceSplitter`` and LangChain's ``RecursiveCharacterTextSplitter``
(both split by separators then merge; here the windows are cut from one token stream instead).
Deliberately left out: semantic chunking by embedding distance, table-aware splitting, and
sentence splitting by a trained model (a punctuation rule is used).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmstack.errors import ConfigError

Chunk = tuple[int, int, str, dict[str, Any]]  # (start, end, text, meta)
Section = tuple[int, int, dict[str, Any]]  # (start, end, meta) over the document text

# Sections longer than this are cut at a paragraph break first, which bounds one tokenizer call.
MAX_BLOCK_CHARS = 200_000


@dataclass
class ChunkConfig:
    """How documents are cut into chunks (token counts use the embedder's tokenizer)."""

    chunk_tokens: int = 200
    overlap_tokens: int = 32
    sentences: bool = True  # end windows on sentence boundaries when one is in reach
    structure: bool = True  # split on headings / pages first
    min_section_tokens: int = 16  # heading sections shorter than this merge into the next

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 8:
            raise ConfigError(f"chunk_tokens: got {self.chunk_tokens!r}, expected an integer >= 8")
        if not isinstance(self.overlap_tokens, int) or self.overlap_tokens < 0:
            raise ConfigError(f"overlap_tokens: got {self.overlap_tokens!r}, expected an integer >= 0")
        if self.overlap_tokens >= self.chunk_tokens:
            raise ConfigError(f"overlap_tokens={self.overlap_tokens} must be smaller than "
                              f"chunk_tokens={self.chunk_tokens}")
        if self.min_section_tokens < 0:
            raise ConfigError(f"min_section_tokens: got {self.min_section_tokens}, expected >= 0")

    def fingerprint(self) -> str:
        """Every setting that changes the chunks (part of each document's content hash)."""
        return (f"chunks:v1:{self.chunk_tokens}:{self.overlap_tokens}:{int(self.sentences)}:"
                f"{int(self.structure)}:{self.min_section_tokens}")


# ---- sections -------------------------------------------------------------------------------

_MD_LINE = re.compile(r"^(?:(?P<fence>```|~~~)[^\n]*|(?P<hashes>#{1,6})[ \t]+(?P<title>[^\n]*?)[ \t#]*)$",
                      re.M)


def heading_sections(text: str, headings: list[tuple[int, int, str]]) -> list[Section]:
    """Sections from (position, level, title) headings; each section runs from its heading to
    the next one, with the heading path in ``meta["section"]``. Text before the first heading is
    a section of its own."""
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    prev, prev_meta = 0, {}
    for pos, level, title in sorted(headings):
        if pos > prev:
            sections.append((prev, pos, prev_meta))
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title))
        prev, prev_meta = pos, {"section": " > ".join(t for _, t in path), "_heading": True}
    sections.append((prev, len(text), prev_meta))
    return sections


def markdown_sections(text: str) -> list[Section]:
    headings, in_fence = [], False
    for m in _MD_LINE.finditer(text):
        if m.group("fence"):
            in_fence = not in_fence
        elif not in_fence and m.group("title"):
            headings.append((m.start(), len(m.group("hashes")), m.group("title").strip()))
    return heading_sections(text, headings)


# kind -> function finding the sections of a text of that kind (others are one section)
SECTIONERS: dict[str, Callable[[str], list[Section]]] = {"markdown": markdown_sections}


def _split_long(text: str, start: int, end: int, meta: dict) -> list[Section]:
    out = []
    while end - start > MAX_BLOCK_CHARS:
        limit = start + MAX_BLOCK_CHARS
        cut = -1
        for sep in ("\n\n", "\n", " "):
            cut = text.rfind(sep, start + MAX_BLOCK_CHARS // 2, limit)
            if cut > 0:
                cut += len(sep)
                break
        cut = cut if cut > 0 else limit
        out.append((start, cut, meta))
        start = cut
    out.append((start, end, meta))
    return out


# ---- windows ----------------------------------------------------------------------------------

# A sentence ends at . ! ? (and CJK stops), after closing quotes/brackets, before whitespace;
# a blank line or a list item also starts a new one. Positions are the next sentence's start.
_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f\u2026][\"'\u201d\u2019)\]]*\s+|\n[ \t]*\n\s*"
                           r"|\n(?=[ \t]*(?:[-*+\u2022]|\d+[.)])[ \t])")


def _windows(n: int, word_start: np.ndarray, sent_tok: list[int], cfg: ChunkConfig,
             after_space: Callable[[int], bool]) -> list[tuple[int, int]]:
    """Token windows [a, b) over n tokens. ``word_start[t]``: token t begins a word (t in 0..n);
    ``after_space(t)``: whitespace precedes token t (a nicer place for an overlap to begin)."""
    size, overlap = cfg.chunk_tokens, cfg.overlap_tokens
    min_fill = min(size, max(size // 2, overlap + 1))
    out: list[tuple[int, int]] = []
    a = 0
    while a < n:
        limit = a + size
        if limit >= n:
            out.append((a, n))
            break
        b = 0
        if sent_tok:
            j = bisect_right(sent_tok, limit) - 1
            if j >= 0 and sent_tok[j] >= a + min_fill:
                b = sent_tok[j]
        if not b:  # the last word start after whitespace, else after punctuation, else mid-word
            cands = [t for t in range(limit, a, -1) if word_start[t]]
            b = next((t for t in cands if after_space(t)), cands[0] if cands else limit)
        out.append((a, b))
        lo = max(b - overlap, a + 1)
        nxt = 0
        if sent_tok:
            j = bisect_left(sent_tok, lo)
            if j < len(sent_tok) and sent_tok[j] <= b:
                nxt = sent_tok[j]
        if not nxt:
            cands = [t for t in range(lo, b) if word_start[t]]
            nxt = next((t for t in cands if after_space(t)), cands[0] if cands else b)
        a = nxt
    return out


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def chunk_text(text: str, kind: str, tokenizer: Any, cfg: ChunkConfig,
               base_meta: dict[str, Any] | None = None,
               sections: list[Section] | None = None) -> list[Chunk]:
    """Cut ``text`` into (start, end, chunk text, meta) chunks; ``meta`` is ``base_meta`` plus
    the section's (``section``, ``page``). ``sections`` overrides the structure found from
    ``kind`` (readers that know pages or HTML headings pass them)."""
    base_meta = dict(base_meta or {})
    if sections is None:
        sectioner = SECTIONERS.get(kind) if cfg.structure else None
        sections = sectioner(text) if sectioner else [(0, len(text), {})]
    elif not cfg.structure:
        sections = [(0, len(text), {})]
    blocks = [b for s, e, m in sections if text[s:e].strip() for b in _split_long(text, s, e, m)]
    if not blocks:
        return []
    encs = tokenizer.encode_batch([text[s:e] for s, e, _ in blocks], add_special_tokens=False)
    # Merge short heading sections (a title right above its first subheading) into the next.
    merged: list[tuple[int, int, dict, Any]] = []
    carry: int | None = None
    for i, ((s, e, meta), enc) in enumerate(zip(blocks, encs)):
        if carry is not None:
            s, carry = carry, None
            enc = tokenizer.encode(text[s:e], add_special_tokens=False)
        adjacent = i + 1 < len(blocks) and blocks[i + 1][0] == e
        if meta.get("_heading") and adjacent and len(enc.ids) < cfg.min_section_tokens:
            carry = s
            continue
        merged.append((s, e, meta, enc))
    chunks: list[Chunk] = []
    for s, e, meta, enc in merged:
        meta = {k: v for k, v in meta.items() if not k.startswith("_")}
        n = len(enc.ids)
        if n == 0:  # only characters the tokenizer drops: keep them as one chunk
            cs, ce = _strip(text, s, e)
            chunks.append((cs, ce, text[cs:ce], {**base_meta, **meta}))
            continue
        starts = [o[0] for o in enc.offsets]
        words = enc.word_ids
        word_start = np.ones(n + 1, dtype=bool)
        if n > 1:
            w = np.array([-1 if x is None else x for x in words])
            word_start[1:n] = w[1:] != w[:-1]
        sent_tok: list[int] = []
        if cfg.sentences:
            section = text[s:e]
            for m in _SENTENCE_END.finditer(section):
                t = bisect_left(starts, m.end())
                if 0 < t < n and (not sent_tok or sent_tok[-1] != t):
                    sent_tok.append(t)

        def after_space(t: int, s: int = s, starts: list[int] = starts) -> bool:
            return starts[t] > 0 and text[s + starts[t] - 1].isspace()

        for a, b in _windows(n, word_start, sent_tok, cfg, after_space):
            cs = s if a == 0 else s + starts[a]
            ce = e if b == n else s + starts[b]
            cs, ce = _strip(text, cs, ce)
            if ce > cs:
                chunks.append((cs, ce, text[cs:ce], {**base_meta, **meta}))
    return chunks


__all__ = ["ChunkConfig", "chunk_text", "heading_sections", "markdown_sections", "SECTIONERS"]
