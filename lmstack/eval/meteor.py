"""METEOR (Banerjee & Lavie 2005; parameters of Lavie & Agarwal 2007) with three match stages.

Words are aligned in stages, each over the words still unmatched: exact (lower-cased) form,
Porter stem, then WordNet synonym. Within a stage, hypothesis words are taken from last to
first and each is paired with the rightmost unmatched reference word that matches, the rule
nltk's ``meteor_score`` uses, so scores agree with nltk's. With m matches, hypothesis length
``len_h``, reference length ``len_r`` and ``ch`` chunks (maximal runs adjacent in both)::

    P = m / len_h, R = m / len_r, Fmean = P R / (alpha P + (1 - alpha) R)
    Penalty = gamma (ch / m) ** beta,    METEOR = Fmean (1 - Penalty)

with alpha = 0.9, beta = 3, gamma = 0.5. Multiple references: the best one counts.

One deliberate difference from nltk: the synonym stage looks up the words themselves, where
nltk (3.9) looks up the Porter stems left over from the stem stage ("quickli" for "quickly",
which WordNet does not know), so it finds fewer synonyms. The synonym stage runs only
when WordNet's files are installed (Debian ``wordnet-base``); ``synonym_stage_note()`` says
which, for reports. Left out: METEOR 1.5's paraphrase tables and function-word weights.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from typing import Callable, Iterable, Optional, Protocol, Sequence

from lmstack.eval.metrics import Reference, _as_lists, _mean

_TOKEN = re.compile(r"\w+|[^\w\s]")


class SynonymSource(Protocol):
    def synonyms(self, word: str) -> Iterable[str]: ...


def tokenize(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks."""
    return _TOKEN.findall(text.lower())


@functools.lru_cache(maxsize=1)
def _stemmer() -> Callable[[str], str]:
    from nltk.stem.porter import PorterStemmer

    return functools.lru_cache(maxsize=65536)(PorterStemmer().stem)


def _default_wordnet() -> Optional[SynonymSource]:
    from lmstack.eval.wordnet import load_wordnet

    return load_wordnet()


def synonym_stage_note() -> str:
    """One line for a report: whether METEOR's WordNet synonym stage ran."""
    from lmstack.eval.wordnet import find_wordnet_dir

    root = find_wordnet_dir()
    if root is None:
        return ("METEOR: WordNet synonym stage skipped (no WordNet files found; install Debian's "
                "wordnet-base or set LMSTACK_WORDNET); exact and stem stages only")
    return f"METEOR: exact, Porter-stem and WordNet-synonym stages (WordNet from {root})"


def _match_stage(hyp: list[tuple[int, str]], ref: list[tuple[int, str]],
                 keys: Callable[[str], Iterable[str]]) -> tuple[list[tuple[int, int]], list, list]:
    """One alignment stage: returns (pairs of original indices, unmatched hyp, unmatched ref).

    ``keys(word)`` gives the reference words a hypothesis word may match in this stage
    (reference words are compared by the stage's own key: see the callers).
    """
    positions: dict[str, list[int]] = defaultdict(list)  # key -> indices into `ref`, ascending
    for j, (_, word) in enumerate(ref):
        positions[word].append(j)
    pairs, used_h, used_r = [], set(), set()
    for i in range(len(hyp) - 1, -1, -1):
        best_key, best_j = None, -1
        for key in keys(hyp[i][1]):
            if positions.get(key) and positions[key][-1] > best_j:
                best_key, best_j = key, positions[key][-1]
        if best_key is not None:
            positions[best_key].pop()
            used_h.add(i)
            used_r.add(best_j)
            pairs.append((hyp[i][0], ref[best_j][0]))
    return (pairs, [h for i, h in enumerate(hyp) if i not in used_h],
            [r for j, r in enumerate(ref) if j not in used_r])


def align(hyp_tokens: Sequence[str], ref_tokens: Sequence[str],
          wordnet: Optional[SynonymSource] = None) -> list[tuple[int, int]]:
    """(hypothesis index, reference index) pairs from the exact, stem and synonym stages."""
    stem = _stemmer()
    hyp = list(enumerate(hyp_tokens))
    ref = list(enumerate(ref_tokens))
    exact, hyp, ref = _match_stage(hyp, ref, lambda w: (w,))
    # Stem stage: compare stems on both sides, then restore surface words for the next stage.
    surface_h, surface_r = dict(hyp), dict(ref)
    stemmed, hyp_s, ref_s = _match_stage([(i, stem(w)) for i, w in hyp], [(j, stem(w)) for j, w in ref],
                                         lambda w: (w,))
    hyp = [(i, surface_h[i]) for i, _ in hyp_s]
    ref = [(j, surface_r[j]) for j, _ in ref_s]
    synonym: list[tuple[int, int]] = []
    if wordnet is not None:
        def syn_keys(w: str) -> set[str]:
            return {s for s in wordnet.synonyms(w) if "_" not in s} | {w}

        synonym, hyp, ref = _match_stage(hyp, ref, syn_keys)
    return sorted(exact + stemmed + synonym)


def count_chunks(pairs: Sequence[tuple[int, int]]) -> int:
    """Fewest runs of matches adjacent in both hypothesis and reference (pairs sorted by hyp)."""
    if not pairs:
        return 0
    return 1 + sum(1 for (h0, r0), (h1, r1) in zip(pairs, pairs[1:]) if not (h1 == h0 + 1 and r1 == r0 + 1))


def meteor_tokens(hyp_tokens: Sequence[str], ref_tokens: Sequence[str], wordnet: Optional[SynonymSource] = None,
                  alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    """METEOR of one tokenised hypothesis against one tokenised reference."""
    pairs = align(hyp_tokens, ref_tokens, wordnet)
    m = len(pairs)
    if m == 0:
        return 0.0
    precision, recall = m / len(hyp_tokens), m / len(ref_tokens)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    penalty = gamma * (count_chunks(pairs) / m) ** beta
    return fmean * (1 - penalty)


def meteor_scores(predictions: Sequence[str], references: Sequence[Reference], synonyms: Optional[bool] = None,
                  wordnet: Optional[SynonymSource] = None, alpha: float = 0.9, beta: float = 3.0,
                  gamma: float = 0.5) -> list[float]:
    """Per-item METEOR (best reference). ``synonyms=None`` uses WordNet when it is installed."""
    refs = _as_lists(predictions, references)
    if wordnet is None and synonyms is not False:
        wordnet = _default_wordnet()
        if wordnet is None and synonyms:
            from lmstack.errors import LMStackError

            raise LMStackError(synonym_stage_note())
    if synonyms is False:
        wordnet = None
    return [max(meteor_tokens(tokenize(p), tokenize(g), wordnet, alpha, beta, gamma) for g in rs)
            for p, rs in zip(predictions, refs)]


def meteor(predictions: Sequence[str], references: Sequence[Reference], synonyms: Optional[bool] = None,
           wordnet: Optional[SynonymSource] = None) -> float:
    """Mean per-item METEOR in [0, 1]."""
    return _mean(meteor_scores(predictions, references, synonyms, wordnet))
