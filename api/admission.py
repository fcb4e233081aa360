"""What every kind of request passes before it is queued (images, horde text, OpenAI): the
requester's concurrency cap, the workers it names, its place in the queue."""

from __future__ import annotations

from sqlalchemy import Integer, bindparam, func, literal_column, select, text

from api.auth import ANONYMOUS_USER_ID
from api.db.models import Generation, User, Worker
from api.errors import HordeError
from api.kudos import head_start_seconds


def _unfinished_statement():
    """check_capacity's statement, built once and run with its values bound (building it
    cost more than running it). The states are written out, not bound: SQLAlchemy would
    expand a bound IN list again on every call."""
    G = Generation.__table__.c
    unfinished = (select((G.kudos + G.tax).label("owed"))
                  .where(G.requester == bindparam("requester"),
                         G.state.in_([literal_column("'waiting'"), literal_column("'processing'")]))
                  .limit(bindparam("cap", type_=Integer)).subquery())
    return (select(func.count(), func.coalesce(func.sum(unfinished.c.owed), 0.0))
            .select_from(unfinished))


UNFINISHED = _unfinished_statement()
# A transaction-scoped lock per requester (its own namespace of advisory locks, 0x7277 "rw").
CAPACITY_LOCK = text("SELECT pg_advisory_xact_lock(29303, hashtext(:requester))")


def check_capacity(ctx, session, user: User, requester: str, n: int) -> float:
    """Refuse (429 TooManyPrompts) when `n` more generations would take the requester over
    its cap. Returns what its unfinished generations will cost it (their kudos and tax
    shares): kudos its balance already owes. One statement, reading at most cap + 1 of its
    generations (when there are more, the request is refused and the sum is not needed)."""
    s = ctx.settings
    cap = s.max_waiting_education if user.education else s.max_waiting_per_user
    if session.bind.dialect.name == "postgresql":
        # One requester's submits count one after the other: two at once would both count
        # what was queued before either and pass the cap together. (SQLite's write
        # transactions already run one at a time.) Held to the end of the transaction.
        session.execute(CAPACITY_LOCK, {"requester": requester})
    active, owed = session.execute(UNFINISHED, {"requester": requester, "cap": cap + 1}).one()
    if active + n > cap:
        raise HordeError(429, "TooManyPrompts",
                         f"params.n: {active} of your generations are already queued and you "
                         f"may have at most {cap}; wait for some to finish")
    return float(owed)


def lock_balance(session, user: User) -> float:
    """`user`'s balance, read afresh with its row locked to the end of the transaction, so a
    user's requests that need kudos upfront are checked one after the other and cannot both
    count the same kudos. One statement on PostgreSQL; none on SQLite, whose write
    transaction is already one at a time (and `user` was read inside it)."""
    if session.bind.dialect.name != "postgresql":
        return user.kudos
    return session.execute(select(User.kudos).where(User.id == user.id).with_for_update()
                           ).scalar_one()


def check_workers(session, workers: list[str]) -> None:
    """The workers a request names must exist (one statement, only when it names some)."""
    if workers:
        known = set(session.execute(select(Worker.id).where(Worker.id.in_(workers))).scalars())
        unknown = [w for w in workers if w not in known]
        if unknown:
            raise HordeError(400, "WorkerNotFound", f"workers: no worker with id {unknown[0]}")


def target_mode(workers: list[str], blacklist: bool) -> int:
    """queue_entries.target_mode for a request's `workers` and `worker_blacklist`."""
    return (2 if blacklist else 1) if workers else 0


def head_start(ctx, user: User) -> float:
    s = ctx.settings
    return head_start_seconds(user.kudos, user.id == ANONYMOUS_USER_ID,
                              s.seconds_per_kudos_decade, s.anonymous_penalty_seconds)
