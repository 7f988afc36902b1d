"""The OpenAI-compatible HTTP server (FastAPI), over a backend (``backend.LocalBackend``).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming or one
JSON body), ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health`` (503 when the
engine's watchdog sees no progress), ``GET /ready`` (503 while loading or draining),
``GET /metrics`` (Prometheus) and ``GET /`` (a chat page).

What keeps it up: every malformed request is a 4xx with an OpenAI-style body naming the
field (``{"error": {"message", "type", "param", "code"}}``); bodies past ``max_body_bytes``
are refused before they are read; the engine queue is bounded (429 with ``Retry-After``);
optional API keys with a per-key rate limit; a per-request deadline; SSE comments
(``: ping``) keep idle streams open; a client that disconnects has its sequences
cancelled at once; on SIGTERM ``server.py`` stops accepting and drains in-flight streams.
One JSON line per request goes to ``request_log`` (prompts only with ``log_prompts``).
"""


import asyncio
import hashlib
import json
import math
import threading
import time
import uuid
from typing import Any, Optional

from lmstack.serve.backend import APIError, Delta, Job
from lmstack.serve.config import ServeConfig
from lmstack.serve.metrics import ServerMetrics
from lmstack.serve.protocol import (ChatCompletion, ChatRequest, Completion, CompletionRequest, EmbeddingList,
                                    EmbeddingRequest, ErrorResponse, Health, ModelList)


class _RateLimiter:
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


class _RequestLog:
    def __init__(self, path: Optional[str]):
        self.path = path
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        if not self.path:
            return
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


class ServerState:
    def __init__(self):
        self.ready = False
        self.draining = False
        self.in_flight = 0


def _error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 413, 429, 502, 503, 504)}
_KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/ready",
                "/metrics", "/")


