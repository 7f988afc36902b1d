"""The routes: one module-level handler each, reading its app's ``AppContext``.

Request bodies are validated by their pydantic types (``protocol.py``) before a handler
runs; the generating routes share ``completions.complete``.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from lmstack.serve.completions import complete
from lmstack.serve.context import context
from lmstack.serve.events import APIError
from lmstack.serve.metrics import CONTENT_TYPE
from lmstack.serve.protocol import (ChatCompletion, ChatRequest, Completion, CompletionRequest, EmbeddingList,
                                    EmbeddingRequest, ErrorResponse, Health, ModelList)

router = APIRouter()

_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 502, 503, 504)}
# Each SSE event: "data: <a JSON chunk or error>" or "data: [DONE]".
_SSE = {"text/event-stream": {"schema": {"type": "object", "properties": {"data": {"type": "string"}}}}}


@router.post("/v1/chat/completions", responses={200: {"model": ChatCompletion, "content": _SSE}, **_ERRORS})
async def chat_completions(req: ChatRequest, request: Request):
    return await complete("chat", req, request)


@router.post("/v1/completions", responses={200: {"model": Completion, "content": _SSE}, **_ERRORS})
async def completions(req: CompletionRequest, request: Request):
    return await complete("completion", req, request)


@router.post("/v1/embeddings", responses={200: {"model": EmbeddingList}, **_ERRORS})
async def embeddings(req: EmbeddingRequest, request: Request):
    ctx = context(request)
    ctx.admission.check(request)
    if not ctx.cfg.embeddings or not ctx.backend.can_embed:
        raise APIError(404, "this server has no embedding model (start it with --embeddings)", "model",
                       type="not_found_error")
    texts = [req.input] if isinstance(req.input, str) else list(req.input)  # 1 to MAX_INPUTS non-empty strings
    vectors, n_tokens, name = await asyncio.to_thread(ctx.backend.embed, texts)
    if req.dimensions is not None and req.dimensions != len(vectors[0]):
        raise APIError(400, f"dimensions: this encoder gives {len(vectors[0])} dimensions, got {req.dimensions}",
                       "dimensions")
    return {"object": "list", "model": name, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]}


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
async def models(request: Request):
    ctx = context(request)
    if ctx.admission.keys:
        ctx.admission.check(request)
    return {"object": "list", "data": [{"id": ctx.backend.model_name, "object": "model", "created": 0,
                                        "owned_by": "lmstack"}]}


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(request: Request):
    ctx = context(request)
    ok, detail = ctx.backend.health(ctx.cfg.watchdog_s)
    return JSONResponse({"status": "ok" if ok else "unhealthy", "detail": detail}, status_code=200 if ok else 503)


@router.get("/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(request: Request):
    ctx = context(request)
    state = ctx.state
    ok = state.ready and not state.draining
    return JSONResponse({"status": "ready" if ok else ("draining" if state.draining else "loading"),
                         "detail": ctx.backend.stats() | {"in_flight": state.in_flight}},
                        status_code=200 if ok else 503,
                        headers={"Retry-After": str(state.retry_after())} if state.draining else None)


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(request: Request):
    return Response(context(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", response_class=HTMLResponse)
async def page():
    from lmstack.serve.page import CHAT_PAGE

    return HTMLResponse(CHAT_PAGE)
