"""A small reader of Princeton WordNet 3.0's database files, enough for METEOR's synonyms.

It reads the plain files that Debian's ``wordnet-base`` installs (``index.{noun,verb,adj,adv}``,
``data.*``, ``*.exc``) and answers ``synonyms(word)``: every lemma name of every synset of the
word's base forms, in all four parts of speech. Base forms come from WordNet's ``morphy``:
the exception lists first, otherwise one pass of the documented suffix rules (wndb(5WN),
morphy(7WN)), keeping only forms the index knows.

Deliberately left out: relations (hypernyms, ...), sense keys, frequency counts, glosses.

Where the files are looked for, first hit wins: ``$LMSTACK_WORDNET``, ``/usr/share/wordnet``
(Debian's ``wordnet-base``), and ``third_party/wordnet/usr/share/wordnet`` beside the
package's source checkout (what ``scripts/fetch_eval_assets.sh`` extracts without root).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Optional

from lmstack.errors import LMStackError

_POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}

# morphy's detachment rules per part of speech: (suffix, replacement).
_SUFFIX_RULES = {
    "n": [("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
          ("shes", "sh"), ("men", "man"), ("ies", "y")],
    "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""),
          ("ing", "e"), ("ing", "")],
    "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    "r": [],
}
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective syntactic markers: (a), (p), (ip)


def find_wordnet_dir() -> Optional[Path]:
    """The first folder holding WordNet's database files, or None when none is installed."""
    candidates = []
    if os.environ.get("LMSTACK_WORDNET"):
        candidates.append(Path(os.environ["LMSTACK_WORDNET"]))
    candidates.append(Path("/usr/share/wordnet"))
    candidates.append(Path(__file__).resolve().parents[2] / "third_party" / "wordnet" / "usr" / "share" / "wordnet")
    for c in candidates:
        if (c / "index.noun").is_file() and (c / "data.noun").is_file():
            return c
    return None


class WordNet:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        missing = [f"{kind}.{name}" for name in _POS_FILES.values() for kind in ("index", "data")
                   if not (self.root / f"{kind}.{name}").is_file()]
        if missing:
            raise LMStackError(f"wordnet: {self.root} lacks {missing}; expected WordNet 3.0 database files")
        self.index: dict[str, dict[str, list[int]]] = {}  # lemma -> pos -> synset offsets
        self.exceptions: dict[str, dict[str, list[str]]] = {p: {} for p in _POS_FILES}
        for pos, name in _POS_FILES.items():
            with open(self.root / f"index.{name}", encoding="utf-8") as f:
                for line in f:
                    if line.startswith(" "):  # licence header
                        continue
                    fields = line.split()
                    n_synsets = int(fields[2])
                    self.index.setdefault(fields[0], {})[pos] = [int(o) for o in fields[-n_synsets:]]
            exc = self.root / f"{name}.exc"
            if exc.is_file():
                with open(exc, encoding="utf-8") as f:
                    for line in f:
                        inflected, *bases = line.split()
                        self.exceptions[pos][inflected] = bases
        self._data = {pos: open(self.root / f"data.{name}", "rb") for pos, name in _POS_FILES.items()}

    def morphy(self, form: str, pos: str) -> list[str]:
        """Base forms of ``form`` as part of speech ``pos`` that WordNet lists (may include form)."""
        if form in self.exceptions[pos]:
            candidates = [form] + self.exceptions[pos][form]
        else:
            candidates = [form] + [form[: -len(old)] + new for old, new in _SUFFIX_RULES[pos]
                                   if form.endswith(old)]
        seen: list[str] = []
        for c in candidates:
            if pos in self.index.get(c, {}) and c not in seen:
                seen.append(c)
        return seen

    def synsets(self, word: str) -> list[tuple[str, int]]:
        """(pos, offset) of every synset of the word's base forms, nouns, verbs, adjectives, adverbs."""
        word = word.lower().replace(" ", "_")
        return [(pos, off) for pos in _POS_FILES for base in self.morphy(word, pos)
                for off in self.index[base][pos]]

    @functools.lru_cache(maxsize=65536)
    def lemma_names(self, pos: str, offset: int) -> tuple[str, ...]:
        f = self._data[pos]
        f.seek(offset)
        fields = f.readline().decode("utf-8").split()
        n_words = int(fields[3], 16)  # w_cnt is two hexadecimal digits
        return tuple(_MARKER.sub("", fields[4 + 2 * i]) for i in range(n_words))

    @functools.lru_cache(maxsize=65536)
    def synonyms(self, word: str) -> frozenset[str]:
        """Lemma names of all synsets of ``word`` (multi-word names use ``_``)."""
        return frozenset(name for pos, off in self.synsets(word) for name in self.lemma_names(pos, off))


@functools.lru_cache(maxsize=1)
def load_wordnet() -> Optional[WordNet]:
    """The installed WordNet (cached), or None when its files are not found."""
    root = find_wordnet_dir()
    return WordNet(root) if root is not None else None
