"""Model-based metrics: sliding-window schedule invariants, batched scoring equals one-by-one,
perplexity parity with transformers (tiny random Llama exported to a Hugging Face folder), GPTScore."""

import math

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.eval.lm_metrics import (encode_pair, gpt_score, loglikelihoods, perplexity, score_token_rows,
                                     sliding_windows)
from lmstack.infer import LLM

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 6).strip()


@pytest.fixture(scope="module")
def tiny():
    return LLM.load("tiny-llama")


def hf_reference_nll(hf_model, ids, window, stride):
    """The Hugging Face perplexity guide's loop: labels -100 outside each window's new tokens."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            out = hf_model(x, labels=labels)
        n_valid = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
        nll += float(out.loss) * n_valid
        count += n_valid
        prev_end = end
        if end == len(ids):
            break
    return nll, count


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (10, 4, 4), (3, 8, 4), (100, 16, 5), (17, 17, 1)])
def test_sliding_windows_score_each_token_once(n, window, stride):
    spans = sliding_windows(n, window, stride)
    scored = [t for b, e, k in spans for t in range(e - k, e)]
    assert scored == sorted(set(scored)) and all(e - b <= window and e - k >= b + 1 for b, e, k in spans)
    if stride < window:
        assert scored == list(range(1, n))  # every token but the first, once, in order
    else:  # disjoint chunks: each chunk's first token has no context
        assert scored == [t for t in range(1, n) if t % window]
    with pytest.raises(ConfigError, match="stride"):
        sliding_windows(10, 4, 5)


def test_perplexity_equals_transformers_on_the_same_windows(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    tiny.save(tmp_path / "hf", format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = tiny.tokenizer.encode(TEXT, add_special_tokens=False)
    for window, stride in [(64, 32), (128, 128), (48, 7)]:
        nll, count = hf_reference_nll(hf, ids, window, stride)
        r = perplexity(tiny, [TEXT], window=window, stride=stride, batch_size=3)
        assert r.n_tokens == count == len(ids) - 1 - (len(ids) - 1) // window * (stride == window)
        assert r.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
        assert r.bits_per_byte == pytest.approx(nll / (math.log(2) * len(TEXT.encode())), rel=1e-5)


def test_batched_ragged_scoring_equals_one_by_one(tiny):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 2)]
    targets = [3, 10, 1, 29, 1]
    batched = score_token_rows(tiny.model, rows, targets, batch_size=4)
    for r, k, b in zip(rows, targets, batched):
        logp = torch.log_softmax(tiny.logits([r])[0], -1)
        want = [float(logp[t - 1, r[t]]) for t in range(len(r) - k, len(r))]
        assert b.token_logprobs == pytest.approx(want, abs=1e-5)
        assert b.logprob == pytest.approx(sum(want), abs=1e-4)
    with pytest.raises(ConfigError, match="context token"):
        score_token_rows(tiny.model, [[1, 2]], [2])


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny):
    model = LLM.load("tiny-llama")
    with torch.no_grad():
        model.model.output_weight.zero_()  # tied: zero embeddings -> zero logits -> uniform
    r = perplexity(model, ["some text to score", "and another one"], window=8, stride=4)
    assert r.perplexity == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_encode_pair_moves_trailing_space_and_gpt_score_is_mean_logprob(tiny):
    ctx, cont = encode_pair(tiny.tokenizer, "Answer: ", "Paris")
    assert ctx == tiny.tokenizer.encode("Answer:", add_special_tokens=False)
    assert ctx + cont == tiny.tokenizer.encode("Answer: Paris", add_special_tokens=False)
    s = loglikelihoods(tiny, [("Answer:", " Paris")])[0]
    assert gpt_score(tiny, ["Answer:"], [" Paris"], template="{source}") == pytest.approx(
        [s.logprob / len(s.token_logprobs)])
    assert len(s.token_logprobs) == len(" Paris".encode())  # byte-level tokenizer
