"""``OpenAIModel`` over real HTTP: lmstack's own OpenAI-compatible server on a free local port, a
tiny random Llama behind it. A generative task and a judge task give what the same model gives
in-process, and a re-run answers from the output cache without one request."""

import dataclasses

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from lmstack.eval.cache import OutputCache  # noqa: E402
from lmstack.eval.models import LLMModel, OpenAIModel  # noqa: E402
from lmstack.eval.tasks import TaskConfig, run_task  # noqa: E402
from lmstack.infer import LLM  # noqa: E402
from lmstack.serve.metrics import parse_metrics  # noqa: E402
from tests.test_serve import request  # noqa: E402


@pytest.fixture(scope="module")
def served():
    """(server, the same LLM in-process). tiny-llama's shapes with a 1024-token context, so that
    judge prompts (a passage, a rubric and an answer, byte-level tokens) fit."""
    import torch

    from lmstack.infer.engine import Engine, EngineConfig
    from lmstack.model import Transformer, preset
    from lmstack.serve.backend import LocalBackend
    from lmstack.serve.config import ServeConfig
    from lmstack.serve.server import ServerThread
    from lmstack.tokenizer.byte_level import byte_level_tokenizer

    torch.manual_seed(0)
    llm = LLM(Transformer(dataclasses.replace(preset("tiny-llama"), block_size=1024)), byte_level_tokenizer())
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_slots=4, max_seq_len=1024)).start()
    server = ServerThread(LocalBackend(engine, llm.tokenizer, "tiny-long"), ServeConfig()).__enter__()
    try:
        yield server, llm
    finally:
        server.stop()
        engine.shutdown()


def api_requests(server) -> float:
    metrics = parse_metrics(request(server.url, "GET", "/metrics")[2])
    return sum(v for k, v in metrics.items() if k.startswith("lmstack_requests_total") and "/v1/" in k)


def test_generative_and_judge_tasks_through_the_endpoint(served, tmp_path):
    server, llm = served
    remote = OpenAIModel("tiny-long", base_url=server.url + "/v1", max_retries=0)
    local = LLMModel(llm, batch_size=4)
    gen = TaskConfig(name="qa", kind="generative", dataset="qa", limit=3, max_new_tokens=6,
                     prompt="Q: {question}\nA:")
    judged = TaskConfig(name="qa_judge", kind="judge", dataset="qa", limit=3, max_new_tokens=6, chat=True)

    before = api_requests(server)
    cache = OutputCache(tmp_path / "cache.jsonl")
    over_http = [run_task(t, remote, judge=remote, n_resamples=0, progress=False, cache=cache) for t in (gen, judged)]
    asked = api_requests(server) - before
    in_process = [run_task(t, local, judge=local, n_resamples=0, progress=False) for t in (gen, judged)]

    for a, b in zip(over_http, in_process):  # greedy answers and seeded judge retries match the local model
        assert [e["prediction"] for e in a.examples] == [e["prediction"] for e in b.examples]
        assert [e["judge"] if "judge" in e else None for e in a.examples] == \
            [e["judge"] if "judge" in e else None for e in b.examples]
        assert {k: v.value for k, v in a.metrics.items()} == {k: v.value for k, v in b.metrics.items()}
    assert any(e["prediction"] for e in over_http[0].examples)  # the random model does say something
    # the model answered 3 + 3 prompts; the judge was asked 3 verdicts, plus a retry per unparseable reply
    replies = sum(len(r["replies"]) for e in over_http[1].examples for r in e["judge"])
    assert asked == 3 + 3 + replies
    assert over_http[1].metrics["judge_errors"].n == 3

    again = [run_task(t, OpenAIModel("tiny-long", base_url=server.url + "/v1", max_retries=0),
                      judge=remote, n_resamples=0, progress=False, cache=OutputCache(tmp_path / "cache.jsonl"))
             for t in (gen, judged)]
    assert api_requests(server) - before == asked  # everything came from the cache
    assert [a.examples for a in again] == [a.examples for a in over_http]
