"""Heuristic document quality filters in the spirit of Gopher and C4, plus a language filter.

Each filter is a small pure function ``(DocStats, QualityConfig) -> reason | None`` with the
threshold from the paper where there is one:

* Gopher: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from
  Training Gopher", Appendix A.1.1 (quality filter) and Table A1 (repetition filter).
* C4: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
  Text-to-Text Transformer", Section 2.2 (lines ending in terminal punctuation).

A threshold set to ``None`` turns its filter off. ``apply_filters`` runs them in a fixed order
and returns the first reason that fails, so every removed document is counted once.

The language filter is a stop-word profile classifier over a handful of European languages:
cheap, dependency-free and good at telling English prose from German, French, Spanish,
Italian, Dutch or Portuguese, and from non-prose. It is not a general language identifier
(no fastText model is available offline); use it as a gate, not for labelling.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")
_DIGIT = re.compile(r"\d")
_BULLETS = ("-", "*", "•", "‣", "◦", "⁃", "·", "–", "—")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", ":", ";", ")")

GOPHER_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])

# The most frequent function words of each language (public frequency-list facts).
LANGUAGE_STOP_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset("the of and to a in is it that was for on are as with he be at by this had "
                    "not but from or have an they which you were her his she their we there been "
                    "has will would all if".split()),
    "de": frozenset("der die und in den von zu das mit sich des auf für ist im dem nicht ein eine "
                    "als auch es an werden aus er hat dass sie nach wird bei einer um am sind noch "
                    "wie einem über".split()),
    "fr": frozenset("de la le et les des en un du une que est pour qui dans par plus pas au sur "
                    "ne se il sont ce avec elle mais ou nous aux son cette été".split()),
    "es": frozenset("de la que el en y a los del se las por un para con no una su al lo como más "
                    "pero sus le ya o fue este ha es muy sin sobre".split()),
    "it": frozenset("di e il la che in un per è non una del della le si i da con al sono dei gli "
                    "nel alla ma come anche più ha lo questo delle".split()),
    "nl": frozenset("de en van het een in is dat op te zijn met voor niet die aan er ook als maar "
                    "om dan bij of wordt door nog naar heeft ze was".split()),
    "pt": frozenset("de a o que e do da em um para é com não uma os no se na por mais as dos como "
                    "mas foi ao ele das tem seu sua".split()),
}


@dataclass
class QualityConfig:
    """Thresholds of the quality filters; ``None`` turns a filter off."""

    min_chars: int | None = field(default=1, metadata={"help": "drop shorter documents"})
    min_words: int | None = field(default=50, metadata={"help": "Gopher: 50"})
    max_words: int | None = field(default=100_000, metadata={"help": "Gopher: 100,000"})
    min_mean_word_length: float | None = field(default=3.0, metadata={"help": "Gopher: 3"})
    max_mean_word_length: float | None = field(default=10.0, metadata={"help": "Gopher: 10"})
    max_symbol_word_ratio: float | None = field(
        default=0.1, metadata={"help": "Gopher: '#' or '...' per word, 0.1"})
    max_digit_fraction: float | None = field(
        default=0.3, metadata={"help": "digits among non-space characters"})
    min_alpha_word_fraction: float | None = field(
        default=0.8, metadata={"help": "Gopher: words with a letter, 0.8"})
    min_stop_words: int | None = field(
        default=2, metadata={"help": "Gopher: at least 2 of the, be, to, of, and, that, have, with"})
    max_bullet_line_fraction: float | None = field(
        default=0.9, metadata={"help": "Gopher: lines starting with a bullet, 0.9"})
    max_ellipsis_line_fraction: float | None = field(
        default=0.3, metadata={"help": "Gopher: lines ending in an ellipsis, 0.3"})
    min_punct_line_fraction: float | None = field(
        default=None, metadata={"help": "C4-style: lines ending in terminal punctuation"})
    max_dup_line_fraction: float | None = field(
        default=0.3, metadata={"help": "Gopher: duplicated lines, 0.3"})
    max_dup_line_char_fraction: float | None = field(
        default=0.2, metadata={"help": "Gopher: characters in duplicated lines, 0.2"})
    max_top_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        metadata={"help": "Gopher: characters covered by the most frequent n-gram"})
    max_dup_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        metadata={"help": "Gopher: characters covered by n-grams seen more than once"})
    languages: list[str] = field(
        default_factory=lambda: ["en"], metadata={"help": "keep these languages; empty: any"})
    min_language_score: float = field(
        default=0.15, metadata={"help": "stop-word share needed to accept the language"})

    def __post_init__(self) -> None:
        self.max_top_ngram_char_fraction = {int(k): float(v) for k, v in
                                            self.max_top_ngram_char_fraction.items()}
        self.max_dup_ngram_char_fraction = {int(k): float(v) for k, v in
                                            self.max_dup_ngram_char_fraction.items()}
        unknown = [lang for lang in self.languages if lang not in LANGUAGE_STOP_WORDS]
        if unknown:
            from lmstack.errors import ConfigError

            raise ConfigError(f"QualityConfig.languages: got {unknown}, expected codes among "
                              f"{sorted(LANGUAGE_STOP_WORDS)}")


class DocStats:
    """Words and lines of one text, computed once and shared by all filters."""

    def __init__(self, text: str):
        self.text = text

    @cached_property
    def words(self) -> list[str]:
        return _WORD.findall(self.text)

    @cached_property
    def lower_words(self) -> list[str]:
        return [w.lower().strip(".,;:!?\"'()[]{}«»“”‘’") for w in self.words]

    @cached_property
    def lines(self) -> list[str]:
        return [ln.strip() for ln in self.text.split("\n") if ln.strip()]

    @cached_property
    def word_chars(self) -> int:
        return sum(len(w) for w in self.words)


def _fraction(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def f_length(s: DocStats, c: QualityConfig) -> str | None:
    if c.min_chars is not None and len(s.text) < c.min_chars:
        return "too_short_chars"
    if c.min_words is not None and len(s.words) < c.min_words:
        return "too_few_words"
    if c.max_words is not None and len(s.words) > c.max_words:
        return "too_many_words"
    return None


def f_mean_word_length(s: DocStats, c: QualityConfig) -> str | None:
    if not s.words:
        return None
    mean = s.word_chars / len(s.words)
    if c.min_mean_word_length is not None and mean < c.min_mean_word_length:
        return "mean_word_length"
    if c.max_mean_word_length is not None and mean > c.max_mean_word_length:
        return "mean_word_length"
    return None


def f_symbol_ratio(s: DocStats, c: QualityConfig) -> str | None:
    if c.max_symbol_word_ratio is None or not s.words:
        return None
    symbols = s.text.count("#") + s.text.count("...") + s.text.count("…")
    return "symbol_ratio" if symbols / len(s.words) > c.max_symbol_word_ratio else None


def f_digit_fraction(s: DocStats, c: QualityConfig) -> str | None:
    if c.max_digit_fraction is None or not s.word_chars:
        return None
    digits = len(_DIGIT.findall(s.text))
    return "digit_fraction" if digits / s.word_chars > c.max_digit_fraction else None


def f_alpha_words(s: DocStats, c: QualityConfig) -> str | None:
    if c.min_alpha_word_fraction is None or not s.words:
        return None
    alpha = sum(1 for w in s.words if _ALPHA.search(w))
    return "alpha_word_fraction" if alpha / len(s.words) < c.min_alpha_word_fraction else None


def f_stop_words(s: DocStats, c: QualityConfig) -> str | None:
    if c.min_stop_words is None:
        return None
    found = len(GOPHER_STOP_WORDS.intersection(s.lower_words))
    return "stop_words" if found < c.min_stop_words else None


def f_bullets_ellipsis(s: DocStats, c: QualityConfig) -> str | None:
    if not s.lines:
        return None
    n = len(s.lines)
    if c.max_bullet_line_fraction is not None:
        if sum(ln.startswith(_BULLETS) for ln in s.lines) / n > c.max_bullet_line_fraction:
            return "bullet_lines"
    if c.max_ellipsis_line_fraction is not None:
        if sum(ln.endswith(("...", "…")) for ln in s.lines) / n > c.max_ellipsis_line_fraction:
            return "ellipsis_lines"
    if c.min_punct_line_fraction is not None:
        if sum(ln.endswith(_TERMINAL) for ln in s.lines) / n < c.min_punct_line_fraction:
            return "punctuation_lines"
    return None


def f_duplicate_lines(s: DocStats, c: QualityConfig) -> str | None:
    if not s.lines:
        return None
    counts = Counter(s.lines)
    dup_lines = sum(n for n in counts.values() if n > 1)
    dup_chars = sum(len(ln) * n for ln, n in counts.items() if n > 1)
    if c.max_dup_line_fraction is not None and dup_lines / len(s.lines) > c.max_dup_line_fraction:
        return "duplicate_lines"
    total = sum(len(ln) for ln in s.lines)
    if c.max_dup_line_char_fraction is not None and _fraction(dup_chars, total) > c.max_dup_line_char_fraction:
        return "duplicate_line_chars"
    return None


def _ngram_ids(word_ids: np.ndarray, n: int, cache: dict[int, np.ndarray]) -> np.ndarray:
    """An id per n-gram start: equal n-grams get equal ids (exact, no hashing).

    Built from the (n-1)-gram ids: the pair (id of the (n-1)-gram at i, word at i+n-1) is
    packed into one int64 and renumbered densely, so values stay below len(words)**2."""
    if n == 1:
        return word_ids
    if n not in cache:
        prev = _ngram_ids(word_ids, n - 1, cache)[:-1]
        key = prev * (int(word_ids.max()) + 1) + word_ids[n - 1:]
        cache[n] = np.unique(key, return_inverse=True)[1].reshape(-1)
    return cache[n]


def _word_arrays(words: list[str]) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.int64, count=len(words))
    lens = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    return ids, lens, {}


def top_ngram_char_fraction(words: list[str], n: int, _arrays=None) -> float:
    """Characters of the most frequent word n-gram (times its count) over all word characters."""
    if len(words) < n:
        return 0.0
    ids, lens, cache = _arrays or _word_arrays(words)
    gram = _ngram_ids(ids, n, cache)
    counts = np.bincount(gram)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0.0
    first = int(np.argmax(gram == top))
    return _fraction(int(lens[first:first + n].sum()) * int(counts[top]), int(lens.sum()))


def dup_ngram_char_fraction(words: list[str], n: int, _arrays=None) -> float:
    """Characters of the words covered by an n-gram that occurs more than once, over all."""
    if len(words) < n:
        return 0.0
    ids, lens, cache = _arrays or _word_arrays(words)
    gram = _ngram_ids(ids, n, cache)
    starts = np.nonzero(np.bincount(gram)[gram] > 1)[0]
    cover = np.zeros(len(words) + 1, dtype=np.int64)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    covered = np.cumsum(cover[:-1]) > 0
    return _fraction(int(lens[covered].sum()), int(lens.sum()))


def f_repetition(s: DocStats, c: QualityConfig) -> str | None:
    words = s.lower_words
    if not words:
        return None
    arrays = _word_arrays(words)
    for n, limit in sorted(c.max_top_ngram_char_fraction.items()):
        if top_ngram_char_fraction(words, n, arrays) > limit:
            return f"top_{n}gram"
    for n, limit in sorted(c.max_dup_ngram_char_fraction.items()):
        if dup_ngram_char_fraction(words, n, arrays) > limit:
            return f"duplicate_{n}grams"
    return None


def detect_language(words: list[str]) -> tuple[str | None, float]:
    """(language code, share of words that are its stop words), or (None, 0.0)."""
    if not words:
        return None, 0.0
    best, best_score = None, 0.0
    for lang, stops in LANGUAGE_STOP_WORDS.items():
        score = sum(1 for w in words if w in stops) / len(words)
        if score > best_score:
            best, best_score = lang, score
    return best, best_score


def f_language(s: DocStats, c: QualityConfig) -> str | None:
    if not c.languages:
        return None
    lang, score = detect_language(s.lower_words[:2000])
    if lang not in c.languages or score < c.min_language_score:
        return "language"
    return None


# Cheap filters first: most removed documents leave before the n-gram statistics are computed.
FILTERS = (f_length, f_mean_word_length, f_symbol_ratio, f_digit_fraction, f_alpha_words,
           f_stop_words, f_bullets_ellipsis, f_language, f_duplicate_lines, f_repetition)


def apply_filters(text: str, cfg: QualityConfig) -> str | None:
    """The reason the first failing filter gives, or None when the document passes all."""
    stats = DocStats(text)
    for f in FILTERS:
        reason = f(stats, cfg)
        if reason is not None:
            return reason
    return None
