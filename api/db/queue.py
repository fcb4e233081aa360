"""The work queue: enqueue, the one claim query, release, finish (compare-and-set), expiry.

The in-cluster dispatcher and `/generate/pop` both claim through `claim()`, so every worker
shares one priority-ordered queue. The rules that decide whether a worker may take a queued
generation are written once, as SQL conditions (`_rules`): `claim()` requires all of them,
and an empty pop's `skipped` counts which rule stopped each of the first waiting generations.
Each call is a fixed number of statements that read through the queue's indexes: the cost does
not grow with the number of waiting generations. A claim's statement is built once per shape
of claimer (_Shape) and cached; the models, blacklist words and priority users it is given are
bound as one list parameter each (a PostgreSQL array walked with a LATERAL look-up per model;
on SQLite a JSON array read by json_each), so its cost is linear in the models offered and its
text never holds a worker's words.

Trust: a hand-back (fault, drop, expiry) from an untrusted worker excludes its owner from that
generation and counts once per owner; only the cluster's own replicas' failures count each
time (tally_fault). Pay (finish_in, _payments): the requester pays what the generation earned
(for text, scaled by the tokens delivered) plus its tax; only the horde's own safety check
makes the horde pay instead.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from enum import IntFlag

from sqlalchemy import (
    Double,
    Integer,
    Text,
    and_,
    any_,
    bindparam,
    case,
    delete,
    exists,
    func,
    literal,
    not_,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from api import ledger
from api.db.models import UNCLAIMED, Generation, ModelStat, QueueEntry, Request, Worker
from api.db.session import Database

ANY_MODEL = "*"
G = Generation.__table__
Q = QueueEntry.__table__
R = Request.__table__
W = Worker.__table__
SKIPPED_SAMPLE = 100  # waiting generations an empty pop looks at to fill `skipped`


class Feature(IntFlag):
    """What a request needs of a worker beyond a model (the pop's `allow_*` flags)."""

    SOURCE_IMAGE = 1
    PAINTING = 2
    POST_PROCESSING = 4
    CONTROLNET = 8
    SDXL_CONTROLNET = 16
    LORA = 32
    CHAT = 64  # a chat (messages) text request: the cluster's own deployment renders it


ALL_FEATURES = int(sum(Feature))
# The name each missing feature is counted under in a pop's `skipped`.
FEATURE_SKIP_REASON = {Feature.SOURCE_IMAGE: "img2img", Feature.PAINTING: "painting",
                       Feature.POST_PROCESSING: "post-processing",
                       Feature.CONTROLNET: "controlnet", Feature.SDXL_CONTROLNET: "controlnet",
                       Feature.LORA: "lora", Feature.CHAT: "models"}


TEXT_TTL = 150


def job_ttl(width: int, height: int, steps: int, controlnet: bool = False) -> int:
    """Seconds a claimed image job may take before it returns to the queue (the AI Horde's
    rule; a text job has TEXT_TTL)."""
    ttl = max(150.0, 30 + steps * 2 * (width * height / 512**2))
    return int(ttl * 2 if controlnet else ttl)


@dataclass
class Capabilities:
    """What a claimer can and will run. `models` in order of preference: a request that names
    no model runs on `any_model` (default: the first of `models`); an empty `any_model` takes
    no such requests (a worker whose models only inpaint)."""

    worker_id: str
    models: list[str]
    any_model: str | None = None
    owner_id: int = -1  # the worker's owner (-1: none, the cluster's own)
    kind: str = "image"  # "text": text jobs only
    max_pixels: int = 3072 * 3072
    max_length: int = 0  # text workers: the most tokens it generates ...
    max_context_length: int = 0  # ... and the longest context it takes
    nsfw: bool = True
    trusted: bool = False
    slow: bool = False  # measured slower than the `slow_workers: false` requests accept
    extra_slow: bool = False  # declared extra slow: only requests that opt in
    require_upfront_kudos: bool = False
    max_steps: int | None = None
    features: int = ALL_FEATURES
    blacklist: tuple[str, ...] = ()  # words that make it skip a prompt
    priority_user_ids: tuple[int, ...] = ()  # served first, whatever their place


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
    ttl: int
    attempts: int
    kudos: float
    user_id: int
    nsfw: bool
    censor_nsfw: bool
    r2: bool
    shared: bool
    kind: str = "image"
    source_processing: str | None = None  # image requests with a source image
    source_image_key: str | None = None
    source_mask_key: str | None = None
    extra_sources: list | None = None  # remix: [{key, strength}]
    submitted_at: float | None = None  # when its request was submitted (claim latency)


@dataclass
class EntryFilters:
    """A request's answers to the rules, written on each of its queue entries."""

    user_id: int
    steps: int = 0
    kind: str = "image"
    pixels: int = 0
    megapixelsteps: float = 0.0
    max_length: int = 0  # text
    max_context_length: int = 0  # text
    nsfw: bool = False
    trusted_only: bool = False
    slow_ok: bool = True
    extra_slow_ok: bool = False
    upfront: bool = False
    features: int = 0
    target_mode: int = 0  # 0 any worker, 1 only `target_workers`, 2 all but them
    target_workers: tuple[str, ...] = ()


def enqueue(session, request: Request, seeds: list[int], models: list[str], sort_key: float,
            filters: EntryFilters, reward: float, tax: float) -> list[str]:
    """Insert the generations of a new request and their queue entries: two statements
    whatever `n` and the number of models. `reward` and `tax` are per generation."""
    gen_ids = [str(uuid.uuid4()) for _ in seeds]
    mps = filters.megapixelsteps
    _insert(session, G, [
        {"id": gid, "request_id": request.id, "position": i, "state": "waiting", "seed": seed,
         "attempts": 0, "censored": False, "gen_metadata": [], "requester": request.requester,
         "user_id": request.user_id, "kudos": reward, "tax": tax, "megapixelsteps": mps}
        for i, (gid, seed) in enumerate(zip(gen_ids, seeds))
    ])
    common = {
        "sort_key": sort_key, "pixels": filters.pixels, "megapixelsteps": mps,
        "steps": filters.steps, "kind": filters.kind, "max_length": filters.max_length,
        "max_context_length": filters.max_context_length, "user_id": filters.user_id, "nsfw": filters.nsfw,
        "trusted_only": filters.trusted_only, "slow_ok": filters.slow_ok,
        "extra_slow_ok": filters.extra_slow_ok, "upfront": filters.upfront,
        "features": filters.features, "target_mode": filters.target_mode,
        "target_workers": ",".join(filters.target_workers),
    }
    _insert(session, Q, [{"generation_id": gid, "model": m, **common}
                         for gid in gen_ids for m in (models or [ANY_MODEL])])
    return gen_ids


def _insert(session, table, rows: list[dict]) -> None:
    _execute_rows(session, _INSERTS[table.name], rows)


_INSERTS = {table.name: table.insert() for table in (G, Q)}  # built once


def _execute_rows(session, statement, rows: list[dict]) -> None:
    """`statement` once per row of values: a single row (nearly every submit and claim) as one
    execute, since executemany costs psycopg a pipeline, more than the statement of one row;
    more as one executemany."""
    session.execute(statement, rows if len(rows) > 1 else rows[0])


@dataclass(frozen=True)
class _Shape:
    """What decides the text of a claimer's statements; every other part of its capabilities
    (its models, blacklist, priority users, ids and limits) is a bound value. Workers that
    differ only in those share one statement, built once: its text no longer grows with the
    models or words a worker offers, and neither does the number of bound parameters (each
    list is one parameter: a PostgreSQL array, or a JSON array SQLite reads with json_each)."""

    kind: str
    nsfw: bool
    trusted: bool
    slow: bool
    extra_slow: bool
    upfront: bool
    max_steps: bool
    blacklist: bool
    priority: bool
    missing: int  # the Feature bits the claimer lacks
    pg: bool


def _shape(caps: Capabilities, pg: bool) -> _Shape:
    return _Shape(kind=caps.kind, nsfw=caps.nsfw, trusted=caps.trusted, slow=caps.slow,
                  extra_slow=caps.extra_slow, upfront=caps.require_upfront_kudos,
                  max_steps=caps.max_steps is not None, blacklist=bool(caps.blacklist),
                  priority=bool(caps.priority_user_ids),
                  missing=int(sum(f for f in Feature if not caps.features & f)), pg=pg)


def _offered_models(caps: Capabilities) -> list[str]:
    """The queue entries' models a claimer reads: its models, and '*' (requests naming no
    model) when it runs such requests."""
    return [*caps.models, ANY_MODEL] if _any_model(caps) else list(caps.models)


def _params(caps: Capabilities, limit: int, pg: bool) -> dict:
    """The values a claimer's statements bind (see _Shape)."""
    def listed(values):
        return list(values) if pg else json.dumps(list(values))

    return {
        "models": listed(_offered_models(caps)), "words": listed(w.lower() for w in caps.blacklist),
        "priority_users": listed(caps.priority_user_ids),
        "worker_like": f"%{caps.worker_id}%", "owner_like": f"%,{caps.owner_id},%",
        "max_pixels": caps.max_pixels, "max_steps": caps.max_steps or 0,
        "max_length": caps.max_length, "max_context_length": caps.max_context_length,
        "lim": limit,
    }


def _values(name: str, pg: bool, type_=Text):
    return _list_table(name, pg, type_)


@lru_cache(maxsize=None)
def _list_table(name: str, pg: bool, type_):
    """A bound list as a table of one column `value`: unnest() of an array on PostgreSQL;
    on SQLite json_each() of a JSON array, read once per statement into a materialized CTE
    (json_each in a condition would parse the JSON again for every row it is tested on).
    One object per list: each statement names it once."""
    if pg:
        return (func.unnest(bindparam(name, type_=ARRAY(type_))).table_valued("value")
                .render_derived(name=name))
    each = func.json_each(bindparam(name, type_=Text)).table_valued("value")
    return select(each.c.value).cte(name).prefix_with("MATERIALIZED")


def _in_values(column, name: str, pg: bool, type_=Text):
    """`column` is one of the bound list `name`."""
    if pg:
        return column == any_(bindparam(name, type_=ARRAY(type_)))
    values = _values(name, pg, type_)
    return column.in_(select(values.c.value))


def _rules(shape: _Shape, features_at_once: bool = False) -> list[tuple[str, object]]:
    """(skip reason, SQL condition a queue entry must meet for this claimer), in the order the
    AI Horde reports them. Written against Q (queue_entries) and R (requests), with the
    claimer's values bound (_params). `features_at_once`: the features the claimer lacks in
    one rule, not one rule each (the same condition: a request may need none of them), for
    the claim, which needs no reasons: its statement then stays short enough for psycopg to
    cache its conversion (4 kB), which it otherwise parses again on every pop."""
    listed = Q.c.target_workers.like(bindparam("worker_like"))
    rules: list[tuple[str, object]] = [
        ("models", and_(_in_values(Q.c.model, "models", shape.pg), Q.c.kind == shape.kind)),
        ("worker_id", and_(or_(Q.c.target_mode == 0, and_(Q.c.target_mode == 1, listed),
                               and_(Q.c.target_mode == 2, not_(listed))),
                           # A generation goes back to no owner whose worker faulted or dropped it.
                           not_(Q.c.excluded_owners.like(bindparam("owner_like"))))),
        ("max_pixels", Q.c.pixels <= bindparam("max_pixels")),
        ("step_count", Q.c.steps <= bindparam("max_steps") if shape.max_steps else true()),
        ("nsfw", true() if shape.nsfw else Q.c.nsfw == False),  # noqa: E712
        ("untrusted", true() if shape.trusted else Q.c.trusted_only == False),  # noqa: E712
        ("performance", and_(true() if not shape.slow else Q.c.slow_ok == True,  # noqa: E712
                             true() if not shape.extra_slow else Q.c.extra_slow_ok == True)),  # noqa: E712
        ("kudos", true() if not shape.upfront else Q.c.upfront == True),  # noqa: E712
        ("blacklist", not_(_blacklisted(shape)) if shape.blacklist else true()),
    ]
    if shape.kind == "text":
        rules += [("max_context_length", Q.c.max_context_length <= bindparam("max_context_length")),
                  ("max_length", Q.c.max_length <= bindparam("max_length"))]
    # `features = 0 OR ...`: PostgreSQL cannot estimate a bitwise test, and taking it for a
    # rare match it would scan and sort the whole queue instead of reading the index in order;
    # `features = 0` (nearly every request) it estimates from its stats.
    missing = [feature for feature in Feature if shape.missing & feature]
    if features_at_once and missing:
        return rules + [("features", or_(Q.c.features == 0,
                                         Q.c.features.op("&")(shape.missing) == 0))]
    return rules + [(FEATURE_SKIP_REASON[feature],
                     or_(Q.c.features == 0, Q.c.features.op("&")(int(feature)) == 0))
                    for feature in missing]


def _blacklisted(shape: _Shape):
    """The request's prompt holds one of the claimer's words (bound as one list, lowercased):
    one condition whatever the number of words, out of the statement's text."""
    words = _values("words", shape.pg)
    found = (func.strpos(func.lower(R.c.prompt), words.c.value) if shape.pg
             else func.instr(func.lower(R.c.prompt), words.c.value))
    return exists(select(literal(1)).select_from(words).where(found > 0))


def _any_model(caps: Capabilities) -> str | None:
    """The model a claimer runs requests that name none on (None: it takes none)."""
    if caps.any_model is not None:
        return caps.any_model or None
    return caps.models[0] if caps.models else None


# What a claim reads of each candidate's request and generation, after the candidates are
# chosen (the branches select only queue columns: the statement stays short enough for
# psycopg to cache its conversion, and each branch reads no more than it sorts on).
_GENERATION_COLUMNS = (G.c.seed, G.c.position, G.c.attempts, G.c.kudos, R.c.id, R.c.prompt,
                       R.c.negative_prompt, R.c.params, R.c.user_id, R.c.nsfw, R.c.censor_nsfw,
                       R.c.r2, R.c.shared)
_SOURCE_COLUMNS = (R.c.source_processing, R.c.source_image_key, R.c.source_mask_key,
                   R.c.extra_sources, R.c.created_at)


def claim(db: Database, caps: Capabilities, limit: int, now: float | None = None,
          one_request: bool = False) -> list[ClaimedJob]:
    """Hand out up to `limit` waiting generations that `caps` may run, best first: the
    claimer's priority users, then by sort key (priority raised by aging, then age).
    `one_request`: only a batch one pipeline call can make (see claim_in)."""
    if not _has_candidates(db, caps):
        return []
    with db.write() as session:
        return claim_in(session, caps, limit, time.time() if now is None else now, one_request)


def _has_candidates(db: Database, caps: Capabilities) -> bool:
    """Whether `caps` would find anything, read outside a write transaction. The dispatcher
    claims for every family with room each time it wakes, and most of those claims find
    nothing. On SQLite, whose one writer at a time every write transaction waits for, they
    took the write lock to find nothing while submits queued behind them; a read runs beside
    the writer. On PostgreSQL it is one autocommit statement instead of a transaction of
    three round trips (BEGIN, the locking read, COMMIT)."""
    if not caps.models:
        return False
    with db.read() as session:
        pg = session.bind.dialect.name == "postgresql"
        statement = _claim_statement(_shape(caps, pg), lock=False)
        return session.execute(statement, _params(caps, 1, pg)).first() is not None


@lru_cache(maxsize=256)
def _claim_statement(shape: _Shape, lock: bool = True):
    """The claim's candidate query for claimers of one shape: for each model offered (a row
    of the bound list), the first `lim` entries of that model's queue that the claimer may
    run, read in order from ix_queue_claim, and the first `lim` of its priority users' (read
    from ix_queue_user). Its cost follows the number of models offered, once each. `lock`:
    candidates are locked FOR UPDATE SKIP LOCKED on PostgreSQL (so concurrent claimers never
    wait on each other or get the same row)."""
    # Each branch reads one model's entries (or, for the priority users, checks the model):
    # the models rule is not repeated in every branch, whose cost would grow as models^2.
    conditions = [Q.c.kind == shape.kind, *(cond for name, cond in _rules(
        shape, features_at_once=True) if name != "models")]
    models = _values("models", shape.pg)

    def candidates(*where):
        stmt = select(Q.c.id).join(G, G.c.id == Q.c.generation_id)
        if shape.blacklist:  # the only rule that reads the request (its prompt)
            stmt = stmt.join(R, R.c.id == G.c.request_id)
        stmt = (stmt.where(UNCLAIMED, G.c.state == "waiting", *where, *conditions)
                .order_by(Q.c.sort_key, Q.c.id).limit(bindparam("lim", type_=Integer)))
        if shape.pg and lock:
            stmt = stmt.with_for_update(of=G, skip_locked=True)
        return stmt

    if shape.pg:  # a LATERAL look-up per model
        per_model = candidates(Q.c.model == models.c.value).add_columns(
            Q.c.generation_id, Q.c.model, Q.c.sort_key, Q.c.kind).lateral("per_model")
        branches = [select(literal(1).label("tier"), per_model.c.generation_id,
                           per_model.c.model, per_model.c.sort_key, per_model.c.id,
                           per_model.c.kind).select_from(models).join(per_model, true())]
    else:  # SQLite has no LATERAL: a correlated IN, evaluated once per model
        entry = Q.alias("entry")
        ids = candidates(Q.c.model == models.c.value)
        branches = [select(literal(1).label("tier"), entry.c.generation_id, entry.c.model,
                           entry.c.sort_key, entry.c.id, entry.c.kind)
                    .select_from(models).join(entry, entry.c.id.in_(ids))]
    if shape.priority:
        prio = candidates(_in_values(Q.c.user_id, "priority_users", shape.pg, Integer),
                          _in_values(Q.c.model, "models", shape.pg))
        prio = prio.add_columns(Q.c.generation_id, Q.c.model, Q.c.sort_key, Q.c.kind).subquery()
        branches.insert(0, select(literal(0).label("tier"), prio.c.generation_id, prio.c.model,
                                  prio.c.sort_key, prio.c.id, prio.c.kind))
    cand = (branches[0].union_all(*branches[1:]) if len(branches) > 1 else branches[0]).subquery()
    return (select(cand.c.tier, cand.c.generation_id, cand.c.model, cand.c.sort_key, cand.c.id,
                   *_GENERATION_COLUMNS, cand.c.kind, *_SOURCE_COLUMNS)
            .join(G, G.c.id == cand.c.generation_id).join(R, R.c.id == G.c.request_id))


@lru_cache(maxsize=256)
def _skipped_statement(shape: _Shape):
    """skipped_in's statement for claimers of one shape (see _claim_statement)."""
    rules = _rules(shape)
    # (an entry whose generation is not waiting, if any, has no reason: it is not counted)
    reason = case((G.c.state != "waiting", None),
                  *[(not_(cond), name) for name, cond in rules], else_=None).label("reason")
    # The head of the queue read from ix_queue_sort alone (a derived table the other tables
    # are joined to), then its rows tested: ordering the joined rows instead, or given a
    # condition on the generations' state, SQLite read every waiting generation to sort them.
    head = (select(Q.c.id.label("head_id")).where(UNCLAIMED).order_by(Q.c.sort_key, Q.c.id)
            .limit(SKIPPED_SAMPLE).subquery("head"))
    sample = (select(reason).select_from(head.join(Q, Q.c.id == head.c.head_id)
                                          .join(G, G.c.id == Q.c.generation_id)
                                          .join(R, R.c.id == G.c.request_id))
              .subquery())
    return select(sample.c.reason, func.count()).group_by(sample.c.reason)


def claim_in(session, caps: Capabilities, limit: int, now: float,
             one_request: bool = False) -> list[ClaimedJob]:
    """claim() inside the caller's transaction. `one_request`: only generations of the best
    candidate's request whose seeds follow on from its seed one by one, as a worker makes a
    batch of `n_iter` images from one seed.

    PostgreSQL: candidates are locked with FOR UPDATE SKIP LOCKED, so concurrent claimers never
    wait on each other or get the same row. SQLite: the write transaction (BEGIN IMMEDIATE)
    makes the claim single-writer. Two statements: the candidates, the update.
    """
    if not caps.models or limit <= 0:
        return []
    any_model = _any_model(caps)
    pg = session.bind.dialect.name == "postgresql"
    rows = session.execute(_claim_statement(_shape(caps, pg)), _params(caps, limit, pg)).all()
    chosen: dict[str, ClaimedJob] = {}
    for row in sorted(rows, key=lambda r: (r[0], r[3], r[4])):
        (_tier, gen_id, model, _key, _qid, seed, position, attempts, kudos, request_id,
         prompt, negative, params, user_id, nsfw, censor, r2, shared, kind, source_processing,
         source_key, mask_key, extra_sources, submitted_at) = row
        if gen_id in chosen:
            continue
        if one_request and chosen:
            first = next(iter(chosen.values()))
            if request_id != first.request_id or seed != (first.seed + len(chosen)) % 2**32:
                continue
        ttl = (TEXT_TTL if kind == "text"
               else job_ttl(params["width"], params["height"], params["steps"],
                            controlnet=bool(params.get("control_type") or params.get("workflow"))))
        chosen[gen_id] = ClaimedJob(
            generation_id=gen_id, claim_id=str(uuid.uuid4()), request_id=request_id,
            model=any_model if model == ANY_MODEL else model, seed=seed,
            position=position, prompt=prompt, negative_prompt=negative, params=params,
            deadline=now + ttl, ttl=ttl, attempts=attempts + 1, kudos=kudos,
            user_id=user_id, nsfw=nsfw, censor_nsfw=censor, r2=r2, shared=shared, kind=kind,
            source_processing=source_processing, source_image_key=source_key,
            source_mask_key=mask_key, extra_sources=extra_sources, submitted_at=submitted_at)
        if len(chosen) == limit:
            break
    jobs = list(chosen.values())
    if jobs:
        values = [{"gid": j.generation_id, "m": j.model, "cid": j.claim_id, "dl": j.deadline,
                   "worker": caps.worker_id, "now": now} for j in jobs]
        for statement in _claim_updates(pg):
            _execute_rows(session, statement, values)
    jobs.sort(key=lambda j: (j.request_id, j.position))
    return jobs


@lru_cache(maxsize=2)
def _claim_updates(pg: bool) -> tuple:
    """claim_in's update of each claimed generation, and of its queue entries (marked claimed:
    out of the indexes claims read). On PostgreSQL one statement, the entries' update riding
    along in a WITH; SQLite has no UPDATE in a WITH. Built once, run with values bound."""
    claimed = update(G).where(G.c.id == bindparam("gid"), G.c.state == "waiting").values(
        state="processing", model=bindparam("m"), claim_id=bindparam("cid"),
        claimed_by=bindparam("worker"), deadline=bindparam("dl"), attempts=G.c.attempts + 1,
        started_at=bindparam("now", type_=Double))
    entries = update(Q).where(Q.c.generation_id == bindparam("gid")).values(claimed=True)
    return (claimed.add_cte(entries.cte("claimed_entries")),) if pg else (claimed, entries)


def commit_lazily(session) -> None:
    """Let this transaction commit without waiting for its WAL to reach the disk (PostgreSQL's
    `synchronous_commit = off`, for this transaction only). For pops that found nothing: all
    they write is the worker's last_seen and uptime, which a crash may lose without harm;
    waiting for the flush is the largest part of an empty pop on a server with a slow disk. A
    pop that claims work keeps the durable commit: its claim must not be forgotten after the
    worker has its job. SQLite (synchronous=NORMAL in WAL mode) does not wait anyway."""
    if session.bind.dialect.name == "postgresql":
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))


