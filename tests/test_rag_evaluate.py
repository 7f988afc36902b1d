"""``lmstack rag eval`` pieces on a small corpus with the hashing embedder and a scripted LLM:
span gold turned into chunk ids, the retrieval grid, abstention fitted on one half, the report."""

import json

import pytest

from lmstack.rag.datasets.build_questions import GoldSpan, Question
from lmstack.rag.evaluate import (eval_answers, eval_retrieval, gold_chunk_ids, markdown_table, overlap_at_k,
                                  standard_configs, write_report)
from lmstack.rag.pipeline import RAG
from test_rag_pipeline import DOCS, FakeLLM


@pytest.fixture
def setup(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    for name, text in DOCS.items():
        (src / name).write_text(text)
    rag = RAG.open(tmp_path / "store", embedder="hash:64", llm=FakeLLM("Rotterdam [1]."))
    rag.ingest([str(src)])
    key = {k.rpartition("/")[2]: k for k in rag.store.documents()}

    def q(i, text, doc, quote):
        body = DOCS[doc]
        s = body.index(quote)
        return Question(f"q{i}", text, quote, [GoldSpan(doc, key[doc], s, s + len(quote))], "factoid", True)
    qs = [q(1, "Which instrument is played with a bow?", "violin.txt", "played with a bow"),
          q(2, "Where is the largest seaport in Europe?", "harbour.md", "Rotterdam has the largest seaport"),
          q(3, "What was the largest eruption in recorded history?", "volcano.md", "1815 eruption of Mount Tambora"),
          Question("q4", "Who painted the Mona Lisa?", "", [], "unanswerable", False),
          Question("q5", "What is the boiling point of mercury?", "", [], "unanswerable", False)]
    yield rag, qs
    rag.close()


def test_gold_spans_become_chunk_ids(setup):
    rag, qs = setup
    for q in qs[:3]:
        ids = gold_chunk_ids(rag.store, q)
        assert ids
        g = q.gold[0]
        for c in rag.store.get_chunks(sorted(ids)):
            assert c.doc_key == g.doc_id and c.start < g.end and c.end > g.start
    assert gold_chunk_ids(rag.store, qs[3]) == set()


def test_retrieval_grid_and_report(setup, tmp_path):
    rag, qs = setup
    configs = {k: v for k, v in standard_configs(rerank=False, rewrites=()).items() if k != "hybrid+rerank"}
    assert list(configs) == ["dense", "bm25", "hybrid"]
    rows = eval_retrieval(rag, qs, configs, k=3, progress=False, verbose=False)
    assert [r.name for r in rows] == ["dense", "bm25", "hybrid"]
    for r in rows:
        assert set(r.rankings) == {"q1", "q2", "q3"}  # unanswerable questions are not graded
        assert 0 <= r.metrics["ndcg@3"] <= 1 and r.metrics["hit@3"] >= r.metrics["hit@1"]
    assert rows[1].metrics["hit@1"] == 1.0  # BM25 finds each quote's chunk first on this corpus
    assert overlap_at_k(rows[0].rankings, rows[0].rankings, 3) == 1.0
    assert "| bm25 |" in markdown_table(rows)
    path = write_report(tmp_path / "rep", rows, {"x": 0.5}, {"store": "s"})
    assert "<table>" in path.read_text() and json.loads((tmp_path / "rep" / "report.json").read_text())["retrieval"]


def test_abstention_is_fitted_on_half_and_answers_are_scored(setup):
    rag, qs = setup
    summary, records = eval_answers(rag, qs, {"mode": "dense"}, progress=False, n_answers=3)
    assert summary["abstain_signal"] == "dense" and summary["questions"] == 5 and len(records) == 3
    assert 0 <= summary["IDK rate, unanswerable (retrieval gate, all)"] <= 1
    assert [r["split"] for r in records] == ["fit", "test", "fit"]
    assert all(r["abstained"] == (r["support"] < summary["abstain_threshold (fitted on even positions)"])
               for r in records)


def test_fitted_thresholds_are_used_by_later_answers(setup):
    import json

    rag, qs = setup
    summary, _ = eval_answers(rag, qs, {"mode": "hybrid"}, progress=False, n_answers=0)
    fitted = summary["fitted_thresholds"]
    assert {"dense", "overlap"} <= set(fitted) and "rerank" not in fitted  # no reranker: no rerank score
    rag.store.set_meta("abstain_thresholds", json.dumps({"dense": 5.0}))  # a cosine never reaches 5
    assert rag.answer_config().fitted_thresholds == {"dense": 5.0}
    ans = rag.ask("Which instrument is played with a bow?", mode="dense")
    assert ans.abstained and "5.000" in ans.reason
