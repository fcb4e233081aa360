"""The FastAPI application: the AI Horde v2 surface under /api/v2. Served by Ray Serve as the
ingress deployment (cluster/app.py), and runnable bare for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import install_error_handlers
from api.images import Context
from api.routes import generate, status


class BodySizeLimit:
    """Refuse bodies over `limit` bytes with 413 before they are parsed, whether the client
    declared a Content-Length or streams the body."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = b'{"message": "body: request body too large", "rc": "PayloadTooLarge"}'
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(ctx: Context, on_submit: Callable[[], None] | None = None) -> FastAPI:
    app = FastAPI(title="rayhorde", version="2.5.0", docs_url="/api/docs",
                  openapi_url="/api/openapi.json")
    app.state.ctx = ctx
    app.state.on_submit = on_submit or (lambda: None)
    install_error_handlers(app)
    app.include_router(generate.router, prefix="/api/v2")
    app.include_router(status.router, prefix="/api/v2")
    app.add_middleware(BodySizeLimit, limit=ctx.settings.max_body_bytes)
    return app


def context_from_settings(settings) -> Context:
    from api.db.session import get_database
    from api.storage import make_storage
    from models.catalog import load_catalog

    catalog = load_catalog(settings.catalog_path)
    if settings.served_models:
        catalog = catalog.select(settings.served_models)
    return Context(settings=settings, db=get_database(settings.database_url),
                   storage=make_storage(settings), catalog=catalog)
