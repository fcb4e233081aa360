"""Cluster status routes: heartbeat, models, performance, stats, and local object storage."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from api.db.models import Generation, ModelStat, QueueEntry, Worker
from api.errors import HordeError
from api.routes.deps import ctx_of
from api.schemas import ActiveModel, Heartbeat
from api.storage import LocalStorage

router = APIRouter(tags=["status"])
VERSION = "2.5.0"
TOTALS_CACHE_SECONDS = 30.0
_totals_cache: dict[str, tuple[float, dict]] = {}


@router.get("/status/heartbeat", response_model=Heartbeat)
def heartbeat():
    return Heartbeat(version=VERSION)


def live_capacity(ctx, session, now: float) -> dict[str, int]:
    """Per model: online HTTP workers offering it, plus the running replicas of the cluster's
    own deployment that serves it (the dispatcher keeps those counts in `threads`)."""
    counts: dict[str, int] = {}
    rows = session.execute(select(Worker.models, Worker.kind, Worker.threads).where(
        Worker.last_seen > now - ctx.settings.stale_worker_seconds,
        (Worker.kind != "node") | Worker.connected,
        Worker.maintenance == False)).all()  # noqa: E712
    for models, kind, threads in rows:
        for m in models or []:
            counts[m] = counts.get(m, 0) + (threads if kind == "cluster" else 1)
    return counts


@router.get("/status/models", response_model=list[ActiveModel])
def status_models(request: Request, type: str = Query("image", pattern="^(image|text)$")):
    ctx = ctx_of(request)
    now = time.time()
    with ctx.db.read() as session:
        # One grouped read over the waiting queue, one over the speed table, one over workers.
        waiting = {
            model: (jobs, mps or 0.0)
            for model, jobs, mps in session.execute(
                select(QueueEntry.model, func.count(), func.sum(QueueEntry.megapixelsteps))
                .join(Generation, Generation.id == QueueEntry.generation_id)
                .where(Generation.state == "waiting").group_by(QueueEntry.model)
            ).all()
        }
        speed = {s.model: s for s in session.execute(select(ModelStat)).scalars()}
        capacity = live_capacity(ctx, session, now)
    out = []
    for entry in ctx.catalog.models:
        if entry.family.kind != type:
            continue
        jobs, mps = waiting.get(entry.name, (0, 0.0))
        stat = speed.get(entry.name)
        per_image = stat.ewma_interval if stat else 0.0
        out.append(ActiveModel(
            name=entry.name, count=capacity.get(entry.name, 0),
            performance=round(1 / stat.ewma_seconds, 3) if stat and stat.ewma_seconds else 0.0,
            queued=round(mps, 3), jobs=float(jobs), eta=int(jobs * per_image), type=type,
        ))
    return out


@router.get("/status/performance")
def status_performance(request: Request):
    ctx = ctx_of(request)
    now = time.time()
    with ctx.db.read() as session:
        queued, queued_mps = session.execute(
            select(func.count(), func.coalesce(func.sum(Generation.megapixelsteps), 0.0))
            .where(Generation.state == "waiting")).one()
        past_minute = session.execute(
            select(func.coalesce(func.sum(Generation.megapixelsteps), 0.0))
            .where(Generation.finished_at > now - 60, Generation.state == "done")).scalar_one()
        online = session.execute(select(Worker.kind, Worker.threads).where(
            Worker.last_seen > now - ctx.settings.stale_worker_seconds)).all()
    return {
        "queued_requests": queued, "queued_megapixelsteps": round(queued_mps, 2),
        "past_minute_megapixelsteps": round(past_minute, 2), "worker_count": len(online),
        "thread_count": sum(t for _, t in online), "queued_text_requests": 0,
        "text_worker_count": 0, "text_thread_count": 0, "queued_tokens": 0.0,
        "past_minute_tokens": 0.0,
    }


@router.get("/stats/img/totals")
def stats_image_totals(request: Request):
    """Images finished and their pixelsteps over the last minute, hour, day, month and ever.
    Cached for TOTALS_CACHE_SECONDS: the totals scan history, which only grows."""
    ctx = ctx_of(request)
    now = time.time()
    cached = _totals_cache.get(ctx.settings.database_url)
    if cached and now - cached[0] < TOTALS_CACHE_SECONDS:
        return cached[1]
    out = {}
    with ctx.db.read() as session:
        for name, seconds in (("minute", 60), ("hour", 3600), ("day", 86400),
                              ("month", 30 * 86400), ("total", None)):
            stmt = select(func.count(), func.coalesce(func.sum(Generation.megapixelsteps), 0.0)
                          ).where(Generation.state == "done")
            if seconds:
                stmt = stmt.where(Generation.finished_at > now - seconds)
            images, mps = session.execute(stmt).one()
            out[name] = {"images": images, "ps": int(mps * 1e6)}
    _totals_cache[ctx.settings.database_url] = (now, out)
    return out


@router.get("/objects/{key:path}")
def get_object(key: str, request: Request):
    storage = ctx_of(request).storage
    if not isinstance(storage, LocalStorage):
        raise HordeError(404, "NotFound", "objects are served by the object store")
    try:
        data = storage.get(key)
    except (FileNotFoundError, ValueError):
        raise HordeError(404, "NotFound", f"key: no object {key}") from None
    return Response(data, media_type="image/webp",
                    headers={"Cache-Control": "public, max-age=86400"})


@router.put("/objects/{key:path}")
async def put_object(key: str, request: Request, expires: int = Query(...),
                     signature: str = Query(..., max_length=128)):
    """Where HTTP workers upload results under local storage: the `r2_upload` URL of a pop,
    signed for that key (its claim's) until `expires` (the claim's deadline), and at most
    `max_upload_bytes` long, refused as soon as it is known to be longer. Any content type;
    answers 200 as S3 does."""
    ctx = ctx_of(request)
    storage = ctx.storage
    if not isinstance(storage, LocalStorage):
        raise HordeError(404, "NotFound", "uploads go to the object store")
    try:
        # hmac.compare_digest raises TypeError on non-ASCII text: such a signature is no match.
        allowed = signature.isascii() and storage.upload_allowed(key, expires, signature)
    except ValueError:
        raise HordeError(400, "BadRequest", f"key: invalid object key {key!r}") from None
    if not allowed:
        raise HordeError(403, "Forbidden", "signature: invalid or expired upload URL")
    cap = ctx.settings.max_upload_bytes
    too_large = HordeError(413, "PayloadTooLarge", f"body: an upload may be at most {cap} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > cap:
        raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > cap:
            raise too_large
    if not data:
        raise HordeError(400, "BadRequest", "body: empty upload")
    await run_in_threadpool(storage.put, key, bytes(data),
                            request.headers.get("content-type") or "image/webp")
    return JSONResponse({"key": key, "size": len(data)})
