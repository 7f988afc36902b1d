"""``prepare``: sources -> clean -> quality filters -> exact/near dedup -> decontamination -> shards.

The run has two phases, each deterministic whatever the number of workers:

1. Documents. Sources are read (and mixed by weight), then worker processes clean, filter,
   hash, sign and test every document for contamination; the main process makes the
   order-dependent decisions (first copy of a duplicate wins) and appends kept documents
   to ``documents.jsonl``. The file and ``state.json`` appear atomically when the phase ends;
   an interrupted phase 1 starts again from the beginning.
2. Tokens. The tokenizer is loaded (or trained on the kept documents) and saved into the
   output folder; workers tokenize batches in order and the main process appends them to
   the shards of each split. ``meta.json`` lists a shard only after its files are complete,
   so a resumed run skips exactly the documents of the listed shards and rewrites the
   rest: the result is byte-identical to an uninterrupted run.

Mixtures: when sources have weights, documents are interleaved so that the characters read
from each source follow the weights (a smooth weighted round-robin); with
``mixture_stop: first_exhausted`` reading stops when the first weighted source runs out, which
keeps the proportions, with ``all_exhausted`` the others continue alone.
Deliberately left out: distributed runs, resuming inside phase 1, sampling with replacement.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmstack.config import config_from_dict
from lmstack.data.clean import CleanConfig, Scrubber, clean_text
from lmstack.data.decontam import DecontamConfig, EvalNgrams, load_eval_ngrams
from lmstack.data.dedup import DedupConfig, ExactIndex, LSHIndex, MinHasher, content_hash
from lmstack.data.document import Document
from lmstack.data.filters import QualityConfig, apply_filters
from lmstack.data.readers import ReadStats, SourceConfig, read_source, validate_source
from lmstack.data.report import STEPS, RunReport
from lmstack.data.shards import FORMAT, VERSION, ShardWriter, token_dtype
from lmstack.errors import ConfigError, LMStackError
from lmstack.files import atomic_open, atomic_write_text, file_sha256
from lmstack.tokenizer.train import TokenizerTrainConfig

# Fields that change how a run goes, not what it produces: a resume may change them.
_RUNTIME_FIELDS = ("output", "workers", "batch_docs", "overwrite", "progress")


@dataclass
class PrepareConfig:
    """A ``lmstack data prepare`` run; its YAML form is a recipe (see recipes/data/)."""

    output: str = field(default="", metadata={"help": "output folder"})
    sources: list[SourceConfig] = field(default_factory=list)
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer.json, model folder or GGUF; omit with train_tokenizer"})
    train_tokenizer: TokenizerTrainConfig | None = None
    clean: CleanConfig = field(default_factory=CleanConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    quality_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    val_fraction: float = field(default=0.01, metadata={"help": "share of documents for validation"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/val assignment"})
    shard_tokens: int = field(default=10_000_000, metadata={"help": "tokens per shard (whole documents)"})
    mixture_stop: Literal["first_exhausted", "all_exhausted"] = field(
        default="first_exhausted", metadata={"help": "when weighted sources stop"})
    workers: int = field(default=2, metadata={"help": "worker processes"})
    batch_docs: int = field(default=64, metadata={"help": "documents per worker task"})
    report_examples: int = field(default=3, metadata={"help": "examples per removal reason"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished or different run"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("PrepareConfig.sources: expected at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"PrepareConfig.sources: names must be unique, got {names}")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise ConfigError("PrepareConfig.sources: give every source a weight, or none "
                              f"(weights: { {s.name: s.weight for s in self.sources} })")
        if self.tokenizer and self.train_tokenizer:
            raise ConfigError("PrepareConfig: give tokenizer or train_tokenizer, not both")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"PrepareConfig.val_fraction: got {self.val_fraction}, expected in [0, 1)")
        if self.shard_tokens < 1 or self.workers < 1 or self.batch_docs < 1:
            raise ConfigError("PrepareConfig: shard_tokens, workers and batch_docs must be >= 1")
        unknown = sorted(set(self.quality_overrides) - set(names))
        if unknown:
            raise ConfigError(f"PrepareConfig.quality_overrides: unknown source(s) {unknown}; "
                              f"sources are {names}")
        self.quality_for()  # a misspelt rule in an override fails here, naming the field

    def quality_for(self) -> dict[str, QualityConfig]:
        """Each source's quality rules: ``quality`` updated by its ``quality_overrides`` entry."""
        base, out = dataclasses.asdict(self.quality), {}
        for s in self.sources:
            try:
                out[s.name] = config_from_dict(QualityConfig, {**base, **self.quality_overrides.get(s.name, {})})
            except ConfigError as e:
                raise ConfigError(f"PrepareConfig.quality_overrides.{s.name}: {e}") from None
        return out

    def fingerprint(self) -> str:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _RUNTIME_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- mixing ----------------------------------------------------------------------------------

