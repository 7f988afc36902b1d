"""Text metrics: parity with the SQuAD v1.1 rules, sacrebleu and rouge-score on the shipped sets."""

import re
import string
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.errors import ConfigError
from lmstack.eval import metrics as M
from lmstack.eval.datasets import load_qa, load_summarization, load_translation


# --- SQuAD v1.1 rules, written out independently of lmstack's implementation -------------

def squad_normalize(text):
    text = text.lower()
    text = re.sub("[" + re.escape(string.punctuation) + "]", "", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction, truth):
    p, t = squad_normalize(prediction).split(), squad_normalize(truth).split()
    same = sum((Counter(p) & Counter(t)).values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(t)
    return (2 * prec * rec) / (prec + rec)


def qa_predictions():
    """Deterministic, varied predictions for the shipped QA set: exact, sloppy and wrong."""
    items = load_qa()
    preds = []
    for i, it in enumerate(items):
        gold = it.answers[0]
        kind = i % 4
        if kind == 0:
            preds.append(gold)
        elif kind == 1:
            preds.append(f"The answer is {gold.upper()}!")
        elif kind == 2:
            preds.append(" ".join(it.context.split()[:6]))
        else:
            preds.append("the " + gold + ".")
    return items, preds


def test_squad_em_f1_match_official_rules_on_qa_set():
    items, preds = qa_predictions()
    refs = [it.answers for it in items]
    want_em = [max(float(squad_normalize(p) == squad_normalize(g)) for g in r) for p, r in zip(preds, refs)]
    want_f1 = [max(squad_f1(p, g) for g in r) for p, r in zip(preds, refs)]
    assert M.exact_match_scores(preds, refs) == want_em
    assert M.token_f1_scores(preds, refs) == pytest.approx(want_f1, abs=0)
    assert M.exact_match(preds, refs) == sum(want_em) / len(want_em)
    assert 0 < M.exact_match(preds, refs) < M.token_f1(preds, refs) < 1


@pytest.mark.parametrize("pred,gold,em,f1", [
    ("The Eiffel Tower!", "eiffel tower", 1.0, 1.0),
    ("an apple a day", "apple day", 1.0, 1.0),
    ("Paris, France", "Paris", 0.0, 2 / 3),
    ("", "Paris", 0.0, 0.0),
    ("", "", 1.0, 0.0),  # v1.1: no common tokens -> F1 0 even for two empty answers
    ("theater", "the theater", 1.0, 1.0),  # "the" only removed as a whole word
])
def test_squad_edge_cases(pred, gold, em, f1):
    assert M.exact_match([pred], [gold]) == em
    assert M.token_f1([pred], [gold]) == pytest.approx(f1)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.text(max_size=30))
def test_f1_is_symmetric_and_bounded(a, b):
    f = M.token_f1([a], [b])
    assert 0.0 <= f <= 1.0
    assert f == pytest.approx(M.token_f1([b], [a]))
    assert M.exact_match([a], [b]) <= (1.0 if f == 1.0 or not squad_normalize(a) else 0.0)


# --- Levenshtein ---------------------------------------------------------------------------

def plain_levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=15), st.text(max_size=15))
def test_levenshtein_matches_dynamic_programming(a, b):
    d = M.levenshtein_distance(a, b)
    assert d == plain_levenshtein(a, b)
    assert M.levenshtein_similarity([a], [b]) == pytest.approx(1 - d / max(len(a), len(b), 1))


def test_levenshtein_known_values():
    assert M.levenshtein_distance("kitten", "sitting") == 3
    assert M.levenshtein_similarity(["abc", ""], [["xyz", "abd"], ""]) == pytest.approx((2 / 3 + 1) / 2)


# --- BLEU / chrF against sacrebleu ----------------------------------------------------------

def translation_hypotheses():
    """Deterministic hypotheses for the shipped translation set: word drops, swaps, copies."""
    items = load_translation()
    hyps = []
    for i, it in enumerate(items):
        words = it.references[0].split()
        if i % 3 == 0:
            hyps.append(" ".join(w for j, w in enumerate(words) if j % 4 != 3))
        elif i % 3 == 1 and len(words) > 3:
            words[1], words[2] = words[2], words[1]
            hyps.append(" ".join(words))
        else:
            hyps.append(it.source)  # untranslated
    return items, hyps


