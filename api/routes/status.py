"""Cluster status routes: heartbeat, models, users, and local object storage."""

from __future__ import annotations

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from sqlalchemy import func, select

from api.db.models import Generation, ModelStat, QueueEntry
from api.errors import HordeError
from api.routes.deps import authenticate, ctx_of
from api.schemas import ActiveModel, Heartbeat
from api.storage import LocalStorage

router = APIRouter(tags=["status"])
VERSION = "2.5.0"


@router.get("/status/heartbeat", response_model=Heartbeat)
def heartbeat():
    return Heartbeat(version=VERSION)


@router.get("/status/models", response_model=list[ActiveModel])
def status_models(request: Request, type: str = Query("image", pattern="^(image|text)$")):
    ctx = ctx_of(request)
    if type == "text":
        return []
    names = [m.name for m in ctx.catalog.models]
    with ctx.db.read() as session:
        # One grouped read over the waiting queue and one over the speed table.
        waiting = {
            model: (jobs, mps or 0.0)
            for model, jobs, mps in session.execute(
                select(QueueEntry.model, func.count(), func.sum(QueueEntry.megapixelsteps))
                .join(Generation, Generation.id == QueueEntry.generation_id)
                .where(Generation.state == "waiting").group_by(QueueEntry.model)
            ).all()
        }
        speed = {s.model: s for s in session.execute(select(ModelStat)).scalars()}
    out = []
    for name in names:
        jobs, mps = waiting.get(name, (0, 0.0))
        stat = speed.get(name)
        per_image = stat.ewma_interval if stat else 0.0
        out.append(ActiveModel(
            name=name, count=1, performance=round(1 / stat.ewma_seconds, 3) if stat else 0.0,
            queued=round(mps, 3), jobs=float(jobs), eta=int(jobs * per_image), type="image",
        ))
    return out


@router.get("/find_user")
def find_user(request: Request, apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        user = authenticate(ctx, session, apikey)
        return {
            "username": f"{user.username}#{user.id}", "id": user.id, "kudos": user.kudos,
            "concurrency": ctx.settings.max_waiting_per_user, "worker_count": 0,
            "worker_ids": [], "trusted": False, "flagged": False, "moderator": False,
            "pseudonymous": user.id == 0,
        }


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
