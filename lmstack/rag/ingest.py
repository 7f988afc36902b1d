"""Incremental ingestion: read sources, chunk, embed in batches across documents, write per document.

Sources are files, folders (searched recursively; the reader is picked by extension, from the
data stage's table), globs, or an offline corpus by name (``wikipedia``, ``austen``,
``fortunes``, ``pydocs``). Every reader of ``lmstack.data.readers`` is used as is, except two
places where the chunker needs structure the reader flattens: PDF pages are read here so each
chunk knows its ``page`` (1-based), and HTML headings are parsed from the raw page and located
in the reader's extracted text, so chunks know their ``section``.

Incremental by content. A document's key is stable (its absolute path; ``path#record-id`` for
JSONL and Parquet records; ``corpus:page-id`` for corpora) and its ``content_hash`` is
sha256 over the text, the title, the chunker fingerprint and the embedder name. On a re-run an
unchanged hash is skipped without embedding, a changed one is re-chunked, re-embedded and
replaced in one ``put_document`` (atomic in every store), and documents of the same roots that
are gone are deleted. Deletion is scoped to the roots of this run (a path prefix, a glob, a
corpus prefix) and skipped for a root that could not be read completely (a corpus whose asset is
missing): nothing else in the store is ever touched. A file that fails this time keeps its
previous version.

Batching. Chunks of several documents are gathered until ``batch_size`` chunks, embedded in
one call (the encoder sorts them by length), then each document is written with its own
vectors, so a folder of small files does not pay for many tiny batches.

Bad input is one line in ``failures`` and the run goes on: a file over ``max_file_mb`` (checked
before reading), a binary file (NUL bytes), a corrupt PDF, an empty document, and text that is
not UTF-8. Non-UTF-8 text is *skipped* with the byte offset of the first bad byte rather than
decoded with replacement characters: a wrong guess at the encoding would put mojibake into the
index and into citations, and converting the file (``iconv``) is a one-line fix.

The store remembers its embedder (``embedder``, ``embedder_spec`` and ``dim`` in its settings);
ingesting with another one is refused with both names.

Deliberately left out: watching folders for changes, parallel readers (reading is a small
share of the time next to embedding), OCR of scanned PDFs, and Wikipedia section headings (the
data stage's ``strip_wikitext`` drops the ``== Heading ==`` markers, so articles are chunked
without sections).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import html as html_lib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.data.readers import (CORPUS_KINDS, _EXTENSIONS, ReadStats, SourceConfig, read_source,
                                  resolve_package_path)
from lmstack.errors import ConfigError, LMStackError
from lmstack.rag.chunking import ChunkConfig, Section, chunk_text, heading_sections
from lmstack.rag.types import ChunkRecord, DocRecord, Store, chunk_id

MB = 1 << 20
_TEXT_KINDS = ("text", "markdown", "jsonl", "html")  # read as bytes first: NUL and UTF-8 checks


@dataclass
class IngestConfig:
    """What to ingest and how (``sources`` may also be given to ``ingest`` directly)."""

    sources: list[str] = field(default_factory=list,
                               metadata={"help": "files, folders, globs, or a corpus name (wikipedia, pydocs...)"})
    embedder: str = field(default="default", metadata={
        "help": "'default' (MiniLM), a BERT folder, 'openai:URL[#model]' or 'hash[:DIM]'"})
    max_file_mb: float = field(default=20.0, metadata={"help": "skip files larger than this (MB)"})
    batch_size: int = field(default=256, metadata={
        "help": "chunks gathered across documents per embedding call"})
    chunk_tokens: int = field(default=200, metadata={
        "help": "most tokens per chunk, counted with the embedding tokenizer"})
    overlap_tokens: int = field(default=32, metadata={"help": "most tokens shared by consecutive chunks"})
    sentences: bool = field(default=True, metadata={"help": "end chunks on sentence boundaries"})
    structure: bool = field(default=True, metadata={
        "help": "split on Markdown/HTML headings and PDF pages first"})
    fields: list[str] = field(default_factory=lambda: ["text"],
                              metadata={"help": "JSONL/Parquet fields joined into the text"})
    id_field: str | None = field(default=None, metadata={
        "help": "JSONL/Parquet field naming a record (else its line or row number)"})

    def __post_init__(self) -> None:
        if not self.max_file_mb > 0:
            raise ConfigError(f"max_file_mb: got {self.max_file_mb}, expected a size in MB > 0")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: got {self.batch_size}, expected >= 1")
        ChunkConfig(self.chunk_tokens, self.overlap_tokens)  # validates the chunk settings up front

    @property
    def chunk(self) -> ChunkConfig:
        return ChunkConfig(chunk_tokens=self.chunk_tokens, overlap_tokens=self.overlap_tokens,
                           sentences=self.sentences, structure=self.structure)


@dataclass
class IngestReport:
    """What one ingest did: document counts, chunks written, failures (path, reason), time."""

    added: int = 0
    updated: int = 0
    deleted: int = 0
    skipped: int = 0
    failed: int = 0
    chunks: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, where: str, reason: str) -> None:
        self.failed += 1
        self.failures.append((str(where), reason))

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [(f"added {self.added}, updated {self.updated}, deleted {self.deleted}, "
                  f"skipped {self.skipped} unchanged, failed {self.failed}; {self.chunks} chunks "
                  f"in {self.seconds:.1f} s")]
        lines += [f"  failed: {where}: {reason}" for where, reason in self.failures]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [{"path": w, "reason": r} for w, r in self.failures]
        return d


class _Skip(Exception):
    """One input that cannot be ingested; its message is the reason shown to the user."""


@dataclass
class _Doc:
    key: str
    text: str
    source: str
    title: str | None
    mtime: float | None
    meta: dict[str, Any]
    kind: str
    sections: list[Section] | None = None


@dataclass
class _Root:
    """One source entry: the documents it yields, and which stored keys belong to it."""

    label: str
    owns: Callable[[str], bool]
    files: list[Path] = field(default_factory=list)
    corpus: str | None = None


# ---- sources -------------------------------------------------------------------------------

def kind_of(path: Path) -> str | None:
    """The reader kind for a file name, from the data stage's extension table."""
    name = path.name.lower()
    return next((kind for kind, exts in _EXTENSIONS.items() if name.endswith(exts)), None)


