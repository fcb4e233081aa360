"""Shared keys: their records, and the rules a request made with one passes (see
api/sharedkeys/__init__.py for what they are). The routes stay thin; the rules live here.

What a key's requests cost is read from their generations (their kudos and tax shares, as
api/db/queue.py charges the owner when each finishes) through `shared_key_requests`: a key
only has rows for requests not yet settled, so every read here is bounded by the requests a
key has in flight, never by its history. Settling (on each request made with the key, and on
changes) folds what finished into the key's `kudos` and `utilized`, and drops the rows of
requests that have nothing left to run.
"""

from __future__ import annotations

import email.utils
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import and_, case, delete, func, select, update

from api.auth import hash_api_key
from api.db.models import Generation, Request, SharedKey, SharedKeyRequest, User
from api.errors import HordeError
from api.images import Context, cancel_request
from api.schemas import ImageGenerateRequest
from api.sharedkeys.protocol import (
    UNLIMITED,
    SharedKeyDetails,
    SharedKeyInput,
    SharedKeyPatch,
)
from api.text_schemas import TextGenerateRequest

# Keys one user may hold, as on the AI Horde.
MAX_KEYS, MAX_KEYS_TRUSTED, MAX_KEYS_EDUCATION = 3, 10, 1000
ACTIVE = ("waiting", "processing")
DAY_SECONDS = 86400


def is_shared_key(apikey: str | None) -> bool:
    """Whether `apikey` has a shared key's form (a UUID, as 36 characters). Users' own keys
    never do (api/auth.py new_api_key), so no other key is looked up twice."""
    if apikey is None or len(apikey) != 36:
        return False
    try:
        return str(uuid.UUID(apikey)) == apikey.lower()
    except ValueError:
        return False


def _digest(ctx: Context, secret: str) -> str:
    # Its own domain: a shared key's digest can never equal a user key's.
    return hash_api_key(f"sharedkey:{secret.lower()}", ctx.settings.key_salt)


def _find(ctx: Context, session, secret: str, lock: bool = False) -> SharedKey | None:
    if not is_shared_key(secret):
        return None
    stmt = select(SharedKey).where(SharedKey.key_hash == _digest(ctx, secret))
    # Locked to the end of the transaction (PostgreSQL; SQLite's write transaction is already
    # one at a time), so requests made with one key at once are admitted one after the other.
    return session.execute(stmt.with_for_update() if lock else stmt).scalar_one_or_none()


def _load(ctx: Context, session, secret: str, lock: bool = False) -> SharedKey:
    key = _find(ctx, session, secret, lock)
    if key is None:
        raise HordeError(401, "InvalidAPIKey", "id: no such shared key")
    return key


@dataclass
class _Spending:
    unsettled: float  # finished and charged, not yet folded into the key
    reserved: float  # what its waiting and processing generations will cost
    rows: list  # per request: (request_id, settled, charged so far, generations left to run)


def _spending(session, key: SharedKey) -> _Spending:
    """One grouped read over the generations of the key's unsettled requests."""
    G, L = Generation, SharedKeyRequest
    cost = G.kudos + G.tax  # the most a generation in flight may cost
    rows = session.execute(
        select(L.request_id, L.settled,
               # what finished generations cost (api/db/queue.py finish_in sets `charged`)
               func.coalesce(func.sum(case((G.state == "done", G.charged), else_=0.0)), 0.0),
               func.count(case((G.state.in_(ACTIVE), 1))),
               func.coalesce(func.sum(case((G.state.in_(ACTIVE), cost), else_=0.0)), 0.0))
        .select_from(L).outerjoin(G, G.request_id == L.request_id)
        .where(L.shared_key_id == key.id).group_by(L.request_id, L.settled)).all()
    return _Spending(unsettled=sum(charged - settled for _, settled, charged, _, _ in rows),
                     reserved=sum(r[4] for r in rows), rows=[r[:4] for r in rows])


