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


def _answer(req: Request, status: int, message: str, rc: str, headers: dict | None = None,
            errors: dict | None = None) -> JSONResponse:
    """The horde's error shape, or OpenAI's under /v1 (what OpenAI clients parse)."""
    if req.url.path.startswith("/v1/"):
        param = message.split(":", 1)[0] if ":" in message else None
        body = {"error": {"message": message, "type": "invalid_request_error" if status < 500
                          else "server_error", "param": param, "code": rc}}
    else:
        body = {"message": message, "rc": rc}
        if errors:
            body["errors"] = errors
    return JSONResponse(body, status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HordeError)
    async def _horde(req: Request, exc: HordeError):
        return _answer(req, exc.status, exc.message, exc.rc, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(req: Request, exc: RequestValidationError):
        message, details = _describe(exc.errors())
        return _answer(req, 400, message, "BadRequest", errors=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException):
        rc = {404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge"}.get(
            exc.status_code, "HTTPError")
        return _answer(req, exc.status_code, str(exc.detail), rc)

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception):
        log.exception("unhandled error")
        return _answer(req, 500, "Internal server error", "InternalError")
