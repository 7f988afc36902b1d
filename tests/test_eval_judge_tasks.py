"""The judge-based task kinds with scripted judges and models: pairwise, g_eval, dag, selfcheck, rag,
gpt_score; the formulas on hand-checked items, errors never scored, config errors, judge replies
cached (a second run asks nothing), and a resume after a kill."""

import math
import statistics

import pytest

from lmstack.config import config_from_dict, load_config
from lmstack.errors import ConfigError, UnsupportedError
from lmstack.eval import datasets as D
from lmstack.eval.cache import OutputCache
from lmstack.eval.judges import GEvalConfig, selfcheck_ngram, split_sentences
from lmstack.eval.report import run_suite
from lmstack.eval.tasks import SuiteConfig, TaskConfig, run_task

QA = D.load_qa()[:4]


class Judge:
    """A scripted judge: ``reply(prompt, seed, temperature)``; records every prompt it is asked."""

    identity = "scripted-judge"

    def __init__(self, reply):
        self.reply, self.prompts, self.batches = reply, [], 0

    def generate_batch(self, prompts, max_new_tokens, temperature=0.0, seeds=None, chat=False):
        self.batches += 1
        self.prompts += list(prompts)
        return [self.reply(p, s, temperature) for p, s in zip(prompts, seeds)]


class ProbJudge(Judge):
    """Also exposes next-token probabilities of the options: ``probs(prompt)`` (None: not available)."""

    def __init__(self, reply, probs):
        super().__init__(reply)
        self.probs, self.prob_prompts = probs, []

    def option_probs(self, prompt, options, chat=True):
        self.prob_prompts.append(prompt)
        return self.probs(prompt)


class Model:
    """The evaluated model: ``answer(prompt, temperature, seed)``; counts the prompts it gets."""

    identity = "scripted-model"

    def __init__(self, answer):
        self.answer, self.prompts = answer, 0

    def generate_batch(self, prompts, max_new_tokens, temperature=0.0, seeds=None, chat=False):
        self.prompts += len(prompts)
        return [self.answer(p, temperature, s) for p, s in zip(prompts, seeds or [None] * len(prompts))]


def qa_model(wrong=(1, 3), wrong_text="I do not know."):
    """Answers the first four QA items: the gold answer, except ``wrong_text`` on items ``wrong``."""

    def answer(prompt, temperature, seed):
        k = next(i for i, it in enumerate(QA) if it.question in prompt)
        return wrong_text if k in wrong else QA[k].answers[0]

    return Model(answer)


def between(text, start, end):
    return text.split(start, 1)[1].split(end, 1)[0]


def run(task, model=None, judge=None, cache=None):
    return run_task(task, model or Model(lambda p, t, s: "unused"), judge, n_resamples=0, progress=False,
                    cache=cache)


# -- pairwise --------------------------------------------------------------------------------

def label_judge(biased=(), unparseable=(), first_try_fails=()):
    """Prefers the labelled answer of the shipped pairwise set. On ``biased`` items it always
    says "A"; on ``unparseable`` items it never gives a verdict; on ``first_try_fails`` only its
    first (greedy) attempt is unparseable."""
    items = {it.question: it for it in D.load_pairwise()}

    def reply(prompt, seed, temperature):
        it = items[between(prompt, "Question: ", "\n")]
        if it.id in unparseable or (it.id in first_try_fails and temperature == 0.0):
            return "Both are fine."
        if it.id in biased:
            return "A"
        better = it.answer_1 if it.label == "1" else it.answer_2
        return "A" if between(prompt, "Response A: ", "\n\nResponse B:") == better else "B"

    return Judge(reply)


def test_pairwise_on_the_labelled_set_reports_win_rate_agreement_and_position_bias():
    items = D.load_pairwise()
    biased = {"pw-002", "pw-005", "pw-009"}
    model = Model(lambda p, t, s: "unused")
    res = run(TaskConfig(name="pw", kind="pairwise", dataset="pairwise"), model, label_judge(biased))
    m = {k: v.value for k, v in res.metrics.items()}
    # a verdict that flips with the swap is a tie (one half); the others follow the label
    want_win = sum(0.5 if it.id in biased else float(it.label == "1") for it in items) / 12
    assert m["win_rate"] == pytest.approx(want_win) == pytest.approx(5.5 / 12)
    assert m["agreement"] == pytest.approx(9 / 12) and m["position_bias"] == pytest.approx(3 / 12)
    assert m["judge_errors"] == 0 and res.metrics["judge_errors"].n == 12
    assert model.prompts == 0  # the answers come from the dataset
    assert res.item_scores["position_bias"] == [float(it.id in biased) for it in items]
    worst = res.examples[0]
    assert worst["scores"]["win_rate"] == 0.0 and worst["label"] == "2"
    assert worst["judge"] == [{"seed": 0, "first_order": "B", "swapped_order": "A", "winner": "2", "error": None}]


def test_pairwise_model_answer_against_the_reference():
    def reply(prompt, seed, temperature):
        a, b = between(prompt, "Response A: ", "\n\nResponse B:"), between(prompt, "Response B: ", "\n\nBetter")
        if a == b:
            return "tie"
        return "B" if a == "I do not know." else "A"

    model = qa_model()
    res = run(TaskConfig(name="pq", kind="pairwise", dataset="qa", limit=4), model, Judge(reply))
    assert res.item_scores["win_rate"] == [0.5, 0.0, 0.5, 0.0]  # equal to the reference: a tie
    assert res.metrics["position_bias"].value == 0.0 and "agreement" not in res.metrics  # no labels
    assert model.prompts == 4 and res.examples[0]["references"] == [QA[1].answers[0]]