def _key_paths(key: str) -> list[str]:
    """The key and each prefix before a '#', any of which may be the file path of a record key."""
    return [key] + [key[:i] for i, ch in enumerate(key) if ch == "#"]


def resolve_sources(entries: Sequence[str]) -> list[_Root]:
    """Each entry -> a root with its files; raises ``ConfigError`` before anything is written."""
    roots = []
    for entry in entries:
        if entry in CORPUS_KINDS:
            prefix = f"{entry}:"
            roots.append(_Root(entry, lambda k, p=prefix: k.startswith(p), corpus=entry))
            continue
        raw = os.path.expanduser(resolve_package_path(entry))
        p = Path(raw)
        if p.is_file():
            f = str(p.resolve())
            roots.append(_Root(entry, lambda k, f=f: k == f or k.startswith(f + "#"), [p.resolve()]))
        elif p.is_dir():
            d = str(p.resolve()) + os.sep
            files = sorted(x.resolve() for x in p.rglob("*") if x.is_file() and kind_of(x))
            roots.append(_Root(entry, lambda k, d=d: k.startswith(d), files))
        elif glob.has_magic(raw):
            pattern = os.path.abspath(raw)
            files = sorted(Path(m).resolve() for m in glob.glob(raw, recursive=True) if Path(m).is_file())
            roots.append(_Root(entry, lambda k, pat=pattern: any(fnmatch.fnmatchcase(x, pat)
                                                                  for x in _key_paths(k)), files))
        else:
            raise ConfigError(f"source {entry!r}: not found; expected a file, a folder, a glob or one of "
                              f"the corpora {', '.join(CORPUS_KINDS)}")
    return roots


def _html_sections(raw: str, text: str) -> list[Section]:
    """The page's <h1>..<h6> headings, found in order in the reader's extracted text."""
    headings, cursor = [], 0
    for m in re.finditer(r"<h([1-6])\b[^>]*>(.*?)</h\1\s*>", raw, re.S | re.I):
        title = " ".join(html_lib.unescape(re.sub(r"<[^>]+>", " ", m.group(2))).split())
        if not title:
            continue
        at = re.compile(r"^[ \t#]*" + re.escape(title) + r"[ \t]*$", re.M).search(text, cursor)
        if at:
            headings.append((at.start(), int(m.group(1)), title))
            cursor = at.end()
    return heading_sections(text, headings)


def _read_pdf(path: Path) -> tuple[str, str | None, list[Section]]:
    try:
        import pypdf
    except ImportError:
        raise _Skip("reading PDF needs the pypdf package: pip install 'lmstack[data]'") from None
    try:
        reader = pypdf.PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata or {}).get("/Title") if reader.metadata else None
    except Exception as e:  # noqa: BLE001 -- pypdf raises many types for a broken file
        raise _Skip(f"corrupt PDF ({type(e).__name__}: {str(e)[:200]})") from None
    text, sections = "", []
    for i, page in enumerate(pages):
        start = len(text) + (2 if i else 0)
        text = f"{text}\n\n{page}" if i else page
        sections.append((start, len(text), {"page": i + 1}))
    return text, str(title) if title else None, sections