def _spend(key: SharedKey, amount: float) -> None:
    """What the AI Horde's consume_kudos does: `kudos` goes down (never below 0) unless the
    key has no limit, `utilized` up."""
    if key.kudos != UNLIMITED:
        key.kudos = max(0.0, key.kudos - amount)
    key.utilized += amount


def _settle(session, key: SharedKey) -> _Spending:
    """Fold what the key's requests were charged since the last settling into the key, and
    drop the requests with nothing left to run. The key's row must be locked (see _find)."""
    spending = _spending(session, key)
    if spending.unsettled:
        _spend(key, spending.unsettled)
    L = SharedKeyRequest
    ended = [rid for rid, _, _, left in spending.rows if not left]
    if ended:
        session.execute(delete(L).where(L.request_id.in_(ended)))
    for rid, settled, charged, left in spending.rows:
        if left and charged != settled:
            session.execute(update(L).where(L.request_id == rid).values(settled=charged))
    session.flush()
    return spending


def _expired(key: SharedKey, now: float) -> bool:
    return key.expiry is not None and key.expiry <= now


def details(session, key: SharedKey, secret: str, owner: User | None = None) -> SharedKeyDetails:
    """The key as the AI Horde shows it, with what finished since the last settling counted
    in (read only)."""
    owner = owner or session.get(User, key.user_id)
    unsettled = _spending(session, key).unsettled
    kudos = key.kudos if key.kudos == UNLIMITED else max(0.0, key.kudos - unsettled)
    return SharedKeyDetails(
        id=secret.lower(), username=f"{owner.username}#{owner.id}", name=key.name or "",
        kudos=round(kudos), utilized=round(key.utilized + unsettled),
        expiry=email.utils.formatdate(key.expiry) if key.expiry is not None else None,
        max_image_pixels=key.max_image_pixels, max_image_steps=key.max_image_steps,
        max_text_tokens=key.max_text_tokens)


def _expiry_from(days: int, now: float) -> float | None:
    return None if days == UNLIMITED else now + days * DAY_SECONDS


def create(ctx: Context, session, owner: User, body: SharedKeyInput) -> SharedKeyDetails:
    """A new key for `owner` (a registered user): the only answer that carries a key its caller
    did not send. The owner's row is locked first on PostgreSQL, so keys made at once cannot
    pass the cap together."""
    cap = (MAX_KEYS_EDUCATION if owner.education else
           MAX_KEYS_TRUSTED if owner.trusted else MAX_KEYS)
    if session.bind.dialect.name == "postgresql":
        session.execute(select(User.id).where(User.id == owner.id).with_for_update())
    held = session.execute(select(func.count()).select_from(
        select(SharedKey.id).where(SharedKey.user_id == owner.id).limit(cap).subquery())
    ).scalar_one()
    if held >= cap:
        raise HordeError(403, "Forbidden", f"apikey: you hold {held} shared keys, the most "
                                           "your account may; delete one first")
    secret = str(uuid.uuid4())
    now = time.time()
    key = SharedKey(id=str(uuid.uuid4()), key_hash=_digest(ctx, secret), user_id=owner.id,
                    name=body.name, kudos=float(body.kudos), utilized=0.0,
                    expiry=_expiry_from(body.expiry, now), max_image_pixels=body.max_image_pixels,
                    max_image_steps=body.max_image_steps, max_text_tokens=body.max_text_tokens,
                    created_at=now)
    session.add(key)
    session.flush()
    return details(session, key, secret, owner)


def read(ctx: Context, session, secret: str) -> SharedKeyDetails:
    return details(session, _load(ctx, session, secret), secret)


def _owned(ctx: Context, session, caller: User, secret: str) -> SharedKey:
    key = _load(ctx, session, secret, lock=True)
    if key.user_id != caller.id:
        raise HordeError(403, "Forbidden", "apikey: this shared key belongs to another user")
    return key


def change(ctx: Context, session, caller: User, secret: str,
           body: SharedKeyPatch) -> SharedKeyDetails:
    """Its owner changes what `body` gives. A new `kudos` is what the key may spend from now
    on (what finished before is settled first), a new `expiry` counts from now."""
    key = _owned(ctx, session, caller, secret)
    if all(getattr(body, f) is None for f in SharedKeyPatch.model_fields):
        raise HordeError(400, "NoSharedKeyModSelected",
                         "body: give at least one of kudos, expiry, name, max_image_pixels, "
                         "max_image_steps, max_text_tokens")
    _settle(session, key)
    if body.kudos is not None:
        key.kudos = float(body.kudos)
    if body.expiry is not None:
        key.expiry = _expiry_from(body.expiry, time.time())
    for field in ("name", "max_image_pixels", "max_image_steps", "max_text_tokens"):
        if getattr(body, field) is not None:
            setattr(key, field, getattr(body, field))
    session.flush()
    return details(session, key, secret, caller)


def remove(ctx: Context, session, caller: User, secret: str) -> None:
    """Its owner deletes it: what its requests have not finished is cancelled (as the AI
    Horde drops a deleted key's waiting requests); what finished stays paid."""
    key = _owned(ctx, session, caller, secret)
    L = SharedKeyRequest
    for rid, kind in session.execute(select(L.request_id, Request.kind)
                                     .join(Request, Request.id == L.request_id)
                                     .where(L.shared_key_id == key.id)).all():
        cancel_request(session, rid, kind)
    session.execute(delete(L).where(L.shared_key_id == key.id))
    session.delete(key)
    session.flush()


# --- requests made with a shared key ---

def _job_limits(key: SharedKey, body) -> None:
    """The key's per-request limits (400 naming the field), as the AI Horde checks them."""
    checks = []
    if isinstance(body, ImageGenerateRequest):
        p = body.params
        checks = [(key.max_image_pixels, p.width * p.height, "params.width, params.height",
                   "pixels"), (key.max_image_steps, p.steps, "params.steps", "steps")]
    elif isinstance(body, TextGenerateRequest):
        checks = [(key.max_text_tokens, body.params.max_length, "params.max_length", "tokens")]
    for limit, asked, field, unit in checks:
        if limit != UNLIMITED and asked > limit:
            raise HordeError(400, "BadRequest", f"{field}: this shared key is limited to {limit} "
                                                f"{unit} per request; you asked for {asked}")


def key_for_request(ctx: Context, session, apikey: str | None, body,
                    write: bool) -> SharedKey | None:
    """The shared key a generation request (or its dry run) is made with, or None when `apikey`
    is none (the caller then authenticates it as a user's key). Refuses an expired key or one
    with nothing left to spend (403) and a request over its limits (400). With `write`, the
    key is locked and settled, for `admit` to follow in the same transaction."""
    key = _find(ctx, session, apikey, lock=write) if is_shared_key(apikey) else None
    if key is None:
        return None
    if _expired(key, time.time()):
        raise HordeError(403, "SharedKeyExpired", "apikey: this shared key has expired")
    if write:
        _settle(session, key)
        left = key.kudos
    else:
        left = key.kudos - _spending(session, key).unsettled
    if key.kudos != UNLIMITED and left <= 0:
        raise HordeError(403, "SharedKeyEmpty", "apikey: this shared key has run out of kudos")
    _job_limits(key, body)
    return key


def admit(session, key: SharedKey, request: Request) -> None:
    """After `request` is written with the key's owner as its requester (same transaction,
    key locked and settled by key_for_request): refuse it when it costs more than the key may
    still spend beyond its requests in flight (403, the transaction then rolls back), else
    record it as the key's."""
    if key.kudos != UNLIMITED:
        reserved = _spending(session, key).reserved
        if request.kudos > key.kudos - reserved:
            raise HordeError(
                403, "SharedKeyInsufficientKudos",
                f"apikey: this shared key may spend {round(key.kudos - reserved, 2)} more kudos "
                f"(after its {round(reserved, 2)} still queued); this request costs "
                f"{request.kudos}")
    session.add(SharedKeyRequest(request_id=request.id, shared_key_id=key.id, settled=0.0))
    session.flush()
