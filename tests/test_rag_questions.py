"""The RAG question set over the offline Wikipedia sample: the shipped build matches its
hand-written source, every gold span holds its quote, the counts and kinds the evaluator relies
on, the builder's errors, and the span-overlap relevance rule."""

import json
import re

import pytest

from lmstack.data.readers import wikipedia_dump_path
from lmstack.errors import LMStackError
from lmstack.rag.datasets import build_questions as bq
from lmstack.rag.datasets.build_questions import GoldSpan, is_relevant, load_questions


def needs_wiki(test):
    """An ``assets`` test that reads gensim's Wikipedia sample (skips locally when absent)."""
    absent = pytest.mark.skipif(wikipedia_dump_path() is None,
                                reason="gensim (ships the Wikipedia sample) not installed: pip install gensim")
    return pytest.mark.assets(absent(test))


@pytest.fixture(scope="module")
def corpus():
    return bq.read_corpus()


def _source_rows():
    return [json.loads(line) for line in bq.SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]


@needs_wiki
def test_built_file_matches_a_rebuild_of_the_source(tmp_path, corpus):
    out = tmp_path / "wiki-questions.jsonl"
    rows = bq.build(bq.SOURCE, out, corpus=corpus)
    assert out.read_bytes() == bq.BUILT.read_bytes()
    assert len(rows) == len(_source_rows())


@needs_wiki
def test_every_gold_span_holds_its_quote(corpus):
    built = {q.id: q for q in load_questions()}
    n = 0
    for row in _source_rows():
        q = built[row["id"]]
        assert len(q.gold) == len(row["gold"])
        for g, src in zip(q.gold, row["gold"]):
            doc_id, text = corpus[g.title]
            assert g.doc_id == doc_id
            assert bq._norm(text[g.start:g.end]) == bq._norm(src["quote"])
            assert not text[g.start].isspace() and not text[g.end - 1].isspace()
            n += 1
    assert n >= 180


def test_counts_kinds_and_ids():
    qs = load_questions()
    answerable = [q for q in qs if q.answerable]
    unanswerable = [q for q in qs if not q.answerable]
    assert len(answerable) >= 150 and len(unanswerable) >= 30
    assert len({g.doc_id for q in answerable for g in q.gold}) >= 60
    assert len({q.id for q in qs}) == len(qs)
    assert len({q.question.lower() for q in qs}) == len(qs)
    kinds = {k: sum(q.kind == k for q in qs) for k in bq.KINDS}
    assert kinds["paraphrase"] * 3 >= len(answerable) and kinds["multi"] >= 10
    for q in qs:
        assert q.kind in bq.KINDS
        assert q.answerable == (q.kind != "unanswerable") == bool(q.answer) == bool(q.gold)
        assert (len(q.gold) >= 2) == (q.kind == "multi")
        assert all(0 <= g.start < g.end and g.doc_id.startswith("wiki:") for g in q.gold)


def test_unanswerable_questions_are_spread_through_the_file():
    qs = load_questions()
    share = sum(not q.answerable for q in qs) / len(qs)
    for n in (40, 80, 160):
        assert abs(sum(not q.answerable for q in qs[:n]) / n - share) < 0.05


def test_source_and_built_agree_on_everything_but_spans():
    built = [json.loads(line) for line in bq.BUILT.read_text(encoding="utf-8").splitlines()]
    for src, out in zip(_source_rows(), built, strict=True):
        assert {k: src[k] for k in ("id", "question", "answer", "kind")} == \
               {k: out[k] for k in ("id", "question", "answer", "kind")}
        assert [g["title"] for g in src["gold"]] == [g["title"] for g in out["gold"]]


TOY = {"Toy": ("wiki:1", "Toy is a word.\nIt has two\n  lines. It has two lines."),
       "Other": ("wiki:2", "Another article about nothing in particular.")}


def _write(tmp_path, rows):
    p = tmp_path / "src.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return p


def _row(**kw):
    row = {"id": "q1", "question": "What is Toy?", "answer": "a word",
           "gold": [{"title": "Toy", "quote": "Toy is a word."}], "kind": "factoid"}
    row.update(kw)
    return row


