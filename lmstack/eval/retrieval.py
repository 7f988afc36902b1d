"""Retrieval metrics for RAG: hit@k, recall@k, MRR and nDCG@k over ranked id lists.

``retrieved[q]`` is the ranked list of document ids returned for query q (best first);
``gold[q]`` is the set of relevant ids, or a mapping id -> graded relevance (nDCG only uses the
grades; the other metrics count any grade > 0 as relevant). Each function returns the mean
over queries in [0, 1]; a ``*_scores`` twin gives the per-query values. Duplicate ids in a
ranking count once, at their first position.

nDCG uses the linear gain: DCG@k = sum_{i=1..k} rel_i / log2(i + 1), divided by the DCG of
the ideal ordering of all gold grades (Järvelin & Kekäläinen 2002).

Context precision / recall, faithfulness and answer relevance need an LLM judge and live
with the judge tasks, not here.
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Optional, Sequence, Union

from lmstack.errors import ConfigError

Gold = Union[Sequence[Hashable], set, Mapping[Hashable, float]]


def _check(retrieved: Sequence[Sequence[Hashable]], gold: Sequence[Gold], k: Optional[int]) -> None:
    if len(retrieved) != len(gold):
        raise ConfigError(f"retrieval metrics: {len(retrieved)} rankings but {len(gold)} gold sets; "
                          "expected one gold set per query")
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ConfigError(f"retrieval metrics: k={k!r}, expected a positive integer")


def _grades(g: Gold) -> dict[Hashable, float]:
    if isinstance(g, Mapping):
        return {d: float(r) for d, r in g.items() if r > 0}
    return {d: 1.0 for d in g}


def _dedup(ranking: Sequence[Hashable]) -> list[Hashable]:
    seen, out = set(), []
    for d in ranking:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def hit_at_k_scores(retrieved, gold, k: int) -> list[float]:
    _check(retrieved, gold, k)
    return [float(any(d in _grades(g) for d in _dedup(r)[:k])) for r, g in zip(retrieved, gold)]


def recall_at_k_scores(retrieved, gold, k: int) -> list[float]:
    """|relevant in top k| / |relevant|; a query with no relevant ids scores 0."""
    _check(retrieved, gold, k)
    out = []
    for r, g in zip(retrieved, gold):
        rel = _grades(g)
        out.append(sum(d in rel for d in _dedup(r)[:k]) / len(rel) if rel else 0.0)
    return out


def reciprocal_rank_scores(retrieved, gold, k: Optional[int] = None) -> list[float]:
    """1 / rank of the first relevant id (within the top k when given), else 0."""
    _check(retrieved, gold, k)
    out = []
    for r, g in zip(retrieved, gold):
        rel = _grades(g)
        ranking = _dedup(r)[:k] if k else _dedup(r)
        out.append(next((1.0 / (i + 1) for i, d in enumerate(ranking) if d in rel), 0.0))
    return out


def ndcg_at_k_scores(retrieved, gold, k: int) -> list[float]:
    _check(retrieved, gold, k)
    out = []
    for r, g in zip(retrieved, gold):
        rel = _grades(g)
        dcg = sum(rel.get(d, 0.0) / math.log2(i + 2) for i, d in enumerate(_dedup(r)[:k]))
        ideal = sum(v / math.log2(i + 2) for i, v in enumerate(sorted(rel.values(), reverse=True)[:k]))
        out.append(dcg / ideal if ideal > 0 else 0.0)
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def hit_at_k(retrieved, gold, k: int) -> float:
    """Fraction of queries with at least one relevant id in the top k."""
    return _mean(hit_at_k_scores(retrieved, gold, k))


def recall_at_k(retrieved, gold, k: int) -> float:
    return _mean(recall_at_k_scores(retrieved, gold, k))


def mrr(retrieved, gold, k: Optional[int] = None) -> float:
    """Mean reciprocal rank (Voorhees 1999)."""
    return _mean(reciprocal_rank_scores(retrieved, gold, k))


def ndcg_at_k(retrieved, gold, k: int) -> float:
    return _mean(ndcg_at_k_scores(retrieved, gold, k))


def retrieval_report(retrieved, gold, ks: Sequence[int] = (1, 3, 5, 10)) -> dict[str, float]:
    """All four metrics at each k, e.g. {"hit@1": ..., "recall@5": ..., "mrr": ..., "ndcg@10": ...}."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"hit@{k}"] = hit_at_k(retrieved, gold, k)
        out[f"recall@{k}"] = recall_at_k(retrieved, gold, k)
        out[f"ndcg@{k}"] = ndcg_at_k(retrieved, gold, k)
    out["mrr"] = mrr(retrieved, gold)
    return out
