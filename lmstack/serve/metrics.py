"""Prometheus metrics (``prometheus_client``), in a registry of each app's own.

Counters and histograms are updated by the handlers as requests run; gauges (queue depth,
running sequences, busy slots, engine steps) are read from the backend's ``stats()`` when
``/metrics`` is scraped. Each app has its own ``CollectorRegistry``, so several servers in
one process (tests, a proxy and its upstream) never share a series. The ``_created``
series prometheus_client adds are left out of the exposition: the names stay the ones
documented in ``docs/serve.md``.
"""

from __future__ import annotations

from typing import Callable, Optional

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_GAUGES = (  # name, help, key of the backend's stats()
    ("lmstack_queue_depth", "Requests waiting for a slot.", "waiting"),
    ("lmstack_running_sequences", "Sequences being generated.", "running"),
    ("lmstack_busy_slots", "KV-cache slots in use.", "busy_slots"),
    ("lmstack_engine_steps", "Engine steps run since start.", "steps"),
)


class ServerMetrics:
    def __init__(self, stats: Optional[Callable[[], dict]] = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("lmstack_requests_total", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("lmstack_errors_total", "Requests that ended in an error, by kind.", ["kind"],
                              registry=r)
        self.prompt_tokens = Counter("lmstack_prompt_tokens_total", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("lmstack_generation_tokens_total", "Tokens generated.", registry=r)
        self.finish_reasons = Counter("lmstack_finish_reasons_total",
                                      "Finished choices by why they ended (deadline: the per-request deadline).",
                                      ["reason"], registry=r)
        self.ttft = Histogram("lmstack_time_to_first_token_seconds", "Time from request to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmstack_inter_token_latency_seconds", "Time between consecutive tokens of a stream.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lmstack_request_duration_seconds", "Time from request to its last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        read = stats or (lambda: {})
        for name, help, key in _GAUGES:
            Gauge(name, help, registry=r).set_function(lambda key=key: read().get(key, 0))

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """A registry's metrics less their ``<name>_created`` samples."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        for metric in self.registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` for every sample line (tests and benchmarks read it)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
