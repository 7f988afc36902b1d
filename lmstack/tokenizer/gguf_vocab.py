"""Build a ``tokenizers.Tokenizer`` from the tokenizer metadata inside a GGUF file.

Supported ``tokenizer.ggml.model`` values:

* ``"gpt2"``: byte-level BPE. Tokens are stored in GPT-2's printable byte alphabet ("Ġ" for
  a space), with ranked ``tokenizer.ggml.merges``. ``tokenizer.ggml.pre`` names the
  pre-tokenizer, i.e. the list of regexes that cut the text into words before BPE runs on
  each word (``PRE_TOKENIZER_SPLITS`` below: the patterns llama.cpp's ``llama-vocab.cpp``
  uses for each name).
* ``"llama"``: SentencePiece BPE with per-token scores and byte fallback (``<0xNN>``).
  SentencePiece merges the adjacent pair whose result has the highest score; we turn that
  into an ordinary ranked merge list (every way of splitting a vocabulary token into two
  vocabulary tokens, ranked by the score of the result), which the ``tokenizers`` BPE model
  applies the same way.
* ``"gemma4"``: SentencePiece-style BPE whose merges are written out in the file.
* ``"bert"``: WordPiece with BERT's uncased normalisation.

Token types (``tokenizer.ggml.token_type``) mark control tokens (3), which become special
added tokens, and user-defined tokens (4), which become added tokens matched whole in text.

Metadata comes from ``read_metadata`` (a direct parse of the GGUF key/value header: typed
numbers and UTF-8 strings, nothing unpickled) or from an already-open ``gguf.GGUFReader``.
Deliberately left out: the Unigram (``t5``), RWKV and other tokenizer models, and
pre-tokenizer names not in ``PRE_TOKENIZER_SPLITS``; they raise ``UnsupportedError``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from lmstack.errors import LMStackError, UnsupportedError

# llama.cpp's token types (gguf.TokenType).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# GPT-2's word regex; the trailing `|\s+` only makes explicit what an isolated split keeps anyway.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen 3.5 keeps combining marks (\p{M}) with their letters.
_QWEN35 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
           r"|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Cased-letter ranges of DeepSeek LLM's word regex, as code points so that no editor or
# Unicode normalisation can change them (several are NFC-unstable, e.g. U+1FD3, U+2126).
_DEEPSEEK_LETTERS = [
    (0x0041, 0x005A), (0x0061, 0x007A), (0x00B5,), (0x00C0, 0x00D6), (0x00D8, 0x00F6), (0x00F8, 0x01BA),
    (0x01BC, 0x01BF), (0x01C4, 0x0293), (0x0295, 0x02AF), (0x0370, 0x0373), (0x0376, 0x0377),
    (0x037B, 0x037D), (0x037F,), (0x0386,), (0x0388, 0x038A), (0x038C,), (0x038E, 0x03A1),
    (0x03A3, 0x03F5), (0x03F7, 0x0481), (0x048A, 0x052F), (0x0531, 0x0556), (0x10A0, 0x10C5),
    (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B),
    (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D), (0x1F20, 0x1F45),
    (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59,), (0x1F5B,), (0x1F5D,), (0x1F5F, 0x1F7D),
    (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE,), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3),
    (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102,), (0x2107,),
    (0x210A, 0x2113), (0x2115,), (0x2119, 0x211D), (0x2124,), (0x2126,), (0x2128,), (0x212A, 0x212D),
    (0x212F, 0x2134), (0x2139,), (0x213C, 0x213F), (0x2145, 0x2149), (0x214E,), (0x2183, 0x2184),
    (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3), (0xA640, 0xA66D),
    (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF),
    (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F),
    (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF),
    (0x1E900, 0x1E943),
]


def _char_class(ranges: list[tuple[int, ...]]) -> str:
    return "".join("-".join(f"\\x{{{c:X}}}" for c in r) for r in ranges)


_CJK_HANGUL = r"[\x{4E00}-\x{9FA5}\x{0800}-\x{4E00}\x{AC00}-\x{D7FF}]+"
_DEEPSEEK_LLM = [
    r"[\r\n]",
    r"\s?[" + _char_class(_DEEPSEEK_LETTERS) + "]+",
    # ASCII punctuation, fullwidth punctuation, curly quotes, CJK space/comma/full stop
    r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
    r"\s+$",
    _CJK_HANGUL,
    r"\p{N}+",
]
_DEEPSEEK_CODER = [
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    _CJK_HANGUL,
    r"\p{N}",
]
_PORO = r" ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{0964}\x{06D4}\x{060C})]+"
# What llama.cpp uses for a BPE vocabulary whose pre-tokenizer is missing or "default".
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    "default": _DEFAULT,
    "gpt-2": [_GPT2], "mpt": [_GPT2], "olmo": [_GPT2], "jais": [_GPT2], "trillion": [_GPT2],
    "llama-bpe": [_LLAMA3], "llama3": [_LLAMA3], "llama-v3": [_LLAMA3], "dbrx": [_LLAMA3],
    "smaug-bpe": [_LLAMA3], "falcon3": [_LLAMA3], "pixtral": [_LLAMA3],
    "qwen2": [_QWEN2], "stablelm2": [_QWEN2], "hunyuan": [_QWEN2], "megrez": [_QWEN2],
    "qwen35": [_QWEN35],
    "starcoder": [r"\p{N}", _GPT2], "refact": [r"\p{N}", _GPT2], "command-r": [r"\p{N}", _GPT2],
    "smollm": [r"\p{N}", _GPT2], "codeshell": [r"\p{N}", _GPT2], "exaone": [r"\p{N}", _GPT2],
    "minerva-7b": [r"\p{N}", _GPT2],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    "deepseek-llm": _DEEPSEEK_LLM,
    "deepseek-coder": _DEEPSEEK_CODER,
    "poro-chat": [_PORO], "bloom": [_PORO], "gpt3-finnish": [_PORO],
}
# Llama-3 style vocabularies take a whole word from the vocabulary before trying merges.
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral"}
# Hugging Face's own tokenizer.json for these applies Unicode NFC before splitting.
_NFC = {"qwen2"}
# llama.cpp adds BOS by default for these pre-tokenizers when add_bos_token is absent.
_ADD_BOS_DEFAULT = {"llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral"}

SUPPORTED_MODELS = ("gpt2", "llama", "gemma4", "bert")


@dataclass
class GGUFVocab:
    """The tokenizer part of a GGUF file's metadata, as plain Python values."""

    model: str
    tokens: list[str]
    token_types: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    eot_token_id: int | None = None
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def _field_value(field: Any) -> Any:
    """One GGUF metadata field as a Python value (str, int, float, bool or list of them)."""
    import gguf

    types = list(field.types)
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if not field.data:
            return []
        import numpy as np

        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]][0]
    return value.item() if hasattr(value, "item") else value


