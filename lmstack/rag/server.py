"""The RAG routes that ``lmstack serve --rag STORE`` adds to the OpenAI-compatible server.

``POST /v1/rag/search``: ``{"query", "k"?, "mode"?, "rerank"?, "rewrite"?, "where"?}`` ->
``{"object": "list", "data": [{"chunk_id", "score", "scores", "text", "source", "title",
"section", "page", "doc_key", "start", "end"}]}``.

``POST /v1/rag/chat/completions``: an OpenAI chat request (any of ``/v1/chat/completions``'
fields) plus an optional ``"rag": {"k", "mode", "rerank", "rewrite", "where"}``. The last user
message is the question: its chunks are retrieved, numbered into the prompt (the answer step's
system prompt and format), and the request is answered by the server's own completion path
(same admission, streaming, metrics and logs). The response is a normal chat completion with
one more field, ``"rag"``: ``{"sources": [{"n", "chunk_id", "source", "start", "end", "text"}],
"citations": [...checked...], "abstained"}``. When streaming, the sources come first, in a
chunk with empty ``choices`` and the ``rag`` field (OpenAI clients ignore the extra field);
citation checks need the whole text, so they are only in non-streamed responses. When
retrieval support is below the store's abstention threshold, the answer is "I don't know."
and no tokens are generated.

The handlers stay small: retrieval runs in a worker thread under one lock (the store's
connection is not shared between threads at once), generation in the engine.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any, Literal, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lmstack.serve.completions import complete
from lmstack.serve.context import context
from lmstack.serve.events import APIError
from lmstack.serve.protocol import ChatMessage, ChatRequest

router = APIRouter()


class RAGOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(5, ge=1, le=100)
    mode: Optional[Literal["dense", "lexical", "hybrid"]] = None
    rerank: Optional[str] = Field(None, max_length=512)
    rewrite: Optional[Literal["none", "multi-query", "hyde", "step-back"]] = None
    where: Optional[dict[str, Any]] = None


class SearchRequest(RAGOptions):
    query: str = Field(min_length=1, max_length=8000)


class RAGChatRequest(ChatRequest):
    rag: Optional[RAGOptions] = None


def mount(app, rag, answer_cfg=None) -> None:
    """Add the RAG routes to ``app`` over ``rag`` (a ``lmstack.rag.pipeline.RAG``)."""
    app.state.rag = rag
    app.state.rag_lock = threading.Lock()
    app.state.rag_answer_cfg = answer_cfg
    app.include_router(router)


def _overrides(opts: Optional[RAGOptions]) -> dict[str, Any]:
    if opts is None:
        return {}
    return {k: v for k, v in opts.model_dump(include=set(RAGOptions.model_fields)).items() if v is not None}


async def _retrieve(request: Request, query: str, opts: Optional[RAGOptions]):
    from lmstack.errors import LMStackError

    state = request.app.state

    def run():
        with state.rag_lock:
            return state.rag.retrieve(query, **_overrides(opts))
    try:
        return await asyncio.to_thread(run)
    except LMStackError as e:  # a bad filter, an unknown reranker: the client's mistake
        raise APIError(400, str(e), "rag") from None


def _hit(h) -> dict[str, Any]:
    c = h.chunk
    return {"chunk_id": c.id, "score": h.score, "scores": h.scores, "text": c.text,
            "source": c.meta.get("path") or c.meta.get("source"), "title": c.meta.get("title"),
            "section": c.meta.get("section"), "page": c.meta.get("page"), "doc_key": c.doc_key,
            "start": c.start, "end": c.end}


@router.post("/v1/rag/search")
async def rag_search(req: SearchRequest, request: Request):
    context(request).admission.check(request)
    hits = await _retrieve(request, req.query, req)
    return {"object": "list", "data": [_hit(h) for h in hits]}


@router.post("/v1/rag/chat/completions")
async def rag_chat(req: RAGChatRequest, request: Request):
    from lmstack.rag.answer import (ABSTAIN_TEXT, abstain_threshold, build_context, check_citations, messages,
                                    retrieval_support)

    ctx = context(request)
    ctx.admission.check(request)
    users = [i for i, m in enumerate(req.messages) if m.role == "user" and (m.text() or "").strip()]
    if not users:
        raise APIError(400, "messages: a RAG chat needs a user message with text (the question)", "messages")
    question = req.messages[users[-1]].text()
    hits = await _retrieve(request, question, req.rag)
    cfg = request.app.state.rag.answer_config(request.app.state.rag_answer_cfg)
    signal, support = retrieval_support(question, hits, cfg.abstain_signal)
    threshold = abstain_threshold(cfg, signal)
    if cfg.abstain and support < threshold:
        return _abstain(req, ctx, ABSTAIN_TEXT, signal, support, threshold)
    tok = request.app.state.rag.embedder.tokenizer
    count = lambda t: len(tok.encode(t, add_special_tokens=False).ids)  # noqa: E731
    sources = build_context(hits, cfg.budget_tokens, count)
    turns = messages(question, sources, cfg.few_shot)
    history = [m for m in req.messages[:users[-1]] if m.role != "system"]
    new_msgs = [ChatMessage(**m) for m in turns[:-1]] + history + [ChatMessage(**turns[-1])]
    fwd = ChatRequest(**req.model_dump(exclude={"rag", "messages"}, exclude_unset=True),
                      messages=[m.model_dump(exclude_none=True) for m in new_msgs])
    listed = [{"n": n, "chunk_id": h.chunk.id, "source": h.chunk.meta.get("path") or h.chunk.meta.get("source"),
               "start": sources.spans[n][0], "end": sources.spans[n][1], "text": sources.passages[n]}
              for n, h in sources.sources.items()]
    response = await complete("chat", fwd, request)
    if isinstance(response, StreamingResponse):
        return StreamingResponse(_with_sources(response.body_iterator, listed),
                                 media_type="text/event-stream", headers=dict(response.headers))
    if not isinstance(response, JSONResponse) or response.status_code != 200:
        return response
    body = json.loads(response.body)
    text = body["choices"][0]["message"].get("content") or ""
    cites, uncited = check_citations(text, sources, cfg.checker, cfg.support_threshold, cfg.attribute)
    body["rag"] = {"sources": listed, "citations": [c.to_json() for c in cites], "uncited": uncited,
                   "abstained": False, "support": support, "signal": signal}
    return JSONResponse(body, headers={"X-Request-Id": response.headers.get("X-Request-Id", "")})


async def _with_sources(body, listed):
    yield f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [], 'rag': {'sources': listed}})}\n\n"
    async for part in body:
        yield part


def _abstain(req, ctx, text: str, signal: str, support: float, threshold: float):
    rid = "chatcmpl-" + uuid.uuid4().hex[:24]
    base = {"id": rid, "created": int(time.time()), "model": ctx.backend.model_name}
    rag = {"sources": [], "citations": [], "abstained": True, "signal": signal, "support": support,
           "reason": f"weak retrieval support: {signal} {support:.3f} < {threshold:.3f}"}
    if req.stream:
        def events():
            yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [], 'rag': rag})}\n\n"
            yield "data: " + json.dumps({**base, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return {**base, "object": "chat.completion", "rag": rag,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": None}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
