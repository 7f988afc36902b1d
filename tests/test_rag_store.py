"""One test suite for both stores: the embedded folder (exact search and, forced, its HNSW
graph) and PostgreSQL + pgvector. Every store must give the same answers to the same calls."""

import importlib.util
import random

import numpy as np
import pytest

from lmstack.errors import ConfigError, LMStackError
from lmstack.rag.types import ChunkRecord, DocRecord, chunk_id, matches

DIM = 16


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory):
    if importlib.util.find_spec("pgserver") is None or importlib.util.find_spec("psycopg") is None:
        pytest.skip("pgserver / psycopg are not installed (pip install -e .[rag])")
    from lmstack.rag.pg_server import start_local, stop

    folder = tmp_path_factory.mktemp("pg")
    yield start_local(folder)
    stop(folder)


_counter = iter(range(10**6))


@pytest.fixture(params=["sqlite", "sqlite-hnsw", pytest.param("pg", marks=pytest.mark.assets)])
def store(request, tmp_path):
    if request.param == "pg":
        from lmstack.rag.pg_store import PGStore

        url = request.getfixturevalue("pg_url")
        s = PGStore.open(url, create=True, table_prefix=f"t{next(_counter)}")
    else:
        from lmstack.rag.sqlite_store import SQLiteStore

        s = SQLiteStore.open(tmp_path / "store", hnsw_min=1 if request.param == "sqlite-hnsw" else 10**9)
    yield s
    s.close()


