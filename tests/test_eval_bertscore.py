"""BERTScore on our encoder against the bert-score package with the same model and layer."""


import pytest
import torch

from lmstack.eval.bertscore import bertscore, bertscore_scores, idf_weights

CANDS = ["The cat sat on the mat.", "A fast brown fox leaps over a lazy dog.", "Paris is in France.",
         "hello world", "The meeting moved to Thursday."]
REFS = ["A cat was sitting on the mat.", "The quick brown fox jumps over the lazy dog.",
        "The capital of France is Paris.", "goodbye moon", "The meeting has been moved to Thursday afternoon."]


@pytest.mark.slow
@pytest.mark.parametrize("idf", [False, True])
def test_matches_bert_score_package(encoder, idf):
    bert_score = pytest.importorskip("bert_score")
    from lmstack.model.encoder import default_encoder_path

    P, R, F = bert_score.score(CANDS, REFS, model_type=str(default_encoder_path()), num_layers=6, idf=idf,
                               batch_size=8)
    ours = bertscore_scores(CANDS, REFS, encoder, idf=idf)
    assert torch.allclose(torch.tensor(ours["precision"]), P, atol=1e-5)
    assert torch.allclose(torch.tensor(ours["recall"]), R, atol=1e-5)
    assert torch.allclose(torch.tensor(ours["f1"]), F, atol=1e-5)


def test_invariants(encoder):
    same = bertscore_scores(REFS, REFS, encoder)
    assert all(abs(x - 1.0) < 1e-5 for k in same for x in same[k])
    s = bertscore_scores(CANDS, REFS, encoder)
    # Swapping candidate and reference swaps precision and recall.
    t = bertscore_scores(REFS, CANDS, encoder)
    assert s["precision"] == pytest.approx(t["recall"], abs=1e-6)
    # A paraphrase scores higher than an unrelated sentence.
    para, other = bertscore_scores(["A cat is sitting on a mat.", "Stock prices fell sharply."],
                                   [REFS[0], REFS[0]], encoder)["f1"]
    assert para > other + 0.2
    # Multi-reference: the best reference counts.
    multi = bertscore_scores(CANDS[:1], [["goodbye moon", REFS[0]]], encoder)
    assert multi["f1"][0] == pytest.approx(s["f1"][0], abs=1e-6)
    mean = bertscore(CANDS, REFS, encoder)
    assert mean["f1"] == pytest.approx(sum(s["f1"]) / len(CANDS))


def test_idf_weights():
    w = idf_weights([[101, 5, 6, 102], [101, 5, 7, 102]], special_ids=[101, 102])
    import math

    assert w[101] == w[102] == 0.0
    assert w[5] == pytest.approx(math.log(3 / 3)) and w[6] == pytest.approx(math.log(3 / 2))
