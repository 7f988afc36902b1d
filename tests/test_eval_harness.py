"""The harness without a real model: task configs, bootstrap, gates, reports and the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest

from lmstack.cli.main import main
from lmstack.config import config_from_dict, load_config
from lmstack.errors import ConfigError
from lmstack.eval import datasets as D
from lmstack.eval.gates import check_gates, parse_gate
from lmstack.eval.judges import parse_judge_score
from lmstack.eval.report import EvalReport, apply_gates, load_report, run_suite
from lmstack.eval.scoring import score
from lmstack.eval.stats import bootstrap_corpus_ci, bootstrap_mean_ci
from lmstack.eval.tasks import SuiteConfig, TaskConfig, run_task

SUITES = Path(__file__).resolve().parents[1] / "lmstack" / "eval" / "suites"


class ScriptedModel:
    """Answers from a lookup keyed by the prompt's contents; knows MC answers for chosen items."""

    def __init__(self, right_mc_ids=(), wrong_text=False):
        self.right_mc = set(right_mc_ids)
        self.wrong_text = wrong_text
        self.by_prompt_key = {}
        for it in D.load_qa():
            self.by_prompt_key[it.question] = it.answers[0]
        for it in D.load_translation():
            self.by_prompt_key[it.source] = it.references[0]
        for it in D.load_summarization():
            self.by_prompt_key[it.document] = it.summary
        for p in D.load_code_problems():
            self.by_prompt_key[p.prompt] = p.canonical_solution
        self.mc = {it.question: it for it in D.load_multiple_choice()}
        self.chats = 0

    def generate(self, prompt, max_new_tokens, temperature):
        if self.wrong_text:
            return "I do not know."
        if prompt.endswith("Score:"):  # acting as a judge: full marks when the answer equals the reference
            ref = prompt.split("\nReference answer: ")[1].split("\nAnswer: ")[0]
            ans = prompt.split("\nAnswer: ")[-1].split("\n\nReply with")[0]
            return "5 exact" if ref == ans else "1 wrong"
        for key, answer in self.by_prompt_key.items():
            if key in prompt:
                return answer
        raise AssertionError(f"unexpected prompt {prompt[:80]!r}")

    def chat(self, prompt, max_new_tokens, temperature):
        self.chats += 1
        return self.generate(prompt, max_new_tokens, temperature)

    def loglikelihood(self, context, continuation):
        it = next(v for q, v in self.mc.items() if q in context)
        letter = chr(65 + it.answer) if it.id in self.right_mc else chr(65 + (it.answer + 1) % len(it.choices))
        return 0.0 if continuation == f" {letter}" else -1.0


def test_every_shipped_suite_loads():
    found = sorted(SUITES.glob("*.yaml"))
    assert [p.stem for p in found] == ["baseline", "smoke"]
    kinds = {p.stem: [t.kind for t in load_config(SuiteConfig, p).tasks] for p in found}
    assert kinds["smoke"] == ["generative", "generative", "generative", "multiple_choice", "code"]
    assert sorted(set(kinds["baseline"])) == ["code", "dag", "g_eval", "generative", "gpt_score", "judge",
                                              "multiple_choice", "pairwise", "perplexity", "rag", "selfcheck"]


def test_the_docs_show_the_shipped_smoke_suite():
    doc = (SUITES.parents[2] / "docs" / "eval.md").read_text()
    head = "# lmstack/eval/suites/smoke.yaml (shipped)\n"
    block = doc.split("```yaml\n" + head)[1].split("```")[0]
    assert block == (SUITES / "smoke.yaml").read_text()


def test_tasks_with_a_perfect_model_score_perfectly():
    suite = load_config(SuiteConfig, SUITES / "smoke.yaml")
    model = ScriptedModel(right_mc_ids={it.id for it in D.load_multiple_choice()})
    report = run_suite(suite, model, "scripted", progress=False)
    assert model.chats == 32 + 24 + 30  # the generative tasks ask in chat form
    table = report.metric_table()
    assert table["qa.exact_match"] == 1.0 and table["qa.token_f1"] == 1.0
    assert table["translation.bleu"] == pytest.approx(100.0) and table["translation.chrf"] == pytest.approx(100.0)
    assert table["summarization.rouge1"] == pytest.approx(1.0) and table["summarization.meteor"] > 0.99
    assert table["mc.accuracy"] == 1.0 and table["code.pass@1"] == 1.0
    assert report.passed and len(report.gates) == 4
    assert any(n.startswith("sandbox:") for t in report.tasks for n in t.notes)
    assert any(n.startswith("METEOR:") for t in report.tasks for n in t.notes)


