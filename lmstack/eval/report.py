"""The evaluation report: ``report.json`` (for machines, baselines and ``compare``), ``report.md``
and ``report.html`` (per-task scores with bootstrap intervals, worst examples, gates, notes) and
``scores.png`` (a bar chart with the intervals; matplotlib, imported when writing).

Files are written atomically (``lmstack.files``: temp file, fsync, rename). ``metric_table()``
flattens the report to ``{"task.metric": value}``, the form gates and baselines compare.
``compare_reports`` pairs two runs item by item (same task, same item ids) and tests each
per-item metric's difference with a paired bootstrap and a permutation test.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lmstack.errors import LMStackError
from lmstack.eval.cache import OutputCache
from lmstack.eval.gates import GateResult, check_gates
from lmstack.eval.scoring import MetricValue
from lmstack.eval.stats import paired_bootstrap, permutation_test
from lmstack.eval.tasks import Model, SuiteConfig, TaskResult, check_judge, run_task
from lmstack.files import atomic_write, atomic_write_text

REPORT_VERSION = 2
# metrics not on a [0, 1] higher-is-better scale, left out of the chart
_NOT_UNIT = {"bleu", "chrf", "perplexity", "bits_per_byte", "judge_error_rate", "judge_errors", "judge_seed_std",
             "judge_low_confidence", "position_bias", "g_eval", "gpt_score", "selfcheck_ngram", "selfcheck_bertscore"}


@dataclass
class EvalReport:
    suite: str
    model: str
    tasks: list[TaskResult]
    gates: list[GateResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    created: str = ""
    version: int = REPORT_VERSION

    def metric_table(self) -> dict[str, float]:
        return {f"{t.name}.{m}": v.value for t in self.tasks for m, v in t.metrics.items()}

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalReport":
        tasks = [TaskResult(**{**t, "metrics": {k: MetricValue(**v) for k, v in t["metrics"].items()}})
                 for t in d["tasks"]]
        gates = [GateResult(**g) for g in d.get("gates", [])]
        return cls(d["suite"], d["model"], tasks, gates, d.get("notes", []), d.get("created", ""),
                   d.get("version", REPORT_VERSION))

    def to_markdown(self) -> str:
        lines = [f"# Evaluation report: {self.suite}", "", f"- model: `{self.model}`", f"- created: {self.created}", ""]
        lines += ["| task | metric | value | 95% CI | n |", "|---|---|---|---|---|"]
        for t in self.tasks:
            for m, v in t.metrics.items():
                ci = f"[{v.ci_low:.4g}, {v.ci_high:.4g}]" if v.ci_low is not None else "-"
                lines.append(f"| {t.name} | {m} | {v.value:.4g} | {ci} | {v.n} |")
        if self.gates:
            lines += ["", "## Gates", "", "| gate | value | threshold | result |", "|---|---|---|---|"]
            for g in self.gates:
                lines.append(f"| `{g.gate}` | {g.value:.4g} | {g.threshold:.4g} | {'pass' if g.passed else '**FAIL**'} |")
        notes = self.notes + [f"{t.name}: {n}" for t in self.tasks for n in t.notes]
        if notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
        worst = [(t, ex) for t in self.tasks for ex in t.examples]
        if worst:
            lines += ["", "## Worst examples", "", "| task | id | scores | prediction | reference |", "|---|---|---|---|---|"]
            for t, ex in worst:
                lines.append(f"| {t.name} | {ex.get('id', '')} | {_fmt_scores(ex.get('scores', {}))} | "
                             f"{_cell(ex.get('prediction', ''))} | {_cell(_first(ex.get('references')))} |")
        return "\n".join(lines) + "\n"

    def to_html(self, chart: Optional[str] = None) -> str:
        e = html.escape
        rows = "".join(
            f"<tr><td>{e(t.name)}</td><td>{e(m)}</td><td>{v.value:.4g}</td><td>"
            f"{f'[{v.ci_low:.4g}, {v.ci_high:.4g}]' if v.ci_low is not None else '-'}</td><td>{v.n}</td></tr>"
            for t in self.tasks for m, v in t.metrics.items())
        gates = "".join(f"<tr><td><code>{e(g.gate)}</code></td><td>{g.value:.4g}</td><td>{g.threshold:.4g}</td>"
                        f"<td>{'pass' if g.passed else '<b>FAIL</b>'}</td></tr>" for g in self.gates)
        worst = "".join(f"<tr><td>{e(t.name)}</td><td>{e(str(ex.get('id', '')))}</td><td>{e(_fmt_scores(ex.get('scores', {})))}"
                        f"</td><td><pre>{e(str(ex.get('prompt', ''))[-400:])}</pre></td><td><pre>{e(str(ex.get('prediction', '')))}"
                        f"</pre></td><td><pre>{e(_first(ex.get('references')))}</pre></td></tr>"
                        for t in self.tasks for ex in t.examples)
        notes = "".join(f"<li>{e(n)}</li>" for n in self.notes + [f"{t.name}: {n}" for t in self.tasks for n in t.notes])
        img = f'<p><img src="{e(chart)}" alt="scores with 95% intervals"></p>' if chart else ""
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(self.suite)}</title><style>"
                "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
                "padding:4px 8px;vertical-align:top}pre{white-space:pre-wrap;max-width:40em;margin:0}</style></head><body>"
                f"<h1>Evaluation report: {e(self.suite)}</h1><p>model: <code>{e(self.model)}</code><br>created: "
                f"{e(self.created)}</p>{img}<table><tr><th>task</th><th>metric</th><th>value</th><th>95% CI</th><th>n</th>"
                f"</tr>{rows}</table>"
                + (f"<h2>Gates</h2><table><tr><th>gate</th><th>value</th><th>threshold</th><th>result</th></tr>{gates}</table>"
                   if gates else "")
                + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
                + (f"<h2>Worst examples</h2><table><tr><th>task</th><th>id</th><th>scores</th><th>prompt (end)</th>"
                   f"<th>prediction</th><th>reference</th></tr>{worst}</table>" if worst else "")
                + "</body></html>\n")

    def chart(self, path: str | os.PathLike) -> Optional[Path]:
        """A PNG bar chart of the [0, 1] scores with their intervals; None when there are none."""
        bars = [(f"{t.name}.{m}", v) for t in self.tasks for m, v in t.metrics.items() if m not in _NOT_UNIT]
        if not bars:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(bars) + 2), 4))
        vals = [v.value for _, v in bars]
        err = [[v.value - (v.ci_low if v.ci_low is not None else v.value) for _, v in bars],
               [(v.ci_high if v.ci_high is not None else v.value) - v.value for _, v in bars]]
        ax.bar(range(len(bars)), vals, yerr=err, capsize=3, color="#4878a8")
        ax.set_xticks(range(len(bars)), [n for n, _ in bars], rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("score (95% bootstrap CI)")
        ax.set_title(f"{self.suite}: {Path(self.model).name}")
        fig.tight_layout()
        out = Path(path)
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        return out

    def write(self, out_dir: str | os.PathLike, chart: bool = True) -> tuple[Path, Path]:
        """Write ``report.json``, ``report.md``, ``report.html`` (and ``scores.png``) under ``out_dir``."""
        out = Path(out_dir)
        json_path, md_path = out / "report.json", out / "report.md"
        png = self.chart(out / "scores.png") if chart else None
        atomic_write_text(json_path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        md = self.to_markdown()
        if png:
            md = md.replace("\n\n| task | metric", f"\n\n![scores]({png.name})\n\n| task | metric", 1)
        atomic_write_text(md_path, md)
        atomic_write_text(out / "report.html", self.to_html(png.name if png else None))
        return json_path, md_path


def _first(refs) -> str:
    if isinstance(refs, list):
        return str(refs[0]) if refs else ""
    return "" if refs is None else str(refs)


def _cell(text: str, width: int = 80) -> str:
    t = " ".join(str(text).split()).replace("|", "\\|")
    return t if len(t) <= width else t[: width - 3] + "..."


def _fmt_scores(scores: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in scores.items())


def load_report(path: str | os.PathLike) -> EvalReport:
    p = Path(path)
    if not p.is_file():
        raise LMStackError(f"report {p} not found (expected a report.json written by `lmstack eval run`)")
    try:
        return EvalReport.from_dict(json.loads(p.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LMStackError(f"report {p}: not an lmstack evaluation report ({e})") from None


def apply_gates(report: EvalReport, gates: list[str], baseline: Optional[EvalReport] = None) -> EvalReport:
    report.gates = check_gates(gates, report.metric_table(), baseline.metric_table() if baseline else None)
    return report


def run_suite(suite: SuiteConfig, model: Model, model_name: str, judge: Optional[Model] = None,
              progress: bool = True, cache: Optional[OutputCache] = None) -> EvalReport:
    """Run every task, then the suite's gates (against ``suite.baseline`` when given)."""
    baseline = load_report(suite.baseline) if suite.baseline else None
    for t in suite.tasks:  # a judge that cannot serve a task fails the suite before anything runs
        check_judge(t, judge)
    results = [run_task(t, model, judge, suite.bootstrap_resamples, suite.alpha, suite.seed, progress, cache)
               for t in suite.tasks]
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report = EvalReport(suite.name, model_name, results, created=created)
    return apply_gates(report, suite.gates, baseline)