def check_gguf_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LMStackError(f"GGUF file not found: {path} (expected a .gguf model or tokenizer file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LMStackError(f"{path}: not a GGUF file (first bytes {magic!r}, expected b'GGUF')")
    return path


# GGUF metadata value types: struct format of the scalar ones; 8 = string, 9 = array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}


def read_metadata(path: str | os.PathLike, prefix: str = "tokenizer.") -> dict[str, Any]:
    """The GGUF key/value metadata whose keys start with ``prefix``, read straight from the
    file header (about 30x faster than building a full ``gguf.GGUFReader`` for a 128k-token
    vocabulary; only typed numbers and UTF-8 strings are ever decoded)."""
    import mmap
    import struct

    import numpy as np

    path = check_gguf_path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise UnsupportedError(f"{path}: GGUF version {version} is not supported "
                                   "(expected 2 or 3, little-endian)")
        out: dict[str, Any] = {}

        def string(at: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, at)
            if at + 8 + n > len(buf):
                raise struct.error("string runs past the end of the file")
            return buf[at + 8:at + 8 + n].decode("utf-8", errors="replace"), at + 8 + n

        def value(kind: int, at: int, keep: bool) -> tuple[Any, int]:
            if kind in _SCALAR:
                fmt = _SCALAR[kind]
                return struct.unpack_from(fmt, buf, at)[0], at + struct.calcsize(fmt)
            if kind == 8:
                return string(at)
            if kind == 9:
                item_kind, count = struct.unpack_from("<IQ", buf, at)
                at += 12
                if item_kind in _NUMPY:
                    dtype = np.dtype(_NUMPY[item_kind])
                    end = at + count * dtype.itemsize
                    if end > len(buf):
                        raise struct.error("array runs past the end of the file")
                    items = np.frombuffer(buf, dtype=dtype, count=count, offset=at).tolist() if keep else None
                    if keep and item_kind == 7:
                        items = [bool(x) for x in items]
                    return items, end
                items = []
                for _ in range(count):
                    item, at = value(item_kind, at, keep)
                    if keep:
                        items.append(item)
                return items, at
            raise LMStackError(f"{path}: corrupt GGUF metadata (unknown value type {kind} at byte {at})")

        pos = 24
        try:
            for _ in range(n_kv):
                key, pos = string(pos)
                (kind,) = struct.unpack_from("<I", buf, pos)
                keep = key.startswith(prefix)
                val, pos = value(kind, pos + 4, keep)
                if keep:
                    out[key] = val
        except struct.error:
            raise LMStackError(f"{path}: truncated or corrupt GGUF metadata near byte {pos}") from None
        return out


def reader_metadata(reader: Any, prefix: str = "tokenizer.") -> dict[str, Any]:
    """The same dict as ``read_metadata``, from an already-open ``gguf.GGUFReader``."""
    return {k: _field_value(f) for k, f in reader.fields.items() if k.startswith(prefix)}


def read_vocab(source: Any, where: str = "GGUF file") -> GGUFVocab:
    """The tokenizer metadata of a GGUF file: ``source`` is a path, an open
    ``gguf.GGUFReader``, or a dict returned by ``read_metadata``."""
    import gguf

    if isinstance(source, gguf.GGUFReader):
        fields = reader_metadata(source)
    elif isinstance(source, dict):
        fields = source
    else:
        fields = read_metadata(source)

    def get(key: str, default: Any = None) -> Any:
        return fields.get(key, default)

    model = get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in fields:
        found = sorted(fields)[:6]
        raise LMStackError(
            f"{where}: has no tokenizer metadata (tokenizer.* keys found: {found or 'none'}); expected "
            f"tokenizer.ggml.model and tokenizer.ggml.tokens, as llama.cpp's converters write for a "
            f"{'/'.join(SUPPORTED_MODELS)} tokenizer"
        )
    add_bos = get("tokenizer.ggml.add_bos_token")
    add_eos = get("tokenizer.ggml.add_eos_token")
    add_space = get("tokenizer.ggml.add_space_prefix")
    vocab = GGUFVocab(
        model=str(model),
        tokens=get("tokenizer.ggml.tokens"),
        token_types=[int(t) for t in get("tokenizer.ggml.token_type", [])],
        scores=[float(s) for s in get("tokenizer.ggml.scores", [])],
        merges=get("tokenizer.ggml.merges", []),
        pre=get("tokenizer.ggml.pre"),
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"),
        unk_token_id=get("tokenizer.ggml.unknown_token_id"),
        pad_token_id=get("tokenizer.ggml.padding_token_id"),
        eot_token_id=get("tokenizer.ggml.eot_token_id"),
        cls_token_id=get("tokenizer.ggml.cls_token_id"),
        sep_token_id=get("tokenizer.ggml.seperator_token_id"),  # sic: llama.cpp's key name
        add_bos_token=None if add_bos is None else bool(add_bos),
        add_eos_token=None if add_eos is None else bool(add_eos),
        add_space_prefix=None if add_space is None else bool(add_space),
        chat_template=get("tokenizer.chat_template"),
    )
    if vocab.model == "bert":  # llama.cpp uses [CLS] as BOS and [SEP] as EOS for WordPiece
        if vocab.bos_token_id is None:
            vocab.bos_token_id = vocab.cls_token_id
        if vocab.eos_token_id is None:
            vocab.eos_token_id = vocab.sep_token_id
        if vocab.add_eos_token is None:
            vocab.add_eos_token = True
    return vocab


def _unique_vocab(tokens: list[str]) -> dict[str, int]:
    """token -> id; a repeated token string keeps its first id (later copies are unreachable
    by encoding anyway, and decode goes through the added-token table for them)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Ranked merges equivalent to SentencePiece BPE: the pair (a, b) ranks by the score of
    the token a+b (higher score merges first); only normal tokens are merge results."""
    vocab = _unique_vocab(tokens)
    scored: list[tuple[float, int, int, str, str]] = []
    for piece, pid in vocab.items():
        if types and types[pid] != TOKEN_NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            lid, rid = vocab.get(left), vocab.get(right)
            if lid is not None and rid is not None:
                scored.append((-scores[pid], lid, rid, left, right))
    scored.sort()
    return [(left, right) for _, _, _, left, right in scored]


def _added_tokens(vocab: GGUFVocab) -> list[Any]:
    """Control/unknown tokens as special added tokens, user-defined ones as plain added tokens."""
    from tokenizers import AddedToken

    added = []
    for i, t in enumerate(vocab.tokens):
        kind = vocab.token_types[i] if vocab.token_types else TOKEN_NORMAL
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN) or i in (vocab.bos_token_id, vocab.eos_token_id):
            if t:
                added.append((i, AddedToken(t, special=True, normalized=False)))
        elif kind == TOKEN_USER_DEFINED and t:
            added.append((i, AddedToken(t, special=False, normalized=False)))
    return [tok for _, tok in sorted(added, key=lambda x: x[0])]


