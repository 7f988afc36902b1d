"""lmstack.tokenizer core: loading, encode/decode, chat templates, saving, streaming, errors.

Uses tiny tokenizers trained here in memory (a byte-level BPE and a SentencePiece-style BPE
with byte fallback), so nothing needs an asset package. Parity with real vocabularies and
with transformers lives in test_tokenizer_gguf.py and test_tokenizer_smollm2.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmstack.errors import LMStackError
from lmstack.tokenizer import DEFAULT_CHATML_TEMPLATE, IncrementalDecoder, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def f(x):\n    return x ** 2 + 1\n\n\tprint(f(3))",
    "日本語のテキストと中文文本，한국어 텍스트。 東京 北京 서울",
    "emoji 🦙🤖🎉👍🏽 and combining e\u0301 a\u0300 n\u0303, café naïve résumé",
    "numbers 123 4567 3.14159 1,000,000 and    runs  of   spaces",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_bpe() -> object:
    """A 600-token GPT-2 style byte-level BPE trained on CORPUS."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS * 4, trainer)
    return hf


def sentencepiece_bpe() -> object:
    """A Llama-style BPE: "▁" for spaces, a "▁" prefix, <0xNN> byte fallback for characters
    outside its small alphabet, and a decoder that strips the prefix space."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, normalizers, trainers

    hf = HF(models.BPE(unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  limit_alphabet=40, show_progress=False)
    hf.train_from_iterator(CORPUS * 4, trainer)
    data = json.loads(hf.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    data["model"]["byte_fallback"] = True
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return HF.from_str(json.dumps(data))


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer(byte_level_bpe(), bos_token="<|im_start|>", eos_token="<|endoftext|>",
                     pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return Tokenizer(sentencepiece_bpe(), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                     add_bos_token=True)


# --- vocabulary and special tokens ---------------------------------------------------------


def test_special_token_ids_and_vocab(bpe: Tokenizer) -> None:
    assert bpe.vocab_size == len(bpe) == bpe.hf.get_vocab_size(with_added_tokens=True)
    assert bpe.bos_token_id == bpe.token_to_id("<|im_start|>") == 1
    assert bpe.eos_token_id == bpe.pad_token_id == 0
    assert bpe.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert bpe.stop_token_ids == {0, 2}  # eos + <|im_end|>
    assert bpe.id_to_token(2) == "<|im_end|>" and bpe.token_to_id("no such token") is None


def test_unknown_special_token_names_become_none(bpe: Tokenizer) -> None:
    tok = Tokenizer(bpe.hf, bos_token="<nope>", eos_token=None)
    assert tok.bos_token is None and tok.bos_token_id is None and tok.eos_token_id is None
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")


# --- encode / decode -----------------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS + ["", " ", "\n\n", "x" * 300])
def test_round_trip_and_batch(bpe: Tokenizer, spm: Tokenizer, text: str) -> None:
    for tok in (bpe, spm):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode_batch([text, text[::-1]]) == [ids, tok.encode(text[::-1])]
        assert ids == tok.hf.encode(text, add_special_tokens=False).ids


def test_bos_only_when_the_model_wants_it(bpe: Tokenizer, spm: Tokenizer) -> None:
    # bpe: no add_bos_token and no post-processor -> nothing added
    assert bpe.add_bos_token is False
    assert bpe.encode("hello", add_special_tokens=True) == bpe.encode("hello")
    # spm: add_bos_token=True installed a post-processor that adds exactly one BOS
    assert spm.add_bos_token is True
    plain = spm.encode("hello")
    assert spm.encode("hello", add_special_tokens=True) == [spm.bos_token_id] + plain
    assert spm.encode_batch(["a", "b"], add_special_tokens=True)[1][0] == spm.bos_token_id


def test_special_tokens_in_text_are_matched_and_skippable(bpe: Tokenizer) -> None:
    ids = bpe.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert bpe.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert bpe.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_decode_accepts_arrays_and_rejects_bad_ids(bpe: Tokenizer) -> None:
    import numpy as np
    import torch

    ids = bpe.encode("hello world")
    assert bpe.decode(np.array(ids)) == bpe.decode(torch.tensor(ids)) == "hello world"
    for bad in ([len(bpe)], [-1], [1.5], ["a"]):
        with pytest.raises(LMStackError, match="token id"):
            bpe.decode(bad)
    with pytest.raises(LMStackError, match="expected a string"):
        bpe.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(LMStackError, match="item 1"):
        bpe.encode_batch(["ok", None])  # type: ignore[list-item]


# --- chat templates ------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
]


def test_default_chatml_renders_exact_string(bpe: Tokenizer) -> None:
    assert bpe.chat_template == DEFAULT_CHATML_TEMPLATE
    expected = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert bpe.apply_chat_template(CONVERSATION) == expected
    assert bpe.apply_chat_template(CONVERSATION, add_generation_prompt=False) == expected[:-len(
        "<|im_start|>assistant\n")]


def test_encode_chat_treats_template_specials_as_special(bpe: Tokenizer) -> None:
    ids = bpe.encode_chat(CONVERSATION[:2])
    assert ids.count(bpe.token_to_id("<|im_start|>")) == 3 and ids.count(bpe.token_to_id("<|im_end|>")) == 2
    assert bpe.decode(ids) == bpe.apply_chat_template(CONVERSATION[:2])


def test_template_with_bos_is_not_doubled(spm: Tokenizer) -> None:
    tok = Tokenizer(spm.hf, bos_token="<s>", eos_token="</s>", add_bos_token=True,
                    chat_template="{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] "
                                  "{{ m['content'] }}{{ eos_token }}{% endfor %}")
    ids = tok.encode_chat([{"role": "user", "content": "hello"}])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids[-1] == tok.eos_token_id


def test_hf_style_template_features(bpe: Tokenizer) -> None:
    template = (
        "{% if tools %}{{ tools | tojson }}\n{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "{% generation %}{{ m['content'] | upper }}{% endgeneration %}"
        "{% if loop.index > 5 %}{% break %}{% endif %}\n{% endfor %}"
        "{{ strftime_now('%Y') | length }}"
    )
    tok = Tokenizer(bpe.hf, chat_template=template)
    tools = [{"name": "météo", "parameters": {}}]
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools)
    # trim_blocks eats the newline after a block tag, as in transformers
    assert out == '[{"name": "météo", "parameters": {}}]\nHI4'
    with pytest.raises(LMStackError, match="no tools here"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_is_sandboxed(bpe: Tokenizer) -> None:
    tok = Tokenizer(bpe.hf, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(LMStackError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok = Tokenizer(bpe.hf, chat_template="{% for %}")
    with pytest.raises(LMStackError, match="syntax error"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages, match", [
    ("hello", "expected a list"),
    ([{"role": "user", "content": "ok"}, "hi"], "chat message 1: got str"),
    ([{"content": "no role"}], "chat message 0: 'role' is None"),
    ([{"role": "user", "content": 5}], r"chat message 0 \(user\): 'content' is int"),
    ([{"role": "user", "content": None}], "'content' is NoneType"),
])
def test_bad_messages_raise(bpe: Tokenizer, messages: object, match: str) -> None:
    with pytest.raises(LMStackError, match=match):
        bpe.apply_chat_template(messages)  # type: ignore[arg-type]


def test_tool_call_message_may_have_no_content(bpe: Tokenizer) -> None:
    tok = Tokenizer(bpe.hf, chat_template="{% for m in messages %}{{ m['tool_calls'][0]['name'] }}{% endfor %}")
    msg = {"role": "assistant", "content": None, "tool_calls": [{"name": "search"}]}
    assert tok.apply_chat_template([msg], add_generation_prompt=False) == "search"


# --- loading a model folder and saving -----------------------------------------------------


def test_folder_with_config_template_and_tokens(tmp_path: Path, bpe: Tokenizer) -> None:
    (tmp_path / "tokenizer.json").write_text(bpe.hf.to_str())
    template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>",
        "pad_token": None, "add_bos_token": True, "chat_template": template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.load(tmp_path)
    assert tok.chat_template == template
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<<user>>x"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, None)
    assert tok.stop_token_ids == {0, 2}
    assert tok.encode("a b", add_special_tokens=True) == [1] + tok.encode("a b")
    # the tokenizer.json file alone: no config, so no BOS and the ChatML default
    alone = Tokenizer.load(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path).encode("x y") == alone.encode("x y")


def test_named_template_list_and_jinja_file(tmp_path: Path, bpe: Tokenizer) -> None:
    (tmp_path / "tokenizer.json").write_text(bpe.hf.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert Tokenizer.load(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.load(tmp_path).apply_chat_template([{"role": "user", "content": ""}]) == "J1"


def test_save_round_trip(tmp_path: Path, spm: Tokenizer) -> None:
    tok = Tokenizer(spm.hf, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True,
                    chat_template="{{ bos_token }}{{ messages[0]['content'] }}")
    tok.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    back = Tokenizer.load(tmp_path / "out")
    for text in CORPUS:
        assert back.encode(text) == tok.encode(text)
        assert back.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)
    assert back.chat_template == tok.chat_template and back.special_tokens == tok.special_tokens
    assert (back.bos_token_id, back.eos_token_id, back.unk_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                         tok.unk_token_id)


def test_save_into_a_file_path_fails(tmp_path: Path, bpe: Tokenizer) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(LMStackError, match="not a folder"):
        bpe.save(tmp_path / "f")


def test_save_loads_in_transformers(tmp_path: Path, spm: Tokenizer) -> None:
    from transformers import AutoTokenizer

    spm.save(tmp_path)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS:
        assert ref.encode(text, add_special_tokens=False) == spm.encode(text)
        assert ref.encode(text) == spm.encode(text, add_special_tokens=True)
        assert ref.decode(spm.encode(text)) == spm.decode(spm.encode(text))


# --- errors --------------------------------------------------------------------------------


def test_load_errors_are_one_line_and_name_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "spdir").mkdir()
    (tmp_path / "spdir" / "tokenizer.model").write_bytes(b"\x00")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 8)
    cases = [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "folder has no tokenizer.json; found nothing"),
        (tmp_path / "spdir", "tokenizer.model is not supported"),
        (tmp_path / "config.json", r"not a Hugging Face tokenizers file \(found \['architectures'\]"),
        (tmp_path / "broken.json", "not readable JSON"),
        (tmp_path / "weights.bin", "unrecognised tokenizer file"),
    ]
    for path, match in cases:
        with pytest.raises(LMStackError, match=match) as info:
            Tokenizer.load(path)
        message = str(info.value)
        assert "\n" not in message
        assert ".gguf" in message or "JSON" in message, message  # says what is supported


def test_gguf_without_tokenizer_metadata(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "weights-only.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("w", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LMStackError, match=r"has no tokenizer metadata \(tokenizer.\* keys found: none\)") as info:
        Tokenizer.load(path)
    assert "\n" not in str(info.value)
    with pytest.raises(LMStackError, match="has no tokenizer metadata"):
        Tokenizer.from_gguf(gguf.GGUFReader(path))
    with pytest.raises(LMStackError, match="expected a path"):
        Tokenizer.from_gguf(42)


# --- streaming detokenisation ----------------------------------------------------------------

UNICODE_PIECES = st.sampled_from(
    list("abc xyz\n\t  ") + ["日本", "語", "中文", "한국어", "🦙", "🤖", "👍🏽", "🇫🇷", "e\u0301", "\u0300",
                             "\u0303\u0301", "café", "Ω", "ß", "\u200d", "😀😃", "𝔘𝔫𝔦", "<|im_end|>", "<s>"])
TEXTS = st.lists(st.one_of(UNICODE_PIECES, st.characters(codec="utf-8")), max_size=30).map("".join)


def stream(tok: Tokenizer, ids: list[int], **kw: object) -> list[str]:
    dec = tok.decoder(**kw)
    return [dec.push(i) for i in ids] + [dec.flush()]


def check_stream(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=True)
    for skip in (False, True):
        deltas = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        if "\ufffd" not in text:
            assert not any("\ufffd" in d for d in deltas), deltas


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_stream_byte_level_bpe(bpe: Tokenizer, text: str) -> None:
    check_stream(bpe, text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_stream_sentencepiece_bpe(spm: Tokenizer, text: str) -> None:
    check_stream(spm, text)


def test_stream_holds_back_a_split_character(bpe: Tokenizer, spm: Tokenizer) -> None:
    for tok in (bpe, spm):
        ids = tok.encode("a🦙")
        assert len(ids) >= 3, "the emoji must span several tokens for this test"
        deltas = stream(tok, ids)
        assert [d for d in deltas if d] == ["a", "🦙"]
        assert deltas[-1] == "" and deltas[-2] == "🦙"  # emitted with its last byte, not before


def test_stream_keeps_sentencepiece_spaces(spm: Tokenizer) -> None:
    ids = spm.encode("The  quick fox")
    assert "".join(stream(spm, ids)) == "The  quick fox"
    # decoding token by token loses the spaces (each "▁word" alone decodes as "word")
    assert "".join(spm.decode([i]) for i in ids) != "The  quick fox"


def test_stream_flushes_an_incomplete_character(spm: Tokenizer) -> None:
    byte = spm.token_to_id("<0xF0>")  # first byte of a 4-byte character, never completed
    a = spm.token_to_id("a")
    deltas = stream(spm, [a, byte])
    assert deltas == ["a", "", "\ufffd"] and "".join(deltas) == spm.decode([a, byte])


def test_stream_decodes_a_small_window(bpe: Tokenizer) -> None:
    seen: list[int] = []

    class Counting:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            seen.append(len(ids))
            return bpe.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = bpe.encode(" ".join(CORPUS) * 20)
    assert len(ids) > 1000
    dec = IncrementalDecoder(Counting())
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    assert text == bpe.decode(ids)
    assert max(seen) <= 8, "each step must decode a few tokens, not the whole sequence"
    assert len(seen) <= 2 * len(ids) + 1  # at most two short decodes per pushed id
