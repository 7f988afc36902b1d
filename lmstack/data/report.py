"""The report of a data run: what each step took in and let out, and why documents left.

Written as ``report.json`` (everything), ``report.md`` and ``report.html`` (readable, with
examples of removed documents) and ``report.png`` (a bar chart of removals per reason;
needs matplotlib, imported only here, and skipped with a note in the page when absent).
"""

from __future__ import annotations

import base64
import html
import importlib.util
import json
from pathlib import Path
from typing import Any

from lmstack.files import atomic_write_text

STEPS = ("read", "clean", "quality", "exact_dedup", "near_dedup", "decontam", "tokenize")


class RunReport:
    """Counters of one run; plain dicts so that the report round-trips through JSON."""

    def __init__(self, examples: int = 3, data: dict[str, Any] | None = None):
        self.examples = examples
        self.data: dict[str, Any] = data or {
            "steps": {s: {"docs_in": 0, "chars_in": 0, "docs_out": 0, "chars_out": 0, "seconds": 0.0}
                      for s in STEPS},
            "removed": {}, "sources": {}, "pii_replacements": {}, "flagged": [],
            "read_errors": [], "notes": [], "throughput": {},
        }

    def step(self, name: str, docs_in: int, chars_in: int, docs_out: int, chars_out: int,
             seconds: float = 0.0) -> None:
        s = self.data["steps"][name]
        s["docs_in"] += docs_in
        s["chars_in"] += chars_in
        s["docs_out"] += docs_out
        s["chars_out"] += chars_out
        s["seconds"] += seconds

    def source(self, name: str, **counts: int) -> None:
        src = self.data["sources"].setdefault(name, {})
        for k, v in counts.items():
            src[k] = src.get(k, 0) + v

    def remove(self, step: str, reason: str, doc_id: str, source: str, text: str,
               **extra: Any) -> None:
        r = self.data["removed"].setdefault(f"{step}/{reason}",
                                            {"step": step, "docs": 0, "chars": 0, "examples": []})
        r["docs"] += 1
        r["chars"] += len(text)
        if len(r["examples"]) < self.examples:
            snippet = text[:300] + ("..." if len(text) > 300 else "")
            r["examples"].append({"id": doc_id, "source": source, "text": snippet, **extra})

    def to_json(self) -> dict[str, Any]:
        return self.data

    # ---- writing ------------------------------------------------------------------------

    def write(self, folder: str | Path, title: str = "lmstack data report") -> list[Path]:
        folder = Path(folder)
        atomic_write_text(folder / "report.json", json.dumps(self.data, indent=2, ensure_ascii=False))
        png = self._chart(folder / "report.png")
        atomic_write_text(folder / "report.md", self.markdown(title, png.name if png else None))
        atomic_write_text(folder / "report.html", self.html(title, png))
        return [folder / n for n in ("report.json", "report.md", "report.html")] + ([png] if png else [])

    def _rows(self) -> list[tuple[str, dict[str, Any]]]:
        return [(s, self.data["steps"][s]) for s in STEPS if self.data["steps"][s]["docs_in"]]

    def markdown(self, title: str, png_name: str | None = None) -> str:
        d = self.data
        out = [f"# {title}", "", "## Steps", "",
               "| step | docs in | docs out | removed | chars in | chars out | seconds |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for name, s in self._rows():
            out.append(f"| {name} | {s['docs_in']:,} | {s['docs_out']:,} | "
                       f"{s['docs_in'] - s['docs_out']:,} | {s['chars_in']:,} | {s['chars_out']:,} | "
                       f"{s['seconds']:.1f} |")
        out += ["", "## Removed, by reason"]
        if png_name:
            out += ["", f"![documents removed per reason, log scale]({png_name})"]
        # the counts span orders of magnitude: the table beside the (log-scale) chart gives them exactly
        total = sum(r["docs"] for r in d["removed"].values()) or 1
        out += ["", "| reason | docs | share of removed | chars |", "|---|---:|---:|---:|"]
        for reason, r in sorted(d["removed"].items(), key=lambda kv: -kv[1]["docs"]):
            out.append(f"| {reason} | {r['docs']:,} | {r['docs'] / total:.1%} | {r['chars']:,} |")
        out += ["", "## Sources", "", "| source | " + " | ".join(_source_cols(d)) + " |",
                "|---|" + "---:|" * len(_source_cols(d))]
        for name, s in d["sources"].items():
            out.append(f"| {name} | " + " | ".join(_fmt(s.get(c, 0)) for c in _source_cols(d)) + " |")
        if d["throughput"]:
            out += ["", "## Throughput", "", "| stage | docs/s | MB/s |", "|---|---:|---:|"]
            for name, t in d["throughput"].items():
                out.append(f"| {name} | {t['docs_per_s']:,.0f} | {t['mb_per_s']:.2f} |")
        if d["pii_replacements"]:
            out += ["", "## PII replaced", ""] + [f"- {k}: {v:,}" for k, v in d["pii_replacements"].items()]
        if d["flagged"]:
            out += ["", f"## Flagged as contaminated (kept): {len(d['flagged'])}", ""]
            out += [f"- {f['id']}: {', '.join(f['eval_items'][:3])}" for f in d["flagged"][:20]]
        if d["read_errors"] or d["notes"]:
            out += ["", "## Read errors and notes", ""]
            out += [f"- {e['where']}: {e['error']}" for e in d["read_errors"][:20]]
            out += [f"- {n}" for n in d["notes"]]
        out += ["", "## Examples of removed documents", ""]
        for reason, r in sorted(d["removed"].items()):
            out.append(f"### {reason}")
            for ex in r["examples"]:
                extra = {k: v for k, v in ex.items() if k not in ("id", "source", "text")}
                out.append(f"- `{ex['id']}` {json.dumps(extra) if extra else ''}")
                out.append("  > " + ex["text"].replace("\n", " ")[:200])
            out.append("")
        return "\n".join(out) + "\n"

    def html(self, title: str, png: Path | None) -> str:
        import re

        md = self.markdown(title, None)
        body = []
        for block in md.split("\n\n"):
            lines = block.strip().split("\n")
            if lines[0].startswith("|"):
                rows = [ln.strip("|").split("|") for ln in lines if not re.match(r"^\|[-:|]+\|$", ln)]
                cells = lambda r, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in r)
                body.append("<table><tr>" + cells(rows[0], "th") + "</tr>"
                            + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows[1:]) + "</table>")
            else:
                for ln in lines:
                    m = re.match(r"^(#+) (.*)", ln)
                    if m:
                        n = len(m.group(1))
                        body.append(f"<h{n}>{html.escape(m.group(2))}</h{n}>")
                    elif ln.strip():
                        body.append(f"<p>{html.escape(ln)}</p>")
            if png is not None and block.startswith("## Removed, by reason"):
                body.append(f'<img alt="removed per reason" src="data:image/png;base64,'
                            f'{base64.b64encode(png.read_bytes()).decode()}">')
        style = ("body{font-family:sans-serif;max-width:70em;margin:auto}table{border-collapse:collapse}"
                 "td,th{border:1px solid #ccc;padding:2px 8px}td{text-align:right}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")

    def _chart(self, path: Path) -> Path | None:
        removed = sorted(self.data["removed"].items(), key=lambda kv: kv[1]["docs"])
        if not removed or importlib.util.find_spec("matplotlib") is None:
            if removed:
                self.data["notes"].append("report.png skipped: matplotlib is not installed")
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 0.35 * len(removed) + 1.2))
        docs = [v["docs"] for _, v in removed]
        # log scale: one reason often removes thousands and the next a handful, and a bar of
        # 1 next to 4,608 would not show on a linear axis (the report's table has the numbers)
        ax.barh([k for k, _ in removed], [n - 0.5 for n in docs], left=0.5, color="#4a7fb5")  # bars end at n
        ax.set_xscale("log")
        ax.set_xlim(0.5, max(docs) * 4)
        for i, n in enumerate(docs):
            ax.text(n, i, f" {n:,}", va="center", fontsize=8)
        ax.set_xlabel("documents removed (log scale)")
        ax.set_title("Documents removed per step/reason")
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)
        return path


def _source_cols(d: dict[str, Any]) -> list[str]:
    cols: list[str] = []
    for s in d["sources"].values():
        cols += [c for c in s if c not in cols]
    return cols


def _fmt(v: Any) -> str:
    return f"{v:,.3f}" if isinstance(v, float) else f"{v:,}"
