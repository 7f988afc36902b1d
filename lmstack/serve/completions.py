"""One path for ``/v1/completions`` and ``/v1/chat/completions``, whatever the backend.

``complete(kind, req, request)`` admits the request, opens a ``Generation`` on the backend
and either streams its ``Event`` s as SSE chunks (``: ping`` comments while it is idle,
``data: [DONE]`` at the end, an error event if it fails mid-way) or folds them into one
JSON body. Both read the same events, so the streamed deltas always concatenate to the
non-streamed text. Metrics are observed here as events arrive, and one ``RequestRecord``
is written when the request ends: for a client that disconnected, once the backend has
stopped, so that the record holds the tokens really generated.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from lmstack.serve.context import AppContext, context
from lmstack.serve.events import APIError, ClientGone, Event, Generation, KeepAlive, unless_gone
from lmstack.serve.record import RequestRecord

_OBJECT = {"chat": "chat.completion", "completion": "text_completion"}
_CHUNK_OBJECT = {"chat": "chat.completion.chunk", "completion": "text_completion"}
_ID_PREFIX = {"chat": "chatcmpl-", "completion": "cmpl-"}


@dataclass
class _Call:
    """One request on its way: who asked, for what, and what has come back so far."""

    ctx: AppContext
    kind: str  # "chat" | "completion"
    req: Any  # ChatRequest | CompletionRequest
    endpoint: str
    key: str  # the API key's name
    t0: float  # time.monotonic() when the request arrived
    rid: str
    created: int = field(default_factory=lambda: int(time.time()))
    status: int = 200
    ttft: Optional[float] = None
    last: dict[int, float] = field(default_factory=dict)  # choice -> time of its latest token
    texts: dict[int, str] = field(default_factory=dict)
    reasons: dict[int, Optional[str]] = field(default_factory=dict)  # choice -> logged finish reason

    def observe(self, ev: Event) -> None:
        m = self.ctx.metrics
        if ev.n_tokens:
            now = time.monotonic()
            if self.ttft is None:
                self.ttft = now - self.t0
                m.ttft.observe(self.ttft)
            if ev.index in self.last:
                m.itl.observe(now - self.last[ev.index])
            self.last[ev.index] = now
        self.texts[ev.index] = self.texts.get(ev.index, "") + ev.text
        if ev.finish_reason:
            self.reasons[ev.index] = ev.logged_reason
            m.finish_reasons.labels(reason=str(ev.logged_reason)).inc()

    def envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.ctx.backend.model_name,
                "choices": choices, **extra}

    def chunk(self, choices: list, **extra) -> str:
        return f"data: {json.dumps(self.envelope(_CHUNK_OBJECT[self.kind], choices, **extra), ensure_ascii=False)}\n\n"

    def close(self, gen: Optional[Generation]) -> None:
        """Stop the generation and write the record; synchronous, for the ``finally`` of a cancelled stream."""
        if gen is not None:
            gen.cancel()
        if gen is not None and self.status == 499:  # record once the backend has stopped, with its real tokens
            asyncio.get_running_loop().run_in_executor(None, self._settle_then_record, gen)
        else:
            self.record(gen)

    def _settle_then_record(self, gen: Generation) -> None:
        gen.settle(10.0)
        self.record(gen)

    def record(self, gen: Optional[Generation]) -> None:
        prompt, completion = (gen.prompt_tokens, gen.completion_tokens) if gen is not None else (0, 0)
        self.ctx.metrics.prompt_tokens.inc(prompt)
        self.ctx.metrics.generation_tokens.inc(completion)
        full = self.ctx.cfg.log_prompts
        self.ctx.log.write(RequestRecord(
            id=self.rid, endpoint=self.endpoint, key=self.key, status=self.status, prompt_tokens=prompt,
            completion_tokens=completion, latency_s=time.monotonic() - self.t0, ttft_s=self.ttft,
            finish_reasons=dict(self.reasons), tokens_after_cancel=gen.tokens_after_cancel if gen is not None else None,
            request=self.req.model_dump(mode="json", exclude_none=True) if full else None,
            output=dict(self.texts) if full else None))


async def complete(kind: str, req, request: Request):
    """The response to one validated completion or chat request."""
    ctx, t0 = context(request), time.monotonic()
    key = ctx.admission.check(request)
    call = _Call(ctx, kind, req, request.url.path, key, t0, _ID_PREFIX[kind] + uuid.uuid4().hex[:24])
    try:
        gen = await ctx.backend.open(kind, req, request)
    except APIError as e:
        call.status = e.status
        call.close(None)
        raise
    except ClientGone:
        response = _left(call)
        call.close(None)
        return response
    if req.stream:
        return StreamingResponse(_stream(call, gen), media_type="text/event-stream",
                                 headers={"X-Request-Id": call.rid, "Cache-Control": "no-cache"})
    return await _whole(call, gen, request)


def _left(call: _Call) -> PlainTextResponse:
    """The client disconnected: counted here, recorded by the caller; the response goes nowhere."""
    call.status = 499
    call.ctx.metrics.error("client_disconnected")
    return PlainTextResponse("", status_code=499)


async def _stream(call: _Call, gen: Generation):
    ctx, req = call.ctx, call.req
    events = KeepAlive(gen.events(), ctx.cfg.keepalive_s)
    ctx.state.in_flight += 1
    try:
        if call.kind == "chat":
            yield call.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None} for i in range(req.n)])
        async for ev in events:
            if ev is None:
                yield ": ping\n\n"
                continue
            call.observe(ev)
            if ev.visible:
                yield call.chunk([_delta_choice(call.kind, ev)])
        if req.stream_options and req.stream_options.include_usage:
            yield call.chunk([], usage=_usage(gen))
        yield "data: [DONE]\n\n"
        ctx.metrics.e2e.observe(time.monotonic() - call.t0)
    except APIError as e:
        call.status = e.status
        ctx.metrics.error(e.kind)
        yield f"data: {json.dumps(e.body())}\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        call.status = 499  # the client went away
        ctx.metrics.error("client_disconnected")
        raise
    finally:
        events.close()
        ctx.state.in_flight -= 1
        call.close(gen)


@dataclass
class _Folded:
    """What a non-streamed choice has gathered besides its text."""

    logprobs: list[dict] = field(default_factory=list)
    tool_calls: Optional[list[dict]] = None
    finish_reason: Optional[str] = None
    extra: dict = field(default_factory=dict)  # streamed pieces of a text field are joined, others replaced


async def _fold(call: _Call, gen: Generation, into: dict[int, _Folded]) -> None:
    async for ev in gen.events():
        call.observe(ev)
        c = into.setdefault(ev.index, _Folded())
        c.logprobs += ev.logprobs
        c.tool_calls = ev.tool_calls or c.tool_calls
        c.finish_reason = ev.finish_reason or c.finish_reason
        for k, v in ev.extra.items():
            c.extra[k] = c.extra[k] + v if isinstance(v, str) and isinstance(c.extra.get(k), str) else v


async def _whole(call: _Call, gen: Generation, request: Request):
    ctx, choices = call.ctx, {}
    ctx.state.in_flight += 1
    try:
        await unless_gone(request, _fold(call, gen, choices))
        ctx.metrics.e2e.observe(time.monotonic() - call.t0)
    except APIError as e:
        call.status = e.status
        raise
    except ClientGone:
        return _left(call)
    finally:
        ctx.state.in_flight -= 1
        call.close(gen)
    body = call.envelope(_OBJECT[call.kind], [_final_choice(call.kind, i, call.texts.get(i, ""), choices[i])
                                              for i in sorted(choices)], usage=_usage(gen))
    return JSONResponse(body, headers={"X-Request-Id": call.rid})


def _usage(gen: Generation) -> dict:
    p, c = gen.prompt_tokens, gen.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _logprobs(kind: str, lps: list[dict]) -> Optional[dict]:
    if not lps:
        return None
    if kind == "chat":
        return {"content": [{"token": x["token"], "logprob": x["logprob"], "bytes": list(x["token"].encode("utf-8")),
                             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                                              for t, lp in x["top"]]} for x in lps]}
    return {"tokens": [x["token"] for x in lps], "token_logprobs": [x["logprob"] for x in lps],
            "top_logprobs": [dict(x["top"]) for x in lps], "text_offset": []}


def _delta_choice(kind: str, ev: Event) -> dict:
    lp = _logprobs(kind, ev.logprobs)
    if kind == "completion":
        return {"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
    delta: dict[str, Any] = {"content": ev.text} if ev.text else {}
    if ev.tool_calls:
        delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(ev.tool_calls)]
    delta.update(ev.extra)
    return {"index": ev.index, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}


def _final_choice(kind: str, index: int, text: str, c: _Folded) -> dict:
    lp = _logprobs(kind, c.logprobs)
    if kind == "completion":
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}
    msg: dict[str, Any] = {"role": "assistant", "content": None if c.tool_calls else text}
    if c.tool_calls:
        msg["tool_calls"] = c.tool_calls
    msg.update(c.extra)
    return {"index": index, "message": msg, "logprobs": lp, "finish_reason": c.finish_reason}
