"""User and kudos routes: `/find_user`, `/users`, `/kudos/transfer`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api import node_keys, users
from api.db.models import IdempotencyKey, User
from api.errors import HordeError
from api.routes.deps import authenticate, ctx_of, rate_limited, registered
from api.user_schemas import (
    KudosTransferInput,
    KudosTransferResponse,
    MAX_USER_ID,
    UserDetails,
    UserModify,
    UserModifyResponse,
)

router = APIRouter(tags=["users"])
UserIdPath = Path(ge=0, le=MAX_USER_ID)
# The user records, counted together per key or address (settings.rate_limit_users): cheap
# now (api/users.py reads counters), but a page of /users is still 25 records.
users_limit = [Depends(rate_limited("users"))]


@router.get("/find_user", response_model=UserDetails, response_model_exclude_none=True,
            dependencies=users_limit)
def find_user(request: Request, apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        user = authenticate(ctx, session, apikey)
        return users.details(ctx, session, user, private=True)


@router.get("/users", response_model=list[UserDetails], response_model_exclude_none=True,
            dependencies=users_limit)
def list_users(request: Request, page: int = Query(1, ge=1, le=10**6),
               sort: str = Query("kudos", pattern="^(kudos|age)$")):
    """25 users a page, by kudos (highest first) or by age (oldest first): two statements."""
    ctx = ctx_of(request)
    order = (User.kudos.desc(), User.id) if sort == "kudos" else (User.id,)
    with ctx.db.read() as session:
        page_users = session.execute(select(User).order_by(*order)
                                     .offset((page - 1) * users.PAGE_SIZE)
                                     .limit(users.PAGE_SIZE)).scalars().all()
        return users.details_of(ctx, session, page_users, private=False)


@router.get("/users/{user_id}", response_model=UserDetails, response_model_exclude_none=True,
            dependencies=users_limit)
def get_user(request: Request, user_id: int = UserIdPath, apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        target = users.get_user(session, user_id)
        caller = authenticate(ctx, session, apikey) if apikey else None
        private = caller is not None and (caller.id == target.id and caller.id != 0
                                          or caller.moderator)
        return users.details(ctx, session, target, private)


@router.put("/users/{user_id}", response_model=UserModifyResponse, response_model_exclude_none=True)
def modify_user(body: UserModify, request: Request, user_id: int = UserIdPath,
                apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.write() as session:
        moderator = registered(ctx, session, apikey, "changing a user")
        return users.modify(ctx, session, moderator, users.get_user(session, user_id), body)


@router.put("/node_key")
def register_node_key(request: Request, apikey: str | None = Header(None)):
    """Store the caller's node key (derived from this API key, api/node_keys.py), which their
    Ray-joined volunteer nodes prove themselves with; `rayhorde join` calls it. Idempotent."""
    ctx = ctx_of(request)
    with ctx.db.write() as session:
        user = registered(ctx, session, apikey, "registering a node key")
        user.node_public_key = node_keys.node_public_key(apikey)
        return {"node_public_key": user.node_public_key}


@router.post("/kudos/transfer", response_model=KudosTransferResponse)
def transfer_kudos(body: KudosTransferInput, request: Request, apikey: str | None = Header(None),
                   idempotency_key: str | None = Header(None, max_length=100)):
    ctx = ctx_of(request)
    try:
        with ctx.db.write() as session:
            sender = registered(ctx, session, apikey, "a kudos transfer")
            return KudosTransferResponse(
                transferred=users.transfer(ctx, session, sender, body, idempotency_key))
    except IntegrityError:
        if idempotency_key is None:
            raise
    # A concurrent request with the same Idempotency-Key committed first: give its answer.
    with ctx.db.read() as session:
        sender = registered(ctx, session, apikey, "a kudos transfer")
        done = session.get(IdempotencyKey, (sender.id, idempotency_key))
        if done is None:
            raise HordeError(409, "Conflict", "Idempotency-Key: a concurrent transfer failed; retry")
        return KudosTransferResponse(**done.response)
