"""The embedded store: a folder on disk, SQLite for everything that must stay in step, and a
usearch HNSW graph as a derived index.

Layout of the folder::

    store.sqlite        documents, chunks (text, span, metadata, the float32 vector as a BLOB),
                        an FTS5 index over chunk text (BM25), store settings
    index.json          which graph file is current and the write generation it reflects
    index-<gen>.usearch the HNSW graph over chunk vectors, keyed by chunk rowid

Design. The SQLite file is the single source of truth. A document's chunks, their vectors and
their full-text entries are written in one transaction (``put_document``), so a crash leaves the
old document or the new one, never chunks without vectors or the reverse; the FTS5 table is an
external-content index kept in step by triggers inside the same transaction. Every write
transaction bumps a ``generation`` counter. The HNSW graph cannot join a SQLite transaction, so
it is treated as a cache: it is updated in memory as documents are written and saved by
``flush()``/``close()`` under the generation it reflects. On open, a graph whose generation is
not the database's (the process died between a commit and a save) is rebuilt from the vectors
in SQLite. Rowids come from AUTOINCREMENT, so a deleted chunk's key is never reused.

Below ``hnsw_min`` chunks (default 10,000) search is exact (one matrix product over the vectors
held in memory): it is both faster than a graph at that size and gives exact results. Above
it, usearch HNSW (M=16, ef_add=128, ef_search=128 by default: recall@10 0.998 of exact
search on 100,000 vectors in ``bench/rag_index.py``, against 0.995 at 64). Filtered dense search takes the chunks passing the filter from
SQLite; up to ``exact_filter_max`` of them are searched exactly, beyond that the graph is asked
for more neighbours until k pass the filter.

Chosen over the alternatives (measured in ``bench/rag_index.py``): usearch is a single small
wheel with no runtime dependencies, saves and restores a graph in one call, removes keys, and
searches 100k x 384 vectors in well under a millisecond; faiss-cpu and hnswlib need a separate
id map and (hnswlib) cannot shrink; LanceDB brings its own storage that would have to be kept
in step with SQLite, which is the problem this layout avoids.

Left out: several writer processes at once (SQLite serialises them; the graph cache assumes one
writer), vector quantisation (int8/binary) of the graph.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.errors import ConfigError, LMStackError
from lmstack.rag.types import ChunkRecord, DocRecord, Filter, Store, check_filter

DB_NAME = "store.sqlite"
INDEX_STAMP = "index.json"
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (
    key TEXT PRIMARY KEY, source TEXT NOT NULL, content_hash TEXT NOT NULL, n_chars INTEGER NOT NULL,
    title TEXT, mtime REAL, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
    doc_key TEXT NOT NULL REFERENCES docs(key) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
    meta TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_key, ordinal);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, content='chunks', content_rowid='rowid', tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.rowid, new.text); END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.rowid, old.text); END;
"""

# Words too common to help a full-text query (they also make FTS5 OR-queries slow).
STOPWORDS = frozenset("""a about above after again against all am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from further had has have
having he her here hers him his how i if in into is it its itself just me more most my no nor not now of off on
once only or other our out over own same she should so some such than that the their them then there these they
this those through to too under until up very was we were what when where which while who whom why will with
would you your""".split())


def fts_query(text: str) -> str | None:
    """An FTS5 query that ORs the query's content words, each quoted (no FTS syntax leaks through)."""
    words = [w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS]
    if not words:
        words = re.findall(r"\w+", text.lower())
    seen = list(dict.fromkeys(words))[:64]
    return " OR ".join(f'"{w}"' for w in seen) if seen else None


def filter_sql(where: Filter | None, column: str = "c.meta") -> tuple[str, list[Any]]:
    """A SQL condition over a JSON metadata column with the meaning of ``types.matches``."""
    check_filter(where)
    if not where:
        return "1", []
    parts, args = [], []
    for key, cond in where.items():
        path = "$." + json.dumps(key)
        value = f"json_extract({column}, ?)"
        kind = f"json_type({column}, ?)"
        conds = cond.items() if isinstance(cond, dict) else [("$in" if isinstance(cond, (list, tuple)) else "$eq", cond)]
        for op, arg in conds:
            if op == "$in":
                vals = [_sql_value(v) for v in arg if v is not None]
                alts = []
                if vals:
                    alts.append(f"{value} IN ({','.join('?' * len(vals))})")
                    args += [path, *vals]
                if any(v is None for v in arg):  # a missing field or a JSON null is None, as in Python
                    alts.append(f"{value} IS NULL")
                    args.append(path)
                parts.append("(" + " OR ".join(alts) + ")" if alts else "0")
            elif op == "$eq":
                parts.append(f"{value} = ?")
                args += [path, _sql_value(arg)]
            elif op == "$ne":
                parts.append(f"({value} IS NULL OR {value} != ?)")
                args += [path, path, _sql_value(arg)]
            else:
                sym = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}[op]
                # A comparison only holds between values of the same type, as in Python.
                types = "('text')" if isinstance(arg, str) else "('integer','real','true','false')"
                parts.append(f"({kind} IN {types} AND {value} {sym} ?)")
                args += [path, path, _sql_value(arg)]
    return " AND ".join(parts), args


