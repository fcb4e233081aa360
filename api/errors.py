"""Errors on the wire as the AI Horde sends them: JSON `{message, rc}` with a 4xx/5xx status.

Validation errors name the field (`params.steps: ...`); unknown routes, oversized bodies and
server faults use the same shape, so a client only ever parses one error format. A database
that cannot be reached answers 503 with Retry-After (the request may simply be sent again),
not 500.
"""

from __future__ import annotations

import logging
import sqlite3

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

try:
    import psycopg
except ImportError:  # SQLite only
    psycopg = None

log = logging.getLogger("rayhorde.api")
RETRY_AFTER_SECONDS = 5
# SQLite's errors that mean "not now", not "this request is wrong".
_SQLITE_UNAVAILABLE = ("unable to open", "disk i/o error", "database is locked")


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


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached or used right now, rather than that
    something is wrong with the request or the code."""
    if isinstance(exc, sa_exc.TimeoutError):  # no pooled connection free within pool_timeout
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:  # the connection broke under this request
            return True
        exc = exc.orig
    if psycopg is not None and isinstance(exc, psycopg.OperationalError):
        return True  # refused, lost, the server shutting down or restarting
    if isinstance(exc, sqlite3.OperationalError):
        return any(s in str(exc).lower() for s in _SQLITE_UNAVAILABLE)
    return False


DATABASE_ERRORS = (sa_exc.DBAPIError, sa_exc.TimeoutError, sqlite3.OperationalError,
                   *((psycopg.OperationalError,) if psycopg is not None else ()))


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

    async def _database(req: Request, exc: Exception):
        if database_unavailable(exc):
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            log.warning("database unavailable (%s: %s); answering 503", type(exc).__name__,
                        first_line)
            return _answer(req, 503, f"The database is unavailable; retry in "
                           f"{RETRY_AFTER_SECONDS} seconds", "DatabaseUnavailable",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        log.error("unhandled database error", exc_info=exc)
        return _answer(req, 500, "Internal server error", "InternalError")

    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, _database)

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception):
        log.exception("unhandled error")
        return _answer(req, 500, "Internal server error", "InternalError")
