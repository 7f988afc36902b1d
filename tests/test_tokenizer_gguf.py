"""GGUF tokenizers against llama.cpp's own tokenizer test vectors, plus GGUF reading.

The vectors are ``third_party/llama-vocab/ggml-vocab-<name>.gguf`` with ``.gguf.inp``
(inputs split by ``\\n__ggml_vocab_test__\\n``) and ``.gguf.out`` (expected ids, one line
per input), fetched by ``scripts/fetch_test_assets.sh``. llama.cpp's convention, read off
the files: no BOS is added (``'ied 4 ½ months'`` starts with the word's own token), and a
SentencePiece vocabulary with ``add_space_prefix`` gets a "▁" in front of the text even when
the text already starts with a space (``' Hello'`` -> ``▁`` ``▁Hello``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmstack.errors import LMStackError, UnsupportedError
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer.gguf_vocab import read_metadata, read_vocab, reader_metadata

# LMSTACK_LLAMA_VOCAB_DIR points the suite at another copy (the CI rule below is tested with a missing one).
VOCAB_DIR = Path(os.environ.get("LMSTACK_LLAMA_VOCAB_DIR")
                 or Path(__file__).resolve().parent.parent / "third_party" / "llama-vocab")
SEPARATOR = "\n__ggml_vocab_test__\n"

# Vocabularies whose tokenizer model lmstack does not implement (and why).
UNSUPPORTED = {
    "nomic-bert-moe": "Unigram ('t5') tokenizer model is not implemented (and llama.cpp ships no vectors for it)",
}
# Vocabularies whose decode is not the input: qwen2 applies NFC; BERT lowercases, strips
# accents and rejoins word pieces with single spaces.
LOSSY = {"qwen2", "bert-bge"}
MUST_PASS = ["gpt-2", "llama-bpe", "qwen2"]
# Without the folder the required names stand in, so the tests exist and skip (or fail in CI) by name.
NAMES = sorted(p.name[len("ggml-vocab-"):-len(".gguf")] for p in VOCAB_DIR.glob("ggml-vocab-*.gguf")) or MUST_PASS
# llama.cpp ships .inp/.out vectors for most vocabularies, not all (those are only loaded, below).
WITH_VECTORS = [n for n in NAMES if Path(f"{VOCAB_DIR / f'ggml-vocab-{n}.gguf'}.inp").is_file()
                or n in UNSUPPORTED or not VOCAB_DIR.is_dir()]


def needs_vocabs(test):
    """The vocabularies are a required asset: absent, the test skips with the reason, and under
    ``CI=true`` it fails (``conftest.pytest_runtest_makereport``)."""
    absent = pytest.mark.skipif(not VOCAB_DIR.is_dir(), reason=f"{VOCAB_DIR} absent: run scripts/fetch_test_assets.sh")
    return pytest.mark.assets(absent(test))


def vocab_path(name: str) -> Path:
    return VOCAB_DIR / f"ggml-vocab-{name}.gguf"


def read_vectors(path: Path) -> list[tuple[str, list[int]]]:
    inputs = Path(f"{path}.inp").read_text(encoding="utf-8").split(SEPARATOR)
    lines = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")
    if len(lines) == len(inputs) + 1 and lines[-1] == "":
        lines = lines[:-1]
    assert len(lines) == len(inputs), f"{path}: {len(inputs)} inputs, {len(lines)} output lines"
    return [(text, [int(x) for x in line.split()]) for text, line in zip(inputs, lines)]


_cache: dict[str, Tokenizer] = {}


def load(name: str) -> Tokenizer:
    if name not in _cache:
        _cache[name] = Tokenizer.load(vocab_path(name))
    return _cache[name]


@needs_vocabs
def test_the_required_vocabs_are_present() -> None:
    assert set(MUST_PASS) <= set(WITH_VECTORS), f"missing {set(MUST_PASS) - set(WITH_VECTORS)} in {VOCAB_DIR}"


@needs_vocabs
@pytest.mark.parametrize("name", WITH_VECTORS)
def test_llama_cpp_vectors(name: str) -> None:
    path = vocab_path(name)
    if name in UNSUPPORTED:
        with pytest.raises(UnsupportedError):
            Tokenizer.load(path)
        pytest.xfail(UNSUPPORTED[name])
    tok = load(name)
    vectors = read_vectors(path)
    failures = [(text, expected, tok.encode(text)) for text, expected in vectors
                if tok.encode(text) != expected]
    assert not failures, f"{len(failures)}/{len(vectors)} differ, first: {failures[0]!r}"
    # and the ids decode back to the input (these vocabularies are lossless on the vectors)
    if name not in LOSSY:
        for text, expected in vectors:
            assert tok.decode(expected) == text


@needs_vocabs
@pytest.mark.parametrize("name", [n for n in NAMES if n not in UNSUPPORTED])
def test_every_supported_vocab_round_trips(name: str) -> None:
    tok = load(name)
    text = "Hello  world!\n\tdef f(x): return x**2  # 3.14 日本語 café 🦙 \u00e9e\u0301"
    ids = tok.encode(text)
    assert all(0 <= i < len(tok) for i in ids)
    if name == "bert-bge":
        assert tok.decode(ids) == "hello world! def f ( x ) : return x * * 2 # 3. 14 日 本 語 cafe [UNK] ee"
    else:
        expected = unicodedata.normalize("NFC", text) if name == "qwen2" else text
        assert tok.decode(ids) == expected
    assert tok.bos_token_id is None or tok.id_to_token(tok.bos_token_id) == tok.bos_token
    assert tok.eos_token_id in tok.stop_token_ids


@needs_vocabs
def test_bos_and_space_prefix_conventions() -> None:
    spm, bpe = load("llama-spm"), load("llama-bpe")
    assert spm.encode("Hello", add_special_tokens=True) == [1, 15043]
    assert spm.encode(" Hello") == [29871, 15043]
    assert spm.decode([1, 15043]) == "<s> Hello" and spm.decode([15043]) == "Hello"
    # Llama 3: llama.cpp adds <|begin_of_text|> by default; its stop tokens include <|eot_id|>
    assert bpe.encode("Hello", add_special_tokens=True) == [128000, 9906]
    assert {128001, bpe.token_to_id("<|eot_id|>")} <= bpe.stop_token_ids
    # gpt-2: no BOS
    assert load("gpt-2").encode("Hello", add_special_tokens=True) == [15496]


@needs_vocabs
@pytest.mark.slow
def test_fast_metadata_reader_matches_gguf_reader() -> None:
    import gguf

    for name in ("gpt-2", "llama-spm"):  # GGUFReader takes seconds per 50k tokens: keep it to two
        path = vocab_path(name)
        reader = gguf.GGUFReader(path)
        fast, ref = read_metadata(path), reader_metadata(reader)
        assert fast.keys() == ref.keys() and fast == ref, name
        via_reader = Tokenizer.from_gguf(reader)
        assert via_reader.encode("Hello world, ça va?") == load(name).encode("Hello world, ça va?")


@needs_vocabs
@pytest.mark.parametrize("name", ["gpt-2", "llama-spm", "bert-bge"])
def test_saved_gguf_tokenizer_reproduces_vectors_in_transformers(name: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = load(name)
    tok.save(tmp_path)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    for text, expected in read_vectors(vocab_path(name)):
        assert ref.encode(text, add_special_tokens=False) == expected, text
        assert ref.encode(text) == tok.encode(text, add_special_tokens=True), text
        assert ref.decode(expected) == tok.decode(expected), text


def test_written_gguf_round_trip(tmp_path: Path) -> None:
    """A tokenizer-only GGUF written with gguf.GGUFWriter loads with the expected behaviour."""
    import gguf

    from lmstack.tokenizer.gguf_vocab import TOKEN_CONTROL, TOKEN_NORMAL

    byte_map = _gpt2_byte_map()
    tokens = ["<|endoftext|>", "<|im_end|>"] + [byte_map[b] for b in range(256)] + ["he", "ll", "hell", "hello",
                                                                                  "Ġw", "Ġwor", "Ġworld"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "Ġwo r", "Ġwor l", "Ġworl d"]
    tokens += ["Ġwo", "Ġworl"]
    types = [TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_NORMAL] * (len(tokens) - 2)
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    tok = Tokenizer.load(path)
    ids = tok.encode("hello world<|im_end|>")
    assert [tok.id_to_token(i) for i in ids] == ["hello", "Ġworld", "<|im_end|>"]
    assert tok.decode(ids) == "hello world<|im_end|>"
    assert tok.stop_token_ids == {0, 1} and tok.special_tokens == {"<|endoftext|>": 0, "<|im_end|>": 1}
    assert tok.encode_chat([{"role": "user", "content": "hello"}])[-1] == 1
    assert read_vocab(path).merges == merges


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (5).to_bytes(8, "little"))
    with pytest.raises(LMStackError, match="truncated or corrupt GGUF"):
        Tokenizer.load(bad)
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(UnsupportedError, match="GGUF version 1"):
        Tokenizer.load(old)
    with pytest.raises(LMStackError, match="GGUF file not found"):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")


def _gpt2_byte_map() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# --- streaming on the real vocabularies ------------------------------------------------------

TEXTS = st.lists(st.one_of(
    st.sampled_from(["日本語", "🦙", "👍🏽", "e\u0301", "\u0303", " ", "  ", "\n", "Hello", "▁", "<0x41>", "</s>",
                     "<|endoftext|>", "ğ", "�"]),
    st.characters(codec="utf-8")), max_size=25).map("".join)


@needs_vocabs
@pytest.mark.parametrize("name", ["gpt-2", "llama-spm"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_stream_real_vocab(name: str, text: str) -> None:
    tok = load(name)
    ids = tok.encode(text, add_special_tokens=True)
    dec = tok.decoder()
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == tok.decode(ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas)
    if name == "llama-spm":
        # SentencePiece writes spaces as "▁" (a literal "▁" comes back as " "), and like
        # llama.cpp puts a "▁" after each special token, so only plain text round-trips.
        text = text.replace("▁", " ")
        if any(t in text for t in tok.special_tokens):
            return
    assert tok.decode(tok.encode(text)) == text


def _run_vector_tests(env: dict) -> subprocess.CompletedProcess:
    """This file's vector tests in a separate pytest, with ``env`` added to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-k", "llama_cpp_vectors or required_vocabs"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=False,
        cwd=Path(__file__).resolve().parent.parent)


@pytest.mark.slow
def test_missing_vectors_fail_in_ci_and_skip_locally(tmp_path: Path) -> None:
    """With the vector folder pointing nowhere: ``CI=true`` fails every vector test (naming the
    asset), while a local run skips them with the reason and passes."""
    nowhere = str(tmp_path / "no-such-folder")
    ci = _run_vector_tests({"CI": "true", "LMSTACK_LLAMA_VOCAB_DIR": nowhere})
    assert ci.returncode == 1, ci.stdout[-2000:]
    assert "CI=true: a required asset is missing" in ci.stdout and nowhere in ci.stdout
    assert " skipped" not in ci.stdout.splitlines()[-1] and " passed" not in ci.stdout.splitlines()[-1]
    local = _run_vector_tests({"CI": "", "LMSTACK_LLAMA_VOCAB_DIR": nowhere})
    assert local.returncode == 0, local.stdout[-2000:]
    summary = local.stdout.splitlines()[-1]
    assert f"{len(MUST_PASS) + 1} skipped" in summary and "failed" not in summary and "error" not in summary
    assert f"{nowhere} absent: run scripts/fetch_test_assets.sh" in local.stdout
