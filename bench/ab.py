"""Before/after: one benchmark command run against two source trees, interleaved, as ratios.

For a change that must not slow anything down (a refactor, a new layer), the peer is the code
before the change. Each pair runs the command once in each tree, in alternating order (ABBA),
each in its own process, so drift of a shared machine falls on both sides alike. The
command's last stdout line must be a JSON object (the ``--worker`` / ``--case`` modes of the
other scripts print one); every numeric field is compared.

    git worktree add /tmp/before HEAD~1     # or: git archive REV | tar -x -C /tmp/before
    python bench/ab.py --before /tmp/before --pairs 7 -- bench/decode.py --worker lmstack float32 1
    python bench/ab.py --before /tmp/before --pairs 5 -- bench/train.py --case lora-lmstack --steps 5

Each tree runs its own copy of the script (relative paths resolve in the tree) with the tree
first on ``PYTHONPATH``. Output: per field, the median of each side, the median of the
per-pair ratios (after / before) and their range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(tree: Path, cmd: list[str], threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run([sys.executable, *cmd], cwd=tree, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{tree}: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        sys.exit(f"{tree}: {' '.join(cmd)} printed no JSON line:\n{p.stdout[-2000:]}")
    return json.loads(lines[-1])


def numeric(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[prefix + k] = float(v)
        elif isinstance(v, dict):
            out.update(numeric(v, f"{prefix}{k}."))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--before", required=True, help="source tree of the code before the change")
    ap.add_argument("--after", default=str(ROOT), help="source tree after the change (default: this one)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fields", nargs="*", help="only these fields (default: every numeric one)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS...")
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("give the benchmark command after --")
    trees = {"before": Path(a.before).resolve(), "after": Path(a.after).resolve()}
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(a.pairs):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        for side in order:
            runs[side].append(numeric(run_once(trees[side], cmd, a.threads)))
        print(f"pair {i + 1}/{a.pairs} done", file=sys.stderr, flush=True)
    fields = a.fields or sorted(set(runs["before"][0]) & set(runs["after"][0]))
    print(f"\n`{' '.join(cmd)}`, {a.pairs} interleaved pairs, {a.threads} threads\n")
    print("| field | before (median) | after (median) | after / before, median of pairs | range |")
    print("|---|---|---|---|---|")
    for f in fields:
        b = [r[f] for r in runs["before"] if f in r]
        c = [r[f] for r in runs["after"] if f in r]
        ratios = [y / x for x, y in zip(b, c) if x]
        if not ratios:
            continue
        print(f"| {f} | {statistics.median(b):.4g} | {statistics.median(c):.4g} | "
              f"{statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f} |")


if __name__ == "__main__":
    main()
