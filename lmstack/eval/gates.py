"""Quality gates: one-line rules a report must satisfy (the CLI exits 1 when one fails).

Two forms, metric names as ``task.metric`` or a bare ``metric`` when only one task has it::

    bleu >= 20                         # threshold: >=, >, <=, <, ==
    qa.token_f1 > 0.5
    faithfulness must not drop by more than 0.02 vs baseline   # current >= baseline - 0.02
    accuracy must not drop by more than 5% vs baseline         # current >= baseline * 0.95

A gate that names a metric the report lacks is a ``ConfigError`` that lists the metrics
there are, never a silent pass.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Mapping, Optional

from lmstack.errors import ConfigError

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
_THRESHOLD = re.compile(r"^\s*([\w.@-]+)\s*(>=|<=|==|>|<)\s*(-?[\d.]+)\s*$")
_REGRESSION = re.compile(r"^\s*([\w.@-]+)\s+must\s+not\s+drop\s+by\s+more\s+than\s+([\d.]+)\s*(%?)"
                         r"(?:\s+(?:vs|versus|against)\s+(?:the\s+)?baseline)?\s*$", re.IGNORECASE)


@dataclass
class Gate:
    text: str
    metric: str
    op: str  # one of _OPS, or "no_drop"
    threshold: float  # the bound, or the allowed drop
    relative: bool = False


@dataclass
class GateResult:
    gate: str
    metric: str
    value: float
    threshold: float  # the bound the value was compared with
    passed: bool
    baseline: Optional[float] = None

    def message(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        base = f" (baseline {self.baseline:.4g})" if self.baseline is not None else ""
        return f"gate {verdict}: '{self.gate}': {self.metric} = {self.value:.4g}, threshold {self.threshold:.4g}{base}"


def parse_gate(text: str) -> Gate:
    m = _THRESHOLD.match(text)
    if m:
        try:
            return Gate(text, m.group(1), m.group(2), float(m.group(3)))
        except ValueError:
            pass
    m = _REGRESSION.match(text)
    if m:
        return Gate(text, m.group(1), "no_drop", float(m.group(2)), relative=bool(m.group(3)))
    raise ConfigError(f"gate {text!r}: expected '<metric> <op> <number>' (op one of {list(_OPS)}) or "
                      "'<metric> must not drop by more than <number>[%] vs baseline'")


def resolve_metric(name: str, metrics: Mapping[str, float]) -> str:
    """``task.metric`` as given, or the one ``*.metric`` key for a bare name."""
    if name in metrics:
        return name
    matches = [k for k in metrics if k.split(".", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ConfigError(f"gate metric {name!r} is not in the report; it has {sorted(metrics)}")
    raise ConfigError(f"gate metric {name!r} is ambiguous: {sorted(matches)}; name the task as task.metric")


def check_gates(gates: list[str], metrics: Mapping[str, float],
                baseline: Optional[Mapping[str, float]] = None) -> list[GateResult]:
    """Evaluate every gate against ``{"task.metric": value}`` (and the baseline's, if any)."""
    results = []
    for text in gates:
        g = parse_gate(text)
        key = resolve_metric(g.metric, metrics)
        value = metrics[key]
        if g.op == "no_drop":
            if baseline is None:
                raise ConfigError(f"gate {text!r} compares with a baseline, but no baseline report was given")
            base = baseline[resolve_metric(key, baseline)]
            bound = base * (1 - g.threshold / 100) if g.relative else base - g.threshold
            results.append(GateResult(text, key, value, bound, value >= bound - 1e-12, base))
        else:
            results.append(GateResult(text, key, value, g.threshold, bool(_OPS[g.op](value, g.threshold))))
    return results