def test_unparseable_verdicts_are_retried_then_counted_as_errors():
    judge = label_judge(unparseable={"pw-003"}, first_try_fails={"pw-001"})
    res = run(TaskConfig(name="pw", kind="pairwise", dataset="pairwise"), judge=judge)
    assert res.metrics["judge_errors"].value == 1 and res.metrics["judge_error_rate"].value == pytest.approx(1 / 12)
    assert res.metrics["win_rate"].n == 11 and res.metrics["agreement"].value == 1.0  # the error is not scored
    q3 = D.load_pairwise()[2].question
    assert sum(q3 in p for p in judge.prompts) == 2 * 3  # both orders, each asked 3 times
    assert sum(D.load_pairwise()[0].question in p for p in judge.prompts) == 2 * 2  # a retry fixed it
    worst = res.examples[0]  # a record without a score comes first
    assert worst["id"] == "pw-003" and "win_rate" not in worst["scores"]
    assert worst["judge"][0]["error"].startswith("unparseable after 3 attempts")
    assert any("1 of 12 verdicts stayed unparseable" in n for n in res.notes)
    assert "win_rate" not in res.item_scores  # compare only pairs complete per-item scores


# -- G-Eval ----------------------------------------------------------------------------------

SUMS = D.load_summarization()[:3]


def summary_model():
    return Model(lambda p, t, s: "A short summary.")


def test_g_eval_weights_by_the_judges_probabilities_and_says_so():
    probs = {SUMS[0].document: [0.0, 0.0, 0.5, 0.5, 0.0], SUMS[1].document: None,
             SUMS[2].document: [0.1, 0.1, 0.2, 0.2, 0.4]}

    def probs_of(prompt):
        return next(v for doc, v in probs.items() if doc in prompt)

    judge = ProbJudge(lambda p, s, t: "Coherence: 2", probs_of)
    res = run(TaskConfig(name="g", kind="g_eval", dataset="summarization", limit=3), summary_model(), judge)
    assert res.item_scores["g_eval"] == pytest.approx([3.5, 2.0, 3.7])  # sum_i p(i) * i; the parsed 2
    assert res.metrics["g_eval"].value == pytest.approx((3.5 + 2.0 + 3.7) / 3)
    assert any("2 of 3 scores weighted by the judge's next-token probabilities" in n for n in res.notes)
    modes = {r["id"]: r["judge"][0]["mode"] for r in res.examples}
    assert modes == {SUMS[0].id: "probabilities", SUMS[1].id: "parsed", SUMS[2].id: "probabilities"}
    assert len(judge.prompts) == 1 and "Evaluation form (scores ONLY):\n- Coherence (1-5):" in judge.prompts[0]
    assert f"Source text:\n{SUMS[1].document}\n\nSummary:\nA short summary." in judge.prompts[0]

    plain = run(TaskConfig(name="g", kind="g_eval", dataset="summarization", limit=3), summary_model(),
                Judge(lambda p, s, t: "4"))
    assert plain.metrics["g_eval"].value == 4.0 and any("0 of 3 scores weighted" in n for n in plain.notes)


def test_g_eval_needs_a_rubric_outside_summaries():
    with pytest.raises(ConfigError, match="kind 'g_eval' on a 'qa' set needs a 'g_eval' block"):
        TaskConfig(name="g", kind="g_eval", dataset="qa")
    task = config_from_dict(TaskConfig, {"name": "g", "kind": "g_eval", "dataset": "qa", "limit": 1, "g_eval": {
        "criterion": "Correctness", "criteria": "the answer is right.", "steps": ["Read.", "Score 1-5."],
        "source_kind": "question", "output_kind": "answer"}})
    assert isinstance(task.g_eval, GEvalConfig) and task.g_eval.steps == ["Read.", "Score 1-5."]
    judge = Judge(lambda p, s, t: "5")
    run(task, qa_model(wrong=()), judge)
    assert "- Correctness (1-5):" in judge.prompts[0] and f"Question: {QA[0].question}" in judge.prompts[0]
    with pytest.raises(ConfigError, match="'g_eval' applies to kind 'g_eval' only"):
        TaskConfig(name="j", kind="judge", dataset="qa", g_eval=GEvalConfig())


# -- DAG -------------------------------------------------------------------------------------

DAG_SUITE = """
name: dag
tasks:
  - name: dag
    kind: dag
    dataset: qa
    limit: 4
    dag:
      root: on_topic
      nodes:
        - {id: on_topic, question: "Does '{answer}' respond to: {question}", if_yes: correct, if_no: 0.0}
        - {id: correct, question: "Is '{answer}' the same as '{reference}'?", if_yes: 1.0, if_no: 0.5}
"""


def dag_judge_model():
    def reply(prompt, seed, temperature):
        if prompt.startswith("Does"):
            return "No." if "I do not know" in prompt else "Yes."
        return "yes" if between(prompt, "Is '", "' the same") == between(prompt, "as '", "'?") else "no"

    return Judge(reply)


