"""The AI Horde worker protocol for HTTP workers: pop a job, submit its result. The routes stay
thin; the rules live here.

Statement budget (pinned by tests): an image pop is 4 statements whether it hands out work or
not (user, the worker's update that also reads it, claim candidates, then the claim update or
the `skipped` count). The worker's update takes the long way (see worker_for_pop) when an
uptime bonus may be due: the worker read, the bonus's conditional update (_bonus_due), the
worker's update and, when it won the bonus, the ledger's rows and balance; on a new worker's
first pop, 4 or 5 more (its owner locked on PostgreSQL and the name read again, its owner's
workers counted, the insert that does nothing on a name taken meanwhile, the read back); a
submit is 2 (user, job) plus the result's check (no statement) and the finish
(compare-and-set, queue entry, speed, ledger, worker counters).

Nothing a worker says is taken on trust: its results are checked images of the job's size
(api/results.py), its censored states are paid by the requester, its faults hand the job to
another owner (api/db/queue.py _hand_back) and count toward a maintenance it cannot lift.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

from sqlalchemy import Double, Row, and_, bindparam, case, func, not_, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from api import known_models, ledger, metrics
from api.db import queue
from api.db.models import Generation, Request, User, Worker
from api.errors import HordeError
from api.results import check_image_result, check_result_size, result_cap
from api.images import Context
from api.text_schemas import TextPopInput, TextPopResponse, TextSubmitInput
from models.postprocess.registry import output_size
from api.worker_schemas import (
    ImagePopInput,
    ImagePopResponse,
    JobSubmitInput,
    PopMessage,
)

CENSORED_PLACEHOLDER_KEY = "placeholders/censored.webp"
# The cluster's own workers are named under this prefix (cluster/dispatcher.py cluster_worker,
# cluster/alchemy_runner.py): a worker of anyone else's by such a name would stop the
# dispatcher registering its own.
RESERVED_NAME_PREFIX = "rayhorde-cluster/"


def image_key(request_id: str, generation_id: str, claim_id: str) -> str:
    """Where a finished generation's image is kept: written by the API (or the dispatcher)
    only, never by a worker (workers upload to `upload_key`), under a key of its claim's own,
    so a result that loses the compare-and-set (a late or second submit) never overwrites
    the image another claim committed; it is only published (the generation's storage_key)
    by the claim that wins."""
    return f"images/{request_id}/{generation_id}-{claim_id}.webp"


def upload_key(job_id: str, claim_id: str) -> str:
    """Where the worker holding one claim of a job uploads its result. Named by the job and the
    claim, never by the request (whose id lets anyone read and cancel all of it); each claim
    has its own object, so an upload from a claim that has moved on is never taken for the
    current one's."""
    return f"uploads/{job_id}/{claim_id}.webp"


def check_worker_name(name: str) -> None:
    """Refuse the names reserved for the cluster's own workers, whatever their case or the
    spaces around them (no look-alikes either)."""
    if name.strip().lower().startswith(RESERVED_NAME_PREFIX):
        raise HordeError(400, "ReservedWorkerName",
                         f"name: names starting with {RESERVED_NAME_PREFIX!r} are reserved for "
                         "this horde's own workers")


def worker_for_pop(ctx: Context, session, user: User, name: str, worker_type: str,
                   declared: dict, now: float, kind: str = "http") -> Worker | Row:
    """The caller's worker `name`, created on its first pop, updated with what it `declared`
    now (Worker columns); its uptime, and the uptime bonus when one falls due. A name belongs to
    the user who first used it, and serves one type (image, text or interrogation); a user has
    at most `max_workers_per_user` of them (trusted users and moderators
    `max_workers_trusted`). Returns its POP_WORKER_COLUMNS, what a pop reads of it (on the
    usual pop a row of just those, on the long way the Worker)."""
    check_worker_name(name)
    worker = _touch(ctx, session, declared, now, worker_name=name, worker_owner=user.id,
                    worker_type=worker_type)
    if worker is not None:
        return worker
    worker = session.execute(select(Worker).where(Worker.name == name)).scalar_one_or_none()
    if worker is None:
        worker = _new_worker(ctx, session, name, user, worker_type, kind, now)
    if worker.owner_id != user.id:
        raise HordeError(403, "WrongCredentials", f"name: worker {name!r} belongs to another user")
    if worker.type != worker_type:
        raise HordeError(400, "WrongWorkerType",
                         f"name: worker {name!r} is an {worker.type} worker; pick another name")
    if worker.maintenance:
        raise HordeError(403, "MaintenanceMode",
                         f"worker {name!r} is in maintenance"
                         + (f" ({worker.maintenance_msg})" if worker.maintenance_msg else "")
                         + ": " + maintenance_end(worker, now))
    bonus = _bonus_due(ctx, session, worker.id, now)
    _touch(ctx, session, declared, now, worker_id=worker.id)
    if bonus:
        ledger.award(session, user.id, ctx.settings.uptime_bonus_kudos, kind="uptime",
                     ref=worker.id)
    return worker


def maintenance_end(worker: Worker, now: float) -> str:
    """Who can end a worker's maintenance, and from when."""
    if worker.maintenance_until is not None and worker.maintenance_until > now:
        at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(worker.maintenance_until))
        return f"this horde imposed it; its owner can end it from {at} on, a moderator now"
    return "its owner can end it with PUT /api/v2/workers/{id}"


