"""``lmstack serve --rag``: the search route and retrieval-augmented chat over the fake engine and
a hashing-embedder store (no model weights)."""

import json

import pytest

pytest.importorskip("fastapi")

from lmstack.rag.answer import AnswerConfig  # noqa: E402
from lmstack.rag.pipeline import RAG  # noqa: E402
from lmstack.rag.server import mount  # noqa: E402
from lmstack.serve.config import ServeConfig  # noqa: E402
from lmstack.serve.server import ServerThread, build_backend  # noqa: E402
from test_serve import request  # noqa: E402

DOCS = {"violin.txt": "The violin is a wooden string instrument with four strings, played with a bow.",
        "harbour.txt": "Rotterdam has the largest seaport in Europe. Ships dock in its harbour."}


@pytest.fixture
def server(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    for n, t in DOCS.items():
        (src / n).write_text(t)
    rag = RAG.open(tmp_path / "store", embedder="hash:64")
    rag.ingest([str(src)])
    started = []

    def make(answer_cfg=None):
        cfg = ServeConfig(model="fake:2", max_seq_len=2048)
        s = ServerThread(build_backend(cfg), cfg, extend=lambda app: mount(app, rag, answer_cfg)).__enter__()
        started.append(s)
        return s
    yield make
    for s in started:
        s.stop()
        s.backend.engine.shutdown()
    rag.close()


def test_search_route(server):
    s = server()
    status, _, body = request(s.url, "POST", "/v1/rag/search", {"query": "largest seaport", "k": 1})
    assert status == 200 and body["object"] == "list" and len(body["data"]) == 1
    hit = body["data"][0]
    assert hit["source"].endswith("harbour.txt") and DOCS["harbour.txt"][hit["start"]:hit["end"]] == hit["text"]
    status, _, body = request(s.url, "POST", "/v1/rag/search", {"query": "x", "where": {"a": {"$bad": 1}}})
    assert status == 400 and "unknown operator" in body["error"]["message"]
    status, _, body = request(s.url, "POST", "/v1/rag/search", {"query": "", "k": 1})
    assert status == 400
    status, _, body = request(s.url, "POST", "/v1/rag/search", {"query": "x", "k": 0})
    assert status == 400


def test_chat_adds_numbered_sources(server):
    s = server(AnswerConfig(abstain=False))
    msgs = [{"role": "user", "content": "Which instrument is played with a bow?"}]
    status, _, body = request(s.url, "POST", "/v1/rag/chat/completions",
                              {"messages": msgs, "max_tokens": 8, "rag": {"k": 2}})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    src = body["rag"]["sources"]
    assert [x["n"] for x in src] == [1, 2] and src[0]["source"].endswith("violin.txt")
    assert body["rag"]["abstained"] is False and isinstance(body["rag"]["citations"], list)
    status, _, text = request(s.url, "POST", "/v1/rag/chat/completions",
                              {"messages": msgs, "max_tokens": 4, "stream": True})
    events = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
    assert status == 200 and events[0]["choices"] == [] and events[0]["rag"]["sources"]
    assert text.rstrip().endswith("data: [DONE]")


def test_chat_abstains_without_generating(server):
    s = server(AnswerConfig(abstain_signal="dense", abstain_threshold=2.0))  # cosine never reaches 2
    status, _, body = request(s.url, "POST", "/v1/rag/chat/completions",
                              {"messages": [{"role": "user", "content": "What is the capital of Peru?"}]})
    assert status == 200 and body["choices"][0]["message"]["content"] == "I don't know."
    assert body["rag"]["abstained"] and body["usage"]["completion_tokens"] == 0
    status, _, body = request(s.url, "POST", "/v1/rag/chat/completions",
                              {"messages": [{"role": "system", "content": "hi"}]})
    assert status == 400 and "user message" in body["error"]["message"]
