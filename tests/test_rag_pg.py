"""PostgreSQL + pgvector store: what only this store has to show (the shared store contract is
in test_rag_store.py). Connection errors name the URL with the password masked; the dimension
is fixed once; metadata filters translated to SQL select exactly what ``types.matches`` selects;
a failed put leaves the old version; concurrent writers neither mix nor lose documents.

The server is a local one from ``pg_server.start_local``, or any server named by
``LMSTACK_TEST_PG_URL``. Without either the tests skip with the reason; under CI=true that
skip is a failure."""

import importlib.util
import os
import random
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest
from conftest import in_ci

from lmstack.errors import ConfigError, LMStackError
from lmstack.rag.types import ChunkRecord, DocRecord, check_filter, chunk_id, matches

needs_psycopg = pytest.mark.skipif(importlib.util.find_spec("psycopg") is None,
                                   reason="psycopg is not installed (pip install 'lmstack[rag]')")


def _skip_or_fail(reason: str):
    if in_ci():
        pytest.fail(f"CI=true: the PostgreSQL tests may not skip: {reason}")
    pytest.skip(reason)


def _pg_folder() -> Path:
    """A fresh data folder outside pytest's temporary root: pytest resets that root to mode 0700
    whenever a session starts, which would lock out the server's own user when tests run as
    root (the server then runs as the ``pgserver`` user)."""
    return Path(tempfile.mkdtemp(prefix="lmstack-pg-")) / "data"


@pytest.fixture(scope="module")
def pg():
    """(url, data folder or None) of a PostgreSQL with pgvector for this module."""
    url = os.environ.get("LMSTACK_TEST_PG_URL")
    if url:
        yield url, None
        return
    if importlib.util.find_spec("pgserver") is None or importlib.util.find_spec("psycopg") is None:
        _skip_or_fail("pgserver and psycopg are not installed (pip install 'lmstack[rag]')")
    from lmstack.rag.pg_server import start_local, stop

    folder = _pg_folder()
    try:
        url = start_local(folder)
    except LMStackError as e:
        shutil.rmtree(folder.parent, ignore_errors=True)
        _skip_or_fail(str(e))
    yield url, folder
    stop(folder)
    shutil.rmtree(folder.parent, ignore_errors=True)


def _open(pg, **kw):
    from lmstack.rag.pg_store import PGStore

    return PGStore.open(pg[0], table_prefix=kw.pop("table_prefix", "t_" + uuid.uuid4().hex[:12]), **kw)


def _doc(key: str, texts: list[str], metas: list[dict] | None = None, h: str = "h1"):
    chunks, pos = [], 0
    for i, t in enumerate(texts):
        meta = {"doc_key": key, **(metas[i] if metas else {})}
        chunks.append(ChunkRecord(chunk_id(key, pos, pos + len(t), t), key, i, t, pos, pos + len(t), meta))
        pos += len(t) + 1
    return DocRecord(key, "src", h, pos, title=key, mtime=1.7e9, meta={"n": len(texts)}), chunks


