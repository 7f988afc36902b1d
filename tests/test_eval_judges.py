"""LLM judges with scripted judge models: retries then errors, pairwise swap / position bias on the
labelled fixture, G-Eval probability weighting, DAG paths, SelfCheckGPT, seed spread; likelihood
verdicts against log-likelihoods computed directly on a tiny random model."""

import math

import pytest

from lmstack.errors import ConfigError
from lmstack.eval import datasets as D
from lmstack.eval.judges import (CHOICE_OPTIONS, DAG, SCORE_OPTIONS, YES_NO_OPTIONS, DAGNode, DAGOutcome, GEvalConfig,
                                 ask, choose, dag_judge, g_eval, pairwise, parse_choice, parse_score, parse_yes_no,
                                 pointwise, seed_spread, selfcheck_bertscore, selfcheck_ngram, weighted_score)


class Scripted:
    """A judge whose replies come from ``reply(prompt, seed, temperature)``; counts calls."""

    def __init__(self, reply, probs=None):
        self.reply, self.probs, self.calls = reply, probs, []

    def generate_batch(self, prompts, max_new_tokens, temperature=0.0, seeds=None, chat=False, stop=()):
        self.calls.append((list(prompts), temperature, list(seeds or [])))
        return [self.reply(p, (seeds or [0])[0], temperature) for p in prompts]

    def option_probs(self, prompt, options, chat=True):
        return self.probs


def test_unparseable_verdicts_are_retried_then_recorded_as_errors():
    judge = Scripted(lambda p, seed, t: "I refuse" if "bad" in p or seed == 0 else "Score: 4")
    calls = ask(judge, ["good 1", "bad 2"], parse_score, seed=0, retries=2)
    assert [c.value for c in calls] == [4, None]
    assert calls[0].replies == ["I refuse", "Score: 4"] and len(calls[1].replies) == 3
    assert calls[1].error.startswith("unparseable after 3 attempts") and calls[0].error is None
    assert [len(c[0]) for c in judge.calls] == [2, 2, 1]  # only failures are asked again
    assert judge.calls[1][1] >= 0.7 and judge.calls[1][2] == [1, 1]  # retries change seed and temperature


def test_pointwise_maps_grades_and_never_scores_errors():
    judge = Scripted(lambda p, s, t: "5 correct" if "Answer: Paris" in p else "no verdict")
    calls = pointwise(judge, ["Capital of France?"] * 2, ["Paris", "Lyon"], ["Paris"] * 2, retries=1)
    assert calls[0].value == 1.0 and calls[1].value is None and calls[1].error


def _label_judge(bias_ids):
    """Picks the answer containing the known fact; on items in ``bias_ids`` always says 'A'."""
    truth = {it.question: (it.answer_1 if it.label == "1" else it.answer_2) for it in D.load_pairwise()}
    ids = {it.question: it.id for it in D.load_pairwise()}

    def reply(prompt, seed, t):
        q = prompt.split("Question: ")[1].split("\n")[0]
        if ids[q] in bias_ids:
            return "A"
        a = prompt.split("Response A: ")[1].split("\n\nResponse B:")[0]
        return "A" if a == truth[q] else "B is better"

    return Scripted(reply)


def test_pairwise_on_the_labelled_fixture_reports_agreement_and_position_bias():
    items = D.load_pairwise()
    biased = {"pw-002", "pw-005", "pw-009"}
    s = pairwise(_label_judge(biased), [i.question for i in items], [i.answer_1 for i in items],
                 [i.answer_2 for i in items], labels=[i.label for i in items])
    assert s.n == 12 and s.n_errors == 0
    assert s.position_bias == pytest.approx(3 / 12)  # same position both orders on the biased items
    assert s.consistency == pytest.approx(9 / 12)
    assert s.agreement == pytest.approx(9 / 12)  # inconsistent verdicts become ties, which miss the label
    assert [v.winner for v in s.verdicts if v.winner == "tie"] == ["tie"] * 3
    assert [v.flipped for v in s.verdicts] == [it.id in biased for it in items]
    assert s.first_position_rate == pytest.approx((9 + 6) / 24)
    unbiased = pairwise(_label_judge(set()), [i.question for i in items], [i.answer_1 for i in items],
                        [i.answer_2 for i in items], labels=[i.label for i in items])
    assert unbiased.agreement == 1.0 and unbiased.position_bias == 0.0 and unbiased.first_position_rate == 0.5


def test_pairwise_errors_are_counted_not_scored():
    judge = Scripted(lambda p, s, t: "hmm")
    s = pairwise(judge, ["q"], ["a"], ["b"], labels=["1"], retries=1)
    assert s.n_errors == 1 and s.agreement is None and s.verdicts[0].winner is None


