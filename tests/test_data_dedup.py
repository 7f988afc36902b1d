"""Exact and near-duplicate detection, parity with datasketch (signatures, band choice, LSH
candidates, Jaccard estimates of the fast hash), recall at the default threshold, and
decontamination."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random

import numpy as np
import pytest

from lmstack.data.decontam import DecontamConfig, EvalNgrams, load_eval_ngrams
from lmstack.data.dedup import (
    DedupConfig, ExactIndex, LSHIndex, MinHasher, content_hash, estimated_jaccard, normalized_words,
    optimal_bands, recall_bands, shingles,
)
from lmstack.data.readers import ReadStats, SourceConfig, read_source
from lmstack.data.synthetic import jaccard, mutate, planted_duplicates, random_text

needs_datasketch = pytest.mark.skipif(importlib.util.find_spec("datasketch") is None,
                                      reason="datasketch not installed (pip install datasketch)")


@needs_datasketch
@pytest.mark.parametrize("num_perm,seed,k", [(128, 1, 5), (64, 7, 3), (256, 42, 1)])
def test_sha1_signatures_equal_datasketch(num_perm, seed, k):
    from datasketch import MinHash

    rng = random.Random(seed)
    mh = MinHasher(num_perm=num_perm, shingle_size=k, seed=seed, hash="sha1")
    for _ in range(5):
        text = random_text(rng, rng.randint(1, 300))
        ref = MinHash(num_perm=num_perm, seed=seed)
        ref.update_batch([s.encode() for s in shingles(normalized_words(text), k)])
        np.testing.assert_array_equal(mh.signature(text), ref.hashvalues)


@needs_datasketch
@pytest.mark.parametrize("threshold,num_perm", [(0.5, 128), (0.7, 64), (0.8, 128), (0.9, 256), (0.85, 128)])
def test_band_choice_equals_datasketch(threshold, num_perm):
    from datasketch.lsh import _optimal_param

    assert optimal_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


@needs_datasketch
@pytest.mark.parametrize("threshold,verify,hash", [(0.8, True, "fast"), (0.8, False, "sha1"),
                                                   (0.5, True, "sha1"), (0.9, False, "fast")])
def test_lsh_candidates_equal_datasketch(threshold, verify, hash):
    """Same signatures and (b, r): every query returns the same candidate set as MinHashLSH."""
    from datasketch import MinHash, MinHashLSH

    ps = planted_duplicates(n_docs=80, n_near=40, n_exact=5, n_partial=20, seed=6)
    mh, lsh = MinHasher(128, 5, seed=1, hash=hash), LSHIndex(128, threshold, verify=verify)
    ref = MinHashLSH(threshold=threshold, num_perm=128, params=(lsh.bands, lsh.rows))
    nonempty = 0
    for d, t in ps.docs:  # query, then insert every document, so the tables fill up
        sig = mh.signature(t)
        m = MinHash(num_perm=128, seed=1, hashvalues=sig, scheme="affine32")
        ours = {lsh.keys[i] for i in lsh.candidates(sig)}
        assert ours == set(ref.query(m)), d
        nonempty += bool(ours)
        lsh.insert(d, sig)
        ref.insert(d, m)
    assert nonempty >= 20  # the comparison covered real candidate sets, not only empty ones


def _pydocs_pairs(n: int = 40) -> list[tuple[str, str]]:
    """Pairs of real prose (the language reference topics of Python's own docs, always installed)
    over a range of similarities: light and heavy word edits of a document, and half of it
    followed by another document."""
    topics = read_source(SourceConfig(name="py", kind="pydocs", max_docs=100), ReadStats())
    docs = [d.text for d in topics if ":topic:" in d.id and 150 <= len(d.text.split()) <= 5000][:n]
    assert len(docs) == n
    rng = random.Random(8)
    pairs = []
    for i, a in enumerate(docs):
        rate = (0.005, 0.01, 0.02, 0.05)[i % 4]
        pairs.append((a, mutate(a, rng, rate)))
        words, other = a.split(" "), docs[(i + 1) % n].split(" ")
        pairs.append((a, " ".join(words[: len(words) // 2] + other[len(other) // 2:])))
    return pairs


@needs_datasketch
def test_fast_hash_estimates_jaccard_like_datasketch_on_real_text():
    """The default ``fast`` hash is a different hash, so its signatures differ from datasketch's:
    its Jaccard estimates must be as close to the exact Jaccard, with no bias."""
    from datasketch import MinHash

    def ds_sig(text: str) -> MinHash:
        m = MinHash(num_perm=128, seed=1)
        m.update_batch([s.encode() for s in shingles(normalized_words(text), 5)])
        return m

    mh = MinHasher(128, 5, seed=1, hash="fast")
    exact, fast, ref = [], [], []
    for a, b in _pydocs_pairs():
        exact.append(jaccard(a, b, 5))
        fast.append(estimated_jaccard(mh.signature(a), mh.signature(b)))
        ref.append(ds_sig(a).jaccard(ds_sig(b)))
    exact, fast, ref = map(np.array, (exact, fast, ref))
    assert exact.min() < 0.4 and exact.max() > 0.9  # the pairs span the range that matters
    sd = np.sqrt(exact * (1 - exact) / 128)  # standard deviation of one estimate
    err_fast, err_ref = np.abs(fast - exact), np.abs(ref - exact)
    # sqrt(2/pi) * sd is the mean error of an unbiased estimate: about 0.03 here, for both hashes.
    assert err_fast.mean() <= err_ref.mean() + 0.01 and err_fast.mean() < 0.04, (err_fast.mean(), err_ref.mean())
    assert abs((fast - exact).mean()) < 0.01  # unbiased
    # The difference of two independent estimates has sd sqrt(2) * sd; none is 5 of those apart.
    assert np.all(np.abs(fast - ref) <= 5 * np.sqrt(2) * sd + 1e-9)


def test_recall_bands():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        for num_perm in (64, 128, 256):
            b, r = recall_bands(threshold, num_perm, 0.99)
            assert b * r <= num_perm
            assert 1 - (1 - threshold ** r) ** b >= 0.99  # LSH itself misses < 1% at the threshold
            assert (1 / b) ** (1 / r) < threshold  # the S-curve's midpoint sits below it
    assert recall_bands(0.8, 128) == (16, 6)
    assert (LSHIndex(128, 0.8).bands, LSHIndex(128, 0.8).rows) == (16, 6)
    assert (LSHIndex(128, 0.8, verify=False).bands, LSHIndex(128, 0.8, verify=False).rows) == (9, 13)
    # Unreachable targets give the highest candidate probability there is.
    assert recall_bands(0.5, 2, 0.99) == (2, 1)


@pytest.mark.parametrize("hash", ["fast", "sha1"])
def test_near_dedup_recall_at_default_threshold(hash):
    """Planted near copies (1% of words edited: true Jaccard 0.75-1, median 0.92) at the default
    threshold: recall >= 0.95 on the copies whose exact Jaccard reaches it, and nothing but
    planted copies reported. The estimate's noise (sd ~0.03) is the limit on both sides: the
    misses are copies just above the threshold, the reports below it copies just under it."""
    threshold = DedupConfig().threshold
    ps = planted_duplicates(n_docs=300, n_near=240, n_exact=10, n_partial=40, seed=9)
    sets = {d: set(shingles(normalized_words(t), 5)) for d, t in ps.docs}

    def jac(a: str, b: str) -> float:
        return len(sets[a] & sets[b]) / len(sets[a] | sets[b])

    true_j = {d: jac(d, src) for d, src in ps.original.items()}
    truth = {d for d, j in true_j.items() if j >= threshold}
    assert len(truth) >= 150 and sum(0.8 <= true_j[d] < 0.85 for d in truth) >= 20
    mh = MinHasher(128, 5, seed=1, hash=hash)
    sigs = {d: mh.signature(t) for d, t in ps.docs}
    lsh = LSHIndex(128, threshold)
    found = {d: k for d, _ in ps.docs if (k := lsh.add_if_new(d, sigs[d])) is not None}
    precision = len(set(found) & set(ps.original)) / len(found)
    recall = len(truth & set(found)) / len(truth)
    assert precision == 1.0 and recall >= 0.95, (precision, recall)
    below = [jac(d, k) for d, k in found.items() if jac(d, k) < threshold]
    assert len(below) <= 3 and min(below, default=threshold) > threshold - 0.05, below
    missed = truth - set(found)
    assert all(true_j[d] < 0.88 for d in missed)  # within ~2 sd (0.03 each) of the threshold
    rows = {key: i for i, key in enumerate(lsh.keys)}
    for d in missed:  # each miss was a candidate, rejected because its estimate fell below 0.8
        assert rows[ps.original[d]] in lsh.candidates(sigs[d])
        assert estimated_jaccard(sigs[d], sigs[ps.original[d]]) < threshold
    # datasketch's banding, (9, 13), misses pairs up to 0.9 and more than three times as many.
    unverified = LSHIndex(128, threshold, verify=False)
    before = {d for d, _ in ps.docs if unverified.add_if_new(d, sigs[d]) is not None}
    assert len(truth - before) >= 3 * max(len(missed), 1)


@pytest.mark.parametrize("hash", ["fast", "sha1"])
def test_minhash_estimates_jaccard(hash):
    rng = random.Random(3)
    mh = MinHasher(num_perm=256, shingle_size=3, seed=1, hash=hash)
    errors = []
    for _ in range(20):
        a = random_text(rng, 300)
        words = a.split(" ")
        cut = rng.randint(50, 250)
        b = " ".join(words[:cut]) + " " + random_text(rng, 300 - cut)
        errors.append(abs(estimated_jaccard(mh.signature(a), mh.signature(b)) - jaccard(a, b, 3)))
    # Standard error of the estimate is sqrt(J(1-J)/256) <= 0.031; the mean error is well below.
    assert np.mean(errors) < 0.035 and max(errors) < 0.12


def test_minhash_invariants():
    mh = MinHasher(num_perm=64, shingle_size=5)
    a = random_text(random.Random(0), 120)
    assert np.array_equal(mh.signature(a), mh.signature(a.upper().replace(" ", "  ")))
    assert np.all(mh.signature("") == np.uint32(0xFFFFFFFF))
    assert len(shingles(["a", "b"], 5)) == 1  # shorter than k: the whole text is one shingle


def test_exact_dedup_on_planted_copies():
    ps = planted_duplicates(n_docs=60, n_near=0, n_exact=15, n_partial=5, seed=1)
    index = ExactIndex()
    removed = {d for d, t in ps.docs if index.add_if_new(d, content_hash(t)) is not None}
    assert removed == ps.exact_duplicates
    assert content_hash("Hello,  World!") == content_hash("hello world")
    assert content_hash("hello world") != content_hash("hello worlds")


@pytest.mark.parametrize("hash", ["fast", "sha1"])
def test_near_dedup_precision_recall_on_planted_set(hash):
    threshold = 0.7
    ps = planted_duplicates(n_docs=150, n_near=40, n_exact=10, n_partial=30, seed=2)
    sets = {d: set(shingles(normalized_words(t), 5)) for d, t in ps.docs}
    originals = [sets[d] for d in sets if d.startswith("doc")]

    def best(d: str) -> float:  # exact Jaccard with the closest original
        return max(len(sets[d] & o) / len(sets[d] | o) for o in originals)

    # Ground truth from exact Jaccard: planted copies above the threshold; partial overlaps are below.
    truth = {d for d in ps.near_duplicates | ps.exact_duplicates if best(d) >= threshold}
    assert len(truth) >= 45
    assert all(best(d) < 0.5 for d in sets if d.startswith("partial"))
    mh, lsh = MinHasher(128, 5, seed=1, hash=hash), LSHIndex(128, threshold)
    found = {d for d, t in ps.docs if lsh.add_if_new(d, mh.signature(t)) is not None}
    tp = len(found & truth)
    precision, recall = tp / len(found), tp / len(truth)
    assert precision >= 0.97 and recall >= 0.9, (precision, recall)


def test_lsh_save_load_continues_across_runs(tmp_path):
    ps = planted_duplicates(n_docs=40, n_near=10, n_exact=0, n_partial=0, seed=4)
    mh = MinHasher(64, 5)
    first, second = ps.docs[:40], ps.docs[40:]
    a = LSHIndex(64, 0.7)
    for d, t in first:
        a.add_if_new(d, mh.signature(t))
    a.save(tmp_path / "lsh.npz")
    b = LSHIndex(64, 0.7)
    b.load(tmp_path / "lsh.npz")
    whole = LSHIndex(64, 0.7)
    for d, t in first:
        whole.add_if_new(d, mh.signature(t))
    for d, t in second:  # the reloaded index decides exactly like one that never stopped
        assert b.add_if_new(d, mh.signature(t)) == whole.add_if_new(d, mh.signature(t))
    e = ExactIndex()
    e.add_if_new("x", content_hash("some text"))
    e.save(tmp_path / "exact.npz")
    f = ExactIndex()
    f.load(tmp_path / "exact.npz")
    assert f.add_if_new("y", content_hash("Some  text!")) == "x"


def _eval_file(tmp_path, items):
    p = tmp_path / "bench.jsonl.gz"
    with gzip.open(p, "wt") as f:
        for i, (q, a) in enumerate(items):
            f.write(json.dumps({"id": f"q{i}", "question": q, "answer": a}) + "\n")
    return p


def test_decontam_catches_planted_benchmark_text(tmp_path):
    rng = random.Random(5)
    items = [(random_text(rng, 40), random_text(rng, 5)) for _ in range(30)] + [("too short", "x")]
    path = _eval_file(tmp_path, items)
    cfg = DecontamConfig(eval_sets=[SourceConfig(name="bench", kind="jsonl", paths=[str(path)],
                                                 fields=["question", "answer"], id_field="id")])
    index = load_eval_ngrams(cfg)
    assert index.items == 31 and index.too_short == 1
    clean = [random_text(rng, 300) for _ in range(20)]
    for doc in clean:
        assert index.match(doc) == (0, [])
    # A planted question inside a training document, with different case and punctuation.
    q = items[7][0]
    doc = clean[0] + "\n\nQUESTION: " + q.upper().replace(".", " ;") + "\n" + clean[1]
    hits, owners = index.match(doc)
    assert owners == ["bench:q7"] and hits == len(normalized_words(q)) - 13 + 1
    # 12 consecutive shared words are not enough for 13-grams.
    twelve = " ".join(normalized_words(q)[:12])
    assert index.match(clean[2] + " " + twelve)[0] == 0


def test_eval_ngrams_min_matches_and_owner_of_each_hit():
    idx = EvalNgrams(n=3)
    idx.add("a", "one two three four")
    idx.add("b", "five six seven")
    idx.freeze()
    assert idx.match("zero one two three four five six seven") == (3, ["a", "b"])
    assert idx.match("one two") == (0, [])