def _check_bytes(path: Path, kind: str) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise _Skip("binary file (it contains NUL bytes); expected text")
    if kind == "html":  # pages declare their own charset; the reader decodes with replacement too
        return raw.decode("utf-8", "replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Skip(f"not UTF-8 (invalid byte 0x{raw[e.start]:02x} at offset {e.start}); convert it, "
                    "e.g. iconv -f latin1 -t utf-8") from None


def _file_docs(path: Path, cfg: IngestConfig, report: IngestReport) -> list[_Doc]:
    """The documents of one file (several for JSONL/Parquet); raises ``_Skip`` for a bad file."""
    size = path.stat().st_size
    if size > cfg.max_file_mb * MB:
        raise _Skip(f"{size / MB:.1f} MB is over max_file_mb={cfg.max_file_mb:g}; raise it with --max-file-mb")
    kind = kind_of(path) or "text"  # a file named explicitly is read as text whatever its name
    mtime = path.stat().st_mtime
    base = {"path": str(path), "kind": kind}
    if kind == "pdf":
        text, title, sections = _read_pdf(path)
        return [_Doc(str(path), text, str(path), title or path.name, mtime, base, kind, sections)]
    raw = _check_bytes(path, kind) if kind in _TEXT_KINDS and not path.name.lower().endswith((".gz", ".bz2")) else None
    stats = ReadStats()
    try:
        src = SourceConfig(name="rag", kind=kind, paths=[str(path)], fields=cfg.fields, id_field=cfg.id_field)
        docs = list(read_source(src, stats))
    except LMStackError as e:  # a missing optional library (trafilatura, pyarrow)
        raise _Skip(str(e)) from None
    if stats.errors and not docs:
        raise _Skip(stats.errors[0]["error"])
    for err in stats.errors:  # bad JSONL records: the others are still ingested
        report.fail(err["where"], err["error"])
    out = []
    for d in docs:
        meta = {k: v for k, v in d.meta.items() if k != "title"}
        rec = d.id[len("rag:"):]
        if rec == str(path):
            key = str(path)
        else:
            rec = rec[len(str(path)) + 1:] if rec.startswith(f"{path}:") else rec
            key = f"{path}#{rec}"
        sections = _html_sections(raw, d.text) if kind == "html" and raw is not None else None
        out.append(_Doc(key, d.text, str(path), d.meta.get("title") or path.name, mtime,
                        {**meta, **base}, kind, sections))
    return out


def _corpus_docs(name: str, stats: ReadStats) -> Iterator[_Doc]:
    for d in read_source(SourceConfig(name=name, kind=name), stats):  # type: ignore[arg-type]
        meta = {k: v for k, v in d.meta.items() if k != "title"}
        yield _Doc(d.id, d.text, name, d.meta.get("title"), None, {**meta, "kind": name}, name)


# ---- the run ---------------------------------------------------------------------------------

def content_hash(doc: _Doc, chunk_cfg: ChunkConfig, embedder_name: str) -> str:
    h = hashlib.sha256()
    for part in (doc.text, doc.title or "", chunk_cfg.fingerprint(), embedder_name):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def check_embedder(store: Store, embedder: Any) -> None:
    """Refuse an embedder other than the one the store was built with."""
    stored = store.get_meta("embedder")
    if stored and stored != embedder.name:
        raise ConfigError(f"store {getattr(store, 'uri', '')} was built with {stored}; re-create it or "
                          f"pass --embedder {store.get_meta('embedder_spec') or stored}")