def test_dag_declared_in_yaml_follows_its_decision_path(tmp_path):
    (tmp_path / "s.yaml").write_text(DAG_SUITE)
    (task,) = load_config(SuiteConfig, tmp_path / "s.yaml").tasks

    def answer(prompt, temperature, seed):
        k = next(i for i, it in enumerate(QA) if it.question in prompt)
        return [QA[0].answers[0], "I do not know.", QA[2].answers[0], "Bananas are yellow."][k]

    res = run(task, Model(answer), dag_judge_model())
    assert res.item_scores["dag_score"] == [1.0, 0.0, 1.0, 0.5]
    paths = {r["id"]: r["judge"][0]["path"] for r in res.examples}
    assert paths[QA[1].id] == [["on_topic", False]]
    assert paths[QA[3].id] == [["on_topic", True], ["correct", False]]
    assert paths[QA[0].id] == [["on_topic", True], ["correct", True]]
    assert res.metrics["judge_errors"].value == 0 and res.examples[0]["id"] == QA[1].id


def test_dag_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DAG_SUITE.replace("root: on_topic", "root: missing"))
    with pytest.raises(ConfigError, match="dag: root 'missing' is not a node"):
        load_config(SuiteConfig, bad)
    bad.write_text(DAG_SUITE.replace("if_no: 0.5", "if_no: no"))  # YAML reads `no` as false
    with pytest.raises(ConfigError, match="node 'correct' has if_no=False; expected a node id or a terminal score"):
        load_config(SuiteConfig, bad)
    bad.write_text(DAG_SUITE.replace("'{reference}'", "'{gold}'"))
    (task,) = load_config(SuiteConfig, bad).tasks
    with pytest.raises(ConfigError, match=r"dag node 'correct' .* uses \{gold\}; the fields are \[.*'reference'"):
        run(task, qa_model(), dag_judge_model())
    with pytest.raises(ConfigError, match="kind 'dag' needs a 'dag' block"):
        TaskConfig(name="d", kind="dag", dataset="qa")


def test_judge_seeds_report_the_spread_for_every_judge_kind(tmp_path):
    (tmp_path / "s.yaml").write_text(DAG_SUITE + "    judge_seeds: [0, 1]\n    judge_temperature: 0.7\n")
    (task,) = load_config(SuiteConfig, tmp_path / "s.yaml").tasks

    def reply(prompt, seed, temperature):  # seed 1 never finds anything correct
        return "no" if seed == 1 and prompt.startswith("Is") else dag_judge_model().reply(prompt, seed, temperature)

    res = run(task, qa_model(), Judge(reply))
    # seed 0: [1, 0, 1, 0]; seed 1: [0.5, 0, 0.5, 0]; an item's score is its mean over the seeds
    assert res.item_scores["dag_score"] == [0.75, 0.0, 0.75, 0.0]
    assert res.metrics["judge_seed_std"].value == pytest.approx(statistics.stdev([0.5, 0.25]))
    assert any("dag_score across seeds [0, 1]: mean 0.3750" in n for n in res.notes)


# -- SelfCheckGPT ----------------------------------------------------------------------------

def selfcheck_model():
    """Greedy: 'It is <gold answer>.'; sampled: the same on items 0-1, something else on 2-3."""

    def answer(prompt, temperature, seed):
        k = next(i for i, it in enumerate(QA) if it.question in prompt)
        if temperature == 0 or k < 2:
            return f"It is {QA[k].answers[0]}."
        return f"Maybe {seed}."

    return Model(answer)


def test_selfcheck_ngram_flags_answers_the_samples_do_not_support():
    model = selfcheck_model()
    task = TaskConfig(name="sc", kind="selfcheck", dataset="qa", limit=4, n_samples=3)
    res = run(task, model)
    s = res.item_scores["selfcheck_ngram"]
    assert max(s[0], s[1]) < min(s[2], s[3])
    assert {r["id"] for r in res.examples[:2]} == {QA[2].id, QA[3].id}  # higher is worse
    assert model.prompts == 4 + 4 * 3
    for r in res.examples:  # the harness equals the library on the recorded samples
        want = [avg for avg, _ in selfcheck_ngram(split_sentences(r["prediction"]), r["samples"])]
        assert r["sentence_scores"] == pytest.approx(want)
    assert len(set(next(r for r in res.examples if r["id"] == QA[3].id)["samples"])) == 3  # one seed per sample
    with pytest.raises(ConfigError, match="n_samples >= 2"):
        TaskConfig(name="sc", kind="selfcheck", dataset="qa")
    with pytest.raises(ConfigError, match=r"sample_temperature=0.0, expected > 0"):
        TaskConfig(name="sc", kind="selfcheck", dataset="qa", n_samples=2, sample_temperature=0.0)
    with pytest.raises(ConfigError, match=r"TaskConfig.variant: got 'nli', expected one of \['ngram', 'bertscore'\]"):
        config_from_dict(TaskConfig, {"name": "sc", "kind": "selfcheck", "dataset": "qa", "n_samples": 2,
                                      "variant": "nli"})


