"""Do the embedded store and PostgreSQL + pgvector return the same chunks for the same questions?

    python bench/rag_parity.py --store wiki-store [--url postgresql://...] [--k 10]

Copies every document of an embedded store (chunks and their vectors, no re-embedding) into
PostgreSQL (a local one from pgserver when no ``--url`` is given), then runs the shipped
question set through both with the same embedder: dense retrieval (the two vector indexes),
lexical (SQLite FTS5 BM25 vs Postgres full-text ranking, which rank differently by design) and
hybrid. Prints the mean top-k overlap per mode, nDCG@10 on each store, and the median query
latency of each store's dense search. Target: dense top-10 overlap >= 0.95.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def copy_store(src, dst, prefix_docs: int | None = None) -> int:
    """Every document of ``src`` into ``dst`` with the same chunks and vectors."""
    from lmstack.rag.sqlite_store import SQLiteStore  # noqa: F401  (src is one)

    n = 0
    have = dst.documents()
    for key, h in src.documents().items():
        if have.get(key) == h:
            continue
        chunks = src.doc_chunks(key)
        doc = src.get_document(key)
        dst.put_document(doc, chunks, src.get_vectors([c.id for c in chunks]))
        n += 1
    for k in ("embedder", "embedder_spec", "dim"):
        v = src.get_meta(k)
        if v is not None:
            dst.set_meta(k, v)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="an embedded store holding the Wikipedia sample")
    ap.add_argument("--url", default=None, help="a PostgreSQL URL (default: a local server in a temp folder)")
    ap.add_argument("--k", type=int, default=10)
    a = ap.parse_args(argv)

    from lmstack.rag.datasets.build_questions import load_questions
    from lmstack.rag.evaluate import gold_chunk_ids, overlap_at_k
    from lmstack.eval.retrieval import ndcg_at_k
    from lmstack.rag.pg_store import PGStore
    from lmstack.rag.pipeline import RAG

    url = a.url
    tmp = None
    if url is None:
        from lmstack.rag.pg_server import start_local

        tmp = tempfile.mkdtemp(prefix="rag-parity-pg-")
        url = start_local(tmp)
    emb = RAG.open(a.store, create=False)
    pg = PGStore.open(url, create=True, table_prefix="parity")
    t0 = time.perf_counter()
    copied = copy_store(emb.store, pg)
    print(f"copied {copied} documents into PostgreSQL in {time.perf_counter() - t0:.1f} s "
          f"({pg.stats().get('chunks')} chunks)", flush=True)
    pgr = RAG(pg, emb.embedder)
    qs = [q for q in load_questions() if q.answerable]
    cache: dict = {}
    gold = [gold_chunk_ids(emb.store, q, cache) for q in qs]
    print(f"load average {os.getloadavg()[0]:.1f}; {len(qs)} answerable questions, k={a.k}")
    print("| mode | top-k overlap | nDCG@10 embedded | nDCG@10 pgvector |")
    print("|---|---|---|---|")
    for mode in ("dense", "lexical", "hybrid"):
        r1 = {q.id: [h.chunk.id for h in emb.retrieve(q.question, k=a.k, mode=mode)] for q in qs}
        r2 = {q.id: [h.chunk.id for h in pgr.retrieve(q.question, k=a.k, mode=mode)] for q in qs}
        n1 = ndcg_at_k([r1[q.id] for q in qs], gold, 10)
        n2 = ndcg_at_k([r2[q.id] for q in qs], gold, 10)
        print(f"| {mode} | {overlap_at_k(r1, r2, a.k):.3f} | {n1:.3f} | {n2:.3f} |", flush=True)
    vecs = emb.embedder.embed([q.question for q in qs])
    for name, store in (("embedded", emb.store), ("pgvector", pg)):
        lat = []
        for v in vecs:
            t = time.perf_counter()
            store.search_dense(v, a.k)
            lat.append((time.perf_counter() - t) * 1000)
        print(f"{name} dense search: p50 {statistics.median(lat):.2f} ms, "
              f"p95 {sorted(lat)[int(0.95 * len(lat))]:.2f} ms over {len(lat)} queries")
    pg.close()
    emb.close()
    if tmp is not None:
        from lmstack.rag.pg_server import stop

        stop(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
