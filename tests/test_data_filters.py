"""Cleaning and quality filters: each filter on its own, fast paths against plain ones."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.data.clean import CleanConfig, clean_text, fix_whitespace, scrub_emails, scrub_ips, scrub_phones
from lmstack.data.filters import (
    DocStats, QualityConfig, apply_filters, detect_language, dup_ngram_char_fraction,
    f_alpha_words, f_bullets_ellipsis, f_digit_fraction, f_duplicate_lines, f_language, f_length,
    f_mean_word_length, f_repetition, f_stop_words, f_symbol_ratio, top_ngram_char_fraction,
)
from lmstack.data.synthetic import random_text
from lmstack.errors import ConfigError

GOOD = random_text(random.Random(1), 200)
OFF = QualityConfig(min_chars=None, min_words=None, max_words=None, min_mean_word_length=None,
                    max_mean_word_length=None, max_symbol_word_ratio=None, max_digit_fraction=None,
                    min_alpha_word_fraction=None, min_stop_words=None, max_bullet_line_fraction=None,
                    max_ellipsis_line_fraction=None, max_dup_line_fraction=None,
                    max_dup_line_char_fraction=None, max_top_ngram_char_fraction={},
                    max_dup_ngram_char_fraction={}, languages=[])


def only(**kw) -> QualityConfig:
    import dataclasses
    return dataclasses.replace(OFF, **kw)


def test_good_text_passes_all_defaults():
    assert apply_filters(GOOD, QualityConfig()) is None


def test_everything_off_keeps_garbage():
    assert apply_filters("### 12 ...", OFF) is None


def test_length_bounds():
    c = only(min_words=5, max_words=10, min_chars=3)
    assert f_length(DocStats("ab"), c) == "too_short_chars"
    assert f_length(DocStats("one two three four"), c) == "too_few_words"
    assert f_length(DocStats(" ".join(["w"] * 5)), c) is None
    assert f_length(DocStats(" ".join(["w"] * 11)), c) == "too_many_words"


def test_mean_word_length():
    c = only(min_mean_word_length=3.0, max_mean_word_length=10.0)
    assert f_mean_word_length(DocStats("a b c de"), c) == "mean_word_length"  # mean 1.25
    assert f_mean_word_length(DocStats("abc defgh"), c) is None  # mean 4
    assert f_mean_word_length(DocStats("x" * 11 + " " + "y" * 11), c) == "mean_word_length"


def test_symbol_ratio_counts_hashes_and_ellipses():
    c = only(max_symbol_word_ratio=0.1)
    words = ["word"] * 20
    assert f_symbol_ratio(DocStats(" ".join(words + ["#tag", "#x"])), c) is None  # 2/22
    assert f_symbol_ratio(DocStats(" ".join(words + ["#a", "#b", "..."])), c) == "symbol_ratio"  # 3/23


def test_digit_fraction():
    c = only(max_digit_fraction=0.3)
    assert f_digit_fraction(DocStats("abc 123 def"), c) == "digit_fraction"  # 3/9
    assert f_digit_fraction(DocStats("abcdefg 12"), c) is None  # 2/9


def test_alpha_words():
    c = only(min_alpha_word_fraction=0.8)
    assert f_alpha_words(DocStats("a b c d 1"), c) is None  # 4/5
    assert f_alpha_words(DocStats("a b c 1 2"), c) == "alpha_word_fraction"


def test_stop_words():
    c = only(min_stop_words=2)
    assert f_stop_words(DocStats("The cat and dog"), c) is None
    assert f_stop_words(DocStats("cat dog the cat"), c) == "stop_words"


def test_bullets_ellipsis_and_terminal_punctuation():
    bullets = "\n".join(["- item"] * 10)
    assert f_bullets_ellipsis(DocStats(bullets), only(max_bullet_line_fraction=0.9)) == "bullet_lines"
    assert f_bullets_ellipsis(DocStats(bullets + "\nprose line"), only(max_bullet_line_fraction=0.95)) is None
    ell = "one...\ntwo…\nthree.\nfour."
    assert f_bullets_ellipsis(DocStats(ell), only(max_ellipsis_line_fraction=0.3)) == "ellipsis_lines"
    assert f_bullets_ellipsis(DocStats(ell), only(max_ellipsis_line_fraction=0.5)) is None
    c4 = only(min_punct_line_fraction=0.5)
    assert f_bullets_ellipsis(DocStats("Done.\nno end\nno end"), c4) == "punctuation_lines"
    assert f_bullets_ellipsis(DocStats("Done.\nAlso done!\nno end"), c4) is None


def test_duplicate_lines_and_chars():
    c = only(max_dup_line_fraction=0.3)
    assert f_duplicate_lines(DocStats("a\nb\nc\na"), c) == "duplicate_lines"  # 2/4 lines
    assert f_duplicate_lines(DocStats("a\nb\nc\nd"), c) is None
    c = only(max_dup_line_char_fraction=0.2)
    text = "x" * 30 + "\n" + "x" * 30 + "\n" + "y" * 200
    assert f_duplicate_lines(DocStats(text), c) == "duplicate_line_chars"  # 60/260
    assert f_duplicate_lines(DocStats("x\nx\n" + "y" * 200), c) is None


def _plain_top(words: list[str], n: int) -> float:
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0.0
    gram, count = max(grams.items(), key=lambda kv: (kv[1], -min(i for i in range(len(words) - n + 1)
                                                               if tuple(words[i:i + n]) == kv[0])))
    total = sum(map(len, words))
    return 0.0 if count < 2 else sum(map(len, gram)) * count / total


def _plain_dup(words: list[str], n: int) -> float:
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        if grams[tuple(words[i:i + n])] > 1:
            covered[i:i + n] = [True] * n
    total = sum(map(len, words))
    return sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "bb", "ccc", "dd", "e"]), min_size=0, max_size=60),
       st.integers(2, 10))
def test_ngram_fractions_match_plain_counting(words, n):
    top = top_ngram_char_fraction(words, n)
    # Ties between equally frequent n-grams cover the same count; compare against any of them.
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if grams and max(grams.values()) >= 2:
        best = max(grams.values())
        total = sum(map(len, words))
        allowed = {sum(map(len, g)) * best / total for g, c in grams.items() if c == best}
        assert any(abs(top - a) < 1e-12 for a in allowed)
    else:
        assert top == 0.0
    assert dup_ngram_char_fraction(words, n) == pytest.approx(_plain_dup(words, n), abs=1e-12)


def test_repetition_filter_catches_repeated_text():
    c = only(max_top_ngram_char_fraction={2: 0.2}, max_dup_ngram_char_fraction={5: 0.15})
    assert f_repetition(DocStats("buy now " * 40), c) == "top_2gram"
    c = only(max_dup_ngram_char_fraction={5: 0.15})
    assert f_repetition(DocStats(GOOD + " " + GOOD[:400]), c) == "duplicate_5grams"
    assert f_repetition(DocStats(GOOD), QualityConfig()) is None


def test_language_filter():
    en = "The history of the city is long and it was the home of many people who lived there."
    de = "Die Geschichte der Stadt ist lang und es war das Zuhause von vielen Menschen, die dort auf dem Land lebten."
    fr = "L'histoire de la ville est longue et elle a été la maison de nombreuses personnes qui ne sont pas parties."
    assert detect_language(en.lower().split())[0] == "en"
    assert detect_language(de.lower().split())[0] == "de"
    assert detect_language(fr.lower().split())[0] == "fr"
    c = only(languages=["en"], min_language_score=0.15)
    assert f_language(DocStats(en), c) is None
    assert f_language(DocStats(de), c) == "language"
    assert f_language(DocStats("x = f(y) + g(z) * 2"), c) == "language"
    with pytest.raises(ConfigError, match="languages"):
        QualityConfig(languages=["xx"])


def test_whitespace_and_unicode_cleaning():
    raw = "Caf\u0065\u0301\r\nline  \t\r\n\n\n\nnext\u00a0word\u200b\x07\n"
    text, _ = clean_text(raw, CleanConfig())
    assert text == "Caf\u00e9\nline\n\nnext word"
    assert clean_text("\ufb01ne", CleanConfig(unicode_form="NFKC"))[0] == "fine"
    assert clean_text("\ufb01ne", CleanConfig(unicode_form="NFC"))[0] == "\ufb01ne"
    assert fix_whitespace("    indented code\n") == "    indented code"


def test_pii_scrubbing():
    text = ("Mail jane.doe+x@example.co.uk or call +1 (555) 123-4567 / 020 7946 0958; "
            "server 192.168.10.254 and fe80::1ff:fe23:4567:890a. Born 1999-2004, version 3.11.2.")
    out, counts = clean_text(text, CleanConfig(pii=True))
    assert "<EMAIL>" in out and "example" not in out
    assert out.count("<PHONE>") == 2 and "4567" not in out.split("<IP>")[0]
    assert out.count("<IP>") == 2
    assert "1999-2004" in out and "3.11.2" in out
    assert counts == {"email": 1, "ip": 2, "phone": 2}
    assert scrub_emails("no address here")[1] == 0
    assert scrub_ips("999.1.1.1 is not an IP")[1] == 0
    assert scrub_phones("page 12-34")[1] == 0
    assert clean_text(text, CleanConfig(pii=False))[1] == {}
