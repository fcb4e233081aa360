"""The AI Horde worker protocol for HTTP workers: pop a job, submit its result. The routes stay
thin; the rules live here.

Statement budget (pinned by tests): an image pop is 5 statements whether it hands out work or
not (user, worker, worker update, claim candidates, then the claim update or the `skipped`
count), plus 3 when an uptime bonus falls due; a submit is 2 (user, job) plus the finish
(compare-and-set, queue entry, speed, ledger, worker counters).
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid

from sqlalchemy import select, update

from api import ledger
from api.db import queue
from api.db.models import Generation, User, Worker
from api.errors import HordeError
from api.images import Context
from api.worker_schemas import (
    ImagePopInput,
    ImagePopResponse,
    JobSubmitInput,
    PopMessage,
)

CENSORED_PLACEHOLDER_KEY = "placeholders/censored.webp"


def image_key(request_id: str, generation_id: str) -> str:
    return f"images/{request_id}/{generation_id}.webp"


def worker_for_pop(ctx: Context, session, user: User, body: ImagePopInput, kind: str,
                   now: float) -> Worker:
    """The caller's worker named `body.name`, created on its first pop, with what it declares
    now; its uptime, and the uptime bonus when one falls due. A name belongs to the user who
    first used it."""
    s = ctx.settings
    worker = session.execute(select(Worker).where(Worker.name == body.name)).scalar_one_or_none()
    if worker is None:
        worker = Worker(id=str(uuid.uuid4()), name=body.name, owner_id=user.id, kind=kind,
                        type="image", models=[], last_seen=now, created_at=now,
                        last_bonus_at=now)
        session.add(worker)
        session.flush()
    elif worker.owner_id != user.id:
        raise HordeError(403, "WrongCredentials",
                         f"name: worker {body.name!r} belongs to another user")
    if worker.maintenance:
        raise HordeError(403, "MaintenanceMode",
                         f"worker {body.name!r} is in maintenance"
                         + (f" ({worker.maintenance_msg})" if worker.maintenance_msg else "")
                         + ": its owner can end it with PUT /api/v2/workers/{id}")
    online = now - worker.last_seen < s.stale_worker_seconds
    uptime = worker.uptime_seconds + (now - worker.last_seen if online else 0.0)
    bonus_due = online and now - worker.last_bonus_at >= s.uptime_bonus_seconds
    session.execute(update(Worker).where(Worker.id == worker.id).values(
        models=list(body.models), max_pixels=body.max_pixels, nsfw=body.nsfw,
        threads=body.threads, bridge_agent=body.bridge_agent[:200], last_seen=now,
        uptime_seconds=uptime, last_bonus_at=now if bonus_due or not online else worker.last_bonus_at,
        capabilities={k: getattr(body, k) for k in (
            "allow_img2img", "allow_painting", "allow_post_processing", "allow_controlnet",
            "allow_sdxl_controlnet", "allow_lora", "extra_slow_worker", "require_upfront_kudos")},
    ))
    if bonus_due and s.uptime_bonus_kudos:
        ledger.award(session, user.id, s.uptime_bonus_kudos, kind="uptime", ref=worker.id)
    return worker


def capabilities(ctx: Context, user: User, worker: Worker, body: ImagePopInput,
                 models: list[str]) -> queue.Capabilities:
    s = ctx.settings
    speed = worker.megapixelsteps_done / worker.seconds_working if worker.seconds_working else None
    features = 0
    for allowed, feature in ((body.allow_img2img, queue.Feature.SOURCE_IMAGE),
                             (body.allow_painting, queue.Feature.PAINTING),
                             (body.allow_post_processing, queue.Feature.POST_PROCESSING),
                             (body.allow_controlnet, queue.Feature.CONTROLNET),
                             (body.allow_sdxl_controlnet, queue.Feature.SDXL_CONTROLNET),
                             (body.allow_lora, queue.Feature.LORA)):
        if allowed:
            features |= feature
    max_steps = None
    if body.limit_max_steps:
        limits = [ctx.catalog.get(m).requirements.max_steps for m in models if ctx.catalog.get(m)]
        max_steps = max((x for x in limits if x is not None), default=None)
    return queue.Capabilities(
        worker_id=worker.id, models=models, max_pixels=body.max_pixels, nsfw=body.nsfw,
        trusted=user.trusted, slow=speed is not None and speed < s.slow_worker_mps,
        extra_slow=body.extra_slow_worker, require_upfront_kudos=body.require_upfront_kudos,
        max_steps=max_steps, features=features, blacklist=tuple(body.blacklist),
        priority_user_ids=tuple(int(n.rpartition("#")[2]) for n in body.priority_usernames))


def pop_image(ctx: Context, user: User, body: ImagePopInput) -> ImagePopResponse:
    now = time.time()
    served = [m for m in body.models if ctx.catalog.get(m) or user.customizer]
    messages = None
    unknown = [m for m in body.models if m not in served]
    if unknown:
        messages = [PopMessage(message=f"models: not served by this horde, ignored: "
                                       f"{', '.join(unknown[:20])}", origin="rayhorde")]
    with ctx.db.write() as session:
        worker = worker_for_pop(ctx, session, user, body, "http", now)
        caps = capabilities(ctx, user, worker, body, served)
        jobs = queue.claim_in(session, caps, body.amount, now, one_request=True)
        if not jobs:
            # Reason names are the keys of horde-sdk's skipped model ("post-processing" too).
            return ImagePopResponse(payload={}, ids=[], messages=messages,
                                    skipped=queue.skipped_in(session, caps))
    first, p = jobs[0], jobs[0].params
    prompt = first.prompt + (f" ### {first.negative_prompt}" if first.negative_prompt else "")
    payload = {
        "prompt": prompt, "ddim_steps": p["steps"], "n_iter": len(jobs), "seed": str(first.seed),
        "width": p["width"], "height": p["height"], "sampler_name": p["sampler_name"],
        "cfg_scale": p["cfg_scale"], "karras": p["karras"], "clip_skip": p["clip_skip"],
        "tiling": p["tiling"], "hires_fix": p["hires_fix"], "post_processing": p["post_processing"],
        "use_nsfw_censor": first.censor_nsfw,
    }
    ids = [j.generation_id for j in jobs]
    uploads = [ctx.storage.upload_url(image_key(j.request_id, j.generation_id), first.ttl + 60)
               for j in jobs]
    return ImagePopResponse(
        payload=payload, ids=ids, id=ids[0], model=first.model, shared=first.shared,
        source_processing="txt2img", r2_upload=uploads[0], r2_uploads=uploads, ttl=first.ttl,
        skipped={}, messages=messages,
    )


def submit_image(ctx: Context, user: User, body: JobSubmitInput) -> float:
    """Record one generation's result, exactly once; returns the reward credited to `user`."""
    now = time.time()
    with ctx.db.write() as session:
        row = session.execute(
            select(Generation.state, Generation.claim_id, Generation.request_id,
                   Generation.seed, Worker.id, Worker.name, Worker.owner_id)
            .outerjoin(Worker, Worker.id == Generation.claimed_by)
            .where(Generation.id == body.id)
        ).first()
        if row is None:
            raise HordeError(404, "InvalidJobID", f"id: no generation {body.id}")
        state, claim_id, request_id, seed, worker_id, worker_name, owner_id = row
        if state == "done":
            raise HordeError(400, "DuplicateGen", f"id: generation {body.id} was already submitted")
        if state == "cancelled":
            raise HordeError(400, "AbortedGen", f"id: generation {body.id} was cancelled by its requester")
        if state != "processing" or owner_id != user.id:
            raise HordeError(400, "RequestExpired",
                             f"id: generation {body.id} is not held by your workers: its time to "
                             "live ran out and it went back to the queue")
        if body.state == "faulted":
            queue.release_in(session, [(body.id, claim_id)], f"worker {worker_name} reported a fault",
                             ctx.settings.max_attempts)
            return 0.0
        key = _store_result(ctx, body, image_key(request_id, body.id))
        censored = body.state in ("censored", "csam") or body.censored
        metadata = list(body.gen_metadata)
        if body.state == "csam":
            metadata.append({"type": "censorship", "value": "csam"})
        finished = queue.finish_in(session, [queue.Result(
            generation_id=body.id, claim_id=claim_id, storage_key=key,
            seed=body.seed if body.seed is not None else seed, worker_id=worker_id,
            worker_name=worker_name, owner_id=user.id, censored=censored,
            gen_metadata=metadata)], now)
        if not finished:  # another submit of the same job won the compare-and-set
            raise HordeError(400, "DuplicateGen", f"id: generation {body.id} was already submitted")
        return finished[0].reward