def skipped_in(session, caps: Capabilities) -> dict[str, int]:
    """Why `caps` got nothing: for each of the first SKIPPED_SAMPLE waiting generations (in
    queue order, whatever their model), the first rule it failed, counted by reason. One
    statement; it reads ix_queue_sort."""
    pg = session.bind.dialect.name == "postgresql"
    rows = session.execute(_skipped_statement(_shape(caps, pg)), _params(caps, 0, pg)).all()
    return {name: count for name, count in rows if name is not None}


def fault(db: Database, claims: list[tuple[str, str]], reason: str) -> int:
    """End claimed generations as `faulted` at once: a job that cannot run as given (a
    deployment's JobRejected) fails the same way on every attempt, so it is not retried. Only
    the current claim can do it; the requester is not charged (nothing finished). Only the
    cluster's own code calls it: a worker's fault hands the job back (release_in)."""
    if not claims:
        return 0
    with db.write() as session:
        faulted = []
        for gen_id, claim_id in claims:
            row = session.execute(
                update(G).where(G.c.id == gen_id, G.c.claim_id == claim_id, G.c.state == "processing")
                .values(state="faulted", fault_reason=reason, claim_id=None, claimed_by=None,
                        deadline=None, finished_at=time.time()).returning(G.c.id)
            ).first()
            if row:
                faulted.append(gen_id)
        _drop_entries_of_ended(session, faulted)
        return len(faulted)


