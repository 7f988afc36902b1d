"""Retrieval metrics: hand-computed values, scikit-learn's nDCG, and invariants."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.errors import ConfigError
from lmstack.eval import retrieval as R

RETRIEVED = [["d3", "d1", "d7", "d2"], ["d5", "d6", "d8"], ["d2", "d2", "d9", "d4"]]
GOLD = [{"d1", "d2"}, {"d4"}, ["d4"]]


def test_hand_computed_values():
    assert R.hit_at_k_scores(RETRIEVED, GOLD, 1) == [0.0, 0.0, 0.0]
    assert R.hit_at_k_scores(RETRIEVED, GOLD, 2) == [1.0, 0.0, 0.0]
    assert R.recall_at_k_scores(RETRIEVED, GOLD, 4) == [1.0, 0.0, 1.0]
    assert R.recall_at_k_scores(RETRIEVED, GOLD, 2) == [0.5, 0.0, 0.0]
    # Duplicates count once: d4 is at rank 3 of the deduplicated list [d2, d9, d4].
    assert R.reciprocal_rank_scores(RETRIEVED, GOLD) == [0.5, 0.0, 1 / 3]
    assert R.mrr(RETRIEVED, GOLD, k=2) == pytest.approx(0.5 / 3)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3)
    assert R.ndcg_at_k_scores(RETRIEVED, GOLD, 4)[0] == pytest.approx(dcg / idcg)
    rep = R.retrieval_report(RETRIEVED, GOLD, ks=(1, 4))
    assert set(rep) == {"hit@1", "recall@1", "ndcg@1", "hit@4", "recall@4", "ndcg@4", "mrr"}


def test_ndcg_matches_scikit_learn_with_graded_relevance():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    import numpy as np

    docs = [f"d{i}" for i in range(8)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        grades = {d: int(g) for d, g in zip(docs, rng.integers(0, 4, len(docs)))}
        if not any(grades.values()):
            continue
        scores = rng.random(len(docs))
        ranking = [docs[i] for i in np.argsort(-scores)]
        for k in (1, 3, 5, 8):
            want = sklearn_metrics.ndcg_score([[grades[d] for d in docs]], [scores], k=k)
            assert R.ndcg_at_k([ranking], [grades], k) == pytest.approx(want, abs=1e-12)


ids = st.sampled_from([f"d{i}" for i in range(10)])


@settings(max_examples=200, deadline=None)
@given(st.lists(ids, max_size=10), st.sets(ids, min_size=1, max_size=4), st.integers(1, 9))
def test_invariants(ranking, gold, k):
    hit, rec = R.hit_at_k([ranking], [gold], k), R.recall_at_k([ranking], [gold], k)
    ndcg = R.ndcg_at_k([ranking], [gold], k)
    assert 0 <= rec <= hit <= 1 and 0 <= ndcg <= 1
    assert R.recall_at_k([ranking], [gold], k + 1) >= rec
    assert (ndcg > 0) == (hit > 0)
    assert R.mrr([ranking], [gold], k) <= hit
    perfect = sorted(gold) + [d for d in ranking if d not in gold]
    assert R.ndcg_at_k([perfect], [gold], k) == pytest.approx(1.0)


def test_errors():
    with pytest.raises(ConfigError, match="one gold set per query"):
        R.hit_at_k([["a"]], [], 1)
    with pytest.raises(ConfigError, match="positive integer"):
        R.recall_at_k([["a"]], [{"a"}], 0)
