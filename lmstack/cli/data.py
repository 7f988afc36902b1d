"""Data commands: ``prepare`` (sources -> shards + report) and ``info`` (what a prepared folder holds)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_prepare(a: argparse.Namespace) -> int:
    from lmstack.config import config_from_recipe
    from lmstack.data.pipeline import PrepareConfig, prepare

    cfg = config_from_recipe(PrepareConfig, a.config, a)
    report = prepare(cfg)
    steps = report["steps"]
    print(f"{cfg.output}: {steps['read']['docs_in']:,} documents read, "
          f"{sum(v.get('docs_kept', 0) for v in report['sources'].values()):,} kept")
    for name, s in steps.items():
        if s["docs_in"]:
            print(f"  {name:<12} {s['docs_in']:>9,} -> {s['docs_out']:>9,} docs  "
                  f"{s['chars_in'] / 1e6:>9.2f} -> {s['chars_out'] / 1e6:>9.2f} MB")
    if "shards" in report:
        for split, s in report["shards"]["splits"].items():
            print(f"  {split}: {s['num_tokens']:,} tokens in {s['num_docs']:,} documents")
    if report["read_errors"]:
        print(f"  {len(report['read_errors'])} unreadable file(s)/record(s) skipped: see report.md")
    for note in report["notes"]:
        print(f"  note: {note}")
    print(f"  report: {cfg.output}/report.md")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from lmstack.data.shards import read_meta

    meta = read_meta(a.folder)
    summary = {k: meta.get(k) for k in ("complete", "dtype", "eos_token_id", "vocab_size", "tokenizer",
                                         "splits", "sources", "mixture")}
    summary["num_shards"] = len(meta["shards"])
    if a.json:
        print(json.dumps(summary, indent=2))
        return 0
    import numpy as np

    folder = Path(a.folder)
    state = "complete" if meta.get("complete") else "incomplete (run `lmstack data prepare RECIPE` again to finish)"
    lines = [f"{folder}: {state}"]
    for split, s in (meta.get("splits") or {}).items():
        lines.append(f"  {split + ':':<6} {s['num_tokens']:>13,} tokens in {s['num_docs']:,} documents")
    lines.append(f"  {summary['num_shards']} shard(s) of {np.dtype(meta['dtype']).name}, "
                 f"vocab_size {meta['vocab_size']:,}, eos id {meta['eos_token_id']}")
    shares = [f"{name} {src['token_share']:.1%}" for name, src in (meta.get("sources") or {}).items()
              if "token_share" in src]
    if shares:
        lines.append(f"  tokens by source: {', '.join(shares)}")
    tok = (meta.get("tokenizer") or {}).get("path")
    if tok:
        lines.append(f"  tokenizer: {folder / tok}")
    print("\n".join(lines))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.config import add_config_args
    from lmstack.data.pipeline import PrepareConfig

    p = subparsers.add_parser("data", help="prepare pre-training data: clean, dedup, decontaminate, shard")
    sub = p.add_subparsers(dest="verb", metavar="<verb>")
    pp = sub.add_parser("prepare", help="run a data recipe (YAML): sources -> clean -> dedup -> "
                                        "decontaminate -> shards + report; resumes an interrupted run")
    pp.add_argument("config", help="YAML recipe (see recipes/data/); flags below override it")
    add_config_args(pp, PrepareConfig, skip=("sources",))
    pp.set_defaults(func=cmd_prepare)
    pi = sub.add_parser("info", help="summarise a prepared folder (meta.json)")
    pi.add_argument("folder")
    pi.add_argument("--json", action="store_true", help="print meta.json's summary as JSON")
    pi.set_defaults(func=cmd_info)
    p.set_defaults(func=lambda a: p.print_help() or 2)
