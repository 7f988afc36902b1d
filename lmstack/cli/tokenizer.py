"""Tokenizer commands: ``train`` (byte-level BPE) and ``eval`` (compression vs GPT-2, cl100k, SmolLM2)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator


def _input_texts(a: argparse.Namespace) -> Iterator[str]:
    """Texts from --input files (through the data readers) or from a prepared folder's split."""
    from lmstack.errors import ConfigError

    if a.data:
        from pathlib import Path

        from lmstack.data.pipeline import split_of

        folder = Path(a.data)
        docs, meta = folder / "documents.jsonl", folder / "meta.json"
        if not docs.is_file():
            raise ConfigError(f"--data {folder}: no documents.jsonl (expected a `lmstack data prepare` folder)")
        split = json.loads(meta.read_text())["split"] if meta.is_file() else {"val_fraction": 0.0, "seed": 0}
        with open(docs, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if a.split == "all" or split_of(rec["id"], split["val_fraction"], split["seed"]) == a.split:
                    yield rec["text"]
        return
    if not a.input:
        raise ConfigError("give --input FILES (text, Markdown, JSONL, ...) or --data FOLDER")
    from lmstack.data.readers import ReadStats, SourceConfig, read_source

    stats = ReadStats()
    src = SourceConfig(name="input", kind=a.kind, paths=a.input, fields=[a.field])
    yield from (d.text for d in read_source(src, stats))
    for e in stats.errors:
        print(f"skipped {e['where']}: {e['error']}", file=sys.stderr)


def _add_input_args(p: argparse.ArgumentParser, default_split: str) -> None:
    p.add_argument("--input", nargs="*", default=[], help="files, directories or globs")
    p.add_argument("--kind", default="text", choices=["text", "markdown", "html", "jsonl", "parquet", "pdf"])
    p.add_argument("--field", default="text", help="JSONL/Parquet field holding the text")
    p.add_argument("--data", default=None, help="a prepared data folder (reads documents.jsonl)")
    p.add_argument("--split", default=default_split, choices=["train", "val", "all"],
                   help="which documents of --data to use")


def cmd_train(a: argparse.Namespace) -> int:
    from lmstack.config import config_from_recipe
    from lmstack.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    cfg = config_from_recipe(TokenizerTrainConfig, a.config, a)
    tok = train_tokenizer(_input_texts(a), cfg, show_progress=True)
    tok.save(a.output)
    print(f"{a.output}: vocab_size {tok.vocab_size}, eos {tok.eos_token!r} (id {tok.eos_token_id}), "
          f"special tokens {sorted(tok.special_tokens)}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from lmstack.files import atomic_write_text
    from lmstack.tokenizer.evaluate import compare, format_table, reference_encoders
    from lmstack.tokenizer.tokenizer import Tokenizer

    texts = list(_input_texts(a))
    encoders = {}
    for path in a.tokenizer:
        tok = Tokenizer.load(path)
        encoders[path] = lambda t, k=tok: k.encode(t, add_special_tokens=False)
    refs, notes = reference_encoders(a.compare)
    encoders.update(refs)
    results = compare(encoders, texts)
    print(f"{len(texts):,} texts, {sum(len(t.encode()) for t in texts) / 1e6:.2f} MB")
    print(format_table(results))
    for n in notes:
        print(f"skipped {n}", file=sys.stderr)
    if a.json:
        atomic_write_text(a.json, json.dumps(results, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.config import add_config_args
    from lmstack.tokenizer.train import TokenizerTrainConfig

    p = subparsers.add_parser("tokenizer", help="train and evaluate tokenizers")
    sub = p.add_subparsers(dest="verb", metavar="<verb>")
    pt = sub.add_parser("train", help="train a byte-level BPE tokenizer (saves tokenizer.json)")
    pt.add_argument("--output", required=True, help="folder for tokenizer.json + tokenizer_config.json")
    pt.add_argument("--config", default=None, help="YAML file of TokenizerTrainConfig fields (flags override it)")
    _add_input_args(pt, "train")
    add_config_args(pt, TokenizerTrainConfig)
    pt.set_defaults(func=cmd_train)
    pe = sub.add_parser("eval", help="compression (bytes/token, tokens/word) on held-out text")
    pe.add_argument("--tokenizer", nargs="*", default=[], help="tokenizer.json, folder or .gguf")
    pe.add_argument("--compare", nargs="*", default=["gpt2", "cl100k", "smollm2"],
                    choices=["gpt2", "cl100k", "smollm2"], help="reference tokenizers")
    pe.add_argument("--json", default=None, help="also write the figures to this JSON file")
    _add_input_args(pe, "val")
    pe.set_defaults(func=cmd_eval)
    p.set_defaults(func=lambda a: p.print_help() or 2)
