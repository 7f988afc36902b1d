"""Run llama.cpp's tokenizer test vectors through lmstack's GGUF tokenizer and print a table.

    .venv/bin/python bench/tokenizer_vectors.py [third_party/llama-vocab] [--markdown]

Each ``ggml-vocab-<name>.gguf`` with ``.gguf.inp``/``.gguf.out`` beside it is loaded with
``Tokenizer.from_gguf``; every input (split by ``\\n__ggml_vocab_test__\\n``) is encoded
without BOS, as llama.cpp's ``test-tokenizer-0`` does, and compared with the expected ids.
The table (vocab, tokenizer model, pre-tokenizer, passed/total, load and encode time) is the
one in docs/tokenizer.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SEPARATOR = "\n__ggml_vocab_test__\n"


def read_vectors(gguf_path: Path) -> list[tuple[str, list[int]]]:
    """(input text, expected ids) pairs of one vocab's .inp/.out files."""
    inputs = Path(f"{gguf_path}.inp").read_text(encoding="utf-8").split(SEPARATOR)
    outputs = Path(f"{gguf_path}.out").read_text(encoding="utf-8").split("\n")
    # The .out file has one line per input (ids separated by spaces) and may end with "\n".
    if len(outputs) == len(inputs) + 1 and outputs[-1] == "":
        outputs = outputs[:-1]
    if len(outputs) != len(inputs):
        raise ValueError(f"{gguf_path}: {len(inputs)} inputs but {len(outputs)} expected-id lines")
    return [(text, [int(x) for x in line.split()]) for text, line in zip(inputs, outputs)]


def run_vocab(gguf_path: Path) -> dict:
    from lmstack.errors import LMStackError
    from lmstack.tokenizer import Tokenizer
    from lmstack.tokenizer.gguf_vocab import read_metadata, read_vocab

    t0 = time.perf_counter()
    fields = read_metadata(gguf_path)
    meta = read_vocab(fields, str(gguf_path))
    row = {"vocab": gguf_path.name[len("ggml-vocab-"):-len(".gguf")], "model": meta.model,
           "pre": meta.pre or "(none)", "passed": 0, "total": 0, "note": "", "seconds": 0.0}
    has_vectors = Path(f"{gguf_path}.inp").exists() and Path(f"{gguf_path}.out").exists()
    vectors = read_vectors(gguf_path) if has_vectors else []
    row["total"] = len(vectors)
    try:
        tok = Tokenizer.from_gguf(gguf_path)
    except LMStackError as e:
        row["note"] = "not supported: " + str(e).split(": ", 1)[-1].split(";")[0]
        return row
    for text, expected in vectors:
        row["passed"] += tok.encode(text) == expected
    row["seconds"] = time.perf_counter() - t0
    if not has_vectors:
        row["note"] = "loads; no .inp/.out vectors shipped"
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default="third_party/llama-vocab")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    files = sorted(folder.glob("ggml-vocab-*.gguf"))
    if not files:
        print(f"no ggml-vocab-*.gguf files in {folder} (run scripts/fetch_test_assets.sh)", file=sys.stderr)
        return 2
    rows = [run_vocab(f) for f in files]
    if args.markdown:
        print("| vocab | model | pre-tokenizer | passed / total | seconds | note |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['vocab']} | {r['model']} | {r['pre']} | {r['passed']} / {r['total']} "
                  f"| {r['seconds']:.1f} | {r['note']} |")
    else:
        for r in rows:
            print(f"{r['vocab']:20s} {r['model']:7s} {r['pre']:15s} {r['passed']:3d}/{r['total']:<3d} "
                  f"{r['seconds']:5.1f}s {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
