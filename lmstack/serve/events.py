"""What a backend gives the handlers: ``Event`` s of a ``Generation``, or an ``APIError``.

Every backend (the local engine in ``backend.py``, an OpenAI-compatible upstream in
``upstream.py``) has ``open(kind, req, request) -> Generation``. A generation yields
``Event`` s, one per choice per step (choices interleaved), and knows its token counts; the
handlers in ``completions.py`` turn the same events into SSE chunks or one JSON body, so
no handler asks which backend it talks to. Anything that should reach the client as an
OpenAI-style error is an ``APIError``, raised by ``open`` (an HTTP error status) or while
events are read (an error event in the stream).

Two waits every backend and handler shares: ``KeepAlive`` wraps an event stream so that a
handler can send ``: ping`` comments while a backend is silent, and ``unless_gone`` awaits
something (an upstream's answer, a whole non-streamed generation) while watching for the
client to disconnect.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncGenerator, Optional, Protocol


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error for the client: HTTP status, OpenAI error type, and the offending field.

    ``code`` is OpenAI's machine-readable ``error.code`` (``context_length_exceeded``, say);
    ``payload`` is a body to send as it is (an upstream's own 4xx answer); ``kind`` is the
    ``lmstack_errors_total`` label (the type unless given).
    """

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict] = None,
                 payload: Optional[dict] = None, kind: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}
        self.payload, self.kind = payload, kind or type

    def body(self) -> dict:
        return self.payload if self.payload is not None else error_body(self.message, self.type, self.param,
                                                                         self.code)


class ClientGone(Exception):
    """The client disconnected before the backend answered."""


@dataclass
class Event:
    """One step of one choice, from any backend."""

    index: int  # choice index
    text: str = ""
    n_tokens: int = 0  # tokens behind this step (0 when none, or when the backend cannot tell)
    finish_reason: Optional[str] = None  # what the client sees: stop | length | tool_calls
    logprobs: list[dict] = field(default_factory=list)  # {"token", "logprob", "top": [(token, logprob)]}
    tool_calls: Optional[list[dict]] = None  # OpenAI tool_calls
    deadline: bool = False  # ended by the per-request deadline (finish_reason says "length")
    extra: dict = field(default_factory=dict)  # message fields lmstack has no name for (an upstream's
    # ``reasoning_content``, say), relayed to the client as they came


    @property
    def logged_reason(self) -> Optional[str]:
        """The reason for the log and metrics: "deadline" is kept apart from "length"."""
        return "deadline" if self.deadline else self.finish_reason

    @property
    def visible(self) -> bool:
        """Whether the client is told of this step (text, tool calls or an end)."""
        return bool(self.text or self.tool_calls or self.extra) or self.finish_reason is not None


class Generation(Protocol):
    """One running request on a backend."""

    prompt_tokens: int
    completion_tokens: int
    tokens_after_cancel: Optional[int]  # generated after ``cancel`` (None: never cancelled, or unknown)

    def events(self) -> AsyncGenerator[Event, None]: ...

    def cancel(self) -> None:
        """Stop generating and free what the request holds; idempotent and never blocks."""

    def settle(self, timeout: float) -> None:
        """Block (in a worker thread) until the backend has really stopped, so counts are final."""


class KeepAlive:
    """``async for item in KeepAlive(events, s)``: the items of ``events``, and ``None``
    whenever ``s`` seconds pass without one. ``close()`` (synchronous, so it is safe in the
    ``finally`` of a cancelled stream) stops reading ``events``."""

    def __init__(self, events: AsyncGenerator, interval: float):
        self.events, self.interval = events, interval
        self.pending: Optional[asyncio.Future] = None

    def __aiter__(self) -> "KeepAlive":
        return self

    async def __anext__(self):
        if self.pending is None:
            self.pending = asyncio.ensure_future(self.events.__anext__())
        done, _ = await asyncio.wait({self.pending}, timeout=self.interval)
        if not done:
            return None
        task, self.pending = self.pending, None
        return task.result()  # StopAsyncIteration ends the loop

    def close(self) -> None:
        if self.pending is not None:
            self.pending.cancel()  # the events generator unwinds inside that task
            self.pending = None
        else:  # suspended at a yield (or finished): close it in a task of its own
            in_background(self.events.aclose())


_BACKGROUND: set[asyncio.Future] = set()


def in_background(aw) -> None:
    """Run ``aw`` in a task of its own, held until it is done: clean-up that must finish even
    when the request that started it is being cancelled."""
    task = asyncio.ensure_future(aw)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def unless_gone(request, aw, deadline: Optional[float] = None):
    """The result of ``aw``, polling the client every 0.2 s: ``ClientGone`` once it has
    disconnected, ``TimeoutError`` once ``deadline`` (``time.monotonic``) passed; ``aw`` is
    cancelled then."""
    task = asyncio.ensure_future(aw)
    try:
        while not task.done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError
            await asyncio.wait({task}, timeout=0.2 if left is None else min(0.2, left))
            if not task.done() and await request.is_disconnected() and not task.done():
                raise ClientGone
        return task.result()
    finally:
        task.cancel()