def test_selfcheck_bertscore_variant_scores_with_bertscore(monkeypatch):
    import lmstack.eval.judge_tasks as JT

    monkeypatch.setattr(JT, "_bertscore_f1", lambda: lambda p, r: [1.0 if a == b else 0.2 for a, b in zip(p, r)])
    res = run(TaskConfig(name="sc", kind="selfcheck", dataset="qa", limit=4, n_samples=3, variant="bertscore"),
              selfcheck_model())
    assert res.item_scores["selfcheck_bertscore"] == pytest.approx([0.0, 0.0, 0.8, 0.8])


# -- RAG -------------------------------------------------------------------------------------

WATER = {"id": "c1", "text": "Water freezes at 0 degrees."}
MOON = {"id": "c2", "text": "The Moon orbits Earth."}
RAG_ROWS = [
    {"id": "a", "question": "When does water freeze?", "contexts": [MOON, WATER], "gold_ids": ["c1"],
     "reference": "Water freezes at 0 degrees. It boils at 100 degrees.",
     "answer": "It freezes at 0 degrees. It is blue."},
    {"id": "b", "question": "What does the Moon orbit?", "contexts": [MOON], "gold_ids": ["c2", "c3"],
     "reference": "The Moon orbits Earth.", "answer": "I cannot tell."},
]


def rag_file(tmp_path, rows=RAG_ROWS):
    import json

    p = tmp_path / "rag.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def rag_judge():
    supported = {"It freezes at 0 degrees.", "Water freezes at 0 degrees.", "The Moon orbits Earth."}

    def reply(prompt, seed, temperature):
        if "Statement: " in prompt:
            statement = between(prompt, "Statement: ", "\n")
            return "???" if "boils" in statement else ("yes" if statement in supported else "no")
        if "Retrieved text:" in prompt:
            return "yes" if "Water" in between(prompt, "Retrieved text:\n", "\n") else "no"
        return "When does water freeze?" if "freezes" in prompt else "What is blue?"

    return Judge(reply)


def stub_embed(texts):
    import torch

    def vec(t):
        return [1.0, 0.0] if "freeze" in t else [0.0, 1.0] if "Moon" in t else [1.0, 1.0]

    return torch.tensor([vec(t) for t in texts])


def test_rag_task_on_hand_checked_items(tmp_path, monkeypatch):
    import lmstack.eval.rag_metrics as R

    monkeypatch.setattr(R, "default_embed", lambda: stub_embed)
    task = TaskConfig(name="rag", kind="rag", dataset=rag_file(tmp_path), dataset_type="rag", ks=[1, 2],
                      answer_source="dataset")
    judge = rag_judge()
    res = run(task, judge=judge)
    m = {k: v.value for k, v in res.metrics.items()}
    assert m["hit@1"] == 0.5 and m["hit@2"] == 1.0 and m["recall@1"] == 0.25 and m["mrr"] == 0.75
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1 / (1 + 1 / math.log2(3))) / 2)
    assert res.item_scores["faithfulness"] == [0.5, 0.0]  # "It is blue." is not in the contexts
    assert res.item_scores["context_precision"] == [0.5, 0.0]  # the useful chunk is ranked second
    assert res.item_scores["context_recall"] == [1.0, 1.0]  # the unparseable verdict is left out
    assert res.item_scores["answer_relevance"] == pytest.approx([1.0, 1 / math.sqrt(2)])
    # 3 answer + 3 reference sentences, 3 chunks, 3 questions per answer; one verdict never parsed
    assert res.metrics["judge_errors"].value == 1 and res.metrics["judge_errors"].n == 3 + 3 + 3 + 6
    rec = next(r for r in res.examples if r["id"] == "a")
    assert rec["retrieved"] == ["c2", "c1"] and rec["judge"][0]["context_recall"] == {"verdicts": [True, None],
                                                                                     "errors": 1}


def test_rag_generates_the_answer_from_the_retrieved_passages(tmp_path):
    model = Model(lambda p, t, s: "It freezes at 0 degrees." if "water" in p else "")
    task = TaskConfig(name="rag", kind="rag", dataset=rag_file(tmp_path), dataset_type="rag",
                      metrics=["faithfulness"])
    res = run(task, model, rag_judge())
    assert model.prompts == 2 and res.metrics["faithfulness"].value == 1.0 and res.metrics["faithfulness"].n == 1
    assert "rag: 1 answers have no sentence to check; left out of faithfulness" in res.notes
    rec = next(r for r in res.examples if r["id"] == "a")
    assert "[c2] The Moon orbits Earth.\n\n[c1] Water freezes at 0 degrees.\n\nQuestion: When does water freeze?" \
        in rec["prompt"]
    no_answers = rag_file(tmp_path, [{k: v for k, v in r.items() if k != "answer"} for r in RAG_ROWS])
    with pytest.raises(ConfigError, match=r"answer_source 'dataset' needs an 'answer' on every item; missing on "
                                          r"\['a', 'b'\]"):
        run(TaskConfig(name="rag", kind="rag", dataset=no_answers, dataset_type="rag", answer_source="dataset"),
            judge=rag_judge())