def mix_sources(sources: list[SourceConfig], stats: ReadStats,
                stop: str = "first_exhausted") -> Iterator[Document]:
    """All documents in source order, or interleaved by weight (characters read per source)."""
    streams = [read_source(s, stats) for s in sources]
    if all(s.weight is None for s in sources):
        for stream in streams:
            yield from stream
        return
    weights = [float(s.weight) for s in sources]
    emitted = [0.0] * len(sources)
    active = list(range(len(sources)))
    while active:
        i = min(active, key=lambda k: (emitted[k] / weights[k], k))
        doc = next(streams[i], None)
        if doc is None:
            if stop == "first_exhausted":
                return
            active.remove(i)
            continue
        emitted[i] += max(len(doc.text), 1)
        yield doc


def split_of(doc_id: str, val_fraction: float, seed: int) -> str:
    """``val`` for a fixed pseudo-random share of document ids, else ``train``."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest(), "little")
    return "val" if h / 2**64 < val_fraction else "train"


# ---- phase 1 workers -------------------------------------------------------------------------

_W: dict[str, Any] = {}


def _init_docs_worker(clean: CleanConfig, quality: dict[str, QualityConfig], dedup: DedupConfig,
                      eval_ngrams: EvalNgrams | None, scrubbers: dict[str, Scrubber] | None) -> None:
    _W.update(clean=clean, quality=quality, dedup=dedup, eval=eval_ngrams, scrubbers=scrubbers,
              hasher=MinHasher(dedup.num_perm, dedup.shingle_size, dedup.seed, dedup.hash))


def _docs_task(batch: list[Document]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Clean, filter, hash, sign and test one batch; the per-stage seconds it took."""
    out, secs = [], {"clean": 0.0, "quality": 0.0, "exact_dedup": 0.0, "near_dedup": 0.0, "decontam": 0.0}
    dedup: DedupConfig = _W["dedup"]
    for doc in batch:
        t0 = time.perf_counter()
        text, pii = clean_text(doc.text, _W["clean"], _W["scrubbers"])
        t1 = time.perf_counter()
        reason = apply_filters(text, _W["quality"][doc.source])
        t2 = time.perf_counter()
        r = {"doc": doc, "text": text, "pii": pii, "reason": reason}
        if reason is None:
            r["digest"] = content_hash(text) if dedup.exact else None
            t3 = time.perf_counter()
            r["sig"] = _W["hasher"].signature(text) if dedup.near else None
            t4 = time.perf_counter()
            r["contam"] = _W["eval"].match(text) if _W["eval"] is not None else (0, [])
            t5 = time.perf_counter()
            secs["exact_dedup"] += t3 - t2
            secs["near_dedup"] += t4 - t3
            secs["decontam"] += t5 - t4
        secs["clean"] += t1 - t0
        secs["quality"] += t2 - t1
        out.append(r)
    return out, secs


