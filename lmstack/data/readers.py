"""Streaming document readers: files (text, Markdown, HTML, JSONL, Parquet, PDF) and the offline corpora.

Every reader is a generator of ``Document`` and never holds more than one file (one Parquet
batch, one JSONL line) in memory. A file that cannot be read is skipped and counted in
``ReadStats`` with its error; a run never stops in the middle because of one bad file.
Mistakes that can be seen before a run starts (a path that matches nothing, an unknown
kind, a missing optional library) raise ``ConfigError``/``UnsupportedError`` up front.

The offline corpora (see ASSETS.md) are located without importing their packages; when an
asset is absent its reader yields nothing and records a message saying how to fetch it.
Deliberately left out: remote URLs, archives other than gzip/bz2, OCR of scanned PDFs.
"""

from __future__ import annotations

import ast
import bz2
import glob
import gzip
import html
import importlib
import io
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmstack.data.document import Document
from lmstack.assets import package_dir
from lmstack.errors import ConfigError, UnsupportedError
from lmstack.tokenizer.evaluate import third_party_dir

FileKind = Literal["text", "markdown", "html", "jsonl", "parquet", "pdf"]
CorpusKind = Literal["wikipedia", "austen", "fortunes", "pydocs"]
SourceKind = Literal["text", "markdown", "html", "jsonl", "parquet", "pdf",
                     "wikipedia", "austen", "fortunes", "pydocs"]

FILE_KINDS = ("text", "markdown", "html", "jsonl", "parquet", "pdf")
CORPUS_KINDS = ("wikipedia", "austen", "fortunes", "pydocs")

# Extensions picked up when a directory is given (an explicitly named file is always read).
_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "text": (".txt", ".txt.gz", ".text"),
    "markdown": (".md", ".markdown", ".md.gz"),
    "html": (".html", ".htm", ".html.gz"),
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".ndjson"),
    "parquet": (".parquet",),
    "pdf": (".pdf",),
}

# Optional libraries per kind: (module to import, pip package that provides it).
_OPTIONAL = {"html": ("trafilatura", "trafilatura"), "parquet": ("pyarrow", "pyarrow"),
             "pdf": ("pypdf", "pypdf"), "austen": ("rdata", "rdata")}


@dataclass
class SourceConfig:
    """One input source of a data run."""

    name: str = field(metadata={"help": "label used in ids, reports and the mixture"})
    kind: SourceKind = field(metadata={"help": "reader to use"})
    paths: list[str] = field(default_factory=list,
                             metadata={"help": "files, directories or glob patterns; corpora "
                                               "use their offline asset when empty"})
    fields: list[str] = field(default_factory=lambda: ["text"],
                              metadata={"help": "JSONL/Parquet fields joined into the text"})
    id_field: str | None = field(default=None, metadata={"help": "JSONL/Parquet field used as id"})
    weight: float | None = field(default=None,
                                 metadata={"help": "mixture weight (share of characters read)"})
    max_docs: int | None = field(default=None, metadata={"help": "read at most this many"})

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"SourceConfig.name: got {self.name!r}, expected letters, digits, "
                              "'_', '.' or '-'")
        if self.kind in FILE_KINDS and not self.paths:
            raise ConfigError(f"source {self.name!r}: kind {self.kind!r} needs at least one "
                              "entry in paths (a file, a directory or a glob)")
        if self.weight is not None and not self.weight > 0:
            raise ConfigError(f"source {self.name!r}: weight must be > 0, got {self.weight}")
        if self.max_docs is not None and self.max_docs < 0:
            raise ConfigError(f"source {self.name!r}: max_docs must be >= 0, got {self.max_docs}")
        if not self.fields:
            raise ConfigError(f"source {self.name!r}: fields must name at least one field")


@dataclass
class ReadStats:
    """What the readers saw: files read, documents produced, files or records skipped and why."""

    files: int = 0
    docs: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def error(self, where: str, exc: BaseException | str) -> None:
        msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.errors.append({"where": str(where), "error": msg[:300]})


def check_optional(kind: str) -> None:
    """Import the optional library a kind needs, or say which package to install."""
    if kind in _OPTIONAL:
        module, package = _OPTIONAL[kind]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UnsupportedError(f"reading {kind!r} sources needs the {package!r} package "
                                   f"({e}): pip install 'lmstack[data]'") from None