def _sql_value(v: Any) -> Any:
    return int(v) if isinstance(v, bool) else v


class SQLiteStore(Store):
    """The embedded store in one folder. ``SQLiteStore.open(folder)``; see the module docstring."""

    def __init__(self, folder: Path, conn: sqlite3.Connection, hnsw_min: int = 10_000,
                 exact_filter_max: int = 50_000, ef_search: int = 128) -> None:
        self.folder = folder
        self.uri = str(folder)
        self.conn = conn
        self.hnsw_min = hnsw_min
        self.exact_filter_max = exact_filter_max
        self.ef_search = ef_search
        self._matrix: np.ndarray | None = None  # (N, dim) vectors for exact search
        self._rowids: np.ndarray | None = None  # (N,) their chunk rowids
        self._graph = None  # usearch Index when loaded
        self._graph_dirty = False
        self._n: int | None = None  # chunk count, kept in step by this process's writes
        self._dim: int | None = None
        self._seen = -1  # the write generation the caches above reflect

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike, create: bool = True, **options) -> SQLiteStore:
        folder = Path(folder)
        db = folder / DB_NAME
        if not db.exists():
            if not create:
                raise LMStackError(f"store {folder}: no {DB_NAME} there (expected a folder made by "
                                   "`lmstack rag ingest --store DIR`)")
            if folder.exists() and not folder.is_dir():
                raise LMStackError(f"store {folder}: exists and is not a folder")
            if folder.is_dir() and any(folder.iterdir()):
                raise LMStackError(f"store {folder}: the folder is not empty and holds no {DB_NAME}; "
                                   "give an empty or new folder")
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / ".write-test"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise LMStackError(f"store {folder}: cannot create or write the folder "
                                   f"({e.strerror or e}); expected a writable path") from e
        elif not os.access(folder, os.W_OK):
            raise LMStackError(f"store {folder}: the folder is not writable; expected a writable path")
        try:
            conn = sqlite3.connect(db, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # safe against a killed process; FULL adds power-loss safety
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(_SCHEMA)
            version = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if version is None:
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('generation', '0')", (SCHEMA_VERSION,))
            elif version[0] != SCHEMA_VERSION:
                raise LMStackError(f"store {folder}: schema version {version[0]}, this lmstack reads "
                                   f"{SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise LMStackError(f"store {folder}: {DB_NAME} cannot be opened ({e}); expected an lmstack "
                               "store") from e
        return cls(folder, conn, **options)

    # -- settings ----------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx():
            self.conn.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                              (key, str(value)))

    @property
    def dim(self) -> int | None:
        if self._dim is None:  # fixed once set, so read once
            d = self.get_meta("dim")
            self._dim = int(d) if d else None
        return self._dim

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    def _tx(self):
        return _Transaction(self.conn)

    # -- documents ---------------------------------------------------------------------------
    def documents(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, content_hash FROM docs"))

    def _check_vectors(self, chunks: Sequence[ChunkRecord], vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(chunks):
            raise ConfigError(f"store: expected ({len(chunks)}, dim) vectors for {len(chunks)} chunks, "
                              f"got shape {tuple(vectors.shape)}")
        dim = self.dim
        if dim is not None and vectors.shape[1] != dim:
            raise ConfigError(f"store {self.uri}: holds {dim}-dim vectors, got {vectors.shape[1]}-dim ones "
                              "(was it built with another embedder?)")
        if not np.isfinite(vectors).all():
            raise ConfigError("store: vectors contain NaN or infinity")
        return np.ascontiguousarray(vectors)

    def put_document(self, doc: DocRecord, chunks: Sequence[ChunkRecord], vectors: np.ndarray) -> None:
        vectors = self._check_vectors(chunks, vectors)
        for c in chunks:
            if c.doc_key != doc.key:
                raise ConfigError(f"store: chunk {c.id} belongs to {c.doc_key!r}, not to {doc.key!r}")
        self._graph_before_write(len(chunks))
        with self._tx():
            if self.dim is None and len(chunks):
                self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('dim', ?)", (str(vectors.shape[1]),))
            old = [r[0] for r in self.conn.execute("SELECT rowid FROM chunks WHERE doc_key=?", (doc.key,))]
            self.conn.execute("DELETE FROM chunks WHERE doc_key=?", (doc.key,))
            self.conn.execute(
                "INSERT INTO docs VALUES (?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET source=excluded.source, "
                "content_hash=excluded.content_hash, n_chars=excluded.n_chars, title=excluded.title, "
                "mtime=excluded.mtime, meta=excluded.meta",
                (doc.key, doc.source, doc.content_hash, doc.n_chars, doc.title, doc.mtime,
                 json.dumps(doc.meta, ensure_ascii=False)))
            new = []
            for c, v in zip(chunks, vectors):
                cur = self.conn.execute(
                    'INSERT INTO chunks (id, doc_key, ordinal, text, start, "end", meta, vector) '
                    "VALUES (?,?,?,?,?,?,?,?)",
                    (c.id, doc.key, c.ordinal, c.text, c.start, c.end, json.dumps(c.meta, ensure_ascii=False),
                     v.tobytes()))
                new.append(cur.lastrowid)
            self._bump()
        self._after_write(old, new, vectors)

    def delete_documents(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        if not keys:
            return 0
        removed, n = [], 0
        self._graph_before_write(0)
        with self._tx():
            for key in keys:
                removed += [r[0] for r in self.conn.execute("SELECT rowid FROM chunks WHERE doc_key=?", (key,))]
                self.conn.execute("DELETE FROM chunks WHERE doc_key=?", (key,))
                n += self.conn.execute("DELETE FROM docs WHERE key=?", (key,)).rowcount
            self._bump()
        self._after_write(removed, [], None)
        return n

    def _bump(self) -> None:
        self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")

    def _graph_before_write(self, adding: int) -> None:
        """Load the saved graph while it still matches the database, so that a write updates it
        instead of forcing a rebuild of the whole graph afterwards."""
        if self._graph is None and self.dim is not None and self._count() + adding >= self.hnsw_min:
            self._load_graph()

    def _after_write(self, removed: list[int], added: list[int], vectors: np.ndarray | None) -> None:
        """Keep the in-memory search structures in step with a committed write."""
        self._matrix = self._rowids = None  # exact search reloads lazily
        self._n = None
        self._seen = self.generation
        if self._graph is not None:
            for r in removed:
                self._graph.remove(r)
            if added:
                self._graph.add(np.asarray(added, dtype=np.uint64), vectors)
            self._graph_dirty = True
        elif self._count() >= self.hnsw_min:
            self._load_graph()

    def _count(self) -> int:
        if self._n is None:
            self._n = self.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return self._n

    # -- the vector index --------------------------------------------------------------------
    def _stamp(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / INDEX_STAMP).read_text())
        except (OSError, ValueError):
            return {}

    def _new_graph(self):
        try:
            from usearch.index import Index
        except ImportError:
            raise LMStackError(f"store {self.uri}: {self._count():,} chunks need the HNSW index, which needs "
                               "usearch: pip install 'lmstack[rag]' (or usearch)") from None

        return Index(ndim=self.dim, metric="ip", dtype="f32", connectivity=16, expansion_add=128,
                     expansion_search=self.ef_search)

    def _load_graph(self) -> None:
        """The HNSW graph for the current generation: restored from disk, else rebuilt."""
        stamp = self._stamp()
        path = self.folder / str(stamp.get("file", ""))
        if stamp.get("generation") == self.generation and stamp.get("file") and path.is_file():
            graph = self._new_graph()
            graph.load(str(path))
            graph.expansion_search = self.ef_search
            self._graph = graph
            return
        n = self._count()
        if n and stamp:
            print(f"rag store: rebuilding the vector index from {n} vectors (it was not saved after the last "
                  "write)", file=sys.stderr)
        elif n >= 50_000:
            print(f"rag store: building the vector index over {n} vectors", file=sys.stderr)
        graph = self._new_graph()
        for rowids, mat in self._vector_batches():
            graph.add(rowids.astype(np.uint64), mat, threads=os.cpu_count() or 1)
        self._graph = graph
        self._graph_dirty = True

    def _vector_batches(self, batch: int = 20_000):
        dim = self.dim
        cur = self.conn.execute("SELECT rowid, vector FROM chunks ORDER BY rowid")
        while rows := cur.fetchmany(batch):
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            yield ids, mat

    def flush(self) -> None:
        """Save the HNSW graph under the current generation (atomic: temp file, then rename)."""
        if self._graph is None or not self._graph_dirty:
            return
        gen = self.generation
        name = f"index-{gen}.usearch"
        tmp = self.folder / (name + ".tmp")
        self._graph.save(str(tmp))
        os.replace(tmp, self.folder / name)
        stamp_tmp = self.folder / (INDEX_STAMP + ".tmp")
        stamp_tmp.write_text(json.dumps({"generation": gen, "file": name, "count": len(self._graph)}))
        os.replace(stamp_tmp, self.folder / INDEX_STAMP)
        for old in self.folder.glob("index-*.usearch*"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self._graph_dirty = False

    def _exact_data(self) -> tuple[np.ndarray, np.ndarray]:
        if self._matrix is None:
            ids, mats = [], []
            for r, m in self._vector_batches():
                ids.append(r)
                mats.append(m)
            dim = self.dim or 0
            self._rowids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
            self._matrix = np.concatenate(mats) if mats else np.zeros((0, dim), dtype=np.float32)
        return self._rowids, self._matrix

    @property
    def index_kind(self) -> str:
        return "hnsw" if self._count() >= self.hnsw_min else "exact"

    # -- retrieval ---------------------------------------------------------------------------
    def _query_vector(self, vector: np.ndarray) -> np.ndarray:
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if self.dim is not None and q.shape[0] != self.dim:
            raise ConfigError(f"store {self.uri}: query vector has {q.shape[0]} dims, the store holds "
                              f"{self.dim}-dim vectors")
        return q

    def _sync(self) -> None:
        """Drop the caches when another process wrote to the store since they were built."""
        gen = self.generation
        if gen != self._seen:
            if self._seen != -1 and self._graph is not None:
                self._graph = None  # reloaded from the saved graph, or rebuilt, at the next search
            self._matrix = self._rowids = None
            self._n = None
            self._seen = gen

    def search_dense(self, vector: np.ndarray, k: int, where: Filter | None = None) -> list[tuple[str, float]]:
        self._sync()
        if self.dim is None or k <= 0:
            return []
        q = self._query_vector(vector)
        if where:
            cond, args = filter_sql(where)
            allowed = np.fromiter((r[0] for r in self.conn.execute(
                f"SELECT c.rowid FROM chunks c WHERE {cond}", args)), dtype=np.int64)
            if len(allowed) == 0:
                return []
            if len(allowed) <= self.exact_filter_max or self.index_kind == "exact":
                return self._exact(q, k, allowed)
            return self._graph_search(q, k, set(allowed.tolist()))
        if self.index_kind == "exact":
            return self._exact(q, k, None)
        return self._graph_search(q, k, None)

    def _exact(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> list[tuple[str, float]]:
        rowids, mat = self._exact_data()
        if allowed is not None:
            sel = np.isin(rowids, allowed)
            rowids, mat = rowids[sel], mat[sel]
        if len(rowids) == 0:
            return []
        # einsum, not `mat @ q`: a BLAS matrix-vector product wakes BLAS worker threads, which
        # on a busy machine costs milliseconds (8 ms against 0.4 ms for 3,700 x 384 at load 5)
        sims = np.einsum("nd,d->n", mat, q)
        k = min(k, len(sims))
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top], kind="stable")]
        return self._ids_for([(int(rowids[i]), float(sims[i])) for i in top])

    def _graph_search(self, q: np.ndarray, k: int, allowed: set[int] | None) -> list[tuple[str, float]]:
        if self._graph is None:
            self._load_graph()
        want = k if allowed is None else k * 8
        while True:
            res = self._graph.search(q, min(want, len(self._graph)), threads=1)
            pairs = [(int(key), 1.0 - float(d)) for key, d in zip(res.keys, res.distances)]
            if allowed is not None:
                pairs = [p for p in pairs if p[0] in allowed]
            if len(pairs) >= k or want >= len(self._graph):
                return self._ids_for(pairs[:k])
            want *= 4

    def _ids_for(self, pairs: list[tuple[int, float]]) -> list[tuple[str, float]]:
        if not pairs:
            return []
        rows = dict(self.conn.execute(f"SELECT rowid, id FROM chunks WHERE rowid IN ({','.join('?' * len(pairs))})",
                                      [p[0] for p in pairs]))
        return [(rows[r], s) for r, s in pairs if r in rows]

    def search_lexical(self, query: str, k: int, where: Filter | None = None) -> list[tuple[str, float]]:
        q = fts_query(query)
        if q is None or k <= 0:
            return []
        cond, args = filter_sql(where)
        rows = self.conn.execute(
            "SELECT c.id, -bm25(chunks_fts) AS s FROM chunks_fts JOIN chunks c ON c.rowid = chunks_fts.rowid "
            f"WHERE chunks_fts MATCH ? AND {cond} ORDER BY bm25(chunks_fts) LIMIT ?", [q, *args, k]).fetchall()
        return [(r[0], float(r[1])) for r in rows]

    def _chunk(self, row) -> ChunkRecord:
        return ChunkRecord(id=row[0], doc_key=row[1], ordinal=row[2], text=row[3], start=row[4], end=row[5],
                           meta=json.loads(row[6]))

    def get_chunks(self, ids: Sequence[str]) -> list[ChunkRecord]:
        out: dict[str, ChunkRecord] = {}
        ids = list(ids)
        for s in range(0, len(ids), 500):
            part = ids[s:s + 500]
            for row in self.conn.execute(
                    'SELECT id, doc_key, ordinal, text, start, "end", meta FROM chunks '
                    f"WHERE id IN ({','.join('?' * len(part))})", part):
                out[row[0]] = self._chunk(row)
        return [out[i] for i in ids if i in out]

    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        ids = list(ids)
        found: dict[str, bytes] = {}
        for s in range(0, len(ids), 500):
            part = ids[s:s + 500]
            found.update(self.conn.execute(f"SELECT id, vector FROM chunks WHERE id IN ({','.join('?' * len(part))})",
                                           part))
        missing = [i for i in ids if i not in found]
        if missing:
            raise LMStackError(f"store {self.uri}: no chunk with id {missing[0]!r}")
        dim = self.dim or 0
        if not ids:
            return np.zeros((0, dim), dtype=np.float32)
        return np.frombuffer(b"".join(found[i] for i in ids), dtype=np.float32).reshape(len(ids), dim).copy()

    def doc_chunks(self, key: str) -> list[ChunkRecord]:
        return [self._chunk(r) for r in self.conn.execute(
            'SELECT id, doc_key, ordinal, text, start, "end", meta FROM chunks WHERE doc_key=? ORDER BY ordinal',
            (key,))]

    def get_document(self, key: str) -> DocRecord | None:
        row = self.conn.execute("SELECT key, source, content_hash, n_chars, title, mtime, meta FROM docs "
                                "WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        return DocRecord(key=row[0], source=row[1], content_hash=row[2], n_chars=row[3], title=row[4],
                         mtime=row[5], meta=json.loads(row[6]))

    # -- upkeep ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        n_docs = self.conn.execute("SELECT count(*) FROM docs").fetchone()[0]
        size = sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())
        return {"store": self.uri, "kind": "sqlite", "documents": n_docs, "chunks": self._count(),
                "dim": self.dim, "embedder": self.get_meta("embedder"), "index": self.index_kind,
                "generation": self.generation, "bytes": size}

    def check(self) -> dict[str, int]:
        dim = self.dim or 0
        one = lambda sql: self.conn.execute(sql).fetchone()[0]  # noqa: E731
        out = {
            "chunks_without_vectors": one(f"SELECT count(*) FROM chunks WHERE vector IS NULL OR length(vector) != {dim * 4}"),
            "vectors_without_chunks": 0,
            "duplicate_chunks": one("SELECT count(*) - count(DISTINCT id) FROM chunks")
            + one("SELECT count(*) FROM (SELECT 1 FROM chunks GROUP BY doc_key, ordinal HAVING count(*) > 1)"),
            "chunks_without_document": one("SELECT count(*) FROM chunks WHERE doc_key NOT IN (SELECT key FROM docs)"),
            "index_mismatch": 0,
            "fulltext_mismatch": 0,
        }
        try:
            self.conn.execute("INSERT INTO chunks_fts(chunks_fts, rank) VALUES ('integrity-check', 1)")
        except sqlite3.DatabaseError:
            out["fulltext_mismatch"] = 1
        if self.index_kind == "hnsw":
            if self._graph is None:
                self._load_graph()
            rowids = {r[0] for r in self.conn.execute("SELECT rowid FROM chunks")}
            keys = set(int(k) for k in self._graph.keys)
            out["vectors_without_chunks"] = len(keys - rowids)
            out["index_mismatch"] = len(keys ^ rowids)
        return out

    def close(self) -> None:
        if self.conn is None:
            return
        self.flush()
        self.conn.close()
        self.conn = None  # type: ignore[assignment]


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception (autocommit connection)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