@dataclass
class MetricDiff:
    task: str
    metric: str
    n: int  # items in both runs
    a: float  # mean over the shared items
    b: float
    diff: float  # b - a
    ci_low: float
    ci_high: float
    p_bootstrap: float
    p_permutation: float

    @property
    def significant(self) -> bool:
        return self.p_permutation < 0.05


def compare_reports(a: EvalReport, b: EvalReport, n_resamples: int = 1000, seed: int = 0) -> tuple[list[MetricDiff], list[str]]:
    """Paired differences (b - a) of every per-item metric of the tasks both runs have; notes on
    what could not be paired (corpus metrics such as BLEU have no per-item scores)."""
    notes, diffs = [], []
    tb = {t.name: t for t in b.tasks}
    for ta in a.tasks:
        t2 = tb.get(ta.name)
        if t2 is None:
            notes.append(f"task {ta.name!r} is only in the first report")
            continue
        pos_b = {i: k for k, i in enumerate(t2.item_ids)}
        shared = [(k, pos_b[i]) for k, i in enumerate(ta.item_ids) if i in pos_b]
        for m, sa in ta.item_scores.items():
            sb = t2.item_scores.get(m)
            if sb is None or not shared:
                continue
            xa, xb = [sa[i] for i, _ in shared], [sb[j] for _, j in shared]
            d, lo, hi, p = paired_bootstrap(xa, xb, n_resamples, 0.05, seed)
            diffs.append(MetricDiff(ta.name, m, len(shared), sum(xa) / len(xa), sum(xb) / len(xb), d, lo, hi, p,
                                    permutation_test(xa, xb, 10 * n_resamples, seed)))
        unpaired = sorted(set(ta.metrics) - set(ta.item_scores))
        if unpaired:
            notes.append(f"{ta.name}: {unpaired} have no per-item scores (corpus metrics); not tested")
    notes += [f"task {n!r} is only in the second report" for n in tb if n not in {t.name for t in a.tasks}]
    return diffs, notes


def compare_markdown(diffs: list[MetricDiff], notes: list[str], a_name: str, b_name: str) -> str:
    lines = [f"# Comparison: B = `{b_name}` vs A = `{a_name}`", "",
             "| task | metric | n | A | B | B - A | 95% CI | p (bootstrap) | p (permutation) | |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d in diffs:
        lines.append(f"| {d.task} | {d.metric} | {d.n} | {d.a:.4g} | {d.b:.4g} | {d.diff:+.4g} | "
                     f"[{d.ci_low:+.4g}, {d.ci_high:+.4g}] | {d.p_bootstrap:.3g} | {d.p_permutation:.3g} | "
                     f"{'significant' if d.significant else ''} |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"