class _BodyLimit:
    """ASGI middleware: 413 for bodies over the limit (declared or streamed), and request metrics."""

    def __init__(self, app, limit: int, metrics: ServerMetrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"
        status = {"code": 500}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def refuse():
            body = json.dumps(_error_body(f"request body is larger than the limit of {self.limit} bytes",
                                          param="body", code="body_too_large")).encode()
            await send_wrapped({"type": "http.response.start", "status": 413,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send_wrapped({"type": "http.response.body", "body": body})

        try:
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                await refuse()
                return
            seen = 0

            async def receive_limited():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.limit:
                        raise _TooLarge()
                return message

            try:
                await self.app(scope, receive_limited, send_wrapped)
            except _TooLarge:
                await refuse()
        finally:
            if path != "/metrics":
                self.metrics.requests.inc(endpoint=path, status=str(status["code"]))


class _TooLarge(Exception):
    pass


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _union_tag(x) -> bool:
    """pydantic puts the union member tried (``str``, ``list[TextPart]``, ``ToolChoice``) in error locations."""
    return isinstance(x, str) and (not x.isidentifier() or x[:1].isupper() or x in _TYPE_TAGS)


def create_app(backend, config: Optional[ServeConfig] = None, state: Optional[ServerState] = None):
    """The FastAPI application over ``backend``; ``state`` lets the runner flag draining."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = config or ServeConfig()
    state = state or ServerState()
    state.ready = True
    metrics = ServerMetrics(backend.stats)
    limiter = _RateLimiter(cfg.rate_limit_rpm) if cfg.rate_limit_rpm > 0 else None
    reqlog = _RequestLog(cfg.request_log)
    keys = {k.split(":", 1)[-1]: (k.split(":", 1)[0] if ":" in k else hashlib.sha256(k.encode()).hexdigest()[:8])
            for k in cfg.api_keys}

    app = FastAPI(title="lmstack", version="0.1.0",
                  description="OpenAI-compatible API over lmstack's continuous-batching engine.")
    app.state.lmstack = state
    app.state.metrics = metrics
    app.state.backend = backend

    # -- errors ------------------------------------------------------------------------------
    def api_error_response(e: APIError) -> JSONResponse:
        metrics.errors.inc(kind=e.type)
        return JSONResponse(_error_body(e.message, e.type, e.param), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return api_error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _union_tag(x)]
        param = ".".join(loc) or "body"
        if first.get("type") == "json_invalid":
            msg, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", "body"
        else:
            got = repr(first.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."
            msg = f"{param}: {first.get('msg')} (got {got})"
            if len(errs) > 1:
                msg += f"; and {len(errs) - 1} more problem(s)"
        metrics.errors.inc(kind="invalid_request_error")
        return JSONResponse(_error_body(msg, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(_error_body(f"{request.method} {request.url.path}: {e.detail}", kind),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        metrics.errors.inc(kind="server_error")
        return JSONResponse(_error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    # -- admission ---------------------------------------------------------------------------
    def admit(request: Request) -> str:
        key_name = "anonymous"
        if keys:
            auth = request.headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if token not in keys:
                raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                               type="authentication_error")
            key_name = keys[token]
        if limiter is not None:
            wait = limiter.take(key_name)
            if wait > 0:
                raise APIError(429, f"rate limit of {cfg.rate_limit_rpm:g} requests per minute reached for this key",
                               type="rate_limit_error", headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if state.draining:
            raise APIError(503, "the server is shutting down", type="server_error")
        return key_name

    def log_request(rid, endpoint, key, status, job: Optional[Job], t0, ttft, reasons, req=None, text=None):
        rec = {"time": round(time.time(), 3), "id": rid, "endpoint": endpoint, "key": key, "status": status,
               "prompt_tokens": job.prompt_tokens if job else 0,
               "completion_tokens": job.completion_tokens if job else 0,
               "latency_s": round(time.monotonic() - t0, 4), "ttft_s": None if ttft is None else round(ttft, 4),
               "finish_reasons": reasons}
        if job is not None and getattr(job, "tokens_after_cancel", None) is not None:
            rec["tokens_after_cancel"] = job.tokens_after_cancel
        if cfg.log_prompts and req is not None:
            rec["request"] = req.model_dump(mode="json", exclude_none=True)
            rec["output"] = text
        reqlog.write(rec)

    def _log_when_done(job: Job, args: tuple) -> None:
        for h in job.handles:
            h.finished.wait(10.0)
        log_request(*args)

    # -- generation --------------------------------------------------------------------------
    async def run(kind: str, req, request: Request):
        t0 = time.monotonic()
        key = admit(request)
        if hasattr(backend, "relay"):  # an OpenAI-compatible upstream answers; this server guards and records
            rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]

            def log(status, counts, ttft, reasons, text):
                log_request(rid, request.url.path, key, status, counts, t0, ttft, reasons, req, text)

            return await backend.relay(kind, req, request, t0=t0, key=key, metrics=metrics, state=state, log=log,
                                       keepalive_s=cfg.keepalive_s)
        job = backend.prepare_chat(req) if kind == "chat" else backend.prepare_completion(req)
        backend.start(job)
        metrics.prompt_tokens.inc(job.prompt_tokens)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        model = backend.model_name
        n_choices = len(job.requests)
        obj = "chat.completion" if kind == "chat" else "text_completion"
        timing = {"ttft": None, "last": {}}

        def observe(d: Delta) -> None:
            if not d.n_tokens:
                return
            now = time.monotonic()
            if timing["ttft"] is None:
                timing["ttft"] = now - t0
                metrics.ttft.observe(now - t0)
            last = timing["last"].get(d.index)
            if last is not None:
                metrics.itl.observe(now - last)
            timing["last"][d.index] = now
            metrics.generation_tokens.inc(d.n_tokens)

        def usage() -> dict:
            c = job.completion_tokens
            return {"prompt_tokens": job.prompt_tokens, "completion_tokens": c, "total_tokens": job.prompt_tokens + c}

        def logprobs_payload(d: Delta):
            if not d.logprobs:
                return None
            if kind == "chat":
                return {"content": [{"token": x["token"], "logprob": x["logprob"],
                                     "bytes": list(x["token"].encode("utf-8")),
                                     "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                                                      for t, lp in x["top"]]} for x in d.logprobs]}
            return {"tokens": [x["token"] for x in d.logprobs], "token_logprobs": [x["logprob"] for x in d.logprobs],
                    "top_logprobs": [dict(x["top"]) for x in d.logprobs], "text_offset": []}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            obj_chunk = "chat.completion.chunk" if kind == "chat" else "text_completion"

            def chunk(choices: list, **extra) -> str:
                body = {"id": rid, "object": obj_chunk, "created": created, "model": model, "choices": choices}
                body.update(extra)
                return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

            async def sse():
                status, reasons, text = 200, {}, {}
                events = backend.events(job).__aiter__()
                pending = None
                state.in_flight += 1
                try:
                    if kind == "chat":
                        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None} for i in range(n_choices)])
                    while True:
                        if pending is None:
                            pending = asyncio.ensure_future(events.__anext__())
                        done, _ = await asyncio.wait({pending}, timeout=cfg.keepalive_s)
                        if not done:
                            yield ": ping\n\n"
                            continue
                        try:
                            d = pending.result()
                        except StopAsyncIteration:
                            break
                        finally:
                            if pending.done():
                                pending = None
                        observe(d)
                        if not d.text and d.finish_reason is None and not d.tool_calls:
                            continue
                        text[d.index] = text.get(d.index, "") + d.text
                        if kind == "chat":
                            delta: dict[str, Any] = {"content": d.text} if d.text else {}
                            if d.tool_calls:
                                delta["tool_calls"] = [dict(c, index=k) for k, c in enumerate(d.tool_calls)]
                            choice = {"index": d.index, "delta": delta, "logprobs": logprobs_payload(d),
                                      "finish_reason": d.finish_reason}
                        else:
                            choice = {"index": d.index, "text": d.text, "logprobs": logprobs_payload(d),
                                      "finish_reason": d.finish_reason}
                        if d.finish_reason:
                            reasons[d.index] = d.logged_reason
                            metrics.finish_reasons.inc(reason=d.logged_reason)
                        yield chunk([choice])
                    if include_usage:
                        yield chunk([], usage=usage())
                    yield "data: [DONE]\n\n"
                    metrics.e2e.observe(time.monotonic() - t0)
                except APIError as e:
                    status = e.status
                    metrics.errors.inc(kind=e.type)
                    yield f"data: {json.dumps(_error_body(e.message, e.type, e.param))}\n\n"
                except (asyncio.CancelledError, GeneratorExit):
                    status = 499  # the client went away
                    metrics.errors.inc(kind="client_disconnected")
                    raise
                finally:
                    if pending is not None:
                        pending.cancel()
                    job.cancel()
                    state.in_flight -= 1
                    args = (rid, request.url.path, key, status, job, t0, timing["ttft"], reasons, req, text)
                    if status == 499:  # log once the engine has stopped, with the tokens it really made
                        asyncio.get_running_loop().run_in_executor(None, _log_when_done, job, args)
                    else:
                        log_request(*args)

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"X-Request-Id": rid, "Cache-Control": "no-cache"})

        texts = [""] * n_choices
        reasons: list[Optional[str]] = [None] * n_choices
        lps: list[list] = [[] for _ in range(n_choices)]
        calls: list[Optional[list]] = [None] * n_choices
        logged: list[Optional[str]] = [None] * n_choices

        async def collect():
            async for d in backend.events(job):
                observe(d)
                texts[d.index] += d.text
                lps[d.index] += d.logprobs
                if d.tool_calls:
                    calls[d.index] = d.tool_calls
                if d.finish_reason:
                    reasons[d.index] = d.finish_reason
                    logged[d.index] = d.logged_reason
                    metrics.finish_reasons.inc(reason=d.logged_reason)

        state.in_flight += 1
        task = asyncio.ensure_future(collect())
        status = 200
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.2)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    job.cancel()
                    status = 499
                    metrics.errors.inc(kind="client_disconnected")
                    return PlainTextResponse("", status_code=499)
            try:
                task.result()
            except APIError as e:
                status = e.status
                raise
            metrics.e2e.observe(time.monotonic() - t0)
        finally:
            task.cancel()
            job.cancel()
            state.in_flight -= 1
            log_request(rid, request.url.path, key, status, job, t0, timing["ttft"],
                        {i: r for i, r in enumerate(logged)}, req, texts)
        choices = []
        for i in range(n_choices):
            lp = logprobs_payload(Delta(i, logprobs=lps[i]))
            if kind == "chat":
                msg: dict[str, Any] = {"role": "assistant", "content": None if calls[i] else texts[i]}
                if calls[i]:
                    msg["tool_calls"] = calls[i]
                choices.append({"index": i, "message": msg, "logprobs": lp, "finish_reason": reasons[i]})
            else:
                choices.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": reasons[i]})
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
                             "usage": usage()}, headers={"X-Request-Id": rid})

    # Each SSE event: "data: <a JSON chunk or error>" or "data: [DONE]".
    sse_content = {"text/event-stream": {"schema": {"type": "object", "properties": {"data": {"type": "string"}}}}}

    @app.post("/v1/chat/completions", responses={200: {"model": ChatCompletion, "content": sse_content}, **_ERRORS})
    async def chat_completions(req: ChatRequest, request: Request):
        return await run("chat", req, request)

    @app.post("/v1/completions", responses={200: {"model": Completion, "content": sse_content}, **_ERRORS})
    async def completions(req: CompletionRequest, request: Request):
        return await run("completion", req, request)

    @app.post("/v1/embeddings", responses={200: {"model": EmbeddingList}, **_ERRORS})
    async def embeddings(req: EmbeddingRequest, request: Request):
        admit(request)
        if not cfg.embeddings or not hasattr(backend, "embed"):
            raise APIError(400, "this server has no embedding model (start it with --embeddings)", "model")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts or len(texts) > 256 or any(not t for t in texts):
            raise APIError(400, "input: expected 1 to 256 non-empty strings", "input")
        vectors, n_tokens, name = await asyncio.to_thread(backend.embed, texts)
        if req.dimensions is not None and req.dimensions != len(vectors[0]):
            raise APIError(400, f"dimensions: this encoder gives {len(vectors[0])} dimensions, got {req.dimensions}",
                           "dimensions")
        return {"object": "list", "model": name, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]}

    @app.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
    async def models(request: Request):
        if keys:
            admit(request)
        return {"object": "list", "data": [{"id": backend.model_name, "object": "model", "created": 0,
                                            "owned_by": "lmstack"}]}

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        ok, detail = backend.health(cfg.watchdog_s)
        return JSONResponse({"status": "ok" if ok else "unhealthy", "detail": detail}, status_code=200 if ok else 503)

    @app.get("/ready", response_model=Health, responses={503: {"model": Health}})
    async def ready():
        ok = state.ready and not state.draining
        return JSONResponse({"status": "ready" if ok else ("draining" if state.draining else "loading"),
                             "detail": backend.stats() | {"in_flight": state.in_flight}},
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        from lmstack.serve.page import CHAT_PAGE

        return HTMLResponse(CHAT_PAGE)

    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes, metrics=metrics)
    return app
