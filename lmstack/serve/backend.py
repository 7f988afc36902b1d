"""The local backend: the in-process engine over an lmstack model.

``open(kind, req, request)`` turns a validated request into a started ``Job``: it checks what
only the model can check (prompt length against the context, token ids against the
vocabulary, whether a JSON schema can be enforced, tool names) and raises ``APIError`` (a
400 with the field named and an error ``code``), then submits one engine request per
choice (``QueueFull`` becomes a 429). ``Job.events()`` yields ``Event`` s, one per choice
per step, which the handlers format (``completions.py``), exactly as they do an upstream's.

Tool calls: with ``tools`` and ``tool_choice`` other than ``none``, the output is
constrained to ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (required or a
named function) or to that or plain text (``auto``), and the call is returned as OpenAI
``tool_calls`` whose arguments follow the tool's JSON schema.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Callable, Optional

from lmstack.errors import LMStackError, UnsupportedError
from lmstack.infer.engine import Engine, EngineRequest, QueueFull, RequestHandle
from lmstack.infer.sampling import SamplingParams
from lmstack.serve.events import APIError, Event
from lmstack.serve.protocol import ChatRequest, CompletionRequest

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
# Error codes of the 400s only the model can decide (``protocol.py`` states every other limit).
CONTEXT_EXCEEDED = "context_length_exceeded"  # OpenAI's code for the same error
INVALID_SCHEMA = "invalid_json_schema"


@dataclass
class Job:
    """One request's engine sequences (one per choice): the local backend's ``Generation``."""

    requests: list[EngineRequest]
    prompt_tokens: int
    tool_mode: Optional[str] = None  # None | "auto" | "required"
    token_str: Callable[[int], str] = str  # a token id as text, for logprobs
    handles: list[RequestHandle] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return sum(h.completion_tokens for h in self.handles)

    @property
    def tokens_after_cancel(self) -> Optional[int]:
        """Tokens generated after the server cancelled this job (None if it never did)."""
        late = [h.completion_tokens - h.tokens_at_cancel for h in self.handles if h.tokens_at_cancel is not None]
        return sum(late) if late else None

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    def settle(self, timeout: float) -> None:
        for h in self.handles:
            h.finished.wait(timeout)

    async def events(self) -> AsyncGenerator[Event, None]:
        """Events of every choice as they are generated (choices interleaved)."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, h: RequestHandle) -> None:
            try:
                async for out in h:
                    await merged.put((i, out))
            except Exception as e:
                await merged.put((i, e))
            await merged.put((i, None))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        tools = [_ToolBuffer(self.tool_mode) if self.tool_mode else None for _ in self.handles]
        try:
            open_ = len(tasks)
            while open_:
                i, out = await merged.get()
                if out is None:
                    open_ -= 1
                    continue
                ev = self._event(i, out)
                yield tools[i].feed(ev) if tools[i] is not None else ev
        finally:
            self.cancel()
            for t in tasks:
                t.cancel()

    def _event(self, i: int, out: Any) -> Event:
        if isinstance(out, Exception):
            raise APIError(500, f"generation failed: {out}", type="server_error")
        reason = out.finish_reason
        if reason in ("cancelled", "error"):
            raise APIError(503, f"generation was {reason}", type="server_error")
        lps = []
        if out.logprob is not None and out.token_id is not None:
            lps.append({"token": self.token_str(out.token_id), "logprob": out.logprob,
                        "top": [(self.token_str(t), lp) for t, lp in (out.top_logprobs or [])]})
        # "deadline" is "length" to OpenAI clients; the log and metrics keep it apart
        return Event(i, out.text, 1 if out.token_id is not None else 0, "length" if reason == "deadline" else reason,
                     lps, deadline=reason == "deadline")


def _sampling(req, max_tokens: int, seed: Optional[int], want_logprobs: bool) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])  # non-empty, at most MAX_STOP
    return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=seed,
                          stop=stop, repetition_penalty=req.repetition_penalty, logprobs=want_logprobs,
                          ignore_eos=req.ignore_eos)


def _chat_messages(req: ChatRequest) -> list[dict]:
    """The messages as the chat template reads them (``developer`` is ``system``)."""
    messages = []
    for m in req.messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text() or ""}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": c.function.arguments}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        messages.append(d)
    return messages


