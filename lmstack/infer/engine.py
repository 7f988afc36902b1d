"""The serving engine: continuous batching over one slot-based KV cache, in a worker thread.

    engine = Engine(llm.model, llm.tokenizer, EngineConfig(max_slots=16)).start()
    handle = engine.submit(EngineRequest(prompt_ids, SamplingParams(max_new_tokens=64)))
    async for out in handle:          # or ``for out in handle`` outside an event loop
        print(out.text, end="")

Design (iteration-level scheduling, as in Orca, Yu et al. OSDI 2022):

* One ``KVCache`` with ``max_slots`` rows; a running sequence owns one row (its *slot*)
  from admission until it finishes or is cancelled, then ``lengths[slot] = 0`` frees it.
* Every step runs one forward over the rows ``0..highest busy slot``: decoding rows feed
  their last token, prefilling rows feed the next chunk of their prompt (chunked prefill,
  at most ``prefill_chunk`` per row and ``token_budget`` per step, decode rows first), idle
  rows feed nothing and do not advance. New requests join at the next step, finished ones
  leave at once.
* Cancellation and deadlines are checked before every step, so a cancelled request gets
  at most the token of the step that was already running.
* Each request has its own ``SamplingParams`` (temperature, top-p, seed, stop strings,
  max tokens), logprobs, and optionally a grammar (``engine_grammar``) that masks the
  logits so the output follows a JSON schema.

The engine knows nothing about HTTP. Deliberately left out: paged blocks and prefix
sharing (a slot reserves ``max_seq_len`` positions), preemption, speculative decoding, beam
search (``generate.beam_search``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lmstack.errors import LMStackError
from lmstack.infer.engine_config import EngineConfig
from lmstack.infer.generate import StopMatcher, stop_ids
from lmstack.infer.sampling import SamplingParams, draw, make_generators, process_logits
from lmstack.model.kv_cache import KVCache


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    top_logprobs: int = 0  # how many alternatives per token (needs params.logprobs)
    grammar: Optional[Any] = None  # a compiled grammar from engine_grammar.GrammarCompiler
    deadline: Optional[float] = None  # time.monotonic() after which the request ends ("deadline")
    request_id: str = ""


@dataclass
class StepOutput:
    token_id: Optional[int]  # None on a final event that carries no token (cancelled, deadline)
    text: str  # text delta ("" while held back by the detokeniser or a stop string)
    logprob: Optional[float] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None
    finish_reason: Optional[str] = None  # stop | length | cancelled | deadline | error


class QueueFull(Exception):
    """The waiting queue is at capacity; ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, waiting: int, retry_after: float):
        super().__init__(f"the engine queue is full ({waiting} requests waiting)")
        self.retry_after = retry_after


class RequestHandle:
    """One request's output stream, filled by the engine thread."""

    _ids = itertools.count()

    def __init__(self, request: EngineRequest, loop: Optional[asyncio.AbstractEventLoop]):
        self.request = request
        self.id = request.request_id or f"req-{next(self._ids)}"
        self._loop = loop
        self._q: Any = asyncio.Queue() if loop is not None else queue.Queue()
        self.cancelled = False
        self.done = False
        self._ended = False  # the consumer has seen the end of the stream
        self.prompt_tokens = len(request.prompt_ids)
        self.completion_tokens = 0
        self.tokens_at_cancel: Optional[int] = None
        self.submitted = time.monotonic()
        self.first_token_at: Optional[float] = None
        self.finish_reason: Optional[str] = None
        self.finished = threading.Event()
        self._wake: Optional[threading.Event] = None

    def cancel(self) -> None:
        """Stop generating for this request; takes effect before the engine's next step."""
        if not self.cancelled and not self.done:
            self.tokens_at_cancel = self.completion_tokens
            self.cancelled = True
            if self._wake is not None:
                self._wake.set()

    def _put(self, item: Any) -> None:  # engine thread
        if self._loop is None:
            self._q.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is gone
            pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> StepOutput:
        if self._ended:
            raise StopAsyncIteration
        item = await self._q.get()
        return self._unwrap(item, StopAsyncIteration)

    def __iter__(self):
        return self

    def __next__(self) -> StepOutput:
        if self._ended:
            raise StopIteration
        return self._unwrap(self._q.get(), StopIteration)

    def _unwrap(self, item: Any, stop: type) -> StepOutput:
        if item is None:
            self._ended = True
            raise stop
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item