def test_build_resolves_a_quote_across_line_breaks(tmp_path):
    rows = bq.build(_write(tmp_path, [_row(gold=[{"title": "Toy", "quote": "a word. It has"}])]),
                    tmp_path / "out.jsonl", corpus=TOY)
    g = rows[0]["gold"][0]
    assert TOY["Toy"][1][g["start"]:g["end"]] == "a word.\nIt has"
    assert g["doc_id"] == "wiki:1"


@pytest.mark.parametrize("rows, message", [
    ([_row(), _row(question="Again?")], "src.jsonl:2: id 'q1' already used on line 1"),
    ([_row(), _row(id="q2")], "src.jsonl:2: the same question is already on line 1"),
    ([_row(gold=[{"title": "Toys", "quote": "Toy is a word."}])], "no article titled 'Toys'"),
    ([_row(gold=[{"title": "Toy", "quote": "Toy is a noun."}])], "src.jsonl:1: gold[0]: quote not found in 'Toy'"),
    ([_row(gold=[{"title": "Toy", "quote": "It has two lines."}])], "occurs 2 times in 'Toy'"),
    ([_row(kind="trivia")], "'kind' is 'trivia', expected one of"),
    ([_row(kind="unanswerable")], "an unanswerable question needs answer \"\" and gold []"),
    ([_row(kind="multi")], "a 'multi' question needs two or more gold quotes"),
    ([_row(answer="")], "'answer' is '', expected a non-empty string"),
    ([_row(extra=1)], "unknown field(s) ['extra']"),
    ([_row(gold=[{"title": "Toy"}])], "'gold' is"),
    (["{not json"], "src.jsonl:1: not valid JSON"),
])
def test_build_rejects_bad_lines_and_writes_nothing(tmp_path, rows, message):
    out = tmp_path / "out.jsonl"
    with pytest.raises(LMStackError) as e:
        bq.build(_write(tmp_path, rows), out, corpus=TOY)
    assert message in str(e.value)
    assert not out.exists()


def test_load_questions_errors_name_the_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "q1", "question": "x", "answer": "", "kind": "unanswerable", "gold": []}\n{"id": "q2"}\n')
    with pytest.raises(LMStackError, match=r"bad.jsonl:2: not a built question"):
        load_questions(p)
    with pytest.raises(LMStackError, match="not found"):
        load_questions("builtin:no-such-set")


def test_is_relevant_on_constructed_spans():
    g = GoldSpan(title="Toy", doc_id="wiki:1", start=100, end=200)
    assert is_relevant("wiki:1", 0, 1000, g)          # contains the span
    assert is_relevant("Toy", 100, 200, g)            # exactly the span, named by title
    assert is_relevant("wiki:1", 150, 400, g)         # covers exactly half
    assert is_relevant("wiki:1", 0, 150, g)
    assert not is_relevant("wiki:1", 151, 400, g)     # just under half
    assert not is_relevant("wiki:1", 120, 160, g)     # inside, but 40% of it
    assert not is_relevant("wiki:1", 0, 100, g)       # touches the start only
    assert not is_relevant("wiki:2", 0, 1000, g)      # another document
    assert not is_relevant("Other", 0, 1000, g)
    h = GoldSpan(title="Other", doc_id="wiki:2", start=0, end=10)
    assert is_relevant("wiki:2", 0, 5, [g, h]) and not is_relevant("wiki:3", 0, 5, [g, h])
    assert not is_relevant("wiki:1", 0, 1000, [])     # an unanswerable question has no relevant chunk


def test_readme_table_matches_the_built_set():
    readme = (bq.HERE / "README.md").read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| (\w+) \| (\d+) \|", readme, re.MULTILINE))
    qs = load_questions()
    assert {k: int(v) for k, v in table.items()} == {k: sum(q.kind == k for q in qs) for k in bq.KINDS}


def test_loading_the_set_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from lmstack.rag.datasets.build_questions import load_questions; "
            "load_questions(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