def ended_sources(db: Database, limit: int = 100) -> list[tuple[str, list[str]]]:
    """(request id, stored source keys) of requests that still hold a stored source image but
    have nothing left to generate (done, faulted or cancelled): their sources can go. Reads
    ix_requests_source_image_key, which only such recent requests have set."""
    live = select(G.c.id).where(G.c.request_id == R.c.id,
                                G.c.state.in_(("waiting", "processing"))).exists()
    with db.read() as session:
        rows = session.execute(
            select(R.c.id, R.c.source_image_key, R.c.source_mask_key, R.c.extra_sources)
            .where(R.c.source_image_key.is_not(None), ~live).limit(limit)).all()
    return [(rid, [k for k in (image, mask, *(e["key"] for e in extras or [])) if k])
            for rid, image, mask, extras in rows]


def forget_sources(db: Database, request_ids: list[str]) -> None:
    """Clear the source keys of requests whose source objects were deleted."""
    if request_ids:
        with db.write() as session:
            session.execute(update(R).where(R.c.id.in_(request_ids))
                            .values(source_image_key=None, source_mask_key=None, extra_sources=None))


def _drop_entries_of_ended(session, gen_ids: list[str]) -> None:
    if gen_ids:
        ended = select(G.c.id).where(G.c.id.in_(gen_ids), G.c.state != "waiting",
                                     G.c.state != "processing")
        session.execute(delete(Q).where(Q.c.generation_id.in_(ended)))


# --- claims handed back ----------------------------------------------------------------------
#
# A claim comes back to the queue when its worker faults it, drops it (its deadline passes) or
# goes away. Who held it decides what it counts for. The cluster's own replicas are the horde's
# code: each failure counts (`failures`). Anyone else's worker (an HTTP volunteer, a Ray-joined
# node) is untrusted: its owner is noted on the generation (`faulted_owners`) and on its queue
# entries (`excluded_owners`, so no worker of that owner claims it again), and counts once
# however many workers it runs. A generation ends faulted when failures and owners together
# reach max_attempts: one griefer, with any number of workers, cannot fail anyone's request.


@dataclass
class _Held:
    """A processing generation as handed back: its claim and who held it."""

    generation_id: str
    claim_id: str
    failures: int
    faulted_owners: str
    holder_id: str | None
    holder_kind: str | None  # None: no worker record (counted as the cluster's)
    holder_owner: int | None

    @property
    def trusted(self) -> bool:
        return self.holder_kind in (None, "cluster")


_HELD_COLUMNS = (G.c.id, G.c.claim_id, G.c.failures, G.c.faulted_owners, W.c.id, W.c.kind,
                 W.c.owner_id)


def _held(session, *where, skip_locked: bool = False) -> list[_Held]:
    """The processing generations `where` selects, with their holders, locked on PostgreSQL
    (claims that a concurrent claim or submit holds are skipped with `skip_locked`)."""
    stmt = (select(*_HELD_COLUMNS).select_from(G.outerjoin(W, W.c.id == G.c.claimed_by))
            .where(G.c.state == "processing", *where))
    if session.bind.dialect.name == "postgresql":
        stmt = stmt.with_for_update(of=G, skip_locked=skip_locked)
    return [_Held(*row) for row in session.execute(stmt).all()]