def _vecs(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# -- errors for people -------------------------------------------------------------------------

def test_mask_url_hides_passwords():
    from lmstack.rag.pg_store import mask_url

    assert mask_url("postgresql://ann:s3cret@db.example:5432/rag") == "postgresql://ann:***@db.example:5432/rag"
    assert "s3cret" not in mask_url("postgresql://ann@db/rag?password=s3cret&sslmode=require")
    assert "sslmode=require" in mask_url("postgresql://ann@db/rag?password=s3cret&sslmode=require")
    assert mask_url("postgresql://ann@db/rag") == "postgresql://ann@db/rag"


@needs_psycopg
@pytest.mark.parametrize("url, says", [
    ("postgresql://ann:s3cret@127.0.0.1:1/rag", "Connection refused"),
    ("postgresql://ann:s3cret@nonexistent.invalid:5432/rag", "nonexistent.invalid"),
])
def test_unreachable_server_names_the_url_without_the_password(url, says):
    from lmstack.rag.pg_store import PGStore

    with pytest.raises(LMStackError) as e:
        PGStore.open(url)
    msg = str(e.value)
    assert "ann:***@" in msg and "s3cret" not in msg and says in msg
    assert "PostgreSQL is running" in msg


@needs_psycopg
def test_server_down_socket_names_the_url(tmp_path):
    from lmstack.rag.pg_store import PGStore

    url = f"postgresql://postgres:pw@/postgres?host={tmp_path}"
    with pytest.raises(LMStackError, match="cannot connect to PostgreSQL at postgresql://postgres:\\*\\*\\*@"):
        PGStore.open(url)


def test_open_refuses_other_urls_and_bad_prefixes():
    from lmstack.rag.pg_store import PGStore

    with pytest.raises(ConfigError, match="postgresql://"):
        PGStore.open("mysql://x@y/z")
    with pytest.raises(ConfigError, match="table_prefix"):
        PGStore.open("postgresql://x@y/z", table_prefix="drop table; --")


def test_wrong_password_message_says_so():
    from lmstack.rag.pg_store import _connect_message

    msg = _connect_message("postgresql://ann:***@h/db", Exception(
        'connection failed: FATAL:  password authentication failed for user "ann"'))
    assert "password was refused" in msg and "postgresql://ann:***@h/db" in msg


@pytest.mark.slow
def test_server_stopped_mid_session():
    """A store whose server goes down gives an LMStackError, not a psycopg traceback; so does
    reopening it."""
    if importlib.util.find_spec("pgserver") is None:
        _skip_or_fail("pgserver is not installed (pip install 'lmstack[rag]')")
    from lmstack.rag.pg_server import start_local, stop

    folder = _pg_folder()
    try:
        url = start_local(folder)
    except LMStackError as e:
        shutil.rmtree(folder.parent, ignore_errors=True)
        _skip_or_fail(str(e))
    store = _open((url, folder))
    doc, chunks = _doc("a", ["alpha beta", "gamma delta"])
    store.put_document(doc, chunks, _vecs(2, 8, 0))
    assert stop(folder)
    with pytest.raises(LMStackError, match="connection was lost"):
        store.search_dense(_vecs(1, 8, 1)[0], 2)
    store.close()
    with pytest.raises(LMStackError, match="PostgreSQL is running"):
        _open((url, folder))
    shutil.rmtree(folder.parent, ignore_errors=True)


def test_missing_pgvector_extension_is_explained(pg):
    """A database without the extension, opened by a role that may not create it."""
    import psycopg

    url, _ = pg
    db, role = "nov_" + uuid.uuid4().hex[:8], "r_" + uuid.uuid4().hex[:8]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT ALL ON DATABASE {db} TO {role}")
    try:
        parts = urlsplit(url)
        other = urlunsplit((parts.scheme, f"{role}@{parts.netloc.rpartition('@')[2]}", f"/{db}", parts.query, ""))
        with pytest.raises(LMStackError, match="no pgvector extension") as e:
            _open((other, None))
        assert "CREATE EXTENSION vector" in str(e.value)
        with pytest.raises(LMStackError, match="no lmstack store"):
            _open((other, None), create=False)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {db}")
            conn.execute(f"DROP ROLE {role}")


# -- the dimension -----------------------------------------------------------------------------

def test_dim_is_fixed_once_and_a_different_dim_is_refused(pg):
    prefix = "dim_" + uuid.uuid4().hex[:8]
    with _open(pg, table_prefix=prefix) as store:
        store.set_meta("dim", "8")
        store.set_meta("dim", "8")
        doc, chunks = _doc("a", ["one", "two"])
        store.put_document(doc, chunks, _vecs(2, 8, 0))
        with pytest.raises(LMStackError, match="dim 8, got dim 16"):
            store.put_document(*_doc("b", ["three"]), _vecs(1, 16, 1))
        with pytest.raises(LMStackError, match="dim 8, got dim 4"):
            store.set_meta("dim", "4")
        with pytest.raises(LMStackError, match="query vector has dim 16"):
            store.search_dense(_vecs(1, 16, 2)[0], 3)
        assert store.documents() == {"a": "h1"} and store.get_meta("dim") == "8"
    with _open(pg, table_prefix=prefix, create=False) as again:  # another connection sees the fixed dim
        with pytest.raises(LMStackError, match="dim 8, got dim 16"):
            again.put_document(*_doc("b", ["three"]), _vecs(1, 16, 1))
        assert again.stats()["dim"] == 8 and again.stats()["chunks"] == 2


def test_first_put_fixes_the_dim(pg):
    with _open(pg) as store:
        store.put_document(*_doc("a", ["x y z"]), _vecs(1, 12, 0))
        assert store.get_meta("dim") == "12"
        with pytest.raises(LMStackError, match="dim 12, got dim 8"):
            store.set_meta("dim", "8")


# -- filters: SQL against types.matches ----------------------------------------------------------

_VALUES = [None, True, False, 0, 1, 2, -1, 1.0, 0.5, 2.5, 1e9, "a", "b", "B", "ab", "é", "", "1", [1, 2], {"x": 1}]


def _random_meta(rng: random.Random) -> dict:
    meta = {}
    for key in ("page", "source", "mtime", "kind", "flag"):
        if rng.random() < 0.8:
            meta[key] = rng.choice(_VALUES)
    return meta


def _random_scalar(rng: random.Random):
    return rng.choice([v for v in _VALUES if v is not None and not isinstance(v, (list, dict))]
                      + [float("inf"), 3])  # NaN is refused by check_filter (it equals nothing)


def _random_item(rng: random.Random):
    return rng.choice([v for v in _VALUES if not isinstance(v, (list, dict))])  # list items: scalars or null


def _random_filter(rng: random.Random) -> dict:
    where = {}
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(["page", "source", "mtime", "kind", "flag", "absent", "doc_key"])
        r = rng.random()
        if r < 0.25:
            where[key] = _random_scalar(rng)
        elif r < 0.4:
            where[key] = [_random_item(rng) for _ in range(rng.randint(0, 3))]
        else:
            ops = rng.sample(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in"], rng.randint(1, 2))
            where[key] = {op: ([_random_item(rng) for _ in range(rng.randint(0, 3))] if op == "$in"
                               else _random_scalar(rng)) for op in ops}
    check_filter(where)
    return where


def test_filters_select_exactly_what_matches_selects(pg):
    """Random metadata (numbers, booleans, strings, nulls, missing keys, lists) and random
    filters: dense and lexical search with the filter return exactly the chunks ``matches``
    accepts."""
    rng = random.Random(0)
    with _open(pg) as store:
        all_chunks = []
        for d in range(12):
            key = f"doc{d}"
            texts = [f"common word chunk {d} {i}" for i in range(10)]
            doc, chunks = _doc(key, texts, [_random_meta(rng) for _ in texts])
            store.put_document(doc, chunks, _vecs(len(chunks), 8, d))
            all_chunks += chunks
        n = len(all_chunks)
        q = _vecs(1, 8, 99)[0]
        nonempty = 0
        for _ in range(300):
            where = _random_filter(rng)
            want = {c.id for c in all_chunks if matches(c.meta, where)}
            dense = {i for i, _ in store.search_dense(q, n, where)}
            lexical = {i for i, _ in store.search_lexical("common", n, where)}
            assert dense == want, where
            assert lexical == want, where
            nonempty += bool(want)
        assert nonempty > 50  # the filters were not all trivially empty


def test_selective_filter_still_returns_every_match(pg):
    """With the HNSW index in use (the planner picks it at this size) and a filter that passes
    3 of 1,000 chunks, all 3 come back, in exact cosine order."""
    with _open(pg) as store:
        vecs = _vecs(1000, 16, 0)
        for d in range(10):
            doc, chunks = _doc(f"d{d}", [f"t {d} {i}" for i in range(100)],
                               [{"page": d * 100 + i} for i in range(100)])
            store.put_document(doc, chunks, vecs[d * 100:(d + 1) * 100])
        q = _vecs(1, 16, 5)[0]
        hits = store.search_dense(q, 10, {"page": [7, 500, 999]})
        assert len(hits) == 3
        want = sorted([7, 500, 999], key=lambda p: -float(vecs[p] @ q))
        assert [c.meta["page"] for c in store.get_chunks([i for i, _ in hits])] == want
        assert np.allclose([s for _, s in hits], [float(vecs[p] @ q) for p in want], atol=1e-5)


# -- storage details ---------------------------------------------------------------------------

def test_vectors_round_trip_bit_exact_and_scores_are_cosine(pg):
    with _open(pg) as store:
        v = _vecs(5, 384, 3) * np.float32(3.0)  # not normalised: cosine must still come out right
        doc, chunks = _doc("a", [f"c{i}" for i in range(5)])
        store.put_document(doc, chunks, v)
        ids = [c.id for c in chunks][::-1]
        assert np.array_equal(store.get_vectors(ids), v[::-1])
        q = _vecs(1, 384, 4)[0]
        hits = dict(store.search_dense(q, 5))
        for c, row in zip(chunks, v):
            assert hits[c.id] == pytest.approx(float(row @ q / np.linalg.norm(row)), abs=1e-5)


def test_lexical_query_text_is_escaped(pg):
    with _open(pg) as store:
        doc, chunks = _doc("a", ["Paris is the capital of France", "Berlin's museums"])
        store.put_document(doc, chunks, _vecs(2, 8, 0))
        for q in ["it's & | ! ( ) :* <-> 'france'", "\\' OR 1=1 --", "   ", "the of"]:
            store.search_lexical(q, 5)
        assert [i for i, _ in store.search_lexical("capital? (France!)", 5)] == [chunks[0].id]
        assert [i for i, _ in store.search_lexical("berlin museum", 5)] == [chunks[1].id]
        assert store.search_lexical("   ", 5) == [] and store.search_lexical("the of", 5) == []


def test_failed_put_keeps_the_old_version(pg):
    with _open(pg) as store:
        doc_a, chunks_a = _doc("a", ["first version"])
        doc_b, chunks_b = _doc("b", ["other"])
        store.put_document(doc_a, chunks_a, _vecs(1, 8, 0))
        store.put_document(doc_b, chunks_b, _vecs(1, 8, 1))
        new_a, new_chunks = _doc("a", ["second version", "clash"], h="h2")
        new_chunks[1].id = chunks_b[0].id  # a primary-key clash inside the COPY, after the delete
        with pytest.raises(LMStackError, match="nothing was written"):
            store.put_document(new_a, new_chunks, _vecs(2, 8, 2))
        assert store.documents() == {"a": "h1", "b": "h1"}
        assert [c.text for c in store.doc_chunks("a")] == ["first version"]
        with pytest.raises(LMStackError, match="NUL"):
            store.put_document(*_doc("c", ["bad\x00text"]), _vecs(1, 8, 3))
        assert store.check() == {"chunks_without_vectors": 0, "vectors_without_chunks": 0,
                                 "duplicate_chunks": 0, "chunks_without_document": 0, "index_mismatch": 0,
                                 "fulltext_mismatch": 0}


def test_table_prefixes_are_separate_stores(pg):
    p1, p2 = "p1_" + uuid.uuid4().hex[:6], "p2_" + uuid.uuid4().hex[:6]
    with _open(pg, table_prefix=p1) as s1, _open(pg, table_prefix=p2) as s2:
        s1.put_document(*_doc("a", ["x"]), _vecs(1, 8, 0))
        s2.put_document(*_doc("b", ["y"]), _vecs(1, 16, 0))
        assert s1.documents() == {"a": "h1"} and s2.documents() == {"b": "h1"}
        assert s1.stats()["dim"] == 8 and s2.stats()["dim"] == 16
    with pytest.raises(LMStackError, match="no lmstack store"):
        _open(pg, table_prefix="never_made", create=False)


# -- concurrency -------------------------------------------------------------------------------

def _run_both(writer) -> None:
    """Run writer(0) and writer(1) at once, each on its own connection; re-raise their errors."""
    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(writer, w) for w in (0, 1)]:
            f.result(timeout=120)


def test_two_writers_on_different_documents(pg):
    """Two connections put 15 documents each into a fresh store at once (racing to fix the
    dimension too): every document is there, whole, and the store checks clean."""
    prefix = "cc_" + uuid.uuid4().hex[:8]
    _open(pg, table_prefix=prefix).close()
    expected = {}

    def writer(w: int):
        with _open(pg, table_prefix=prefix, create=False) as store:
            for d in range(15):
                key = f"w{w}-{d}"
                doc, chunks = _doc(key, [f"writer {w} doc {d} part {i}" for i in range(8)])
                expected[key] = [c.id for c in chunks]
                store.put_document(doc, chunks, _vecs(8, 32, w * 100 + d))

    _run_both(writer)
    with _open(pg, table_prefix=prefix, create=False) as store:
        assert set(store.documents()) == set(expected)
        for key, ids in expected.items():
            assert [c.id for c in store.doc_chunks(key)] == ids
        assert store.stats()["chunks"] == 30 * 8 and store.stats()["dim"] == 32
        assert not any(store.check().values())


def test_two_writers_on_the_same_document_never_mix(pg):
    """Each put replaces the document whole: after racing puts of two versions, the stored
    chunks are exactly one version's."""
    prefix = "same_" + uuid.uuid4().hex[:8]
    _open(pg, table_prefix=prefix).close()
    versions = {w: _doc("k", [f"version {w} part {i}" for i in range(6)], h=f"h{w}") for w in (0, 1)}

    def writer(w: int):
        with _open(pg, table_prefix=prefix, create=False) as store:
            for r in range(10):
                store.put_document(*versions[w], _vecs(6, 8, r))

    _run_both(writer)
    with _open(pg, table_prefix=prefix, create=False) as store:
        h = store.documents()["k"]
        w = int(h[1:])
        assert [c.id for c in store.doc_chunks("k")] == [c.id for c in versions[w][1]]
        assert not any(store.check().values())
