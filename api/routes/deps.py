"""Per-request helpers shared by the routes: the context, the caller's identity and address,
rate limits."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from fastapi import Header, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.auth import ANONYMOUS_KEY, ANONYMOUS_USER_ID, hash_api_key
from api.db.models import User
from api.errors import HordeError
from api.images import Context
from api.schemas import RequestAsyncResponse


def ctx_of(request: Request) -> Context:
    return request.app.state.ctx


def authenticate(ctx: Context, session, apikey: str | None) -> User:
    """The user behind an `apikey` header; no header means the anonymous user."""
    if apikey is None or apikey == ANONYMOUS_KEY:
        return session.get(User, ANONYMOUS_USER_ID)
    if not 10 <= len(apikey) <= 100:
        raise HordeError(401, "InvalidAPIKey", "apikey: malformed API key")
    user = session.execute(
        select(User).where(User.api_key_hash == hash_api_key(apikey, ctx.settings.key_salt))
    ).scalar_one_or_none()
    if user is None:
        raise HordeError(401, "InvalidAPIKey", "apikey: unknown API key")
    return user


def registered(ctx: Context, session, apikey: str | None, what: str) -> User:
    """Like authenticate, for calls the anonymous user may not make."""
    user = authenticate(ctx, session, apikey)
    if user.id == ANONYMOUS_USER_ID:
        raise HordeError(403, "AnonForbidden", f"apikey: {what} needs a registered user's API key")
    return user


def client_ip(request: Request) -> str:
    """The caller's address: the peer's, or when the peer is a trusted proxy (the ingress), the
    last address that proxy put in X-Forwarded-For."""
    peer = request.client.host if request.client else ""
    forwarded = request.headers.get("x-forwarded-for")
    if forwarded and peer in ctx_of(request).settings.trusted_proxies:
        return forwarded.split(",")[-1].strip()
    return peer


def requester_of(user: User, ip: str) -> str:
    """Who a request's concurrency counts against: the user, or for anonymous requests the
    client address (kept as a digest, not in the clear)."""
    if user.id != ANONYMOUS_USER_ID:
        return f"u:{user.id}"
    return "ip:" + hashlib.sha256(ip.encode()).hexdigest()[:32]


def client_agent(request: Request) -> str:
    # horde-sdk sends `client_agent` (underscore), browsers' clients `Client-Agent`.
    return (request.headers.get("client-agent") or request.headers.get("client_agent")
            or "unknown:0:unknown")[:200]


def rate_limited(group: str) -> Callable:
    """A route dependency counting the call against `group`'s limit."""

    def dependency(request: Request, apikey: str | None = Header(None)) -> None:
        limiter = ctx_of(request).limiter
        if limiter is not None:
            limiter.check(group, apikey, client_ip(request))

    return dependency


async def accept_request(request: Request, body, apikey: str | None, price: Callable,
                         submit: Callable, prepare: Callable | None = None):
    """The shape of both `/generate/async` routes: a dry run is priced (200 `{kudos}`); any
    other request is queued (`submit(ctx, session, user, body, requester, client_agent,
    prepared)` -> (request, warnings)) and the dispatcher woken, on the event loop and after
    the commit, since Serve handles must be called from the loop. `prepare(ctx, body)` does
    the slow part (fetching source images) before the write transaction opens, so it never
    holds the database; what it returns has `delete(storage)`, called when the request is
    refused after all."""
    ctx = ctx_of(request)
    if body.dry_run:
        def priced() -> float:
            with ctx.db.read() as session:
                authenticate(ctx, session, apikey)
                return price(ctx, body)
        return JSONResponse({"kudos": await run_in_threadpool(priced)}, status_code=200)
    agent, ip = client_agent(request), client_ip(request)

    def queued():
        prepared = prepare(ctx, body) if prepare is not None else None
        try:
            with ctx.db.write() as session:
                user = authenticate(ctx, session, apikey)
                return submit(ctx, session, user, body, requester_of(user, ip), agent, prepared)
        except BaseException:
            if prepared is not None:
                prepared.delete(ctx.storage)
            raise

    req, warnings = await run_in_threadpool(queued)
    request.app.state.on_submit()
    return RequestAsyncResponse(id=req.id, kudos=req.kudos, warnings=warnings or None)
