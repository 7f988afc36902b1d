"""Train a byte-level BPE tokenizer with the Hugging Face ``tokenizers`` library.

Byte-level BPE (Radford et al. 2019, GPT-2; Sennrich et al. 2016 for BPE) starts from the 256
byte symbols, so every string encodes and decodes back exactly: there is no unknown token.
Before merging, text is split by a pre-tokenisation regex so that merges never cross
word/number/punctuation boundaries: GPT-2's pattern, or Llama-3's (case-insensitive
contractions, digits in groups of at most three, newlines kept apart).

The result is saved as ``tokenizer.json`` + ``tokenizer_config.json`` that ``Tokenizer.load``
(and ``transformers.AutoTokenizer``) read. Deliberately left out: Unigram/WordPiece models,
normalisers (the data pipeline normalises text), and training from files directly (pass an
iterator of texts; the ``lmstack tokenizer train`` command reads files with the data readers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmstack.errors import ConfigError
from lmstack.tokenizer.tokenizer import Tokenizer

# Pre-tokenisation regexes, as published with the GPT-2 and Llama-3 tokenizers.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PATTERN, "llama3": LLAMA3_PATTERN}
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


@dataclass
class TokenizerTrainConfig:
    vocab_size: int = field(default=8192, metadata={"help": "total size, special tokens included"})
    pretokenizer: Literal["gpt2", "llama3"] = field(
        default="llama3", metadata={"help": "pre-tokenisation regex"})
    min_frequency: int = field(default=2, metadata={"help": "merge only pairs seen this often"})
    eos_token: str = field(default="<|endoftext|>", metadata={"help": "document separator"})
    special_tokens: list[str] = field(default_factory=list,
                                      metadata={"help": "extra special tokens"})
    chat_tokens: bool = field(default=True, metadata={"help": "add <|im_start|>, <|im_end|> and "
                                                                "a ChatML chat template"})
    max_chars: int | None = field(default=None, metadata={"help": "train on at most this much text"})

    def __post_init__(self) -> None:
        if self.vocab_size < 256 + len(self.all_special_tokens()):
            raise ConfigError(f"TokenizerTrainConfig.vocab_size: got {self.vocab_size}, expected at "
                              f"least 256 byte symbols + {len(self.all_special_tokens())} special tokens")

    def all_special_tokens(self) -> list[str]:
        tokens = [self.eos_token, *(CHAT_TOKENS if self.chat_tokens else []), *self.special_tokens]
        return list(dict.fromkeys(tokens))


def build_untrained(cfg: TokenizerTrainConfig):
    """The empty byte-level BPE pipeline: regex split, byte mapping, byte-level decoder."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS[cfg.pretokenizer]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    return hf


def _capped(texts: Iterable[str], max_chars: int | None) -> Iterable[str]:
    total = 0
    for t in texts:
        if max_chars is not None and total >= max_chars:
            return
        total += len(t)
        yield t


def train_tokenizer(texts: Iterable[str], cfg: TokenizerTrainConfig,
                    show_progress: bool = False) -> Tokenizer:
    """Train on ``texts`` (streamed once) and return the lmstack ``Tokenizer``."""
    from tokenizers import pre_tokenizers, trainers

    hf = build_untrained(cfg)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
        special_tokens=cfg.all_special_tokens(), show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    seen = [0]

    def counted(it: Iterable[str]) -> Iterable[str]:
        for t in it:
            seen[0] += 1
            yield t

    hf.train_from_iterator(counted(_capped(texts, cfg.max_chars)), trainer=trainer)
    if seen[0] == 0:
        raise ConfigError("tokenizer training got no text (are the inputs empty?)")
    template = None
    if cfg.chat_tokens:
        from lmstack.tokenizer.chat import DEFAULT_CHATML_TEMPLATE

        template = DEFAULT_CHATML_TEMPLATE
    return Tokenizer(hf, eos_token=cfg.eos_token, chat_template=template)


def save_trained(tok: Tokenizer, folder: str | Path) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``."""
    return tok.save(folder)