def _new_worker(ctx: Context, session, name: str, user: User, worker_type: str, kind: str,
                now: float) -> Worker:
    """The worker `name` on its first pop: created within the owner's cap, unless a concurrent
    first pop of the same name did it first. On PostgreSQL the owner's row is locked first, so
    first pops under new names at once cannot pass the cap together, and a pop that waited
    for another first pop of its name finds that one's worker (read again after the lock)
    instead of counting it against the cap. The insert does nothing on a name taken
    meanwhile (by another owner too: the caller then refuses it), so no race on the name's
    unique index ends in an error."""
    if session.bind.dialect.name == "postgresql":
        session.execute(select(User.id).where(User.id == user.id).with_for_update())
        existing = session.execute(select(Worker).where(Worker.name == name)).scalar_one_or_none()
        if existing is not None:
            return existing
    _check_worker_count(ctx, session, user)
    ins = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
    session.execute(ins(Worker.__table__).values(
        id=str(uuid.uuid4()), name=name, owner_id=user.id, kind=kind, type=worker_type,
        models=[], last_seen=now, created_at=now, last_bonus_at=now, max_pixels=512 * 512,
        max_length=0, max_context_length=0, tokens_generated=0, nsfw=False, threads=1,
        bridge_agent="", capabilities={}, maintenance=False, connected=False, jobs_done=0,
        megapixelsteps_done=0.0, kudos_earned=0.0, seconds_working=0.0, dropped_jobs=0,
        consecutive_drops=0, uptime_seconds=0.0,
    ).on_conflict_do_nothing(index_elements=["name"]))
    return session.execute(select(Worker).where(Worker.name == name)).scalar_one()


def _bonus_due(ctx: Context, session, worker_id: str, now: float) -> bool:
    """Whether this pop earns the worker's uptime bonus: a conditional update that starts the
    next bonus period, which only one transaction can win (on PostgreSQL the others, waiting
    on the row, find its condition false once the winner commits), however many pops arrive
    at once. Due when the worker was online, a period has passed, and it finished a job for
    someone else in it (api/db/queue.py finish_in keeps last_job_at): popping alone, under any
    number of names, mints nothing."""
    s = ctx.settings
    if not s.uptime_bonus_kudos:
        return False
    W = _W
    return session.execute(
        update(Worker.__table__)
        .where(W.id == worker_id, W.last_seen > now - s.stale_worker_seconds,
               W.last_bonus_at <= now - s.uptime_bonus_seconds, W.last_job_at.is_not(None),
               W.last_job_at >= W.last_bonus_at)
        .values(last_bonus_at=now).returning(W.id)).first() is not None


# What a pop reads of its worker (its id; is_slow's counters): the usual pop's update returns
# these columns, not the whole row through the ORM, which cost more than the update itself.
_W = Worker.__table__.c
POP_WORKER_COLUMNS = (_W.id, _W.type, _W.seconds_working, _W.megapixelsteps_done,
                      _W.tokens_generated)