def owners_of(listed: str) -> list[int]:
    """The owner ids of a `faulted_owners` / `excluded_owners` string (",1,7,")."""
    return [int(x) for x in listed.split(",") if x]


def tally_fault(failures: int, faulted_owners: str, trusted: bool, owner: int | None,
                max_attempts: int) -> tuple[int, str, bool]:
    """A hand-back of work that `owner`'s worker (or, `trusted`, the cluster's replica) held:
    the failures and owners it leaves, and whether to give up. Untrusted workers count once per
    owner however often they fail it, so no one volunteer (nor its many workers) can fail
    someone's request; the cluster's own failures each count."""
    owners = owners_of(faulted_owners)
    if trusted:
        failures += 1
    elif owner is not None and owner not in owners:
        owners.append(owner)
    listed = "".join(f",{o}" for o in owners) + "," if owners else ""
    return failures, listed, failures + len(owners) >= max_attempts


def _hand_back(session, held: list[_Held], reason: str, max_attempts: int, now: float) -> int:
    """Each of `held` back to the queue (keeping its place), or faulted once failures and
    owners reach max_attempts (tally_fault); the entries follow, excluding the owners that
    failed it. A statement or two per generation: hand-backs are rare next to claims."""
    for h in held:
        failures, listed, give_up = tally_fault(h.failures, h.faulted_owners, h.trusted,
                                                h.holder_owner, max_attempts)
        session.execute(
            update(G).where(G.c.id == h.generation_id, G.c.claim_id == h.claim_id,
                        G.c.state == "processing")
            .values(state="faulted" if give_up else "waiting",
                    fault_reason=reason if give_up else G.c.fault_reason,
                    model=G.c.model if give_up else None, claim_id=None, claimed_by=None,
                    deadline=None, finished_at=now if give_up else None, failures=failures,
                    faulted_owners=listed))
        if give_up:
            session.execute(delete(Q).where(Q.c.generation_id == h.generation_id))
        else:
            session.execute(update(Q).where(Q.c.generation_id == h.generation_id)
                            .values(claimed=False, excluded_owners=listed))
    return len(held)


