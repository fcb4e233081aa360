"""The work queue: enqueue, the one claim query, release, finish (compare-and-set), expiry.

The in-cluster dispatcher and `/generate/pop` both claim through `claim()`, so every worker
shares one priority-ordered queue. Each call is a fixed number of statements that read through
the `ix_queue_claim` index: the cost does not grow with the number of waiting generations.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from api.db.models import Generation, ModelStat, QueueEntry, Request
from api.db.session import Database

ANY_MODEL = "*"
G = Generation.__table__
Q = QueueEntry.__table__


def job_ttl(width: int, height: int, steps: int, controlnet: bool = False) -> float:
    """Seconds a claimed job may take before it returns to the queue (the AI Horde's rule)."""
    ttl = max(150.0, 30 + steps * 2 * (width * height / 512**2))
    return ttl * 2 if controlnet else ttl


@dataclass
class Capabilities:
    """What a claimer can run. `models` in order of preference: a request that names no model
    runs on the first."""

    worker_id: str
    models: list[str]
    max_pixels: int = 3072 * 3072


@dataclass
class ClaimedJob:
    generation_id: str
    claim_id: str
    request_id: str
    model: str
    seed: int
    position: int
    prompt: str
    negative_prompt: str
    params: dict
    deadline: float
    attempts: int
    extra: dict = field(default_factory=dict)


def enqueue(session, request: Request, seeds: list[int], models: list[str], priority: float,
            aging_per_second: float) -> list[str]:
    """Insert the generations of a new request and their queue entries: two statements
    whatever `n` and the number of models."""
    now = request.created_at
    gen_ids = [str(uuid.uuid4()) for _ in seeds]
    session.execute(
        G.insert(),
        [
            {"id": gid, "request_id": request.id, "position": i, "state": "waiting",
             "seed": seed, "attempts": 0, "censored": False, "gen_metadata": []}
            for i, (gid, seed) in enumerate(zip(gen_ids, seeds))
        ],
    )
    sort_key = aging_per_second * now - priority
    pixels = request.params["width"] * request.params["height"]
    mps = pixels * request.params["steps"] / 1e6
    session.execute(
        Q.insert(),
        [
            {"generation_id": gid, "model": m, "sort_key": sort_key, "pixels": pixels,
             "megapixelsteps": mps}
            for gid in gen_ids
            for m in (models or [ANY_MODEL])
        ],
    )
    return gen_ids


def claim(db: Database, caps: Capabilities, limit: int, now: float | None = None) -> list[ClaimedJob]:
    """Hand out up to `limit` waiting generations to `caps.worker_id`, best priority first.

    PostgreSQL: candidates are locked with FOR UPDATE SKIP LOCKED so concurrent claimers never
    wait on each other or get the same row. SQLite: the write transaction (BEGIN IMMEDIATE)
    makes the claim single-writer. Three statements: candidates, their requests, the update.
    """
    if not caps.models or limit <= 0:
        return []
    now = time.time() if now is None else now
    with db.write() as session:
        pg = session.bind.dialect.name == "postgresql"
        branches = []
        for model in [*caps.models, ANY_MODEL]:
            branch = (
                select(Q.c.generation_id, Q.c.model, Q.c.sort_key, Q.c.id)
                .join(G, G.c.id == Q.c.generation_id)
                .where(Q.c.model == model, G.c.state == "waiting", Q.c.pixels <= caps.max_pixels)
                .order_by(Q.c.sort_key, Q.c.id)
                .limit(limit)
            )
            if pg:
                branch = branch.with_for_update(of=G, skip_locked=True)
            branches.append(select(branch.subquery()))
        rows = session.execute(branches[0].union_all(*branches[1:])).all()
        chosen: dict[str, str] = {}
        for gen_id, model, _key, _id in sorted(rows, key=lambda r: (r[2], r[3])):
            if gen_id not in chosen:
                chosen[gen_id] = caps.models[0] if model == ANY_MODEL else model
            if len(chosen) == limit:
                break
        if not chosen:
            return []
        info = session.execute(
            select(G.c.id, G.c.seed, G.c.position, G.c.attempts, Request)
            .join(Request.__table__, Request.id == G.c.request_id)
            .where(G.c.id.in_(list(chosen)))
        ).all()
        jobs = []
        for gen_id, seed, position, attempts, req in info:
            p = req.params
            jobs.append(ClaimedJob(
                generation_id=gen_id, claim_id=str(uuid.uuid4()), request_id=req.id,
                model=chosen[gen_id], seed=seed, position=position, prompt=req.prompt,
                negative_prompt=req.negative_prompt, params=p, attempts=attempts + 1,
                deadline=now + job_ttl(p["width"], p["height"], p["steps"]),
            ))
        session.execute(
            update(G)
            .where(G.c.id == bindparam("gid"), G.c.state == "waiting")
            .values(state="processing", model=bindparam("m"), claim_id=bindparam("cid"),
                    claimed_by=caps.worker_id, deadline=bindparam("dl"),
                    attempts=G.c.attempts + 1, started_at=now),
            [{"gid": j.generation_id, "m": j.model, "cid": j.claim_id, "dl": j.deadline}
             for j in jobs],
        )
    jobs.sort(key=lambda j: (j.request_id, j.position))
    return jobs


def _back_to_queue_values(reason: str, max_attempts: int) -> dict:
    from sqlalchemy import case

    give_up = G.c.attempts >= max_attempts
    return {
        "state": case((give_up, "faulted"), else_="waiting"),
        "fault_reason": case((give_up, reason), else_=G.c.fault_reason),
        "model": case((give_up, G.c.model), else_=None),
        "claim_id": None, "claimed_by": None, "deadline": None,
        "finished_at": case((give_up, time.time()), else_=None),
    }


def _drop_entries_of_ended(session, gen_ids: list[str]) -> None:
    if gen_ids:
        ended = select(G.c.id).where(G.c.id.in_(gen_ids), G.c.state != "waiting",
                                     G.c.state != "processing")
        session.execute(delete(Q).where(Q.c.generation_id.in_(ended)))


def release(db: Database, claims: list[tuple[str, str]], reason: str, max_attempts: int) -> int:
    """Hand claimed generations back: to the queue, or `faulted` once they have used up their
    attempts. Only the current claim can release (a stale claimer changes nothing)."""
    if not claims:
        return 0
    with db.write() as session:
        released = []
        for gen_id, claim_id in claims:
            row = session.execute(
                update(G).where(G.c.id == gen_id, G.c.claim_id == claim_id,
                                G.c.state == "processing")
                .values(**_back_to_queue_values(reason, max_attempts)).returning(G.c.id)
            ).first()
            if row:
                released.append(gen_id)
        _drop_entries_of_ended(session, released)
    return len(released)


def expire(db: Database, max_attempts: int, now: float | None = None,
           worker_id: str | None = None) -> int:
    """Return claims past their deadline (or every claim of `worker_id`, whose in-flight work is
    known to be lost) to the queue. Reads through ix_generations_state_deadline."""
    now = time.time() if now is None else now
    with db.write() as session:
        cond = [G.c.state == "processing"]
        cond.append(G.c.claimed_by == worker_id if worker_id else G.c.deadline < now)
        reason = "worker lost the job" if worker_id else "job expired"
        ids = [r[0] for r in session.execute(
            update(G).where(*cond).values(**_back_to_queue_values(reason, max_attempts))
            .returning(G.c.id)
        ).all()]
        _drop_entries_of_ended(session, ids)
    return len(ids)


@dataclass
class Result:
    generation_id: str
    claim_id: str
    storage_key: str
    seed: int
    worker_id: str
    worker_name: str
    censored: bool = False
    gen_metadata: list = field(default_factory=list)


def finish(db: Database, results: list[Result], now: float | None = None) -> list[str]:
    """Record results exactly once: only the current claim of a processing generation can
    finish it; a late or second submit finds nothing to update. Returns the ids recorded."""
    now = time.time() if now is None else now
    done: list[tuple[str, str, float]] = []
    with db.write() as session:
        for r in results:
            row = session.execute(
                update(G)
                .where(G.c.id == r.generation_id, G.c.claim_id == r.claim_id,
                       G.c.state == "processing")
                .values(state="done", storage_key=r.storage_key, finished_at=now,
                        seed=r.seed, worker_id=r.worker_id, worker_name=r.worker_name,
                        censored=r.censored, gen_metadata=r.gen_metadata, claim_id=None,
                        deadline=None)
                .returning(G.c.id, G.c.model, G.c.started_at)
            ).first()
            if row:
                done.append((row[0], row[1], now - (row[2] or now)))
        if done:
            session.execute(delete(Q).where(Q.c.generation_id.in_([d[0] for d in done])))
            _record_speed(session, done, now)
    return [d[0] for d in done]


def _record_speed(session, done: list[tuple[str, str, float]], now: float) -> None:
    """Fold finished generations into the per-model speed averages used by `wait_time`."""
    by_model: dict[str, list[float]] = {}
    for _id, model, seconds in done:
        by_model.setdefault(model, []).append(seconds)
    dialect = session.bind.dialect.name
    ins = pg_insert if dialect == "postgresql" else sqlite_insert
    S = ModelStat.__table__
    for model, secs in sorted(by_model.items()):
        avg = sum(secs) / len(secs)
        # The interval between completions, per image; capped by the time one image takes, so
        # a long idle gap does not make the next estimate absurd.
        stmt = ins(S).values(model=model, ewma_seconds=avg, ewma_interval=avg,
                             last_finished=now, completed=len(secs))
        interval = func.min(
            (now - S.c.last_finished) / len(secs), S.c.ewma_seconds
        ) if dialect == "sqlite" else func.least((now - S.c.last_finished) / len(secs),
                                                 S.c.ewma_seconds)
        session.execute(stmt.on_conflict_do_update(
            index_elements=[S.c.model],
            set_={
                "ewma_seconds": S.c.ewma_seconds * 0.8 + avg * 0.2,
                "ewma_interval": S.c.ewma_interval * 0.8 + interval * 0.2,
                "last_finished": now,
                "completed": S.c.completed + len(secs),
            },
        ))
