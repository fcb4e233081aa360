"""Usage per model for the /stats endpoints, kept cheap: finished generations are folded once
each into hourly and lifetime counters (`usage_buckets`), so a read sums at most a month of
hourly rows per model plus the few generations finished since the last fold, never history.

A fold runs when a stats answer is computed afresh (api/routes/status.py caches them), in a
write transaction that locks the watermark row: API replicas folding at once take turns, and
each generation is counted once. Generations that finished in the last FOLD_LAG_SECONDS are
left to a later fold (they are read live meanwhile), so one whose finishing transaction
commits a little after it stamped `finished_at` is never skipped.

Day and month windows are counted to the hour (the current hour and the 24, or 720, before);
the last hour to the minute, from per-minute counters (`usage_minutes`) the fold keeps for the
last two hours. The last minute is always read live: the fold leaves it alone, and the
retention sweep (api/retention.py) deletes generations only once they are folded, so no
number here drops when it does.
Text "tokens" are the tokens generated (as the cluster's engine counted them, or from an HTTP
worker's text as it is paid for them), else those asked for (which is what the AI Horde counts).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import BigInteger, case, cast, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from api.db.models import Generation, Request, UsageBucket, UsageMinute, UsageWatermark

LIFETIME_HOUR = -1
FOLD_LAG_SECONDS = 60.0
DAY_HOURS, MONTH_HOURS = 24, 30 * 24
KEEP_HOURS = MONTH_HOURS + 24  # hourly rows older than this are deleted by the fold
KEEP_MINUTES = 120  # per-minute rows older than this, too
PERIODS = ("day", "month", "total")


@dataclass
class Usage:
    generations: int = 0
    megapixelsteps: float = 0.0
    tokens: int = 0

    def add(self, generations: int, megapixelsteps: float, tokens: int) -> None:
        self.generations += int(generations or 0)
        self.megapixelsteps += float(megapixelsteps or 0.0)
        self.tokens += int(tokens or 0)


def _hour_of(session, seconds, span: int = 3600):
    """The hour (or `span`) since the epoch that `seconds` falls in, in SQL: floor division
    (PostgreSQL rounds when it casts a double; SQLite truncates, floor for positive times)."""
    if session.bind.dialect.name == "postgresql":
        return cast(func.floor(seconds / span), BigInteger)
    return cast(seconds / span, BigInteger)


def _tokens():
    """A text generation's tokens: those generated where the worker said (the cluster's own
    deployments do), else those asked for (`max_length`, which the AI Horde counts); 0 for
    an image."""
    return func.coalesce(Generation.completion_tokens,
                         Request.params["max_length"].as_integer(), 0)


def _finished(session, since: float, until: float | None = None, kind: str | None = None,
              span: int = 3600):
    """Generations done in [since, until), summed per (kind, model, hour) (or `span`); read
    through ix_generations_finished_at."""
    G, R = Generation, Request
    hour = _hour_of(session, G.finished_at, span).label("hour")
    stmt = (select(R.kind, G.model, hour, func.count(), func.sum(G.megapixelsteps),
                   func.sum(_tokens()))
            .join(R, R.id == G.request_id)
            .where(G.state == "done", G.finished_at >= since, G.model.is_not(None)))
    if until is not None:
        stmt = stmt.where(G.finished_at < until)
    if kind is not None:
        stmt = stmt.where(R.kind == kind)
    return session.execute(stmt.group_by(R.kind, G.model, hour)).all()


def fold(session, now: float | None = None) -> float:
    """Count the generations finished since the last fold (up to FOLD_LAG_SECONDS ago) into
    the buckets, drop hourly rows past KEEP_HOURS, and return the new watermark."""
    now = time.time() if now is None else now
    W = UsageWatermark
    folded = session.execute(select(W.folded_until).where(W.id == 1).with_for_update()
                             ).scalar_one()
    until = now - FOLD_LAG_SECONDS
    if until <= folded:
        return folded
    sums: dict[tuple[str, str, int], Usage] = defaultdict(Usage)
    for kind, model, hour, n, mps, tokens in _finished(session, folded, until):
        sums[(kind, model, int(hour))].add(n, mps, tokens)
        sums[(kind, model, LIFETIME_HOUR)].add(n, mps, tokens)
    B = UsageBucket.__table__
    insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
    for (kind, model, hour), u in sorted(sums.items()):
        stmt = insert(B).values(kind=kind, model=model, hour=hour, generations=u.generations,
                                megapixelsteps=u.megapixelsteps, tokens=u.tokens)
        session.execute(stmt.on_conflict_do_update(
            index_elements=[B.c.kind, B.c.model, B.c.hour],
            set_={"generations": B.c.generations + u.generations,
                  "megapixelsteps": B.c.megapixelsteps + u.megapixelsteps,
                  "tokens": B.c.tokens + u.tokens}))
    session.execute(delete(B).where(B.c.hour >= 0, B.c.hour < int(now // 3600) - KEEP_HOURS))
    _fold_minutes(session, max(folded, now - KEEP_MINUTES * 60), until, now, insert)
    session.execute(update(W).where(W.id == 1).values(folded_until=until))
    return until


def _fold_minutes(session, since: float, until: float, now: float, insert) -> None:
    """The per-minute counters of [since, until) (all models together), older ones dropped."""
    sums: dict[tuple[str, int], Usage] = defaultdict(Usage)
    if since < until:
        for kind, _model, minute, n, mps, tokens in _finished(session, since, until, span=60):
            sums[(kind, int(minute))].add(n, mps, tokens)
    M = UsageMinute.__table__
    for (kind, minute), u in sorted(sums.items()):
        stmt = insert(M).values(kind=kind, minute=minute, generations=u.generations,
                                megapixelsteps=u.megapixelsteps, tokens=u.tokens)
        session.execute(stmt.on_conflict_do_update(
            index_elements=[M.c.kind, M.c.minute],
            set_={"generations": M.c.generations + u.generations,
                  "megapixelsteps": M.c.megapixelsteps + u.megapixelsteps,
                  "tokens": M.c.tokens + u.tokens}))
    session.execute(delete(M).where(M.c.minute < int(now // 60) - KEEP_MINUTES))


def per_model(session, kind: str, folded_until: float, now: float) -> dict[str, dict[str, Usage]]:
    """{model: {"day", "month", "total": Usage}} of `kind`'s finished generations: one grouped
    read of the buckets, one of the generations since `folded_until`."""
    B = UsageBucket
    now_hour = int(now // 3600)

    def window(since_hour: int | None):
        cond = B.hour == LIFETIME_HOUR if since_hour is None else B.hour >= since_hour
        return [func.sum(case((cond, column), else_=0))
                for column in (B.generations, B.megapixelsteps, B.tokens)]

    out: dict[str, dict[str, Usage]] = defaultdict(lambda: {p: Usage() for p in PERIODS})
    rows = session.execute(
        select(B.model, *window(now_hour - DAY_HOURS), *window(now_hour - MONTH_HOURS),
               *window(None)).where(B.kind == kind).group_by(B.model)).all()
    for model, *sums in rows:
        for i, period in enumerate(PERIODS):
            out[model][period].add(*sums[3 * i:3 * i + 3])
    for _kind, model, _hour, n, mps, tokens in _finished(session, folded_until, kind=kind):
        for period in PERIODS:
            out[model][period].add(n, mps, tokens)
    return dict(out)


def recent(session, kind: str, seconds: float, now: float) -> Usage:
    """`kind`'s generations finished in the last `seconds` (a minute at most, which no fold
    or sweep has touched: a range read of ix_generations_finished_at)."""
    G, R = Generation, Request
    n, mps, tokens = session.execute(
        select(func.count(), func.sum(G.megapixelsteps), func.sum(_tokens()))
        .join(R, R.id == G.request_id)
        .where(G.state == "done", G.finished_at > now - seconds, R.kind == kind)).one()
    usage = Usage()
    usage.add(n, mps, tokens)
    return usage


def past_hour(session, kind: str, folded_until: float, now: float) -> Usage:
    """`kind`'s generations finished in the last hour: the per-minute counters of the minutes
    that start in it, and the generations finished since `folded_until`."""
    M = UsageMinute
    n, mps, tokens = session.execute(
        select(func.sum(M.generations), func.sum(M.megapixelsteps), func.sum(M.tokens))
        .where(M.kind == kind, M.minute >= -(-(now - 3600) // 60))).one()
    usage = Usage()
    usage.add(n, mps, tokens)
    for _kind, _model, _hour, n, mps, tokens in _finished(session, folded_until, kind=kind):
        usage.add(n, mps, tokens)
    return usage


def totals(session, kind: str, folded_until: float, now: float) -> dict[str, Usage]:
    """{"minute", "hour", "day", "month", "total": Usage} over all of `kind`'s models."""
    out = {"minute": recent(session, kind, 60, now),
           "hour": past_hour(session, kind, folded_until, now)}
    for period in PERIODS:
        out[period] = Usage()
    for usage in per_model(session, kind, folded_until, now).values():
        for period in PERIODS:
            out[period].add(usage[period].generations, usage[period].megapixelsteps,
                            usage[period].tokens)
    return out