def test_bleu_and_chrf_equal_sacrebleu_corpus_scores():
    import sacrebleu

    items, hyps = translation_hypotheses()
    refs = [it.references for it in items]
    assert any(len(r) == 2 for r in refs) and any(len(r) == 1 for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(2)]
    want_bleu = sacrebleu.corpus_bleu(hyps, streams, tokenize="13a").score
    want_chrf = sacrebleu.corpus_chrf(hyps, streams).score
    assert M.bleu(hyps, refs) == want_bleu
    assert M.chrf(hyps, refs) == want_chrf
    assert 10 < want_bleu < 90 and 10 < want_chrf < 95
    # Pinned choice: corpus BLEU, not the mean of sentence BLEU.
    sent = M.sentence_bleu(hyps, refs)
    assert sent == [sacrebleu.sentence_bleu(h, r).score for h, r in zip(hyps, refs)]
    assert abs(sum(sent) / len(sent) - want_bleu) > 0.5
    # Pinned choice: 13a tokenization and case-sensitive.
    assert M.bleu(hyps, refs, tokenize="intl") == sacrebleu.corpus_bleu(hyps, streams, tokenize="intl").score
    assert M.bleu([h.upper() for h in hyps], refs) < M.bleu([h.upper() for h in hyps], refs, lowercase=True)
    assert M.chrf(hyps, refs, word_order=2) == sacrebleu.corpus_chrf(hyps, streams, word_order=2).score


def test_perfect_translation_scores_100():
    items = load_translation()
    refs = [it.references for it in items]
    best = [r[0] for r in refs]
    assert M.bleu(best, refs) == pytest.approx(100.0)
    assert M.chrf(best, refs) == pytest.approx(100.0)


# --- ROUGE against rouge-score -------------------------------------------------------------

def lead2(doc):
    return " ".join(re.split(r"(?<=[.!?])\s+", doc)[:2])


def test_rouge_equals_rouge_score_on_summarization_set():
    from rouge_score import rouge_scorer

    items = load_summarization()
    preds = [lead2(it.document) for it in items]
    refs = [it.summary for it in items]
    assert sum("\n" in r for r in refs) > len(refs) // 2  # most references: one sentence per line
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    per = [scorer.score(r, p) for p, r in zip(preds, refs)]
    want = {k: sum(s[k].fmeasure for s in per) / len(per) for k in M.ROUGE_TYPES}
    assert M.rouge(preds, refs) == want
    # Pinned: in "newline" mode the one-line lead-2 prediction is one Lsum sentence.
    split = [M.split_sentences(p) for p in preds]
    per_split = [scorer.score(r, p) for p, r in zip(split, refs)]
    got = M.rouge(preds, refs, lsum_split="sentence")
    assert got["rougeLsum"] == sum(s["rougeLsum"].fmeasure for s in per_split) / len(per_split)
    assert got["rougeLsum"] != want["rougeLsum"]
    assert got["rougeL"] == want["rougeL"]  # sentence splitting only affects Lsum
    # Pinned: stemming on by default.
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    no_stem = sum(plain.score(r, p)["rouge1"].fmeasure for p, r in zip(preds, refs)) / len(preds)
    assert M.rouge(preds, refs, use_stemmer=False)["rouge1"] == no_stem != want["rouge1"]


def test_rouge_multi_reference_takes_the_best():
    r = M.rouge_scores(["the cat sat on the mat"], [["a dog barked", "the cat sat on a mat"]])
    single = M.rouge_scores(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert r == single


def test_split_sentences_keeps_existing_newlines():
    assert M.split_sentences("One. Two! Three?") == "One.\nTwo!\nThree?"
    assert M.split_sentences("a. b\nc") == "a. b\nc"


# --- Input errors ---------------------------------------------------------------------------

def test_mismatched_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="2 predictions but 1 references"):
        M.exact_match(["a", "b"], ["a"])
    with pytest.raises(ConfigError, match="single string"):
        M.bleu("abc", ["abc"])
    with pytest.raises(ConfigError, match="reference 0"):
        M.token_f1(["a"], [[]])
    with pytest.raises(ConfigError, match="lsum_split"):
        M.rouge(["a"], ["a"], lsum_split="paragraph")
    assert M.exact_match([], []) == 0.0 and M.bleu([], []) == 0.0
