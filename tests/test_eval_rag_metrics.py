"""RAG metrics with scripted judges: the Ragas formulas, errors never scored."""

import pytest
import torch

from lmstack.eval.rag_metrics import (answer_relevance, average_precision, context_precision, context_recall,
                                      context_precision_scores, faithfulness, faithfulness_scores)

CONTEXT = ["Pure water freezes at 0 degrees Celsius.", "The Moon orbits Earth."]


class FactJudge:
    """Says yes when the statement / chunk mentions a word of the known facts; garbage for 'unclear'."""

    def __init__(self):
        self.batches = 0

    def generate_batch(self, prompts, max_new_tokens, temperature=0.0, seeds=None, chat=False, stop=()):
        self.batches += 1
        out = []
        for p in prompts:
            if "Statement:" in p:
                st = p.split("Statement: ")[1].split("\n")[0]
                out.append("???" if "unclear" in st else ("yes" if "freezes" in st or "orbits" in st else "no"))
            elif "Retrieved text:" in p:
                chunk = p.split("Retrieved text:\n")[1].split("\n")[0]
                out.append("yes" if "water" in chunk else "no")
            else:
                out.append("At what temperature does water freeze?" if seeds[0] % 2 == 0 else "What is ice?")
        return out


def test_faithfulness_and_recall_count_supported_statements():
    j = FactJudge()
    f = faithfulness(j, "Water freezes at 0 degrees. It boils at 50 degrees. The Moon orbits Earth.", CONTEXT)
    assert f.value == pytest.approx(2 / 3) and f.errors == 0
    r = context_recall(j, "Water freezes at zero. This is unclear.", CONTEXT)
    assert r.value == 1.0 and r.errors == 1  # the unparseable verdict is left out, not scored
    none = faithfulness(j, "This is unclear.", CONTEXT)
    assert none.value is None and none.errors == 1


def test_context_precision_is_average_precision_of_useful_chunks():
    assert average_precision([True, False, True]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([False, False]) == 0.0
    j = FactJudge()
    s = context_precision(j, "When does water freeze?", "0 degrees", ["The Moon orbits Earth.", "water freezes at 0"])
    assert s.verdicts == [False, True] and s.value == pytest.approx(0.5)


def test_answer_relevance_is_mean_cosine_to_generated_questions():
    vecs = {"When does water freeze?": [1.0, 0.0], "At what temperature does water freeze?": [0.6, 0.8],
            "What is ice?": [0.0, 1.0]}

    def embed(texts):
        return torch.tensor([vecs[t] for t in texts])

    s = answer_relevance(FactJudge(), "When does water freeze?", "At 0 degrees Celsius.", embed, n=3)
    assert s.value == pytest.approx((0.6 + 0.0 + 0.6) / 3)


def test_list_forms_equal_the_per_item_metrics_in_one_batch():
    answers = ["Water freezes at 0 degrees. It boils at 50 degrees.", "This is unclear.", "The Moon orbits Earth."]
    j = FactJudge()
    many = faithfulness_scores(j, answers, [CONTEXT] * 3)
    assert j.batches == 3  # one batch for all items, then two retries of the unparseable verdict
    assert many == [faithfulness(FactJudge(), a, CONTEXT) for a in answers]
    assert [s.value for s in many] == [0.5, None, 1.0]
    j = FactJudge()
    prec = context_precision_scores(j, ["q1", "q2"], ["r1", "r2"], [CONTEXT, CONTEXT[::-1]])
    assert j.batches == 1 and [s.value for s in prec] == [1.0, 0.5]
