"""Users and kudos: details, moderator changes, transfers. The routes stay thin; the rules live
here. Every kudos movement goes through api/ledger.py."""

from __future__ import annotations

import time

from sqlalchemy import case, func, select

from api import ledger
from api.auth import ANONYMOUS_USER_ID
from api.db.models import Generation, IdempotencyKey, KudosEntry, ROLES, User, Worker
from api.errors import HordeError
from api.images import Context
from api.user_schemas import (
    ActiveGenerations,
    ContributionsDetails,
    KudosDetails,
    KudosTransferInput,
    MAX_USER_ID,
    UsageDetails,
    UserDetails,
    UserModify,
    UserModifyResponse,
)

PAGE_SIZE = 25


def alias(user: User) -> str:
    return f"{user.username}#{user.id}"


def concurrency(ctx: Context, user: User) -> int:
    s = ctx.settings
    return s.max_waiting_education if user.education else s.max_waiting_per_user


def details(ctx: Context, session, user: User, private: bool) -> UserDetails:
    """A user's record; `private` (the user itself or a moderator) adds contact details and
    the generations it has in the queue. Four statements."""
    workers = session.execute(select(Worker.id, Worker.jobs_done, Worker.megapixelsteps_done)
                              .where(Worker.owner_id == user.id)).all()
    by_kind = dict(session.execute(
        select(KudosEntry.kind, func.sum(KudosEntry.amount)).where(KudosEntry.user_id == user.id)
        .group_by(KudosEntry.kind)).all())
    gifted, received = session.execute(
        select(func.sum(case((KudosEntry.amount < 0, KudosEntry.amount), else_=0)),
               func.sum(case((KudosEntry.amount > 0, KudosEntry.amount), else_=0)))
        .where(KudosEntry.user_id == user.id, KudosEntry.kind == "transfer")).one()
    used = session.execute(
        select(func.count(), func.count(func.distinct(Generation.request_id)))
        .where(Generation.user_id == user.id, Generation.state == "done")).one()
    active = None
    if private and user.id != ANONYMOUS_USER_ID:
        active = ActiveGenerations(image=list(session.execute(
            select(Generation.id).where(Generation.requester == f"u:{user.id}",
                                        Generation.state.in_(("waiting", "processing")))
            .limit(200)).scalars()))
    return UserDetails(
        id=user.id, username=alias(user), kudos=round(user.kudos, 2),
        concurrency=concurrency(ctx, user), worker_count=len(workers),
        worker_ids=[w.id for w in workers], account_age=int(time.time() - user.created_at),
        pseudonymous=user.id == ANONYMOUS_USER_ID, contact=user.contact if private else None,
        **{role: getattr(user, role) for role in ROLES},
        kudos_details=KudosDetails(
            accumulated=round(by_kind.get("reward", 0.0), 2),
            gifted=round(-(gifted or 0.0), 2), received=round(received or 0.0, 2),
            awarded=round(by_kind.get("award", 0.0) + by_kind.get("uptime", 0.0), 2),
            admin=round(by_kind.get("award", 0.0), 2)),
        usage=UsageDetails(requests=used[1], megapixelsteps=0.0),
        contributions=ContributionsDetails(
            fulfillments=sum(w.jobs_done for w in workers),
            megapixelsteps=round(sum(w.megapixelsteps_done for w in workers), 2)),
        active_generations=active,
    )


def get_user(session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise HordeError(404, "UserNotFound", f"id: no user {user_id}")
    return user


def modify(ctx: Context, session, moderator: User, target: User, body: UserModify) -> UserModifyResponse:
    if not moderator.moderator:
        raise HordeError(403, "NotModerator", "apikey: changing a user needs a moderator's key")
    out = UserModifyResponse()
    for role in ROLES:
        value = getattr(body, role)
        if value is not None:
            setattr(target, role, value)
            setattr(out, role, value)
    if body.contact is not None:
        target.contact = out.contact = body.contact
    if body.username is not None:
        target.username = out.username = body.username
    session.flush()
    if body.kudos:
        ledger.award(session, target.id, body.kudos, kind="award", ref=f"by moderator {moderator.id}")
        session.refresh(target)
        out.new_kudos = round(target.kudos, 2)
    return out


def transfer(ctx: Context, session, sender: User, body: KudosTransferInput,
             idempotency_key: str | None) -> float:
    """Give kudos to another user, once per Idempotency-Key: a retry with the same key gets the
    first answer and moves nothing."""
    if idempotency_key is not None:
        done = session.get(IdempotencyKey, (sender.id, idempotency_key))
        if done is not None:
            return done.response["transferred"]
    name, _, raw_id = body.username.rpartition("#")
    if not (raw_id.isascii() and raw_id.isdigit()):  # "²".isdigit() too, but int() refuses it
        raise HordeError(400, "BadRequest", "username: give the recipient as name#id")
    target = session.get(User, int(raw_id)) if int(raw_id) <= MAX_USER_ID else None
    if target is None or target.username != name:
        raise HordeError(404, "UserNotFound", f"username: no user {body.username}")
    if sender.flagged:
        raise HordeError(403, "Forbidden", "apikey: flagged accounts cannot transfer kudos")
    if target.id == sender.id:
        raise HordeError(400, "KudosTransferToSelf", "username: you cannot transfer to yourself")
    if target.id == ANONYMOUS_USER_ID:
        raise HordeError(400, "KudosTransferToAnon", "username: not to the anonymous user")
    try:
        ledger.transfer(session, sender.id, target.id, body.amount, ref=idempotency_key)
    except ledger.Overdrawn:
        raise HordeError(400, "KudosTransferNotEnough",
                         f"amount: you hold {round(sender.kudos, 2)} kudos") from None
    if idempotency_key is not None:
        session.add(IdempotencyKey(user_id=sender.id, key=idempotency_key,
                                   response={"transferred": body.amount}, created_at=time.time()))
        # A concurrent retry with the same key fails here on the primary key, rolling back
        # its own transfer: the key is spent once.
        session.flush()
    return body.amount
