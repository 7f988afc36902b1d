"""The OpenAI-compatible HTTP server (FastAPI) over a backend: the app is assembled here.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming or one
JSON body), ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health`` (503 when the
engine's watchdog sees no progress), ``GET /ready`` (503 while loading or draining),
``GET /metrics`` (Prometheus) and ``GET /`` (a chat page).

What keeps it up: every malformed request is a 4xx with an OpenAI-style body naming the
field (``errors.py``); bodies past ``max_body_bytes`` are refused before they are read,
API keys, a brake on key guessing and a per-key rate limit are checked (``admission.py``);
the engine queue is bounded (429 with ``Retry-After``); a per-request deadline; SSE
comments (``: ping``) keep idle streams open; a client that disconnects has its sequences
cancelled at once (``completions.py``); on SIGTERM ``server.py`` answers new requests with
503 while in-flight streams drain. One JSON line per request goes to ``request_log`` (``record.py``; prompts only
with ``log_prompts``).
"""

from __future__ import annotations

from typing import Optional

from lmstack.serve.admission import Admission, BodyLimit
from lmstack.serve.config import ServeConfig
from lmstack.serve.context import AppContext, ServerState
from lmstack.serve.metrics import ServerMetrics
from lmstack.serve.record import RequestLog


def create_app(backend, config: Optional[ServeConfig] = None, state: Optional[ServerState] = None):
    """The FastAPI application over ``backend``; ``state`` lets the runner flag draining."""
    from fastapi import FastAPI

    from lmstack.serve import errors, routes

    cfg = config or ServeConfig()
    state = state or ServerState()
    state.ready = True
    metrics = ServerMetrics(backend.stats)
    app = FastAPI(title="lmstack", version="0.1.0",
                  description="OpenAI-compatible API over lmstack's continuous-batching engine.")
    app.state.ctx = AppContext(backend, cfg, state, metrics, Admission(cfg.api_keys, cfg.rate_limit_rpm, state),
                               RequestLog(cfg.request_log))
    errors.install(app)
    app.include_router(routes.router)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes, metrics=metrics)
    return app
