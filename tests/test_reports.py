"""The charts and tables of the evaluation report and the data report: every bar labelled (a
zero included), the metrics a chart leaves out listed with the reason, one panel per task,
removal counts on a log axis beside their table, and no empty scores cell."""

import pytest

from lmstack.data.report import RunReport
from lmstack.eval.report import EvalReport
from lmstack.eval.scoring import MetricValue
from lmstack.eval.tasks import TaskResult

pytest.importorskip("matplotlib")


@pytest.fixture
def figures(monkeypatch):
    """The figures the reports draw, kept open for inspection (the reports close them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    for fig in kept:
        close(fig)


def _mv(v, lo=None, hi=None):
    return MetricValue(v, v if lo is None else lo, v if hi is None else hi, 30)


def _report():
    translation = {"id": "tr-001", "prediction": "Le chat.", "references": ["Le chien."], "scores": {}}
    judged = {"id": "qa-005", "prediction": "12", "references": ["Twelve"], "scores": {},
              "judge": [{"seed": 0, "replies": ["?"], "error": "unparseable after 3 attempts: '?'"}]}
    tasks = [
        TaskResult("qa", "generative", 32, {"exact_match": _mv(0.0), "token_f1": _mv(0.231, 0.17, 0.29)},
                   examples=[{"id": "qa-001", "prediction": "x", "references": ["y"],
                              "scores": {"exact_match": 0.0, "token_f1": 0.0}}],
                   item_scores={"exact_match": [0.0], "token_f1": [0.0]}),
        TaskResult("translation", "generative", 30, {"bleu": _mv(0.29, 0.14, 0.47), "chrf": _mv(14.19, 12.7, 15.8)},
                   examples=[translation]),
        TaskResult("mc", "multiple_choice", 30, {"accuracy": _mv(0.2667, 0.1, 0.43)}),
        TaskResult("qa_judge", "judge", 32, {"judge_score": _mv(0.162), "judge_errors": _mv(21),
                                             "judge_error_rate": _mv(0.33)}, examples=[judged]),
        TaskResult("passages_ppl", "perplexity", 24, {"perplexity": _mv(13.65)}),
    ]
    return EvalReport("baseline", "m.gguf", tasks, created="now")


def test_eval_chart_has_a_panel_per_task_and_labels_every_bar_a_zero_included(tmp_path, figures):
    rep = _report()
    rep.write(tmp_path)
    fig = figures[-1]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["qa", "mc", "qa_judge"]  # tasks with a [0, 1] metric
    qa = panels[0]
    assert [t.get_text() for t in qa.get_xticklabels()] == ["exact_match", "token_f1"]
    assert [t.get_text() for t in qa.texts] == ["0.00", "0.23"]
    zero_marks = [ln for ln in qa.get_lines() if ln.get_color() == "#c0392b"]
    assert len(zero_marks) == 1 and max(abs(x) for x in zero_marks[0].get_xdata()) < 0.5  # over bar 0
    assert [t.get_text() for t in panels[1].texts] == ["0.27"]
    footnote = "\n".join(t.get_text() for ax in fig.axes if not ax.get_title() for t in ax.texts)
    assert "on a 0-100 scale: translation.bleu, translation.chrf" in footnote
    assert "unbounded, lower is better: passages_ppl.perplexity" in footnote
    assert "judge diagnostics, lower is better: qa_judge.judge_error_rate" in footnote
    md = (tmp_path / "report.md").read_text()
    assert ("![scores](scores.png)\n\nNot in the chart (not a [0, 1] score):\n\n"
            "- on a 0-100 scale: translation.bleu, translation.chrf\n") in md
    assert "<li>on a 0-100 scale: translation.bleu, translation.chrf</li>" in (tmp_path / "report.html").read_text()


def test_eval_report_rows_without_per_item_scores_say_why():
    md = _report().to_markdown()
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[2] for line in md.splitlines()
            if line.startswith("| ") and line.count(" | ") == 4 and "-" in line.split(" | ")[1]}
    assert rows["translation"] == "no per-item score: bleu, chrf are corpus-level"
    assert rows["qa_judge"] == "no score: every judge verdict failed (unparseable after 3 attempts: '?')"
    assert rows["qa"] == "exact_match=0, token_f1=0"


def _data_report():
    rep = RunReport()
    for reason, n in (("stop_words", 4608), ("too_few_words", 1795), ("digit_fraction", 1)):
        for i in range(n):
            rep.remove("quality", reason, f"d{i}", "src", "text")
    rep.step("quality", 7000, 70000, 7000 - 6404, 5000)
    return rep


def test_data_chart_uses_a_log_axis_and_sits_beside_its_table(tmp_path, figures):
    _data_report().write(tmp_path)
    (ax,) = figures[-1].axes
    assert ax.get_xscale() == "log" and ax.get_xlim()[0] < 1  # a reason that removed 1 document still shows
    bars = sorted(ax.patches, key=lambda b: b.get_width())
    assert bars[0].get_x() + bars[0].get_width() == pytest.approx(1.0)  # the bar ends at its count
    assert sorted(t.get_text().strip() for t in ax.texts) == ["1", "1,795", "4,608"]
    md = (tmp_path / "report.md").read_text()
    section = md.split("## Removed, by reason\n\n")[1].split("\n## ")[0]
    assert section.startswith("![documents removed per reason, log scale](report.png)\n\n"
                              "| reason | docs | share of removed | chars |")
    assert "| quality/digit_fraction | 1 | 0.0% | 4 |" in section
    assert "| quality/stop_words | 4,608 | 72.0% | 18,432 |" in section
    html = (tmp_path / "report.html").read_text()
    assert html.index("<h2>Removed, by reason</h2>") < html.index("<img") < html.index("<th>share of removed</th>")
