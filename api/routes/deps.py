"""Per-request helpers shared by the routes: the context, the caller's identity and address,
rate limits (who counts against which: api/ratelimit.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from fastapi import Header, Request
from fastapi.responses import JSONResponse
from sqlalchemy import bindparam, select
from starlette.concurrency import run_in_threadpool

from api.auth import ANONYMOUS_KEY, ANONYMOUS_USER_ID, hash_api_key
from api.db.models import User
from api.errors import HordeError
from api.images import Context
from api.ratelimit import Caller, address_subject, at_least, user_subject
from api.schemas import RequestAsyncResponse
from api.sharedkeys import service as shared_keys
from api.worker_schemas import JobSubmitResponse


def ctx_of(request: Request) -> Context:
    return request.app.state.ctx


# Built once: each call binds its digest (building the expression costs more than running it).
USER_BY_KEY = select(User).where(User.api_key_hash == bindparam("digest"))


def authenticate(ctx: Context, session, apikey: str | None) -> User:
    """The user behind an `apikey` header; no header means the anonymous user."""
    if apikey is None or apikey == ANONYMOUS_KEY:
        return session.get(User, ANONYMOUS_USER_ID)
    if not 10 <= len(apikey) <= 100:
        raise HordeError(401, "InvalidAPIKey", "apikey: malformed API key")
    user = session.execute(
        USER_BY_KEY, {"digest": hash_api_key(apikey, ctx.settings.key_salt)}).scalar_one_or_none()
    if user is None:
        raise HordeError(401, "InvalidAPIKey", "apikey: unknown API key")
    return user


def registered(ctx: Context, session, apikey: str | None, what: str) -> User:
    """Like authenticate, for calls the anonymous user may not make."""
    user = authenticate(ctx, session, apikey)
    if user.id == ANONYMOUS_USER_ID:
        raise HordeError(403, "AnonForbidden", f"apikey: {what} needs a registered user's API key")
    return user


# With no trusted proxy hops, every call that carries X-Forwarded-For counts as this one
# address (see client_ip).
FORWARDED_ADDRESS = "forwarded"
MAX_ADDRESS_LENGTH = 64  # an IPv6 address with a zone is at most 45; anything longer is junk


def client_ip(request: Request) -> str:
    """The caller's address, as the limits and the anonymous waiting cap count it.

    `trusted_proxy_hops` (settings) is how many proxies in front of the API append the peer
    they saw to X-Forwarded-For (nginx's `$proxy_add_x_forwarded_for`, HAProxy's `option
    forwardfor`): the address is then the entry that many places from the right, the one the
    outermost of them appended. Entries left of it came from the client and never count, so
    a client cannot choose its address. A call with fewer entries did not come through those
    proxies and counts as its peer. (Serve's HAProxy ingress neither adds nor strips the
    header, so it is not a hop.)

    With no hops (the default), the address is the connection's peer. The header never
    counts then, and a call carrying it counts as FORWARDED_ADDRESS whatever it claims: a
    server in front of the app may have rewritten the peer from it (uvicorn does, for
    loopback peers, unless FORWARDED_ALLOW_IPS says otherwise; the cluster's API replicas
    switch that off, api/ingress.py). Behind the ingress with no hops every caller's peer is
    the ingress, so the per-address limits are shared by all anonymous callers: a public
    horde runs behind an outer proxy with `trusted_proxy_hops: 1` (README, "Public set-up")."""
    hops = ctx_of(request).settings.trusted_proxy_hops
    peer = request.client.host if request.client else ""
    if hops == 0:
        return FORWARDED_ADDRESS if "x-forwarded-for" in request.headers else peer
    # Every X-Forwarded-For line, in order (HAProxy adds a line of its own; nginx appends).
    entries = [e.strip() for line in request.headers.getlist("x-forwarded-for")
               for e in line.split(",")]
    if len(entries) < hops:
        return peer
    address = entries[-hops]
    return address if 0 < len(address) <= MAX_ADDRESS_LENGTH else peer


def requester_of(user: User, ip: str) -> str:
    """Who a request's concurrency counts against: the user, or for anonymous requests the
    client address (kept as a digest, not in the clear)."""
    if user.id != ANONYMOUS_USER_ID:
        return f"u:{user.id}"
    return anonymous_requester(ip)


def anonymous_requester(ip: str) -> str:
    return "ip:" + hashlib.sha256(ip.encode()).hexdigest()[:32]


def client_agent(request: Request) -> str:
    # horde-sdk sends `client_agent` (underscore), browsers' clients `Client-Agent`.
    return (request.headers.get("client-agent") or request.headers.get("client_agent")
            or "unknown:0:unknown")[:200]


def request_key(apikey: str | None, authorization: str | None) -> str | None:
    """The API key a call carries: `Authorization: Bearer KEY` (OpenAI clients), else the
    horde's `apikey` header (as routes/openai.py reads it)."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return apikey


def known_caller(ctx: Context, key: str | None) -> Caller | None:
    """The user `key` belongs to, as the limiter counts it (cached, see CallerCache); None for
    no key, the anonymous key and keys no user has, which count as their address."""
    if key is None or key == ANONYMOUS_KEY or not 10 <= len(key) <= 100:
        return None
    digest = hash_api_key(key, ctx.settings.key_salt)

    def load() -> Caller | None:
        with ctx.db.read() as session:
            row = session.execute(select(User.id, User.trusted)
                                  .where(User.api_key_hash == digest)).first()
        return None if row is None or row.id == ANONYMOUS_USER_ID else Caller(row.id, row.trusted)

    return ctx.limiter.callers.get(digest, load)


