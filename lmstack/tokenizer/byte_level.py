"""A byte-level tokenizer with no merges: one token per byte, plus chat special tokens.

Gives randomly initialised preset models (and tests) a real, lossless tokenizer without any
trained vocabulary: ids 0..255 are the bytes, then ``<|endoftext|>``, ``<|im_start|>`` and
``<|im_end|>``. Needs a vocabulary of at least 259 entries.
"""

from __future__ import annotations

from lmstack.tokenizer.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_to_char = dict(zip(range(256), _gpt2_chars()))
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(SPECIALS)
    return Tokenizer(hf, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _gpt2_chars() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order (Radford et al. 2019)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars
