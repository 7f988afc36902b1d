"""``lmstack rag eval``: a question set through the pipeline, scored with the eval stage's metrics,
several retrieval configurations side by side, and an HTML report.

Retrieval (every configuration, every question): hit@k, MRR@10, nDCG@10 and recall@10 from
``lmstack.eval.retrieval``, with gold given as character spans (``datasets/build_questions``)
turned into the ids of the chunks that cover them, so any chunker can be graded; plus latency
per query. Unanswerable questions have no gold and are left out of the retrieval metrics.

Answers (one configuration, ``--answers N`` questions): the share of unanswerable questions
answered "I don't know" and of answerable ones that were not, citation precision (cited
sources that support their sentence, per the answer step's checker), and the eval stage's RAG
metrics with the local model as a likelihood judge: faithfulness, context precision and
recall, answer relevance (``lmstack.eval.rag_metrics``). The abstention threshold is fitted on
one half of the questions (even positions) and reported on the other.

Left out: bootstrap intervals per configuration (the eval stage's ``compare`` does that for
two saved reports); several seeds (every step here is greedy).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lmstack.eval.retrieval import hit_at_k, mrr, ndcg_at_k, recall_at_k

# name -> RetrieveConfig overrides. "+rw" rows add query rewriting to the row they extend.
BASE_CONFIGS: dict[str, dict[str, Any]] = {
    "dense": {"mode": "dense"},
    "bm25": {"mode": "lexical"},
    "hybrid": {"mode": "hybrid"},
    "hybrid+rerank": {"mode": "hybrid", "rerank": "sentence"},
    "hybrid+cross-encoder": {"mode": "hybrid", "rerank": "cross-encoder"},
}
REWRITES = ("multi-query", "hyde", "step-back")


def standard_configs(rerank: bool = True, rewrites: Sequence[str] = REWRITES) -> dict[str, dict[str, Any]]:
    """The report's grid: each base configuration, alone and with each rewriter."""
    out: dict[str, dict[str, Any]] = {}
    for name, cfg in BASE_CONFIGS.items():
        if cfg.get("rerank") == "cross-encoder" and not rerank:
            continue
        out[name] = dict(cfg)
        for rw in rewrites:
            out[f"{name} + {rw}"] = {**cfg, "rewrite": rw}
    return out


def _resolve_doc(store, doc_id: str, cache: dict) -> Optional[str]:
    """The store's key for a question set's document id: the same key, or the same record id
    under another source name (``wiki:12`` is ``wikipedia:12`` when ingested as ``wikipedia``)."""
    if "keys" not in cache:
        keys = list(store.documents())
        by_id: dict[str, list[str]] = {}
        for k in keys:
            by_id.setdefault(k.rpartition(":")[2], []).append(k)
        cache["keys"], cache["by_id"] = set(keys), by_id
    if doc_id in cache["keys"]:
        return doc_id
    found = cache["by_id"].get(doc_id.rpartition(":")[2], [])
    return found[0] if len(found) == 1 else None


def gold_chunk_ids(store, question, cache: Optional[dict] = None) -> set[str]:
    """Ids of the stored chunks that are relevant to ``question`` (span overlap, see
    ``build_questions.is_relevant``)."""
    from lmstack.rag.datasets.build_questions import is_relevant

    cache = {} if cache is None else cache
    out = set()
    for g in question.gold:
        key = _resolve_doc(store, g.doc_id, cache)
        if key is None:
            continue
        if key not in cache:
            cache[key] = store.doc_chunks(key)
        for c in cache[key]:
            if is_relevant(g.doc_id, c.start, c.end, g):
                out.add(c.id)
    return out


@dataclass
class RetrievalRow:
    name: str
    config: dict[str, Any]
    metrics: dict[str, float]
    ms_per_query: float
    rankings: dict[str, list[str]] = field(default_factory=dict)


