"""OpenAI-style error bodies for whatever goes wrong; ``install(app)`` registers the handlers.

Every error is ``{"error": {"message", "type", "param", "code"}}``: an ``APIError`` (or the
upstream's own body it carries), a request that fails validation (``param`` is the dotted
path of pydantic's first error, the message says what was given), an unknown route (404)
and anything unexpected (a 500 that names only the exception's type).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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
        msg, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", "body"
    else:
        got = repr(first.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."
        msg = f"{param}: {first.get('msg')} (got {got})"
        if len(errs) > 1:
            msg += f"; and {len(errs) - 1} more problem(s)"
    context(request).metrics.error("invalid_request_error")
    return JSONResponse(error_body(msg, param=param), status_code=400)


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", kind),
                        status_code=e.status_code, headers=getattr(e, "headers", None))


async def unexpected(request: Request, e: Exception) -> JSONResponse:
    context(request).metrics.error("server_error")
    return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


def install(app) -> None:
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
