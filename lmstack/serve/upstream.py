"""A backend that fronts an OpenAI-compatible upstream (vLLM, another lmstack, a hosted API).

The server in front does everything it does for the local engine (validation with the same
request models, API keys, rate limits, body size, metrics, the JSONL request log, the
response format: the upstream's answers become the same ``Event`` s a local ``Job``
yields); this backend adds what only a proxy needs:

* a bounded number of requests in flight to the upstream (``max_concurrency``) and a bounded
  queue behind them (``max_queue``): past both, a fast 429 with ``Retry-After``;
* the per-request deadline: a request still queued or waiting for the upstream's answer
  when it passes is a 504; a stream that passes it mid-way ends with ``finish_reason:
  length`` (logged and counted as ``deadline``);
* streams relayed event by event, the upstream asked for ``usage`` so the token counts are
  exact; a client that disconnects closes the upstream stream, which makes the upstream
  cancel the generation;
* error mapping: an upstream 4xx is passed through with its status and body; unreachable is
  a 502, an upstream 5xx a 502 (503 stays 503), no answer in time a 504, always with an
  OpenAI-style error body; an error event in the stream is passed on as the stream's error.

The HTTP client is httpx (the ``serve`` extra), imported when the first request is relayed.
Deliberately left out: embeddings, retries, load balancing over several upstreams, and
fields of the upstream's chunks that the OpenAI API does not define (they are not relayed).
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import time
from typing import Any, AsyncGenerator, Optional

from lmstack.errors import ConfigError
from lmstack.serve.events import APIError, Event, in_background, unless_gone


def _httpx():
    try:
        import httpx
    except ImportError:
        raise APIError(500, "--upstream needs httpx: pip install -e '.[serve]'", type="server_error") from None
    return httpx


class UpstreamBackend:
    """Relays validated requests to ``url`` (an OpenAI-compatible base URL, with or without ``/v1``)."""

    can_embed = False

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

    def close(self, timeout: float = 0.0) -> None:
        self._client = None  # its event loop has ended with the server

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

    def release(self, t0: float) -> None:
        self.relayed += 1
        self.duration_sum += time.monotonic() - t0
        self._free_slot()

    # -- talking to the upstream -------------------------------------------------------------
    async def open(self, kind: str, req, request) -> "_Relay":
        """Take a slot, send ``req`` and wait for the upstream's status line."""
        t0 = time.monotonic()
        deadline = t0 + self.request_timeout if self.request_timeout else None
        await self._acquire(deadline)
        try:
            resp = await self._send("/chat/completions" if kind == "chat" else "/completions",
                                    self._body(req, bool(req.stream)), deadline, request)
        except BaseException:
            self.release(t0)
            raise
        return _Relay(self, kind, resp, bool(req.stream), t0, deadline)

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

    async def _send(self, path: str, body: dict, deadline: Optional[float], request) -> Any:
        """The upstream's streamed response (client disconnects and the deadline cancel the wait)."""
        httpx, client = self._http()
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        send = client.send(client.build_request("POST", self.base + path, json=body, headers=headers), stream=True)
        try:
            resp = await unless_gone(request, send, deadline)
        except TimeoutError:
            raise APIError(504, "the upstream did not answer before the request deadline",
                           type="timeout_error") from None
        except httpx.TimeoutException:
            self.last_failure = time.monotonic()
            raise APIError(504, f"the upstream at {self.base} timed out", type="timeout_error") from None
        except httpx.TransportError as e:
            self.last_failure = time.monotonic()
            raise APIError(502, f"the upstream at {self.base} is unreachable ({type(e).__name__})",
                           type="upstream_error") from None
        if resp.status_code < 400:
            self.last_ok = time.monotonic()
            return resp
        raise await self._refusal(resp)

    async def _refusal(self, resp) -> APIError:
        """An upstream error answer: a 4xx passes through with its body, a 5xx becomes ours."""
        raw = await resp.aread()
        await resp.aclose()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        err = payload.get("error") if isinstance(payload, dict) else None
        message = err.get("message") if isinstance(err, dict) else raw[:200].decode("utf-8", "replace")
        status, retry_after = resp.status_code, resp.headers.get("retry-after")
        headers = {"Retry-After": retry_after} if retry_after else None
        if status < 500:
            passed = payload if isinstance(payload, dict) and "error" in payload else None
            return APIError(status, f"the upstream answered {status}: {message}", headers=headers, payload=passed,
                            kind=f"upstream_{status}")
        self.last_failure = time.monotonic()
        return APIError(status if status in (503, 504) else 502, f"the upstream answered {status}: {message}",
                        type="upstream_error", headers=headers)