def eval_retrieval(rag, questions, configs: dict[str, dict[str, Any]], k: int = 10,
                   progress: bool = True, rewrite_limit: Optional[int] = None,
                   verbose: bool = True) -> list[RetrievalRow]:
    """Every configuration over the answerable questions; metrics at 1, 3, 5 and ``k``.

    ``rewrite_limit``: rows with query rewriting (an LLM call per question) run on the first
    that many answerable questions only, and their base rows are repeated on the same subset
    (named ``... @N``) so the comparison stays like for like.
    """
    from tqdm import tqdm

    qs_all = [q for q in questions if q.answerable]
    if rewrite_limit:
        plain = {n: c for n, c in configs.items() if c.get("rewrite", "none") == "none"}
        with_rw = {n: c for n, c in configs.items() if c.get("rewrite", "none") != "none"}
        rows = eval_retrieval(rag, questions, plain, k, progress, verbose=verbose)
        if with_rw:
            sub = [q for q in questions if q.answerable][:rewrite_limit]
            subset = {f"{n} @{len(sub)}": c for n, c in plain.items()} | {f"{n} @{len(sub)}": c for n, c in with_rw.items()}
            rows += eval_retrieval(rag, sub, subset, k, progress, verbose=verbose)
        return rows
    qs = qs_all
    cache: dict = {}
    gold = [gold_chunk_ids(rag.store, q, cache) for q in qs]
    missing = [q.id for q, g in zip(qs, gold) if not g]
    if missing:
        from lmstack.errors import LMStackError

        raise LMStackError(f"rag eval: {len(missing)} questions have no gold chunk in the store "
                           f"(first: {missing[:3]}); was the question set's corpus ingested into it?")
    rows = []
    for name, overrides in configs.items():
        rankings, t0 = [], time.perf_counter()
        it = tqdm(qs, desc=f"retrieve [{name}]", unit="q", disable=not progress, leave=False,
                  mininterval=_interval())
        for q in it:
            rankings.append([h.chunk.id for h in rag.retrieve(q.question, k=k, **overrides)])
        ms = (time.perf_counter() - t0) * 1000 / max(len(qs), 1)
        metrics = {f"hit@{n}": hit_at_k(rankings, gold, n) for n in (1, 3, 5, k)}
        metrics |= {f"mrr@{k}": mrr(rankings, gold, k), f"ndcg@{k}": ndcg_at_k(rankings, gold, k),
                    f"recall@{k}": recall_at_k(rankings, gold, k)}
        rows.append(RetrievalRow(name, overrides, metrics, ms, {q.id: r for q, r in zip(qs, rankings)}))
        if verbose:
            print(f"  {name:<28} " + "  ".join(f"{m} {v:.3f}" for m, v in metrics.items()) + f"  {ms:.0f} ms/q",
                  flush=True)
    return rows


def _interval() -> float:
    """Progress redraws on a terminal; in a log (not a tty) one line every 30 s."""
    import sys

    return 0.1 if sys.stderr.isatty() else 30.0


def overlap_at_k(a: dict[str, list[str]], b: dict[str, list[str]], k: int = 10) -> float:
    """Mean share of the top-k ids two runs have in common, over the questions both ran."""
    common = [q for q in a if q in b]
    if not common:
        return float("nan")
    return sum(len(set(a[q][:k]) & set(b[q][:k])) / max(min(k, len(a[q][:k]), len(b[q][:k])), 1)
               for q in common) / len(common)


# ---- the HTML report ------------------------------------------------------------------------