def test_multiple_choice_accuracy_counts_exactly():
    right = {f"mc-{i:03d}" for i in range(1, 31, 3)}  # 10 of 30
    res = run_task(TaskConfig(name="mc", kind="multiple_choice", dataset="multiple_choice"),
                   ScriptedModel(right_mc_ids=right), n_resamples=200, progress=False)
    acc = res.metrics["accuracy"]
    assert acc.value == pytest.approx(10 / 30) and acc.n == 30
    assert acc.ci_low < acc.value < acc.ci_high


def test_judge_task_and_parsing():
    res = run_task(TaskConfig(name="j", kind="judge", dataset="qa", limit=5), ScriptedModel(),
                   judge=ScriptedModel(), n_resamples=0, progress=False)
    assert res.metrics["judge_score"].value == 1.0
    assert parse_judge_score("Score: 4 because") == 0.75 and parse_judge_score("no idea") is None
    with pytest.raises(ConfigError, match="judge model"):
        run_task(TaskConfig(name="j", kind="judge", dataset="qa", limit=1), ScriptedModel(), progress=False)


def test_task_config_errors_are_specific():
    with pytest.raises(ConfigError, match="set dataset_type"):
        TaskConfig(name="t", kind="generative", dataset="my/file.jsonl")
    with pytest.raises(ConfigError, match="kind 'code' needs a dataset of type"):
        TaskConfig(name="t", kind="code", dataset="qa")
    with pytest.raises(ConfigError, match="unknown metric"):
        TaskConfig(name="t", kind="generative", dataset="qa", metrics=["blue"])
    with pytest.raises(ConfigError, match="n_samples"):
        TaskConfig(name="t", kind="code", dataset="code", ks=[1, 5])
    with pytest.raises(ConfigError, match="unique"):
        config_from_dict(SuiteConfig, {"name": "s", "tasks": [{"name": "a", "kind": "multiple_choice",
                                                                "dataset": "multiple_choice"}] * 2})
    with pytest.raises(ConfigError, match="prompt uses"):
        run_task(TaskConfig(name="t", kind="generative", dataset="qa", prompt="{nope}", limit=1),
                 ScriptedModel(), progress=False)


# --- bootstrap ------------------------------------------------------------------------------

def test_an_unknown_kind_names_the_known_ones():
    from lmstack.eval.kinds import KINDS

    with pytest.raises(ConfigError, match=r"task 't': kind 'qa' is not a task kind; expected one of "
                                          r"\['multiple_choice', 'generative', .*'gpt_score', 'reward_model'\]"):
        config_from_dict(SuiteConfig, {"name": "s", "tasks": [{"name": "t", "kind": "qa", "dataset": "qa"}]})
    assert len(KINDS) == 12 and all(callable(k.run) and k.reads for k in KINDS.values())


def test_bootstrap_mean_interval_has_the_textbook_width():
    rng = np.random.default_rng(1)
    scores = (rng.random(400) < 0.5).astype(float)
    lo, hi = bootstrap_mean_ci(scores, n_resamples=2000, seed=0)
    half = 1.96 * np.sqrt(scores.mean() * (1 - scores.mean()) / 400)
    assert lo < scores.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_mean_ci([0.7] * 20) == pytest.approx((0.7, 0.7))
    assert bootstrap_mean_ci(scores, seed=3) == bootstrap_mean_ci(scores, seed=3)  # seeded


def test_bootstrap_corpus_interval_brackets_bleu():
    from lmstack.eval.metrics import bleu

    items = D.load_translation()
    refs = [it.references for it in items]
    hyps = [it.references[0] if i % 2 else it.source for i, it in enumerate(items)]
    lo, hi = bootstrap_corpus_ci(bleu, hyps, refs, n_resamples=100)
    assert lo < bleu(hyps, refs) < hi
    values, items_ = score(["bleu", "token_f1"], hyps, refs, n_resamples=100)
    assert values["bleu"].value == bleu(hyps, refs) and "bleu" not in items_ and len(items_["token_f1"]) == 30
    with pytest.raises(ConfigError, match="alpha"):
        bootstrap_mean_ci([1.0], alpha=1.5)


# --- gates and reports ----------------------------------------------------------------------

TABLE = {"translation.bleu": 21.5, "qa.token_f1": 0.61, "rag.faithfulness": 0.80, "rag.token_f1": 0.4}