def test_rag_on_the_shipped_set_retrieval_metrics():
    items = D.load_rag()
    judge = Judge(lambda p, s, t: "Yes")
    res = run(TaskConfig(name="rag", kind="rag", dataset="rag", ks=[1, 3], answer_source="dataset",
                         metrics=["faithfulness", "context_recall", "context_precision"]), judge=judge)
    m = {k: v.value for k, v in res.metrics.items()}
    # gold first at rank 1 on 9 items, rank 2 on 4, rank 3 on 1, missed on 2; rag-08 has two gold ids
    assert m["hit@1"] == 9 / 16 and m["hit@3"] == 14 / 16 and m["mrr"] == pytest.approx((9 + 4 / 2 + 1 / 3) / 16)
    assert m["recall@1"] == pytest.approx(8.5 / 16) and m["recall@3"] == 14 / 16
    assert m["faithfulness"] == m["context_recall"] == m["context_precision"] == 1.0
    asked = sum(len(split_sentences(it.answer)) + len(split_sentences(it.reference)) + len(it.contexts) for it in items)
    assert res.metrics["judge_errors"].n == asked
    assert len(judge.prompts) == asked - 1  # rag-13's answer is its reference: the same question, asked once


def test_rag_config_errors():
    with pytest.raises(ConfigError, match=r"metrics \['bleu'\] are not RAG metrics"):
        TaskConfig(name="r", kind="rag", dataset="rag", metrics=["bleu"])
    with pytest.raises(ConfigError, match=r"ks=\[0\], expected retrieval cut-offs >= 1"):
        TaskConfig(name="r", kind="rag", dataset="rag", ks=[0])
    with pytest.raises(ConfigError, match=r"kind 'rag' needs a dataset of type \['rag'\], got 'qa'"):
        TaskConfig(name="r", kind="rag", dataset="qa")
    with pytest.raises(ConfigError, match="TaskConfig.answer_source: got 'human'"):
        config_from_dict(TaskConfig, {"name": "r", "kind": "rag", "dataset": "rag", "answer_source": "human"})


# -- GPTScore --------------------------------------------------------------------------------

def test_gpt_score_is_the_mean_token_logprob_of_the_reference(tmp_path):
    from lmstack.eval.lm_metrics import gpt_score
    from lmstack.eval.models import LLMModel
    from lmstack.infer import LLM

    model = LLMModel(LLM.load("tiny-llama"), batch_size=2)
    task = TaskConfig(name="gs", kind="gpt_score", dataset="translation", limit=3)
    cache = OutputCache(tmp_path / "cache.jsonl")
    res = run(task, model, cache=cache)
    items = D.load_translation()[:3]
    prompts = [f"Translate from {it.source_lang} to {it.target_lang}.\n\n{it.source}\n\nTranslation:" for it in items]
    want = gpt_score(model.llm, prompts, [" " + it.references[0] for it in items], "{source}")
    assert res.item_scores["gpt_score"] == pytest.approx(want) and all(v < 0 for v in want)
    again = run(task, model, cache=OutputCache(tmp_path / "cache.jsonl"))
    assert again.item_scores == res.item_scores and len((tmp_path / "cache.jsonl").read_text().splitlines()) == 3
    with pytest.raises(UnsupportedError, match="gpt_score needs a local model"):
        run(task, Model(lambda p, t, s: ""))


# -- the output cache and the suite ----------------------------------------------------------

def test_every_judge_kind_needs_a_judge_and_the_others_do_not():
    for kind, dataset, extra in [("judge", "qa", {}), ("pairwise", "pairwise", {}), ("g_eval", "summarization", {}),
                                 ("rag", "rag", {})]:
        with pytest.raises(ConfigError, match=f"kind '{kind}' needs a judge model"):
            run(TaskConfig(name="t", kind=kind, dataset=dataset, limit=1, **extra))
    with pytest.raises(ConfigError, match="judge_seeds is empty"):
        TaskConfig(name="t", kind="pairwise", dataset="pairwise", judge_seeds=[])
    with pytest.raises(ConfigError, match=r"kind 'pairwise' needs a dataset of type \['pairwise', 'qa'"):
        TaskConfig(name="t", kind="pairwise", dataset="multiple_choice")


def cached_runs(tmp_path, monkeypatch):
    """(task, model factory, judge factory) for every judge-based kind."""
    import lmstack.eval.rag_metrics as R

    monkeypatch.setattr(R, "default_embed", lambda: stub_embed)
    (tmp_path / "s.yaml").write_text(DAG_SUITE)
    (dag_task,) = load_config(SuiteConfig, tmp_path / "s.yaml").tasks
    pw_reply = label_judge({"pw-002"}).reply
    return [
        (TaskConfig(name="j", kind="judge", dataset="qa", limit=4, judge_seeds=[0, 1], judge_temperature=0.5),
         qa_model, lambda: Judge(lambda p, s, t: "I cannot say" if s == 0 else "4")),
        (TaskConfig(name="pw", kind="pairwise", dataset="pairwise"), qa_model, lambda: Judge(pw_reply)),
        (TaskConfig(name="pq", kind="pairwise", dataset="qa", limit=4), qa_model, lambda: Judge(lambda p, s, t: "B")),
        (TaskConfig(name="g", kind="g_eval", dataset="summarization", limit=3), summary_model,
         lambda: ProbJudge(lambda p, s, t: "3", lambda p: [0.2] * 5 if SUMS[0].document in p else None)),
        (dag_task, qa_model, dag_judge_model),
        (TaskConfig(name="rag", kind="rag", dataset=rag_file(tmp_path), dataset_type="rag"),
         lambda: Model(lambda p, t, s: "It is blue."), rag_judge),
        (TaskConfig(name="sc", kind="selfcheck", dataset="qa", limit=4, n_samples=3), selfcheck_model, lambda: None),
    ]


