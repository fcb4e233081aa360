"""Errors on the wire as the AI Horde sends them: JSON `{message, rc}` with a 4xx/5xx status.

Validation errors name the field (`params.steps: ...`); unknown routes, oversized bodies and
server faults use the same shape, so a client only ever parses one error format.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("rayhorde.api")


class HordeError(Exception):
    def __init__(self, status: int, rc: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.rc, self.message, self.headers = status, rc, message, headers


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts)


def _describe(errors: list[dict]) -> tuple[str, dict[str, str]]:
    details = {}
    for e in errors:
        msg = e.get("msg", "invalid")
        ctx_err = (e.get("ctx") or {}).get("error")
        if ctx_err is not None and getattr(ctx_err, "field", None):
            details[ctx_err.field] = str(ctx_err)
            continue
        details[_field(tuple(e.get("loc", ()))) or "body"] = msg
    message = "; ".join(f"{k}: {v}" for k, v in details.items())
    return message, details


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HordeError)
    async def _horde(_req: Request, exc: HordeError):
        return JSONResponse({"message": exc.message, "rc": exc.rc}, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError):
        message, details = _describe(exc.errors())
        return JSONResponse(
            {"message": message, "rc": "BadRequest", "errors": details}, status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException):
        rc = {404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge"}.get(
            exc.status_code, "HTTPError")
        return JSONResponse({"message": str(exc.detail), "rc": rc}, exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse({"message": "Internal server error", "rc": "InternalError"}, 500)
