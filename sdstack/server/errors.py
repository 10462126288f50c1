"""Errors as JSON: `{"error", "detail", "field", "errors"}`; a user's mistake is a 4xx, never a 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError

log = logging.getLogger(__name__)


def error_body(kind: str, detail: str, field: str | None = None, errors: list[dict] | None = None) -> dict:
    return {"error": kind, "detail": detail, "field": field, "errors": errors or []}


def _one(e: dict) -> dict:
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    kind = e.get("type", "invalid")
    if kind == "json_invalid":
        reason = (e.get("ctx") or {}).get("error", e.get("msg", ""))
        return {"field": "body", "message": f"malformed JSON: {reason}", "type": kind}
    if not loc:
        return {"field": "body", "message": "the request body must be a JSON object", "type": kind}
    if kind == "extra_forbidden":
        return {"field": loc[0], "message": f"unknown field {loc[0]!r}; see the schema at /docs", "type": kind}
    return {"field": ".".join(loc), "message": e.get("msg", "invalid value"), "type": kind}


def validation_body(exc: RequestValidationError) -> dict:
    errors = [_one(e) for e in exc.errors()]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:10])
    return error_body("ValidationError", detail, errors[0]["field"] if errors else None, errors)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        field = exc.field
        return JSONResponse(error_body("UserError", str(exc), field,
                                       [{"field": field, "message": str(exc), "type": "value_error"}]),
                            status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError):
        return JSONResponse(validation_body(exc), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse(error_body("HTTPException", detail), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("InternalError", f"internal error ({type(exc).__name__}); see the server log"),
                            status_code=500)
