"""The unit that flows through the data pipeline: one document with an id, a source and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """One document. ``id`` is unique within its source and stable across runs."""

    id: str
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "text": self.text, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Document:
        return cls(id=d["id"], text=d["text"], source=d["source"], meta=d.get("meta") or {})