def _doc(key, texts, rng, source="src", **meta):
    chunks, pos = [], 0
    for i, t in enumerate(texts):
        m = {"source": source, "doc_key": key, "ordinal": i, **meta}
        chunks.append(ChunkRecord(id=chunk_id(key, pos, pos + len(t), t), doc_key=key, ordinal=i, text=t,
                                  start=pos, end=pos + len(t), meta=m))
        pos += len(t) + 1
    vecs = rng.normal(size=(len(texts), DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    doc = DocRecord(key=key, source=source, content_hash=f"h-{key}-{len(texts)}", n_chars=pos, title=key,
                    meta=meta)
    return doc, chunks, vecs


WORDS = "alpha beta gamma delta river mountain castle engine violin harbour lantern quartz".split()


def _fill(store, n_docs=12, seed=0):
    rng = np.random.default_rng(seed)
    r = random.Random(seed)
    all_chunks, all_vecs = [], []
    for d in range(n_docs):
        texts = [" ".join(r.choice(WORDS) for _ in range(8)) + f" doc{d} part{i}" for i in range(r.randint(1, 5))]
        doc, chunks, vecs = _doc(f"doc{d}", texts, rng, source="even" if d % 2 == 0 else "odd", year=2000 + d)
        store.put_document(doc, chunks, vecs)
        all_chunks += chunks
        all_vecs.append(vecs)
    return all_chunks, np.concatenate(all_vecs)


def test_put_get_roundtrip(store):
    chunks, vecs = _fill(store)
    got = store.get_chunks([c.id for c in chunks][::-1])
    assert [c.id for c in got] == [c.id for c in chunks][::-1]
    assert [(c.text, c.start, c.end, c.doc_key, c.ordinal) for c in got[::-1]] == \
        [(c.text, c.start, c.end, c.doc_key, c.ordinal) for c in chunks]
    assert got[-1].meta["source"] == "even"
    np.testing.assert_allclose(store.get_vectors([c.id for c in chunks]), vecs, rtol=1e-6)
    assert [c.id for c in store.doc_chunks("doc3")] == [c.id for c in chunks if c.doc_key == "doc3"]
    assert len(store.documents()) == 12
    assert store.get_chunks(["nope"]) == []


def test_dense_search_matches_exact(store):
    chunks, vecs = _fill(store, n_docs=30, seed=1)
    rng = np.random.default_rng(5)
    for _ in range(10):
        q = rng.normal(size=DIM).astype(np.float32)
        q /= np.linalg.norm(q)
        hits = store.search_dense(q, 5)
        sims = vecs @ q
        exact = [chunks[i].id for i in np.argsort(-sims)[:5]]
        assert [h[0] for h in hits] == exact
        np.testing.assert_allclose([h[1] for h in hits], np.sort(sims)[::-1][:5], atol=1e-5)


def test_filters_match_python_semantics(store):
    chunks, vecs = _fill(store, n_docs=20, seed=2)
    q = vecs[0]
    filters = [{"source": "even"}, {"year": {"$gte": 2010}}, {"year": [2001, 2003, 2019]},
               {"source": {"$ne": "odd"}, "year": {"$lt": 2008}}, {"doc_key": {"$in": ["doc4"]}},
               {"missing": "x"}, {"source": {"$gt": "f"}}]
    for where in filters:
        allowed = [i for i, c in enumerate(chunks) if matches(c.meta, where)]
        hits = store.search_dense(q, 100, where=where)
        assert sorted(h[0] for h in hits) == sorted(chunks[i].id for i in allowed), where
        lex = store.search_lexical("alpha river", 100, where=where)
        assert all(matches(c.meta, where) for c in store.get_chunks([h[0] for h in lex])), where


def test_bad_filter_is_refused(store):
    _fill(store, n_docs=2)
    with pytest.raises(ConfigError, match="unknown operator"):
        store.search_dense(np.ones(DIM, np.float32), 3, where={"year": {"$like": 3}})


def test_lexical_ranks_term_matches(store):
    rng = np.random.default_rng(0)
    for key, texts in {"a": ["the violin concerto in D major", "a castle by the river"],
                       "b": ["quartz crystals grow slowly", "an engine with a violin-shaped body"]}.items():
        store.put_document(*_doc(key, texts, rng))
    hits = store.search_lexical("violin concerto", 10)
    ids = [h[0] for h in hits]
    top = store.get_chunks(ids[:1])[0]
    assert top.text.startswith("the violin concerto")
    assert len(ids) == 2 and all(h[1] > 0 for h in hits)
    assert isinstance(store.search_lexical("the of and", 10), list)  # stop words only: no error
    assert store.search_lexical('violin" OR NEAR(x', 10)  # query syntax never leaks into the engine


def test_replace_and_delete_keep_counts(store):
    rng = np.random.default_rng(0)
    store.put_document(*_doc("x", ["one two", "three four"], rng))
    store.put_document(*_doc("y", ["five six"], rng))
    store.put_document(*_doc("x", ["seven eight nine"], rng))  # replaced: old chunks gone
    assert [c.text for c in store.doc_chunks("x")] == ["seven eight nine"]
    assert store.search_lexical("three", 5) == []
    assert store.delete_documents(["y", "absent"]) == 1
    assert set(store.documents()) == {"x"}
    assert store.stats()["chunks"] == 1
    assert all(v == 0 for v in store.check().values()), store.check()


def test_dimension_is_fixed(store):
    rng = np.random.default_rng(0)
    store.put_document(*_doc("x", ["one"], rng))
    doc, chunks, _ = _doc("z", ["two"], rng)
    with pytest.raises((ConfigError, LMStackError), match="dim"):
        store.put_document(doc, chunks, np.ones((1, DIM + 1), np.float32))
    assert set(store.documents()) == {"x"}  # nothing half-written


def test_failed_put_leaves_old_version(store):
    rng = np.random.default_rng(0)
    store.put_document(*_doc("x", ["old text"], rng))
    doc, chunks, vecs = _doc("x", ["new a", "new b"], rng)
    with pytest.raises((ConfigError, LMStackError)):
        store.put_document(doc, chunks, vecs[:1])  # one vector for two chunks
    assert [c.text for c in store.doc_chunks("x")] == ["old text"]
    assert all(v == 0 for v in store.check().values())


def test_meta_settings(store):
    store.set_meta("embedder", "hash:16")
    store.set_meta("embedder", "hash:32")
    assert store.get_meta("embedder") == "hash:32"
    assert store.get_meta("nothing") is None


# ---- embedded-store specifics -----------------------------------------------------------------

def test_sqlite_reopen_restores_or_rebuilds_graph(tmp_path):
    from lmstack.rag.sqlite_store import SQLiteStore

    s = SQLiteStore.open(tmp_path / "s", hnsw_min=1)
    chunks, vecs = _fill(s, n_docs=10)
    q = vecs[3]
    before = s.search_dense(q, 5)
    s.close()
    s = SQLiteStore.open(tmp_path / "s", hnsw_min=1)
    assert s.search_dense(q, 5) == before  # restored from the saved graph
    assert all(v == 0 for v in s.check().values())
    s.put_document(*_doc("late", ["late words"], np.random.default_rng(9)))
    s.conn.close()  # "killed": the graph was never saved after that write
    s.conn = None
    s = SQLiteStore.open(tmp_path / "s", hnsw_min=1)
    assert s.check()["index_mismatch"] == 0  # rebuilt from SQLite
    assert len(s.search_dense(q, 100)) == len(chunks) + 1
    s.close()


def test_sqlite_refuses_bad_folders(tmp_path):
    from lmstack.rag.sqlite_store import SQLiteStore

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LMStackError, match="not a folder|cannot create"):
        SQLiteStore.open(f)
    with pytest.raises(LMStackError, match="cannot create or write"):
        SQLiteStore.open(f / "sub")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.txt").write_text("x")
    with pytest.raises(LMStackError, match="not empty"):
        SQLiteStore.open(tmp_path / "full")
    with pytest.raises(LMStackError, match="no store.sqlite"):
        SQLiteStore.open(tmp_path / "absent", create=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "store.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(LMStackError, match="cannot be opened"):
        SQLiteStore.open(tmp_path / "junk")


def test_random_filters_agree_with_python(store):
    """Random filters over random metadata: the store's SQL must select exactly what
    ``types.matches`` selects (types mixed on purpose: strings, ints, floats, bools, nulls)."""
    rng = np.random.default_rng(7)
    r = random.Random(7)
    values = ["a", "b", "zeta", 0, 1, 2, 2.5, -1, True, False, None]
    chunks = []
    for d in range(15):
        meta = {f: r.choice(values) for f in ("f1", "f2", "f3") if r.random() < 0.8}
        doc, cs, vecs = _doc(f"r{d}", [f"word{d} alpha", f"word{d} beta"], rng, **meta)
        for c in cs:
            c.meta.update(meta)
        store.put_document(doc, cs, vecs)
        chunks += cs
    q = np.ones(DIM, np.float32) / np.sqrt(DIM)
    ops = ["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in"]
    for _ in range(120):
        where = {}
        for f in r.sample(["f1", "f2", "f3"], r.randint(1, 2)):
            op = r.choice(ops + ["plain", "list"])
            scalars = [v for v in values if v is not None]
            if op == "plain":
                where[f] = r.choice(scalars)
            elif op in ("list", "$in"):
                items = r.sample(values, r.randint(0, 3))
                where[f] = items if op == "list" else {"$in": items}
            else:
                where[f] = {op: r.choice(scalars)}
        want = sorted(c.id for c in chunks if matches(c.meta, where))
        got = sorted(h[0] for h in store.search_dense(q, 1000, where=where))
        assert got == want, where


def test_filter_values_are_checked():
    from lmstack.rag.types import check_filter

    for bad, msg in [({"a": float("nan")}, "takes a string"), ({"a": {"$in": [[1]]}}, "list items"),
                     ({"a": {"$in": 3}}, "takes a list"), ({"$a": 1}, "plain strings"), ({"a": {}}, "empty"),
                     ({"a": {"$gt": None}}, "takes a string")]:
        with pytest.raises(ConfigError, match=msg):
            check_filter(bad)
    check_filter({"a": {"$in": [None, 1, "x"]}, "b": True})