def _touch(ctx: Context, session, declared: dict, now: float, **where):
    """A pop's update of its worker (see _touch_statement), one statement. By `worker_id`:
    worker_for_pop's long way, which read the worker first. Otherwise the usual pop in one
    statement, by `worker_name`, `worker_owner` and `worker_type`: the worker is updated and
    returned only if it is not in maintenance and no uptime bonus falls due; None for every
    other case, which worker_for_pop then takes the long way (to create the worker, say why
    not, or pay the bonus). A round trip to the database costs about as much as the rest of an
    empty pop's own work."""
    s = ctx.settings
    by_id = "worker_id" in where
    statement = _touch_statement(tuple(declared), s.stale_worker_seconds,
                                 s.uptime_bonus_seconds, bool(s.uptime_bonus_kudos), by_id)
    params = {**where, "now": now, **{f"declared_{k}": v for k, v in declared.items()}}
    result = session.execute(statement, params)
    return None if by_id else result.one_or_none()


@lru_cache(maxsize=32)
def _touch_statement(declared: tuple[str, ...], stale_seconds: float, bonus_seconds: float,
                     bonus_paid: bool, by_id: bool):
    """_touch's statement: the `declared` columns, last_seen, and the uptime rules in SQL (SET
    expressions read the row as it was): the time since the last pop counts while the worker
    was online, and the bonus period starts again when one is over or after a gap. Built once
    per shape (the columns a pop declares) and run with its values bound: building the
    expression costs more than running it."""
    # Table columns (_W), not the ORM's attributes: a statement naming those is run through
    # the ORM's bulk update, which costs more than the update itself.
    W = _W
    at = bindparam("now", type_=Double)
    since_seen = at - W.last_seen
    online = since_seen < stale_seconds
    period_over = and_(online, at - W.last_bonus_at >= bonus_seconds)
    # (bind names other than the columns': those are SQLAlchemy's own in an UPDATE)
    if by_id:
        conditions = [W.id == bindparam("worker_id")]
    else:
        conditions = [W.name == bindparam("worker_name"),
                      W.owner_id == bindparam("worker_owner"),
                      W.type == bindparam("worker_type"), W.maintenance.is_(False)]
        if bonus_paid:
            worked = and_(W.last_job_at.is_not(None),
                          W.last_job_at >= W.last_bonus_at)
            conditions.append(not_(and_(period_over, worked)))
    statement = (
        update(Worker.__table__).where(*conditions)
        .values(**{k: bindparam(f"declared_{k}", type_=W[k].type) for k in declared},
                last_seen=at,
                uptime_seconds=W.uptime_seconds + case((online, since_seen), else_=0.0),
                last_bonus_at=case((or_(period_over, not_(online)), at),
                                   else_=W.last_bonus_at)))
    return statement if by_id else statement.returning(*POP_WORKER_COLUMNS)


def _check_worker_count(ctx: Context, session, user: User) -> None:
    """Refuse a new worker past the owner's cap (403 TooManyWorkers)."""
    s = ctx.settings
    cap = s.max_workers_trusted if user.trusted or user.moderator else s.max_workers_per_user
    owned = session.execute(select(func.count()).select_from(
        select(Worker.id).where(Worker.owner_id == user.id, Worker.kind == "http")
        .limit(cap).subquery())).scalar_one()
    if owned >= cap:
        raise HordeError(403, "TooManyWorkers",
                         f"name: you have {owned} workers, the most your account may have; pop "
                         "with one of their names, or rename one (PUT /api/v2/workers/{id})")


def is_slow(ctx: Context, worker: Worker | Row) -> bool:
    """Measured slower than requests with `slow_workers: false` accept (megapixelsteps per
    second for image workers, tokens per second for text ones); unmeasured workers are not."""
    if not worker.seconds_working:
        return False
    if worker.type == "text":
        return worker.tokens_generated / worker.seconds_working < ctx.settings.slow_worker_tps
    return worker.megapixelsteps_done / worker.seconds_working < ctx.settings.slow_worker_mps


