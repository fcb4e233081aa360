"""Uploads nobody will take: a worker's result uploaded to its claim's URL (`uploads/{job}/
{claim}.webp`, api/workers.py upload_key; the job is an image generation or an alchemy
post-processing form) is copied and deleted when the worker submits. One
whose claim ended otherwise (expired, cancelled, faulted, a late upload after the job moved
on) would stay for good; the API's sweep deletes those.

An upload is kept while its claim is the generation's current one and still processing: a
submit in progress copies it before its transaction commits, and the sweep never deletes what
that submit may still read. Each sweep looks at a bounded number of uploads, the oldest first
written at least `min_age` seconds ago, so its cost never follows the queue."""

from __future__ import annotations

import time

from sqlalchemy import select

from api.db.models import Generation, InterrogationForm

UPLOAD_PREFIX = "uploads"


def parse_upload_key(key: str) -> tuple[str, str] | None:
    """(generation id, claim id) of an upload key, None for any other key."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != UPLOAD_PREFIX or not parts[2].endswith(".webp"):
        return None
    return parts[1], parts[2].removesuffix(".webp")


def sweep_stale_uploads(ctx, min_age: float = 60.0, limit: int = 500) -> int:
    """Delete up to `limit` uploads whose claims have ended; returns how many."""
    keys = ctx.storage.older_keys(UPLOAD_PREFIX, time.time() - min_age, limit)
    parsed = {key: ids for key in keys if (ids := parse_upload_key(key)) is not None}
    if not parsed:
        return 0
    jobs = {job for job, _ in parsed.values()}
    current: set[tuple[str, str]] = set()
    with ctx.db.read() as session:
        for table in (Generation, InterrogationForm):
            current.update((job, claim) for job, claim in session.execute(
                select(table.id, table.claim_id)
                .where(table.id.in_(jobs), table.state == "processing")))
    stale = [key for key, ids in parsed.items() if ids not in current]
    for key in stale:
        ctx.storage.delete(key)
    return len(stale)
