"""Worker routes: the AI Horde worker protocol (`/generate/pop`, `/generate/submit`) and the
worker records (`/workers`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Header, Query, Request
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from api import workers
from api.db.models import User, Worker
from api.errors import HordeError
from api.routes.deps import ctx_of, rate_limited, registered, worker_submit
from api.worker_schemas import (
    ImagePopInput,
    ImagePopResponse,
    JobSubmitInput,
    JobSubmitResponse,
    WorkerDetails,
    WorkerKudosDetails,
    WorkerModify,
    WorkerModifyResponse,
)

router = APIRouter(tags=["workers"])
worker_limit = Depends(rate_limited("pop"))


@router.post("/generate/pop", response_model=ImagePopResponse, response_model_exclude_none=True,
             dependencies=[worker_limit])
async def generate_pop(body: ImagePopInput, request: Request, apikey: str | None = Header(None)):
    # async around one thread hop (see deps.in_read_session).
    ctx = ctx_of(request)
    return await run_in_threadpool(
        workers.pop_image, ctx, lambda session: registered(ctx, session, apikey, "a worker"),
        body)


@router.post("/generate/submit", response_model=JobSubmitResponse, dependencies=[worker_limit])
async def generate_submit(body: JobSubmitInput, request: Request,
                          apikey: str | None = Header(None)):
    return await worker_submit(request, apikey, workers.submit_image, body)


def _text_limits(ctx, worker: Worker) -> tuple[int, int]:
    """(max_length, max_context_length) of a text worker: what it declared at its last pop, or
    for the cluster's own (which declares nothing) the largest its catalog models take."""
    if worker.kind != "cluster":
        return worker.max_length, worker.max_context_length
    entries = [e for e in map(ctx.catalog.get, worker.models or []) if e is not None]
    return (max((e.max_length or 0 for e in entries), default=0),
            max((e.max_context_length or 0 for e in entries), default=0))


def details(ctx, worker: Worker, owner: User, now: float) -> WorkerDetails:
    """A worker as the AI Horde shows it: image workers with their image capabilities, text
    workers with their token limits."""
    s = ctx.settings
    caps = worker.capabilities or {}
    # A Ray-joined node is online while it is in the cluster; an HTTP worker while it pops.
    online = worker.connected if worker.kind == "node" else now - worker.last_seen < s.stale_worker_seconds
    if worker.type == "text":
        tps = worker.tokens_generated / worker.seconds_working if worker.seconds_working else 0.0
        max_length, max_context_length = _text_limits(ctx, worker)
        by_type = dict(performance=f"{tps:.1f} tokens per second", max_length=max_length,
                       max_context_length=max_context_length,
                       tokens_generated=int(worker.tokens_generated))
    else:
        mps = worker.megapixelsteps_done / worker.seconds_working if worker.seconds_working else 0.0
        by_type = dict(
            performance=f"{mps:.2f} megapixelsteps per second",
            img2img=caps.get("allow_img2img"), painting=caps.get("allow_painting"),
            post_processing=caps.get("allow_post_processing"), lora=caps.get("allow_lora"),
            controlnet=caps.get("allow_controlnet"),
            sdxl_controlnet=caps.get("allow_sdxl_controlnet"), max_pixels=worker.max_pixels,
            megapixelsteps_generated=int(worker.megapixelsteps_done))
    return WorkerDetails(
        type=worker.type, name=worker.name, id=worker.id, maintenance_mode=worker.maintenance,
        bridge_agent=worker.bridge_agent or "unknown:0:unknown", online=online,
        nsfw=worker.nsfw, trusted=worker.kind == "cluster" or owner.trusted,
        flagged=owner.flagged, requests_fulfilled=worker.jobs_done,
        kudos_rewards=round(worker.kudos_earned, 2),
        kudos_details=WorkerKudosDetails(generated=round(worker.kudos_earned, 2),
                                         uptime=int(worker.uptime_seconds)),
        threads=worker.threads, uptime=int(worker.uptime_seconds),
        uncompleted_jobs=worker.dropped_jobs, info=worker.info,
        owner=f"{owner.username}#{owner.id}", models=list(worker.models or []), **by_type,
    )


@router.get("/workers", response_model=list[WorkerDetails], response_model_by_alias=True,
            response_model_exclude_none=True)
def list_workers(request: Request, type: str = Query("", max_length=20),
                 name: str | None = Query(None, max_length=100)):
    """Every worker, the cluster's own first; `type` (image, text or interrogation; empty,
    as horde-sdk sends it, is all) and `name` (any case, as on the AI Horde) filter them."""
    if type not in ("", "image", "text", "interrogation"):
        raise HordeError(400, "BadRequest", "type: one of image, text, interrogation")
    ctx = ctx_of(request)
    stmt = select(Worker, User).join(User, User.id == Worker.owner_id)
    if type:
        stmt = stmt.where(Worker.type == type)
    if name:
        stmt = stmt.where(func.lower(Worker.name) == name.lower())
    now = time.time()
    with ctx.db.read() as session:
        rows = session.execute(stmt.order_by(Worker.kind, Worker.name)).all()
        return [details(ctx, w, u, now) for w, u in rows]


def _load(session, worker_id: str) -> tuple[Worker, User]:
    row = session.execute(select(Worker, User).join(User, User.id == Worker.owner_id)
                          .where(Worker.id == worker_id)).first()
    if row is None:
        raise HordeError(404, "WorkerNotFound", f"id: no worker {worker_id}")
    return row[0], row[1]


@router.get("/workers/{worker_id}", response_model=WorkerDetails, response_model_by_alias=True,
            response_model_exclude_none=True)
def get_worker(worker_id: str, request: Request):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        worker, owner = _load(session, worker_id)
        return details(ctx, worker, owner, time.time())


@router.put("/workers/{worker_id}", response_model=WorkerModifyResponse,
            response_model_exclude_none=True)
def modify_worker(worker_id: str, body: WorkerModify, request: Request,
                  apikey: str | None = Header(None)):
    """Its owner or a moderator may put a worker into maintenance (or take it out), set its
    info or rename it."""
    ctx = ctx_of(request)
    with ctx.db.write() as session:
        user = registered(ctx, session, apikey, "changing a worker")
        worker, _owner = _load(session, worker_id)
        if worker.owner_id != user.id and not user.moderator:
            raise HordeError(403, "NotOwner", "apikey: only the worker's owner or a moderator")
        out = WorkerModifyResponse()
        now = time.time()
        if body.maintenance is False and worker.maintenance and not user.moderator \
                and worker.maintenance_until is not None and worker.maintenance_until > now:
            raise HordeError(403, "MaintenanceImposed",
                             f"maintenance: worker {worker.name!r} is in maintenance "
                             f"({worker.maintenance_msg}): {workers.maintenance_end(worker, now)}")
        if body.maintenance is not None:
            worker.maintenance = out.maintenance = body.maintenance
            worker.maintenance_msg = body.maintenance_msg if body.maintenance else None
            if not body.maintenance:
                worker.consecutive_drops = 0
                worker.maintenance_until = None
        if body.info is not None:
            worker.info = out.info = body.info
        if body.name is not None and body.name != worker.name:
            workers.check_worker_name(body.name)
            taken = session.execute(select(Worker.id).where(Worker.name == body.name)).first()
            if taken:
                raise HordeError(400, "NameAlreadyExists", f"name: {body.name!r} is taken")
            worker.name = out.name = body.name
        return out