def priority_ids(usernames: list[str]) -> tuple[int, ...]:
    return tuple(int(n.rpartition("#")[2]) for n in usernames)


def capabilities(ctx: Context, user: User, worker: Worker, body: ImagePopInput,
                 models: list[str]) -> queue.Capabilities:
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
    entries = {m: known_models.known_entry(ctx, m, "image") for m in models}
    if body.limit_max_steps:
        limits = [e.requirements.max_steps for e in entries.values() if e]
        max_steps = max((x for x in limits if x is not None), default=None)
    # Requests that name no model run on the first model that is not inpainting-only.
    any_model = next((m for m in models if not (e := entries[m]) or not e.inpainting), "")
    return queue.Capabilities(
        worker_id=worker.id, owner_id=user.id, models=models, any_model=any_model,
        max_pixels=body.max_pixels,
        nsfw=body.nsfw,
        trusted=user.trusted, slow=is_slow(ctx, worker), extra_slow=body.extra_slow_worker,
        require_upfront_kudos=body.require_upfront_kudos, max_steps=max_steps,
        features=features, blacklist=tuple(body.blacklist),
        priority_user_ids=priority_ids(body.priority_usernames))


def served_models(ctx: Context, user: User, models: list[str], kind: str):
    """(the models a worker may offer of those it names, a message naming the others). A
    worker may offer the models this horde serves and those of the AI Horde's model reference,
    of its kind; a customizer's workers also names neither knows (api/known_models.py). The
    others are ignored, as the AI Horde ignores unknown models, and the pop says which."""
    accepted, refused = known_models.accepted_offer(ctx, user, models, kind)
    message = None
    if refused:
        message = PopMessage(message=f"models: neither served by this horde nor {kind} models of "
                                     f"the AI Horde's model reference, ignored: "
                                     f"{', '.join(refused[:20])}", origin="rayhorde")
    return accepted, ([message] if message else None)


def owner_of(caller: User | Callable[[Session], User], session: Session) -> User:
    """A pop's worker owner: given, or authenticated by the route inside the pop's own
    transaction (one transaction per pop, not one to authenticate and one to claim)."""
    return caller(session) if callable(caller) else caller


def pop_image(ctx: Context, caller: User | Callable[[Session], User],
              body: ImagePopInput) -> ImagePopResponse:
    now = time.time()
    with ctx.db.write() as session:
        user = owner_of(caller, session)
        served, messages = served_models(ctx, user, body.models, "image")
        declared = {
            "models": served, "max_pixels": body.max_pixels, "nsfw": body.nsfw,
            "threads": body.threads, "bridge_agent": body.bridge_agent[:200],
            "capabilities": {k: getattr(body, k) for k in (
                "allow_img2img", "allow_painting", "allow_post_processing", "allow_controlnet",
                "allow_sdxl_controlnet", "allow_lora", "extra_slow_worker",
                "require_upfront_kudos")},
        }
        worker = worker_for_pop(ctx, session, user, body.name, "image", declared, now)
        caps = capabilities(ctx, user, worker, body, served)
        jobs = queue.claim_in(session, caps, body.amount, now, one_request=True)
        if not jobs:
            queue.commit_lazily(session)
            # Reason names are the keys of horde-sdk's skipped model ("post-processing" too).
            return ImagePopResponse(payload={}, ids=[], messages=messages,
                                    skipped=queue.skipped_in(session, caps))
    metrics.jobs_claimed(jobs, "http")
    first, p = jobs[0], jobs[0].params
    prompt = first.prompt + (f" ### {first.negative_prompt}" if first.negative_prompt else "")
    payload = {
        "prompt": prompt, "ddim_steps": p["steps"], "n_iter": len(jobs), "seed": str(first.seed),
        "width": p["width"], "height": p["height"], "sampler_name": p["sampler_name"],
        "cfg_scale": p["cfg_scale"], "karras": p["karras"], "clip_skip": p["clip_skip"],
        "tiling": p["tiling"], "hires_fix": p["hires_fix"], "post_processing": p["post_processing"],
        "facefixer_strength": p.get("facefixer_strength"),
        "use_nsfw_censor": first.censor_nsfw, "transparent": p.get("transparent", False),
        "hires_fix_denoising_strength": p.get("hires_fix_denoising_strength"),
        "loras": p.get("loras", []), "tis": p.get("tis", []),
        "control_type": p.get("control_type"), "image_is_control": p.get("image_is_control", False),
        "return_control_map": p.get("return_control_map", False),
    }
    if p.get("control_strength") is not None:
        payload["control_strength"] = p["control_strength"]
    if p.get("workflow"):
        payload.update(workflow=p["workflow"], extra_texts=p.get("extra_texts") or [])
    if first.source_image_key is not None:
        payload["denoising_strength"] = p.get("denoising_strength")
    ids = [j.generation_id for j in jobs]
    # Each valid as long as its claim: its deadline is now + ttl too.
    uploads = [ctx.storage.upload_url(upload_key(j.generation_id, j.claim_id), j.ttl)
               for j in jobs]
    # The stored source and mask, as URLs the worker downloads (valid for the job's time).
    source = mask = extras = None
    if first.source_image_key is not None:
        source = ctx.storage.url(first.source_image_key)
        if first.source_mask_key is not None:
            mask = ctx.storage.url(first.source_mask_key)
        if first.extra_sources:
            extras = [{"image": ctx.storage.url(e["key"]), "strength": e["strength"]}
                      for e in first.extra_sources]
    return ImagePopResponse(
        payload=payload, ids=ids, id=ids[0], model=first.model, shared=first.shared,
        source_processing=first.source_processing or "txt2img", source_image=source,
        source_mask=mask, extra_source_images=extras, r2_upload=uploads[0], r2_uploads=uploads,
        ttl=first.ttl,
        skipped={}, messages=messages,
    )