def release(db: Database, claims: list[tuple[str, str]], reason: str, max_attempts: int,
            max_consecutive_drops: int | None = None, maintenance_seconds: float = 0.0) -> int:
    """Hand claimed generations back (see _hand_back): the cluster's replicas when a call
    fails. Only the current claim can release (a stale claimer changes nothing)."""
    if not claims:
        return 0
    with db.write() as session:
        return release_in(session, claims, reason, max_attempts, max_consecutive_drops,
                          maintenance_seconds)


def release_in(session, claims: list[tuple[str, str]], reason: str, max_attempts: int,
               max_consecutive_drops: int | None = None, maintenance_seconds: float = 0.0,
               now: float | None = None) -> int:
    """release() in the caller's transaction (a worker's faulted submit). An untrusted
    holder's release counts as a drop against its worker."""
    now = time.time() if now is None else now
    wanted = dict(claims)
    held = [h for h in _held(session, G.c.id.in_(list(wanted)))
            if wanted.get(h.generation_id) == h.claim_id]
    _hand_back(session, held, reason, max_attempts, now)
    if max_consecutive_drops:
        count_drops(session, _untrusted(held), max_consecutive_drops, maintenance_seconds, now)
    return len(held)


def expire(db: Database, max_attempts: int, now: float | None = None,
           worker_id: str | None = None, max_consecutive_drops: int | None = None,
           maintenance_seconds: float = 0.0) -> int:
    """Return claims past their deadline (or every claim of `worker_id`, whose in-flight work is
    known to be lost) to the queue (see _hand_back). Reads through
    ix_generations_state_deadline.

    Deadline expiries count as drops against the untrusted workers that held them; one whose
    drops and faults reach `max_consecutive_drops` in a row (no successful submit between)
    goes into maintenance for `maintenance_seconds`, which its owner cannot end before (so it
    notices before it wastes more of the queue's time, and a griefer cannot carry on)."""
    now = time.time() if now is None else now
    with db.write() as session:
        where = G.c.claimed_by == worker_id if worker_id else G.c.deadline < now
        held = _held(session, where, skip_locked=True)
        if not held:
            return 0
        _hand_back(session, held, "worker lost the job" if worker_id else "job expired",
                   max_attempts, now)
        if worker_id is None and max_consecutive_drops:
            count_drops(session, _untrusted(held), max_consecutive_drops, maintenance_seconds, now)
    return len(held)


