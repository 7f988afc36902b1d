"""Retrieval over a store: dense, lexical (BM25), hybrid by reciprocal rank fusion, MMR, then an
optional reranker; query rewriting feeds several queries into the same fusion.

One retrieval reads top to bottom (``retrieve``):

1. the query is rewritten into one or more search queries (``rewrite.py``; "none" keeps it);
2. each query gets a dense ranking (its embedding against the vector index) and/or a lexical
   one (full-text), ``candidates`` deep, under the same metadata filter;
3. all rankings are fused by reciprocal rank fusion (Cormack, Clarke and Buettcher 2009,
   "Reciprocal Rank Fusion outperforms Condorcet and individual Rank Learning Methods"):
   ``RRF(d) = sum_r 1 / (k_rrf + rank_r(d))`` with ranks from 1 and ``k_rrf = 60``. With one
   ranking, fusion keeps its order and its own scores;
4. optionally MMR (Carbonell and Goldstein 1998) re-orders the fused candidates for diversity:
   ``argmax_d [lambda * sim(q, d) - (1 - lambda) * max_{s in S} sim(d, s)]`` over the chunk vectors;
5. optionally a reranker (``rerank.py``) re-scores the first ``rerank_depth`` candidates.

Each ``Hit`` carries every step's score in ``hit.scores`` ("dense", "lexical", "rrf", "mmr",
"rerank") so a caller can see why a chunk ranked where it did, and the answer step can judge
how well the question is supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np

from lmstack.errors import ConfigError
from lmstack.rag.types import Filter, Hit, Store, check_filter

Mode = Literal["dense", "lexical", "hybrid"]
MODES = ("dense", "lexical", "hybrid")


@dataclass
class RetrieveConfig:
    """How chunks are found for one question."""

    mode: Mode = field(default="hybrid", metadata={"help": "dense, lexical (BM25) or hybrid (both, fused by RRF)"})
    k: int = field(default=5, metadata={"help": "chunks returned"})
    candidates: int = field(default=30, metadata={"help": "depth of each ranking before fusion"})
    rrf_k: int = field(default=60, metadata={"help": "the constant of reciprocal rank fusion"})
    mmr: bool = field(default=False, metadata={"help": "re-order by maximal marginal relevance"})
    mmr_lambda: float = field(default=0.7, metadata={"help": "MMR trade-off: 1 = relevance only"})
    rerank: str = field(default="none", metadata={"help": "none, llm, or cross-encoder:DIR"})
    rerank_depth: int = field(default=20, metadata={"help": "candidates handed to the reranker"})
    rewrite: str = field(default="none", metadata={"help": "none, multi-query, hyde or step-back"})
    where: Optional[dict] = field(default=None, metadata={"help": "metadata filter (JSON)"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"retrieve.mode: got {self.mode!r}, expected one of {', '.join(MODES)}")
        for name in ("k", "candidates", "rrf_k", "rerank_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"retrieve.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.mmr_lambda <= 1.0:
            raise ConfigError(f"retrieve.mmr_lambda: must be in [0, 1], got {self.mmr_lambda}")
        check_filter(self.where)


def rrf(rankings: Sequence[Sequence[str]], k: int = 60) -> list[tuple[str, float]]:
    """Reciprocal rank fusion of ranked id lists; ties keep first-seen order."""
    score: dict[str, float] = {}
    for ranking in rankings:
        for rank, cid in enumerate(ranking, start=1):
            score[cid] = score.get(cid, 0.0) + 1.0 / (k + rank)
    return sorted(score.items(), key=lambda kv: -kv[1])


def mmr_order(query: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> list[tuple[int, float]]:
    """Indices of ``vectors`` chosen greedily by maximal marginal relevance, with their MMR value."""
    if len(vectors) == 0:
        return []
    rel = vectors @ query  # (N,)
    sim = vectors @ vectors.T  # (N, N)
    chosen: list[tuple[int, float]] = []
    left = list(range(len(vectors)))
    while left and len(chosen) < k:
        if chosen:
            red = sim[np.ix_(left, [c for c, _ in chosen])].max(axis=1)
        else:
            red = np.zeros(len(left))
        val = lam * rel[left] - (1 - lam) * red
        j = int(np.argmax(val))
        chosen.append((left[j], float(val[j])))
        left.pop(j)
    return chosen


def retrieve(store: Store, embedder, query: str, cfg: RetrieveConfig,
             reranker: Optional[Callable[[str, list[Hit], int], list[Hit]]] = None,
             rewriter: Optional[Callable[[str], list[str]]] = None,
             dense_queries: Optional[Sequence[str]] = None) -> list[Hit]:
    """The chunks for ``query``, best first; see the module docstring for the steps.

    ``dense_queries`` (HyDE) replaces the texts embedded for the dense side; the lexical side
    always searches the written queries.
    """
    if not query or not query.strip():
        raise ConfigError("retrieve: the query is empty")
    queries = rewriter(query) if rewriter is not None else [query]
    queries = [q for q in dict.fromkeys(queries) if q and q.strip()] or [query]
    depth = max(cfg.candidates, cfg.k, cfg.rerank_depth if reranker else 0)
    rankings: list[list[str]] = []
    dense: dict[str, float] = {}
    lexical: dict[str, float] = {}
    qvec = None
    if cfg.mode in ("dense", "hybrid"):
        texts = list(dense_queries) if dense_queries else queries
        vecs = embedder.embed(texts)
        qvec = vecs[0]
        for v in vecs:
            found = store.search_dense(v, depth, where=cfg.where)
            rankings.append([cid for cid, _ in found])
            for cid, s in found:
                dense[cid] = max(dense.get(cid, -1.0), s)
    if cfg.mode in ("lexical", "hybrid"):
        for q in queries:
            found = store.search_lexical(q, depth, where=cfg.where)
            rankings.append([cid for cid, _ in found])
            for cid, s in found:
                lexical[cid] = max(lexical.get(cid, 0.0), s)
    fused = rrf(rankings, cfg.rrf_k)[:depth]
    chunks = {c.id: c for c in store.get_chunks([cid for cid, _ in fused])}
    hits = []
    for cid, f in fused:
        if cid not in chunks:
            continue
        scores: dict[str, Any] = {"rrf": f}
        if cid in dense:
            scores["dense"] = dense[cid]
        if cid in lexical:
            scores["lexical"] = lexical[cid]
        main = f if len(rankings) > 1 else (dense.get(cid) if cfg.mode == "dense" else lexical.get(cid, f))
        hits.append(Hit(chunk=chunks[cid], score=float(main), scores=scores))
    if cfg.mmr and hits:
        if qvec is None:
            qvec = embedder.embed([query])[0]
        vecs = store.get_vectors([h.chunk.id for h in hits])
        order = mmr_order(np.asarray(qvec, dtype=np.float32), vecs, len(hits), cfg.mmr_lambda)
        hits = [hits[i] for i, _ in order]
        for h, (_, v) in zip(hits, order):
            h.scores["mmr"] = v
            h.score = v
    if reranker is not None and hits:
        head = reranker(query, hits[:cfg.rerank_depth], cfg.k)
        return head[:cfg.k]
    return hits[:cfg.k]


__all__ = ["RetrieveConfig", "retrieve", "rrf", "mmr_order", "MODES", "Filter"]
