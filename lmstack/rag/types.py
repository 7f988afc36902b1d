"""The records every part of the RAG stage shares, and the one interface both stores implement.

A *document* is one item a reader produced (a file, a JSONL record, a Wikipedia article), kept
under a stable ``key``. Its text is split into *chunks*; each chunk keeps its character span
``[start, end)`` in that text, so a citation can point back at the exact passage. A chunk id is
a hash of the document key, the span and the text: the same chunk gets the same id in every
store, which is what lets two stores (or two runs) be compared chunk by chunk.

Metadata filters (``where``) are a dict over chunk metadata fields:

- ``{"source": "wiki"}``: equality;
- ``{"page": [1, 2]}``: one of;
- ``{"mtime": {"$gte": 1.7e9}}``: comparison with ``$eq``, ``$ne``, ``$gt``, ``$gte``, ``$lt``,
  ``$lte``, ``$in``.

All conditions must hold. ``check_filter`` validates one up front, ``matches`` applies it in
Python (stores may translate it to SQL instead, with the same meaning).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmstack.errors import ConfigError

Filter = dict[str, Any]
FILTER_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in")
# Metadata fields every chunk carries (others come from the reader: path, pages, record fields).
CHUNK_FIELDS = ("source", "doc_key", "title", "section", "page", "mtime", "kind")


@dataclass
class DocRecord:
    """One stored document. ``content_hash`` covers the text and every setting that shapes its
    chunks and vectors (chunker, embedder), so a changed setting re-embeds the document."""

    key: str
    source: str
    content_hash: str
    n_chars: int
    title: str | None = None
    mtime: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChunkRecord:
    """One chunk: its text, its span ``[start, end)`` in the document text, and metadata."""

    id: str
    doc_key: str
    ordinal: int
    text: str
    start: int
    end: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "doc_key": self.doc_key, "ordinal": self.ordinal, "text": self.text,
                "start": self.start, "end": self.end, "meta": self.meta}


@dataclass
class Hit:
    """One retrieved chunk with the score of the step that ranked it last, and each step's score
    (``{"dense": 0.71, "lexical": 12.3, "rrf": 0.032, "rerank": 4.1}``)."""

    chunk: ChunkRecord
    score: float
    scores: dict[str, float] = field(default_factory=dict)


def chunk_id(doc_key: str, start: int, end: int, text: str) -> str:
    """A chunk's stable id: the same chunk of the same document has it in every store."""
    h = hashlib.sha256(f"{doc_key}\x00{start}\x00{end}\x00{text}".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:24]


def _scalar(value: Any, allow_none: bool = False) -> bool:
    if value is None:
        return allow_none
    if isinstance(value, float) and value != value:  # NaN equals nothing, itself included
        return False
    return isinstance(value, (str, int, float, bool))


def check_filter(where: Filter | None) -> None:
    """Raise ``ConfigError`` naming the bad part of a metadata filter."""
    if where is None:
        return
    if not isinstance(where, dict):
        raise ConfigError(f"filter: expected a dict of field -> condition, got {type(where).__name__}")
    for key, cond in where.items():
        if not isinstance(key, str) or not key or key.startswith("$"):
            raise ConfigError(f"filter: field names are plain strings, got {key!r}")
        conds = cond.items() if isinstance(cond, dict) else [("$in" if isinstance(cond, (list, tuple)) else "$eq",
                                                             cond)]
        if isinstance(cond, dict) and not cond:
            raise ConfigError(f"filter {key!r}: empty condition")
        for op, value in conds:
            if op not in FILTER_OPS:
                raise ConfigError(f"filter {key!r}: unknown operator {op!r}, expected one of "
                                  f"{', '.join(FILTER_OPS)}")
            if op == "$in":
                if not isinstance(value, (list, tuple)):
                    raise ConfigError(f"filter {key!r}: $in takes a list, got {type(value).__name__}")
                bad = [v for v in value if not _scalar(v, allow_none=True)]
                if bad:
                    raise ConfigError(f"filter {key!r}: list items must be strings, numbers, booleans or "
                                      f"null, got {bad[0]!r}")
            elif not _scalar(value):
                raise ConfigError(f"filter {key!r}: {op} takes a string, a number or a boolean, "
                                  f"got {value!r}")


def _holds(value: Any, op: str, arg: Any) -> bool:
    if op == "$in":
        return value in arg
    if op == "$eq":
        return value == arg
    if op == "$ne":
        return value != arg
    if value is None:
        return False
    try:
        return {"$gt": value > arg, "$gte": value >= arg, "$lt": value < arg, "$lte": value <= arg}[op]
    except TypeError:  # comparing a string with a number: the condition does not hold
        return False


def matches(meta: dict[str, Any], where: Filter | None) -> bool:
    """Does a chunk with this metadata pass the filter?"""
    if not where:
        return True
    for key, cond in where.items():
        value = meta.get(key)
        if isinstance(cond, dict):
            if not all(_holds(value, op, arg) for op, arg in cond.items()):
                return False
        elif isinstance(cond, (list, tuple)):
            if value not in cond:
                return False
        elif value != cond:
            return False
    return True


class Store(ABC):
    """A document store and vector index behind one interface (embedded folder or pgvector).

    Writes are per document and atomic: ``put_document`` replaces a document's chunks and
    vectors in one transaction, so a crash leaves either the old or the new version, never a
    mix, and never chunks without vectors.
    """

    uri: str

    # -- store-level settings (the embedder name and dimension, the chunker fingerprint) --
    @abstractmethod
    def get_meta(self, key: str) -> str | None: ...

    @abstractmethod
    def set_meta(self, key: str, value: str) -> None: ...

    # -- documents --
    @abstractmethod
    def documents(self) -> dict[str, str]:
        """Every stored document key -> its content hash."""

    @abstractmethod
    def put_document(self, doc: DocRecord, chunks: Sequence[ChunkRecord], vectors: np.ndarray) -> None:
        """Insert or replace one document with its chunks and their (len(chunks), dim) vectors."""

    @abstractmethod
    def delete_documents(self, keys: Iterable[str]) -> int:
        """Remove documents with their chunks and vectors; returns how many existed."""

    # -- retrieval --
    @abstractmethod
    def search_dense(self, vector: np.ndarray, k: int, where: Filter | None = None) -> list[tuple[str, float]]:
        """(chunk id, cosine similarity) of the k nearest chunks, best first."""

    @abstractmethod
    def search_lexical(self, query: str, k: int, where: Filter | None = None) -> list[tuple[str, float]]:
        """(chunk id, score) of the k best full-text matches (higher is better), best first."""

    @abstractmethod
    def get_chunks(self, ids: Sequence[str]) -> list[ChunkRecord]:
        """The chunks with these ids, in the same order (unknown ids are left out)."""

    @abstractmethod
    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        """(len(ids), dim) float32 vectors of these chunks, in the same order."""

    @abstractmethod
    def doc_chunks(self, key: str) -> list[ChunkRecord]:
        """A document's chunks in order."""

    # -- upkeep --
    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counts and settings: documents, chunks, vectors, dim, embedder, index kind, size."""

    @abstractmethod
    def check(self) -> dict[str, int]:
        """Consistency counts, all 0 on a sound store: ``chunks_without_vectors``,
        ``vectors_without_chunks``, ``duplicate_chunks``, ``chunks_without_document``,
        ``index_mismatch`` (vectors missing from or extra in the ANN index)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
