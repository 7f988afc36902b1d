"""The evaluation report: one JSON file (for machines and baselines) and one Markdown file.

Both are written atomically (temp file + rename). ``metric_table()`` flattens the report to
``{"task.metric": value}``, the form gates and baselines compare.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lmstack.config import atomic_write_text
from lmstack.errors import LMStackError
from lmstack.eval.gates import GateResult, check_gates
from lmstack.eval.scoring import MetricValue
from lmstack.eval.tasks import Model, SuiteConfig, TaskResult, run_task

REPORT_VERSION = 1


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
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.md`` under ``out_dir``."""
        out = Path(out_dir)
        json_path, md_path = out / "report.json", out / "report.md"
        atomic_write_text(json_path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(md_path, self.to_markdown())
        return json_path, md_path


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
              progress: bool = True) -> EvalReport:
    """Run every task, then the suite's gates (against ``suite.baseline`` when given)."""
    baseline = load_report(suite.baseline) if suite.baseline else None
    results = [run_task(t, model, judge, suite.bootstrap_resamples, suite.alpha, suite.seed, progress)
               for t in suite.tasks]
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report = EvalReport(suite.name, model_name, results, created=created)
    return apply_gates(report, suite.gates, baseline)