def _untrusted(held: list[_Held]) -> list[str]:
    return [h.holder_id for h in held if not h.trusted and h.holder_id]


def count_drops(session, holders: list[str], limit: int, maintenance_seconds: float,
                now: float) -> None:
    """Drops and faults of untrusted workers (`holders`, a worker id per drop), against their
    consecutive count; at `limit` the worker goes into maintenance the horde imposed, until
    now + maintenance_seconds."""
    for worker, count in sorted({h: holders.count(h) for h in holders}.items()):
        drops = W.c.consecutive_drops + count
        imposed = and_(W.c.maintenance == False, drops >= limit)  # noqa: E712
        session.execute(
            update(W).where(W.c.id == worker, W.c.kind != "cluster")
            .values(dropped_jobs=W.c.dropped_jobs + count, consecutive_drops=drops,
                    maintenance=or_(W.c.maintenance, drops >= limit),
                    maintenance_msg=case((imposed, f"dropped or faulted {limit} jobs in a row"),
                                         else_=W.c.maintenance_msg),
                    maintenance_until=case((imposed, now + maintenance_seconds),
                                           else_=W.c.maintenance_until)))


@dataclass
class Result:
    generation_id: str
    claim_id: str
    storage_key: str | None
    seed: int
    worker_id: str
    worker_name: str
    owner_id: int  # earns the reward
    censored: bool = False
    gen_metadata: list = field(default_factory=list)
    # Censored by the cluster's own safety check (which the horde runs itself, on the
    # cluster's replicas): the requester pays nothing and the horde pays the work. A state a
    # worker declares never does that: its censored result is paid like any other.
    censored_by_horde: bool = False
    # The submitting worker's address as an anonymous requester ("ip:<digest>",
    # api/routes/deps.py requester_of): anonymous requests from it are not work for others.
    worker_requester: str | None = None
    # Text results.
    text: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


@dataclass
class Finished:
    generation_id: str
    reward: float


def finish(db: Database, results: list[Result], now: float | None = None) -> list[Finished]:
    """Record results exactly once: only the current claim of a processing generation can
    finish it; a late or second submit finds nothing to update. In the same transaction the
    requester pays and the worker's owner earns (see _payments), the horde collects the tax,
    and the worker's and the requester's counters move."""
    now = time.time() if now is None else now
    with db.write() as session:
        return finish_in(session, results, now)


def text_tokens(text: str) -> int:
    """The tokens a text worker delivered, counted as the AI Horde counts them without a
    tokenizer: a token per four characters (so one character is one token)."""
    return math.ceil(len(text) / 4)


def _earned(session, result: Result):
    """SQL for what a finished generation earns its worker's owner: its kudos, or for text its
    kudos scaled by the tokens delivered of the max_length asked for (its queue entries say,
    read before they go), so a one-character answer earns a one-token reward."""
    if result.text is None:
        return G.c.kudos
    tokens = result.completion_tokens if result.completion_tokens is not None \
        else text_tokens(result.text)
    asked = (select(func.max(Q.c.max_length)).where(Q.c.generation_id == G.c.id)
             .scalar_subquery())
    least = func.min if session.bind.dialect.name == "sqlite" else func.least
    share = case((asked > 0, least(1.0, literal(float(tokens)) / asked)), else_=1.0)
    return G.c.kudos * share


