"""Who gets in: API keys, a token bucket per key, refusal while draining, and the body limit.

``Admission.check(request)`` runs at the top of every generating handler, after the body
was validated, and returns the key's name for the log. ``BodyLimit`` is ASGI middleware:
a body over the limit (declared or streamed) is a 413 before it is read, and every
response is counted in ``lmstack_requests_total{endpoint,status}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time

from lmstack.serve.events import APIError, error_body

KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/ready",
               "/metrics", "/")


class RateLimiter:
    """A token bucket per API key: ``rpm`` requests a minute, bursts up to ``rpm``."""

    def __init__(self, rpm: float):
        self.rate, self.burst = rpm / 60.0, max(1.0, rpm)
        self.buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when allowed, else seconds until a request will be."""
        now = time.monotonic()
        with self._lock:
            tokens, t = self.buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - t) * self.rate)
            if tokens >= 1.0:
                self.buckets[key] = (tokens - 1.0, now)
                return 0.0
            self.buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


class Admission:
    """``api_keys`` are ``name:key`` or a bare key (named by its hash); ``state.draining`` refuses all."""

    def __init__(self, api_keys: list[str], rate_limit_rpm: float, state):
        self.keys = {k.split(":", 1)[-1]: k.split(":", 1)[0] if ":" in k else hashlib.sha256(k.encode()).hexdigest()[:8]
                     for k in api_keys}
        self.rpm = rate_limit_rpm
        self.limiter = RateLimiter(rate_limit_rpm) if rate_limit_rpm > 0 else None
        self.state = state

    def key_name(self, request) -> str:
        if not self.keys:
            return "anonymous"
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if token not in self.keys:
            raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                           type="authentication_error")
        return self.keys[token]

    def check(self, request) -> str:
        name = self.key_name(request)
        wait = self.limiter.take(name) if self.limiter is not None else 0.0
        if wait > 0:
            raise APIError(429, f"rate limit of {self.rpm:g} requests per minute reached for this key",
                           type="rate_limit_error", headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if self.state.draining:
            raise APIError(503, "the server is shutting down", type="server_error")
        return name


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, and the request counter."""

    def __init__(self, app, limit: int, metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                return await self._refuse(send_counted)
            try:
                await self.app(scope, self._limited(receive), send_counted)
            except _TooLarge:
                await self._refuse(send_counted)
        finally:
            path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
            if path != "/metrics":
                self.metrics.requests.labels(endpoint=path, status=str(status["code"])).inc()

    def _limited(self, receive):
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        return receive_limited

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body(f"request body is larger than the limit of {self.limit} bytes",
                                     param="body", code="body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