def test_a_second_run_asks_the_judge_and_the_model_nothing(tmp_path, monkeypatch):
    for task, make_model, make_judge in cached_runs(tmp_path, monkeypatch):
        path = tmp_path / f"cache-{task.name}.jsonl"
        first_model, first_judge = make_model(), make_judge()
        first = run(task, first_model, first_judge, OutputCache(path))
        assert first_model.prompts + len(getattr(first_judge, "prompts", [])) > 0, task.name
        model, judge = make_model(), make_judge()
        again = run(task, model, judge, OutputCache(path))
        assert model.prompts == 0 and (judge is None or judge.prompts == []), task.name
        assert getattr(judge, "prob_prompts", []) == [], task.name
        assert {k: v.value for k, v in again.metrics.items()} == {k: v.value for k, v in first.metrics.items()}
        assert again.examples == first.examples, task.name


def test_the_judge_cache_key_has_the_judge_identity_and_the_seed(tmp_path):
    task = TaskConfig(name="pw", kind="pairwise", dataset="pairwise", limit=2)
    path = tmp_path / "cache.jsonl"
    run(task, judge=label_judge(), cache=OutputCache(path))
    other = label_judge()
    other.identity = "another-judge"
    run(task, judge=other, cache=OutputCache(path))
    assert len(other.prompts) == 4
    reseeded = label_judge()
    run(TaskConfig(name="pw", kind="pairwise", dataset="pairwise", limit=2, judge_seeds=[7]), judge=reseeded,
        cache=OutputCache(path))
    assert len(reseeded.prompts) == 4


class Killed(Exception):
    pass


def test_a_run_killed_mid_way_resumes_without_asking_again(tmp_path):
    path = tmp_path / "cache.jsonl"
    task = TaskConfig(name="pw", kind="pairwise", dataset="pairwise")
    dying = label_judge()
    reply = dying.reply

    def die_after_first_batch(prompt, seed, temperature):
        if dying.batches > 1:
            raise Killed
        return reply(prompt, seed, temperature)

    dying.reply = die_after_first_batch
    with pytest.raises(Killed):
        run(task, judge=dying, cache=OutputCache(path))
    assert len(path.read_text().splitlines()) == 8  # the judge's batch of 8 was saved
    resumed = label_judge()
    res = run(task, judge=resumed, cache=OutputCache(path))
    assert len(resumed.prompts) == 2 * 12 - 8
    fresh = run(task, judge=label_judge())
    assert res.item_scores == fresh.item_scores


