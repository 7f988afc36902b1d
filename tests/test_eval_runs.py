"""Harness runs on the tiny random model: resumable cache, acc / acc_norm, sampled rows independent
of batching, judge errors and seed spread, perplexity tasks, adapters, endpoints, compare, CLI."""

import json

import pytest

from lmstack.cli.main import main
from lmstack.errors import ConfigError
from lmstack.eval import datasets as D
from lmstack.eval.cache import OutputCache, cache_key, cached_map
from lmstack.eval.calls import items_done
from lmstack.eval.kinds import mc_scores
from lmstack.eval.models import LLMModel, OpenAIModel
from lmstack.eval.report import EvalReport, compare_reports, load_report
from lmstack.eval.scoring import MetricValue
from lmstack.eval.stats import paired_bootstrap, permutation_test
from lmstack.eval.tasks import TaskConfig, TaskResult, run_task
from lmstack.infer import LLM


@pytest.fixture(scope="module")
def tiny():
    return LLMModel(LLM.load("tiny-llama"), batch_size=2)


class Killed(Exception):
    pass


class Counting:
    """Wraps a model: counts generated prompts; raises after ``die_after`` batches (a kill)."""

    def __init__(self, model, die_after=None):
        self.model, self.die_after, self.prompts, self.batches = model, die_after, 0, 0
        self.identity, self.batch_size = model.identity, model.batch_size

    def generate_batch(self, prompts, *a, **kw):
        if self.die_after is not None and self.batches >= self.die_after:
            raise Killed
        self.batches += 1
        self.prompts += len(prompts)
        return self.model.generate_batch(prompts, *a, **kw)


def test_rerun_after_a_kill_recomputes_nothing_cached(tiny, tmp_path):
    task = TaskConfig(name="qa", kind="generative", dataset="qa", limit=6, max_new_tokens=4, prompt="Q: {question}\nA:")
    path = tmp_path / "cache.jsonl"
    with pytest.raises(Killed):
        run_task(task, Counting(tiny, die_after=1), n_resamples=0, progress=False, cache=OutputCache(path))
    assert len(path.read_text().splitlines()) == 2  # the finished batch was saved
    with open(path, "a") as f:
        f.write('{"k": "trunc')  # a write cut short by the kill
    second = Counting(tiny)
    res = run_task(task, second, n_resamples=0, progress=False, cache=OutputCache(path))
    assert second.prompts == 4
    third = Counting(tiny)
    again = run_task(task, third, n_resamples=0, progress=False, cache=OutputCache(path))
    assert third.prompts == 0 and again.item_scores == res.item_scores
    fresh = run_task(task, tiny, n_resamples=0, progress=False)
    assert fresh.item_scores == res.item_scores and fresh.examples == res.examples
    other = TaskConfig(name="qa", kind="generative", dataset="qa", limit=6, max_new_tokens=5, prompt="Q: {question}\nA:")
    fourth = Counting(tiny)
    run_task(other, fourth, n_resamples=0, progress=False, cache=OutputCache(path))
    assert fourth.prompts == 6  # a sampling parameter is part of the key


def test_sampled_rows_do_not_depend_on_the_batch(tiny):
    prompts = ["Once upon a time", "The capital of", "x"]
    from lmstack.eval.calls import generate_all

    one = LLMModel(tiny.llm, batch_size=1)
    a = generate_all(tiny, prompts, 6, 0.9, False, OutputCache(None), seed=3)
    b = generate_all(one, prompts, 6, 0.9, False, OutputCache(None), seed=3)
    c = generate_all(one, prompts, 6, 0.9, False, OutputCache(None), seed=4)
    assert a == b and a != c


def test_progress_counts_an_item_when_its_last_request_is_done():
    class Bar:
        def __init__(self):
            self.steps = []

        def update(self, n):
            self.steps.append(n)

    cache = OutputCache(None)
    cache.put_many({cache_key("m", "k", {"x": 0}): 0})
    # item 0 asks x=0 (cached) and x=1; item 1 asks x=1 again and x=2; item 2 asks x=3
    payloads, item_of = [{"x": 0}, {"x": 1}, {"x": 1}, {"x": 2}, {"x": 3}], [0, 0, 1, 1, 2]
    batches, bar = [], Bar()
    values = cached_map(cache, "m", "k", payloads, lambda b: batches.append(b) or [p["x"] for p in b], 2,
                        items_done(bar, item_of))
    assert values == [0, 1, 1, 2, 3] and batches == [[{"x": 1}, {"x": 2}], [{"x": 3}]]
    assert bar.steps == [0, 2, 1]  # nothing done from the cache alone; x=1 finishes items 0 and 1 at once


def test_mc_scores_acc_and_byte_length_normalised():
    assert mc_scores([-10.0, -9.0], ["a much longer choice", "b"], 0) == (0.0, 1.0)
    assert mc_scores([-4.0, -4.0], ["é", "ab"], 1) == (0.0, 0.0)  # ties go to the first; é is 2 bytes
    assert mc_scores([-5.0, -4.2], ["éé", "abc"], 0) == (0.0, 1.0)  # by bytes (4 vs 3); by characters it would be 0


