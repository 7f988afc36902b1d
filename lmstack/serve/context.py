"""What every handler reads from its app: ``AppContext``, kept in ``app.state.ctx``.

``ServerState`` is the part the runner (``server.py``) changes from outside: ready,
draining (SIGTERM) and until when, and how many requests are generating.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

from lmstack.serve.admission import Admission
from lmstack.serve.config import ServeConfig
from lmstack.serve.metrics import ServerMetrics
from lmstack.serve.record import RequestLog


class ServerState:
    def __init__(self):
        self.ready = False
        self.draining = False
        self.drain_deadline: Optional[float] = None  # time.monotonic() when the drain gives up on streams
        self.in_flight = 0

    def retry_after(self) -> int:
        """Seconds a client should wait while draining: until the drain is over, at least 1."""
        left = 0.0 if self.drain_deadline is None else self.drain_deadline - time.monotonic()
        return max(1, math.ceil(left))


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