def test_parsers():
    assert parse_choice("B") == "B" and parse_choice("Response A is better") == "A"
    assert parse_choice("[[C]]") == "tie" and parse_choice("neither") is None
    assert parse_yes_no("Yes, it does.") is True and parse_yes_no("no") is False and parse_yes_no("maybe") is None
    assert parse_score("Score: 4/5") == 4 and parse_score("7") is None


def test_g_eval_weights_scores_by_probability_and_falls_back_to_parsing():
    probs = [0.0, 0.1, 0.2, 0.3, 0.4]
    judge = Scripted(lambda p, s, t: "3", probs=probs)
    calls = g_eval(judge, ["source"], ["summary"], GEvalConfig())
    assert calls[0].value == pytest.approx(sum((i + 1) * p for i, p in enumerate(probs)))  # 4.0
    assert calls[0].probs == probs and calls[0].replies == []  # what the value was weighted by
    assert judge.calls == []  # probabilities were enough
    assert weighted_score([1, 1, 0, 0, 0]) == pytest.approx(1.5)
    no_probs = Scripted(lambda p, s, t: "Coherence: 2")
    assert g_eval(no_probs, ["s"], ["o"])[0].value == 2
    assert "Evaluation steps:\n1. " in no_probs.calls[0][0][0]


def test_dag_judge_follows_the_declared_path():
    dag = DAG([DAGNode("on_topic", "Is '{answer}' about {topic}?", "correct", 0.0),
               DAGNode("correct", "Is '{answer}' correct?", 1.0, 0.25)], root="on_topic")
    judge = Scripted(lambda p, s, t: "yes" if ("about" in p or "Paris" in p) else "no")
    out = dag_judge(judge, dag, [{"answer": "Paris", "topic": "France"}, {"answer": "Lyon", "topic": "France"}])
    assert out[0] == DAGOutcome(1.0, [("on_topic", True), ("correct", True)])
    assert out[1] == DAGOutcome(0.25, [("on_topic", True), ("correct", False)])
    broken = dag_judge(Scripted(lambda p, s, t: "?"), dag, [{"answer": "x", "topic": "y"}], retries=0)
    assert broken[0].score is None and "on_topic" in broken[0].error
    with pytest.raises(ConfigError, match="cycle"):
        DAG([DAGNode("a", "?", "b", 0.0), DAGNode("b", "?", "a", 1.0)], root="a")
    with pytest.raises(ConfigError, match="not a node"):
        DAG([DAGNode("a", "?", "zz", 0.0)], root="a")
    with pytest.raises(ConfigError, match="node 'a' has if_yes=True; expected a node id or a terminal score"):
        DAG([DAGNode("a", "?", True, 0.0)], root="a")


def test_selfcheck_ngram_matches_hand_computation():
    out = selfcheck_ngram(["a b"], ["a a", "b c"])
    # counts over samples + sentence: a=3, b=2, c=1; total 6; vocab 3 + 1 (unseen)
    pa, pb = 4 / 10, 3 / 10
    assert out[0][0] == pytest.approx((-math.log(pa) - math.log(pb)) / 2)
    assert out[0][1] == pytest.approx(-math.log(pb))
    supported, unsupported = selfcheck_ngram(["Paris is the capital.", "Zorblax rules Mars."],
                                             ["Paris is the capital of France."] * 3)
    assert unsupported[0] > supported[0]


def test_selfcheck_bertscore_uses_the_best_sentence_per_sample():
    def fake_f1(preds, refs):  # 1 for identical sentences, 0.5 otherwise
        return [1.0 if p == r else 0.5 for p, r in zip(preds, refs)]

    scores = selfcheck_bertscore(["Paris is in France.", "Cats bark."],
                                 ["Paris is in France. Dogs bark.", "It rains."], fake_f1)
    assert scores == pytest.approx([1 - (1.0 + 0.5) / 2, 1 - (0.5 + 0.5) / 2])


def test_seed_spread():
    assert seed_spread([0.5]) == (0.5, 0.0)
    mean, std = seed_spread([0.4, 0.6])
    assert mean == pytest.approx(0.5) and std == pytest.approx(math.sqrt(0.02))


# -- likelihood verdicts ---------------------------------------------------------------------

class Ranked:
    """A judge that only scores answers: ``score(prompt, option)`` is log p(option | prompt). It
    has no ``generate_batch``, so a likelihood verdict cannot fall back on generation."""

    def __init__(self, score):
        self.score, self.asked = score, []

    def option_loglikelihoods(self, prompts, options, chat=True):
        self.asked += list(prompts)
        return [[self.score(p, o) for o in options] for p in prompts]


