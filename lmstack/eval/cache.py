"""A resumable cache of model outputs: one append-only JSONL file, one line per output.

The key is a SHA-256 of the model identity (a digest of its weights, or an endpoint and model
name), the request kind, the prompt and every sampling parameter, so a changed model, prompt or
setting never reuses an old output. Each batch is appended and flushed to disk as soon as it is
computed: a run killed mid-way loses at most the batch in flight, and a re-run computes nothing
already cached. A truncated last line (a kill during a write) is ignored.

The file is appended to, not rewritten through ``lmstack.files.atomic_write``: a whole-file
rename per batch would copy every earlier output again (quadratic in the run), and an append
cut short by a kill costs only its own line, which the reader skips.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence


def cache_key(model_id: str, kind: str, payload: dict) -> str:
    blob = json.dumps({"model": model_id, "kind": kind, **payload}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class OutputCache:
    def __init__(self, path: Optional[str | os.PathLike]) -> None:
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a write cut short by a kill
                self.data[row["k"]] = row["v"]

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __len__(self) -> int:
        return len(self.data)

    def get(self, key: str) -> Any:
        return self.data[key]

    def put_many(self, items: dict[str, Any]) -> None:
        self.data.update(items)
        if not self.path or not items:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as fb:  # end a line cut short by a kill before appending
            if fb.tell() > 0:
                fb.seek(-1, os.SEEK_END)
                if fb.read(1) != b"\n":
                    fb.write(b"\n")
        with open(self.path, "a", encoding="utf-8") as f:
            for k, v in items.items():
                f.write(json.dumps({"k": k, "v": v}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def cached_map(cache: OutputCache, model_id: str, kind: str, payloads: Sequence[dict],
               compute: Callable[[list[dict]], list[Any]], batch_size: int,
               done: Optional[Callable[[list[int]], None]] = None) -> list[Any]:
    """``compute`` over the payloads not yet in ``cache`` (in batches, each saved when done); the
    values for all payloads, in order. A payload repeated within the call is computed once.
    ``done(indices)`` is told which payloads have their value: those already cached, then each
    batch's (with their repeats)."""
    keys = [cache_key(model_id, kind, p) for p in payloads]
    where: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        where.setdefault(k, []).append(i)
    todo = [idx[0] for k, idx in where.items() if k not in cache]
    if done:
        done([i for k, idx in where.items() if k in cache for i in idx])
    for s in range(0, len(todo), batch_size):
        chunk = todo[s: s + batch_size]
        values = compute([payloads[i] for i in chunk])
        cache.put_many({keys[i]: v for i, v in zip(chunk, values)})
        if done:
            done([j for i in chunk for j in where[keys[i]]])
    return [cache.get(k) for k in keys]
