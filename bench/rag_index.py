"""Vector index quality and speed: the embedded store (usearch HNSW) and PostgreSQL + pgvector
(HNSW), against exact search.

For each data set and index: recall@10 of the index's top 10 against the exact top 10 (numpy
brute force over the same float32 vectors, cosine), median and 95th-percentile latency of one
query at a time (one thread for usearch; for the stores, the whole ``search_dense`` call with
its SQL), and the build time (every vector put through the store's ``put_document``, in
documents of 100 chunks, index maintained as it goes, exactly as ingestion does).

Data sets:

- ``synthetic``: N vectors shaped like sentence embeddings. Isotropic Gaussian noise in 384-d
  is the worst case for every graph index (all pairwise distances concentrate near the same
  value, so a greedy walk has nothing to follow; usearch M=16 ef=512 gets recall 0.85 on it),
  and real sentence embeddings are nothing like it: they lie near a low-dimensional manifold
  (the first few dozen principal components carry most of the variance) and form topical
  clusters. So: a 64-d latent drawn from a mixture of 500 Gaussian clusters (cluster spread
  equal to the centre spread), mapped to 384-d by a fixed random linear map, plus isotropic
  noise carrying 20% of the energy, then L2-normalised. The parameters were chosen so that
  the variance spectrum matches the real MiniLM vectors below: 90% of the variance lies in 160
  principal components here and in 159 for MiniLM (a 24-d latent with 10% noise needs only
  24, and every index finds its exact top 10 there, so that would flatter the indexes). The
  script prints both counts. Queries are fresh draws from the same distribution.
- ``minilm``: the real all-MiniLM-L6-v2 embeddings of the offline Wikipedia sample's passages
  (paragraphs packed to about 800 characters), a few thousand; 200 held-out passages are the
  queries. Cached in the temp folder after the first run.

    python bench/rag_index.py                       # 100,000 synthetic + MiniLM, both stores
    python bench/rag_index.py --n 20000 --skip-pg   # quicker
    python bench/rag_index.py --pg-url postgresql://...   # another server instead of a local one

The embedded store runs in the process (usearch, SQLite); PostgreSQL runs as a local server
(``lmstack.rag.pg_server``) on the same machine, so both compete for the same cores: the load
average is printed with the results.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmstack.rag.types import ChunkRecord, DocRecord, chunk_id

DIM = 384
K = 10


# -- data ----------------------------------------------------------------------------------------

def synthetic(n: int, n_queries: int, seed: int = 0, latent: int = 64, clusters: int = 500,
              spread: float = 1.0, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(n, 384) base vectors and (n_queries, 384) queries, L2-normalised; see the docstring."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, latent))
    proj = rng.normal(size=(latent, DIM)) / np.sqrt(latent)

    def draw(m: int) -> np.ndarray:
        z = centres[rng.integers(0, clusters, m)] + spread * rng.normal(size=(m, latent))
        x = z @ proj
        x += noise * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(DIM) * rng.normal(size=(m, DIM))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(n), draw(n_queries)


def minilm(n_queries: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Real MiniLM embeddings of the Wikipedia sample's passages, or None without the assets."""
    from lmstack.data.readers import SourceConfig, read_source, wikipedia_dump_path

    if wikipedia_dump_path() is None:
        print("minilm: the offline Wikipedia sample (gensim) is not installed; skipped")
        return None
    passages: list[str] = []
    for doc in read_source(SourceConfig(name="wiki", kind="wikipedia")):
        buf = ""
        for para in doc.text.split("\n\n"):
            buf = f"{buf}\n\n{para}" if buf else para
            if len(buf) >= 800:
                passages.append(buf[:1200])
                buf = ""
        if len(buf) > 200:
            passages.append(buf)
    key = hashlib.sha256("\x00".join(passages).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"lmstack-bench-minilm-{key}.npy"
    if cache.exists():
        vecs = np.load(cache)
    else:
        import torch

        from lmstack.rag.embed import get_embedder

        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
        t = time.perf_counter()
        vecs = get_embedder("minilm").embed(passages)
        print(f"minilm: embedded {len(passages)} passages in {time.perf_counter() - t:.1f} s; cached in {cache}")
        np.save(cache, vecs)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(vecs))
    return vecs[order[n_queries:]], vecs[order[:n_queries]]