def test_suite_with_every_new_kind_writes_a_report(tmp_path, monkeypatch):
    import lmstack.eval.rag_metrics as R

    monkeypatch.setattr(R, "default_embed", lambda: stub_embed)

    class Both:
        """One object as model and judge: QA answers, and verdicts for every judge prompt."""

        identity = "both"

        def __init__(self):
            self.qa, self.dag = qa_model(wrong=()), dag_judge_model()

        def generate_batch(self, prompts, max_new_tokens, temperature=0.0, seeds=None, chat=False):
            seeds = seeds or [None] * len(prompts)
            out = []
            for p, s in zip(prompts, seeds):
                if "Better response:" in p:
                    out.append("A")
                elif p.endswith("(1-5):"):
                    out.append("4")
                elif p.startswith(("Does", "Is '")):
                    out.append(self.dag.reply(p, s, temperature))
                elif "yes or no" in p:
                    out.append("yes")
                elif p.endswith("Question:"):
                    out.append("When does water freeze?")
                elif any(it.question in p for it in QA):
                    out.append(self.qa.answer(p, temperature, s))
                else:
                    out.append("A short summary.")
            return out

    suite = tmp_path / "s.yaml"
    suite.write_text(DAG_SUITE + f"""
  - {{name: pw, kind: pairwise, dataset: pairwise, limit: 4}}
  - {{name: g, kind: g_eval, dataset: summarization, limit: 2}}
  - {{name: sc, kind: selfcheck, dataset: qa, limit: 2, n_samples: 2}}
  - {{name: rag, kind: rag, dataset: {rag_file(tmp_path)}, dataset_type: rag, ks: [1]}}
gates: ["pw.position_bias <= 1.0", "rag.faithfulness >= 0.5"]
""")
    both = Both()
    report = run_suite(load_config(SuiteConfig, suite), both, "both", both, progress=False,
                       cache=OutputCache(tmp_path / "cache.jsonl"))
    assert [t.kind for t in report.tasks] == ["dag", "pairwise", "g_eval", "selfcheck", "rag"]
    assert report.passed and report.metric_table()["pw.position_bias"] == 1.0  # always "A": every verdict flips
    report.write(tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| g | g_eval | 4 |" in md and "| rag | faithfulness | 1 |" in md and "| pw | judge_errors | 0 |" in md


# -- likelihood verdicts ---------------------------------------------------------------------

class LikelihoodJudge(Judge):
    """A local-style judge: ``score(prompt, option)`` is the log-likelihood of ``option`` as its
    reply (``scored`` records those prompts); ``reply`` answers what still needs generation."""

    def __init__(self, score, reply=lambda p, s, t: "When does water freeze?"):
        super().__init__(reply)
        self.score, self.scored = score, []

    def option_loglikelihoods(self, prompts, options, chat=True):
        self.scored += list(prompts)
        return [[self.score(p, o) for o in options] for p in prompts]


def likelihood_label_judge(close=()):
    """Prefers the labelled answer of the shipped pairwise set by 2 nats, by 0.05 on ``close``."""
    items = {it.question: it for it in D.load_pairwise()}

    def score(prompt, option):
        it = items[between(prompt, "Question: ", "\n")]
        better = it.answer_1 if it.label == "1" else it.answer_2
        return 0.0 if between(prompt, f"Response {option}: ", "\n\n") == better else (
            -0.05 if it.id in close else -2.0)

    return LikelihoodJudge(score)


def test_pairwise_likelihood_verdicts_report_margins_and_low_confidence():
    judge = likelihood_label_judge(close={"pw-004", "pw-007"})
    res = run(TaskConfig(name="pw", kind="pairwise", dataset="pairwise", judge_mode="likelihood",
                         judge_seeds=[0, 1, 2]), judge=judge)
    m = {k: v.value for k, v in res.metrics.items()}
    assert m["agreement"] == 1.0 and m["position_bias"] == 0.0 and m["judge_errors"] == 0
    assert m["judge_low_confidence"] == pytest.approx(4 / 24) and res.metrics["judge_low_confidence"].n == 24
    assert judge.prompts == [] and len(judge.scored) == 24  # no generation; each order once, one seed
    assert "judge_seed_std" not in m
    assert any("4 of 24 were decided by a margin below 0.2 nats (low confidence)" in n for n in res.notes)
    assert any("does not depend on the seed, so the judge ran once, with seed 0 (judge_seeds [0, 1, 2])" in n
               for n in res.notes)
    rec = res.examples[0]
    assert rec["judge"][0]["seed"] == 0 and len(rec["judge"]) == 1
    assert rec["judge"][0]["margins"] == pytest.approx([0.05, 0.05] if rec["id"] in {"pw-004", "pw-007"}
                                                       else [2.0, 2.0])


def test_a_likelihood_judge_that_prefers_the_first_position_has_position_bias_one():
    judge = LikelihoodJudge(lambda p, o: 0.0 if o == "A" else -1.0)
    res = run(TaskConfig(name="pw", kind="pairwise", dataset="pairwise", judge_mode="likelihood"), judge=judge)
    assert res.metrics["position_bias"].value == 1.0 and res.metrics["win_rate"].value == 0.5  # every item a tie
    assert res.metrics["judge_low_confidence"].value == 0.0 and res.metrics["judge_errors"].value == 0


def test_likelihood_grades_and_checks_in_the_other_judge_kinds(tmp_path):
    probs = [0.05, 0.1, 0.2, 0.4, 0.25]
    grader = LikelihoodJudge(lambda p, o: math.log(probs[int(o) - 1]))
    res = run(TaskConfig(name="j", kind="judge", dataset="qa", limit=2, judge_mode="likelihood"), qa_model(), grader)
    assert res.item_scores["judge_score"] == [0.75, 0.75]
    assert res.item_scores["judge_score_weighted"] == pytest.approx([(3.7 - 1) / 4] * 2)
    assert res.examples[0]["judge"][0]["probs"] == pytest.approx(probs)
    g = run(TaskConfig(name="g", kind="g_eval", dataset="summarization", limit=2, judge_mode="likelihood"),
            summary_model(), grader)
    assert g.item_scores["g_eval"] == pytest.approx([3.7, 3.7]) and grader.prompts == []
    assert "g_eval: all 2 scores weighted by the judge's likelihoods of the answers 1-5" in g.notes

    (tmp_path / "s.yaml").write_text(DAG_SUITE + "    judge_mode: likelihood\n")
    (dag_task,) = load_config(SuiteConfig, tmp_path / "s.yaml").tasks
    yes_no = dag_judge_model().reply  # the generated verdicts, turned into likelihoods

    def checks(prompt, option):
        return -0.5 if option.lower() in yes_no(prompt, 0, 0.0).lower() else -1.0

    dag = run(dag_task, qa_model(), LikelihoodJudge(checks))
    assert dag.item_scores["dag_score"] == [1.0, 0.0, 1.0, 0.0]
    assert dag.metrics["judge_low_confidence"].value == 0.0 and dag.metrics["judge_low_confidence"].n == 6
    assert all(len(r["judge"][0]["margins"]) == len(r["judge"][0]["path"]) for r in dag.examples)


def test_rag_likelihood_checks_keep_margins_and_still_generate_questions(tmp_path, monkeypatch):
    import lmstack.eval.rag_metrics as R

    monkeypatch.setattr(R, "default_embed", lambda: stub_embed)
    generated = rag_judge().reply

    def checks(prompt, option):  # the scripted verdicts; the unparseable one becomes a close call
        said = generated(prompt, 0, 0.0)
        if said == "???":
            return -0.1 if option.lower() == "no" else -0.15
        return -0.2 if option.lower() == said else -2.0

    judge = LikelihoodJudge(checks, generated)
    task = TaskConfig(name="rag", kind="rag", dataset=rag_file(tmp_path), dataset_type="rag",
                      answer_source="dataset", judge_mode="likelihood")
    res = run(task, judge=judge)
    assert res.item_scores["faithfulness"] == [0.5, 0.0] and res.item_scores["context_precision"] == [0.5, 0.0]
    assert res.item_scores["context_recall"] == [0.5, 1.0]  # "boils ..." is now a (close) "no", not an error
    assert res.metrics["judge_errors"].value == 0 and len(judge.scored) == 3 + 3 + 3
    assert res.metrics["judge_low_confidence"].value == pytest.approx(1 / 9)
    assert len(judge.prompts) == 6  # answer_relevance: 3 generated questions per answer
    assert any("answer_relevance still generates its questions" in n for n in res.notes)
    rec = next(r for r in res.examples if r["id"] == "a")
    assert rec["judge"][0]["context_recall"]["margins"] == pytest.approx([1.8, 0.05])


def test_likelihood_mode_needs_a_judge_with_loglikelihoods(tmp_path):
    from lmstack.eval.models import OpenAIModel

    endpoint = OpenAIModel("judge-model", base_url="http://127.0.0.1:9/v1", max_retries=0)  # never reached
    task = TaskConfig(name="pw", kind="pairwise", dataset="pairwise", judge_mode="likelihood")
    with pytest.raises(ConfigError, match=r"task 'pw': judge_mode 'likelihood' needs a judge that exposes "
                                          r"log-likelihoods of its answers \(a local model\); the judge "
                                          r"http://127.0.0.1:9/v1#judge-model does not"):
        run(task, judge=endpoint)
    model = qa_model()
    suite = SuiteConfig("s", [TaskConfig(name="qa", kind="generative", dataset="qa", limit=2), task])
    with pytest.raises(ConfigError, match="judge_mode 'likelihood'"):
        run_suite(suite, model, "m", endpoint, progress=False)
    assert model.prompts == 0  # checked before any task ran
    with pytest.raises(ConfigError, match=r"judge_mode 'likelihood' applies to the judge kinds \['judge', "):
        TaskConfig(name="sc", kind="selfcheck", dataset="qa", n_samples=2, judge_mode="likelihood")
    with pytest.raises(ConfigError, match=r"TaskConfig.judge_mode: got 'logits', expected one of "
                                          r"\['generate', 'likelihood'\]"):
        config_from_dict(TaskConfig, {"name": "pw", "kind": "pairwise", "dataset": "pairwise",
                                      "judge_mode": "logits"})
    with pytest.raises(ConfigError, match=r"judge_low_margin=-1, expected a log-probability gap >= 0"):
        TaskConfig(name="pw", kind="pairwise", dataset="pairwise", judge_low_margin=-1)


def test_a_second_likelihood_run_asks_the_judge_nothing(tmp_path, monkeypatch):
    for task, make_model, make_judge in cached_runs(tmp_path, monkeypatch):
        if task.kind == "selfcheck":
            continue
        task.judge_mode = "likelihood"
        path = tmp_path / f"lik-{task.name}.jsonl"

        def make_likelihood_judge():
            reply = make_judge().reply
            return LikelihoodJudge(lambda p, o: -0.1 if reply(p, 0, 0.0).lower().startswith(o.lower()) else -1.0,
                                   reply)

        first_judge = make_likelihood_judge()
        first = run(task, make_model(), first_judge, OutputCache(path))
        assert first_judge.scored, task.name
        model, judge = make_model(), make_likelihood_judge()
        again = run(task, model, judge, OutputCache(path))
        assert model.prompts == 0 and judge.scored == [] and judge.prompts == [], task.name
        assert {k: v.value for k, v in again.metrics.items()} == {k: v.value for k, v in first.metrics.items()}
        assert again.examples == first.examples, task.name


def test_likelihood_tasks_on_a_tiny_local_model_are_cached(tmp_path):
    from lmstack.eval.models import LLMModel
    from lmstack.infer import LLM

    class Counting(LLMModel):
        scored = 0

        def option_loglikelihoods(self, prompts, options, chat=True):
            Counting.scored += len(prompts)
            return super().option_loglikelihoods(prompts, options, chat)

    (tmp_path / "s.yaml").write_text(DAG_SUITE.replace("limit: 4", "limit: 2") + "    chat: true\n"
                                     "    max_new_tokens: 4\n    judge_mode: likelihood\n"
                                     "  - {name: pw, kind: pairwise, dataset: pairwise, limit: 2, chat: true, "
                                     "judge_mode: likelihood}\n")
    suite = load_config(SuiteConfig, tmp_path / "s.yaml")
    llm = Counting(LLM.load("tiny-llama"), batch_size=2)
    first = run_suite(suite, llm, "tiny", llm, progress=False, cache=OutputCache(tmp_path / "cache.jsonl"))
    asked = Counting.scored
    assert asked >= 2 + 2 * 2
    dag, pw = first.tasks
    assert dag.metrics["judge_errors"].value == 0 and pw.metrics["judge_errors"].value == 0
    assert all(0.0 <= t.metrics["judge_low_confidence"].value <= 1.0 for t in first.tasks)
    again = run_suite(suite, llm, "tiny", llm, progress=False, cache=OutputCache(tmp_path / "cache.jsonl"))
    assert Counting.scored == asked and again.metric_table() == first.metric_table()