def _payments(r: Result, g: dict, horde: int) -> list[tuple[int, float, str]]:
    """The ledger rows of one finished generation: the requester pays what it was charged
    (the reward and its tax share), the owner earns the reward, the horde collects the tax;
    censored by the horde's own check, the horde pays the reward instead (nobody, for the
    owner's own request)."""
    reward = g["earned"]
    if r.censored_by_horde:
        if g["user_id"] == r.owner_id or not reward:
            return []
        return [(horde, -reward, "reward"), (r.owner_id, reward, "reward")]
    rows = [(g["user_id"], -g["charged"], "generation"), (r.owner_id, reward, "reward")]
    return rows + ([(horde, g["tax"], "tax")] if g["tax"] else [])


def finish_in(session, results: list[Result], now: float) -> list[Finished]:
    done: list[tuple[Result, dict]] = []
    for r in results:
        earned = _earned(session, r)
        row = session.execute(
            update(G)
            .where(G.c.id == r.generation_id, G.c.claim_id == r.claim_id,
                   G.c.state == "processing")
            .values(state="done", storage_key=r.storage_key, finished_at=now, seed=r.seed,
                    worker_id=r.worker_id, worker_name=r.worker_name, censored=r.censored,
                    gen_metadata=r.gen_metadata, claim_id=None, deadline=None, text=r.text,
                    prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                    finish_reason=r.finish_reason,
                    charged=0.0 if r.censored_by_horde else earned + G.c.tax)
            .returning(G.c.model, G.c.started_at, G.c.kudos, G.c.tax, G.c.user_id,
                       G.c.megapixelsteps, G.c.requester, G.c.charged)
        ).first()
        if row:
            g = dict(row._mapping)
            # (the cluster's safety check censors images only, whose reward is their kudos)
            g["earned"] = g["kudos"] if r.censored_by_horde else g["charged"] - g["tax"]
            done.append((r, g))
    if not done:
        return []
    ids = [r.generation_id for r, _ in done]
    session.execute(delete(Q).where(Q.c.generation_id.in_(ids)))
    _record_speed(session, [(g["model"], now - (g["started_at"] or now)) for _, g in done], now)
    horde = ledger.horde_account_id(session)
    rows: list[tuple[int, float, str]] = []
    usage: dict[int, ledger.Usage] = {}
    per_worker: dict[str, dict[str, float]] = {}
    finished = []
    for r, g in done:
        payments = _payments(r, g, horde)
        rows += payments
        reward = next((amount for uid, amount, kind in payments
                       if kind == "reward" and amount > 0), 0.0)
        tokens = r.completion_tokens if r.completion_tokens is not None else (
            text_tokens(r.text) if r.text is not None else 0)
        used = usage.setdefault(g["user_id"], ledger.Usage())
        used.generations += 1
        used.megapixelsteps += g["megapixelsteps"]
        used.tokens += tokens
        w = per_worker.setdefault(r.worker_id, {"jobs": 0, "mps": 0.0, "kudos": 0.0, "secs": 0.0,
                                                "tokens": 0, "for_others": False})
        # Work for someone else is what earns the uptime bonus (api/workers.py): neither the
        # owner's own requests nor anonymous ones from the worker's own address, with which
        # an owner could buy the bonus.
        w["for_others"] = w["for_others"] or (g["user_id"] != r.owner_id
                                              and g["requester"] != r.worker_requester)
        w["jobs"] += 1
        w["tokens"] += tokens
        w["mps"] += g["megapixelsteps"]
        w["kudos"] += reward
        w["secs"] += now - (g["started_at"] or now)
        finished.append(Finished(r.generation_id, reward))
    rows = [row for row in rows if row[1]]
    if rows or usage:
        ledger.record(session, rows, ref=ids[0] if len(ids) == 1 else None, now=now, usage=usage)
    for worker_id, w in sorted(per_worker.items()):
        session.execute(update(W).where(W.c.id == worker_id).values(
            jobs_done=W.c.jobs_done + w["jobs"],
            megapixelsteps_done=W.c.megapixelsteps_done + w["mps"],
            kudos_earned=W.c.kudos_earned + w["kudos"],
            seconds_working=W.c.seconds_working + w["secs"],
            tokens_generated=W.c.tokens_generated + w["tokens"], consecutive_drops=0,
            **({"last_job_at": now} if w["for_others"] else {})))
    return finished


def _record_speed(session, done: list[tuple[str, float]], now: float) -> None:
    """Fold finished generations into the per-model speed averages used by `wait_time`."""
    by_model: dict[str, list[float]] = {}
    for model, seconds in done:
        by_model.setdefault(model, []).append(seconds)
    dialect = session.bind.dialect.name
    ins = pg_insert if dialect == "postgresql" else sqlite_insert
    least = func.min if dialect == "sqlite" else func.least
    S = ModelStat.__table__
    for model, secs in sorted(by_model.items()):
        avg = sum(secs) / len(secs)
        # The interval between completions, per image; capped by the time one image takes, so
        # a long idle gap does not make the next estimate absurd.
        stmt = ins(S).values(model=model, ewma_seconds=avg, ewma_interval=avg,
                             last_finished=now, completed=len(secs))
        interval = least((now - S.c.last_finished) / len(secs), S.c.ewma_seconds)
        session.execute(stmt.on_conflict_do_update(
            index_elements=[S.c.model],
            set_={
                "ewma_seconds": S.c.ewma_seconds * 0.8 + avg * 0.2,
                "ewma_interval": S.c.ewma_interval * 0.8 + interval * 0.2,
                "last_finished": now,
                "completed": S.c.completed + len(secs),
            },
        ))
