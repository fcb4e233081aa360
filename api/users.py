"""Users and kudos: details, moderator changes, transfers. The routes stay thin; the rules live
here. Every kudos movement goes through api/ledger.py."""

from __future__ import annotations

import time

from sqlalchemy import select

from api import ledger
from api.auth import ANONYMOUS_USER_ID
from api.db.models import Generation, IdempotencyKey, ROLES, User, Worker
from api.errors import HordeError
from api.images import Context
from api.user_schemas import (
    ActiveGenerations,
    AmountRecords,
    ContributionsDetails,
    KudosDetails,
    KudosTransferInput,
    MAX_USER_ID,
    ThingRecords,
    UsageDetails,
    UserDetails,
    UserModify,
    UserModifyResponse,
    UserRecords,
)

PAGE_SIZE = 25


def alias(user: User) -> str:
    return f"{user.username}#{user.id}"


def concurrency(ctx: Context, user: User) -> int:
    s = ctx.settings
    return s.max_waiting_education if user.education else s.max_waiting_per_user


def details(ctx: Context, session, user: User, private: bool) -> UserDetails:
    """A user's record; `private` (the user itself or a moderator) adds contact details and
    the generations it has in the queue. At most two statements."""
    return details_of(ctx, session, [user], private)[0]


def details_of(ctx: Context, session, page: list[User], private: bool) -> list[UserDetails]:
    """The records of `page` (a page of /users, or one user), read from the users' own
    counters (api/ledger.py keeps them with every movement and finished generation) and their
    workers' counters: one statement for the workers of the whole page, one more for a private
    record's queued generations. Nothing here reads the ledger or the finished generations,
    so a call costs the same whatever the history."""
    workers: dict[int, list] = {u.id: [] for u in page}
    if page:
        for w in session.execute(
                select(Worker.owner_id, Worker.id, Worker.type, Worker.jobs_done,
                       Worker.megapixelsteps_done, Worker.tokens_generated)
                .where(Worker.owner_id.in_(list(workers))).order_by(Worker.created_at, Worker.id)):
            workers[w.owner_id].append(w)
    return [_record(ctx, session, u, workers[u.id], private) for u in page]


def _record(ctx: Context, session, user: User, workers: list, private: bool) -> UserDetails:
    active = None
    if private and user.id != ANONYMOUS_USER_ID:
        active = ActiveGenerations(image=list(session.execute(
            select(Generation.id).where(Generation.requester == f"u:{user.id}",
                                        Generation.state.in_(("waiting", "processing")))
            .limit(200)).scalars()))
    fulfilled = {kind: sum(w.jobs_done for w in workers if w.type == kind)
                 for kind in ("image", "text", "interrogation")}
    contributed_mps = round(sum(w.megapixelsteps_done for w in workers), 2)
    return UserDetails(
        id=user.id, username=alias(user), kudos=round(user.kudos, 2),
        concurrency=concurrency(ctx, user), worker_count=len(workers),
        worker_ids=[w.id for w in workers], account_age=int(time.time() - user.created_at),
        pseudonymous=user.id == ANONYMOUS_USER_ID, contact=user.contact if private else None,
        **{role: getattr(user, role) for role in ROLES},
        kudos_details=KudosDetails(
            accumulated=round(user.kudos_accumulated, 2), gifted=round(user.kudos_gifted, 2),
            received=round(user.kudos_received, 2), awarded=round(user.kudos_awarded, 2),
            admin=round(user.kudos_admin, 2)),
        # Generations finished for the user, as the AI Horde counts `usage.requests`.
        usage=UsageDetails(requests=user.usage_requests,
                           megapixelsteps=round(user.usage_megapixelsteps, 2)),
        contributions=ContributionsDetails(fulfillments=sum(fulfilled.values()),
                                           megapixelsteps=contributed_mps),
        records=UserRecords(
            usage=ThingRecords(megapixelsteps=round(user.usage_megapixelsteps, 2),
                               tokens=user.usage_tokens),
            contribution=ThingRecords(megapixelsteps=contributed_mps,
                                      tokens=sum(w.tokens_generated for w in workers)),
            fulfillment=AmountRecords(**fulfilled)),
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
