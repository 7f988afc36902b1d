"""SelfCheckGPT-BERTScore and RAG answer relevance with the real all-MiniLM-L6-v2 encoder, not a
stub: sentences the samples support score as more consistent than contradicted ones, and a
relevant answer as more relevant than an off-topic one."""


import pytest

from lmstack.eval.bertscore import bertscore_scores
from lmstack.eval.judges import selfcheck_bertscore
from lmstack.eval.rag_metrics import answer_relevance_scores

SAMPLES = ["The Eiffel Tower is in Paris. It was finished in 1889.",
           "Paris is home to the Eiffel Tower, which was completed in 1889.",
           "The Eiffel Tower stands in Paris and opened in 1889 for a world fair."]


@pytest.mark.slow
def test_selfcheck_bertscore_ranks_supported_below_contradicted(encoder):
    def f1(preds, refs):
        return bertscore_scores(preds, refs, encoder)["f1"]

    sentences = ["The Eiffel Tower is in Paris.", "The Eiffel Tower is in Rome.",
                 "It was finished in 1889.", "It was finished in 1925.",
                 "Bananas grow on trees in Ecuador."]
    paris, rome, y1889, y1925, bananas = selfcheck_bertscore(sentences, SAMPLES, f1)
    # higher = less consistent with the samples (SelfCheckGPT eq. 8)
    assert paris < rome - 0.05 and y1889 < y1925 - 0.1
    assert bananas > max(rome, y1925) + 0.2 and 0.0 <= paris < 0.3
    assert selfcheck_bertscore(["It was finished in 1889."], ["It was finished in 1889."] * 2, f1) == \
        pytest.approx([0.0], abs=1e-5)


@pytest.mark.slow
def test_answer_relevance_prefers_the_relevant_answer(encoder):
    class QuestionWriter:
        """Writes the question an answer answers (the judge's part, scripted)."""

        def generate_batch(self, prompts, max_new_tokens, temperature=0.0, seeds=None, chat=False):
            return ["At what temperature does water freeze?" if "freezes" in p
                    else "Where does the Danube flow into the sea?" for p in prompts]

    relevant, off_topic = answer_relevance_scores(
        QuestionWriter(), ["What is the freezing point of water?"] * 2,
        ["Water freezes at 0 degrees Celsius.", "The Danube flows into the Black Sea."], encoder.encode)
    assert relevant.value > off_topic.value + 0.3 and relevant.value > 0.7
    assert relevant.errors == off_topic.errors == 0 and len(relevant.verdicts) == 3


@pytest.mark.slow
def test_selfcheck_task_with_the_bertscore_variant(encoder):
    from test_eval_judge_tasks import run, selfcheck_model

    from lmstack.eval.tasks import TaskConfig

    res = run(TaskConfig(name="sc", kind="selfcheck", dataset="qa", limit=4, n_samples=3, variant="bertscore"),
              selfcheck_model())
    s = res.item_scores["selfcheck_bertscore"]
    assert max(s[0], s[1]) < 1e-5  # every sample repeats the answer
    assert min(s[2], s[3]) > 0.3  # no sample supports it
