"""Exact and near-duplicate detection: a normalised-content hash, and MinHash + LSH.

MinHash (Broder 1997, "On the resemblance and containment of documents") estimates the
Jaccard similarity of two shingle sets as the fraction of permutations under which both sets
have the same minimum. LSH banding (Leskovec, Rajaraman, Ullman, "Mining of Massive
Datasets", ch. 3.4) splits the ``num_perm`` values into ``b`` bands of ``r`` rows: two
documents of similarity ``s`` become candidates with probability ``P(s) = 1 - (1 - s^r)^b``,
an S-curve whose midpoint is near ``(1/b)^(1/r)``.

How ``(b, r)`` is chosen depends on whether candidates are verified:

* ``verify`` on (the default): a candidate counts only if its estimated Jaccard (the share
  of equal signature values) reaches the threshold, so a false candidate costs one
  comparison while a missed pair is lost. ``recall_bands`` takes the ``(b, r)`` with
  ``P(threshold) >= lsh_recall`` (0.99) and the smallest false-positive area below the
  threshold: at 0.8 and 128 permutations ``(16, 6)``, midpoint 0.63.
* ``verify`` off: the bands alone decide, and ``optimal_bands`` minimises the weighted
  false-positive and false-negative areas around the threshold, datasketch's criterion
  (``(9, 13)`` at 0.8, midpoint 0.84: 43% of the pairs at 0.83 are never candidates).

The limit of verification is the estimate itself: from ``n`` permutations its standard
deviation is ``sqrt(s(1-s)/n)``, 0.033 at s = 0.83 with 128, so a pair of true similarity
``s`` just above the threshold ``t`` is rejected with probability ``Phi((t - s) / sd)``: about
18% at 0.83, 6% at 0.85 and under 0.1% from 0.9 when t = 0.8. More permutations narrow that
band; verifying on exact shingle sets would need every document's set in memory.

The permutations are datasketch's "affine32" scheme (MurmurHash3 finalizer, then
``a*h + b mod 2^32`` with odd ``a``, drawn from ``numpy.random.RandomState(seed)``), so with
``hash="sha1"`` the signatures equal datasketch's bit for bit, and with the same ``(b, r)``
the LSH candidates equal ``MinHashLSH``'s (tests check both). ``hash="fast"`` hashes each
distinct word once and combines word hashes into shingle hashes with numpy, several times
faster and statistically equivalent (its Jaccard estimates are tested against datasketch's).

Documents are compared in stream order: the first of a group of duplicates is kept. Both
indexes can be saved and loaded, so a run can deduplicate against earlier runs.
Deliberately left out: character shingles, weighted MinHash, on-disk LSH storage, exact
(shingle-set) verification.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from lmstack.errors import ConfigError

_TOKEN = re.compile(r"\w+")
_M32 = np.uint32(0xFFFFFFFF)


@dataclass
class DedupConfig:
    exact: bool = field(default=True, metadata={"help": "drop documents whose normalised text repeats"})
    near: bool = field(default=True, metadata={"help": "drop near-duplicates (MinHash + LSH)"})
    shingle_size: int = field(default=5, metadata={"help": "words per shingle"})
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations"})
    threshold: float = field(default=0.8, metadata={"help": "Jaccard similarity threshold"})
    seed: int = field(default=1, metadata={"help": "seed of the permutations"})
    hash: Literal["fast", "sha1"] = field(
        default="fast", metadata={"help": "shingle hash: fast, or sha1 (datasketch-identical)"})
    verify: bool = field(default=True, metadata={"help": "confirm LSH candidates by estimated Jaccard"})
    lsh_recall: float = field(default=0.99, metadata={
        "help": "with verify: least LSH candidate probability at the threshold"})
    false_positive_weight: float = field(default=0.5, metadata={"help": "without verify: band choice weight"})
    false_negative_weight: float = field(default=0.5, metadata={"help": "without verify: band choice weight"})

    def __post_init__(self) -> None:
        if self.shingle_size < 1:
            raise ConfigError(f"DedupConfig.shingle_size: got {self.shingle_size}, expected >= 1")
        if self.num_perm < 2:
            raise ConfigError(f"DedupConfig.num_perm: got {self.num_perm}, expected >= 2")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"DedupConfig.threshold: got {self.threshold}, expected in (0, 1]")
        if not 0.0 < self.lsh_recall < 1.0:
            raise ConfigError(f"DedupConfig.lsh_recall: got {self.lsh_recall}, expected in (0, 1)")


# ---- text normalisation and hashing ----------------------------------------------------------

def normalized_words(text: str) -> list[str]:
    """Lower-cased word tokens: punctuation, case and spacing do not make documents differ."""
    return _TOKEN.findall(text.lower())


def content_hash(text: str) -> bytes:
    """Hash of the normalised content, the key of exact deduplication."""
    return hashlib.blake2b(" ".join(normalized_words(text)).encode(), digest_size=16).digest()


_WORD_CACHE: dict[str, int] = {}


def word_hashes(words: list[str]) -> np.ndarray:
    """64-bit hash of each word (cached per process: natural text reuses few distinct words)."""
    cache = _WORD_CACHE
    if len(cache) > 2_000_000:
        cache.clear()
    out = np.empty(len(words), dtype=np.uint64)
    for i, w in enumerate(words):
        h = cache.get(w)
        if h is None:
            h = cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
        out[i] = h
    return out


_POLY = np.uint64(0x100000001B3)


def ngram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every window of ``n`` consecutive word hashes (a polynomial in ``_POLY``)."""
    m = len(wh) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = np.zeros(m, dtype=np.uint64)
    for k in range(n):  # uint64 arithmetic wraps modulo 2^64, as intended
        acc = acc * _POLY + wh[k:k + m]
    return acc


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, a bijection that spreads structured inputs."""
    h = h.astype(np.uint32, copy=True)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def shingles(words: list[str], k: int) -> list[str]:
    """Word k-grams joined by a space; a text shorter than k words is one shingle."""
    if len(words) <= k:
        return [" ".join(words)] if words else []
    return [" ".join(words[i:i + k]) for i in range(len(words) - k + 1)]


def sha1_hash32(data: bytes) -> int:
    return int.from_bytes(hashlib.sha1(data).digest()[:4], "little")


class MinHasher:
    """Signatures of ``num_perm`` uint32 minima over a document's word shingles."""

    def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 1,
                 hash: str = "fast"):
        self.num_perm, self.shingle_size, self.hash = num_perm, shingle_size, hash
        rng = np.random.RandomState(seed)
        # Odd multipliers make a*h + b (mod 2^32) a bijection: no collisions are added.
        self.a = rng.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        self.b = rng.randint(0, 1 << 32, num_perm, dtype=np.uint32)

    def shingle_hashes(self, text: str) -> np.ndarray:
        words = normalized_words(text)
        if self.hash == "sha1":
            hs = [sha1_hash32(s.encode()) for s in shingles(words, self.shingle_size)]
            return np.array(hs, dtype=np.uint32)
        if not words:
            return np.empty(0, dtype=np.uint32)
        g = ngram_hashes(word_hashes(words), min(self.shingle_size, len(words)))
        return ((g ^ (g >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)

    def signature_of_hashes(self, hv: np.ndarray) -> np.ndarray:
        sig = np.full(self.num_perm, _M32, dtype=np.uint32)
        hv = fmix32(hv)
        for start in range(0, len(hv), 2048):  # bounded (2048, num_perm) temporaries
            block = hv[start:start + 2048, None] * self.a[None, :] + self.b[None, :]
            np.minimum(sig, block.min(axis=0), out=sig)
        return sig

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_hashes(self.shingle_hashes(text))


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5,
                  fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands b, rows r) with b*r <= num_perm minimising fp_weight*FP + fn_weight*FN, where FP is
    the area under the candidate probability below the threshold, FN the area above it missed."""
    lo = np.linspace(0.0, threshold, 2001)
    hi = np.linspace(threshold, 1.0, 2001)
    best, best_err = (1, 1), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _trapezoid(1 - (1 - lo ** r) ** b, lo)
            fn = _trapezoid((1 - hi ** r) ** b, hi)
            err = fp * fp_weight + fn * fn_weight
            if err < best_err:
                best, best_err = (b, r), err
    return best


def recall_bands(threshold: float, num_perm: int, min_recall: float = 0.99) -> tuple[int, int]:
    """(bands b, rows r) with b*r <= num_perm whose candidate probability at the threshold is at
    least ``min_recall``, and among those the smallest false-positive area (the fewest
    candidates to verify); where none reaches ``min_recall``, the highest probability."""
    lo = np.linspace(0.0, threshold, 2001)
    best, best_key = (1, 1), (True, float("inf"))
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p_t = 1 - (1 - threshold ** r) ** b
            key = (False, _trapezoid(1 - (1 - lo ** r) ** b, lo)) if p_t >= min_recall else (True, -p_t)
            if key < best_key:
                best, best_key = (b, r), key
    return best


class LSHIndex:
    """Band tables over MinHash signatures; ``add_if_new`` is query-then-insert in one step.
    With ``verify`` the bands come from ``recall_bands``, without it from ``optimal_bands``."""

    def __init__(self, num_perm: int, threshold: float, verify: bool = True,
                 weights: tuple[float, float] = (0.5, 0.5), lsh_recall: float = 0.99):
        self.num_perm, self.threshold, self.verify = num_perm, threshold, verify
        self.bands, self.rows = (recall_bands(threshold, num_perm, lsh_recall) if verify
                                 else optimal_bands(threshold, num_perm, *weights))
        self.tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.signatures: list[np.ndarray] = []
        self.keys: list[str] = []

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        r = self.rows
        return [sig[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]

    def candidates(self, sig: np.ndarray) -> set[int]:
        found: set[int] = set()
        for table, key in zip(self.tables, self._band_keys(sig)):
            found.update(table.get(key, ()))
        return found

    def insert(self, key: str, sig: np.ndarray) -> None:
        idx = len(self.signatures)
        self.signatures.append(sig)
        self.keys.append(key)
        for table, band in zip(self.tables, self._band_keys(sig)):
            table.setdefault(band, []).append(idx)

    def find_duplicate(self, sig: np.ndarray) -> str | None:
        """Key of an indexed document similar to ``sig`` (the most similar one), or None."""
        best, best_sim = None, -1.0
        for idx in sorted(self.candidates(sig)):
            sim = estimated_jaccard(sig, self.signatures[idx])
            if self.verify and sim < self.threshold:
                continue
            if sim > best_sim:
                best, best_sim = idx, sim
        return None if best is None else self.keys[best]

    def add_if_new(self, key: str, sig: np.ndarray) -> str | None:
        """Insert ``sig`` unless it duplicates an indexed document; returns that document's key."""
        dup = self.find_duplicate(sig)
        if dup is None:
            self.insert(key, sig)
        return dup

    def save(self, path: str | Path) -> None:
        from lmstack.data.shards import atomic_save_npz

        sigs = np.stack(self.signatures) if self.signatures else np.empty((0, self.num_perm), np.uint32)
        atomic_save_npz(path, signatures=sigs, keys=np.array(self.keys, dtype=object).astype(str))

    def load(self, path: str | Path) -> None:
        with np.load(path) as z:
            sigs, keys = z["signatures"], z["keys"]
        if sigs.shape[1:] != (self.num_perm,):
            raise ConfigError(f"{path}: signatures have {sigs.shape[1:]} permutations, "
                              f"this run uses {self.num_perm}")
        for key, sig in zip(keys.tolist(), sigs):
            self.insert(str(key), sig)


class ExactIndex:
    """Set of normalised-content hashes; remembers the first document that had each."""

    def __init__(self) -> None:
        self.seen: dict[bytes, str] = {}

    def add_if_new(self, key: str, digest: bytes) -> str | None:
        first = self.seen.get(digest)
        if first is None:
            self.seen[digest] = key
        return first

    def save(self, path: str | Path) -> None:
        from lmstack.data.shards import atomic_save_npz

        digests = np.frombuffer(b"".join(self.seen), dtype=np.uint8).reshape(-1, 16)
        atomic_save_npz(path, digests=digests, keys=np.array(list(self.seen.values()), dtype=str))

    def load(self, path: str | Path) -> None:
        with np.load(path) as z:
            for d, k in zip(z["digests"], z["keys"].tolist()):
                self.seen.setdefault(d.tobytes(), str(k))
