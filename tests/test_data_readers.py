"""Document readers: every file kind, paths/globs, bad input skipped and counted, offline corpora."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest

from lmstack.data.readers import (
    ReadStats, SourceConfig, austen_data_dir, fortunes_dir, read_source, strip_wikitext,
    wikipedia_dump_path,
)
from lmstack.errors import ConfigError


def _read(**kw) -> tuple[list, ReadStats]:
    stats = ReadStats()
    return list(read_source(SourceConfig(name="s", **kw), stats)), stats


def test_text_files_directories_and_globs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first document")
    (tmp_path / "a" / "two.txt").write_text("second document")
    (tmp_path / "a" / "skip.md").write_text("not a text file")
    with gzip.open(tmp_path / "three.txt.gz", "wt") as f:
        f.write("third document")
    docs, stats = _read(kind="text", paths=[str(tmp_path / "a"), str(tmp_path / "*.gz")])
    assert [d.text for d in docs] == ["first document", "second document", "third document"]
    assert all(d.source == "s" and d.id.startswith("s:") for d in docs)
    assert len({d.id for d in docs}) == 3 and stats.files == 3 and stats.docs == 3
    # The same file named twice is read once.
    docs, _ = _read(kind="text", paths=[str(tmp_path / "a" / "one.txt")] * 2)
    assert len(docs) == 1


def test_missing_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        _read(kind="text", paths=[str(tmp_path / "nope.txt")])
    with pytest.raises(ConfigError, match="matches no files"):
        _read(kind="text", paths=[str(tmp_path / "*.none")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no text files"):
        _read(kind="text", paths=[str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="needs at least one"):
        SourceConfig(name="x", kind="jsonl")
    with pytest.raises(ConfigError, match="name"):
        SourceConfig(name="bad name", kind="pydocs")


def test_unreadable_files_and_records_are_skipped_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf-8 \xc3")
    docs, stats = _read(kind="text", paths=[str(tmp_path)])
    assert [d.text for d in docs] == ["fine"]
    assert len(stats.errors) == 1 and "bad.txt" in stats.errors[0]["where"]
    assert "UnicodeDecodeError" in stats.errors[0]["error"]
    lines = [json.dumps({"text": "a", "n": 1}), "{broken", json.dumps({"other": 1}), json.dumps([1]),
             "", json.dumps({"text": "b", "id": "x7"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    docs, stats = _read(kind="jsonl", paths=[str(tmp_path / "d.jsonl")], id_field="id")
    assert [d.text for d in docs] == ["a", "b"]
    assert docs[0].meta["n"] == 1 and docs[1].id == "s:x7"
    assert [e["where"].rsplit(":", 1)[1] for e in stats.errors] == ["2", "3", "4"]


def test_jsonl_fields_are_joined(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"q": "question?", "a": "answer.", "k": [1]}) + "\n")
    docs, _ = _read(kind="jsonl", paths=[str(p)], fields=["q", "a"])
    assert docs[0].text == "question?\n\nanswer."


def test_markdown_front_matter_and_title(tmp_path):
    p = tmp_path / "page.md"
    p.write_text("---\nlayout: post\n---\n# The Title\n\nBody *text*.\n")
    docs, _ = _read(kind="markdown", paths=[str(p)])
    assert docs[0].text.startswith("# The Title") and "layout" not in docs[0].text
    assert docs[0].meta["title"] == "The Title"


@pytest.mark.skipif(importlib.util.find_spec("trafilatura") is None, reason="trafilatura not installed")
def test_html_boilerplate_is_stripped(tmp_path):
    article = " ".join(["The river runs through the old town and the people walk along it every day."] * 8)
    page = (f"<html><head><title>River</title></head><body><nav><a href='/'>Home</a> | "
            f"<a href='/about'>About us</a> | <a href='/login'>Login</a></nav><article><h1>River</h1>"
            f"<p>{article}</p><p>{article}</p></article><footer>Copyright 2024 Example Corp. "
            f"All rights reserved. Privacy policy.</footer></body></html>")
    (tmp_path / "p.html").write_text(page)
    docs, _ = _read(kind="html", paths=[str(tmp_path)])
    assert "The river runs through the old town" in docs[0].text
    assert "Login" not in docs[0].text and "All rights reserved" not in docs[0].text
    assert docs[0].meta["title"] == "River"


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")
def test_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x", "y", "z"], "uid": [3, 4, 5]}), tmp_path / "t.parquet")
    docs, _ = _read(kind="parquet", paths=[str(tmp_path)], fields=["content"], id_field="uid")
    assert [(d.id, d.text) for d in docs] == [("s:3", "x"), ("s:4", "y"), ("s:5", "z")]
    docs, stats = _read(kind="parquet", paths=[str(tmp_path)], fields=["missing"])
    assert docs == [] and "missing" in stats.errors[0]["error"]


def _minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` in Helvetica, with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.mark.skipif(importlib.util.find_spec("pypdf") is None, reason="pypdf not installed")
def test_pdf_text_and_corrupt_pdf(tmp_path):
    (tmp_path / "a.pdf").write_bytes(_minimal_pdf("Hello from a PDF page"))
    (tmp_path / "b.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    docs, stats = _read(kind="pdf", paths=[str(tmp_path)])
    assert [d.text.strip() for d in docs] == ["Hello from a PDF page"]
    assert docs[0].meta["pages"] == 1
    assert len(stats.errors) == 1 and "b.pdf" in stats.errors[0]["where"]


def test_max_docs():
    docs, _ = _read(kind="pydocs", max_docs=5)
    assert len(docs) == 5


def test_strip_wikitext():
    wiki = ("{{Infobox|name={{nested|x}}}}'''Paris''' is the [[capital city|capital]] of [[France]]."
            "<ref>cite</ref> See [http://example.org the site].\n== History ==\n"
            "[[File:Paris.jpg|thumb|A [[photo]]]]\n{| class=wikitable\n|-\n| cell\n|}\n"
            "* first item\n[[Category:Cities]]<!-- hidden -->")
    assert strip_wikitext(wiki) == "Paris is the capital of France. See the site.\nHistory\n- first item"


@pytest.mark.skipif(wikipedia_dump_path() is None, reason="gensim (ships the Wikipedia sample) not installed")
def test_wikipedia_sample():
    docs, stats = _read(kind="wikipedia")
    assert len(docs) == 106 and not stats.errors  # 206 pages minus redirects and other namespaces
    assert 2_800_000 < sum(len(d.text) for d in docs) < 3_200_000
    titles = {d.meta["title"] for d in docs}
    assert "Anarchism" in titles
    # Templates are removed except where the article text itself has unbalanced braces.
    assert sum("{{" in d.text for d in docs) <= 3


@pytest.mark.skipif(austen_data_dir() is None, reason="janeaustenr missing: run scripts/fetch_data_assets.sh")
def test_austen_novels():
    docs, _ = _read(kind="austen")
    books = {d.meta["book"] for d in docs}
    assert books == {"emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                     "sensesensibility"}
    pride = [d for d in docs if d.meta["book"] == "prideprejudice"]
    assert len(pride) == 62  # front matter + 61 chapters
    assert pride[1].text.startswith("Chapter 1\n\nIt is a truth universally acknowledged")
    assert 3_900_000 < sum(len(d.text) for d in docs) < 4_100_000


@pytest.mark.skipif(fortunes_dir() is None, reason="fortunes missing: run scripts/fetch_data_assets.sh")
def test_fortunes():
    docs, _ = _read(kind="fortunes")
    assert len(docs) > 14_000
    assert all("\n%\n" not in d.text and d.text.strip() for d in docs)


def test_python_docs():
    docs, stats = _read(kind="pydocs")
    ids = {d.id for d in docs}
    assert "s:topic:assignment" in ids and "s:module:json" in ids
    assert len(docs) > 300 and not stats.errors
