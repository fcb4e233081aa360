"""The FastAPI application: the AI Horde v2 surface under /api/v2. Served by Ray Serve as the
ingress deployment (cluster/app.py), and runnable bare for tests and benchmarks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from api import known_models, retention
from api.alchemy import forms as alchemy_forms
from api.alchemy.router import router as alchemy_router
from api.db import queue
from api.errors import install_error_handlers
from api.filters import store as prompt_filters
from api.filters.router import router as filter_routes
from api.images import Context
from api.nul_guard import RefuseNul
from api.ratelimit import RateLimiter
from api.upload_sweep import sweep_stale_uploads
from api.routes import generate, openai, status, texts, users, workers
from api.sharedkeys.router import router as shared_key_routes
from api.web import install_web

log = logging.getLogger("rayhorde.api")


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


async def sweep_expired(ctx: Context) -> None:
    """Hand claims past their deadline back to the queue, delete the uploads of ended claims
    (api/upload_sweep.py), the sources of ended requests and the requests past their
    retention (api/retention.py), every `expire_every_seconds`. Each
    API replica runs this (the update is idempotent), so expiry works whether or not the
    cluster runs a dispatcher; its cost follows the number of claims, not the queue."""
    s = ctx.settings
    while True:
        await asyncio.sleep(s.expire_every_seconds)
        try:
            await run_in_threadpool(queue.expire, ctx.db, s.max_attempts,
                                    max_consecutive_drops=s.max_consecutive_drops,
                                    maintenance_seconds=s.drop_maintenance_seconds)
            await run_in_threadpool(alchemy_forms.expire, ctx.db, s.max_attempts,
                                    max_consecutive_drops=s.max_consecutive_drops,
                                    maintenance_seconds=s.drop_maintenance_seconds)
            await run_in_threadpool(sweep_stale_uploads, ctx)
            # Requests no worker has taken a job of in 20 minutes (api/known_models.py).
            await run_in_threadpool(known_models.expire_unclaimed, ctx)
            await run_in_threadpool(retention.run, ctx)
        except Exception:
            log.exception("sweeping expired claims failed; retrying")


def create_app(ctx: Context, on_submit: Callable[[], None] | None = None,
               follow: Callable | None = None) -> FastAPI:
    """`on_submit` is called after each queued request (to wake the dispatcher); `follow(id)`,
    when given, streams a generation's text as the cluster generates it (OpenAI streaming)."""
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        sweeper = asyncio.create_task(sweep_expired(ctx))
        follower = await filters.start()  # prompt filters: load, then poll
        yield
        sweeper.cancel()
        follower.cancel()
        with suppress(asyncio.CancelledError):
            await follower  # it disposes its engine once its last read has ended

    filters = prompt_filters.cache_of(ctx)
    # The docs pages are install_web's: FastAPI's own load Swagger UI and ReDoc from a CDN.
    app = FastAPI(title="rayhorde", version="2.5.0", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json", lifespan=lifespan)
    app.state.ctx = ctx
    app.state.on_submit = on_submit or (lambda: None)
    app.state.follow = follow
    install_error_handlers(app)
    for routes in (generate, texts, workers, users, status):
        app.include_router(routes.router, prefix="/api/v2")
    app.include_router(openai.router)
    app.include_router(filter_routes, prefix="/api/v2")
    app.include_router(alchemy_router, prefix="/api/v2")
    app.include_router(shared_key_routes, prefix="/api/v2")
    install_web(app, app.openapi_url)  # the web page at / and the API docs, no CDN
    app.add_middleware(RefuseNul)  # inside BodySizeLimit, which bounds what it reads
    app.add_middleware(BodySizeLimit, limit=ctx.settings.max_body_bytes)
    return app


def context_from_settings(settings) -> Context:
    from api.db.session import get_database
    from api.storage import make_storage
    from models.adapters import load_adapter_catalog
    from models.catalog import load_catalog

    catalog = load_catalog(settings.catalog_path)
    if settings.served_models:
        catalog = catalog.select(settings.served_models)
    return Context(settings=settings, db=get_database(settings.database_url),
                   storage=make_storage(settings), catalog=catalog, limiter=make_limiter(settings),
                   adapters=load_adapter_catalog(settings.adapter_catalog_path))


def make_limiter(settings) -> RateLimiter:
    return RateLimiter(settings.rate_limit_storage, {
        "submit": settings.rate_limit_submit, "poll": settings.rate_limit_poll,
        "pop": settings.rate_limit_pop, "users": settings.rate_limit_users,
        "source_pixels": settings.rate_limit_source_pixels})
