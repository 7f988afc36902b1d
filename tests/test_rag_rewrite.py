"""Query rewriters: the original query always comes first, messy small-model replies parse into
clean distinct queries under the cap, the model is asked greedily with a short budget, and the
default model's real replies keep those invariants."""

import pytest

from lmstack.errors import ConfigError
from lmstack.rag.rewrite import (
    HYDE_PROMPT,
    MULTI_QUERY_PROMPT,
    REWRITERS,
    STEP_BACK_PROMPT,
    clean_line,
    first_block,
    get_rewriter,
    parse_queries,
)


class FakeLLM:
    """Answers every chat and completion with a scripted reply and records how it was asked."""

    def __init__(self, reply):
        self.reply = reply
        self.calls = []

    def chat(self, messages, max_new_tokens=256, temperature=0.0, **kw):
        self.calls.append(("chat", messages[0]["content"], max_new_tokens, temperature))
        assert messages == [{"role": "user", "content": messages[0]["content"]}]
        return self.reply

    def generate(self, prompt, max_new_tokens=256, temperature=0.0, **kw):
        self.calls.append(("generate", prompt, max_new_tokens, temperature))
        return self.reply


Q = "Who built the Eiffel Tower?"


def _keys(qs):
    return [" ".join(q.lower().split()).rstrip("?.! ") for q in qs]


@pytest.mark.parametrize("line, want", [
    ("1. Who designed the tower?", "Who designed the tower?"),
    ("  2)  'Eiffel Tower architect'", "Eiffel Tower architect"),
    ("(3) builder of the Eiffel Tower", "builder of the Eiffel Tower"),
    ("- **Eiffel Tower construction**", "Eiffel Tower construction"),
    ("• “tower in Paris history”", "tower in Paris history"),
    ("Query 2: Gustave Eiffel company", "Gustave Eiffel company"),
    ("1. Query: nested label", "nested label"),
    ("1.5 million visitors a year?", "1.5 million visitors a year?"),
    ("Quantum   tunnelling explained", "Quantum tunnelling explained"),
    ("General question: What is the history of Paris landmarks?", "What is the history of Paris landmarks?"),
])
def test_clean_line(line, want):
    assert clean_line(line) == want


def test_multi_query_parses_a_messy_reply():
    reply = ("Sure! Here are 3 search queries:\n\n1. Who designed the Eiffel Tower?\n2. who designed the  "
             "eiffel tower\n3) \"Eiffel Tower builder\"\n- Who built the Eiffel Tower?\n4. Gustave Eiffel\n"
             "5. History of the tower\n\nQuestion: What is the capital of France?\nQueries:\ncapital of France")
    llm = FakeLLM(reply)
    out = get_rewriter("multi-query:3", llm).rewrite(Q)
    assert out == [Q, "Who designed the Eiffel Tower?", "Eiffel Tower builder", "Gustave Eiffel"]
    assert llm.calls == [("generate", MULTI_QUERY_PROMPT.format(n=3, query=Q), 96, 0.0)]
    # only the first block counts: the model inventing the next worked example adds nothing
    assert get_rewriter("multi-query:9", FakeLLM(reply)).rewrite(Q)[-1] == "History of the tower"


@pytest.mark.parametrize("reply, block", [
    ("\na\nb\n\nc", "a\nb"), ("Queries:\n\na\nQuestion: x\nb", "a"), ("", ""), ("a", "a")])
def test_first_block(reply, block):
    assert first_block(reply) == block


@pytest.mark.parametrize("reply", ["", "\n\n  \n", "1.\n2.\n-", Q, f"1. {Q.lower()}\n2. {Q.upper()}", "Queries:"])
def test_replies_with_nothing_new_give_the_original_only(reply):
    for name in ("multi-query", "step-back", "hyde"):
        assert get_rewriter(name, FakeLLM(reply)).rewrite(Q) == [Q]


def test_parse_queries_invariants():
    reply = "\n".join(f"{i}. query number {i % 4}" for i in range(20))
    for limit in range(6):
        out = parse_queries(reply, Q, limit)
        assert out[0] == Q and len(out) <= limit + 1
        assert len(set(_keys(out))) == len(out) and all(out)
    with pytest.raises(ConfigError):
        parse_queries(reply, Q, -1)


def test_step_back_takes_one_general_question():
    llm = FakeLLM(" What is the history of the Eiffel Tower?\nIt was built in 1889.\n\nQuestion: x")
    assert get_rewriter("step-back", llm).rewrite(Q) == [Q, "What is the history of the Eiffel Tower?"]
    assert llm.calls == [("generate", STEP_BACK_PROMPT.format(query=Q), 48, 0.0)]


def test_hyde_returns_one_passage_for_dense_search():
    llm = FakeLLM("Passage: The Eiffel Tower was built by\n the company of Gustave Eiffel  for the 1889 fair.")
    rw = get_rewriter("hyde", llm)
    assert rw.dense_only and not get_rewriter("multi-query", llm).dense_only
    assert rw.rewrite(Q) == [Q, "The Eiffel Tower was built by the company of Gustave Eiffel for the 1889 fair."]
    assert llm.calls == [("chat", HYDE_PROMPT.format(query=Q), 128, 0.0)]


def test_registry_and_errors():
    assert set(REWRITERS) == {"multi-query", "hyde", "step-back", "none"}
    assert get_rewriter("none").rewrite(Q) == [Q]
    assert get_rewriter("").rewrite(Q) == [Q]
    with pytest.raises(ConfigError, match="needs an LLM"):
        get_rewriter("hyde")
    with pytest.raises(ConfigError, match="unknown name 'rag-fusion'"):
        get_rewriter("rag-fusion", FakeLLM(""))
    with pytest.raises(ConfigError, match="positive integer"):
        get_rewriter("multi-query:zero", FakeLLM(""))
    assert get_rewriter("multi-query:5", FakeLLM("")).n == 5


@pytest.mark.slow
@pytest.mark.assets
def test_rewriters_on_the_default_model(smollm2):
    import torch

    torch.set_num_threads(1)
    for spec in ("multi-query:3", "step-back", "hyde"):
        out = get_rewriter(spec, smollm2).rewrite(Q)
        assert out[0] == Q and 1 <= len(out) <= (4 if spec.startswith("multi") else 2)
        assert all(q.strip() == q and q for q in out) and len(set(_keys(out))) == len(out)
        assert not any(q.rstrip().endswith(":") for q in out[1:])
    assert len(get_rewriter("hyde", smollm2).rewrite(Q)) == 2  # the model always writes something