def test_multiple_choice_text_choices_report_acc_norm(tiny):
    res = run_task(TaskConfig(name="mc", kind="multiple_choice", dataset="multiple_choice", choices_as="text",
                              limit=5), tiny, n_resamples=0, progress=False)
    lls = tiny.loglikelihood_batch([(f"Question: {it.question}\nAnswer:", f" {c}")
                                    for it in D.load_multiple_choice()[:5] for c in it.choices])
    want = [mc_scores(lls[4 * i: 4 * i + 4], it.choices, it.answer)
            for i, it in enumerate(D.load_multiple_choice()[:5])]
    assert res.item_scores["accuracy"] == [w[0] for w in want]
    assert res.item_scores["accuracy_norm"] == [w[1] for w in want]
    assert set(res.metrics) == {"accuracy", "accuracy_norm"} and res.item_ids[0] == "mc-001"


def test_judge_task_records_errors_and_seed_spread(tiny):
    class Judge:
        def generate_batch(self, prompts, max_new_tokens, temperature=0.0, seeds=None, chat=False, stop=()):
            s = seeds[0]
            return ["no idea" if "qa-" in p or ("Question: Answer the question" in p and i == 0)
                    else f"{3 + s % 2}" for i, p in enumerate(prompts)]

    task = TaskConfig(name="j", kind="judge", dataset="qa", limit=4, max_new_tokens=2, judge_seeds=[0, 1, 2])
    res = run_task(task, tiny, judge=Judge(), n_resamples=0, progress=False)
    # item 0 never parses (3 seeds x 1 item = 3 errors of 12); others score 3 (seed 0, 2) or 4 (seed 1)
    assert res.metrics["judge_error_rate"].value == pytest.approx(3 / 12)
    assert res.metrics["judge_score"].n == 3
    assert res.metrics["judge_score"].value == pytest.approx(((2 / 4) * 2 + 3 / 4) / 3)
    assert res.metrics["judge_seed_std"].value > 0
    assert any("unparseable" in n for n in res.notes)


def test_perplexity_task_on_passages(tiny):
    from lmstack.eval.lm_metrics import perplexity

    res = run_task(TaskConfig(name="ppl", kind="perplexity", dataset="passages", limit=3, window=64),
                   tiny, n_resamples=50, progress=False)
    want = perplexity(tiny.llm, [p.text for p in D.load_passages()[:3]], window=64)
    assert res.metrics["perplexity"].value == pytest.approx(want.perplexity)
    assert res.metrics["bits_per_byte"].ci_low <= want.bits_per_byte <= res.metrics["bits_per_byte"].ci_high


def test_adapter_changes_identity_and_logits(tiny_adapter):
    import torch

    base, folder = tiny_adapter
    with_adapter = LLMModel.load("tiny-llama", adapter=str(folder))
    plain = LLMModel.load("tiny-llama")
    ids = [[5, 6, 7, 8]]
    assert torch.allclose(with_adapter.llm.logits(ids), base.logits(ids), atol=1e-5)
    assert not torch.allclose(plain.llm.logits(ids), base.logits(ids), atol=1e-3)
    assert with_adapter.identity != plain.identity == LLMModel.load("tiny-llama").identity


def test_openai_endpoint_requests():
    httpx = pytest.importorskip("httpx2")
    seen = []

    def handle(req):
        body = json.loads(req.content)
        seen.append((req.url.path, body))
        if req.url.path.endswith("/chat/completions"):
            return httpx.Response(200, json={"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                                             "choices": [{"index": 0, "finish_reason": "stop",
                                                          "message": {"role": "assistant", "content": "Paris"}}]})
        text = body["prompt"]
        lp = {"tokens": ["Q", ":", " A"], "token_logprobs": [None, -1.0, -0.5], "text_offset": [0, 1, 2],
              "top_logprobs": None}
        return httpx.Response(200, json={"id": "t", "object": "text_completion", "created": 0, "model": "m",
                                         "choices": [{"index": 0, "text": text if body.get("echo") else " ok",
                                                      "finish_reason": "length", "logprobs": lp}]})

    m = OpenAIModel("m", base_url="http://endpoint/v1", api_key="k",
                    http_client=httpx.Client(transport=httpx.MockTransport(handle)))
    assert m.generate_batch(["Capital of France?"], 8, chat=True) == ["Paris"]
    assert m.generate_batch(["Q"], 8, seeds=[7]) == [" ok"] and seen[-1][1]["seed"] == 7
    assert m.loglikelihood_batch([("Q:", " A")]) == [-0.5]  # only tokens at offsets >= len(context)
    assert seen[-1][1]["echo"] is True and seen[-1][1]["max_tokens"] == 0