def submit_limit(settings, caller: Caller) -> str:
    registered = at_least(settings.rate_limit_submit, settings.rate_limit_submit_registered)
    return at_least(registered, settings.rate_limit_submit_trusted) if caller.trusted else registered


def rate_limited(group: str) -> Callable:
    """A route dependency counting the call against `group`'s limit: a user's key counts
    against that user wherever it calls from (submits at the user's tier), anything else
    against the client address. It runs on the event loop when it needs neither the database
    nor a network store (an in-memory limiter, the key's user cached or no key at all), and
    in the thread pool otherwise: a hop to a thread costs as much as the count itself."""

    def count(ctx: Context, key: str | None, ip: str) -> None:
        caller = known_caller(ctx, key)
        if caller is None:
            ctx.limiter.check(group, address_subject(ip))
        else:
            limit = submit_limit(ctx.settings, caller) if group == "submit" else None
            ctx.limiter.check(group, user_subject(caller.user_id), limit)

    async def dependency(request: Request, apikey: str | None = Header(None),
                         authorization: str | None = Header(None)) -> None:
        ctx = ctx_of(request)
        if ctx.limiter is None:
            return
        key, ip = request_key(apikey, authorization), client_ip(request)
        if ctx.limiter.in_memory and not _needs_lookup(ctx, key):
            count(ctx, key, ip)
        else:
            await run_in_threadpool(count, ctx, key, ip)

    return dependency


def _needs_lookup(ctx: Context, key: str | None) -> bool:
    """Whether counting a call with `key` reads the database (its user is not cached)."""
    if key is None or key == ANONYMOUS_KEY or not 10 <= len(key) <= 100:
        return False
    return not ctx.limiter.callers.cached(hash_api_key(key, ctx.settings.key_salt))


def pixel_budget(ctx: Context, user: User, ip: str) -> Callable[[str, int], None] | None:
    """The `charge` of api/sources.py for this caller: each source image's pixels, counted
    before they are decoded against the `source_pixels` budget of the user (registered) or the
    address (anonymous); 429 past it. None when rate limits are off."""
    if ctx.limiter is None:
        return None
    if user.id == ANONYMOUS_USER_ID:
        subject, limit = address_subject(ip), None
    else:
        subject = user_subject(user.id)
        limit = at_least(ctx.settings.rate_limit_source_pixels,
                         ctx.settings.rate_limit_source_pixels_registered)

    def charge(field: str, pixels: int) -> None:
        ctx.limiter.spend("source_pixels", subject, pixels, limit,
                          f"source image pixels ({field}: {pixels})")
    return charge


def paying_user(ctx: Context, session, apikey: str | None, body, write: bool):
    """(user, shared key) of a generation request: the user its key belongs to, or, for a
    shared key (api/sharedkeys), the key's owner once the key's state and limits allow the
    request. Statements only for a key of a shared key's form."""
    shared_key = shared_keys.key_for_request(ctx, session, apikey, body, write)
    if shared_key is None:
        return authenticate(ctx, session, apikey), None
    return session.get(User, shared_key.user_id), shared_key


async def in_read_session(request: Request, read: Callable):
    """`read(ctx, session)` in a read session, in the thread pool. The routes polled most are
    `async def` around this one hop: FastAPI runs a plain `def` route in the thread pool and
    then validates its answer in the thread pool again, two hops where one does."""
    ctx = ctx_of(request)

    def run():
        with ctx.db.read() as session:
            return read(ctx, session)
    return await run_in_threadpool(run)


async def worker_submit(request: Request, apikey: str | None, submit: Callable,
                        body) -> JobSubmitResponse:
    """A worker's `/submit` of one job (`submit(ctx, user, body)` -> reward), one thread hop
    as in_read_session."""
    ctx = ctx_of(request)
    # The submitting address as an anonymous requester: anonymous requests sent from it are
    # not work for others (api/db/queue.py Result.worker_requester).
    worker_requester = anonymous_requester(client_ip(request))

    def run() -> JobSubmitResponse:
        with ctx.db.read() as session:
            user = registered(ctx, session, apikey, "a worker")
        return JobSubmitResponse(reward=round(submit(ctx, user, body, worker_requester), 2))
    return await run_in_threadpool(run)


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
                paying_user(ctx, session, apikey, body, write=False)
                return price(ctx, body)
        return JSONResponse({"kudos": await run_in_threadpool(priced)}, status_code=200)
    agent, ip = client_agent(request), client_ip(request)

    def queued():
        prepared = None
        if prepare is not None:
            caller = charge = None
            if getattr(body, "source_image", None) is not None:
                # The caller and the request's rules first: a bad key, a refused request or
                # a spent pixel budget costs no fetch and no decoding. (Without sources
                # nothing costly runs before the write transaction authenticates.)
                with ctx.db.read() as session:
                    caller, _ = paying_user(ctx, session, apikey, body, write=False)
                charge = pixel_budget(ctx, caller, ip)
            prepared = prepare(ctx, caller, body, charge)
        try:
            with ctx.db.write() as session:
                user, shared_key = paying_user(ctx, session, apikey, body, write=True)
                req, warnings = submit(ctx, session, user, body, requester_of(user, ip), agent,
                                       prepared)
                if shared_key is not None:
                    shared_keys.admit(session, shared_key, req)
                return req, warnings
        except BaseException:
            if prepared is not None:
                prepared.delete(ctx.storage)
            raise

    req, warnings = await run_in_threadpool(queued)
    request.app.state.on_submit()
    return RequestAsyncResponse(id=req.id, kudos=req.kudos, warnings=warnings or None)