class Held(NamedTuple):
    claim_id: str
    worker_id: str
    worker_name: str
    seed: int
    request_id: str
    model: str | None = None  # for metrics
    started_at: float | None = None  # when it was claimed
    params: dict | None = None  # the request's: what the job makes


def record(ctx: Context, user: User, generation_id: str, state: str,
           result: Callable[[Held], queue.Result]) -> tuple[float, Held]:
    """A worker's submit, image or text: the job must be held by one of `user`'s workers; a
    fault hands it back to the queue (api/db/queue.py _hand_back: it counts against the
    worker's owner, never again goes to that owner's workers, and as a drop against the
    worker), anything else is recorded exactly once through `result(held)`. Returns the
    reward credited to `user`, and the claim it was for."""
    now = time.time()
    s = ctx.settings
    with ctx.db.write() as session:
        held = held_by(session, user, generation_id)
        if state == "faulted":
            queue.release_in(session, [(generation_id, held.claim_id)],
                             f"worker {held.worker_name} reported a fault", s.max_attempts,
                             s.max_consecutive_drops, s.drop_maintenance_seconds, now)
            return 0.0, held
        try:
            outcome = result(held)
        except HordeError as e:
            # A submit of the same claim that committed meanwhile (PostgreSQL) consumed the
            # upload: read again (one statement), this one is a duplicate (held_by raises
            # DuplicateGen) or its claim is gone.
            if e.rc == "MissingUpload" and held_by(session, user, generation_id).claim_id \
                    != held.claim_id:
                raise HordeError(400, "RequestExpired",
                                 f"id: generation {generation_id} is no longer held by "
                                 "this claim") from None
            raise
        finished = queue.finish_in(session, [outcome], now)
        if not finished:  # another submit of the same job won the compare-and-set
            raise HordeError(400, "DuplicateGen", f"id: generation {generation_id} was already submitted")
        return finished[0].reward, held


def censored_state(body: JobSubmitInput) -> bool:
    return body.state in ("censored", "csam") or body.censored


