"""The scale-out store: PostgreSQL with pgvector, behind the same ``Store`` interface as the
embedded one.

Three tables per store, named by a prefix (default ``lmstack``) so several stores share a
database:

- ``<p>_meta(key, value)``: store settings (embedder name, ``dim``, chunker fingerprint);
- ``<p>_docs(key PK, source, content_hash, n_chars, title, mtime, meta jsonb)``;
- ``<p>_chunks(id PK, doc_key FK ON DELETE CASCADE, ordinal, text, start, "end", meta jsonb,
  embedding vector(dim), tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED)``,
  with an HNSW index (``vector_cosine_ops``, m = 16, ef_construction = 64), a GIN index on
  ``tsv`` and a (doc_key, ordinal) index.

Design:

- **One transaction per document.** ``put_document`` upserts the document row (taking its row
  lock, so two writers of the same key queue up), deletes the key's old chunks and COPYs the new
  ones with their vectors. The HNSW and GIN indexes are maintained by PostgreSQL inside that
  transaction, so chunks, vectors and index never drift apart (``check`` reports
  ``index_mismatch`` 0 by construction).
- **The dimension is fixed once,** by the first ``set_meta("dim", ...)`` or the first document
  put: the ``embedding`` column becomes ``vector(dim)`` and the HNSW index is built, under an
  advisory lock so concurrent first writers agree. A different dimension is refused.
- **Dense search** orders by cosine distance ``<=>`` (similarity = 1 - distance) through the
  HNSW index with ``hnsw.ef_search`` set per query: ``EF_SEARCH`` = 40, or 2k for larger k.
  Measured in ``bench/rag_index.py``: recall@10 against exact search 0.992 on 100,000
  embedding-like 384-d vectors and 0.998 on real MiniLM vectors; ef_search 100 gains 0.005 of
  recall for 1.5x the latency. With a metadata
  filter, pgvector's iterative index scan (0.8+) keeps scanning until k rows pass; if fewer than
  k still come back, the query is rerun as an exact scan, so a selective filter never loses
  matches.
- **Lexical search** is PostgreSQL full-text ranking, not BM25: ``ts_rank`` (term frequency)
  of the ``english`` tsvector against an OR of the query's words (each quoted for
  ``to_tsquery``, stop words dropped by the parser). It has no inverse document frequency, so
  a rare word weighs the same as a common one. Measured on the shipped question set
  (``bench/rag_parity.py``): nDCG@10 0.712 with ``ts_rank``, 0.479 with ``ts_rank_cd`` (cover
  density rewards query words close together, which an OR of question words rarely has),
  0.755 for SQLite FTS5's BM25.
- **Metadata filters** are translated to SQL over the chunk ``meta`` jsonb with the exact
  meaning of ``lmstack.rag.types.matches``: a missing key or JSON null is ``None``, booleans
  compare as the numbers 0 and 1 (Python's ``True == 1``), strings compare by code point
  (``COLLATE "C"``), comparing a string with a number is false, ``$ne`` holds for a missing
  key. Nested lists and dicts inside ``$in`` compare as JSON values.
- **Vectors travel in pgvector's binary format** (big-endian float32), both in COPY and in
  queries, with no text formatting of floats.
- Errors for people: a server that is down, refuses the connection or the password, or lacks
  the pgvector extension gives one ``LMStackError`` naming the URL (password masked) and what
  to do. The code uses no SQL specific to the bundled local server (``pg_server``), so any
  ``postgresql://`` URL with pgvector >= 0.5 works.

References: pgvector (https://github.com/pgvector/pgvector), HNSW (Malkov & Yashunin 2018),
PostgreSQL full-text search (https://www.postgresql.org/docs/current/textsearch-controls.html).

Deliberately left out: connection pools and automatic reconnection (a store holds one
connection; open a store per process or thread pool), half-precision or quantised vectors,
dimensions above pgvector's HNSW limit of 2,000, schema migrations, and BM25 proper (IDF).
"""

from __future__ import annotations

import json
import math
import re
import struct
import threading
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from lmstack.errors import ConfigError, LMStackError
from lmstack.rag.types import ChunkRecord, DocRecord, Filter, Store, check_filter

HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
EF_SEARCH = 40           # candidates per query (pgvector's default); raised to 2k for large k
MAX_HNSW_DIM = 2000      # pgvector's limit for an HNSW index on vector
MAX_QUERY_WORDS = 64
INSTALL_HINT = "pip install psycopg[binary]  (or: pip install 'lmstack[rag]')"
_PREFIX_RE = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_WORD_RE = re.compile(r"[^\W_]+")
_SCHEMA_LOCK = "lmstack.rag.pg_store.schema"


def mask_url(url: str) -> str:
    """The URL with its password (in the user part or the query string) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo and userinfo.split(":", 1)[1]:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if "password" in query:
        query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(query, keep_blank_values=True)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _psycopg():
    try:
        import psycopg
    except ImportError as e:
        raise LMStackError(f"a PostgreSQL store needs the psycopg package ({e}); install it with: "
                           f"{INSTALL_HINT}") from None
    return psycopg


# -- metadata filters -> SQL, with the meaning of types.matches --------------------------------

def _num_literal(x: float) -> str | None:
    """A numeric literal for a Python number (bools are 0/1, as in Python); None for NaN,
    which equals and orders against nothing."""
    if isinstance(x, bool):
        return "1" if x else "0"
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "Infinity" if x > 0 else "-Infinity"
        return repr(x)
    return str(x)


class _FilterSQL:
    """Builds one WHERE clause; every piece is a boolean that is never NULL."""

    def __init__(self):
        self.params: list[Any] = []

    def _v(self, key: str) -> str:
        self.params.append(key)
        return "(meta -> %s::text)"

    def _num(self, key: str) -> str:
        v = self._v(key)
        v2 = self._v(key)
        v3 = self._v(key)
        return (f"(CASE jsonb_typeof({v}) WHEN 'number' THEN ({v2} #>> '{{}}')::numeric "
                f"WHEN 'boolean' THEN (CASE WHEN {v3}::boolean THEN 1 ELSE 0 END) END)")

    def eq(self, key: str, arg: Any) -> str:
        if arg is None:
            return f"COALESCE(jsonb_typeof({self._v(key)}), 'null') = 'null'"
        if isinstance(arg, (bool, int, float)):
            lit = _num_literal(arg)
            if lit is None:
                return "FALSE"
            num = self._num(key)
            self.params.append(lit)
            return f"COALESCE({num} = %s::numeric, FALSE)"
        if isinstance(arg, str):
            t, v = self._v(key), self._v(key)
            self.params.append(arg)
            return f"COALESCE(jsonb_typeof({t}) = 'string' AND ({v} #>> '{{}}') = %s, FALSE)"
        if isinstance(arg, (list, dict)):
            v = self._v(key)
            self.params.append(json.dumps(arg))
            return f"COALESCE({v} = %s::jsonb, FALSE)"
        return "FALSE"  # a tuple never equals a value read from JSON

    def one_of(self, key: str, args: Sequence[Any]) -> str:
        if not args:
            return "FALSE"
        return "(" + " OR ".join(self.eq(key, a) for a in args) + ")"

    def compare(self, key: str, op: str, arg: Any) -> str:
        sym = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}[op]
        if isinstance(arg, str):
            t, v = self._v(key), self._v(key)
            self.params.append(arg)
            return (f"COALESCE(jsonb_typeof({t}) = 'string' AND "
                    f"({v} #>> '{{}}') COLLATE \"C\" {sym} (%s COLLATE \"C\"), FALSE)")
        lit = _num_literal(arg)
        if lit is None:
            return "FALSE"
        num = self._num(key)
        self.params.append(lit)
        return f"COALESCE({num} {sym} %s::numeric, FALSE)"

    def cond(self, key: str, cond: Any) -> str:
        if isinstance(cond, dict):
            parts = []
            for op, arg in cond.items():
                if op == "$eq":
                    parts.append(self.eq(key, arg))
                elif op == "$ne":
                    parts.append(f"NOT {self.eq(key, arg)}")
                elif op == "$in":
                    parts.append(self.one_of(key, arg))
                else:
                    parts.append(self.compare(key, op, arg))
            return "(" + " AND ".join(parts) + ")"
        if isinstance(cond, (list, tuple)):
            return self.one_of(key, cond)
        return self.eq(key, cond)


def filter_sql(where: Filter | None) -> tuple[str, list[Any]]:
    """(SQL boolean over the ``meta`` jsonb column, parameters) for a metadata filter."""
    check_filter(where)
    if not where:
        return "TRUE", []
    f = _FilterSQL()
    return " AND ".join(f.cond(k, c) for k, c in where.items()), f.params


def tsquery_text(query: str) -> str | None:
    """The query's words as a ``to_tsquery`` OR query, each word quoted; None if it has none."""
    words = list(dict.fromkeys(w.lower() for w in _WORD_RE.findall(query)))[:MAX_QUERY_WORDS]
    if not words:
        return None
    return " | ".join("'" + w.replace("'", "''").replace("\\", "\\\\") + "'" for w in words)


