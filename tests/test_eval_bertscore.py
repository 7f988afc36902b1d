"""BERTScore on our encoder against the bert-score package with the same model and layer."""


import pytest
import torch

from lmstack.eval.bertscore import bertscore, bertscore_scores, full_length, idf_weights

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


def _long_text(seed: int, n_words: int) -> str:
    """Deterministic prose-like text of ``n_words`` words from a mixed vocabulary."""
    import random

    words = ("the a river city council report measured rainfall across northern valleys while engineers "
             "debated whether older bridges could carry heavier freight trains during winter storms and "
             "farmers planted barley wheat oats near quiet villages with stone churches markets schools "
             "hospitals; researchers published 2024 figures showing temperatures rose 1.5 degrees").split()
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(n_words))


# Lengths in words: two past 300 wordpieces but under 512, two past 512 (cut there), two short.
LONG_CANDS = [_long_text(1, 330), _long_text(2, 600), _long_text(3, 25), _long_text(4, 420),
              "Paris is in France.", _long_text(5, 700)]
LONG_REFS = [_long_text(11, 360), _long_text(12, 380), _long_text(13, 650), _long_text(14, 20),
             "The capital of France is Paris.", _long_text(15, 560)]


@pytest.mark.slow
@pytest.mark.parametrize("idf", [False, True])
def test_matches_bert_score_package_past_256_wordpieces(encoder, idf):
    """Texts longer than the sentence-embedding limit (256) are read to 512 wordpieces, as
    bert-score does; with IDF the long references' counts also agree."""
    bert_score = pytest.importorskip("bert_score")
    from lmstack.model.encoder import default_encoder_path

    texts = LONG_CANDS + LONG_REFS
    assert encoder.cfg.max_seq_length == 256 and max(len(encoder.tokenizer.encode(t).ids) for t in texts) == 256
    full = [len(full_length(encoder).tokenizer.encode(t).ids) for t in texts]
    assert sum(300 < x < 512 for x in full) >= 4 and sum(x == 512 for x in full) >= 3
    P, R, F = bert_score.score(LONG_CANDS, LONG_REFS, model_type=str(default_encoder_path()), num_layers=6,
                               idf=idf, batch_size=4)
    ours = bertscore_scores(LONG_CANDS, LONG_REFS, encoder, idf=idf)
    for key, want in (("precision", P), ("recall", R), ("f1", F)):
        torch.testing.assert_close(torch.tensor(ours[key]), want, rtol=0, atol=1e-5)
    # The sentence-embedding path still reads 256 wordpieces.
    assert max(len(encoder.tokenizer.encode(t).ids) for t in texts) == 256