def _store_result(ctx: Context, body: JobSubmitInput, key: str) -> str:
    """Where the result's image is: uploaded by the worker to its upload URL ("R2"), or sent
    inline as base64 WebP. CSAM is never kept; the requester gets the placeholder."""
    if body.state == "csam":
        if ctx.storage.exists(key):
            ctx.storage.delete(key)
        return censored_placeholder(ctx)
    if body.generation == "R2":
        if not ctx.storage.exists(key):
            raise HordeError(400, "MissingUpload",
                             "generation: 'R2' but nothing was uploaded to this job's r2_upload URL")
        return key
    try:
        data = base64.b64decode(body.generation, validate=True)
    except (binascii.Error, ValueError):
        raise HordeError(400, "BadRequest", "generation: neither 'R2' nor base64 image data") from None
    if not data:
        raise HordeError(400, "BadRequest", "generation: empty image")
    ctx.storage.put(key, data, "image/webp")
    return key


def censored_placeholder(ctx: Context) -> str:
    """The image a censored generation shows: a plain grey WebP, stored once."""
    if not ctx.storage.exists(CENSORED_PLACEHOLDER_KEY):
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, format="WEBP")
        ctx.storage.put(CENSORED_PLACEHOLDER_KEY, buf.getvalue(), "image/webp")
    return CENSORED_PLACEHOLDER_KEY