def test_paired_tests_detect_a_real_difference_and_not_noise():
    a = [0.0] * 20 + [1.0] * 20
    b = [1.0] * 40
    d, lo, hi, p = paired_bootstrap(a, b, 2000)
    assert d == 0.5 and lo > 0 and p < 0.01 and permutation_test(a, b, 5000) < 0.01
    assert permutation_test(a, a) == 1.0
    noise = [1.0, 0.0] * 10
    assert permutation_test(noise, noise[::-1]) > 0.5


def _run(name, scores):
    t = TaskResult("mc", "multiple_choice", len(scores), {"accuracy": MetricValue(sum(scores) / len(scores))},
                   item_ids=[f"i{k}" for k in range(len(scores))], item_scores={"accuracy": scores})
    return EvalReport("s", name, [t], created="now")


def test_compare_pairs_items_and_cli(tmp_path, capsys):
    a, b = _run("A", [0.0] * 30 + [1.0] * 10), _run("B", [1.0] * 40)
    diffs, notes = compare_reports(a, b)
    assert len(diffs) == 1 and diffs[0].diff == pytest.approx(0.75) and diffs[0].significant
    a.write(tmp_path / "a", chart=False)
    b.write(tmp_path / "b")
    assert (tmp_path / "b" / "scores.png").stat().st_size > 1000 and "![scores](scores.png)" in (
        tmp_path / "b" / "report.md").read_text()
    assert main(["eval", "compare", str(tmp_path / "a" / "report.json"), str(tmp_path / "b" / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "| mc | accuracy | 40 | 0.25 | 1 | +0.75 |" in out and "significant" in out


def test_cli_run_resumes_from_its_cache(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ntasks:\n  - {name: qa, kind: generative, dataset: qa, limit: 2, max_new_tokens: 3}\n"
                     "  - {name: mc, kind: multiple_choice, dataset: multiple_choice, limit: 2, choices_as: text}\n")
    args = ["eval", "run", str(suite), "--model", "tiny-llama", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    lines = (tmp_path / "out" / "cache.jsonl").read_text().splitlines()
    assert len(lines) == 2 + 8
    first = load_report(tmp_path / "out" / "report.json")
    assert main(args) == 0
    assert len((tmp_path / "out" / "cache.jsonl").read_text().splitlines()) == 10
    assert load_report(tmp_path / "out" / "report.json").metric_table() == first.metric_table()
    assert (tmp_path / "out" / "report.html").is_file()
    assert main(["eval", "run", str(suite), "--model", "tiny-llama", "--base-url", "http://x/v1", "--adapter", "a"]) == 2
    assert "adapter" in capsys.readouterr().err


def test_cache_needs_an_identity(tmp_path):
    class NoId:
        def generate(self, p, n, t):
            return "x"

        def chat(self, p, n, t):
            return "x"

    with pytest.raises(ConfigError, match="identity"):
        run_task(TaskConfig(name="qa", kind="generative", dataset="qa", limit=1), NoId(), n_resamples=0,
                 progress=False, cache=OutputCache(tmp_path / "c.jsonl"))


def test_cli_perplexity_matches_library(tmp_path, capsys):
    from lmstack.eval.lm_metrics import perplexity

    f = tmp_path / "t.txt"
    f.write_text("hello world. this is a small text file for perplexity.\n")
    assert main(["eval", "perplexity", str(f), "--model", "tiny-llama", "--window", "16", "--stride", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = perplexity(LLM.load("tiny-llama"), [f.read_text()], window=16, stride=8)
    assert out["perplexity"] == pytest.approx(want.perplexity) and out["tokens"] == want.n_tokens
    assert main(["eval", "perplexity", str(tmp_path / "missing.txt"), "--model", "tiny-llama"]) == 2


def test_cli_limit_keeps_a_smaller_task_limit(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ntasks:\n  - {name: a, kind: generative, dataset: qa, limit: 1, max_new_tokens: 2}\n"
                     "  - {name: b, kind: generative, dataset: qa, max_new_tokens: 2}\n")
    assert main(["eval", "run", str(suite), "--model", "tiny-llama", "--out", str(tmp_path / "out"), "--limit", "2",
                 "--no-cache"]) == 0
    assert [t.n for t in load_report(tmp_path / "out" / "report.json").tasks] == [1, 2]


@pytest.mark.slow
def test_the_shipped_smoke_suite_passes_its_gates_with_the_default_model(smollm2, tmp_path):
    """A new user's first `lmstack eval run lmstack/eval/suites/smoke.yaml --model default` exits 0."""
    from pathlib import Path

    from lmstack.config import load_config
    from lmstack.eval.report import run_suite
    from lmstack.eval.tasks import SuiteConfig

    suite = load_config(SuiteConfig, Path(D.__file__).parents[1] / "suites" / "smoke.yaml")
    report = run_suite(suite, LLMModel(smollm2, batch_size=8), "default", progress=False)
    assert report.gates and report.passed, [g.message() for g in report.gates]