def submit_image(ctx: Context, user: User, body: JobSubmitInput,
                 worker_requester: str | None = None) -> float:
    """A worker's image result: checked (api/results.py), stored under its claim's own key,
    and paid like any other whatever state the worker declares (a censored or CSAM image is
    never kept: the requester gets the placeholder). `worker_requester`: the submitting
    address as an anonymous requester (see queue.Result)."""
    stored: list[str] = []

    def result(held: Held) -> queue.Result:
        metadata = list(body.gen_metadata)
        censored = censored_state(body)
        if censored:
            ctx.storage.delete(upload_key(body.id, held.claim_id))
            key = censored_placeholder(ctx.storage)
            if not any(m.get("type") == "censorship" for m in metadata):
                metadata.append({"type": "censorship",
                                 "value": "csam" if body.state == "csam" else "nsfw"})
        else:
            p = held.params or {}
            size = output_size(p["width"], p["height"], p.get("post_processing"))
            key = store_result_image(ctx, body.generation, upload_key(body.id, held.claim_id),
                                     image_key(held.request_id, body.id, held.claim_id),
                                     "generation", {size})
            stored.append(key)
        return queue.Result(
            generation_id=body.id, claim_id=held.claim_id, storage_key=key,
            seed=body.seed if body.seed is not None else held.seed, worker_id=held.worker_id,
            worker_name=held.worker_name, owner_id=user.id, censored=censored,
            gen_metadata=metadata, worker_requester=worker_requester)

    try:
        reward, held = record(ctx, user, body.id, body.state, result)
    except BaseException:
        for key in stored:  # this claim's own key: nothing published it
            ctx.storage.delete(key)
        raise
    metrics.job_submitted(held.model, "image", body.state, held.started_at)
    if body.state == "faulted" or body.generation == "R2":
        # Once committed: the result was copied under its final key (or the claim ended), and
        # a submit that failed before this point keeps its upload, to be sent again.
        ctx.storage.delete(upload_key(body.id, held.claim_id))
    return reward


def held_by(session, user: User, generation_id: str) -> Held:
    """The claim of a generation one of `user`'s workers holds now; otherwise the AI Horde's
    error for why not. One statement."""
    row = session.execute(
        select(Generation.state, Generation.claim_id, Generation.seed, Worker.id, Worker.name,
               Worker.owner_id, Generation.request_id, Generation.model, Generation.started_at,
               Request.params)
        .outerjoin(Worker, Worker.id == Generation.claimed_by)
        .join(Request, Request.id == Generation.request_id)
        .where(Generation.id == generation_id)
    ).first()
    if row is None:
        raise HordeError(404, "InvalidJobID", f"id: no generation {generation_id}")
    (state, claim_id, seed, worker_id, worker_name, owner_id, request_id, model, started_at,
     params) = row
    if state == "done":
        raise HordeError(400, "DuplicateGen", f"id: generation {generation_id} was already submitted")
    if state == "cancelled":
        raise HordeError(400, "AbortedGen", f"id: generation {generation_id} was cancelled by its requester")
    if state != "processing" or owner_id != user.id:
        raise HordeError(400, "RequestExpired",
                         f"id: generation {generation_id} is not held by your workers: its time "
                         "to live ran out and it went back to the queue")
    return Held(claim_id, worker_id, worker_name, seed, request_id, model, started_at, params)


def store_result_image(ctx: Context, value: str, upload: str, key: str, field: str,
                       sizes: set[tuple[int, int]]) -> str:
    """A worker's image result stored under `key`: "R2" (it uploaded to its claim's URL,
    `upload`) or inline base64; a WebP, PNG or JPEG of one of `sizes` within the size cap
    (api/results.py), else a 400 naming `field`. Shared by image jobs and alchemy's
    post-processor forms."""
    cap = result_cap(ctx.settings, *max(sizes))
    if value == "R2":
        missing = HordeError(400, "MissingUpload",
                             f"{field}: 'R2' but nothing was uploaded to this job's r2_upload URL")
        size = ctx.storage.size(upload)
        if size is None:
            raise missing
        if size > cap:
            ctx.storage.delete(upload)  # a result that fits may be uploaded in its place
            check_result_size(size, cap, field)
        try:  # gone meanwhile: a submit of the same claim committed (and deleted it)
            check_image_result(ctx.storage.get(upload), sizes, cap, field)
            # Copied under `key`, which no worker can write: later uploads change nothing the
            # requester reads. The caller deletes `upload` once its transaction commits.
            ctx.storage.copy(upload, key)
        except FileNotFoundError:
            raise missing from None
        return key
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HordeError(400, "BadRequest", f"{field}: neither 'R2' nor base64 image data") from None
    if not data:
        raise HordeError(400, "BadRequest", f"{field}: empty image")
    check_image_result(data, sizes, cap, field)
    ctx.storage.put(key, data, "image/webp")
    return key