def components_for(x: np.ndarray, share: float = 0.9) -> int:
    """How many principal components hold ``share`` of the variance."""
    sample = x[np.random.default_rng(0).permutation(len(x))[:5000]]
    s = np.linalg.svd(sample - sample.mean(0), compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(s) / s.sum(), share) + 1)


def exact_top(base: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    sims = queries @ base.T
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), axis=1), 1)


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:K]) & set(t.tolist())) / K for f, t in zip(found, truth)]))


# -- indexes -------------------------------------------------------------------------------------

def docs_of(base: np.ndarray, per_doc: int = 100):
    """(DocRecord, chunks, vectors) in documents of ``per_doc`` chunks; chunk text is 'v<i>'."""
    for s in range(0, len(base), per_doc):
        key = f"d{s // per_doc}"
        chunks = [ChunkRecord(chunk_id(key, i, i + 1, f"v{i}"), key, i - s, f"v{i}", i, i + 1,
                              {"doc_key": key, "i": i}) for i in range(s, min(s + per_doc, len(base)))]
        yield DocRecord(key, "bench", key, per_doc), chunks, base[s:s + per_doc]


def timed_queries(search, queries: np.ndarray) -> tuple[list[list[int]], list[float]]:
    found, lat = [], []
    for q in queries:
        t = time.perf_counter()
        res = search(q)
        lat.append((time.perf_counter() - t) * 1000)
        found.append(res)
    return found, lat


def usearch_direct(base, queries, truth, connectivity: int, ef_add: int, efs: list[int]) -> list[dict]:
    from usearch.index import Index

    index = Index(ndim=base.shape[1], metric="ip", dtype="f32", connectivity=connectivity, expansion_add=ef_add)
    t = time.perf_counter()
    index.add(np.arange(len(base)), base, threads=os.cpu_count() or 1)
    build = time.perf_counter() - t
    rows = []
    for ef in efs:
        index.expansion_search = ef
        found, lat = timed_queries(lambda q: index.search(q, K, threads=1).keys.tolist(), queries)
        rows.append(row(f"usearch M={connectivity} ef_add={ef_add} ef_search={ef} (1 thread)", found, truth, lat,
                        build))
    return rows


def embedded_store(base, queries, truth, efs: list[int]) -> list[dict]:
    from lmstack.rag.sqlite_store import SQLiteStore

    folder = Path(tempfile.mkdtemp(prefix="lmstack-bench-store-"))
    try:
        store = SQLiteStore.open(folder / "s")
        t = time.perf_counter()
        for doc, chunks, v in docs_of(base):
            store.put_document(doc, chunks, v)
        store.flush()
        build = time.perf_counter() - t
        ids = {c.id: c.meta["i"] for _, chunks, _ in docs_of(base) for c in chunks}
        rows = []
        for ef in efs:
            store.ef_search = ef
            if store._graph is not None:
                store._graph.expansion_search = ef
            found, lat = timed_queries(lambda q: [ids[i] for i, _ in store.search_dense(q, K)], queries)
            rows.append(row(f"embedded store ({store.index_kind}, ef_search={ef})", found, truth, lat, build))
        store.close()
        return rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def pg_store(url: str, base, queries, truth, efs: list[int], bulk: bool) -> list[dict]:
    """``bulk``: load with the HNSW index dropped and build it after the load (what pgvector
    advises for a first large load), instead of maintaining it row by row."""
    from lmstack.rag import pg_store as pgs

    prefix = "bench_" + hashlib.sha256(os.urandom(8)).hexdigest()[:8]
    store = pgs.PGStore.open(url, table_prefix=prefix)
    how = "bulk load, then index" if bulk else "put_document, index maintained"
    try:
        t = time.perf_counter()
        if bulk:
            store.set_meta("dim", str(base.shape[1]))
            with store._db("bench") as conn:
                conn.execute(f"DROP INDEX {prefix}_chunks_hnsw")
        for doc, chunks, v in docs_of(base):
            store.put_document(doc, chunks, v)
        if bulk:
            with store._db("bench") as conn:
                conn.execute("SET maintenance_work_mem = '1GB'")
                conn.execute(f"CREATE INDEX {prefix}_chunks_hnsw ON {prefix}_chunks USING hnsw "
                             f"(embedding vector_cosine_ops) WITH (m = {pgs.HNSW_M}, "
                             f"ef_construction = {pgs.HNSW_EF_CONSTRUCTION})")
        build = time.perf_counter() - t
        ids = {c.id: c.meta["i"] for _, chunks, _ in docs_of(base) for c in chunks}
        rows = []
        default = pgs.EF_SEARCH
        for ef in efs:
            pgs.EF_SEARCH = ef
            found, lat = timed_queries(lambda q: [ids[i] for i, _ in store.search_dense(q, K)], queries)
            rows.append(row(f"pgvector store (hnsw m=16 ef_construction=64, ef_search={ef}; {how})", found,
                            truth, lat, build))
        pgs.EF_SEARCH = default
        return rows
    finally:
        with store._db("drop") as conn:
            for t in ("chunks", "docs", "meta"):
                conn.execute(f"DROP TABLE IF EXISTS {prefix}_{t}")
        store.close()


