"""RAG ingestion end to end (read, chunk, embed, store): lmstack against LlamaIndex.

The corpus is the offline Wikipedia sample (``read_source(SourceConfig(kind="wikipedia"))``),
its first articles up to ``--chars`` characters written out as text files. Both sides read that
folder, split it into chunks of at most ``--chunk-tokens`` tokens with ``--overlap`` tokens of
overlap, counted with the same MiniLM tokenizer, embed every chunk with all-MiniLM-L6-v2 from
the asset folder, and store the vectors:

- lmstack: ``lmstack.rag.ingest.ingest`` into a fresh ``SQLiteStore`` (documents, chunks,
  vectors and the full-text index on disk, one transaction per document) with ``LocalEmbedder``;
- LlamaIndex: ``SimpleDirectoryReader`` + ``IngestionPipeline([SentenceSplitter, HuggingFaceEmbedding])``
  (sentence-transformers underneath) into an in-memory ``SimpleVectorStore``.

Models are loaded before the clock starts; each run starts from an empty store. Runs alternate
the order (lmstack first, then LlamaIndex first, ...); the medians of ``--repeats`` runs and
their ratio are printed with the load average, chunk counts and mean tokens per chunk. Both
sides use ``--threads`` torch threads and the same embedding batch size. ``--sweep`` first times
``LocalEmbedder`` over the chunks at several batch sizes (how the default batch size was chosen).

    .venv/bin/python bench/rag_ingest.py [--chars 200000] [--repeats 3] [--threads 2] [--sweep]

LlamaIndex is a benchmark-only dependency:
``pip install llama-index-core llama-index-embeddings-huggingface``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def write_corpus(folder: Path, max_chars: int) -> tuple[int, int]:
    from lmstack.data.readers import SourceConfig, read_source

    n = chars = 0
    for doc in read_source(SourceConfig(name="wiki", kind="wikipedia")):
        if chars >= max_chars:
            break
        if not doc.text.strip():
            continue
        name = re.sub(r"[^A-Za-z0-9]+", "_", doc.meta.get("title") or doc.id)[:60]
        (folder / f"{n:04d}_{name}.txt").write_text(doc.text[: max_chars - chars], encoding="utf-8")
        chars += min(len(doc.text), max_chars - chars)
        n += 1
    if not n:
        raise SystemExit("the Wikipedia sample ships with gensim, which is not installed (pip install gensim)")
    return n, chars


def run_lmstack(corpus: Path, work: Path, embedder, args) -> dict:
    from lmstack.rag.ingest import IngestConfig, ingest
    from lmstack.rag.sqlite_store import SQLiteStore

    store_dir = work / f"store-{time.monotonic_ns()}"
    cfg = IngestConfig(chunk_tokens=args.chunk_tokens, overlap_tokens=args.overlap, batch_size=args.ingest_batch)
    t0 = time.perf_counter()
    with SQLiteStore.open(store_dir) as store:
        report = ingest(store, [str(corpus)], embedder, cfg, progress=False)
    seconds = time.perf_counter() - t0
    with SQLiteStore.open(store_dir) as store:
        texts = [c.text for k in store.documents() for c in store.doc_chunks(k)]
    shutil.rmtree(store_dir)
    return {"chunks": report.chunks, "seconds": seconds, "chunks_per_s": report.chunks / seconds,
            "texts": texts}


def run_llamaindex(corpus: Path, embed_model, tokenize, args) -> dict:
    from llama_index.core import SimpleDirectoryReader
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.vector_stores import SimpleVectorStore

    t0 = time.perf_counter()
    docs = SimpleDirectoryReader(str(corpus)).load_data()
    splitter = SentenceSplitter(chunk_size=args.chunk_tokens, chunk_overlap=args.overlap, tokenizer=tokenize)
    store = SimpleVectorStore()
    pipeline = IngestionPipeline(transformations=[splitter, embed_model], vector_store=store)
    nodes = pipeline.run(documents=docs, show_progress=False)
    seconds = time.perf_counter() - t0
    assert len(store.data.embedding_dict) == len(nodes)
    return {"chunks": len(nodes), "seconds": seconds, "chunks_per_s": len(nodes) / seconds,
            "texts": [n.get_content() for n in nodes]}


def sweep(embedder, texts: list[str], sizes: list[int]) -> dict[int, float]:
    """Chunks/s of ``LocalEmbedder.embed`` at each batch size (the order is interleaved twice)."""
    out: dict[int, list[float]] = {b: [] for b in sizes}
    for order in (sizes, sizes[::-1]):
        for b in order:
            embedder.batch_size = b
            t0 = time.perf_counter()
            embedder.embed(texts)
            out[b].append(len(texts) / (time.perf_counter() - t0))
    return {b: statistics.median(v) for b, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chars", type=int, default=200_000, help="characters of Wikipedia text to ingest")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk-tokens", type=int, default=200)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--batch", type=int, default=None, help="embedding batch size (both sides; default: ours)")
    ap.add_argument("--ingest-batch", type=int, default=256, help="chunks gathered per embedding call (lmstack)")
    ap.add_argument("--sweep", action="store_true", help="time LocalEmbedder at several batch sizes first")
    ap.add_argument("--only", choices=["lmstack", "llamaindex"], default=None)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    from lmstack.model.encoder import default_encoder_path
    from lmstack.rag.embed import LocalEmbedder

    embedder = LocalEmbedder()
    if args.batch:
        embedder.batch_size = args.batch
    batch = embedder.batch_size
    tok = embedder.tokenizer

    def tokenize(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    work = Path(tempfile.mkdtemp(prefix="rag-ingest-bench-"))
    corpus = work / "corpus"
    corpus.mkdir()
    n_docs, n_chars = write_corpus(corpus, args.chars)
    result: dict = {"docs": n_docs, "chars": n_chars, "threads": args.threads, "batch": batch,
                    "chunk_tokens": args.chunk_tokens, "overlap": args.overlap,
                    "load_before": os.getloadavg()}
    print(f"corpus: {n_docs} Wikipedia articles, {n_chars} characters; {args.threads} threads; "
          f"embedding batch {batch}; load average {os.getloadavg()[0]:.2f}")
    if args.sweep:
        first = run_lmstack(corpus, work, embedder, args)["texts"][:64]
        rates = sweep(embedder, first, [8, 16, 32, 64])
        embedder.batch_size = batch
        result["sweep"] = rates
        print("LocalEmbedder chunks/s by batch size: " + ", ".join(f"{b}: {r:.1f}" for b, r in rates.items()))

    systems = {}
    if args.only != "llamaindex":
        systems["lmstack"] = lambda: run_lmstack(corpus, work, embedder, args)
    if args.only != "lmstack":
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding

        embed_model = HuggingFaceEmbedding(model_name=str(default_encoder_path()), device="cpu",
                                           embed_batch_size=batch)
        systems["llamaindex"] = lambda: run_llamaindex(corpus, embed_model, tokenize, args)
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    names = list(systems)
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            out = systems[name]()
            out["mean_tokens"] = statistics.mean(len(tokenize(t)) for t in out.pop("texts"))
            runs[name].append(out)
            print(f"  run {r + 1} {name:>10}: {out['chunks']} chunks ({out['mean_tokens']:.0f} tokens on average) "
                  f"in {out['seconds']:.1f} s = {out['chunks_per_s']:.1f} chunks/s; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    for name, rs in runs.items():
        result[name] = {"chunks_per_s": statistics.median(x["chunks_per_s"] for x in rs),
                        "tokens_per_s": statistics.median(x["chunks"] * x["mean_tokens"] / x["seconds"] for x in rs),
                        "chunks": rs[0]["chunks"], "mean_tokens": rs[0]["mean_tokens"], "runs": rs}
    result["load_after"] = os.getloadavg()
    print(f"load average: {' '.join(f'{x:.2f}' for x in result['load_before'])} before, "
          f"{' '.join(f'{x:.2f}' for x in result['load_after'])} after")
    for name in runs:
        print(f"{name:>10}: median {result[name]['chunks_per_s']:.1f} chunks/s, "
              f"{result[name]['tokens_per_s']:.0f} tokens/s")
    if len(runs) == 2:
        result["ratio"] = result["lmstack"]["chunks_per_s"] / result["llamaindex"]["chunks_per_s"]
        result["token_ratio"] = result["lmstack"]["tokens_per_s"] / result["llamaindex"]["tokens_per_s"]
        print(f"lmstack / LlamaIndex: {result['ratio']:.2f}x chunks/s ({result['token_ratio']:.2f}x tokens/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