class LocalBackend:
    """The in-process engine over an lmstack model."""

    can_embed = True

    def __init__(self, engine: Engine, tokenizer, model_name: str, request_timeout: Optional[float] = None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.request_timeout = request_timeout
        self._grammars = None
        self._encoder = None

    @property
    def context_length(self) -> int:
        return self.engine.max_seq_len

    def stats(self) -> dict:
        return self.engine.stats()

    def health(self, watchdog_s: float) -> tuple[bool, dict]:
        stalled = self.engine.stalled_for()
        ok = self.engine.alive and stalled <= watchdog_s
        return ok, {"engine_alive": self.engine.alive, "stalled_s": round(stalled, 3), "watchdog_s": watchdog_s}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine, waiting at most ``timeout`` s for a step in progress (a stuck one is left)."""
        self.engine.shutdown(timeout)

    def grammars(self):
        if self._grammars is None:
            from lmstack.infer.engine_grammar import GrammarCompiler

            self._grammars = GrammarCompiler(self.tokenizer)
        return self._grammars

    async def open(self, kind: str, req, request=None) -> Job:
        """A started job for ``req`` (``kind``: "chat" or "completion")."""
        job = self.prepare_chat(req) if kind == "chat" else self.prepare_completion(req)
        self.start(job)
        return job

    # -- preparing requests ------------------------------------------------------------------
    def _max_tokens(self, requested: Optional[int], n_prompt: int, field_name: str, prompt_field: str) -> int:
        """The output budget; past the context a 400 naming ``field_name`` (or ``prompt_field``,
        "prompt" or "messages", when the prompt alone fills it)."""
        ctx = self.context_length
        has = "the prompt has" if prompt_field == "prompt" else "the messages have"
        if requested is None:
            if n_prompt >= ctx:
                raise APIError(400, f"this model's context is {ctx} tokens and {has} {n_prompt} tokens, which "
                                    "leaves no room for output", prompt_field, code=CONTEXT_EXCEEDED)
            return ctx - n_prompt
        if n_prompt + requested > ctx:
            raise APIError(400, f"this model's context is {ctx} tokens, but {has} {n_prompt} tokens and "
                                f"{field_name} is {requested} ({n_prompt + requested} in total); shorten the "
                                f"{prompt_field} or lower {field_name}", field_name, code=CONTEXT_EXCEEDED)
        return requested

    def _deadline(self) -> Optional[float]:
        return time.monotonic() + self.request_timeout if self.request_timeout else None

    def prepare_completion(self, req: CompletionRequest) -> Job:
        p = req.prompt  # the protocol guarantees 1 to MAX_PROMPTS non-empty prompts
        prompts: list[Any] = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
        vocab = self.engine.model.config.vocab_size
        ids_list = []
        for i, x in enumerate(prompts):
            ids = self.tokenizer.encode(x, add_special_tokens=True) if isinstance(x, str) else list(x)
            if not ids:
                raise APIError(400, f"prompt[{i}]: empty prompt (0 tokens), expected at least one token", "prompt")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt[{i}]: token id {bad[0]} is not in [0, {vocab})", "prompt",
                               code="invalid_token_id")
            ids_list.append(ids)
        want = req.logprobs is not None
        reqs = []
        for ids in ids_list:
            max_new = self._max_tokens(req.max_tokens, len(ids), "max_tokens", "prompt")
            for j in range(req.n):
                seed = None if req.seed is None else req.seed + j
                reqs.append(EngineRequest(ids, _sampling(req, max_new, seed, want), top_logprobs=req.logprobs or 0,
                                          deadline=self._deadline()))
        return Job(reqs, sum(len(x) for x in ids_list), token_str=self._token_str)

    def prepare_chat(self, req: ChatRequest) -> Job:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat", "messages")
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        if tools and req.tool_choice != "none":
            grammar, tool_mode, tools = self._tool_grammar(req, tools)
        else:
            grammar, tool_mode = self._format_grammar(req.response_format), None
        try:
            ids = self.tokenizer.encode_chat(_chat_messages(req), add_generation_prompt=True, tools=tools or None)
        except LMStackError as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        except Exception as e:  # a template error on odd input (jinja raises its own types)
            raise APIError(400, f"messages: the chat template could not render them ({type(e).__name__}: {e})",
                           "messages") from None
        fname = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_new = self._max_tokens(requested, len(ids), fname, "messages")
        tops = req.top_logprobs or 0  # above 0 only with logprobs (protocol)
        reqs = []
        for j in range(req.n):
            seed = None if req.seed is None else req.seed + j
            reqs.append(EngineRequest(ids, _sampling(req, max_new, seed, req.logprobs), top_logprobs=tops,
                                      grammar=grammar, deadline=self._deadline()))
        return Job(reqs, len(ids), tool_mode, self._token_str)

    def _tool_grammar(self, req: ChatRequest, tools: list[dict]) -> tuple[Any, str, list[dict]]:
        """(grammar, tool mode, the tools offered) for a request with tools and a tool_choice other than none."""
        choice = req.tool_choice
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) != len(names):
            raise APIError(400, f"tools: function names must be unique, got {names}", "tools",
                           code="duplicate_tool_name")
        if choice is not None and not isinstance(choice, str):
            if choice.function.name not in names:
                raise APIError(400, f"tool_choice: function {choice.function.name!r} is not in tools {names}",
                               "tool_choice", code="unknown_tool")
            tools = [t for t in tools if t["function"]["name"] == choice.function.name]
        mode = "required" if choice is not None and choice != "auto" else "auto"
        try:
            grammar = self.grammars().tool_calls(tools, required=mode == "required", open_tag=TOOL_OPEN,
                                                 close_tag=TOOL_CLOSE)
        except UnsupportedError as e:
            raise APIError(400, str(e), "tools", code=INVALID_SCHEMA) from None
        return grammar, mode, tools

    def _format_grammar(self, rf) -> Any:
        """The grammar for ``response_format`` (None for plain text)."""
        if rf is None or rf.type == "text":
            return None
        try:
            if rf.type == "json_object":
                return self.grammars().json_object()
            return self.grammars().json_schema(rf.json_schema.schema_, "response_format.json_schema.schema")
        except UnsupportedError as e:
            raise APIError(400, str(e), "response_format.json_schema.schema", code=INVALID_SCHEMA) from None

    # -- running -----------------------------------------------------------------------------
    def start(self, job: Job) -> None:
        try:
            for r in job.requests:
                job.handles.append(self.engine.submit(r))
        except QueueFull as e:
            job.cancel()
            raise APIError(429, f"the server is at capacity ({e}); retry after {e.retry_after:.0f} s",
                           type="rate_limit_error", headers={"Retry-After": str(int(e.retry_after + 0.999))}) from None
        except LMStackError as e:
            job.cancel()
            raise APIError(400, str(e)) from None

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int, str]:
        """Sentence embeddings from the embedded encoder (loaded on first use)."""
        if self._encoder is None:
            from lmstack.model.encoder import Encoder

            try:
                self._encoder = Encoder.load()
            except LMStackError as e:
                raise APIError(400, f"embeddings are not available: {e}", "model") from None
        enc = self._encoder
        n_tokens = sum(len(enc.tokenizer.encode(t).ids) for t in texts)
        return enc.encode(texts).tolist(), n_tokens, "all-MiniLM-L6-v2"

    def _token_str(self, tok: int) -> str:
        return self.tokenizer.decode([tok]) if self.tokenizer is not None else str(tok)


class _ToolBuffer:
    """Holds back tool-call text and turns ``<tool_call>{...}</tool_call>`` into ``tool_calls``."""

    def __init__(self, mode: str):
        self.mode = mode
        self.buffer = ""
        self.is_call: Optional[bool] = True if mode == "required" else None

    def feed(self, d: Event) -> Event:
        if self.is_call is None and d.text:
            self.is_call = (self.buffer + d.text).startswith(TOOL_OPEN[0])
        if self.is_call is False:
            return d
        self.buffer += d.text
        d.text = ""
        if d.finish_reason is None:
            return d
        calls = parse_tool_calls(self.buffer)
        if calls is None:  # cut short by max_tokens: return what was generated as text
            d.text = self.buffer
        else:
            d.tool_calls, d.finish_reason = calls, "tool_calls"
        return d


def parse_tool_calls(text: str) -> Optional[list[dict]]:
    text = text.strip()
    if not (text.startswith(TOOL_OPEN) and text.endswith(TOOL_CLOSE)):
        return None
    try:
        call = json.loads(text[len(TOOL_OPEN): -len(TOOL_CLOSE)])
    except json.JSONDecodeError:
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]
