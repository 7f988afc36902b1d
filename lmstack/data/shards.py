"""Token shards: the on-disk format the training stage reads, its writer and its reader.

A prepared folder holds, per split (``train``, ``val``):

* ``{split}_{k:05d}.bin``: the token ids of whole documents, little-endian ``uint16`` when the
  vocabulary has at most 65,536 entries, else ``uint32``; every document is followed by the
  EOS token. No header: ``np.memmap(path, dtype)`` reads it.
* ``{split}_{k:05d}.idx.npy``: ``int64`` offsets, ``num_docs + 1`` of them: document ``i`` is
  tokens ``[off[i], off[i+1])`` of the shard, its EOS included.
* ``{split}_{k:05d}.ids.txt``: the document ids, one per line, in shard order.
* ``meta.json``: format version, dtype, EOS id, vocabulary size, tokenizer hash, the list of
  finished shards, split and source counts, the mixture and the config of the run.

Every file is written to a temporary name and renamed when complete; a shard exists for
readers only once ``meta.json`` lists it, so an interrupted run never exposes a partial one.
See docs/data.md for the full description.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.files import atomic_write, atomic_write_bytes, atomic_write_text
from lmstack.errors import ConfigError

FORMAT = "lmstack-token-shards"
VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


class ShardWriter:
    """Collects tokenized documents of one split and writes a shard every ``shard_tokens`` tokens.

    Documents are never split across shards, so the shard boundaries depend only on the
    sequence of documents: a resumed run that starts at a boundary rewrites identical bytes.
    """

    def __init__(self, folder: Path, split: str, dtype: np.dtype, eos_token_id: int,
                 shard_tokens: int, first_index: int = 0, on_shard=None):
        self.folder, self.split, self.dtype = Path(folder), split, np.dtype(dtype)
        self.eos, self.shard_tokens = eos_token_id, shard_tokens
        self.index, self.on_shard = first_index, on_shard
        self._tokens: list[np.ndarray] = []
        self._ids: list[str] = []
        self._sources: dict[str, int] = {}
        self._n = 0

    def add(self, doc_id: str, ids: list[int] | np.ndarray, source: str = "") -> None:
        self._sources[source] = self._sources.get(source, 0) + len(ids) + 1
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[:-1] = ids
        arr[-1] = self.eos
        self._tokens.append(arr)
        self._ids.append(doc_id)
        self._n += len(arr)
        if self._n >= self.shard_tokens:
            self.flush()

    def flush(self) -> dict[str, Any] | None:
        if not self._tokens:
            return None
        name = shard_name(self.split, self.index)
        tokens = np.concatenate(self._tokens)
        offsets = np.zeros(len(self._tokens) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in self._tokens], out=offsets[1:])
        atomic_write_bytes(self.folder / f"{name}.bin", tokens.tobytes())
        atomic_write(self.folder / f"{name}.idx.npy", lambda f: np.save(f, offsets))
        atomic_write_text(self.folder / f"{name}.ids.txt", "".join(i + "\n" for i in self._ids))
        info = {"name": name, "split": self.split, "num_tokens": int(len(tokens)),
                "num_docs": len(self._tokens),
                "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
                "source_tokens": dict(sorted(self._sources.items()))}
        self._tokens, self._ids, self._sources, self._n = [], [], {}, 0
        self.index += 1
        if self.on_shard is not None:
            self.on_shard(info)
        return info


def read_meta(folder: str | Path) -> dict[str, Any]:
    p = Path(folder) / "meta.json"
    if not p.is_file():
        raise ConfigError(f"{folder}: no meta.json (expected a folder written by `lmstack data prepare`)")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{p}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ConfigError(f"{p}: version {meta.get('version')}, this lmstack reads version {VERSION}")
    return meta


class TokenShards:
    """Memory-mapped read access to the shards of one split, as one long token sequence.

    >>> data = TokenShards("runs/data/wiki", split="train")
    >>> x = data.get_window(1000, 513)    # tokens 1000..1512 as an int64 array
    """

    def __init__(self, folder: str | Path, split: str = "train", allow_incomplete: bool = False):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        if not self.meta.get("complete") and not allow_incomplete:
            raise ConfigError(f"{folder}: the data run did not finish (meta.json says complete: "
                              "false); run `lmstack data prepare` again to resume it")
        self.split = split
        shards = [s for s in self.meta["shards"] if s["split"] == split]
        if not shards:
            splits = sorted({s["split"] for s in self.meta["shards"]})
            raise ConfigError(f"{folder}: no shards for split {split!r} (found {splits})")
        self.dtype = np.dtype(self.meta["dtype"])
        self.eos_token_id: int = self.meta["eos_token_id"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.names = [s["name"] for s in shards]
        self._maps = [np.memmap(self.folder / f"{n}.bin", dtype=self.dtype, mode="r") for n in self.names]
        for m, s in zip(self._maps, shards):
            if len(m) != s["num_tokens"]:
                raise ConfigError(f"{folder}/{s['name']}.bin has {len(m)} tokens, meta.json says "
                                  f"{s['num_tokens']}: the folder is damaged")
        self._starts = np.zeros(len(self._maps) + 1, dtype=np.int64)
        np.cumsum([len(m) for m in self._maps], out=self._starts[1:])
        self._offsets: list[np.ndarray] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self._starts[-1])

    def __len__(self) -> int:
        return self.num_tokens

    def get_window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split (crossing shard borders), as int64."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"window [{start}, {start + length}) outside 0..{self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            local = start + done - int(self._starts[k])
            take = min(length - done, len(self._maps[k]) - local)
            out[done:done + take] = self._maps[k][local:local + take]
            done += take
            k += 1
        return out

    def random_windows(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` windows of ``length`` tokens at uniform random starts: shape (n, length)."""
        starts = rng.integers(0, self.num_tokens - length + 1, size=n)
        return np.stack([self.get_window(int(s), length) for s in starts])

    def _load_offsets(self) -> list[np.ndarray]:
        if self._offsets is None:
            self._offsets = [np.load(self.folder / f"{n}.idx.npy") for n in self.names]
        return self._offsets

    @property
    def num_docs(self) -> int:
        return sum(len(o) - 1 for o in self._load_offsets())

    def documents(self) -> Iterator[np.ndarray]:
        """Each document's tokens, without its trailing EOS, in shard order."""
        for m, off in zip(self._maps, self._load_offsets()):
            for i in range(len(off) - 1):
                yield np.asarray(m[off[i]:off[i + 1] - 1], dtype=np.int64)

    def doc_ids(self) -> list[str]:
        ids: list[str] = []
        for n in self.names:
            ids.extend((self.folder / f"{n}.ids.txt").read_text().splitlines())
        return ids