class _Relay:
    """One request relayed to the upstream: the upstream backend's ``Generation``."""

    tokens_after_cancel = None  # the upstream does not say

    def __init__(self, backend: UpstreamBackend, kind: str, resp, stream: bool, t0: float,
                 deadline: Optional[float]):
        self.backend, self.kind, self.resp, self.stream = backend, kind, resp, stream
        self.t0, self.deadline = t0, deadline
        self.prompt_tokens = 0
        self.usage_tokens = 0  # completion tokens by the upstream's usage
        self.pieces = 0  # streamed text pieces: the count when the upstream gives no usage
        self.closed = False

    @property
    def completion_tokens(self) -> int:
        return self.usage_tokens or self.pieces

    def cancel(self) -> None:
        if not self.closed:
            self.closed = True
            self.backend.release(self.t0)
            in_background(_close_quietly(self.resp))  # a closed connection makes the upstream stop generating

    def settle(self, timeout: float) -> None:
        pass  # nothing to wait for: the upstream stops when its connection closes

    def events(self) -> AsyncGenerator[Event, None]:
        return self._streamed() if self.stream else self._answered()

    def _account(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.usage_tokens = int(usage.get("completion_tokens") or 0)

    async def _answered(self) -> AsyncGenerator[Event, None]:
        try:
            payload = json.loads(await self.resp.aread())
            self._account(payload.get("usage"))
            events = [_choice_event(self.kind, i, c, "message") for i, c in enumerate(payload.get("choices") or [])]
        except Exception as e:
            self.backend.last_failure = time.monotonic()
            raise APIError(502, f"the upstream's answer could not be read ({type(e).__name__})",
                           type="upstream_error") from None
        finally:
            self.cancel()
        for ev in events:
            yield ev

    async def _streamed(self) -> AsyncGenerator[Event, None]:
        httpx = _httpx()
        lines = self.resp.aiter_lines().__aiter__()
        unfinished: set[int] = set()
        try:
            while True:
                left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
                try:
                    chunk = _chunk_of(await asyncio.wait_for(lines.__anext__(), left))
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    break
                if chunk == "[DONE]":
                    return
                for ev in self._chunk_events(chunk) if chunk else ():
                    if ev.finish_reason:
                        unfinished.discard(ev.index)
                    else:
                        unfinished.add(ev.index)
                    yield ev
            for i in sorted(unfinished):  # the deadline passed: open choices end as a local stream's do
                yield Event(i, finish_reason="length", deadline=True)
        except httpx.TransportError as e:  # the upstream broke off mid-stream
            self.backend.last_failure = time.monotonic()
            raise APIError(502, f"the upstream stream broke off ({type(e).__name__})", type="upstream_error") from None
        finally:
            self.cancel()

    def _chunk_events(self, chunk: dict) -> list[Event]:
        if "error" in chunk:
            err = chunk["error"]
            raise APIError(502, str(err.get("message") if isinstance(err, dict) else err), type="upstream_error",
                           payload=chunk)
        try:
            self._account(chunk.get("usage"))
            events = [_choice_event(self.kind, i, c, "delta") for i, c in enumerate(chunk.get("choices") or [])]
        except (AttributeError, KeyError, TypeError, ValueError):
            raise APIError(502, "the upstream sent a chunk that is not an OpenAI chunk",
                           type="upstream_error") from None
        for ev in events:
            if ev.text:
                ev.n_tokens = 1  # a text piece: one token as far as the proxy can tell
                self.pieces += 1
        return events


def _chunk_of(line: str) -> Any:
    """The JSON object of an SSE ``data:`` line, "[DONE]", or None (blank, comment, ``event:``, not an object)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return data
    try:
        chunk = json.loads(data)
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None


def _choice_event(kind: str, i: int, c: dict, part: str) -> Event:
    """An OpenAI choice as an ``Event``; ``part`` is "delta" (streamed chat) or "message"."""
    body = (c.get(part) or {}) if kind == "chat" else c
    text = body.get("content") if kind == "chat" else body.get("text")
    extra = {k: v for k, v in body.items() if k not in _KNOWN and v is not None} if kind == "chat" else {}
    return Event(int(c.get("index", i)), text or "", finish_reason=c.get("finish_reason"),
                 logprobs=_logprobs_in(kind, c.get("logprobs")),
                 tool_calls=body.get("tool_calls") if kind == "chat" else None, extra=extra)


_KNOWN = ("role", "content", "tool_calls")  # message fields the events carry by name


def _logprobs_in(kind: str, lp: Any) -> list[dict]:
    """OpenAI logprobs as the events' ``{"token", "logprob", "top": [(token, logprob)]}``."""
    if not isinstance(lp, dict):
        return []
    if kind == "chat":
        return [{"token": x["token"], "logprob": x["logprob"],
                 "top": [(t["token"], t["logprob"]) for t in x.get("top_logprobs") or []]}
                for x in lp.get("content") or []]
    tops = lp.get("top_logprobs") or []
    return [{"token": t, "logprob": v, "top": list((tops[k] or {}).items()) if k < len(tops) else []}
            for k, (t, v) in enumerate(zip(lp.get("tokens") or [], lp.get("token_logprobs") or []))]


async def _close_quietly(resp) -> None:
    try:
        await resp.aclose()
    except Exception:
        pass
