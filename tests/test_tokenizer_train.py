"""Byte-level BPE training: lossless round-trip, pre-tokenisation equal to the published regexes,
special tokens, reload through ``Tokenizer.load``, and the compression evaluation."""

from __future__ import annotations

import random

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.data.synthetic import random_text
from lmstack.errors import ConfigError
from lmstack.tokenizer.evaluate import compression, gpt2_encoding, reference_encoders, third_party_dir
from lmstack.tokenizer.tokenizer import Tokenizer
from lmstack.tokenizer.train import PATTERNS, TokenizerTrainConfig, build_untrained, train_tokenizer

SAMPLES = ["Hello world! It's 2024, isn't it?\n\n  Indented    spaces\tand tabs.",
           "Ünïcödé — naïve café, 日本語のテキスト, emoji 👩‍💻🚀, Ελληνικά, עברית, العربية",
           "def f(x):\n    return x**2  # comment\r\n", "numbers 1234567 3.14159 1e-9 ... !!!", ""]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    rng = random.Random(0)
    texts = [random_text(rng, 200) for _ in range(200)] + SAMPLES * 20
    return train_tokenizer(texts, TokenizerTrainConfig(vocab_size=700, special_tokens=["<|pad|>"]))


def test_vocab_and_special_tokens(trained):
    assert trained.vocab_size == 700
    assert trained.eos_token == "<|endoftext|>" and trained.eos_token_id == 0
    assert trained.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|pad|>": 3}
    assert trained.encode("<|im_start|>user") [0] == 1
    assert "<|im_start|>" in trained.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_samples(trained, text):
    assert trained.decode(trained.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_round_trip_any_unicode(trained, text):
    assert trained.decode(trained.encode(text)) == text


@pytest.mark.parametrize("name", ["gpt2", "llama3"])
@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab AB12 3\n\r\t'sd.,!é日👍")), max_size=60))
def test_pretokenizer_splits_like_the_published_regex(name, text):
    hf = build_untrained(TokenizerTrainConfig(pretokenizer=name))
    pieces = [p for p, _ in hf.pre_tokenizer.pre_tokenize_str(text)]
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    decoded = [bytes(byte_decoder[c] for c in p).decode("utf-8") for p in pieces]
    assert decoded == regex.findall(PATTERNS[name], text)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (its published definition)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def test_save_and_reload(trained, tmp_path):
    trained.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    text = SAMPLES[1] + SAMPLES[0]
    assert again.encode(text) == trained.encode(text)
    assert again.eos_token_id == trained.eos_token_id and again.vocab_size == 700
    assert Tokenizer.load(tmp_path / "tokenizer.json").encode(text) == trained.encode(text)


def test_training_learns_merges_and_rejects_bad_config():
    texts = ["the cat sat on the mat"] * 50
    tok = train_tokenizer(texts, TokenizerTrainConfig(vocab_size=300, chat_tokens=False))
    assert len(tok.encode(" the")) == 1  # a frequent word became one token
    with pytest.raises(ConfigError, match="vocab_size"):
        TokenizerTrainConfig(vocab_size=100)
    with pytest.raises(ConfigError, match="no text"):
        train_tokenizer([], TokenizerTrainConfig(vocab_size=300))


def test_compression_counts():
    res = compression(lambda t: list(t.encode()), ["ab cd", "é"])  # one token per byte
    assert res == {"bytes_per_token": 1.0, "tokens_per_word": 7 / 3, "chars_per_token": 6 / 7,
                   "tokens": 7, "bytes": 7, "words": 3}


@pytest.mark.assets
@pytest.mark.skipif(gpt2_encoding() is None, reason="gpt2.tiktoken missing: run scripts/fetch_data_assets.sh")
def test_gpt2_reference_matches_llama_cpp_vectors():
    """The offline GPT-2 ranks reproduce llama.cpp's published GPT-2 tokenizer test vectors."""
    vocab = third_party_dir() / "llama-vocab"
    if not (vocab / "ggml-vocab-gpt-2.gguf.inp").is_file():
        pytest.skip("llama.cpp vocab test vectors missing: run scripts/fetch_test_assets.sh")
    inputs = (vocab / "ggml-vocab-gpt-2.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    outputs = (vocab / "ggml-vocab-gpt-2.gguf.out").read_text().strip("\n").split("\n")
    enc = gpt2_encoding()
    checked = 0
    for text, ids in zip(inputs, outputs):
        expected = [int(x) for x in ids.split()]
        assert enc.encode_ordinary(text) == expected, text
        checked += 1
    assert checked >= 20


def test_reference_encoders_load():
    encoders, notes = reference_encoders()
    if notes:
        pytest.skip("; ".join(notes))
    text = "The quick brown fox jumps over the lazy dog."
    assert len(encoders["gpt2"](text)) == 10 and len(encoders["cl100k"](text)) == 10
    assert len(encoders["smollm2"](text)) == 10
