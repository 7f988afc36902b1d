"""The request log: one ``RequestRecord`` a request, one JSON line each in ``request_log``.

A line reads ``{"time", "id", "endpoint", "key", "status", "prompt_tokens",
"completion_tokens", "latency_s", "ttft_s", "finish_reasons"}``, then
``"tokens_after_cancel"`` when the server cancelled a generation (a client left) and
``"request"`` and ``"output"`` only with ``log_prompts``. ``key`` is the API key's name,
never the key. Lines are appended under a lock, so concurrent requests never interleave.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RequestRecord:
    id: str
    endpoint: str
    key: str  # the API key's name ("anonymous" without keys)
    status: int  # HTTP status; 499 when the client disconnected
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: Optional[float] = None
    finish_reasons: dict[int, Optional[str]] = field(default_factory=dict)  # choice -> reason ("deadline" kept)
    tokens_after_cancel: Optional[int] = None
    request: Optional[dict] = None  # the request body, with log_prompts only
    output: Optional[dict[int, str]] = None  # choice -> text, with log_prompts only
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"time": round(self.time, 3), "id": self.id, "endpoint": self.endpoint,
                               "key": self.key, "status": self.status, "prompt_tokens": self.prompt_tokens,
                               "completion_tokens": self.completion_tokens, "latency_s": round(self.latency_s, 4),
                               "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
                               "finish_reasons": self.finish_reasons}
        if self.tokens_after_cancel is not None:
            rec["tokens_after_cancel"] = self.tokens_after_cancel
        if self.request is not None:
            rec["request"], rec["output"] = self.request, self.output
        return rec


class RequestLog:
    """Appends records to ``path`` (nothing when it is None)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self._lock = threading.Lock()

    def write(self, record: RequestRecord) -> None:
        if not self.path:
            return
        line = json.dumps(record.to_json(), ensure_ascii=False) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
