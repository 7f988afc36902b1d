"""Benchmark decontamination: find training documents that share long word n-grams with eval sets.

The test follows GPT-3 (Brown et al. 2020, Appendix C) in spirit: texts are lower-cased and
split into word tokens, and a training document is contaminated when it contains at least
``min_matches`` of the n-grams (default n = 13) that occur in any evaluation item. Eval items
shorter than n words cannot be tested this way; they are counted and reported, not matched.
N-grams are kept as 64-bit hashes in a sorted array (a false match needs a 64-bit collision).
Deliberately left out: removing only the contaminated span (the document is dropped or
flagged as a whole) and fuzzy matching below the n-gram level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from lmstack.data.dedup import ngram_hashes, normalized_words, word_hashes
from lmstack.data.readers import ReadStats, SourceConfig, read_source
from lmstack.errors import ConfigError


@dataclass
class DecontamConfig:
    eval_sets: list[SourceConfig] = field(
        default_factory=list, metadata={"help": "evaluation sets, read like any source"})
    ngram: int = field(default=13, metadata={"help": "words per n-gram"})
    min_matches: int = field(default=1, metadata={"help": "shared n-grams that make a match"})
    action: Literal["drop", "flag"] = field(
        default="drop", metadata={"help": "drop contaminated documents, or keep and list them"})

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.min_matches < 1:
            raise ConfigError(f"DecontamConfig: ngram ({self.ngram}) and min_matches "
                              f"({self.min_matches}) must be >= 1")


class EvalNgrams:
    """The n-gram hashes of a set of evaluation texts, and which eval item each came from."""

    def __init__(self, n: int = 13):
        self.n = n
        self.items = 0
        self.too_short = 0
        self._chunks: list[np.ndarray] = []
        self._owners: list[np.ndarray] = []
        self.names: list[str] = []
        self.hashes = np.empty(0, dtype=np.uint64)
        self.owners = np.empty(0, dtype=np.int64)

    def add(self, name: str, text: str) -> None:
        self.items += 1
        g = ngram_hashes(word_hashes(normalized_words(text)), self.n)
        if not len(g):
            self.too_short += 1
            return
        self._chunks.append(g)
        self._owners.append(np.full(len(g), len(self.names), dtype=np.int64))
        self.names.append(name)

    def freeze(self) -> EvalNgrams:
        if self._chunks:
            h = np.concatenate([self.hashes, *self._chunks])
            o = np.concatenate([self.owners, *self._owners])
            order = np.argsort(h, kind="stable")
            self.hashes, self.owners = h[order], o[order]
            self._chunks, self._owners = [], []
        return self

    def match(self, text: str) -> tuple[int, list[str]]:
        """(number of the text's n-grams found in the eval sets, names of the items hit)."""
        if not len(self.hashes):
            return 0, []
        g = ngram_hashes(word_hashes(normalized_words(text)), self.n)
        if not len(g):
            return 0, []
        pos = np.searchsorted(self.hashes, g)
        pos[pos == len(self.hashes)] = 0
        hit = self.hashes[pos] == g
        if not hit.any():
            return 0, []
        owners = sorted({self.names[i] for i in self.owners[pos[hit]].tolist()})
        return int(hit.sum()), owners


def load_eval_ngrams(cfg: DecontamConfig, stats: ReadStats | None = None) -> EvalNgrams:
    """Read every eval set of ``cfg`` into one n-gram index."""
    index = EvalNgrams(cfg.ngram)
    for src in cfg.eval_sets:
        for doc in read_source(src, stats):
            index.add(doc.id, doc.text)
    return index.freeze()