def _batches(docs: Iterator[Document], n: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _pool_map(fn, items, workers: int, initializer, initargs):
    """``map`` over ``items`` in order: in this process for one worker, else a process pool."""
    if workers == 1:
        initializer(*initargs)
        yield from map(fn, items)
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        yield from pool.imap(fn, items)


def _progress(enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, unit="doc", dynamic_ncols=True, **kw)


def _throughput(report: RunReport, name: str, docs: int, chars: int, seconds: float) -> None:
    report.data["throughput"][name] = {"docs": docs, "mb": chars / 1e6, "seconds": seconds,
                                       "docs_per_s": docs / seconds if seconds else 0.0,
                                       "mb_per_s": chars / 1e6 / seconds if seconds else 0.0}


def run_documents(cfg: PrepareConfig, out: Path, scrubbers: dict[str, Scrubber] | None = None) -> RunReport:
    """Phase 1: write ``documents.jsonl`` (kept documents) and return the report so far."""
    report = RunReport(cfg.report_examples)
    stats = ReadStats()
    eval_ngrams = load_eval_ngrams(cfg.decontam, stats) if cfg.decontam.eval_sets else None
    if eval_ngrams is not None:
        report.data["decontam"] = {"eval_items": eval_ngrams.items, "too_short": eval_ngrams.too_short,
                                   "ngrams": int(len(eval_ngrams.hashes)), "n": cfg.decontam.ngram}
    exact, near = ExactIndex(), LSHIndex(cfg.dedup.num_perm, cfg.dedup.threshold, cfg.dedup.verify,
                                         (cfg.dedup.false_positive_weight, cfg.dedup.false_negative_weight),
                                         cfg.dedup.lsh_recall)
    report.data["dedup"] = {"bands": near.bands, "rows": near.rows, "verify": near.verify}
    t_start = time.perf_counter()
    docs_in = chars_in = docs_kept = 0
    bar = _progress(cfg.progress, desc="documents")
    initargs = (cfg.clean, cfg.quality_for(), cfg.dedup, eval_ngrams, scrubbers)
    with atomic_open(out / "documents.jsonl", "w", encoding="utf-8") as f:
        batches = _batches(mix_sources(cfg.sources, stats, cfg.mixture_stop), cfg.batch_docs)
        for results, secs in _pool_map(_docs_task, batches, cfg.workers, _init_docs_worker, initargs):
            for name, s in secs.items():
                report.data["steps"][name]["seconds"] += s
            for r in results:
                doc: Document = r["doc"]
                text, n_raw = r["text"], len(doc.text)
                docs_in += 1
                chars_in += n_raw
                report.step("read", 1, n_raw, 1, n_raw)
                report.step("clean", 1, n_raw, 1, len(text))
                report.source(doc.source, docs_read=1, chars_read=n_raw)
                for k, v in r["pii"].items():
                    report.data["pii_replacements"][k] = report.data["pii_replacements"].get(k, 0) + v
                kept = _decide(r, cfg, report, exact, near)
                if kept:
                    rec = {"id": doc.id, "source": doc.source, "text": text, "meta": doc.meta}
                    if r.get("flag"):
                        rec["contaminated"] = r["flag"]
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    report.source(doc.source, docs_kept=1, chars_kept=len(text))
                    docs_kept += 1
            bar.update(len(results))
            bar.set_postfix_str(f"{chars_in / 1e6 / max(time.perf_counter() - t_start, 1e-9):.2f} MB/s")
        bar.close()
        if not docs_kept:  # raised inside the block, so no documents.jsonl appears
            raise nothing_kept_error(cfg, report, stats)
    report.data["read_errors"] = stats.errors
    report.data["notes"] += stats.notes
    report.data["files_read"] = stats.files
    _throughput(report, "documents (phase 1, wall)", docs_in, chars_in, time.perf_counter() - t_start)
    for name in ("clean", "quality", "exact_dedup", "near_dedup", "decontam"):
        s = report.data["steps"][name]
        _throughput(report, f"{name} (per worker)", s["docs_in"], s["chars_in"], s["seconds"])
    return report


def nothing_kept_error(cfg: PrepareConfig, report: RunReport, stats: ReadStats) -> LMStackError:
    """Why a run kept no document: the removals per step and reason, or that nothing was read."""
    read = report.data["steps"]["read"]["docs_in"]
    if not read:
        errors = ""
        if stats.errors:
            errors = f"; {len(stats.errors)} unreadable file(s)/record(s), the first {stats.errors[0]['where']}"
        return LMStackError(f"no documents were read from the sources "
                            f"{[s.name for s in cfg.sources]}{errors}; nothing to write")
    by_step: dict[str, dict[str, int]] = {}
    for r_key, r in report.data["removed"].items():
        by_step.setdefault(r["step"], {})[r_key.split("/", 1)[1]] = r["docs"]
    parts = []
    for step in (s for s in STEPS if s in by_step):
        reasons = sorted(by_step[step].items(), key=lambda kv: (-kv[1], kv[0]))
        detail = reasons[0][0] if len(reasons) == 1 else ", ".join(f"{k} {n:,}" for k, n in reasons)
        parts.append(f"{step} {sum(by_step[step].values()):,} ({detail})")
    return LMStackError(f"all {read:,} documents were removed: {', '.join(parts)}; nothing to write "
                        "(see the quality:, dedup: and decontam: settings of the recipe)")


def _decide(r: dict[str, Any], cfg: PrepareConfig, report: RunReport, exact: ExactIndex,
            near: LSHIndex) -> bool:
    """The order-dependent decisions for one document; records its path through the steps."""
    doc: Document = r["doc"]
    text, n = r["text"], len(r["text"])
    if r["reason"] is not None:
        report.step("quality", 1, n, 0, 0)
        report.remove("quality", r["reason"], doc.id, doc.source, text)
        return False
    report.step("quality", 1, n, 1, n)
    if cfg.dedup.exact:
        first = exact.add_if_new(doc.id, r["digest"])
        if first is not None:
            report.step("exact_dedup", 1, n, 0, 0)
            report.remove("exact_dedup", "duplicate", doc.id, doc.source, text, duplicate_of=first)
            return False
        report.step("exact_dedup", 1, n, 1, n)
    if cfg.dedup.near:
        first = near.add_if_new(doc.id, r["sig"])
        if first is not None:
            report.step("near_dedup", 1, n, 0, 0)
            report.remove("near_dedup", "near_duplicate", doc.id, doc.source, text, duplicate_of=first)
            return False
        report.step("near_dedup", 1, n, 1, n)
    hits, items = r["contam"]
    if cfg.decontam.eval_sets:
        if hits >= cfg.decontam.min_matches:
            if cfg.decontam.action == "drop":
                report.step("decontam", 1, n, 0, 0)
                report.remove("decontam", "contaminated", doc.id, doc.source, text,
                              ngram_hits=hits, eval_items=items[:5])
                return False
            r["flag"] = items[:20]
            report.data["flagged"].append({"id": doc.id, "ngram_hits": hits, "eval_items": items[:5]})
        report.step("decontam", 1, n, 1, n)
    return True


# ---- phase 2 ---------------------------------------------------------------------------------

def _iter_kept(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _init_tok_worker(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    _W["tok"] = HFTokenizer.from_file(tokenizer_json)


def _tok_task(batch: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[int]]]:
    encs = _W["tok"].encode_batch([r["text"] for r in batch], add_special_tokens=False)
    return [({"id": r["id"], "source": r["source"], "chars": len(r["text"])}, e.ids)
            for r, e in zip(batch, encs)]


def _resolve_tokenizer(cfg: PrepareConfig, out: Path):
    """Train or load the tokenizer, save it into ``out/tokenizer`` and return it (lmstack Tokenizer)."""
    from lmstack.tokenizer.tokenizer import Tokenizer

    folder = out / "tokenizer"
    if cfg.train_tokenizer is not None:
        if (folder / "tokenizer.json").is_file():  # trained by the interrupted run being resumed
            return Tokenizer.load(folder)
        from lmstack.tokenizer.train import train_tokenizer

        texts = (r["text"] for r in _iter_kept(out / "documents.jsonl"))
        tok = train_tokenizer(texts, cfg.train_tokenizer, show_progress=cfg.progress)
    else:
        tok = Tokenizer.load(cfg.tokenizer)
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {cfg.tokenizer}: it declares no EOS token, which the shards "
                          "use to separate documents")
    tok.save(folder)
    return tok


def run_tokens(cfg: PrepareConfig, out: Path, report: RunReport,
               on_shard: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Phase 2: tokenize ``documents.jsonl`` into shards; resumes from ``meta.json``."""
    tok = _resolve_tokenizer(cfg, out)
    tok_json = out / "tokenizer" / "tokenizer.json"
    tok_hash = file_sha256(tok_json)
    dtype = token_dtype(tok.vocab_size)
    meta_path = out / "meta.json"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    meta: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "complete": False, "dtype": dtype.str,
        "eos_token_id": tok.eos_token_id, "vocab_size": tok.vocab_size,
        "tokenizer": {"sha256": tok_hash, "path": "tokenizer/tokenizer.json"},
        "config_fingerprint": cfg.fingerprint(),
        "split": {"val_fraction": cfg.val_fraction, "seed": cfg.split_seed},
        "shards": [],
    }
    if old and old.get("tokenizer", {}).get("sha256") == tok_hash \
            and old.get("config_fingerprint") == meta["config_fingerprint"]:
        meta["shards"] = old["shards"]
    done = {s: sum(x["num_docs"] for x in meta["shards"] if x["split"] == s) for s in ("train", "val")}

    def record(info: dict[str, Any]) -> None:
        meta["shards"].append(info)
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
        if on_shard is not None:
            on_shard(info)

    writers = {s: ShardWriter(out, s, dtype, tok.eos_token_id, cfg.shard_tokens,
                              first_index=sum(x["split"] == s for x in meta["shards"]), on_shard=record)
               for s in ("train", "val")}
    seen = {"train": 0, "val": 0}

    def todo() -> Iterator[dict[str, Any]]:
        for rec in _iter_kept(out / "documents.jsonl"):
            s = split_of(rec["id"], cfg.val_fraction, cfg.split_seed)
            seen[s] += 1
            if seen[s] > done[s]:  # documents of finished shards are not tokenized again
                rec["split"] = s
                yield rec

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    n_docs = n_chars = 0
    bar = _progress(cfg.progress, desc="tokenize",
                    total=sum(v.get("docs_kept", 0) for v in report.data["sources"].values()))
    bar.update(done["train"] + done["val"])
    splits: dict[str, str] = {}
    for results in _pool_map(_tok_task, _batches(_tag(todo(), splits), cfg.batch_docs), cfg.workers,
                             _init_tok_worker, (str(tok_json),)):
        for info, ids in results:
            writers[splits.pop(info["id"])].add(info["id"], ids, info["source"])
            n_docs += 1
            n_chars += info["chars"]
        bar.update(len(results))
        bar.set_postfix_str(f"{n_chars / 1e6 / max(time.perf_counter() - t0, 1e-9):.2f} MB/s")
    for w in writers.values():
        w.flush()
    bar.close()
    _throughput(report, "tokenize (this run, wall)", n_docs, n_chars, time.perf_counter() - t0)
    meta["complete"] = True
    meta["splits"] = {s: {"num_tokens": sum(x["num_tokens"] for x in meta["shards"] if x["split"] == s),
                          "num_docs": sum(x["num_docs"] for x in meta["shards"] if x["split"] == s)}
                      for s in ("train", "val")}
    tokens_by_source: dict[str, int] = {}
    for x in meta["shards"]:
        for src, n in x["source_tokens"].items():
            tokens_by_source[src] = tokens_by_source.get(src, 0) + n
    total = sum(tokens_by_source.values()) or 1
    meta["sources"] = {s.name: {**report.data["sources"].get(s.name, {}), "tokens": tokens_by_source.get(s.name, 0),
                                "token_share": tokens_by_source.get(s.name, 0) / total}
                       for s in cfg.sources}
    meta["mixture"] = {"weights": {s.name: s.weight for s in cfg.sources}, "stop": cfg.mixture_stop}
    meta["config"] = dataclasses.asdict(cfg)
    for s in cfg.sources:
        report.source(s.name, tokens=tokens_by_source.get(s.name, 0))
    kept_chars = sum(v.get("chars_kept", 0) for v in report.data["sources"].values())
    docs_total = meta["splits"]["train"]["num_docs"] + meta["splits"]["val"]["num_docs"]
    report.data["steps"]["tokenize"] = {"docs_in": docs_total, "chars_in": kept_chars, "docs_out": docs_total,
                                        "chars_out": kept_chars, "seconds": time.perf_counter() - t0,
                                        "tokens": total}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return meta


def _tag(recs: Iterator[dict[str, Any]], splits: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Remember each document's split in the main process (workers only see the text)."""
    for r in recs:
        splits[r["id"]] = r.pop("split")
        yield r


# ---- the whole run ---------------------------------------------------------------------------

_OUR_FILES = ("meta.json", "state.json", "documents.jsonl", "report.json", "report.md",
              "report.html", "report.png")


def _clear(out: Path) -> None:
    """Remove what an earlier run wrote here (only files this module creates)."""
    for p in out.iterdir():
        if p.name in _OUR_FILES or p.name.endswith((".bin", ".idx.npy", ".ids.txt", ".tmp", ".partial")):
            p.unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (out / "tokenizer" / name).is_file():
            (out / "tokenizer" / name).unlink()


def prepare(cfg: PrepareConfig, scrubbers: dict[str, Scrubber] | None = None,
            on_shard: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a data run; returns the report as a dict. See the module docstring."""
    if not cfg.output:
        raise ConfigError("PrepareConfig.output: expected an output folder")
    for s in cfg.sources + cfg.decontam.eval_sets:
        validate_source(s)
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).exists():
        raise ConfigError(f"PrepareConfig.tokenizer: {cfg.tokenizer} does not exist (expected a "
                          "tokenizer.json, a model folder or a .gguf file)")
    out = Path(cfg.output)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is not None and state.get("fingerprint") != cfg.fingerprint():
        if not cfg.overwrite:
            raise ConfigError(f"{out} holds a run of a different config (fingerprint "
                              f"{state.get('fingerprint')}, this config {cfg.fingerprint()}); "
                              "choose another output folder or set overwrite: true")
        _clear(out)
        state = None
    elif state is not None and state.get("complete") and cfg.overwrite:
        _clear(out)
        state = None
    if state is not None and state.get("complete"):
        print(f"{out}: this run is already complete (set overwrite: true to redo it)", file=sys.stderr)
        return json.loads((out / "report.json").read_text())

    if state is None or not (out / "documents.jsonl").is_file():
        try:
            report = run_documents(cfg, out, scrubbers)
        except LMStackError:
            if created and not any(out.iterdir()):
                out.rmdir()  # a run that stopped before writing anything leaves no folder behind
            raise
        state = {"fingerprint": cfg.fingerprint(), "complete": False, "report": report.to_json()}
        atomic_write_text(state_path, json.dumps(state))
    else:
        report = RunReport(cfg.report_examples, state["report"])
        report.data["notes"].append("resumed: phase 1 (documents) reused from the interrupted run")
    if cfg.tokenizer is not None or cfg.train_tokenizer is not None:
        meta = run_tokens(cfg, out, report, on_shard)
        report.data["shards"] = {"splits": meta["splits"], "num_shards": len(meta["shards"]),
                                 "dtype": meta["dtype"], "tokenizer_sha256": meta["tokenizer"]["sha256"]}
    report.write(out, title=f"lmstack data report: {out.name}")
    state["complete"] = True
    state["report"] = report.to_json()
    atomic_write_text(state_path, json.dumps(state))
    return report.to_json()
