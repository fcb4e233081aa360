"""The alchemy queue: interrogation forms claimed, finished (compare-and-set, charged once),
released and expired, the way api/db/queue.py does it for generations. The cluster's alchemy
loop and `/interrogate/pop` both claim through `claim_in`, so both share one priority order.

Trust, as for generations: a form an untrusted worker faulted, dropped or flagged goes back to
the queue and never to a worker of that owner again; it fails only when the cluster's own
runner or `max_attempts` distinct owners have failed it (queue.tally_fault), and the drops
count toward the worker's horde-imposed maintenance (queue.count_drops)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from sqlalchemy import or_, select, update

from api import ledger
from api.alchemy.protocol import FORM_TTL
from api.db import queue as generations
from api.db.models import Interrogation, InterrogationForm, Worker

F = InterrogationForm.__table__
I = Interrogation.__table__  # noqa: E741
W = Worker.__table__
LIVE = ("waiting", "processing")


@dataclass
class FormClaimer:
    """Who claims and what it takes: form names, at most `max_tiles` per post-processor."""

    worker_id: str
    forms: list[str]
    max_tiles: int = 256
    trusted: bool = False
    slow: bool = False
    priority_user_ids: tuple[int, ...] = ()
    owner_id: int = -1  # forms its owner's workers failed are not its to claim


@dataclass
class ClaimedForm:
    form_id: str
    claim_id: str
    interrogation_id: str
    name: str
    payload: dict | None
    source_image_key: str
    width: int
    height: int
    deadline: float
    user_id: int


def claim_in(session, claimer: FormClaimer, limit: int, now: float) -> list[ClaimedForm]:
    """Up to `limit` waiting forms `claimer` may run: its priority users first, then by sort key
    (priority raised by aging, then age). PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: the write
    transaction is single-writer. Two statements."""
    if not claimer.forms or limit <= 0:
        return []
    where = [F.c.state == "waiting", F.c.name.in_(claimer.forms),
             or_(F.c.name.in_(("caption", "interrogation", "nsfw")), F.c.tiles <= claimer.max_tiles),
             ~F.c.faulted_owners.contains(f",{claimer.owner_id},", autoescape=True)]
    if not claimer.trusted:
        where.append(F.c.trusted_only == False)  # noqa: E712
    if claimer.slow:
        where.append(F.c.slow_ok == True)  # noqa: E712
    order = [F.c.sort_key, F.c.id]
    if claimer.priority_user_ids:
        order.insert(0, case((F.c.user_id.in_(claimer.priority_user_ids), 0), else_=1))
    stmt = (select(F.c.id, F.c.interrogation_id, F.c.name, F.c.payload, F.c.user_id,
                   I.c.source_image_key, I.c.width, I.c.height)
            .join(I, I.c.id == F.c.interrogation_id).where(*where)
            .order_by(*order).limit(limit))
    if session.bind.dialect.name == "postgresql":
        stmt = stmt.with_for_update(of=F, skip_locked=True)
    claimed = [ClaimedForm(form_id=r.id, claim_id=str(uuid.uuid4()), interrogation_id=r.interrogation_id,
                           name=r.name, payload=r.payload, source_image_key=r.source_image_key,
                           width=r.width, height=r.height, deadline=now + FORM_TTL, user_id=r.user_id)
               for r in session.execute(stmt).all()]
    for c in claimed:
        session.execute(update(F).where(F.c.id == c.form_id, F.c.state == "waiting").values(
            state="processing", claim_id=c.claim_id, claimed_by=claimer.worker_id,
            deadline=c.deadline, started_at=now, attempts=F.c.attempts + 1))
    return claimed


def skipped_in(session, claimer: FormClaimer) -> dict[str, int]:
    """Why an empty pop got nothing, as horde-sdk counts it: forms waiting for a trusted worker."""
    if claimer.trusted:
        return {}
    n = session.execute(select(F.c.id).where(F.c.state == "waiting", F.c.name.in_(claimer.forms),
                                             F.c.trusted_only == True).limit(100)).all()  # noqa: E712
    return {"untrusted": len(n)} if n else {}


def finish_in(session, form_id: str, claim_id: str, *, result: dict | None, result_key: str | None,
              worker_id: str, worker_name: str, owner_id: int, now: float) -> float | None:
    """Record a form's result exactly once (only its current claim can), and in the same
    transaction charge the requester the form's kudos and credit the worker's owner. Returns
    the reward, or None when the claim no longer holds the form."""
    row = session.execute(
        update(F).where(F.c.id == form_id, F.c.claim_id == claim_id, F.c.state == "processing")
        .values(state="done", result=result, result_key=result_key, finished_at=now,
                worker_id=worker_id, worker_name=worker_name, claim_id=None, deadline=None)
        .returning(F.c.kudos, F.c.user_id, F.c.started_at)).first()
    if row is None:
        return None
    kudos, user_id, started = row
    ledger.record(session, [(user_id, -kudos, "alchemy"), (owner_id, kudos, "reward")],
                  ref=form_id, now=now)
    session.execute(update(W).where(W.c.id == worker_id).values(
        jobs_done=W.c.jobs_done + 1, kudos_earned=W.c.kudos_earned + kudos,
        seconds_working=W.c.seconds_working + (now - (started or now)), consecutive_drops=0,
        # Work for someone else earns the uptime bonus (api/workers.py worker_for_pop).
        **({"last_job_at": now} if user_id != owner_id else {})))
    return kudos


def _held(session, *where) -> list[tuple]:
    stmt = (select(F.c.id, F.c.claim_id, F.c.failures, F.c.faulted_owners, W.c.id, W.c.kind,
                   W.c.owner_id).select_from(F.outerjoin(W, W.c.id == F.c.claimed_by))
            .where(F.c.state == "processing", *where))
    if session.bind.dialect.name == "postgresql":
        stmt = stmt.with_for_update(of=F, skip_locked=True)
    return session.execute(stmt).all()


def _hand_back(session, held: list[tuple], reason: str, max_attempts: int, now: float,
               max_consecutive_drops: int | None, maintenance_seconds: float) -> int:
    drops = []
    for form_id, claim_id, failures, owners, holder, kind, owner in held:
        trusted = kind in (None, "cluster")
        failures, listed, give_up = generations.tally_fault(failures, owners, trusted, owner,
                                                            max_attempts)
        session.execute(update(F).where(F.c.id == form_id, F.c.claim_id == claim_id,
                                        F.c.state == "processing").values(
            state="faulted" if give_up else "waiting",
            fault_reason=reason[:500] if give_up else F.c.fault_reason,
            finished_at=now if give_up else None, claim_id=None, claimed_by=None, deadline=None,
            failures=failures, faulted_owners=listed))
        if not trusted and holder:
            drops.append(holder)
    if max_consecutive_drops and drops:
        generations.count_drops(session, drops, max_consecutive_drops, maintenance_seconds, now)
    return len(held)


def release_in(session, claims: list[tuple[str, str]], reason: str, max_attempts: int,
               max_consecutive_drops: int | None = None, maintenance_seconds: float = 0.0,
               now: float | None = None) -> int:
    """Hand claimed forms back to the queue (see the module's docstring); a stale claim
    changes nothing."""
    now = time.time() if now is None else now
    wanted = dict(claims)
    held = [h for h in _held(session, F.c.id.in_(list(wanted))) if wanted.get(h[0]) == h[1]]
    return _hand_back(session, held, reason, max_attempts, now, max_consecutive_drops,
                      maintenance_seconds)


def fault_in(session, claims: list[tuple[str, str]], reason: str) -> int:
    """End claimed forms as faulted at once: input the cluster's own runner refused, which no
    attempt can run. Nothing is charged. Never for a worker's word (release_in)."""
    n = 0
    for form_id, claim_id in claims:
        n += session.execute(update(F).where(F.c.id == form_id, F.c.claim_id == claim_id,
                                             F.c.state == "processing")
                             .values(state="faulted", fault_reason=reason[:500], claim_id=None,
                                     claimed_by=None, deadline=None, finished_at=time.time())).rowcount
    return n


def expire(db, max_attempts: int, now: float | None = None, worker_id: str | None = None,
           max_consecutive_drops: int | None = None, maintenance_seconds: float = 0.0) -> int:
    """Forms past their deadline (or all held by `worker_id`, whose work is lost) go back;
    deadline expiries count as drops against untrusted workers."""
    now = time.time() if now is None else now
    with db.write() as session:
        held = _held(session, F.c.claimed_by == worker_id if worker_id else F.c.deadline < now)
        return _hand_back(session, held, "worker lost the form" if worker_id else "form expired",
                          max_attempts, now, None if worker_id else max_consecutive_drops,
                          maintenance_seconds)


def ended_sources(db, limit: int = 100) -> list[tuple[str, str]]:
    """(interrogation id, source key) of interrogations with no form left to run."""
    live = select(F.c.id).where(F.c.interrogation_id == I.c.id, F.c.state.in_(LIVE)).exists()
    with db.read() as session:
        return [tuple(r) for r in session.execute(
            select(I.c.id, I.c.source_image_key)
            .where(I.c.source_image_key.is_not(None), ~live).limit(limit)).all()]


def delete_ended_sources(db, storage) -> int:
    """Delete the stored sources of ended interrogations, then forget their keys."""
    ended = ended_sources(db)
    for _, key in ended:
        if storage.exists(key):
            storage.delete(key)
    if ended:
        with db.write() as session:
            session.execute(update(I).where(I.c.id.in_([i for i, _ in ended]))
                            .values(source_image_key=None))
    return len(ended)
