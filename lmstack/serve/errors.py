"""OpenAI-style error bodies for whatever goes wrong; ``install(app)`` registers the handlers.

Every error is ``{"error": {"message", "type", "param", "code"}}``: an ``APIError`` (or the
upstream's own body it carries), a request that fails validation (``param`` is the dotted
path of pydantic's first error, the message says what was given), a body that cannot be
read as JSON (``param`` is ``body``; the message names the cause: not UTF-8, nested too
deeply, malformed), a body over the limit (413), an unknown route (404) and anything
unexpected (a 500 that names only the exception's type).
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmstack.serve.admission import BodyTooLarge
from lmstack.serve.context import context
from lmstack.serve.events import APIError, error_body

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _union_tag(x) -> bool:
    """pydantic puts the union member tried (``str``, ``list[TextPart]``, ``ToolChoice``) in error locations."""
    return isinstance(x, str) and (not x.isidentifier() or x[:1].isupper() or x in _TYPE_TAGS)


async def api_error(request: Request, e: APIError) -> JSONResponse:
    context(request).metrics.error(e.kind)
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    errs = e.errors()
    first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _union_tag(x)]
    param = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
        where = [x for x in first.get("loc", ()) if isinstance(x, int)]
        msg = f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        msg, param = msg + (f" at offset {where[0]}" if where else ""), "body"
    else:
        got = repr(first.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."
        msg = f"{param}: {first.get('msg')} (got {got})"
        if len(errs) > 1:
            msg += f"; and {len(errs) - 1} more problem(s)"
    context(request).metrics.error("invalid_request_error")
    return JSONResponse(error_body(msg, param=param), status_code=400)


def _unreadable(cause: BaseException) -> str:
    """Why a body could not be parsed, in words (FastAPI says only "There was an error parsing the body")."""
    if isinstance(cause, UnicodeDecodeError):
        return f"request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset {cause.start})"
    if isinstance(cause, RecursionError):
        return "request body is not valid JSON: nested too deeply"
    if isinstance(cause, json.JSONDecodeError):
        return f"request body is not valid JSON: {cause.msg} at offset {cause.pos}"
    return f"request body is not valid JSON: {cause}"


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    cause = e.__cause__
    if e.status_code == 400 and isinstance(cause, (ValueError, RecursionError)):  # raised while parsing the body
        context(request).metrics.error("invalid_request_error")
        return JSONResponse(error_body(_unreadable(cause), param="body"), status_code=400)
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", kind),
                        status_code=e.status_code, headers=getattr(e, "headers", None))


async def body_too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
    context(request).metrics.error("body_too_large")
    # The connection stays open: uvicorn reads and drops the rest of the body, so the client,
    # still sending, gets this answer instead of a reset connection.
    return JSONResponse(e.body(), status_code=413)


async def unexpected(request: Request, e: Exception) -> JSONResponse:
    context(request).metrics.error("server_error")
    return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


def install(app) -> None:
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(BodyTooLarge, body_too_large)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
