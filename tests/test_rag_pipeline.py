"""The RAG pipeline end to end with the torch-free hashing embedder and a scripted LLM: ingest,
retrieval modes and fusion, filters, MMR, answers with citations, the CLI verbs."""

import json

import numpy as np
import pytest

from lmstack.errors import ConfigError
from lmstack.rag.pipeline import RAG
from lmstack.rag.search import mmr_order, rrf
from lmstack.rag.types import Hit

DOCS = {
    "volcano.md": "# Volcanoes\n\nA volcano is a rupture in the crust of a planet. Lava and ash escape "
                  "from a magma chamber below the surface.\n\n## Eruptions\n\nThe 1815 eruption of Mount Tambora "
                  "was the largest in recorded history.\n",
    "violin.txt": "The violin is a wooden string instrument. It usually has four strings tuned in perfect "
                  "fifths and is played with a bow.",
    "harbour.md": "# Harbours\n\nA harbour is a sheltered body of water where ships and boats can be docked. "
                  "Rotterdam has the largest seaport in Europe.",
}


class FakeTokenizer:
    def encode(self, text, add_special_tokens=False):
        return text.split()


class FakeLLM:
    """Answers with a fixed text, citing source 1; records the prompts it saw."""

    def __init__(self, text="A volcano is a rupture in the crust of a planet [1]."):
        self.text = text
        self.calls = []
        self.tokenizer = FakeTokenizer()

    def chat_ids(self, messages, tools=None):
        return sum((m["content"].split() for m in messages), [])

    def chat_stream(self, messages, max_new_tokens=256, temperature=0.0, **kw):
        self.calls.append(messages)
        for w in self.text.split(" "):
            yield w + " "


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    for name, text in DOCS.items():
        (src / name).write_text(text)
    return src


@pytest.fixture
def rag(tmp_path, corpus):
    r = RAG.open(tmp_path / "store", embedder="hash:64", llm=FakeLLM())
    r.ingest([str(corpus)])
    yield r
    r.close()


def test_rrf_and_mmr_definitions():
    fused = dict(rrf([["a", "b", "c"], ["b", "a"]], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62) and fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["c"] == pytest.approx(1 / 63)
    v = np.array([[1, 0, 0], [0.99, 0.141, 0], [0, 1, 0]], dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q = np.array([1, 0.2, 0], dtype=np.float32)
    # relevance only picks the two near-duplicates first; a diversity weight picks the third
    assert [i for i, _ in mmr_order(q, v, 2, 1.0)] == [1, 0]
    assert [i for i, _ in mmr_order(q, v, 2, 0.3)] == [1, 2]


def test_retrieve_modes(rag):
    for mode in ("dense", "lexical", "hybrid"):
        hits = rag.retrieve("Which instrument is played with a bow?", k=2, mode=mode)
        assert hits and hits[0].chunk.meta["path"].endswith("violin.txt"), mode
        assert all(isinstance(h, Hit) for h in hits)
    hybrid = rag.retrieve("largest seaport in Europe", k=3, mode="hybrid")
    assert "rrf" in hybrid[0].scores and ("dense" in hybrid[0].scores or "lexical" in hybrid[0].scores)
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)


def test_spans_point_into_the_source(rag, corpus):
    for h in rag.retrieve("Tambora eruption", k=5):
        text = (corpus / h.chunk.meta["path"].split("/")[-1]).read_text()
        assert text[h.chunk.start:h.chunk.end] == h.chunk.text


def test_filters_restrict_results(rag):
    hits = rag.retrieve("largest", k=5, where={"kind": "text"})
    assert hits and all(h.chunk.meta["path"].endswith(".txt") for h in hits)
    with pytest.raises(ConfigError, match="unknown operator"):
        rag.retrieve("largest", where={"kind": {"$regex": "x"}})
    with pytest.raises(ConfigError, match="unknown option"):
        rag.retrieve("largest", depth=3)
    with pytest.raises(ConfigError, match="empty"):
        rag.retrieve("  ")


def test_ask_cites_a_chunk_span(rag):
    ans = rag.ask("What is a volcano?", k=3)
    j = ans.to_json()
    assert list(j)[:3] == ["answer", "citations", "contexts"]
    assert j["citations"] and j["citations"][0]["n"] == 1
    c = j["citations"][0]
    chunk = rag.store.get_chunks([c["chunk_id"]])[0]
    assert chunk.start <= c["start"] < c["end"] <= chunk.end
    assert "[1]" in rag._llm.calls[-1][-1]["content"]  # the sources were numbered in the prompt


def test_reopen_uses_the_recorded_embedder(tmp_path, rag):
    rag.close()
    again = RAG.open(tmp_path / "store")
    assert again.embedder.name == rag.embedder.name
    again.close()
    with pytest.raises(ConfigError, match="was built with"):
        RAG.open(tmp_path / "store", embedder="hash:32")


def test_cli_ingest_search_info(tmp_path, corpus, capsys):
    from lmstack.cli.main import main

    store = str(tmp_path / "cli-store")
    assert main(["rag", "ingest", "--store", store, "--embedder", "hash:64", "--json", str(corpus)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["added"] == 3 and rep["store"]["documents"] == 3
    assert main(["rag", "ingest", "--store", store, "--json", str(corpus)]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 3  # unchanged: nothing re-embedded
    assert main(["rag", "search", "--store", store, "--json", "--k", "1", "bow strings"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["source"].endswith("violin.txt") and {"chunk_id", "start", "end"} <= set(hits[0])
    assert main(["rag", "info", "--store", store, "--check", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["stats"]["chunks"] >= 3 and not any(info["check"].values())
    assert main(["rag", "info", "--store", str(tmp_path / "nothing")]) == 2
    assert "no store.sqlite" in capsys.readouterr().err


def test_sentence_reranker_scores_the_best_window():
    from lmstack.rag.embed import get_embedder
    from lmstack.rag.rerank import get_reranker
    from lmstack.rag.types import ChunkRecord

    emb = get_embedder("hash:256")
    rr = get_reranker("sentence:1", embedder=emb)
    texts = ["Cats sleep a lot. The violin has four strings. Dogs bark.", "Rivers flow to the sea. Boats float."]
    hits = [Hit(ChunkRecord(f"c{i}", "d", i, t, 0, len(t)), 0.0) for i, t in enumerate(texts)]
    out = rr.rerank("How many strings does the violin have?", hits[::-1], 2)
    assert [h.chunk.id for h in out] == ["c0", "c1"]
    q = emb.embed_query("How many strings does the violin have?")
    best = max(float(emb.embed([s])[0] @ q) for s in ["Cats sleep a lot.", "The violin has four strings.", "Dogs bark."])
    assert out[0].scores["rerank"] == pytest.approx(best, abs=1e-6)  # the max over single sentences
    with pytest.raises(ConfigError, match="window"):
        get_reranker("sentence:0", embedder=emb)
    with pytest.raises(ConfigError, match="embedder"):
        get_reranker("sentence")
