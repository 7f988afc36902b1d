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
import textwrap
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
# Metrics not on a [0, 1] higher-is-better scale, left out of the chart, and why (listed under it).
_OFF_CHART = {
    "bleu": "on a 0-100 scale", "chrf": "on a 0-100 scale", "g_eval": "on a 1-5 scale",
    "perplexity": "unbounded, lower is better", "bits_per_byte": "unbounded, lower is better",
    "selfcheck_ngram": "unbounded, lower is better", "gpt_score": "a mean log-probability (<= 0)",
    "selfcheck_bertscore": "lower is better", "judge_error_rate": "judge diagnostics, lower is better",
    "judge_low_confidence": "judge diagnostics, lower is better", "position_bias": "judge diagnostics, lower is better",
    "judge_errors": "counts", "judge_seed_std": "a spread across judge seeds",
}
_CHART_SLOTS = 14  # bar slots per row of the chart: a task spans as many as it has bars


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
                lines.append(f"| {t.name} | {ex.get('id', '')} | {_example_scores(t, ex)} | "
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
        worst = "".join(f"<tr><td>{e(t.name)}</td><td>{e(str(ex.get('id', '')))}</td><td>{e(_example_scores(t, ex))}"
                        f"</td><td><pre>{e(str(ex.get('prompt', ''))[-400:])}</pre></td><td><pre>{e(str(ex.get('prediction', '')))}"
                        f"</pre></td><td><pre>{e(_first(ex.get('references')))}</pre></td></tr>"
                        for t in self.tasks for ex in t.examples)
        notes = "".join(f"<li>{e(n)}</li>" for n in self.notes + [f"{t.name}: {n}" for t in self.tasks for n in t.notes])
        img = f'<p><img src="{e(chart)}" alt="scores with 95% intervals"></p>' if chart else ""
        if chart and self.off_chart():
            img += ("<p>Not in the chart (not a [0, 1] score):</p><ul>"
                    + "".join(f"<li>{e(r)}: {e(', '.join(n))}</li>" for r, n in self.off_chart().items()) + "</ul>")
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

    def off_chart(self) -> dict[str, list[str]]:
        """``{reason: ["task.metric", ...]}`` of the metrics the chart leaves out."""
        out: dict[str, list[str]] = {}
        for t in self.tasks:
            for m in t.metrics:
                if m in _OFF_CHART:
                    out.setdefault(_OFF_CHART[m], []).append(f"{t.name}.{m}")
        return out

    def chart(self, path: str | os.PathLike) -> Optional[Path]:
        """A PNG of the [0, 1] scores with their intervals, one panel per task, every bar labelled
        with its value (a zero is a red mark on the axis); the metrics left out are listed under
        it with the reason. None when no metric is on that scale."""
        groups = [(t.name, [(m, v) for m, v in t.metrics.items() if m not in _OFF_CHART]) for t in self.tasks]
        groups = [(name, bars) for name, bars in groups if bars]
        if not groups:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows: list[list[tuple[str, list, int]]] = [[]]  # panels packed into rows of _CHART_SLOTS slots
        for name, bars in groups:
            span = max(len(bars) + 1, -(-len(name) // 6), 3)  # room for the bars and the title
            if rows[-1] and sum(s for *_, s in rows[-1]) + span > _CHART_SLOTS:
                rows.append([])
            rows[-1].append((name, bars, span))
        left_out = [f"{reason}: {', '.join(names)}" for reason, names in self.off_chart().items()]
        foot = "\n".join(textwrap.fill(line, 130) for line in
                         (["Not in this chart (not a [0, 1] score):"] + left_out if left_out else []))
        foot_h = 0.2 * (foot.count("\n") + 1) + 0.2 if foot else 0.0
        fig = plt.figure(figsize=(_CHART_SLOTS * 0.6 + 1, 2.9 * len(rows) + foot_h + 0.4), layout="constrained")
        grid = fig.add_gridspec(len(rows) + bool(foot), _CHART_SLOTS,
                                height_ratios=[2.9] * len(rows) + ([foot_h] if foot else []))
        for r, row in enumerate(rows):
            col = 0
            for k, (name, bars, span) in enumerate(row):
                ax = fig.add_subplot(grid[r, col:col + span])
                col += span
                _panel(ax, name, bars, ylabel=k == 0)
        if foot:
            ax = fig.add_subplot(grid[-1, :])
            ax.axis("off")
            ax.text(0, 1, foot, va="top", ha="left", fontsize=8, transform=ax.transAxes)
        fig.suptitle(f"{self.suite}: {Path(self.model).name} (95% bootstrap intervals)")
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
            below = "".join(f"\n- {reason}: {', '.join(names)}" for reason, names in self.off_chart().items())
            below = f"\n\nNot in the chart (not a [0, 1] score):\n{below}" if below else ""
            md = md.replace("\n\n| task | metric", f"\n\n![scores]({png.name}){below}\n\n| task | metric", 1)
        atomic_write_text(md_path, md)
        atomic_write_text(out / "report.html", self.to_html(png.name if png else None))
        return json_path, md_path


def _panel(ax, task: str, bars: list, ylabel: bool) -> None:
    """One task's bars: value labels above the interval, a red mark on the axis for a zero."""
    x = range(len(bars))
    vals = [v.value for _, v in bars]
    lo = [v.ci_low if v.ci_low is not None else v.value for _, v in bars]
    hi = [v.ci_high if v.ci_high is not None else v.value for _, v in bars]
    ax.bar(x, vals, yerr=[[v - a for v, a in zip(vals, lo)], [b - v for v, b in zip(vals, hi)]], capsize=3,
           color="#4878a8", width=0.7)
    for i, (v, top) in enumerate(zip(vals, hi)):
        if v < 0.01:  # too low to see as a bar
            ax.plot([i - 0.35, i + 0.35], [0.006, 0.006], color="#c0392b", lw=3, solid_capstyle="butt")
        ax.text(i, max(top, v) + 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), [m for m, _ in bars], rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(bars) - 0.4)
    ax.set_ylim(0, 1.12)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.tick_params(axis="y", labelsize=7, labelleft=ylabel)
    if ylabel:
        ax.set_ylabel("score")
    ax.set_title(task, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _first(refs) -> str:
    if isinstance(refs, list):
        return str(refs[0]) if refs else ""
    return "" if refs is None else str(refs)


def _cell(text: str, width: int = 80) -> str:
    t = " ".join(str(text).split()).replace("|", "\\|")
    return t if len(t) <= width else t[: width - 3] + "..."


def _fmt_scores(scores: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in scores.items())


def _example_scores(t: TaskResult, ex: dict) -> str:
    """An example's per-item scores, or why it has none: its judge verdicts failed, or the
    task's metrics are corpus-level (BLEU, chrF score the whole set, not one item)."""
    if ex.get("scores"):
        return _fmt_scores(ex["scores"])
    errors = [j["error"] for j in ex.get("judge") or [] if isinstance(j, dict) and j.get("error")]
    if errors:
        return f"no score: every judge verdict failed ({_cell(errors[0], 60)})"
    corpus = [m for m in t.metrics if m not in t.item_scores and not m.startswith("judge_")]
    if corpus:
        return f"no per-item score: {', '.join(corpus)} {'is' if len(corpus) == 1 else 'are'} corpus-level"
    return "-"


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