def row(name, found, truth, lat, build) -> dict:
    return {"index": name, "recall@10": recall(found, truth), "p50_ms": statistics.median(lat),
            "p95_ms": float(np.percentile(lat, 95)), "build_s": build}


def table(title: str, rows: list[dict]) -> str:
    out = [f"\n**{title}**\n", "| index | recall@10 | p50 ms | p95 ms | build s |", "|---|---|---|---|---|"]
    out += [f"| {r['index']} | {r['recall@10']:.3f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['build_s']:.1f} |"
            for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="synthetic base vectors")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--pg-url", default=None, help="a postgresql:// URL (default: a local server in a temp folder)")
    ap.add_argument("--skip-pg", action="store_true")
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--skip-usearch", action="store_true", help="skip the direct usearch runs")
    ap.add_argument("--pg-bulk", action="store_true", help="build the pgvector index after loading")
    ap.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256], help="usearch expansion_search values")
    ap.add_argument("--pg-ef", type=int, nargs="+", default=[40, 100, 200], help="pgvector hnsw.ef_search values")
    ap.add_argument("--connectivity", type=int, nargs="+", default=[16], help="usearch M values (direct runs)")
    args = ap.parse_args()

    sets = {} if args.skip_synthetic else {"synthetic": synthetic(args.n, args.queries)}
    if not args.skip_minilm:
        real = minilm(args.queries)
        if real is not None:
            sets["minilm"] = real
    pg_folder, url = None, args.pg_url
    if not args.skip_pg and url is None:
        from lmstack.rag.pg_server import start_local

        pg_folder = Path(tempfile.mkdtemp(prefix="lmstack-bench-pg-")) / "data"
        url = start_local(pg_folder)
    out = []
    try:
        for name, (base, queries) in sets.items():
            t = time.perf_counter()
            truth = exact_top(base, queries)
            exact_ms = (time.perf_counter() - t) * 1000 / len(queries)
            print(f"{name}: {len(base)} x {base.shape[1]}, {len(queries)} queries, 90% of the variance in "
                  f"{components_for(base)} principal components; exact numpy search {exact_ms:.2f} ms/query "
                  f"(batched)", flush=True)
            rows = []
            for m in [] if args.skip_usearch else args.connectivity:
                rows += usearch_direct(base, queries, truth, m, 128, args.ef)
                print(table(name, rows[-len(args.ef):]), flush=True)
            if not args.skip_embedded:
                rows += embedded_store(base, queries, truth, args.ef)
                print(table(name, rows[-len(args.ef):]), flush=True)
            if not args.skip_pg:
                rows += pg_store(url, base, queries, truth, args.pg_ef, args.pg_bulk)
                print(table(name, rows[-len(args.pg_ef):]), flush=True)
            out.append(table(f"{name}: {len(base):,} x {base.shape[1]}, {len(queries)} queries", rows))
    finally:
        if pg_folder is not None:
            from lmstack.rag.pg_server import stop

            stop(pg_folder)
            shutil.rmtree(pg_folder.parent, ignore_errors=True)
    print(f"\nload average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on "
          f"{os.cpu_count()} cores")
    print("\n".join(out))


if __name__ == "__main__":
    main()
