"""What every handler reads from its app: ``AppContext``, kept in ``app.state.ctx``.

``ServerState`` is the part the runner (``server.py``) changes from outside: ready,
draining (SIGTERM), and how many requests are generating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmstack.serve.admission import Admission
from lmstack.serve.config import ServeConfig
from lmstack.serve.metrics import ServerMetrics
from lmstack.serve.record import RequestLog


class ServerState:
    def __init__(self):
        self.ready = False
        self.draining = False
        self.in_flight = 0


@dataclass
class AppContext:
    backend: Any  # LocalBackend | UpstreamBackend: open(), stats(), health(), embed(), model_name
    cfg: ServeConfig
    state: ServerState
    metrics: ServerMetrics
    admission: Admission
    log: RequestLog


def context(request) -> AppContext:
    return request.app.state.ctx
