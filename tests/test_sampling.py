"""Logit processors against Hugging Face's reference implementations, and stop strings."""

import pytest
import torch

from lmstack.infer.generate import StopMatcher
from lmstack.infer.sampling import (apply_repetition_penalty, min_p_filter, top_k_filter,
                                    top_p_filter)

gen = pytest.importorskip("transformers.generation.logits_process")


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(4, 300) * 3


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_matches_hf(logits, k):
    ref = gen.TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(top_k_filter(logits, k), ref)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_hf(logits, p):
    ref = gen.TopPLogitsWarper(top_p=p)(None, logits.clone())
    got = top_p_filter(logits, p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))


def test_top_p_keeps_the_top_token_when_p_underflows(logits):
    kept = ~torch.isinf(top_p_filter(logits, 5e-324))
    assert torch.equal(kept.sum(-1), torch.ones(4, dtype=torch.long))
    assert torch.equal(kept.float().argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
def test_min_p_matches_hf(logits, p):
    ref = gen.MinPLogitsWarper(min_p=p)(None, logits.clone())
    assert torch.equal(torch.isinf(min_p_filter(logits, p)), torch.isinf(ref))


def test_repetition_penalty_matches_hf(logits):
    seen = torch.tensor([[3, 7, 7, 250], [0, 1, 2, 3], [9, 9, 9, 9], [299, 5, 6, 100]])
    ref = gen.RepetitionPenaltyLogitsProcessor(penalty=1.3)(seen, logits.clone())
    got = apply_repetition_penalty(logits, [r.unique() for r in seen], 1.3)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize(
    "chunks,stops,expected,stopped",
    [
        (["Hel", "lo wor", "ld"], ["wor"], "Hello ", True),
        (["a", "b", "c"], ["bd"], "abc", False),
        (["x<|e", "nd|>y"], ["<|end|>"], "x", True),
        (["no stop here"], [], "no stop here", False),
        (["ab", "ab", "c"], ["abc"], "ab", True),
    ],
)
def test_stop_strings_are_held_back_and_cut(chunks, stops, expected, stopped):
    m = StopMatcher(stops)
    out, hit = "", False
    for c in chunks:
        text, hit = m.feed(c)
        out += text
        if hit:
            break
    if not hit:
        out += m.finish()
    assert (out, hit) == (expected, stopped)
