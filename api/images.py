"""Image requests: submit, check, status, cancel. The routes stay thin; the rules live here.

Statement budget (pinned by tests): submit 4 after authentication (the requester's active count
and what it owes, request, generations, queue entries; one more when it names workers, on
PostgreSQL when it needs kudos upfront: the balance's lock, and when it names only models the
cluster does not serve: the online workers' offers); check 3; status 4 (each one more while
it waits for models the cluster does not serve). None of them grows with `n` or with the queue.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from sqlalchemy import bindparam, case, func, select, union_all, update

from api import admission, image_workflows, known_models
from api.auth import ANONYMOUS_USER_ID
from api.db import queue
from api.db.models import Generation, ModelStat, QueueEntry, Request, User
from api.db.session import Database
from api.errors import HordeError
from api.filters import store as prompt_filters
from api.kudos import REQUEST_TAX, UPFRONT_PIXELS, UPFRONT_STEPS, image_cost, needs_upfront_kudos
from api.ratelimit import RateLimiter
from api.schemas import (
    ImageGeneration,
    ImageGenerateRequest,
    RequestStatusCheck,
    RequestStatusStable,
)
from api.settings import Settings
from api.storage import Storage
from models.adapters import AdapterCatalog
from models.catalog import Catalog, Family, ModelEntry
from models.reference import ModelReference, load_reference

EXTRA_SOURCE_TAX = 5.0  # kudos per remix image beyond the source, collected as tax
# Counting the queue ahead of a request stops here; beyond it the position is extrapolated.
POSITION_COUNT_CAP = 200
DEFAULT_SECONDS_PER_IMAGE = 10.0
SEED_SPACE = 2**32


@dataclass
class Context:
    settings: Settings
    db: Database
    storage: Storage
    catalog: Catalog  # the models this cluster serves
    limiter: RateLimiter | None = None
    adapters: AdapterCatalog = field(default_factory=AdapterCatalog)  # LoRAs and TIs
    filters: prompt_filters.FilterCache | None = None  # prompt filters (made by create_app)
    # The AI Horde's model reference: the models requests may name beyond the served ones
    # (api/known_models.py); the pinned copy unless given.
    reference: ModelReference | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.reference is None:
            self.reference = load_reference()


def seed_to_int(seed: str) -> int:
    """The AI Horde takes any string as a seed: ASCII digits are used as a number, anything else
    (including other scripts' digits and "²", which `isdigit` also accepts) is hashed to one,
    so the same string always gives the same images. The schemas bound its length."""
    if seed.isascii() and seed.isdigit():
        return int(seed) % SEED_SPACE
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "big")


def seeds_for(body: ImageGenerateRequest) -> list[int]:
    """One seed per image: the request's seed (or a random one) for the first, then stepping
    by `seed_variation` (default 1), so a worker given a batch of consecutive images and the
    first seed makes exactly these."""
    p = body.params
    base = secrets.randbelow(SEED_SPACE) if p.seed is None else seed_to_int(p.seed)
    step = p.seed_variation or 1
    return [(base + i * step) % SEED_SPACE for i in range(p.n)]


@dataclass(frozen=True)
class RequestModels:
    """The models an image request names (served, known to the reference, or a customizer's:
    api/known_models.py), the family whose rules it follows, and the catalog its workflow
    rules read (the served one, plus entries for the models nothing here runs)."""

    entries: list[ModelEntry]
    family: Family
    catalog: Catalog


def request_models(ctx: Context, body: ImageGenerateRequest, session=None) -> RequestModels:
    entries = known_models.resolve(ctx, list(body.models), "image", session)
    families = {e.family for e in entries}
    if len(families) > 1:
        raise HordeError(400, "MixedModelFamilies",
                         "models: all models of one request must be of one family")
    if families:
        family = families.pop()
    else:
        image_models = [m for m in ctx.catalog.models if m.family.kind == "image"]
        if not image_models:
            raise HordeError(400, "UnknownModel", "models: this cluster serves no image model")
        family = image_models[0].family
    catalog = ctx.catalog
    unserved = [e for e in entries if e.weights is None]
    if unserved:
        catalog = ctx.catalog.with_models(unserved)
    return RequestModels(entries, family, catalog)


def price(ctx: Context, body: ImageGenerateRequest) -> float:
    """The request's kudos (dry_run shows it); refuses what no workflow runs."""
    # Prompt filters (api/filters): a dry run is refused like the request would be; without
    # the user at hand it is not counted as suspicion.
    prompt_filters.screen(ctx, body.split_prompt()[0], body.replacement_filter)
    models = request_models(ctx, body)
    image_workflows.check(models.catalog, ctx.adapters, body, models.family)
    return _cost(body, models.family)


def _cost(body: ImageGenerateRequest, family: Family) -> float:
    """The AI Horde's legacy price: x1.3 with a source image, x3 for ControlNet, +3 per LoRA,
    +1 with TIs, +5 tax per remix image beyond the source; the hires fix also pays for its
    first pass (native size, the request's steps)."""
    p = body.params
    extras = dict(source_image=body.source_image is not None, loras=len(p.loras), tis=bool(p.tis),
                  controlnet=p.control_type is not None or p.workflow == "qr_code",
                  post_processors=len(p.post_processing))
    cost = image_cost(width=p.width, height=p.height, steps=p.steps, n=p.n, family=family, **extras)
    cost += EXTRA_SOURCE_TAX * len(body.extra_source_images or [])
    first = image_workflows.hires_first_pass(body, family)
    if first is not None:
        cost += image_cost(width=first[0], height=first[1], steps=p.steps, n=p.n, family=family,
                           source_image=extras["source_image"]) - REQUEST_TAX
    return round(cost, 2)


def prepare(ctx: Context, user: User | None, body: ImageGenerateRequest,
            charge=None) -> image_workflows.StoredSources:
    """Before the request's transaction (blocking, off the event loop), once the caller is
    authenticated: every rule that needs neither the sources nor a write (the workflow, and
    what the user's standing allows), then the sources fetched or decoded with limits, their
    pixels counted by `charge` before they are decoded, and stored once. A request refused
    by its rules costs no fetch and no decoding. (`user` is None for a request without
    sources: submit checks its standing.)"""
    models = request_models(ctx, body)
    image_workflows.check(models.catalog, ctx.adapters, body, models.family)
    if user is not None:
        check_standing(user, body, _cost(body, models.family))
    return image_workflows.store(ctx.settings, ctx.storage, body, charge)


def check_standing(user: User, body: ImageGenerateRequest, kudos: float) -> None:
    """What the request asks that the user's standing must allow: upfront kudos need a
    registered user, more than one extra source image a trusted one. (Whether the user holds
    the upfront kudos is checked in submit, under the balance's lock.)"""
    p = body.params
    if needs_upfront_kudos(p.width, p.height, p.steps) and user.id == ANONYMOUS_USER_ID:
        raise HordeError(403, "KudosUpfront", _upfront_refused(kudos) + ": register for an API key")
    if len(body.extra_source_images or []) > 1 and not user.trusted:
        raise HordeError(403, "InvalidExtraSourceImages",
                         "extra_source_images: more than one extra image needs a trusted user")


def _upfront_refused(kudos: float) -> str:
    return (f"params: a job over {UPFRONT_PIXELS} pixels or {UPFRONT_STEPS} steps "
            f"needs its {kudos} kudos upfront")


def requirement_warnings(entries: list[ModelEntry], body: ImageGenerateRequest) -> list[dict[str, str]]:
    """What in the request is outside the requirements of the models it names (the request is
    still accepted, as on the AI Horde). Codes are horde-sdk's WarningCode values."""
    p, out = body.params, []
    for entry in entries:
        name, req = entry.name, entry.requirements
        checks = [
            (req.min_steps is not None and p.steps < req.min_steps, "StepsTooFew",
             f"params.steps: {name} needs at least {req.min_steps} steps"),
            (req.max_steps is not None and p.steps > req.max_steps, "StepsTooMany",
             f"params.steps: {name} gives its best with at most {req.max_steps} steps"),
            (req.min_cfg_scale is not None and p.cfg_scale < req.min_cfg_scale, "CfgScaleTooSmall",
             f"params.cfg_scale: {name} needs a cfg_scale of at least {req.min_cfg_scale}"),
            (req.max_cfg_scale is not None and p.cfg_scale > req.max_cfg_scale, "CfgScaleTooLarge",
             f"params.cfg_scale: {name} needs a cfg_scale of at most {req.max_cfg_scale}"),
            (req.clip_skip is not None and p.clip_skip != req.clip_skip, "ClipSkipMismatch",
             f"params.clip_skip: {name} is made for clip_skip {req.clip_skip}"),
            (req.samplers is not None and p.sampler_name not in req.samplers, "SamplerMismatch",
             f"params.sampler_name: {name} is made for {', '.join(req.samplers or [])}"),
        ]
        out += [{"code": code, "message": message} for bad, code, message in checks if bad]
    return out


REQUEST_INSERT = Request.__table__.insert()


def submit(ctx: Context, user: User, body: ImageGenerateRequest, client_agent: str,
           requester: str, session,
           stored: image_workflows.StoredSources) -> tuple[Request, list[dict[str, str]]]:
    """Validate the request against the user's standing, then write it, its generations and
    their queue entries. Everything that can refuse it runs before the first write; the caller's
    transaction rolls back on any error (and deletes what `prepare` stored), so a refused
    request leaves nothing behind."""
    # Prompt filters (api/filters), first of all: a CSAM refusal commits the user's raised
    # suspicion before it raises, which must be the only write in this transaction.
    positive, negative = body.split_prompt()
    positive, filter_warnings = prompt_filters.screen(ctx, positive, body.replacement_filter,
                                                      session=session, user=user)
    p = body.params
    models = request_models(ctx, body, session)
    family = models.family
    image_workflows.check(models.catalog, ctx.adapters, body, family)
    warnings = (requirement_warnings(models.entries, body) + filter_warnings
                + known_models.availability_warnings(ctx, session, list(body.models), "image"))
    kudos = _cost(body, family)
    anonymous = user.id == ANONYMOUS_USER_ID
    upfront = needs_upfront_kudos(p.width, p.height, p.steps)
    check_standing(user, body, kudos)
    nsfw, censor_nsfw = body.nsfw, body.censor_nsfw
    if user.education:
        if nsfw or not censor_nsfw:
            warnings.append({"code": "EducationSFW", "message":
                             "nsfw, censor_nsfw: education accounts always get SFW images"})
        nsfw, censor_nsfw = False, True
    # Upfront kudos are reserved, not only checked: what the user's unfinished generations will
    # cost is spoken for, and its balance is locked first, so two such requests at once cannot
    # both count the same kudos. Other requests take the balance as read (no lock).
    balance = admission.lock_balance(session, user) if upfront else user.kudos
    owed = admission.check_capacity(ctx, session, user, requester, p.n)
    holds_upfront = not anonymous and balance - owed >= kudos
    if upfront and not holds_upfront:
        raise HordeError(403, "KudosUpfront",
                         _upfront_refused(kudos) + f"; you hold {round(balance, 2)}, of which "
                         f"{round(owed, 2)} pay for your generations still queued")
    admission.check_workers(session, body.workers)
    now = time.time()
    # Written through Core, not added to the session: the unit of work's flush of one row
    # cost a submit more CPU than any statement it runs. `req` is a plain (transient) object
    # holding what was written.
    row = dict(
        id=stored.request_id, kind="image", user_id=user.id, prompt=positive,
        negative_prompt=negative, params=p.model_dump(mode="json"), models=list(body.models),
        n=p.n, r2=body.r2, nsfw=nsfw, censor_nsfw=censor_nsfw, shared=body.shared, kudos=kudos,
        cancelled=False, client_agent=client_agent, created_at=now, requester=requester,
        workers=list(body.workers), worker_blacklist=body.worker_blacklist,
        trusted_workers=body.trusted_workers, slow_workers=body.slow_workers,
        extra_slow_workers=body.extra_slow_workers,
        source_processing=body.source_processing if body.source_image is not None else None,
        source_image_key=stored.image_key, source_mask_key=stored.mask_key,
        extra_sources=list(stored.extras) or None,
    )
    session.execute(REQUEST_INSERT, row)
    req = Request(**row)
    filters = queue.EntryFilters(
        user_id=user.id, steps=p.steps, pixels=p.width * p.height,
        megapixelsteps=p.width * p.height * p.steps / 1e6, nsfw=nsfw,
        # A requester who asked for censoring (education accounts always do) gets it only
        # from workers the horde trusts to censor: its own replicas (which run the horde's
        # safety check themselves) and trusted users' workers; an untrusted volunteer could
        # simply not censor.
        trusted_only=body.trusted_workers or censor_nsfw,
        slow_ok=body.slow_workers, extra_slow_ok=body.extra_slow_workers, upfront=holds_upfront,
        target_mode=admission.target_mode(body.workers, body.worker_blacklist),
        target_workers=tuple(body.workers), features=image_workflows.features(body, family),
    )
    total_tax = REQUEST_TAX + EXTRA_SOURCE_TAX * len(body.extra_source_images or [])
    queue.enqueue(session, req, seeds_for(body), list(body.models),
                  sort_key=now - admission.head_start(ctx, user),
                  filters=filters, reward=(kudos - total_tax) / p.n, tax=total_tax / p.n)
    return req, warnings


def _load_request(session, request_id: str, kind: str = "image") -> Request:
    req = session.get(Request, request_id)
    if req is None or req.kind != kind:
        raise HordeError(404, "RequestNotFound", f"id: request {request_id} not found")
    return req


class RequestSummary(NamedTuple):
    """What the status routes read of a request (not the whole row: prompts and params stay)."""

    id: str
    kind: str
    models: list
    kudos: float
    r2: bool
    shared: bool


def _with_counts_statement():
    """The request's columns and, per state of its generations, their count, those restarted
    and those expired because no worker took them (api/known_models.py): one row per state
    (one with state NULL when it has none). Built once; each check binds `rid`."""
    R, G = Request, Generation
    return (select(R.id, R.kind, R.models, R.kudos, R.r2, R.shared, G.state, func.count(G.id),
                   func.sum(case((G.attempts > 1, 1), else_=0)),
                   func.sum(case((G.fault_reason == known_models.UNCLAIMED_REASON, 1), else_=0)))
            .select_from(R).outerjoin(G, G.request_id == R.id)
            .where(R.id == bindparam("rid")).group_by(R.id, G.state))


_WITH_COUNTS = _with_counts_statement()


def _load_with_counts(session, request_id: str, kind: str) -> tuple[RequestSummary, dict[str, int]]:
    rows = session.execute(_WITH_COUNTS, {"rid": request_id}).all()
    if not rows or rows[0][1] != kind:
        raise HordeError(404, "RequestNotFound", f"id: request {request_id} not found")
    req = RequestSummary(*rows[0][:6])
    counts = {state: n for *_, state, n, _, _ in rows if state is not None}
    counts["restarted"] = sum(int(r or 0) for *_, r, _ in rows)
    counts["expired"] = sum(int(e or 0) for *_, e in rows)
    return req, counts


@functools.lru_cache(maxsize=32)
def _estimate_statement(n_models: int):
    """The position query for a request naming `n_models` models (0: any), with bound
    parameters rid, kind and m0.. m{n-1}: built once per shape, so each check only binds."""
    Q, G = QueueEntry, Generation
    models = [bindparam(f"m{i}") for i in range(n_models)]
    # All of a request's entries share one sort key; found through ix_generations_request_id.
    mine = (select(Q.sort_key).join(G, G.id == Q.generation_id)
            .where(G.request_id == bindparam("rid")).limit(1).scalar_subquery())
    # One ordered index read per queue it waits in (ix_queue_claim per model, or the kind's
    # whole queue through ix_queue_sort when it names no model), each stopping at the cap.
    # Those indexes hold unclaimed entries only: what is ahead is what still waits for a
    # worker, not what workers already hold.
    branches = []
    for model in [*models, queue.ANY_MODEL] if models else [None]:
        branch = select(Q.generation_id, Q.sort_key).where(queue.UNCLAIMED, Q.sort_key < mine)
        branch = branch.where(Q.model == model) if model is not None else \
            branch.where(Q.kind == bindparam("kind"))
        branches.append(select(branch.order_by(Q.sort_key, Q.id).limit(POSITION_COUNT_CAP)
                               .subquery()))
    merged = union_all(*branches).subquery()
    ahead = select(merged).order_by(merged.c.sort_key).limit(POSITION_COUNT_CAP).subquery()
    stats = select(func.min(ModelStat.ewma_interval))
    if models:
        stats = stats.where(ModelStat.model.in_(models))
    return select(func.count(func.distinct(ahead.c.generation_id)), func.min(ahead.c.sort_key),
                  func.max(ahead.c.sort_key), mine, stats.scalar_subquery())


def _queue_estimate(session, req: RequestSummary, waiting: int) -> tuple[int, int]:
    """(queue_position, wait_time): generations ahead of this request in the queues of its
    models, and seconds until its last waiting one is expected to finish.

    The first POSITION_COUNT_CAP entries ahead are counted exactly; past that the position is
    extrapolated from how densely those entries sit in sort-key order, so the cost stays flat
    however deep the queue is. Entries being processed count as ahead: they hold workers too.
    """
    if waiting == 0:
        return 0, 0
    params = {"rid": req.id, "kind": req.kind, **{f"m{i}": m for i, m in enumerate(req.models)}}
    counted, first_key, last_key, my_key, per_image = session.execute(
        _estimate_statement(len(req.models)), params).one()
    position = int(counted)
    if position >= POSITION_COUNT_CAP and my_key is not None:
        density = position / max(last_key - first_key, 1e-9)
        position += int((my_key - last_key) * density)
    per_image = per_image or DEFAULT_SECONDS_PER_IMAGE
    return position, int(round((position + waiting) * per_image))


def check(ctx: Context, session, request_id: str,
          kind: str = "image") -> tuple[RequestSummary, RequestStatusCheck]:
    """A request's progress (`/generate/check`): one statement for the request and its
    counts, one for its place in the queue while some of it waits."""
    req, c = _load_with_counts(session, request_id, kind)
    waiting, processing = c.get("waiting", 0), c.get("processing", 0)
    position, wait = _queue_estimate(session, req, waiting)
    faulted = c.get("faulted", 0) > 0
    expired = c["expired"] > 0
    # Only a request still waiting asks whether any worker can take it (one statement, and
    # only when it names no model the cluster serves).
    possible = known_models.is_possible(ctx, session, req, expired) if waiting else not expired
    return req, RequestStatusCheck(
        finished=c.get("done", 0), processing=processing, restarted=c["restarted"],
        waiting=waiting, done=waiting + processing == 0 and not faulted, faulted=faulted,
        wait_time=wait, queue_position=position, kudos=req.kudos, is_possible=possible,
    )


class _Inline:
    """Images a status answer inlines (`r2: false`), within max_inline_status_bytes: past
    them, the rest come as URLs (which any AI Horde client takes in `img` too)."""

    def __init__(self, ctx: Context, req: RequestSummary):
        self.ctx, self.r2 = ctx, req.r2
        self.left = ctx.settings.max_inline_status_bytes

    def field(self, key: str) -> str:
        if not self.r2:
            size = self.ctx.storage.size(key)
            if size is not None and size <= self.left:
                self.left -= size
                return base64.b64encode(self.ctx.storage.get(key)).decode()
        return self.ctx.storage.url(key)


def status(ctx: Context, session, request_id: str) -> RequestStatusStable:
    req, chk = check(ctx, session, request_id)
    gens = session.execute(
        select(Generation).where(Generation.request_id == req.id,
                                 Generation.state.in_(("done", "faulted")))
        .order_by(Generation.position)
    ).scalars().all()
    out = []
    inline = _Inline(ctx, req)
    for g in gens:
        if g.state == "done":
            out.append(ImageGeneration(
                worker_id=g.worker_id or "", worker_name=g.worker_name or "", model=g.model or "",
                state="censored" if g.censored else "ok", img=inline.field(g.storage_key),
                seed=str(g.seed), id=g.id, censored=g.censored, gen_metadata=g.gen_metadata or [],
            ))
    return RequestStatusStable(**chk.model_dump(), generations=out, shared=req.shared)


def cancel(ctx: Context, session, request_id: str) -> RequestStatusStable:
    """Cancel what has not finished; return what has."""
    cancel_request(session, request_id, "image")
    return status(ctx, session, request_id)


def cancel_request(session, request_id: str, kind: str) -> None:
    """End a request's waiting and processing generations as cancelled. A worker still busy
    with one finds its claim gone when it submits (AbortedGen)."""
    req = _load_request(session, request_id, kind)
    G = Generation
    ended = session.execute(
        update(G).where(G.request_id == req.id, G.state.in_(("waiting", "processing")))
        .values(state="cancelled", claim_id=None, deadline=None, finished_at=time.time())
        .returning(G.id)
    ).scalars().all()
    if ended:
        session.execute(QueueEntry.__table__.delete().where(QueueEntry.generation_id.in_(ended)))
    req.cancelled = True
    session.flush()
