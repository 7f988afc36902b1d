"""Who gets in: refusal while draining, API keys, a brake on key guessing, a token bucket
per key, and the body limit.

``Admission.check(request)`` runs at the top of every generating handler, after the body
was validated, and returns the key's name for the log. A client address that sent
``AUTH_FAILURES`` wrong keys within ``AUTH_WINDOW_S`` seconds gets 429 (with
``Retry-After``) until the oldest of them leaves the window, even with a right key; other
addresses are not affected. (Behind a reverse proxy every client has the proxy's address:
the proxy should do its own throttling.) ``BodyLimit`` is ASGI middleware: a body over the
limit (declared or streamed, as chunks without a ``Content-Length``) is a 413 before the
rest of it is read, and every response is counted in
``lmstack_requests_total{endpoint,status}``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import threading
import time

from starlette.exceptions import HTTPException

from lmstack.serve.events import APIError, error_body

AUTH_FAILURES = 10  # wrong keys from one address ...
AUTH_WINDOW_S = 60.0  # ... within this many seconds, then 429 until the window passes

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


class FailureWindow:
    """Recent failures per client address: ``blocked(addr)`` is the seconds until ``addr`` may
    try again once it has ``limit`` failures within ``window`` seconds (0 while it may)."""

    def __init__(self, limit: int = AUTH_FAILURES, window: float = AUTH_WINDOW_S):
        self.limit, self.window = limit, window
        self.failures: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def _recent(self, addr: str, now: float) -> collections.deque:
        times = self.failures.get(addr, collections.deque())
        while times and now - times[0] >= self.window:
            times.popleft()
        return times

    def blocked(self, addr: str) -> float:
        now = time.monotonic()
        with self._lock:
            times = self._recent(addr, now)
            return self.window - (now - times[-self.limit]) if len(times) >= self.limit else 0.0

    def fail(self, addr: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self.failures) > 4096:  # forget addresses whose failures have all left the window
                self.failures = {a: t for a, t in self.failures.items() if self._recent(a, now)}
            self.failures[addr] = times = self._recent(addr, now)
            times.append(now)
            if len(times) > self.limit:
                times.popleft()


class Admission:
    """``api_keys`` are ``name:key`` or a bare key (named by its hash); ``state.draining`` refuses all."""

    def __init__(self, api_keys: list[str], rate_limit_rpm: float, state):
        self.keys = {k.split(":", 1)[-1]: k.split(":", 1)[0] if ":" in k else hashlib.sha256(k.encode()).hexdigest()[:8]
                     for k in api_keys}
        self.rpm = rate_limit_rpm
        self.limiter = RateLimiter(rate_limit_rpm) if rate_limit_rpm > 0 else None
        self.auth_failures = FailureWindow()
        self.state = state

    def key_name(self, request) -> str:
        if not self.keys:
            return "anonymous"
        addr = request.client.host if request.client else "unknown"
        wait = self.auth_failures.blocked(addr)
        if wait > 0:
            raise APIError(429, f"too many requests with a wrong API key from {addr}; retry after {math.ceil(wait)} s",
                           type="rate_limit_error", headers={"Retry-After": str(max(1, math.ceil(wait)))},
                           kind="auth_throttled")
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if token not in self.keys:
            self.auth_failures.fail(addr)
            raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                           type="authentication_error")
        return self.keys[token]

    def check(self, request) -> str:
        if self.state.draining:
            raise APIError(503, "the server is shutting down; retry on another replica or after the restart",
                           type="server_error", headers={"Retry-After": str(self.state.retry_after())})
        name = self.key_name(request)
        wait = self.limiter.take(name) if self.limiter is not None else 0.0
        if wait > 0:
            raise APIError(429, f"rate limit of {self.rpm:g} requests per minute reached for this key",
                           type="rate_limit_error", headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return name


class BodyTooLarge(HTTPException):
    """Raised while the body is read; an ``HTTPException`` so that FastAPI lets it through
    (it turns any other exception during body parsing into a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")
        self.limit = limit

    def body(self) -> dict:
        return error_body(self.detail, param="body", code="body_too_large")


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, and the request counter."""

    def __init__(self, app, limit: int, metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500, "started": False}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                return await self._refuse(send_counted)
            try:
                await self.app(scope, self._limited(receive), send_counted)
            except BodyTooLarge:  # raised where no exception handler caught it
                if not status["started"]:
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
                    raise BodyTooLarge(self.limit)
            return message

        return receive_limited

    async def _refuse(self, send) -> None:
        body = json.dumps(BodyTooLarge(self.limit).body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