class _Seq:
    """A running sequence: its slot, prompt progress, decoder, stop matcher, sampler state."""

    def __init__(self, handle: RequestHandle, slot: int, engine: "Engine"):
        req = handle.request
        if 0.0 < req.params.temperature < 1e-4:  # 1/T overflows fp32 logits: this is greedy anyway
            req.params = dataclasses.replace(req.params, temperature=0.0)
        self.handle, self.req, self.slot = handle, req, slot
        self.prompt = list(req.prompt_ids)
        self.n_fed = 0  # prompt tokens already in the cache
        self.last: Optional[int] = None  # last sampled token, fed at the next step
        self.max_new = min(req.params.max_new_tokens, engine.max_seq_len - len(self.prompt))
        tok = engine.tokenizer
        self.decoder = tok.decoder() if tok is not None else None
        self.stops = StopMatcher(req.params.stop)
        self.stop_ids = stop_ids(tok, req.params)
        self.gen = make_generators([req.params.seed], engine.device)
        self.seen = [torch.tensor(self.prompt, dtype=torch.long, device=engine.device)]
        self.matcher = req.grammar.matcher() if req.grammar is not None else None


class Engine:
    """Continuous batching over ``model`` (a ``Transformer`` or anything with its forward)."""

    def __init__(self, model, tokenizer, config: Optional[EngineConfig] = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = cfg = config or EngineConfig()
        self.device = model.device
        self.max_seq_len = min(cfg.max_seq_len, model.config.block_size)
        self.n_valid = tokenizer.vocab_size if tokenizer is not None else model.config.vocab_size
        # Room past max_seq_len: a step writes T positions in every row it runs (right padding).
        self.cache: KVCache = model.new_cache(cfg.max_slots, self.max_seq_len + cfg.prefill_chunk)
        self._free = list(range(cfg.max_slots))
        self._running: dict[int, _Seq] = {}
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        # Progress, for a watchdog: when the loop last finished an iteration.
        self.last_progress = time.monotonic()
        self.steps = 0
        self.tokens_generated = 0
        self.prompt_tokens_processed = 0
        self.step_seconds = 0.0
        self.error: Optional[BaseException] = None
        self._masks = None  # engine_grammar.BatchMasks, made for the first constrained request

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmstack-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still running or waiting end with ``cancelled``."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            for h in self._waiting:
                self._finish_handle(h, "cancelled")
            self._waiting.clear()
        for s in list(self._running.values()):
            self._release(s, "cancelled")
        if self._masks is not None:
            self._masks.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        with self._lock:
            waiting = len(self._waiting)
        running = len(self._running)
        return {"running": running, "waiting": waiting, "busy_slots": self.config.max_slots - len(self._free),
                "max_slots": self.config.max_slots, "steps": self.steps, "tokens_generated": self.tokens_generated,
                "prompt_tokens": self.prompt_tokens_processed, "last_progress": self.last_progress,
                "alive": self.alive}

    def stalled_for(self) -> float:
        """Seconds the engine has had work without finishing a step (0 when idle)."""
        s = self.stats()
        if s["running"] == 0 and s["waiting"] == 0:
            return 0.0
        return max(0.0, time.monotonic() - self.last_progress)

    # -- requests ----------------------------------------------------------------------------
    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue a request; raises ``QueueFull`` past ``max_queue`` waiting requests."""
        n = len(request.prompt_ids)
        if n == 0:
            raise LMStackError("prompt_ids: got an empty prompt, expected at least one token")
        if n >= self.max_seq_len:
            raise LMStackError(f"prompt of {n} tokens leaves no room in the context of {self.max_seq_len} tokens")
        bad = [t for t in request.prompt_ids if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise LMStackError(f"prompt_ids: token id {bad[0]!r} is not an integer in [0, {self.model.config.vocab_size})")
        if request.top_logprobs < 0:
            raise LMStackError(f"top_logprobs: got {request.top_logprobs}, expected >= 0")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = RequestHandle(request, loop)
        handle._wake = self._wake
        with self._lock:
            if self._stop:
                raise LMStackError("the engine is shutting down")
            if len(self._waiting) - len(self._free) >= self.config.max_queue:  # beyond the free slots
                per_step = self.step_seconds / max(self.steps, 1)
                raise QueueFull(len(self._waiting), max(1.0, per_step * 32))
            self._waiting.append(handle)
        self._wake.set()
        return handle

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop:
                self.last_progress = time.monotonic()
                self._reap()
                self._admit()
                if not self._running:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                t0 = time.perf_counter()
                try:
                    self._step()
                except Exception as e:  # a bug or a device error: fail this batch, keep serving
                    self.error = e
                    for s in list(self._running.values()):
                        try:
                            self._release(s, "error", LMStackError(f"engine step failed: {type(e).__name__}: {e}"))
                        except Exception:
                            self._running.pop(s.slot, None)
                self.steps += 1
                self.step_seconds += time.perf_counter() - t0

    def _reap(self) -> None:
        now = time.monotonic()
        for s in list(self._running.values()):
            if s.handle.cancelled:
                self._release(s, "cancelled")
            elif s.req.deadline is not None and now > s.req.deadline:
                self._release(s, "deadline")
        with self._lock:
            keep = collections.deque()
            for h in self._waiting:
                if h.cancelled:
                    self._finish_handle(h, "cancelled")
                elif h.request.deadline is not None and now > h.request.deadline:
                    self._finish_handle(h, "deadline")
                else:
                    keep.append(h)
            self._waiting = keep

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting or not self._free:
                    return
                handle = self._waiting.popleft()
                self._free.sort()
                slot = self._free.pop(0)  # lowest first keeps the batch rows compact
            try:
                seq = _Seq(handle, slot, self)
            except Exception as e:  # e.g. a grammar that fails to instantiate: only this request fails
                self._free.append(slot)
                self._finish_handle(handle, "error", LMStackError(f"request rejected: {e}"))
                continue
            self.cache.lengths[slot] = 0
            self._running[slot] = seq

    def _step(self) -> None:
        cfg = self.config
        feeds: dict[int, list[int]] = {}
        budget = cfg.token_budget
        for slot, s in self._running.items():
            if s.last is not None:
                feeds[slot] = [s.last]
                budget -= 1
        for slot, s in sorted(self._running.items(), key=lambda kv: kv[1].handle.submitted):
            if s.last is None and budget > 0:
                take = min(cfg.prefill_chunk, len(s.prompt) - s.n_fed, budget)
                feeds[slot] = s.prompt[s.n_fed: s.n_fed + take]
                budget -= take
        if not feeds:
            return
        n_rows = max(feeds) + 1
        T = max(len(f) for f in feeds.values())
        idx = torch.zeros(n_rows, T, dtype=torch.long)
        lens = [0] * n_rows
        for slot, f in feeds.items():
            idx[slot, : len(f)] = torch.tensor(f, dtype=torch.long)
            lens[slot] = len(f)
        # Rows that draw a token this step and follow a grammar: their masks are computed in
        # llguidance's threads while the forward runs.
        constrained = [slot for slot, f in feeds.items() if self._running[slot].matcher is not None
                       and (self._running[slot].last is not None
                            or self._running[slot].n_fed + len(f) >= len(self._running[slot].prompt))]
        masks = None
        if constrained:
            if self._masks is None:
                from lmstack.infer.engine_grammar import BatchMasks

                self._masks = BatchMasks()
            masks = self._masks.start([self._running[slot].matcher for slot in constrained])
        view = self.cache.rows(n_rows)
        logits = self.model(idx.to(self.device), cache=view, input_lengths=lens, last_only=True)[:, -1]  # (n, V)
        self.cache.lengths[:n_rows] = view.lengths
        logits = logits.float()
        if self.n_valid < logits.shape[-1]:
            logits[:, self.n_valid:] = float("-inf")
        if masks is not None:
            logits[constrained] = masks.apply(logits[constrained])
        for slot, f in feeds.items():
            s = self._running[slot]
            if s.last is None:
                s.n_fed += len(f)
                self.prompt_tokens_processed += len(f)
                if s.n_fed < len(s.prompt):
                    continue  # mid-prefill: this row's logits are not a next-token prediction yet
            self._sample(s, logits[slot: slot + 1])

    def _sample(self, s: _Seq, row: torch.Tensor) -> None:
        params = s.req.params
        if s.max_new <= 0:
            self._release(s, "length")
            return
        logp = torch.log_softmax(row, -1)[0] if params.logprobs else None
        processed = process_logits(row, params, s.seen)
        if not bool(torch.isfinite(processed.max())):  # everything filtered (a top_p under fp32 rounding)
            tok = int(row.argmax(-1)[0])
        else:
            tok = int(draw(processed, params, s.gen)[0])
        lp = float(logp[tok]) if logp is not None else None
        tops = None
        if logp is not None and s.req.top_logprobs > 0:
            v, i = torch.topk(logp, min(s.req.top_logprobs, logp.shape[-1]))
            tops = list(zip(i.tolist(), v.tolist()))
        h = s.handle
        h.completion_tokens += 1
        self.tokens_generated += 1
        if h.first_token_at is None:
            h.first_token_at = time.monotonic()
        if tok in s.stop_ids:
            tail, _ = s.stops.feed(s.decoder.flush() if s.decoder else "")
            self._release(s, "stop", StepOutput(tok, tail + s.stops.finish(), lp, tops, "stop"))
            return
        if params.repetition_penalty != 1.0:
            s.seen[0] = torch.cat([s.seen[0], torch.tensor([tok], device=self.device)])
        grammar_done = False
        if s.matcher is not None:
            s.matcher.consume(tok)
            grammar_done = s.matcher.is_stopped()
        text, stopped = s.stops.feed(s.decoder.push(tok) if s.decoder else "")
        if stopped:
            self._release(s, "stop", StepOutput(tok, text, lp, tops, "stop"))
        elif grammar_done or h.completion_tokens >= s.max_new:
            tail, stopped = s.stops.feed(s.decoder.flush() if s.decoder else "")
            text += tail + ("" if stopped else s.stops.finish())
            reason = "stop" if stopped or grammar_done else "length"
            self._release(s, reason, StepOutput(tok, text, lp, tops, reason))
        else:
            s.last = tok
            h._put(StepOutput(tok, text, lp, tops, None))

    def _release(self, s: _Seq, reason: str, final: Any = None) -> None:
        """End a running sequence: free its slot, send its last event, close its stream."""
        self._running.pop(s.slot, None)
        self.cache.lengths[s.slot] = 0
        with self._lock:
            self._free.append(s.slot)
        self._finish_handle(s.handle, reason, final)

    def _finish_handle(self, h: RequestHandle, reason: str, final: Any = None) -> None:
        if h.done:
            return
        h.done = True
        h.finish_reason = reason
        h.finished.set()
        h._put(final if final is not None else StepOutput(None, "", finish_reason=reason))
        h._put(None)
