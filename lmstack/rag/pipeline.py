"""``RAG``: one object over a store, an embedder, the retrieval steps and the answer step.

>>> rag = RAG.open("my-store")                 # a folder, or a postgresql:// URL
>>> rag.ingest(["docs/"])                       # incremental: only new or changed files are embedded
>>> rag.retrieve("How do I resume a run?", k=5)  # list[Hit], best first
>>> rag.ask("How do I resume a run?")            # Answer with checked citations

The store remembers the embedder it was built with (``embedder`` in its settings), so a later
``open`` uses the same one without being told; opening with another one is refused. The LLM,
the reranker and the rewriter are loaded on first use, so retrieval alone never loads a
language model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

from lmstack.errors import ConfigError
from lmstack.rag.search import RetrieveConfig, retrieve
from lmstack.rag.stores import is_url, open_store
from lmstack.rag.types import Hit, Store

DEFAULT_EMBEDDER = "default"


class RAG:
    """Retrieval-augmented generation over one store. Build with ``RAG.open``."""

    def __init__(self, store: Store, embedder, retrieve_cfg: Optional[RetrieveConfig] = None,
                 answer_cfg=None, llm=None, model: Optional[str] = None) -> None:
        self.store = store
        self.embedder = embedder
        self.retrieve_cfg = retrieve_cfg or RetrieveConfig()
        self.answer_cfg = answer_cfg
        self._llm = llm
        self.model = model
        self._rerankers: dict[str, Any] = {}
        self._rewriters: dict[str, Any] = {}
        self._rewrites: dict[tuple[str, str], list[str]] = {}  # greedy rewrites are reused, not regenerated

    @classmethod
    def open(cls, store: str | os.PathLike | Store, embedder: Optional[str] = None, create: bool = True,
             llm=None, model: Optional[str] = None, retrieve_cfg: Optional[RetrieveConfig] = None,
             answer_cfg=None) -> "RAG":
        """Open (or create) a store and the embedder it was built with.

        ``embedder``: "default" (the in-stack MiniLM encoder), a BERT folder, "openai:URL[#model]"
        or "hash[:DIM]"; None takes the one recorded in the store, else the default.
        """
        from lmstack.rag.embed import get_embedder

        st = store if isinstance(store, Store) else open_store(store, create=create)
        recorded = st.get_meta("embedder")
        spec = st.get_meta("embedder_spec")
        if embedder is None:
            embedder = spec or DEFAULT_EMBEDDER
        emb = get_embedder(embedder)
        if recorded and emb.name != recorded:
            st.close()
            raise ConfigError(f"store {st.uri} was built with the embedder {recorded}; got {emb.name}. "
                              f"Open it with --embedder {spec or recorded}, or ingest into a new store")
        return cls(st, emb, retrieve_cfg, answer_cfg, llm, model)

    # -- ingestion -----------------------------------------------------------------------------
    def ingest(self, sources: Sequence[str], progress: bool = False, **options):
        """Add new, re-embed changed, delete removed and skip unchanged documents of ``sources``.
        ``options`` are fields of ``IngestConfig`` (chunking, max file size, batch size)."""
        from lmstack.rag.ingest import IngestConfig, ingest

        cfg = IngestConfig(sources=list(sources), **options)
        return ingest(self.store, list(sources), self.embedder, cfg, progress=progress)

    # -- retrieval -----------------------------------------------------------------------------
    def _config(self, overrides: dict[str, Any]) -> RetrieveConfig:
        if not overrides:
            return self.retrieve_cfg
        known = {f.name for f in dataclasses.fields(RetrieveConfig)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ConfigError(f"retrieve: unknown option(s) {bad}; expected some of {sorted(known)}")
        return dataclasses.replace(self.retrieve_cfg, **overrides)

    @property
    def llm(self):
        if self._llm is None:
            from lmstack.infer.llm import LLM

            self._llm = LLM.load(self.model)
        return self._llm

    def reranker(self, name: str):
        """The reranker called ``name`` (``none``, ``llm``, ``cross-encoder[:DIR]``), built once."""
        if name == "none":
            return None
        if name not in self._rerankers:
            from lmstack.rag.rerank import get_reranker

            spec = name
            if name == "cross-encoder" and not is_url(self.store.uri):
                local = Path(self.store.uri) / "reranker"  # where `lmstack rag train-reranker` saves by default
                if local.is_dir():
                    spec = f"cross-encoder:{local}"
            self._rerankers[name] = get_reranker(spec, llm=self.llm if name.startswith("llm") else None,
                                                 embedder=self.embedder)
        return self._rerankers[name].rerank

    def reranker_available(self, name: str) -> bool:
        """Can ``name`` be built without training first (a cross-encoder needs a saved folder)?"""
        if name != "cross-encoder":
            return True
        return not is_url(self.store.uri) and (Path(self.store.uri) / "reranker").is_dir()

    def rewriter(self, name: str):
        if name == "none":
            return None
        if name not in self._rewriters:
            from lmstack.rag.rewrite import get_rewriter

            self._rewriters[name] = get_rewriter(name, self.llm)
        return self._rewriters[name]

    def retrieve(self, query: str, k: Optional[int] = None, **overrides) -> list[Hit]:
        """The ``k`` best chunks for ``query``; ``overrides`` are ``RetrieveConfig`` fields."""
        if k is not None:
            overrides["k"] = k
        cfg = self._config(overrides)
        rewriter = self.rewriter(cfg.rewrite)
        queries, dense_queries = [query], None
        if rewriter is not None:
            key = (cfg.rewrite, query)
            if key not in self._rewrites:
                self._rewrites[key] = rewriter.rewrite(query)
            queries = self._rewrites[key]
            if getattr(rewriter, "dense_only", False):  # HyDE: invented passages only on the dense side
                queries, dense_queries = [query], queries
        return retrieve(self.store, self.embedder, query, cfg, reranker=self.reranker(cfg.rerank),
                        rewriter=(lambda q: queries), dense_queries=dense_queries)

    # -- answers -------------------------------------------------------------------------------
    def answer_config(self, cfg=None):
        """``cfg`` (else this RAG's, else the defaults) with the abstention thresholds that
        ``lmstack rag eval`` fitted on this store, unless thresholds were given."""
        import json

        from lmstack.rag.answer import AnswerConfig

        cfg = cfg or self.answer_cfg or AnswerConfig()
        saved = self.store.get_meta("abstain_thresholds")
        if cfg.fitted_thresholds is None and saved:
            cfg = dataclasses.replace(cfg, fitted_thresholds=json.loads(saved))
        return cfg

    def ask(self, query: str, **overrides):
        """Retrieve, then answer with numbered citations checked against their sources."""
        from lmstack.rag.answer import answer

        hits = self.retrieve(query, **overrides)
        return answer(self.llm, query, hits, self.answer_config(), embedder=self.embedder)

    def ask_stream(self, query: str, **overrides) -> Iterator[Any]:
        """Text pieces as they are generated, then the final ``Answer``."""
        from lmstack.rag.answer import answer_stream

        hits = self.retrieve(query, **overrides)
        yield from answer_stream(self.llm, query, hits, self.answer_config(), embedder=self.embedder)

    # -- upkeep --------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return self.store.stats()

    def check(self) -> dict[str, int]:
        return self.store.check()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "RAG":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