def censored_placeholder(storage) -> str:
    """The image a censored generation shows: a plain grey WebP, stored once."""
    if not storage.exists(CENSORED_PLACEHOLDER_KEY):
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, format="WEBP")
        storage.put(CENSORED_PLACEHOLDER_KEY, buf.getvalue(), "image/webp")
    return CENSORED_PLACEHOLDER_KEY


def pop_text(ctx: Context, caller: User | Callable[[Session], User],
             body: TextPopInput) -> TextPopResponse:
    """The text worker protocol's pop: like an image pop, with the worker's token limits
    instead of pixels. Chat requests (OpenAI messages) stay with the cluster's own deployment."""
    now = time.time()
    with ctx.db.write() as session:
        user = owner_of(caller, session)
        served, messages = served_models(ctx, user, body.models, "text")
        declared = {"models": served, "max_length": body.max_length,
                    "max_context_length": body.max_context_length, "nsfw": body.nsfw,
                    "threads": body.threads, "bridge_agent": body.bridge_agent[:200],
                    "capabilities": {"extra_slow_worker": body.extra_slow_worker,
                                     "require_upfront_kudos": body.require_upfront_kudos}}
        worker = worker_for_pop(ctx, session, user, body.name, "text", declared, now)
        caps = queue.Capabilities(
            worker_id=worker.id, owner_id=user.id, models=served, kind="text",
            max_length=body.max_length,
            max_context_length=body.max_context_length, nsfw=body.nsfw, trusted=user.trusted,
            slow=is_slow(ctx, worker), extra_slow=body.extra_slow_worker,
            require_upfront_kudos=body.require_upfront_kudos, blacklist=tuple(body.blacklist),
            features=queue.ALL_FEATURES & ~queue.Feature.CHAT,
            priority_user_ids=priority_ids(body.priority_usernames))
        jobs = queue.claim_in(session, caps, body.amount, now, one_request=True)
        if not jobs:
            queue.commit_lazily(session)
            return TextPopResponse(payload={}, ids=[], messages=messages,
                                   skipped=queue.skipped_in(session, caps))
    metrics.jobs_claimed(jobs, "http")
    first = jobs[0]
    payload = {"prompt": first.prompt, "n": len(jobs),
               **{k: v for k, v in first.params.items() if k in TEXT_PAYLOAD_KEYS}}
    ids = [j.generation_id for j in jobs]
    return TextPopResponse(payload=payload, ids=ids, id=ids[0], model=first.model,
                           ttl=first.ttl, skipped={}, messages=messages)


# What a text pop hands a worker of a request's stored parameters (horde-sdk's
# ModelPayloadKobold field names).
TEXT_PAYLOAD_KEYS = ("max_length", "max_context_length", "temperature", "top_p", "top_k",
                     "typical", "min_p", "rep_pen", "rep_pen_range", "stop_sequence")


def submit_text(ctx: Context, user: User, body: TextSubmitInput,
                worker_requester: str | None = None) -> float:
    """A worker's text result, paid for the tokens it delivered (queue.earned: counted from
    the text, never as the worker says), whatever state it declares."""
    def result(held: Held) -> queue.Result:
        text = "" if body.state == "csam" else body.generation
        return queue.Result(
            generation_id=body.id, claim_id=held.claim_id, storage_key=None, seed=held.seed,
            worker_id=held.worker_id, worker_name=held.worker_name, owner_id=user.id,
            censored=body.state in ("censored", "csam"), gen_metadata=list(body.gen_metadata),
            text=text, completion_tokens=queue.text_tokens(text),
            worker_requester=worker_requester)

    reward, held = record(ctx, user, body.id, body.state, result)
    metrics.job_submitted(held.model, "text", body.state, held.started_at)
    return reward