def ingest(store: Store, sources: Sequence[str] | None, embedder: Any = None,
           cfg: IngestConfig | None = None, progress: bool = True) -> IngestReport:
    """Bring ``store`` in step with ``sources``: add new documents, re-embed changed ones, delete
    vanished ones (of these sources only) and skip unchanged ones."""
    from tqdm import tqdm

    from lmstack.rag.embed import get_embedder

    t0 = time.perf_counter()
    cfg = cfg or IngestConfig()
    entries = [str(s) for s in (sources if sources is not None else cfg.sources)]
    if not entries:
        raise ConfigError("ingest: no sources given; expected files, folders, globs or a corpus name")
    embedder = get_embedder(embedder or cfg.embedder) if embedder is None or isinstance(embedder, str) else embedder
    chunk_cfg = cfg.chunk
    tok = embedder.tokenizer
    n_special = tok.num_special_tokens_to_add(False)
    limit = getattr(embedder, "max_tokens", None)
    if limit is not None and chunk_cfg.chunk_tokens + n_special > limit:
        raise ConfigError(f"chunk_tokens={chunk_cfg.chunk_tokens} + {n_special} special tokens is over the "
                          f"embedder's {limit}-token limit; lower --chunk-tokens")
    roots = resolve_sources(entries)
    check_embedder(store, embedder)
    if store.get_meta("embedder") is None:
        store.set_meta("embedder", embedder.name)
        store.set_meta("embedder_spec", embedder.name)

    report = IngestReport()
    existing = store.documents()
    seen: set[str] = set()
    kept: list[Callable[[str], bool]] = []  # keys of files that failed this time: keep them
    pending: list[tuple[DocRecord, list, bool]] = []
    n_pending = 0
    total = None if any(r.corpus for r in roots) else sum(len(r.files) for r in roots)
    # On a terminal the bar redraws; in a log (not a tty) it writes a line every 30 s instead.
    bar = tqdm(total=total, unit="doc", desc="ingest", disable=not progress, file=sys.stderr,
               mininterval=0.1 if sys.stderr.isatty() else 30)

    def flush() -> None:
        nonlocal n_pending
        if not pending:
            return
        texts = [c[2] for _, chunks, _ in pending for c in chunks]
        vectors = np.asarray(embedder.embed(texts), dtype=np.float32)
        if vectors.shape[0] != len(texts):
            raise LMStackError(f"embedder {embedder.name}: {vectors.shape[0]} vectors for {len(texts)} texts")
        if store.get_meta("dim") is None:
            store.set_meta("dim", str(vectors.shape[1]))
        row = 0
        for rec, chunks, update in pending:
            records = [ChunkRecord(chunk_id(rec.key, s, e, t), rec.key, i, t, s, e, meta)
                       for i, (s, e, t, meta) in enumerate(chunks)]
            store.put_document(rec, records, vectors[row:row + len(chunks)])
            row += len(chunks)
            report.chunks += len(chunks)
            if update:
                report.updated += 1
            else:
                report.added += 1
        pending.clear()
        n_pending = 0

    def take(doc: _Doc) -> None:
        nonlocal n_pending
        if doc.key in seen:
            return
        seen.add(doc.key)
        if not doc.text.strip():
            report.fail(doc.key, "empty document (no text after extraction)")
            return
        digest = content_hash(doc, chunk_cfg, embedder.name)
        if existing.get(doc.key) == digest:
            report.skipped += 1
            return
        meta = {**doc.meta, "source": doc.source, "title": doc.title, "section": None, "page": None,
                "mtime": doc.mtime, "kind": doc.kind, "doc_key": doc.key}
        chunks = chunk_text(doc.text, doc.kind, tok, chunk_cfg, meta, doc.sections)
        rec = DocRecord(key=doc.key, source=doc.source, content_hash=digest, n_chars=len(doc.text),
                        title=doc.title, mtime=doc.mtime, meta=doc.meta)
        pending.append((rec, chunks, doc.key in existing))
        n_pending += len(chunks)
        if n_pending >= cfg.batch_size:
            flush()

    complete: list[_Root] = []
    try:
        for root in roots:
            if root.corpus:
                stats = ReadStats()
                for doc in _corpus_docs(root.corpus, stats):
                    take(doc)
                    bar.update(1)
                for err in stats.errors:
                    report.fail(err["where"], err["error"])
                report.notes += stats.notes
                if not stats.notes and not stats.errors:
                    complete.append(root)
                continue
            for path in root.files:
                try:
                    docs = _file_docs(path, cfg, report)
                except (_Skip, OSError) as e:
                    report.fail(str(path), str(e) if isinstance(e, _Skip) else f"{type(e).__name__}: {e}")
                    f = str(path)
                    kept.append(lambda k, f=f: k == f or k.startswith(f + "#"))
                    docs = []
                for doc in docs:
                    take(doc)
                bar.update(1)
            complete.append(root)
        flush()
    finally:
        bar.close()
    gone = [k for k in existing if k not in seen and any(r.owns(k) for r in complete)
            and not any(keep(k) for keep in kept)]
    report.deleted = store.delete_documents(gone) if gone else 0
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["IngestConfig", "IngestReport", "ingest", "resolve_sources", "kind_of", "content_hash",
           "check_embedder"]
