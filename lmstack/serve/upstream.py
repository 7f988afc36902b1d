"""A backend that fronts an OpenAI-compatible upstream (vLLM, another lmstack, a hosted API).

The server in front does everything it does for the local engine (validation with the same
request models, API keys, rate limits, body size, metrics, the JSONL request log); this
backend adds what only a proxy needs:

* a bounded number of requests in flight to the upstream (``max_concurrency``) and a bounded
  queue behind them (``max_queue``): past both, a fast 429 with ``Retry-After``;
* the per-request deadline: a request still queued or waiting for the upstream's answer
  when it passes is a 504; a stream that passes it mid-way ends with ``finish_reason:
  length`` (logged and counted as ``deadline``);
* streams relayed event by event (``: ping`` comments while the upstream is silent), the
  upstream asked for ``usage`` so the token counts are exact (the usage chunk is dropped
  again unless the client asked for it); a client that disconnects closes the upstream
  stream, which makes the upstream cancel the generation;
* error mapping: an upstream 4xx is passed through with its status and body; unreachable is
  a 502, an upstream 5xx a 502 (503 stays 503), no answer in time a 504, always with an
  OpenAI-style error body.

The HTTP client is httpx (``httpx2``, the one the official ``openai`` package ships with,
or ``httpx``), imported when the first request is relayed. Deliberately left out:
embeddings, retries and load balancing over several upstreams.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from lmstack.errors import ConfigError
from lmstack.serve.backend import APIError


def _httpx():
    try:
        import httpx2 as httpx
    except ImportError:
        try:
            import httpx
        except ImportError:
            raise APIError(500, "--upstream needs httpx: pip install httpx", type="server_error") from None
    return httpx


@dataclass
class _Counts:
    """What the request log reads from a job: token counts (from the upstream's usage)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    handles: list = field(default_factory=list)


class UpstreamBackend:
    """Relays validated requests to ``url`` (an OpenAI-compatible base URL, with or without ``/v1``)."""

    def __init__(self, url: str, api_key: Optional[str] = None, model: Optional[str] = None,
                 model_name: Optional[str] = None, request_timeout: Optional[float] = None,
                 max_concurrency: int = 16, max_queue: int = 64, connect_timeout: float = 5.0):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"upstream: got {url!r}, expected an http:// or https:// base URL")
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.api_key, self.upstream_model = api_key, model
        self.model_name = model_name or model or "upstream"
        self.request_timeout = request_timeout
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.connect_timeout = connect_timeout
        self.running = 0
        self._waiters: collections.deque = collections.deque()
        self.relayed = 0
        self.duration_sum = 0.0
        self.last_ok: Optional[float] = None
        self.last_failure: Optional[float] = None
        self._client: Any = None

    # -- what the server reads ---------------------------------------------------------------
    def stats(self) -> dict:
        return {"running": self.running, "waiting": len(self._waiters), "busy_slots": self.running,
                "max_slots": self.max_concurrency, "steps": self.relayed, "upstream": self.base}

    def health(self, watchdog_s: float) -> tuple[bool, dict]:
        """Unhealthy while the latest upstream attempt failed (unreachable or 5xx)."""
        failing = self.last_failure is not None and (self.last_ok is None or self.last_failure > self.last_ok)
        return not failing, {"upstream": self.base, "upstream_failing": failing}

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- admission ---------------------------------------------------------------------------
    def _retry_after(self) -> int:
        mean = self.duration_sum / self.relayed if self.relayed else 1.0
        return max(1, math.ceil(mean * (1 + len(self._waiters) / max(1, self.max_concurrency))))

    async def _acquire(self, deadline: Optional[float]) -> None:
        """Take an upstream slot, or queue for one (a freed slot is handed to the oldest waiter)."""
        if self.running < self.max_concurrency and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise APIError(429, f"the server is at capacity ({self.running} requests in flight upstream, "
                                f"{len(self._waiters)} waiting)", type="rate_limit_error",
                           headers={"Retry-After": str(self._retry_after())})
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise APIError(504, "the request deadline passed while it waited for a free upstream slot",
                           type="timeout_error") from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # the slot was handed over just now: pass it on
                self._free_slot()
            raise
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _free_slot(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1

    def _release(self, t0: float) -> None:
        self.relayed += 1
        self.duration_sum += time.monotonic() - t0
        self._free_slot()

    # -- talking to the upstream -------------------------------------------------------------
    def _body(self, req, stream_usage: bool) -> dict:
        body = req.model_dump(mode="json", exclude_unset=True, by_alias=True)
        if self.upstream_model:
            body["model"] = self.upstream_model
        elif "model" not in body:
            body["model"] = self.model_name
        if stream_usage:
            body["stream_options"] = dict(body.get("stream_options") or {}, include_usage=True)
        return body

    def _http(self):
        httpx = _httpx()
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=self.connect_timeout),
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return httpx, self._client

    async def _open(self, path: str, body: dict, deadline: Optional[float], request) -> Any:
        """Send the request and wait for the upstream's status line (client disconnects cancel it)."""
        httpx, client = self._http()
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        send = asyncio.ensure_future(client.send(client.build_request("POST", self.base + path, json=body,
                                                                      headers=headers), stream=True))
        try:
            while not send.done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise APIError(504, "the upstream did not answer before the request deadline",
                                   type="timeout_error")
                await asyncio.wait({send}, timeout=0.2 if left is None else min(0.2, left))
                if not send.done() and await request.is_disconnected():
                    raise asyncio.CancelledError
            resp = send.result()
        except httpx.TimeoutException:
            self.last_failure = time.monotonic()
            raise APIError(504, f"the upstream at {self.base} timed out", type="timeout_error") from None
        except httpx.TransportError as e:
            self.last_failure = time.monotonic()
            raise APIError(502, f"the upstream at {self.base} is unreachable ({type(e).__name__})",
                           type="upstream_error") from None
        finally:
            if not send.done():
                send.cancel()
        if resp.status_code < 400:
            self.last_ok = time.monotonic()
            return resp
        raw = await resp.aread()
        await resp.aclose()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        upstream_msg = (payload.get("error") or {}).get("message") if isinstance(payload, dict) and isinstance(
            payload.get("error"), dict) else raw[:200].decode("utf-8", "replace")
        if resp.status_code < 500:
            raise _Passthrough(resp.status_code, payload, upstream_msg, resp.headers.get("retry-after"))
        self.last_failure = time.monotonic()
        status = 503 if resp.status_code == 503 else 504 if resp.status_code == 504 else 502
        headers = {"Retry-After": resp.headers["retry-after"]} if "retry-after" in resp.headers else None
        raise APIError(status, f"the upstream answered {resp.status_code}: {upstream_msg}", type="upstream_error",
                       headers=headers)

    # -- one request -------------------------------------------------------------------------
    async def relay(self, kind: str, req, request, *, t0: float, key: str, metrics, state, log, keepalive_s: float):
        """The response for one validated request; ``log(status, counts, ttft, reasons, text)``."""
        from fastapi.responses import JSONResponse, StreamingResponse

        deadline = t0 + self.request_timeout if self.request_timeout else None
        path = "/chat/completions" if kind == "chat" else "/completions"
        client_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        counts = _Counts()
        await self._acquire(deadline)
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                self._release(t0)

        try:
            resp = await self._open(path, self._body(req, bool(req.stream)), deadline, request)
        except _Passthrough as e:
            release()
            metrics.errors.inc(kind="upstream_" + str(e.status))
            log(e.status, counts, None, {}, None)
            return JSONResponse(e.body(), status_code=e.status,
                                headers={"Retry-After": e.retry_after} if e.retry_after else None)
        except APIError as e:
            release()
            log(e.status, counts, None, {}, None)
            raise
        except BaseException:
            release()
            log(499, counts, None, {}, None)
            raise

        def account(usage: Optional[dict]) -> None:
            if isinstance(usage, dict):
                counts.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                counts.completion_tokens = int(usage.get("completion_tokens") or 0)

        if not req.stream:
            try:
                raw = await resp.aread()
                payload = json.loads(raw)
            except Exception as e:
                self.last_failure = time.monotonic()
                release()
                log(502, counts, None, {}, None)
                raise APIError(502, f"the upstream's answer could not be read ({type(e).__name__})",
                               type="upstream_error") from None
            finally:
                await resp.aclose()
            release()
            account(payload.get("usage") if isinstance(payload, dict) else None)
            choices = payload.get("choices") or [] if isinstance(payload, dict) else []
            reasons = {c.get("index", i): c.get("finish_reason") for i, c in enumerate(choices)}
            texts = {c.get("index", i): (c.get("message") or {}).get("content") if kind == "chat" else c.get("text")
                     for i, c in enumerate(choices)}
            metrics.prompt_tokens.inc(counts.prompt_tokens)
            metrics.generation_tokens.inc(counts.completion_tokens)
            metrics.e2e.observe(time.monotonic() - t0)
            for r in reasons.values():
                metrics.finish_reasons.inc(reason=str(r))
            log(200, counts, None, reasons, texts)
            return JSONResponse(payload, status_code=resp.status_code)

        async def sse():
            status, reasons, text, last = 200, {}, {}, {}
            ttft, n_chunks, meta = None, 0, {}
            lines = resp.aiter_lines().__aiter__()
            pending = None
            state.in_flight += 1
            httpx = _httpx()
            try:
                while True:
                    if pending is None:
                        pending = asyncio.ensure_future(lines.__anext__())
                    wait = keepalive_s if deadline is None else min(keepalive_s, deadline - time.monotonic())
                    done, _ = await asyncio.wait({pending}, timeout=max(0.0, wait))
                    if not done:
                        if deadline is not None and time.monotonic() >= deadline:
                            for i in text:  # every open choice ends like a local stream at its deadline
                                if i not in reasons:
                                    reasons[i] = "deadline"
                                    metrics.finish_reasons.inc(reason="deadline")
                                    yield _chunk(kind, i, "length", meta)
                            break
                        yield ": ping\n\n"
                        continue
                    try:
                        line = pending.result()
                    except StopAsyncIteration:
                        break
                    finally:
                        pending = None
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, "event:" lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        ev = json.loads(data)
                    except ValueError:
                        continue
                    if not isinstance(ev, dict):
                        continue
                    meta.update((k, ev[k]) for k in ("id", "created", "model") if k in ev)
                    if "error" in ev:
                        status = 502
                        yield f"data: {data}\n\n"
                        continue
                    if ev.get("usage"):
                        account(ev["usage"])
                        if not client_usage:
                            if not ev.get("choices"):
                                continue
                            ev.pop("usage")
                            data = json.dumps(ev, ensure_ascii=False)
                    for c in ev.get("choices") or []:
                        i = c.get("index", 0)
                        piece = (c.get("delta") or {}).get("content") if kind == "chat" else c.get("text")
                        text.setdefault(i, "")
                        if piece:
                            now = time.monotonic()
                            if ttft is None:
                                ttft = now - t0
                                metrics.ttft.observe(ttft)
                            if i in last:
                                metrics.itl.observe(now - last[i])
                            last[i] = now
                            text[i] += piece
                            n_chunks += 1
                        if c.get("finish_reason"):
                            reasons[i] = c["finish_reason"]
                            metrics.finish_reasons.inc(reason=str(c["finish_reason"]))
                    yield f"data: {data}\n\n"
                yield "data: [DONE]\n\n"
                metrics.e2e.observe(time.monotonic() - t0)
            except httpx.TransportError as e:  # the upstream broke off mid-stream
                status = 502
                self.last_failure = time.monotonic()
                metrics.errors.inc(kind="upstream_error")
                body = {"error": {"message": f"the upstream stream broke off ({type(e).__name__})",
                                  "type": "upstream_error", "param": None, "code": None}}
                yield f"data: {json.dumps(body)}\n\n"
            except (asyncio.CancelledError, GeneratorExit):
                status = 499
                metrics.errors.inc(kind="client_disconnected")
                raise
            finally:
                if pending is not None:
                    pending.cancel()
                try:
                    await resp.aclose()  # closing the connection makes the upstream cancel the generation
                except Exception:
                    pass
                release()
                state.in_flight -= 1
                if not counts.completion_tokens:
                    counts.completion_tokens = n_chunks
                metrics.prompt_tokens.inc(counts.prompt_tokens)
                metrics.generation_tokens.inc(counts.completion_tokens)
                log(status, counts, ttft, reasons, text)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _chunk(kind: str, index: int, reason: str, meta: dict) -> str:
    """A final chunk for choice ``index``, with the stream's own id, created and model."""
    choice: dict = {"index": index, "finish_reason": reason, "logprobs": None}
    if kind == "chat":
        choice["delta"] = {}
    else:
        choice["text"] = ""
    body = {"id": meta.get("id", ""), "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": meta.get("created", int(time.time())), "model": meta.get("model", ""), "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"


class _Passthrough(Exception):
    """An upstream 4xx: its status and OpenAI-style body go to the client unchanged."""

    def __init__(self, status: int, payload: Any, message: str, retry_after: Optional[str]):
        super().__init__(message)
        self.status, self.payload, self.message, self.retry_after = status, payload, message, retry_after

    def body(self) -> Any:
        if isinstance(self.payload, dict) and "error" in self.payload:
            return self.payload
        return {"error": {"message": f"the upstream answered {self.status}: {self.message}",
                          "type": "invalid_request_error", "param": None, "code": None}}
