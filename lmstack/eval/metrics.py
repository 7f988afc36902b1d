"""Text metrics: pure functions over a list of predictions and a list of references.

Every function takes ``predictions: list[str]`` and ``references`` with one entry per
prediction; an entry is either a string or a list of acceptable strings (multi-reference).
Scales follow each metric's reference implementation: EM, F1, similarity, ROUGE and METEOR
are in [0, 1]; BLEU and chrF are in [0, 100] as sacrebleu reports them.

Choices pinned here (and by the tests):

* EM / F1 use the SQuAD v1.1 evaluation's rules: lower-case, drop ASCII punctuation, drop
  the articles a/an/the, collapse whitespace; F1 is over whitespace tokens of the normalised
  strings; the best reference counts. Two empty strings score F1 0 under v1.1's rules.
* BLEU and chrF are **corpus-level** (sacrebleu's ``corpus_bleu`` / ``corpus_chrf`` with the
  13a tokenizer, chrF with n=6, beta=2, no word n-grams). ``sentence_bleu`` averages
  per-sentence scores for per-item use, which is a different number.
* ROUGE is rouge-score's F-measure averaged over items (best reference per item), Porter
  stemming on. ``rougeLsum`` splits summaries into sentences at newlines; with
  ``lsum_split="sentence"`` text without newlines is split after ``.``, ``!``, ``?`` first.

Deliberately left out: SacreBLEU's other tokenizers beyond passing ``tokenize=``, TER.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Literal, Sequence, Union

from lmstack.errors import ConfigError

Reference = Union[str, Sequence[str]]


def _as_lists(predictions: Sequence[str], references: Sequence[Reference]) -> list[list[str]]:
    """Check lengths and types; return references as one list of strings per prediction."""
    if isinstance(predictions, str):
        raise ConfigError("metrics: predictions must be a list of strings, got a single string")
    if len(predictions) != len(references):
        raise ConfigError(
            f"metrics: got {len(predictions)} predictions but {len(references)} references; "
            "expected one reference (or list of references) per prediction"
        )
    out = []
    for i, (p, r) in enumerate(zip(predictions, references)):
        if not isinstance(p, str):
            raise ConfigError(f"metrics: prediction {i} is {type(p).__name__}, expected a string")
        refs = [r] if isinstance(r, str) else list(r)
        if not refs or not all(isinstance(x, str) for x in refs):
            raise ConfigError(f"metrics: reference {i} is {r!r}, expected a string or a non-empty list of strings")
        out.append(refs)
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


# --- SQuAD-style exact match and token F1 ---------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower, strip punctuation, drop articles, collapse spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def exact_match_scores(predictions: Sequence[str], references: Sequence[Reference]) -> list[float]:
    refs = _as_lists(predictions, references)
    return [float(max(normalize_answer(p) == normalize_answer(g) for g in rs))
            for p, rs in zip(predictions, refs)]


def token_f1_scores(predictions: Sequence[str], references: Sequence[Reference]) -> list[float]:
    refs = _as_lists(predictions, references)
    return [max(_f1(p, g) for g in rs) for p, rs in zip(predictions, refs)]


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Fraction of predictions equal to some reference after SQuAD normalisation."""
    return _mean(exact_match_scores(predictions, references))


def token_f1(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Mean over items of the best token-overlap F1 against the references (SQuAD v1.1)."""
    return _mean(token_f1_scores(predictions, references))


# --- Edit distance ----------------------------------------------------------------------


def levenshtein_distance(a: str, b: str) -> int:
    """Character edits (insert, delete, substitute; each cost 1) turning ``a`` into ``b``."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a, b)


def levenshtein_similarity(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Mean of 1 - distance / max(len) per item (best reference); 1.0 for two empty strings."""
    from rapidfuzz.distance import Levenshtein

    refs = _as_lists(predictions, references)
    return _mean([max(Levenshtein.normalized_similarity(p, g) for g in rs) for p, rs in zip(predictions, refs)])


# --- BLEU and chrF (sacrebleu) ------------------------------------------------------------


def _ref_streams(refs: list[list[str]]) -> list[list]:
    """Per-item reference lists -> sacrebleu's reference streams, padded with None."""
    n = max(len(r) for r in refs)
    return [[r[j] if j < len(r) else None for r in refs] for j in range(n)]


def bleu(predictions: Sequence[str], references: Sequence[Reference], tokenize: str = "13a",
         lowercase: bool = False) -> float:
    """Corpus BLEU in [0, 100] (Papineni et al. 2002) via sacrebleu, default 13a tokenizer."""
    from sacrebleu.metrics import BLEU

    refs = _as_lists(predictions, references)
    if not predictions:
        return 0.0
    return BLEU(tokenize=tokenize, lowercase=lowercase).corpus_score(list(predictions), _ref_streams(refs)).score


def sentence_bleu(predictions: Sequence[str], references: Sequence[Reference], tokenize: str = "13a") -> list[float]:
    """Per-item smoothed BLEU (sacrebleu's sentence_score, exp smoothing) in [0, 100]."""
    from sacrebleu.metrics import BLEU

    refs = _as_lists(predictions, references)
    metric = BLEU(tokenize=tokenize, effective_order=True)
    return [metric.sentence_score(p, rs).score for p, rs in zip(predictions, refs)]


def chrf(predictions: Sequence[str], references: Sequence[Reference], word_order: int = 0) -> float:
    """Corpus chrF in [0, 100] (Popović 2015) via sacrebleu; ``word_order=2`` gives chrF++."""
    from sacrebleu.metrics import CHRF

    refs = _as_lists(predictions, references)
    if not predictions:
        return 0.0
    return CHRF(word_order=word_order).corpus_score(list(predictions), _ref_streams(refs)).score


# --- ROUGE (rouge-score) ------------------------------------------------------------------

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """Put each sentence on its own line (after . ! ?), unless the text already has newlines."""
    if "\n" in text:
        return text
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge_scores(predictions: Sequence[str], references: Sequence[Reference], use_stemmer: bool = True,
                 lsum_split: Literal["newline", "sentence"] = "newline") -> dict[str, list[float]]:
    """Per-item ROUGE F-measures (best reference per item) for rouge1/2/L/Lsum."""
    from rouge_score import rouge_scorer

    if lsum_split not in ("newline", "sentence"):
        raise ConfigError(f"rouge: lsum_split={lsum_split!r}, expected 'newline' or 'sentence'")
    refs = _as_lists(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    prep = split_sentences if lsum_split == "sentence" else (lambda t: t)
    out: dict[str, list[float]] = {k: [] for k in ROUGE_TYPES}
    for p, rs in zip(predictions, refs):
        best = {k: 0.0 for k in ROUGE_TYPES}
        for g in rs:
            s = scorer.score(prep(g), prep(p))  # rouge-score's order: (target, prediction)
            for k in ROUGE_TYPES:
                best[k] = max(best[k], s[k].fmeasure)
        for k in ROUGE_TYPES:
            out[k].append(best[k])
    return out


def rouge(predictions: Sequence[str], references: Sequence[Reference], use_stemmer: bool = True,
          lsum_split: Literal["newline", "sentence"] = "newline") -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure over items (Lin 2004), in [0, 1]."""
    per_item = rouge_scores(predictions, references, use_stemmer, lsum_split)
    return {k: _mean(v) for k, v in per_item.items()}