def test_threshold_and_regression_gates():
    res = check_gates(["translation.bleu >= 20", "bleu < 20", "faithfulness must not drop by more than 0.02 vs baseline",
                       "qa.token_f1 must not drop by more than 5% vs baseline"], TABLE,
                      baseline={**TABLE, "rag.faithfulness": 0.83, "qa.token_f1": 0.63})
    assert [r.passed for r in res] == [True, False, False, True]
    assert res[2].threshold == pytest.approx(0.81) and res[2].baseline == 0.83
    msg = res[2].message()
    assert "faithfulness must not drop" in msg and "0.8" in msg and "0.81" in msg and "FAILED" in msg
    assert res[3].threshold == pytest.approx(0.63 * 0.95)


def test_gate_errors():
    with pytest.raises(ConfigError, match="expected '<metric> <op> <number>'"):
        parse_gate("bleu is good")
    with pytest.raises(ConfigError, match="ambiguous"):
        check_gates(["token_f1 > 0.1"], TABLE)
    with pytest.raises(ConfigError, match="not in the report"):
        check_gates(["rouge1 > 0.1"], TABLE)
    with pytest.raises(ConfigError, match="no baseline"):
        check_gates(["bleu must not drop by more than 1"], TABLE)


def _report(tmp_path, bleu_value):
    from lmstack.eval.scoring import MetricValue
    from lmstack.eval.tasks import TaskResult

    rep = EvalReport("s", "m", [TaskResult("translation", "generative", 30,
                                           {"bleu": MetricValue(bleu_value, bleu_value - 3, bleu_value + 3, 30)},
                                           notes=["a note"])], created="now")
    rep.write(tmp_path)
    return rep


def test_report_round_trip_and_markdown(tmp_path):
    rep = _report(tmp_path, 21.5)
    loaded = load_report(tmp_path / "report.json")
    assert loaded == rep
    md = (tmp_path / "report.md").read_text()
    assert "| translation | bleu | 21.5 | [18.5, 24.5] | 30 |" in md and "- translation: a note" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json", "report.md"]  # no temp files
    assert "<td>translation</td><td>bleu</td><td>21.5</td>" in (tmp_path / "report.html").read_text()
    apply_gates(rep, ["bleu >= 25"])
    assert not rep.passed and "**FAIL**" in rep.to_markdown()


def test_cli_gate_exit_codes(tmp_path, capsys):
    base, cur = tmp_path / "base", tmp_path / "cur"
    _report(base, 22.0)
    _report(cur, 21.5)
    assert main(["eval", "gate", str(cur / "report.json"), "--gate", "bleu >= 20"]) == 0
    assert main(["eval", "gate", str(cur / "report.json"), "--gate", "bleu >= 20", "--gate",
                 "bleu must not drop by more than 0.2 vs baseline", "--baseline", str(base / "report.json")]) == 1
    err = capsys.readouterr().err
    assert "gate FAILED: 'bleu must not drop by more than 0.2 vs baseline': translation.bleu = 21.5, threshold 21.8" in err
    assert main(["eval", "gate", str(tmp_path / "missing.json"), "--gate", "bleu >= 1"]) == 2


def test_cli_score_matches_library(tmp_path, capsys):
    from lmstack.eval.metrics import bleu, chrf

    items = D.load_translation()[:10]
    hyps = [it.source if i % 2 else it.references[0] for i, it in enumerate(items)]
    (tmp_path / "h.txt").write_text("\n".join(hyps) + "\n")
    (tmp_path / "r.txt").write_text("\n".join(it.references[0] for it in items) + "\n")
    assert main(["eval", "score", "--predictions", str(tmp_path / "h.txt"), "--references",
                 str(tmp_path / "r.txt"), "--bootstrap", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    refs = [it.references[0] for it in items]
    assert out["bleu"]["value"] == bleu(hyps, refs) and out["chrf"]["value"] == chrf(hyps, refs)


def test_cli_code_canonical_on_shipped_set(capsys):
    assert main(["eval", "code", "--problems", "code", "--canonical", "--timeout", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["problems"] == 12 and out["pass@1"] == 1.0 and out["failed_tasks"] == []


def test_llm_adapter_loglikelihood_sums_continuation_logprobs():
    import torch

    from lmstack.eval.models import LLMModel
    from lmstack.infer import LLM

    llm = LLM.load("tiny-llama")
    ctx, cont = "Answer:", " B"
    full = llm.tokenizer.encode(ctx + cont, add_special_tokens=False)
    n_ctx = len(llm.tokenizer.encode(ctx, add_special_tokens=False))
    logp = torch.log_softmax(llm.logits([full])[0], dim=-1)
    want = sum(float(logp[t - 1, full[t]]) for t in range(n_ctx, len(full)))
    assert LLMModel(llm).loglikelihood(ctx, cont) == pytest.approx(want, abs=1e-5)
    with pytest.raises(ConfigError, match="no tokens"):
        LLMModel(llm).loglikelihood(ctx, "")