def expand_paths(entries: list[str], kind: str) -> list[Path]:
    """Files named by ``entries`` (files, directories searched recursively, globs), sorted, unique."""
    out: list[Path] = []
    for entry in entries:
        entry = resolve_package_path(entry)
        p = Path(os.path.expanduser(entry))
        if p.is_file():
            matches = [p]
        elif p.is_dir():
            exts = _EXTENSIONS.get(kind, ())
            matches = sorted(f for f in p.rglob("*")
                             if f.is_file() and (not exts or f.name.lower().endswith(exts)))
            if not matches:
                raise ConfigError(f"directory {entry!r} has no {kind} files "
                                  f"(looked for {', '.join(exts)})")
        elif glob.has_magic(entry):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(entry), recursive=True)
                             if Path(m).is_file())
            if not matches:
                raise ConfigError(f"glob {entry!r} matches no files")
        else:
            raise ConfigError(f"path {entry!r} not found (expected a file, a directory or a glob)")
        out.extend(matches)
    seen: set[Path] = set()
    return [f for f in out if not (f in seen or seen.add(f))]


def resolve_package_path(entry: str) -> str:
    """``pkg://package/rel/path`` -> the file inside an installed package (found without importing it)."""
    if not entry.startswith("pkg://"):
        return entry
    package, _, rel = entry[len("pkg://"):].partition("/")
    root = package_dir(package)
    if root is None:
        raise ConfigError(f"path {entry!r}: package {package!r} is not installed "
                          f"(pip install --no-deps {package.replace('_', '-')})")
    return str(root / rel)


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


# ---- file readers: each yields (id suffix, text, meta) for one file -------------------------

def _read_text(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[tuple[str, str, dict]]:
    with _open_text(path) as f:
        yield str(path), f.read(), {"path": str(path)}


_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.S)