def _bar_chart(rows: list[RetrievalRow], metric: str) -> str:
    """A horizontal bar chart of one metric per configuration as an inline PNG (empty without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1))
    names = [r.name for r in rows][::-1]
    vals = [r.metrics.get(metric, 0.0) for r in rows][::-1]
    ax.barh(names, vals, color="#4C72B0")
    for y, v in enumerate(vals):
        ax.text(v + 0.005, y, f"{v:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel(metric)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return f'<img alt="{html.escape(metric)} per configuration" src="data:image/png;base64,' \
           f'{base64.b64encode(buf.getvalue()).decode()}">'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return html.escape(str(v))


def markdown_table(rows: list[RetrievalRow]) -> str:
    if not rows:
        return ""
    metrics = list(rows[0].metrics)
    lines = ["| configuration | " + " | ".join(metrics) + " | ms/query |",
             "|---|" + "---|" * (len(metrics) + 1)]
    for r in rows:
        lines.append(f"| {r.name} | " + " | ".join(f"{r.metrics[m]:.3f}" for m in metrics) + f" | {r.ms_per_query:.0f} |")
    return "\n".join(lines)


def write_report(out_dir: str | Path, rows: list[RetrievalRow], answers: Optional[dict[str, Any]] = None,
                 meta: Optional[dict[str, Any]] = None, examples: Optional[list[dict[str, Any]]] = None) -> Path:
    """``report.html`` (tables, a chart, answer examples) and ``report.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta or {}, "retrieval": [{"name": r.name, "config": r.config, "metrics": r.metrics,
                                               "ms_per_query": r.ms_per_query} for r in rows],
            "answers": answers or {}, "examples": examples or []}
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "rankings.json").write_text(json.dumps({r.name: r.rankings for r in rows}))
    parts = ["<!doctype html><meta charset='utf-8'><title>lmstack rag eval</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child"
             "{text-align:left}tr.best td{font-weight:bold}pre{white-space:pre-wrap;background:#f6f6f6;"
             "padding:6px}</style>", "<h1>RAG evaluation</h1>"]
    if meta:
        parts.append("<p>" + " &middot; ".join(f"{html.escape(str(k))}: {_fmt(v)}" for k, v in meta.items()) + "</p>")
    if rows:
        metrics = list(rows[0].metrics)
        best = {m: max(r.metrics[m] for r in rows) for m in metrics}
        parts.append("<h2>Retrieval, answerable questions</h2><table><tr><th>configuration</th>"
                     + "".join(f"<th>{html.escape(m)}</th>" for m in metrics) + "<th>ms/query</th></tr>")
        for r in rows:
            cells = "".join(f"<td>{'<b>' if r.metrics[m] == best[m] else ''}{_fmt(r.metrics[m])}"
                            f"{'</b>' if r.metrics[m] == best[m] else ''}</td>" for m in metrics)
            parts.append(f"<tr><td>{html.escape(r.name)}</td>{cells}<td>{r.ms_per_query:.0f}</td></tr>")
        parts.append("</table>")
        ndcg = next((m for m in metrics if m.startswith("ndcg")), metrics[0])
        parts.append(_bar_chart(rows, ndcg))
    if answers:
        parts.append("<h2>Answers</h2><table>")
        for k, v in answers.items():
            if not isinstance(v, (dict, list)):
                parts.append(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>")
        parts.append("</table>")
    if examples:
        parts.append("<h2>Examples</h2>")
        for ex in examples:
            parts.append(f"<h3>{html.escape(ex.get('id', ''))}: {html.escape(ex.get('question', ''))}</h3>"
                         f"<pre>{html.escape(ex.get('answer', ''))}</pre>"
                         f"<p>reference: {html.escape(ex.get('reference', '') or '(unanswerable)')}; "
                         f"abstained: {ex.get('abstained')}; citations: "
                         + ", ".join(f"[{c['n']}] {'ok' if c.get('supported') else 'unsupported'}"
                                     for c in ex.get("citations", [])) + "</p>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


# ---- answers --------------------------------------------------------------------------------

def eval_answers(rag, questions, overrides: dict[str, Any], judge=None, progress: bool = True,
                 n_answers: Optional[int] = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Retrieval support and abstention for every question, answers for the first ``n_answers``.

    The abstention threshold is fitted (``answer.calibrate_threshold``) on the even positions
    and the "I don't know" rates of the retrieval gate are reported on the odd ones, so the
    figure is not measured on the questions it was fitted to. Generated answers (the first
    ``n_answers`` questions, fit and test alike) add the model's own refusals and the citation
    checks. Returns the summary and one record per answered question.
    """
    import dataclasses

    from tqdm import tqdm

    from lmstack.errors import LMStackError
    from lmstack.rag.answer import SIGNALS, AnswerConfig, answer, calibrate_threshold, retrieval_support

    base_cfg = rag.answer_cfg or AnswerConfig()
    hits_all = [rag.retrieve(q.question, **overrides) for q in
                tqdm(questions, desc="retrieve", unit="q", disable=not progress, leave=False,
                     mininterval=_interval())]
    signal, _ = retrieval_support(questions[0].question, hits_all[0], base_cfg.abstain_signal)
    support = [retrieval_support(q.question, h, signal)[1] for q, h in zip(questions, hits_all)]
    fit = [i for i in range(len(questions)) if i % 2 == 0]
    test = [i for i in range(len(questions)) if i % 2 == 1]
    threshold = calibrate_threshold([support[i] for i in fit if questions[i].answerable],
                                    [support[i] for i in fit if not questions[i].answerable])
    cfg = dataclasses.replace(base_cfg, abstain_signal=signal, abstain_threshold=threshold)
    fitted = {}  # every signal these hits carry, fitted on all questions, for later answers on this store
    for name in SIGNALS:
        try:
            vals = [retrieval_support(q.question, h, name)[1] for q, h in zip(questions, hits_all)]
        except LMStackError:
            continue
        fitted[name] = calibrate_threshold([v for v, q in zip(vals, questions) if q.answerable],
                                           [v for v, q in zip(vals, questions) if not q.answerable])

    def gate(idx, answerable):
        sel = [i for i in idx if questions[i].answerable == answerable]
        return sum(support[i] < threshold for i in sel) / len(sel) if sel else float("nan")

    records = []
    todo = list(zip(questions, hits_all))[:len(questions) if n_answers is None else n_answers]
    for i, (q, hits) in enumerate(tqdm(todo, desc="answer", unit="q", disable=not progress, leave=False,
                                       mininterval=_interval())):
        a = answer(rag.llm, q.question, hits, cfg, embedder=rag.embedder)
        records.append({"id": q.id, "question": q.question, "reference": q.answer, "answerable": q.answerable,
                        "kind": q.kind, "answer": a.text, "abstained": a.abstained, "support": support[i],
                        "citations": [c.to_json() for c in a.citations], "contexts": a.contexts,
                        "unsupported": a.unsupported, "split": "fit" if i in fit else "test"})
    summary: dict[str, Any] = {
        "configuration": overrides, "questions": len(questions), "abstain_signal": signal,
        "abstain_threshold (fitted on even positions)": threshold,
        "IDK rate, unanswerable (retrieval gate, odd positions)": gate(test, False),
        "IDK rate, answerable (retrieval gate, odd positions)": gate(test, True),
        "IDK rate, unanswerable (retrieval gate, all)": gate(range(len(questions)), False),
        "IDK rate, answerable (retrieval gate, all)": gate(range(len(questions)), True),
        "answered": len(records),
        "fitted_thresholds": fitted,
    }
    if not records:
        return summary, records

    def rate(rows, answerable):
        sel = [r for r in rows if r["answerable"] == answerable]
        return (sum(r["abstained"] for r in sel) / len(sel)) if sel else float("nan")

    cites = [c for r in records for c in r["citations"]]
    model_cites = [c for c in cites if c.get("origin") == "model"]
    summary |= {
        "IDK rate, unanswerable (answered questions, gate + model)": rate(records, False),
        "IDK rate, answerable (answered questions, gate + model)": rate(records, True),
        "citations": len(cites),
        "citation precision (all citations)": (sum(bool(c.get("supported")) for c in cites) / len(cites))
        if cites else float("nan"),
        "citations written by the model": len(model_cites),
        "citation precision (written by the model)": (sum(bool(c.get("supported")) for c in model_cites)
                                                      / len(model_cites)) if model_cites else float("nan"),
    }
    if judge is not None:
        from lmstack.eval import rag_metrics as rm

        answered = [r for r in records if r["answerable"] and not r["abstained"] and r["contexts"]]
        if answered:
            ctx = [r["contexts"] for r in answered]
            ans = [r["answer"] for r in answered]
            refs = [r["reference"] for r in answered]
            qs = [r["question"] for r in answered]

            def mean(scores):
                vals = [s.value for s in scores if s.value is not None]
                return sum(vals) / len(vals) if vals else float("nan")

            summary["faithfulness"] = mean(rm.faithfulness_scores(judge, ans, ctx, mode="likelihood"))
            summary["context_precision"] = mean(rm.context_precision_scores(judge, qs, refs, ctx, mode="likelihood"))
            summary["context_recall"] = mean(rm.context_recall_scores(judge, refs, ctx, mode="likelihood"))
            summary["answer_relevance"] = mean(rm.answer_relevance_scores(
                judge, qs, ans, embed=lambda t: rag.embedder.embed(list(t)), n=1))
            summary["judged_answers"] = len(answered)
    return summary, records


def run_eval(a) -> int:
    """The body of ``lmstack rag eval`` (arguments as parsed by ``lmstack.cli.rag``)."""
    import platform

    from lmstack.errors import ConfigError
    from lmstack.rag.datasets.build_questions import load_questions
    from lmstack.rag.pipeline import RAG

    progress = not a.json
    questions = load_questions(a.questions)
    if a.limit:
        questions = questions[:a.limit]
    rag = RAG.open(a.store, embedder=a.embedder, create=False,
                   model=None if a.model in (None, "default") else a.model)
    try:
        has_reranker = rag.reranker_available("cross-encoder")
        configs = standard_configs(rerank=has_reranker, rewrites=() if a.no_rewrite else REWRITES)
        if a.configs:
            unknown = [c for c in a.configs if c not in standard_configs(True)]
            if unknown:
                raise ConfigError(f"rag eval: unknown configuration(s) {unknown}; expected some of "
                                  f"{list(standard_configs(True))}")
            configs = {c: standard_configs(True)[c] for c in a.configs}
        if not has_reranker:
            print("rag eval: no trained cross-encoder in the store (run `lmstack rag train-reranker --store ...`); "
                  "the cross-encoder rows are left out", flush=True)
        rows = eval_retrieval(rag, questions, configs, progress=progress, rewrite_limit=a.rewrite_limit,
                              verbose=not a.json)
        answers, examples = {}, []
        if a.answers is not None:
            grid = standard_configs(True)
            if a.answer_config not in grid:
                raise ConfigError(f"rag eval: --answer-config {a.answer_config!r}; expected one of {list(grid)}")
            judge = None
            if a.answers:
                from lmstack.eval.models import LLMModel

                judge = LLMModel(rag.llm)
            answers, examples = eval_answers(rag, questions, grid[a.answer_config], judge=judge,
                                             progress=progress, n_answers=a.answers)
            if not a.limit:  # thresholds fitted on the whole set answer later questions on this store
                rag.store.set_meta("abstain_thresholds", json.dumps(answers["fitted_thresholds"]))
        stats = rag.info()
        meta = {"store": str(a.store), "chunks": stats.get("chunks"), "embedder": stats.get("embedder"),
                "questions": len(questions), "answerable": sum(q.answerable for q in questions),
                "machine": platform.processor() or platform.machine()}
        path = write_report(a.out, rows, answers, meta, examples)
    finally:
        rag.close()
    if a.json:
        print(json.dumps({"retrieval": [{"name": r.name, **r.metrics, "ms_per_query": r.ms_per_query}
                                        for r in rows], "answers": answers}, indent=1, default=str))
    else:
        print(markdown_table(rows))
        for k, v in answers.items():
            if not isinstance(v, (dict, list)):
                print(f"{k}: {_fmt(v)}")
        print(f"report: {path}")
    return 0
