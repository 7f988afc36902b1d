"""Exact and near-duplicate detection, parity with datasketch, and decontamination."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random

import numpy as np
import pytest

from lmstack.data.decontam import DecontamConfig, EvalNgrams, load_eval_ngrams
from lmstack.data.dedup import (
    ExactIndex, LSHIndex, MinHasher, content_hash, estimated_jaccard, normalized_words,
    optimal_bands, shingles,
)
from lmstack.data.readers import SourceConfig
from lmstack.data.synthetic import jaccard, planted_duplicates, random_text

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
