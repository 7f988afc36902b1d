"""``lmstack rag <verb>``: ingest, search, ask, eval, info, train-reranker.

``--store`` is a folder (the embedded store, created on first ingest) or a ``postgresql://``
URL. Retrieval flags (``--mode``, ``--k``, ``--rerank``, ``--rewrite``, ``--where``...) come from
``RetrieveConfig``, ingestion flags from ``IngestConfig``, answer flags from ``AnswerConfig``;
``--config FILE`` reads any of them from a YAML recipe and flags override it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _retrieve_cfg(a: argparse.Namespace):
    from lmstack.config import config_from_recipe
    from lmstack.rag.search import RetrieveConfig

    if isinstance(getattr(a, "where", None), str):
        try:
            a.where = json.loads(a.where)
        except ValueError as e:
            from lmstack.errors import ConfigError

            raise ConfigError(f"--where: not JSON ({e}); expected e.g. '{{\"source\": \"docs\"}}'") from e
    return config_from_recipe(RetrieveConfig, getattr(a, "config", None), a, log=lambda m: None)


def _open(a: argparse.Namespace, create: bool = False):
    from lmstack.rag.pipeline import RAG

    model = getattr(a, "model", None)
    return RAG.open(a.store, embedder=getattr(a, "embedder", None), create=create,
                    model=None if model in (None, "default") else model)


def _hit_json(h) -> dict:
    c = h.chunk
    return {"chunk_id": c.id, "score": h.score, "scores": h.scores, "source": c.meta.get("path") or c.meta.get("source"),
            "title": c.meta.get("title"), "section": c.meta.get("section"), "page": c.meta.get("page"),
            "doc_key": c.doc_key, "start": c.start, "end": c.end, "text": c.text}


def cmd_ingest(a: argparse.Namespace) -> int:
    from lmstack.config import config_from_recipe
    from lmstack.rag.ingest import IngestConfig
    from lmstack.rag.pipeline import RAG

    cfg = config_from_recipe(IngestConfig, a.config, a)
    sources = a.sources or cfg.sources
    with RAG.open(a.store, embedder=a.embedder, create=True) as rag:
        from lmstack.rag.ingest import ingest

        report = ingest(rag.store, sources, rag.embedder, cfg, progress=not a.json)
        stats = rag.store.stats()
    if a.json:
        print(json.dumps(report.to_json() | {"store": stats}, indent=1))
    else:
        print(report.summary())
        print(f"store {a.store}: {stats['documents']:,} documents, {stats['chunks']:,} chunks "
              f"({stats.get('index', '')} index)")
    return 1 if report.failed and not (report.added or report.updated or report.skipped) else 0


def cmd_search(a: argparse.Namespace) -> int:
    cfg = _retrieve_cfg(a)
    with _open(a) as rag:
        rag.retrieve_cfg = cfg
        hits = rag.retrieve(a.query)
    if a.json:
        print(json.dumps([_hit_json(h) for h in hits], indent=1, ensure_ascii=False))
        return 0
    for i, h in enumerate(hits, 1):
        c = h.chunk
        where = c.meta.get("title") or c.meta.get("path") or c.doc_key
        extra = "".join(f" {k} {v:.3f}" for k, v in h.scores.items())
        print(f"[{i}] {where}  chars {c.start}-{c.end} {extra}")
        print("    " + " ".join(c.text.split())[:300])
    return 0


def cmd_ask(a: argparse.Namespace) -> int:
    from lmstack.config import config_from_recipe
    from lmstack.rag.answer import Answer, AnswerConfig

    cfg = _retrieve_cfg(a)
    acfg = config_from_recipe(AnswerConfig, a.config, a, log=lambda m: None)
    with _open(a) as rag:
        rag.retrieve_cfg, rag.answer_cfg = cfg, acfg
        final = None
        for piece in rag.ask_stream(a.question):
            if isinstance(piece, Answer):
                final = piece
            elif not a.json:
                print(piece, end="", flush=True)
        assert final is not None
        chunks = {c.id: c for c in rag.store.get_chunks([c.chunk_id for c in final.citations])}
    if a.json:
        print(json.dumps(final.to_json(), indent=1, ensure_ascii=False))
        return 0
    print()
    if final.abstained:
        print(f"({final.reason})")
    for c in final.citations:
        meta = chunks[c.chunk_id].meta if c.chunk_id in chunks else {}
        where = " > ".join(str(x) for x in (meta.get("path") or meta.get("title") or c.source, meta.get("section"))
                           if x)
        mark = "" if c.supported else "  [not supported by this source]"
        how = " (attributed by the checker)" if getattr(c, "origin", "model") == "attributed" else ""
        print(f"[{c.n}] {where}  chars {c.start}-{c.end}  chunk {c.chunk_id}{how}{mark}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from lmstack.rag.stores import open_store

    with open_store(a.store, create=False) as store:
        stats = store.stats()
        problems = store.check() if a.check else None
    if a.json:
        print(json.dumps({"stats": stats, "check": problems}, indent=1))
    else:
        for k, v in stats.items():
            print(f"{k:<12} {v}")
        if problems is not None:
            bad = {k: v for k, v in problems.items() if v}
            print("check        " + ("ok: " + ", ".join(f"{k} 0" for k in problems) if not bad
                                     else "PROBLEMS: " + ", ".join(f"{k} {v}" for k, v in bad.items())))
    return 1 if problems and any(problems.values()) else 0


def cmd_train_reranker(a: argparse.Namespace) -> int:
    from lmstack.rag.rerank import train_cross_encoder
    from lmstack.rag.stores import is_url, open_store

    out = a.out
    if out is None:
        if is_url(a.store):
            from lmstack.errors import ConfigError

            raise ConfigError("train-reranker: --out DIR is needed for a PostgreSQL store")
        out = str(Path(a.store) / "reranker")
    with open_store(a.store, create=False) as store:
        result = train_cross_encoder(store, out, n_queries=a.queries, negatives=a.negatives, steps=a.steps,
                                     seed=a.seed, progress=not a.json)
    print(json.dumps(result, indent=1, default=str) if a.json else
          f"reranker saved to {out}: held-out MRR {result['held_out_mrr_before']:.3f} -> "
          f"{result['held_out_mrr_after']:.3f}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from lmstack.rag.evaluate import run_eval

    return run_eval(a)


def _retrieval_flags(p: argparse.ArgumentParser) -> None:
    from lmstack.config import add_config_args
    from lmstack.rag.search import RetrieveConfig

    add_config_args(p, RetrieveConfig, skip=("where",))
    p.add_argument("--where", default=None, help="metadata filter as JSON, e.g. '{\"source\": \"docs\"}'")


def register(sub) -> None:
    from lmstack.config import add_config_args
    from lmstack.rag.answer import AnswerConfig
    from lmstack.rag.ingest import IngestConfig

    p = sub.add_parser("rag", help="retrieval-augmented generation: ingest, search, ask, eval, info")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>")

    def store_arg(q, create=False):
        q.add_argument("--store", required=True,
                       help="a folder (the embedded store)" + (", created when absent" if create else "")
                       + ", or a postgresql:// URL")

    q = verbs.add_parser("ingest", help="add, update and delete documents to match the sources")
    store_arg(q, create=True)
    q.add_argument("sources", nargs="*", help="files, folders, globs, or a corpus name (wikipedia, pydocs...)")
    q.add_argument("--config", default=None, help="YAML file of IngestConfig fields")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    add_config_args(q, IngestConfig, skip=("sources",))
    q.set_defaults(func=cmd_ingest)

    def query_verb(name, help, text, config_help, model_help, json_help):
        q = verbs.add_parser(name, help=help)
        store_arg(q)
        q.add_argument(text)
        q.add_argument("--config", default=None, help=config_help)
        q.add_argument("--embedder", default=None, help="override the store's embedder (must match it)")
        q.add_argument("--model", default=None, help=model_help)
        q.add_argument("--json", action="store_true", help=json_help)
        _retrieval_flags(q)
        return q

    q = query_verb("search", "the chunks retrieved for a query", "query", "YAML file of RetrieveConfig fields",
                   "LLM for rewriting / the llm reranker (default: embedded)", "print the hits as JSON")
    q.set_defaults(func=cmd_search)
    q = query_verb("ask", "answer a question with cited sources (streams the answer)", "question",
                   "YAML file of RetrieveConfig / AnswerConfig fields",
                   "the LLM that answers (default: the embedded model)",
                   'print {"answer", "citations": [{"n", "source", "chunk_id", "start", "end"}], "contexts"}')
    add_config_args(q, AnswerConfig)
    q.set_defaults(func=cmd_ask)

    q = verbs.add_parser("eval", help="a question set through several configurations, with an HTML report")
    store_arg(q)
    q.add_argument("--questions", default="builtin:wiki-questions", help="question set (JSONL)")
    q.add_argument("--configs", nargs="*", default=None,
                   help="configuration names to run (default: dense, bm25, hybrid, hybrid+rerank, each with "
                        "and without query rewriting)")
    q.add_argument("--no-rewrite", action="store_true", help="leave out the query-rewriting rows")
    q.add_argument("--rewrite-limit", type=int, default=None,
                   help="run the query-rewriting rows (one LLM call per question) on the first N answerable "
                        "questions only, next to the plain rows on the same N")
    q.add_argument("--answers", type=int, default=None,
                   help="abstention on every question (the retrieval gate, threshold fitted on half), and "
                        "answers to the first N questions scored with citations and the judge metrics "
                        "(0: the gate only)")
    q.add_argument("--answer-config", default="hybrid+rerank", help="configuration used for answers")
    q.add_argument("--limit", type=int, default=None, help="use only the first N questions")
    q.add_argument("--out", default="rag-eval", help="folder for report.html / report.json")
    q.add_argument("--model", default=None, help="the LLM for answers, rewriting and judging")
    q.add_argument("--embedder", default=None, help=argparse.SUPPRESS)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_eval)

    q = verbs.add_parser("info", help="what a store holds; --check verifies it")
    store_arg(q)
    q.add_argument("--check", action="store_true",
                   help="count chunks without vectors, vectors without chunks, duplicates (exit 1 if any)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_info)

    q = verbs.add_parser("train-reranker", help="train the cross-encoder reranker on queries made from the store")
    store_arg(q)
    q.add_argument("--out", default=None, help="folder to save it (default: STORE/reranker)")
    q.add_argument("--queries", type=int, default=1000, help="training queries built from the corpus")
    q.add_argument("--negatives", type=int, default=7, help="BM25 hard negatives per query")
    q.add_argument("--steps", type=int, default=300)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_train_reranker)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
