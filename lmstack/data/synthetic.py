"""Synthetic English-like documents with planted duplicates, for tests and benchmarks.

The words are drawn from a fixed list of common English words (stop words included), so the
documents pass the quality filters; near-duplicates are copies with a small share of words
substituted, deleted or inserted, which keeps their shingle Jaccard similarity high, while
"hard negatives" share only part of their text with another document.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lmstack.data.dedup import normalized_words, shingles

WORDS = (
    "the of and to a in is it that was for on are as with he be at by this had not but from or "
    "have an they which you were her his she their we there been has will would all if one "
    "time people year way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education river garden letter music village winter summer ocean mountain bridge window "
    "make know think take see come want look use find give tell ask seem feel try leave call "
    "good new first last long great little own other old big high different small large next "
    "early young important few public bad same able quickly slowly quietly always never often "
    "rather almost together already perhaps certainly clearly simply really"
).split()


def random_text(rng: random.Random, n_words: int) -> str:
    """Sentences of 6-18 words ending in a full stop, grouped in paragraphs of 2-5 sentences."""
    paras: list[list[str]] = [[]]
    words_left = n_words
    while words_left > 0:
        k = min(rng.randint(6, 18), words_left)
        # Two words in five are function words, as in English prose.
        words = [rng.choice(WORDS[:44] if rng.random() < 0.4 else WORDS) for _ in range(k)]
        paras[-1].append(" ".join(words).capitalize() + ".")
        words_left -= k
        if len(paras[-1]) >= rng.randint(2, 5):
            paras.append([])
    return "\n\n".join(" ".join(p) for p in paras if p)


def mutate(text: str, rng: random.Random, rate: float) -> str:
    """Substitute, delete or insert a share ``rate`` of the words, keeping the rest in place."""
    out = []
    for w in text.split(" "):
        r = rng.random()
        if r < rate / 3:
            continue
        if r < 2 * rate / 3:
            out.append(rng.choice(WORDS))
        elif r < rate:
            out += [w, rng.choice(WORDS)]
        else:
            out.append(w)
    return " ".join(out)


def jaccard(a: str, b: str, k: int = 5) -> float:
    """Exact Jaccard similarity of the word k-shingle sets of two texts."""
    sa, sb = set(shingles(normalized_words(a), k)), set(shingles(normalized_words(b), k))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


@dataclass
class PlantedSet:
    docs: list[tuple[str, str]] = field(default_factory=list)  # (id, text) in stream order
    near_duplicates: set[str] = field(default_factory=set)  # ids that copy an earlier document
    exact_duplicates: set[str] = field(default_factory=set)
    original: dict[str, str] = field(default_factory=dict)  # copy id -> id of the document it copies


def planted_duplicates(n_docs: int = 200, n_near: int = 40, n_exact: int = 10, n_partial: int = 20,
                       rate: float = 0.01, words: tuple[int, int] = (150, 400),
                       seed: int = 0) -> PlantedSet:
    """``n_docs`` originals, then near copies (``rate`` of words edited), exact copies (case and
    spacing changed) and partial-overlap hard negatives (half of a document plus new text),
    shuffled together after the originals they copy."""
    rng = random.Random(seed)
    out = PlantedSet()
    originals = [random_text(rng, rng.randint(*words)) for _ in range(n_docs)]
    out.docs = [(f"doc{i}", t) for i, t in enumerate(originals)]
    extra: list[tuple[str, str, str]] = []
    for j in range(n_near):
        i = rng.choice(range(n_docs))  # draws exactly like rng.choice(originals)
        out.original[f"near{j}"] = f"doc{i}"
        extra.append(("near", f"near{j}", mutate(originals[i], rng, rate)))
    for j in range(n_exact):
        i = rng.choice(range(n_docs))
        out.original[f"exact{j}"] = f"doc{i}"
        extra.append(("exact", f"exact{j}", "  " + originals[i].upper().replace(" ", "   ") + " "))
    for j in range(n_partial):
        src = rng.choice(originals).split(" ")
        half = " ".join(src[: len(src) // 2])
        extra.append(("partial", f"partial{j}", half + " " + random_text(rng, len(src) // 2)))
    rng.shuffle(extra)
    for kind, doc_id, text in extra:
        out.docs.append((doc_id, text))
        if kind == "near":
            out.near_duplicates.add(doc_id)
        elif kind == "exact":
            out.exact_duplicates.add(doc_id)
    return out