def direct_loglikelihood(llm, prompt, option, chat):
    """log p(option | prompt) from one forward over the concatenated ids, no harness code."""
    import torch

    ids = llm.chat_ids([{"role": "user", "content": prompt}]) if chat else llm.encode(prompt)
    cont = llm.tokenizer.encode(option if chat else " " + option, add_special_tokens=False)
    logp = torch.log_softmax(llm.logits([ids + cont])[0], dim=-1)  # (T, V)
    return sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(cont))


@pytest.mark.parametrize("chat", [True, False])  # chat: one-token options; plain: " A" is two byte tokens
def test_likelihood_verdicts_are_the_argmax_of_the_loglikelihoods_computed_directly(chat):
    from lmstack.eval.models import LLMModel
    from lmstack.infer import LLM

    llm = LLM.load("tiny-llama")
    model = LLMModel(llm, batch_size=2)
    prompts = ["Is water wet?\nAnswer:", "Pick A or B.\nBetter response:", "Score it 1-5:"]
    for options in (CHOICE_OPTIONS, SCORE_OPTIONS):
        texts = list(options)
        want = [[direct_loglikelihood(llm, p, o, chat) for o in texts] for p in prompts]
        got = model.option_loglikelihoods(prompts, texts, chat)
        assert got == [pytest.approx(row, abs=1e-4) for row in want]
        for call, row in zip(choose(model, prompts, options, chat), want):
            best = max(range(len(row)), key=row.__getitem__)
            assert call.value == options[texts[best]] and call.replies == [] and call.error is None
            assert call.margin == pytest.approx(row[best] - sorted(row)[-2], abs=1e-4) and call.margin >= 0
            assert call.probs == pytest.approx([math.exp(v) / sum(math.exp(u) for u in row) for v in row], abs=1e-4)


def test_a_value_with_several_answer_texts_counts_their_total_probability():
    lp = {"yes": math.log(0.3), "Yes": math.log(0.3), "no": math.log(0.39), "No": math.log(0.01)}
    (call,) = choose(Ranked(lambda p, o: lp[o]), ["q"], YES_NO_OPTIONS)
    assert call.value is True  # "no" is the likeliest text, but yes + Yes = 0.6 > 0.4
    assert call.margin == pytest.approx(math.log(0.6) - math.log(0.4))
    assert call.probs == pytest.approx([0.6, 0.4])
    tied = choose(Ranked(lambda p, o: 0.0), ["q"], CHOICE_OPTIONS)[0]
    assert tied.value == "A" and tied.margin == 0.0  # a tie goes to the value listed first


def test_pairwise_likelihood_judge_preferring_the_first_position_has_position_bias_one():
    judge = Ranked(lambda p, o: 0.0 if o == "A" else -1.5)
    s = pairwise(judge, ["q1", "q2"], ["x1", "x2"], ["y1", "y2"], labels=["1", "2"], mode="likelihood")
    assert s.n_errors == 0 and s.position_bias == 1.0 and s.consistency == 0.0 and s.first_position_rate == 1.0
    assert [v.winner for v in s.verdicts] == ["tie", "tie"] and all(v.flipped for v in s.verdicts)
    assert [v.margins for v in s.verdicts] == [(1.5, 1.5)] * 2
    assert len(judge.asked) == 4  # each order once: nothing to retry


def test_likelihood_grades_carry_the_expected_score():
    probs = [0.05, 0.1, 0.2, 0.4, 0.25]
    judge = Ranked(lambda p, o: math.log(probs[int(o) - 1]))
    (call,) = pointwise(judge, ["q"], ["a"], mode="likelihood")
    assert call.value == 0.75 and call.probs == pytest.approx(probs)  # grade 4 -> (4 - 1) / 4
    assert weighted_score(call.probs) == pytest.approx(3.7) and call.margin == pytest.approx(math.log(0.4 / 0.25))
    (geval,) = g_eval(judge, ["source"], ["summary"], mode="likelihood")
    assert geval.value == pytest.approx(3.7) and geval.replies == []
    dag = DAG([DAGNode("ok", "Is {x} fine?", 1.0, 0.0)], root="ok")
    out = dag_judge(Ranked(lambda p, o: -0.1 if o.lower() == "no" else -3.0), dag, [{"x": "it"}], mode="likelihood")
    assert out[0].score == 0.0 and out[0].path == [("ok", False)] and len(out[0].margins) == 1
    with pytest.raises(ConfigError, match=r"judge mode 'sampled'; expected one of \['generate', 'likelihood'\]"):
        pointwise(judge, ["q"], ["a"], mode="sampled")
    with pytest.raises(ConfigError, match="judge_mode 'likelihood' needs a judge that exposes log-likelihoods"):
        pointwise(Scripted(lambda p, s, t: "4"), ["q"], ["a"], mode="likelihood")