def _read_markdown(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[tuple[str, str, dict]]:
    with _open_text(path) as f:
        text = f.read().replace("\r\n", "\n")
    text = _FRONT_MATTER.sub("", text, count=1)
    meta: dict[str, Any] = {"path": str(path)}
    m = re.search(r"^#\s+(.+)$", text, re.M)
    if m:
        meta["title"] = m.group(1).strip()
    yield str(path), text, meta


def _read_html(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[tuple[str, str, dict]]:
    import trafilatura

    raw = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        raw = gzip.decompress(raw)
    page = raw.decode("utf-8", errors="replace")
    # trafilatura drops navigation, footers and other boilerplate; None means no main text.
    text = trafilatura.extract(page, include_comments=False, include_tables=True,
                               favor_precision=True) or ""
    meta: dict[str, Any] = {"path": str(path)}
    m = re.search(r"<title[^>]*>(.*?)</title>", page, re.S | re.I)
    if m:
        meta["title"] = html.unescape(m.group(1)).strip()
    yield str(path), text, meta


def _record_text(rec: Any, cfg: SourceConfig, where: str) -> str:
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    parts = []
    for name in cfg.fields:
        if name not in rec:
            raise KeyError(f"field {name!r} missing (record has {sorted(rec)[:10]})")
        value = rec[name]
        parts.append(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    return "\n\n".join(parts)


def _read_jsonl(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[tuple[str, str, dict]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
                text = _record_text(rec, cfg, where)
            except (ValueError, KeyError) as e:
                stats.error(where, e)
                continue
            doc_id = str(rec[cfg.id_field]) if cfg.id_field and cfg.id_field in rec else where
            meta = {k: v for k, v in rec.items()
                    if k not in cfg.fields and isinstance(v, (str, int, float, bool))}
            meta["path"] = str(path)
            yield doc_id, text, meta


def _read_parquet(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[tuple[str, str, dict]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    missing = [f for f in cfg.fields if f not in names]
    if missing:
        raise KeyError(f"column(s) {missing} missing (file has {sorted(names)})")
    columns = list(cfg.fields) + ([cfg.id_field] if cfg.id_field in names else [])
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for rec in batch.to_pylist():
            doc_id = str(rec[cfg.id_field]) if cfg.id_field in rec else f"{path}:{row}"
            row += 1
            parts = [rec[f] if isinstance(rec[f], str) else json.dumps(rec[f], ensure_ascii=False)
                     for f in cfg.fields]
            yield doc_id, "\n\n".join(parts), {"path": str(path)}


def _read_pdf(path: Path, cfg: SourceConfig, stats: ReadStats) -> Iterator[tuple[str, str, dict]]:
    import pypdf

    reader = pypdf.PdfReader(path)
    pages = [page.extract_text() or "" for page in reader.pages]
    meta: dict[str, Any] = {"path": str(path), "pages": len(pages)}
    title = (reader.metadata or {}).get("/Title") if reader.metadata else None
    if title:
        meta["title"] = str(title)
    yield str(path), "\n\n".join(pages), meta


_FILE_READERS = {"text": _read_text, "markdown": _read_markdown, "html": _read_html,
                 "jsonl": _read_jsonl, "parquet": _read_parquet, "pdf": _read_pdf}


def _iter_files(cfg: SourceConfig, files: list[Path], stats: ReadStats) -> Iterator[Document]:
    reader = _FILE_READERS[cfg.kind]
    for path in files:
        stats.files += 1
        try:
            # Materialise one file's records so that a failure half-way skips the file as a whole.
            records = list(reader(path, cfg, stats))
        except Exception as e:  # noqa: BLE001 -- any unreadable file is skipped and counted
            stats.error(path, e)
            continue
        for doc_id, text, meta in records:
            yield Document(id=f"{cfg.name}:{doc_id}", text=text, source=cfg.name, meta=meta)


# ---- offline corpora -------------------------------------------------------------------------

def wikipedia_dump_path() -> Path | None:
    root = package_dir("gensim")
    if root is None:
        return None
    p = root / "test" / "test_data" / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    return p if p.is_file() else None


def austen_data_dir() -> Path | None:
    p = third_party_dir() / "janeaustenr" / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"
    return p if (p / "Rdata.rdx").is_file() else None


def fortunes_dir() -> Path | None:
    for p in (third_party_dir() / "fortunes" / "usr" / "share" / "games" / "fortunes",
              Path("/usr/share/games/fortunes")):
        if p.is_dir():
            return p
    return None


_WIKI_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_WIKI_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_WIKI_DROP_LINK = re.compile(r"^(?:file|image|category|media|[a-z]{2,3}(?:-[a-z]+)?):", re.I)


def _wiki_link(m: re.Match) -> str:
    inner = m.group(1)
    if _WIKI_DROP_LINK.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1]


def strip_wikitext(text: str) -> str:
    """Plain text from MediaWiki markup: templates, tables, refs, files and categories removed,
    links replaced by their label, headings and list items kept as text."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    for pattern, repl in ((_WIKI_TEMPLATE, ""), (_WIKI_TABLE, ""), (_WIKI_LINK, _wiki_link)):
        while True:  # innermost first, so nested markup unwinds level by level
            text, n = pattern.subn(repl, text)
            if not n:
                break
    text = re.sub(r"\[https?://[^\s\]]+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://[^\]]*\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)
    text = re.sub(r"<[^>\n]+>", "", text)
    text = html.unescape(text)
    text = re.sub(r"^[*#:;]+\s*", "- ", text, flags=re.M)
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(ln for ln in lines if ln.strip(" -|!{}") or not ln.strip())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _read_wikipedia(cfg: SourceConfig, stats: ReadStats) -> Iterator[Document]:
    import xml.etree.ElementTree as ET

    files = expand_paths(cfg.paths, "wikipedia") if cfg.paths else []
    if not cfg.paths:
        dump = wikipedia_dump_path()
        if dump is None:
            stats.notes.append(f"source {cfg.name!r}: the Wikipedia sample ships with gensim, "
                               "which is not installed (pip install gensim); skipped")
            return
        files = [dump]
    for path in files:
        stats.files += 1
        try:
            raw = bz2.open(path, "rb") if path.name.endswith(".bz2") else open(path, "rb")
            with raw:
                for _, el in ET.iterparse(raw):
                    if el.tag.rsplit("}", 1)[-1] != "page":
                        continue
                    ns = el.findtext("{*}ns")
                    redirect = el.find("{*}redirect") is not None
                    title = el.findtext("{*}title") or ""
                    page_id = el.findtext("{*}id") or title
                    wikitext = el.findtext("{*}revision/{*}text") or ""
                    el.clear()
                    if ns != "0" or redirect:
                        continue
                    yield Document(id=f"{cfg.name}:{page_id}", text=strip_wikitext(wikitext),
                                   source=cfg.name, meta={"title": title})
        except Exception as e:  # noqa: BLE001 -- a broken dump is skipped and counted
            stats.error(path, e)


def _austen_books(data_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """(book name, lines) from janeaustenr's R lazy-load database (an .rdx index + .rdb blobs)."""
    import warnings
    import zlib

    import rdata

    def parse(raw: bytes) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that a bare blob has no RDS header
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    blob = (data_dir / "Rdata.rdb").read_bytes()
    for name, (offset, length) in sorted(index["variables"].items(), key=lambda kv: int(kv[1][0])):
        # Each .rdb entry is a 4-byte big-endian length followed by a zlib stream.
        chunk = blob[int(offset): int(offset) + int(length)]
        yield str(name), [str(s) for s in parse(zlib.decompress(chunk[4:]))]


def _read_austen(cfg: SourceConfig, stats: ReadStats) -> Iterator[Document]:
    data_dir = Path(cfg.paths[0]) if cfg.paths else austen_data_dir()
    if data_dir is None or not (data_dir / "Rdata.rdx").is_file():
        stats.notes.append(f"source {cfg.name!r}: Jane Austen's novels are missing "
                           "(run scripts/fetch_data_assets.sh); skipped")
        return
    check_optional("austen")
    stats.files += 1
    try:
        books = list(_austen_books(data_dir))
    except Exception as e:  # noqa: BLE001
        stats.error(data_dir, e)
        return
    chapter = re.compile(r"^(CHAPTER|Chapter)\s+[0-9IVXLC]+\.?\s*$")
    for book, lines in books:
        # One document per chapter: the front matter before chapter 1 is its own document.
        chunks: list[list[str]] = [[]]
        for line in lines:
            if chapter.match(line.strip()) and any(s.strip() for s in chunks[-1]):
                chunks.append([])
            chunks[-1].append(line)
        for i, chunk in enumerate(chunks):
            # Lines are hard-wrapped at ~70 columns: rejoin paragraphs into single lines.
            paras = re.split(r"\n\s*\n", "\n".join(chunk))
            text = "\n\n".join(" ".join(p.split()) for p in paras if p.strip())
            yield Document(id=f"{cfg.name}:{book}:{i}", text=text, source=cfg.name,
                           meta={"book": book, "chapter": i})


def _read_fortunes(cfg: SourceConfig, stats: ReadStats) -> Iterator[Document]:
    if cfg.paths:
        files = expand_paths(cfg.paths, "fortunes")
    else:
        root = fortunes_dir()
        if root is None:
            stats.notes.append(f"source {cfg.name!r}: the fortunes files are missing "
                               "(run scripts/fetch_data_assets.sh); skipped")
            return
        files = sorted(p for p in root.iterdir() if p.is_file() and "." not in p.name)
    for path in files:
        stats.files += 1
        try:
            text = path.read_bytes().decode("utf-8", errors="replace")
        except OSError as e:
            stats.error(path, e)
            continue
        for i, quote in enumerate(re.split(r"\n%\n", text)):
            if quote.strip() and quote.strip() != "%":
                yield Document(id=f"{cfg.name}:{path.name}:{i}", text=quote.strip("\n"),
                               source=cfg.name, meta={"file": path.name})


def _read_pydocs(cfg: SourceConfig, stats: ReadStats) -> Iterator[Document]:
    """The language reference topics of ``pydoc_data`` and the stdlib modules' docstrings.

    Docstrings are read with ``ast`` from the source files: importing every stdlib module would
    run their side effects (``antigravity`` opens a browser)."""
    from pydoc_data.topics import topics

    stats.files += 1
    for name in sorted(topics):
        yield Document(id=f"{cfg.name}:topic:{name}", text=topics[name], source=cfg.name,
                       meta={"topic": name})
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel.parts:
            continue
        stats.files += 1
        try:
            doc = ast.get_docstring(ast.parse(path.read_bytes()))
        except (SyntaxError, ValueError, OSError) as e:
            stats.error(path.relative_to(stdlib), e)
            continue
        if doc:
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            yield Document(id=f"{cfg.name}:module:{module}", text=doc, source=cfg.name,
                           meta={"module": module, "python": sys.version.split()[0]})


_CORPUS_READERS = {"wikipedia": _read_wikipedia, "austen": _read_austen,
                   "fortunes": _read_fortunes, "pydocs": _read_pydocs}


def validate_source(cfg: SourceConfig) -> list[Path] | None:
    """Check a source before a run starts; returns its files for file kinds."""
    check_optional(cfg.kind)
    if cfg.kind in FILE_KINDS:
        return expand_paths(cfg.paths, cfg.kind)
    return None


def read_source(cfg: SourceConfig, stats: ReadStats | None = None) -> Iterator[Document]:
    """Stream the documents of one source, in a deterministic order."""
    stats = stats if stats is not None else ReadStats()
    files = validate_source(cfg)
    if cfg.kind in FILE_KINDS:
        docs = _iter_files(cfg, files or [], stats)
    else:
        docs = _CORPUS_READERS[cfg.kind](cfg, stats)
    for n, doc in enumerate(docs):
        if cfg.max_docs is not None and n >= cfg.max_docs:
            break
        stats.docs += 1
        yield doc