def _split_merges(vocab: GGUFVocab, where: str) -> list[tuple[str, str]]:
    merges = []
    for m in vocab.merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise LMStackError(f"{where}: malformed merge {m!r} (expected 'left right')")
        merges.append((left, right))
    return merges


def build_hf_tokenizer(vocab: GGUFVocab, where: str = "GGUF file") -> Any:
    """The ``tokenizers.Tokenizer`` equivalent to llama.cpp's tokenizer for this vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if vocab.model == "gpt2":
        pre = vocab.pre or "default"
        if pre not in PRE_TOKENIZER_SPLITS:
            raise UnsupportedError(
                f"{where}: byte-level BPE pre-tokenizer {pre!r} is not supported; "
                f"supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}"
            )
        bpe = models.BPE(vocab=_unique_vocab(vocab.tokens), merges=_split_merges(vocab, where),
                         ignore_merges=pre in _IGNORE_MERGES)
        tok = Tokenizer(bpe)
        if pre in _NFC:
            tok.normalizer = normalizers.NFC()
        splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZER_SPLITS[pre]]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        add_bos_default = pre in _ADD_BOS_DEFAULT
    elif vocab.model == "llama":
        if len(vocab.scores) != len(vocab.tokens):
            raise LMStackError(f"{where}: SentencePiece vocabulary needs tokenizer.ggml.scores "
                               f"({len(vocab.scores)} scores for {len(vocab.tokens)} tokens)")
        unk = vocab.tokens[vocab.unk_token_id] if vocab.unk_token_id is not None else None
        bpe = models.BPE(vocab=_unique_vocab(vocab.tokens),
                         merges=_spm_merges(vocab.tokens, vocab.scores, vocab.token_types),
                         unk_token=unk, fuse_unk=True, byte_fallback=True)
        tok = Tokenizer(bpe)
        add_space = True if vocab.add_space_prefix is None else vocab.add_space_prefix
        # llama.cpp escapes spaces as "▁" and, with add_space_prefix, puts one "▁" in front of
        # the text and after every special token, even when the text starts with a space.
        steps_n = [normalizers.Prepend("▁")] if add_space else []
        tok.normalizer = normalizers.Sequence(steps_n + [normalizers.Replace(" ", "▁")])
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_space:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
        add_bos_default = True
    elif vocab.model == "gemma4":
        # SentencePiece-style BPE ("▁" for spaces, <0xNN> byte fallback) with the merges
        # written out in the file and no space prefix.
        bpe = models.BPE(vocab=_unique_vocab(vocab.tokens), merges=_split_merges(vocab, where),
                         unk_token=vocab.tokens[vocab.unk_token_id] if vocab.unk_token_id is not None else None,
                         fuse_unk=True, byte_fallback=True)
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        add_bos_default = True
    elif vocab.model == "bert":
        # llama.cpp's converter writes word-initial WordPiece tokens as "▁word" and
        # continuations without their "##"; "[CLS]"-style tokens stay as they are.
        def wordpiece(t: str) -> str:
            if t.startswith("[") and t.endswith("]"):
                return t
            return t[1:] if t.startswith("▁") else "##" + t

        pieces = [wordpiece(t) for t in vocab.tokens]
        unk = pieces[vocab.unk_token_id] if vocab.unk_token_id is not None else "[UNK]"
        tok = Tokenizer(models.WordPiece(vocab=_unique_vocab(pieces), unk_token=unk, max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        vocab = replace(vocab, tokens=pieces)
        add_bos_default = True
    else:
        raise UnsupportedError(
            f"{where}: tokenizer model {vocab.model!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODELS)}"
        )

    added = _added_tokens(vocab)
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])

    add_bos = add_bos_default if vocab.add_bos_token is None else vocab.add_bos_token
    add_eos = bool(vocab.add_eos_token)
    template = _template_processor(vocab, add_bos, add_eos)
    if template is not None:
        tok.post_processor = template
    elif vocab.model == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _template_processor(vocab: GGUFVocab, add_bos: bool, add_eos: bool) -> Any:
    from tokenizers import processors

    specials: list[tuple[str, int]] = []
    bos = eos = ""
    if add_bos and vocab.bos_token_id is not None:
        bos = vocab.tokens[vocab.bos_token_id]
        specials.append((bos, vocab.bos_token_id))
    if add_eos and vocab.eos_token_id is not None:
        eos = vocab.tokens[vocab.eos_token_id]
        if (eos, vocab.eos_token_id) not in specials:
            specials.append((eos, vocab.eos_token_id))

    def seq(piece: str, type_id: int) -> str:
        parts = [f"{bos}:{type_id}"] if bos else []
        parts.append(f"{piece}:{type_id}")
        if eos:
            parts.append(f"{eos}:{type_id}")
        return " ".join(parts)

    single, pair = seq("$A", 0), seq("$A", 0) + " " + seq("$B", 1)
    if not specials:
        return None
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
