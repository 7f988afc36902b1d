"""Open a store by its spec: a ``postgresql://`` URL is PostgreSQL + pgvector, anything else is a
folder for the embedded store."""

from __future__ import annotations

import os

from lmstack.rag.types import Store


def is_url(spec: str) -> bool:
    return str(spec).startswith(("postgresql://", "postgres://"))


def open_store(spec: str | os.PathLike, create: bool = True) -> Store:
    """The store at ``spec``: ``postgresql://...`` or a folder (created when ``create``)."""
    if is_url(str(spec)):
        from lmstack.rag.pg_store import PGStore

        return PGStore.open(str(spec), create=create)
    from lmstack.rag.sqlite_store import SQLiteStore

    return SQLiteStore.open(spec, create=create)
