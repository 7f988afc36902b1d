"""The RAG question set over the offline Wikipedia sample: check the hand-written source, resolve
each gold quote to a character span, and load the built set.

``wiki_questions_src.jsonl`` is written by hand, one question per line::

    {"id": "q001", "question": "...", "answer": "short reference answer",
     "gold": [{"title": "Article title", "quote": "verbatim text from the article"}],
     "kind": "factoid|paraphrase|multi|unanswerable"}

``python -m lmstack.rag.datasets.build_questions`` reads it with the 106 articles of gensim's
Wikipedia sample (``SourceConfig(kind="wikipedia")``), checks every line and writes
``wiki-questions.jsonl``, where each quote becomes ``{"title", "doc_id", "start", "end"}``: the
span ``[start, end)`` of the quote in the document text the reader yields. Quotes are matched
after collapsing runs of whitespace (the reader keeps line breaks that a copied quote may not),
and a quote must occur exactly once in its article, so a span is never a guess.

Gold is a character span, not a chunk id, so the same set grades any chunker:
``is_relevant`` calls a retrieved chunk relevant when it comes from the gold document and covers
at least half of the gold span (a chunk that contains the whole span covers all of it). This is
the span-overlap reading of relevance used by passage-level QA sets such as Natural Questions'
long answers (Kwiatkowski et al. 2019), relaxed to half so a quote cut by a chunk boundary still
counts once.

Deliberately left out: graded relevance (a question either has gold spans or is unanswerable),
answer aliases (``answer`` is one short reference for a judge, not an exact-match key), and any
question over text outside the sample. Building needs gensim's test data; loading does not.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.errors import LMStackError

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "wiki_questions_src.jsonl"
BUILT = HERE / "wiki-questions.jsonl"
KINDS = ("factoid", "paraphrase", "multi", "unanswerable")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class GoldSpan:
    """Where an answer lies: ``[start, end)`` in the text of document ``doc_id`` (titled ``title``)."""

    title: str
    doc_id: str
    start: int
    end: int


@dataclass
class Question:
    id: str
    question: str
    answer: str  # "" when unanswerable
    gold: list[GoldSpan]
    kind: str
    answerable: bool


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def read_corpus() -> dict[str, tuple[str, str]]:
    """``{title: (doc_id, text)}`` of the offline Wikipedia sample, as the reader yields it."""
    from lmstack.data.readers import SourceConfig, read_source, wikipedia_dump_path

    if wikipedia_dump_path() is None:
        raise LMStackError("wiki questions: the Wikipedia sample ships with gensim's test data, "
                           "which is not installed (pip install gensim)")
    return {d.meta["title"]: (d.id, d.text) for d in read_source(SourceConfig(name="wiki", kind="wikipedia"))}


def _fail(where: str, msg: str) -> LMStackError:
    return LMStackError(f"{where}: {msg}")


def _string(row: dict, key: str, where: str, empty_ok: bool = False) -> str:
    v = row.get(key)
    if not isinstance(v, str) or (not empty_ok and not v.strip()):
        raise _fail(where, f"'{key}' is {v!r}, expected a non-empty string" if not empty_ok
                    else f"'{key}' is {v!r}, expected a string")
    return v


def resolve_quote(title: str, quote: str, corpus: Mapping[str, tuple[str, str]], where: str) -> GoldSpan:
    """The span of ``quote`` in article ``title``; an error unless it occurs there exactly once."""
    if title not in corpus:
        close = sorted(t for t in corpus if t.lower().startswith(title[:3].lower()))[:8]
        raise _fail(where, f"no article titled {title!r} in the Wikipedia sample (titles starting "
                           f"alike: {close})")
    doc_id, text = corpus[title]
    q = _norm(quote)
    if len(q) < 12:
        raise _fail(where, f"quote {quote!r} is too short to locate (expected a sentence or more)")
    # The quote's words in order, any run of whitespace between them: a span of the original text.
    found = list(re.finditer(r"\s+".join(map(re.escape, q.split(" "))), text))
    if not found:
        raise _fail(where, f"quote not found in {title!r} (after collapsing whitespace): {q[:80]!r}")
    if len(found) > 1:
        raise _fail(where, f"quote occurs {len(found)} times in {title!r}; quote more of the sentence: {q[:80]!r}")
    return GoldSpan(title=title, doc_id=doc_id, start=found[0].start(), end=found[0].end())


def check_row(row: Any, where: str, corpus: Mapping[str, tuple[str, str]]) -> dict:
    """One source line checked and resolved to its built form."""
    if not isinstance(row, dict):
        raise _fail(where, f"got a JSON {type(row).__name__}, expected an object")
    extra = sorted(set(row) - {"id", "question", "answer", "gold", "kind"})
    if extra:
        raise _fail(where, f"unknown field(s) {extra}; expected id, question, answer, gold, kind")
    qid = _string(row, "id", where)
    question = _string(row, "question", where)
    kind = row.get("kind")
    if kind not in KINDS:
        raise _fail(where, f"'kind' is {kind!r}, expected one of {list(KINDS)}")
    answer = _string(row, "answer", where, empty_ok=kind == "unanswerable")
    gold = row.get("gold")
    if not isinstance(gold, list) or not all(
            isinstance(g, dict) and set(g) == {"title", "quote"}
            and isinstance(g["title"], str) and isinstance(g["quote"], str) for g in gold):
        raise _fail(where, f"'gold' is {gold!r}, expected a list of {{\"title\": str, \"quote\": str}}")
    if kind == "unanswerable" and (answer or gold):
        raise _fail(where, "an unanswerable question needs answer \"\" and gold []")
    if kind == "multi" and len(gold) < 2:
        raise _fail(where, f"a 'multi' question needs two or more gold quotes, got {len(gold)}")
    if kind in ("factoid", "paraphrase") and len(gold) != 1:
        raise _fail(where, f"a {kind!r} question needs exactly one gold quote, got {len(gold)}")
    spans = [resolve_quote(g["title"], g["quote"], corpus, f"{where}: gold[{i}]") for i, g in enumerate(gold)]
    return {"id": qid, "question": question, "answer": answer, "kind": kind,
            "gold": [{"title": s.title, "doc_id": s.doc_id, "start": s.start, "end": s.end} for s in spans]}


def build(source: str | Path = SOURCE, out: str | Path | None = BUILT,
          corpus: Mapping[str, tuple[str, str]] | None = None) -> list[dict]:
    """Check every line of ``source`` and write the resolved set to ``out`` (all or nothing)."""
    source = Path(source)
    if not source.is_file():
        raise LMStackError(f"wiki questions: {source} not found")
    corpus = read_corpus() if corpus is None else corpus
    rows, ids, questions = [], {}, {}
    for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source.name}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(where, f"not valid JSON ({e.msg}: column {e.colno})") from None
        row = check_row(obj, where, corpus)
        if row["id"] in ids:
            raise _fail(where, f"id {row['id']!r} already used on line {ids[row['id']]}")
        key = _norm(row["question"]).lower()
        if key in questions:
            raise _fail(where, f"the same question is already on line {questions[key]}")
        ids[row["id"]], questions[key] = n, n
        rows.append(row)
    if not rows:
        raise LMStackError(f"wiki questions: {source} holds no questions")
    if out is not None:
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out)
    return rows


def load_questions(path: str | Path = "builtin:wiki-questions") -> list[Question]:
    """The built question set (``builtin:wiki-questions``) or a file of the same form."""
    p = HERE / f"{str(path)[len('builtin:'):]}.jsonl" if str(path).startswith("builtin:") else Path(path)
    if not p.is_file():
        raise LMStackError(f"wiki questions: {p} not found (expected the built JSONL; run "
                           "python -m lmstack.rag.datasets.build_questions)")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            gold = [GoldSpan(title=g["title"], doc_id=g["doc_id"], start=int(g["start"]), end=int(g["end"]))
                    for g in r["gold"]]
            out.append(Question(id=r["id"], question=r["question"], answer=r["answer"], gold=gold,
                                kind=r["kind"], answerable=bool(gold)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise LMStackError(f"{p.name}:{n}: not a built question ({type(e).__name__}: {e}); "
                               "expected id, question, answer, kind and gold spans") from None
    return out


def is_relevant(doc: str, start: int, end: int, gold: GoldSpan | Iterable[GoldSpan]) -> bool:
    """Whether the chunk ``[start, end)`` of document ``doc`` (its id or its title) is relevant
    to ``gold`` (one span, or several: relevant to any): same document, and it covers at least
    half of the gold span."""
    spans = [gold] if isinstance(gold, GoldSpan) else list(gold)
    for g in spans:
        if doc not in (g.doc_id, g.title):
            continue
        overlap = min(end, g.end) - max(start, g.start)
        if overlap > 0 and 2 * overlap >= g.end - g.start:
            return True
    return False


def main() -> int:
    """Rebuild ``wiki-questions.jsonl`` from the source; exit status 2 with the reason on a bad line."""
    try:
        rows = build()
    except LMStackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {k: sum(r["kind"] == k for r in rows) for k in KINDS}
    n_docs = len({g["doc_id"] for r in rows for g in r["gold"]})
    print(f"wrote {BUILT.name}: {len(rows)} questions ({counts}) over {n_docs} articles")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