# -- pgvector's binary wire format: uint16 dim, uint16 unused, float32[dim], big-endian -------

def _vector_adapters(conn) -> None:
    from psycopg.adapt import Dumper, Loader
    from psycopg.pq import Format
    from psycopg.types import TypeInfo

    info = TypeInfo.fetch(conn, "vector")
    info.register(conn)

    class VectorDumper(Dumper):
        format = Format.BINARY
        oid = info.oid

        def dump(self, obj):
            v = np.asarray(obj, dtype=">f4").reshape(-1)
            return struct.pack(">HH", v.shape[0], 0) + v.tobytes()

    class VectorLoader(Loader):
        format = Format.BINARY

        def load(self, data):
            dim = struct.unpack_from(">H", data)[0]
            return np.frombuffer(bytes(data), dtype=">f4", count=dim, offset=4).astype(np.float32)

    conn.adapters.register_dumper(np.ndarray, VectorDumper)
    conn.adapters.register_loader(info.oid, VectorLoader)


class PGStore(Store):
    """A ``Store`` in PostgreSQL + pgvector; open it with ``PGStore.open(url)``."""

    def __init__(self, conn, url: str, prefix: str, pgvector_version: tuple[int, ...]):
        self._conn = conn
        self._url = url
        self.uri = mask_url(url)
        self.prefix = prefix
        self._iterative = pgvector_version >= (0, 8)
        self._lock = threading.RLock()
        self._dim: int | None = None
        self._t = {n: f"{prefix}_{n}" for n in ("meta", "docs", "chunks")}

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str, create: bool = True, table_prefix: str = "lmstack") -> PGStore:
        """Connect to ``url`` (``postgresql://user:password@host:port/db``) and, with ``create``,
        make the tables (and the vector extension) if they are missing."""
        if not isinstance(url, str) or not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"PostgreSQL store: expected a postgresql:// URL, got {url!r}")
        if not isinstance(table_prefix, str) or not _PREFIX_RE.fullmatch(table_prefix):
            raise ConfigError(f"PostgreSQL store: table_prefix {table_prefix!r} must be lower-case letters, "
                              "digits and _ (at most 40, not starting with a digit)")
        psycopg = _psycopg()
        masked = mask_url(url)
        kwargs: dict[str, Any] = {"autocommit": True, "application_name": "lmstack"}
        if "connect_timeout" not in url:
            kwargs["connect_timeout"] = 10
        try:
            conn = psycopg.connect(url, **kwargs)
        except psycopg.Error as e:
            raise LMStackError(_connect_message(masked, e)) from None
        try:
            version = _ensure_schema(conn, table_prefix, create, masked)
            _vector_adapters(conn)
            store = cls(conn, url, table_prefix, version)
            store._dim = store._read_dim()
        except BaseException:
            conn.close()
            raise
        return store

    @contextmanager
    def _db(self, what: str):
        """Serialise use of the one connection and turn a lost server into an ``LMStackError``."""
        psycopg = _psycopg()
        with self._lock:
            if self._conn.closed:
                raise LMStackError(f"PostgreSQL store {self.uri}: {what} after close()")
            try:
                yield self._conn
            except psycopg.OperationalError as e:
                raise LMStackError(f"PostgreSQL store {self.uri}: {what} failed, the connection was lost "
                                   f"({_first_line(e)}); check that the server is running and reopen "
                                   "the store") from None

    def _q(self, text: str) -> str:
        for name, table in self._t.items():
            text = text.replace("{" + name + "}", table)
        return text

    # -- settings -------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        with self._db("reading the dimension"):
            self._dim = self._read_dim()
        return self._dim

    def _read_dim(self) -> int | None:
        row = self._conn.execute(self._q("SELECT value FROM {meta} WHERE key = 'dim'")).fetchone()
        return int(row[0]) if row else None

    def _dim_now(self) -> int | None:
        if self._dim is None:
            with self._db("reading the dimension"):
                self._dim = self._read_dim()
        return self._dim

    def _fix_dim(self, conn, dim: int) -> None:
        """Inside a transaction: make ``dim`` the store's dimension, or refuse a different one."""
        if self._dim == dim:
            return
        if self._dim is not None:
            raise LMStackError(_dim_message(self.uri, self._dim, dim))
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{self.prefix}.dim",))
        stored = self._read_dim()
        if stored is None:
            if not 1 <= dim <= MAX_HNSW_DIM:
                raise LMStackError(f"PostgreSQL store {self.uri}: vectors of dim {dim} cannot be indexed; "
                                   f"pgvector's HNSW index takes 1 to {MAX_HNSW_DIM} dimensions")
            conn.execute(self._q(f"ALTER TABLE {{chunks}} ALTER COLUMN embedding TYPE vector({dim})"))
            conn.execute(self._q(
                "CREATE INDEX IF NOT EXISTS {chunks}_hnsw ON {chunks} USING hnsw (embedding vector_cosine_ops) "
                f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"))
            conn.execute(self._q("INSERT INTO {meta} (key, value) VALUES ('dim', %s)"), (str(dim),))
        elif stored != dim:
            raise LMStackError(_dim_message(self.uri, stored, dim))
        self._dim = dim

    def get_meta(self, key: str) -> str | None:
        with self._db("get_meta") as conn:
            row = conn.execute(self._q("SELECT value FROM {meta} WHERE key = %s"), (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        if not isinstance(value, str):
            raise ConfigError(f"store setting {key!r}: expected a string value, got {type(value).__name__}")
        with self._db("set_meta") as conn:
            if key == "dim":
                try:
                    dim = int(value)
                except ValueError:
                    raise ConfigError(f"store setting 'dim': expected an integer, got {value!r}") from None
                self._dim = self._read_dim()
                with conn.transaction():
                    try:
                        self._fix_dim(conn, dim)
                    except LMStackError:
                        self._dim = self._read_dim()
                        raise
                return
            conn.execute(self._q("INSERT INTO {meta} (key, value) VALUES (%s, %s) "
                                 "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"), (key, value))

    # -- documents ------------------------------------------------------------------------
    def documents(self) -> dict[str, str]:
        with self._db("listing documents") as conn:
            return dict(conn.execute(self._q("SELECT key, content_hash FROM {docs}")).fetchall())

    def put_document(self, doc: DocRecord, chunks: Sequence[ChunkRecord], vectors: np.ndarray) -> None:
        psycopg = _psycopg()
        from psycopg.types.json import Jsonb

        vectors = _check_put(doc, chunks, vectors, self.uri)
        with self._db(f"storing document {doc.key!r}") as conn:
            try:
                with conn.transaction():
                    if len(chunks):
                        self._fix_dim(conn, vectors.shape[1])
                    conn.execute(self._q(
                        "INSERT INTO {docs} (key, source, content_hash, n_chars, title, mtime, meta) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (key) DO UPDATE SET "
                        "source = EXCLUDED.source, content_hash = EXCLUDED.content_hash, "
                        "n_chars = EXCLUDED.n_chars, title = EXCLUDED.title, mtime = EXCLUDED.mtime, "
                        "meta = EXCLUDED.meta"),
                        (doc.key, doc.source, doc.content_hash, doc.n_chars, doc.title, doc.mtime,
                         Jsonb(doc.meta)))
                    conn.execute(self._q("DELETE FROM {chunks} WHERE doc_key = %s"), (doc.key,))
                    if len(chunks):
                        with conn.cursor() as cur, cur.copy(self._q(
                                'COPY {chunks} (id, doc_key, ordinal, text, start, "end", meta, embedding) '
                                "FROM STDIN (FORMAT BINARY)")) as copy:
                            copy.set_types(["text", "text", "int4", "text", "int4", "int4", "jsonb", "vector"])
                            for c, v in zip(chunks, vectors):
                                copy.write_row((c.id, c.doc_key, c.ordinal, c.text, c.start, c.end, c.meta, v))
            except LMStackError:
                self._dim = None  # a refused first put rolled the dimension back
                raise
            except (psycopg.DataError, psycopg.IntegrityError, UnicodeEncodeError, ValueError, TypeError) as e:
                self._dim = None
                raise LMStackError(f"document {doc.key!r} cannot be stored in PostgreSQL ({_first_line(e)}); "
                                   "nothing was written") from None

    def delete_documents(self, keys: Iterable[str]) -> int:
        keys = list(dict.fromkeys(keys))
        if not keys:
            return 0
        with self._db("deleting documents") as conn:
            cur = conn.execute(self._q("DELETE FROM {docs} WHERE key = ANY(%s)"), (keys,))
            return cur.rowcount

    # -- retrieval ------------------------------------------------------------------------
    def search_dense(self, vector: np.ndarray, k: int, where: Filter | None = None) -> list[tuple[str, float]]:
        cond, params = filter_sql(where)
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        dim = self._dim_now()
        if k <= 0 or dim is None:
            return []
        if q.shape[0] != dim:
            raise ConfigError(f"PostgreSQL store {self.uri}: the query vector has dim {q.shape[0]}, "
                               f"the store holds dim {dim}")
        sql = self._q(f"SELECT id, 1 - (embedding <=> %b) FROM {{chunks}} WHERE {cond} "
                      "ORDER BY embedding <=> %b LIMIT %s")
        args = (q, *params, q, k)
        with self._db("dense search") as conn, conn.transaction():
            conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(min(max(EF_SEARCH, 2 * k), 1000)),))  # pgvector's limit
            if where and self._iterative:
                conn.execute("SELECT set_config('hnsw.iterative_scan', 'strict_order', true)")
            rows = conn.execute(sql, args).fetchall()
            if len(rows) < k:  # a selective filter or a tiny table: rerun exactly
                conn.execute("SELECT set_config('enable_indexscan', 'off', true)")
                rows = conn.execute(sql, args).fetchall()
        return sorted(((i, float(s)) for i, s in rows), key=lambda r: (-r[1], r[0]))

    def search_lexical(self, query: str, k: int, where: Filter | None = None) -> list[tuple[str, float]]:
        cond, params = filter_sql(where)
        tsq = tsquery_text(query)
        if k <= 0 or tsq is None:
            return []
        sql = self._q("SELECT id, ts_rank(tsv, q) AS s FROM {chunks}, to_tsquery('english', %s) q "
                      f"WHERE tsv @@ q AND {cond} ORDER BY s DESC, id LIMIT %s")
        with self._db("lexical search") as conn:
            rows = conn.execute(sql, (tsq, *params, k)).fetchall()
        return [(i, float(s)) for i, s in rows]

    def get_chunks(self, ids: Sequence[str]) -> list[ChunkRecord]:
        ids = list(ids)
        if not ids:
            return []
        with self._db("reading chunks") as conn:
            rows = conn.execute(self._q('SELECT id, doc_key, ordinal, text, start, "end", meta FROM {chunks} '
                                        "WHERE id = ANY(%s)"), (list(set(ids)),)).fetchall()
        by_id = {r[0]: ChunkRecord(*r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        ids = list(ids)
        dim = self._dim_now()
        if not ids:
            return np.zeros((0, dim or 0), dtype=np.float32)
        with self._db("reading vectors") as conn, conn.cursor(binary=True) as cur:
            rows = cur.execute(self._q("SELECT id, embedding FROM {chunks} WHERE id = ANY(%s)"),
                               (list(set(ids)),)).fetchall()
        by_id = dict(rows)
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise LMStackError(f"PostgreSQL store {self.uri}: no chunk with id {missing[0]!r}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return np.stack([by_id[i] for i in ids]).astype(np.float32, copy=False)

    def get_document(self, key: str) -> DocRecord | None:
        with self._db("reading a document") as conn:
            row = conn.execute(self._q("SELECT key, source, content_hash, n_chars, title, mtime, meta FROM {docs} "
                                       "WHERE key = %s"), (key,)).fetchone()
        return DocRecord(*row) if row else None

    def doc_chunks(self, key: str) -> list[ChunkRecord]:
        with self._db("reading a document's chunks") as conn:
            rows = conn.execute(self._q('SELECT id, doc_key, ordinal, text, start, "end", meta FROM {chunks} '
                                        "WHERE doc_key = %s ORDER BY ordinal"), (key,)).fetchall()
        return [ChunkRecord(*r) for r in rows]

    # -- upkeep ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._db("stats") as conn:
            n_docs = conn.execute(self._q("SELECT count(*) FROM {docs}")).fetchone()[0]
            n_chunks, n_vec = conn.execute(self._q("SELECT count(*), count(embedding) FROM {chunks}")).fetchone()
            size = conn.execute("SELECT sum(pg_total_relation_size(t::regclass)) FROM unnest(%s::text[]) t",
                                (list(self._t.values()),)).fetchone()[0]
            meta = dict(conn.execute(self._q("SELECT key, value FROM {meta}")).fetchall())
        return {"store": self.uri, "kind": "pgvector", "table_prefix": self.prefix, "documents": n_docs,
                "chunks": n_chunks, "vectors": n_vec, "dim": int(meta["dim"]) if "dim" in meta else None,
                "embedder": meta.get("embedder"), "index": "hnsw",
                "index_params": f"cosine, m={HNSW_M}, ef_construction={HNSW_EF_CONSTRUCTION}, ef_search={EF_SEARCH}",
                "lexical": "postgres full-text (ts_rank, english)", "bytes": int(size or 0)}

    def check(self) -> dict[str, int]:
        """Consistency counts. Vectors live in the chunk rows and the indexes (HNSW, and GIN over
        a generated tsvector) are transactional, so ``vectors_without_chunks``,
        ``index_mismatch`` and ``fulltext_mismatch`` are 0 by construction; the others are
        counted, as a check on the constraints."""
        with self._db("check") as conn:
            no_vec = conn.execute(self._q("SELECT count(*) FROM {chunks} WHERE embedding IS NULL")).fetchone()[0]
            dup = conn.execute(self._q("SELECT count(*) FROM (SELECT 1 FROM {chunks} GROUP BY doc_key, ordinal "
                                       "HAVING count(*) > 1) d")).fetchone()[0]
            orphan = conn.execute(self._q("SELECT count(*) FROM {chunks} c LEFT JOIN {docs} d ON d.key = c.doc_key "
                                          "WHERE d.key IS NULL")).fetchone()[0]
        return {"chunks_without_vectors": int(no_vec), "vectors_without_chunks": 0, "duplicate_chunks": int(dup),
                "chunks_without_document": int(orphan), "index_mismatch": 0, "fulltext_mismatch": 0}

    def close(self) -> None:
        with self._lock:
            if not self._conn.closed:
                self._conn.close()


# -- helpers ---------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _connect_message(masked: str, e: BaseException) -> str:
    text = " ".join(str(e).split())
    if "password authentication failed" in text or "no password supplied" in text:
        hint = "the user name or password was refused; fix them in the URL"
    elif "does not exist" in text and "database" in text:
        hint = "the database does not exist; create it (createdb) or name another in the URL"
    else:
        hint = ("check that PostgreSQL is running and that the host, port and socket in the URL are right "
                "(for a local server without set-up: lmstack.rag.pg_server.start_local)")
    return f"cannot connect to PostgreSQL at {masked}: {text}; {hint}"


def _dim_message(uri: str, stored: int, dim: int) -> str:
    return (f"PostgreSQL store {uri} holds vectors of dim {stored}, got dim {dim}; embed with the "
            "store's embedder, or use another store (or table prefix) for this one")


def _ensure_schema(conn, prefix: str, create: bool, masked: str) -> tuple[int, ...]:
    """Check (and with ``create`` make) the vector extension and the tables; returns the
    pgvector version."""
    psycopg = _psycopg()
    t = {n: f"{prefix}_{n}" for n in ("meta", "docs", "chunks")}

    def version():
        row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        return tuple(int(x) for x in re.findall(r"\d+", row[0])[:3]) if row else None

    def tables_exist():
        return conn.execute("SELECT count(*) FROM unnest(%s::text[]) t WHERE to_regclass(t) IS NOT NULL",
                            (list(t.values()),)).fetchone()[0] == 3

    ver = version()
    if ver is not None and tables_exist():
        return _check_version(ver, masked)
    if not create:
        raise LMStackError(f"PostgreSQL at {masked} has no lmstack store with table prefix {prefix!r}"
                           + ("" if ver else " (and no pgvector extension)")
                           + "; open it with create=True, or check the URL and the table prefix")
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (_SCHEMA_LOCK,))
            if version() is None:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.Error as e:
        raise LMStackError(f"PostgreSQL at {masked} has no pgvector extension and it could not be created "
                           f"({_first_line(e)}); install pgvector on the server "
                           "(https://github.com/pgvector/pgvector) and run CREATE EXTENSION vector as a "
                           "superuser, or use a local server (lmstack.rag.pg_server.start_local)") from None
    ver = _check_version(version(), masked)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (_SCHEMA_LOCK,))
        for stmt in (
            "CREATE TABLE IF NOT EXISTS {meta} (key text PRIMARY KEY, value text NOT NULL)",
            ("CREATE TABLE IF NOT EXISTS {docs} (key text PRIMARY KEY, source text NOT NULL, "
             "content_hash text NOT NULL, n_chars bigint NOT NULL, title text, mtime double precision, "
             "meta jsonb NOT NULL DEFAULT '{{}}')"),
            ("CREATE TABLE IF NOT EXISTS {chunks} (id text PRIMARY KEY, "
             "doc_key text NOT NULL REFERENCES {docs} (key) ON DELETE CASCADE, ordinal integer NOT NULL, "
             'text text NOT NULL, start integer NOT NULL, "end" integer NOT NULL, '
             "meta jsonb NOT NULL DEFAULT '{{}}', embedding vector NOT NULL, "
             "tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED)"),
            "CREATE INDEX IF NOT EXISTS {chunks}_doc ON {chunks} (doc_key, ordinal)",
            "CREATE INDEX IF NOT EXISTS {chunks}_tsv ON {chunks} USING gin (tsv)",
        ):
            conn.execute(stmt.format(**t))
    return ver


def _check_version(ver: tuple[int, ...], masked: str) -> tuple[int, ...]:
    if ver < (0, 5):
        raise LMStackError(f"PostgreSQL at {masked} has pgvector {'.'.join(map(str, ver))}; the store needs "
                           "0.5 or later for HNSW indexes (ALTER EXTENSION vector UPDATE)")
    return ver


def _check_put(doc: DocRecord, chunks: Sequence[ChunkRecord], vectors: np.ndarray, uri: str) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if len(chunks) == 0:
        return vectors.reshape(0, vectors.shape[-1] if vectors.ndim == 2 else 0)
    if vectors.ndim != 2 or vectors.shape[0] != len(chunks):
        raise LMStackError(f"document {doc.key!r}: expected ({len(chunks)}, dim) vectors for "
                           f"{len(chunks)} chunks, got shape {tuple(vectors.shape)}")
    if not np.isfinite(vectors).all():
        raise LMStackError(f"document {doc.key!r}: vectors contain NaN or infinity; nothing was written")
    ids = set()
    for c in chunks:
        if c.doc_key != doc.key:
            raise LMStackError(f"document {doc.key!r}: chunk {c.id!r} belongs to {c.doc_key!r}")
        if c.id in ids:
            raise LMStackError(f"document {doc.key!r}: chunk id {c.id!r} appears twice")
        ids.add(c.id)
        if "\x00" in c.text:
            raise LMStackError(f"document {doc.key!r}: chunk {c.ordinal} contains a NUL character, "
                               "which PostgreSQL text cannot hold; nothing was written")
    return vectors
