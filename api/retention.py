"""Retention: ended requests (image, text and alchemy) are deleted
`finished_retention_seconds` after their last generation (or form) ended (done, faulted,
cancelled, or expired unclaimed), with their generations, result images and sources, as the
AI Horde forgets requests minutes after they are done; their status then answers 404 like any unknown id. What they counted for stays: kudos live in the
ledger (never pruned; its rows name generations by id in `ref`, not by foreign key) and in the
users' counters (api/ledger.py), the /stats numbers in the usage counters, which each pass folds
first and never overtakes (api/usage_stats.py).

A pass reads the ended generations (and, apart, the ended alchemy forms) in (finished_at, id)
order from where the last one stopped
(`retention_cursor`), at most `limit` of them, through ix_generations_finished_at, and deletes
the requests among theirs that have nothing left to run and whose last generation ended before
the cutoff: at most `limit` requests per pass, whatever the history. A request that still runs
is passed over; its last generation ends after the cursor, which reaches it again then. The
pass runs in one write transaction that first locks the usage watermark (the fold does): API
replicas sweeping at once take turns, and the second finds the cursor moved on.

Objects are deleted inside the transaction, before it commits: a pass that fails leaves its
rows and cursor where they were, and the next one deletes again (deleting a missing object is
no error), so nothing is left in storage that no row points to."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import case, delete, func, or_, select, update

from api import usage_stats
from api.alchemy import forms as alchemy_forms
from api.db import queue
from api.db.models import (
    Generation,
    Interrogation,
    InterrogationForm,
    QueueEntry,
    Request,
    RetentionCursor,
    SharedKey,
    SharedKeyRequest,
)

LIVE = ("waiting", "processing")
# Objects more than one generation may show (api/workers.py censored_placeholder): never
# deleted with a request.
SHARED_PREFIXES = ("placeholders/",)
# Generations are kept at least this long, whatever the setting: the last minute's numbers
# (api/usage_stats.py recent) are read from them.
MIN_AGE_SECONDS = 120.0


@dataclass(frozen=True)
class _Kind:
    """What is swept: requests (`parent`) ending when all their jobs (`child`) have ended."""

    cursor: int  # its row of retention_cursor
    parent: type
    child: type
    parent_of: str  # the child's column naming its parent


KINDS = (_Kind(1, Request, Generation, "request_id"),  # images and text
         _Kind(2, Interrogation, InterrogationForm, "interrogation_id"))  # alchemy


def sweep(ctx, now: float | None = None, limit: int | None = None) -> int:
    """One pass over each kind of request; returns how many requests it deleted."""
    s = ctx.settings
    now = time.time() if now is None else now
    limit = s.retention_sweep_limit if limit is None else limit
    with ctx.db.write() as session:
        folded = usage_stats.fold(session, now)  # locks the watermark: one pass at a time
        cutoff = min(now - s.finished_retention_seconds, now - MIN_AGE_SECONDS, folded)
        return sum(_sweep_kind(ctx, session, kind, cutoff, limit) for kind in KINDS)


def _sweep_kind(ctx, session, kind: _Kind, cutoff: float, limit: int) -> int:
    C, J, P = RetentionCursor, kind.child, kind.parent
    parent_of = getattr(J, kind.parent_of)
    at, after_id = session.execute(select(C.finished_at, C.row_id)
                                   .where(C.id == kind.cursor).with_for_update()).one()
    rows = session.execute(
        select(J.finished_at, J.id, parent_of.label("parent"))
        .where(J.finished_at >= at, J.finished_at < cutoff,
               or_(J.finished_at > at, J.id > after_id))
        .order_by(J.finished_at, J.id).limit(limit)).all()
    if not rows:
        return 0
    candidates = sorted({r.parent for r in rows})
    ended = [pid for pid, live, last in session.execute(
        select(parent_of, func.count(case((J.state.in_(LIVE), 1))), func.max(J.finished_at))
        .where(parent_of.in_(candidates)).group_by(parent_of))
        if not live and last is not None and last < cutoff]
    if ended:
        if P is Request:
            _settle_shared_keys(session, ended)
        _delete_objects(ctx, session, kind, ended)
        if J is Generation:
            gens = select(J.id).where(parent_of.in_(ended))
            session.execute(delete(QueueEntry).where(QueueEntry.generation_id.in_(gens)))
            session.execute(delete(SharedKeyRequest).where(SharedKeyRequest.request_id.in_(ended)))
        session.execute(delete(J).where(parent_of.in_(ended)))
        session.execute(delete(P).where(P.id.in_(ended)))
    last = rows[-1]
    session.execute(update(C).where(C.id == kind.cursor)
                    .values(finished_at=last.finished_at, row_id=last.id))
    return len(ended)


def _settle_shared_keys(session, request_ids: list[str]) -> None:
    """Fold what requests made with shared keys cost into their keys before their generations
    go (a key is settled lazily, when it is next used: api/sharedkeys/service.py)."""
    from api.sharedkeys.service import _settle

    L = SharedKeyRequest
    key_ids = select(L.shared_key_id).where(L.request_id.in_(request_ids)).distinct()
    for key in session.execute(select(SharedKey).where(SharedKey.id.in_(key_ids))
                               .order_by(SharedKey.id).with_for_update()).scalars():
        _settle(session, key)


def _delete_objects(ctx, session, kind: _Kind, ids: list[str]) -> None:
    """The results and sources of the requests `ids` (sources are mostly gone already:
    delete_ended_sources takes them when a request ends)."""
    keys: set[str] = set()
    if kind.parent is Request:
        G, R = Generation, Request
        keys.update(session.execute(select(G.storage_key).where(
            G.request_id.in_(ids), G.storage_key.is_not(None))).scalars())
        for image, mask, extras in session.execute(
                select(R.source_image_key, R.source_mask_key, R.extra_sources)
                .where(R.id.in_(ids))):
            keys.update(k for k in (image, mask, *(e["key"] for e in extras or [])) if k)
    else:
        F, I = InterrogationForm, Interrogation
        keys.update(session.execute(select(F.result_key).where(
            F.interrogation_id.in_(ids), F.result_key.is_not(None))).scalars())
        keys.update(session.execute(select(I.source_image_key).where(
            I.id.in_(ids), I.source_image_key.is_not(None))).scalars())
    for key in sorted(keys):
        if not key.startswith(SHARED_PREFIXES):
            ctx.storage.delete(key)


def delete_ended_sources(ctx) -> None:
    """The source images of requests and interrogations with nothing left to run (their
    results may stay for the retention; their sources are of no more use). Here rather than
    in the dispatcher, so a deployment without one deletes them too; every API replica runs
    it, and deleting twice is harmless."""
    ended = queue.ended_sources(ctx.db)
    for _, keys in ended:
        for key in keys:
            ctx.storage.delete(key)
    queue.forget_sources(ctx.db, [request_id for request_id, _ in ended])
    alchemy_forms.delete_ended_sources(ctx.db, ctx.storage)


def run(ctx) -> None:
    """The API's periodic pass (api/app.py): sources of ended requests, then retention."""
    delete_ended_sources(ctx)
    sweep(ctx)
