"""Prometheus metrics in the text exposition format (version 0.0.4), with no dependency.

Counters and histograms are updated by the server as requests run; gauges (queue depth,
running sequences, busy slots) are read from the engine when ``/metrics`` is scraped.
Deliberately left out: summaries, exemplars, the OpenMetrics format, multi-process export.
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Optional

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in labels]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self.values.items()) or [((), 0.0)]:
            out.append(f"{self.name}{_labels(key)} {v:g}")
        return out


class Gauge:
    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {self.read():g}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{b:g}"}} {acc}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{self.name}_sum {self.sum:g}", f"{self.name}_count {self.count}"]
        return out


class ServerMetrics:
    def __init__(self, stats: Optional[Callable[[], dict]] = None):
        s = stats or (lambda: {})
        self.requests = Counter("lmstack_requests_total", "HTTP requests by endpoint and status code.")
        self.errors = Counter("lmstack_errors_total", "Requests that ended in an error, by kind.")
        self.prompt_tokens = Counter("lmstack_prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generation_tokens = Counter("lmstack_generation_tokens_total", "Tokens generated.")
        self.finish_reasons = Counter("lmstack_finish_reasons_total",
                                      "Finished choices by why they ended (deadline: the per-request deadline).")
        self.ttft = Histogram("lmstack_time_to_first_token_seconds", "Time from request to first token.")
        self.itl = Histogram("lmstack_inter_token_latency_seconds", "Time between consecutive tokens of a stream.")
        self.e2e = Histogram("lmstack_request_duration_seconds", "Time from request to its last token.")
        self.gauges = [
            Gauge("lmstack_queue_depth", "Requests waiting for a slot.", lambda: s().get("waiting", 0)),
            Gauge("lmstack_running_sequences", "Sequences being generated.", lambda: s().get("running", 0)),
            Gauge("lmstack_busy_slots", "KV-cache slots in use.", lambda: s().get("busy_slots", 0)),
            Gauge("lmstack_engine_steps", "Engine steps run since start.", lambda: s().get("steps", 0)),
        ]

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.requests, self.errors, self.prompt_tokens, self.generation_tokens, self.finish_reasons,
                  self.ttft, self.itl, self.e2e, *self.gauges):
            lines += m.render()
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` for every sample line (tests and benchmarks read it)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
