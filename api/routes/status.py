"""Cluster status routes: heartbeat, models, news, performance, stats, and local object storage."""

from __future__ import annotations

import threading
import time
import urllib.parse

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from api import usage_stats
from api.db.models import Generation, InterrogationForm, ModelStat, QueueEntry, Worker
from api.db.models import Request as RequestRow  # fastapi.Request is the HTTP one
from api.errors import HordeError
from api.news import news
from api.routes.deps import ctx_of
from api.schemas import ActiveModel, Heartbeat
from api.status_schemas import (
    ImagePeriod,
    ImageTotals,
    ModelStats,
    Newspiece,
    TextPeriod,
    TextTotals,
)
from api.storage import LocalStorage

router = APIRouter(tags=["status"])
VERSION = "2.5.0"
STATS_CACHE_SECONDS = 30.0


@router.get("/status/heartbeat", response_model=Heartbeat)
def heartbeat():
    return Heartbeat(version=VERSION)


def live_capacity(ctx, session, now: float) -> tuple[dict[str, int], dict[str, str]]:
    """Per model: online image and text workers offering it (HTTP volunteers count one each,
    the cluster's own deployments their running replicas, kept in `threads` by the
    dispatcher), and the type of the workers that offer it."""
    counts: dict[str, int] = {}
    types: dict[str, str] = {}
    rows = session.execute(select(Worker.models, Worker.kind, Worker.threads, Worker.type).where(
        Worker.last_seen > now - ctx.settings.stale_worker_seconds,
        (Worker.kind != "node") | Worker.connected, Worker.type.in_(("image", "text")),
        Worker.maintenance == False)).all()  # noqa: E712
    for models, kind, threads, worker_type in rows:
        for m in models or []:
            counts[m] = counts.get(m, 0) + (threads if kind == "cluster" else 1)
            types.setdefault(m, worker_type)
    return counts, types


def active_models(ctx, kind: str | None = None, name: str | None = None) -> list[ActiveModel]:
    """The models the cluster serves, those live workers offer, and known models requests wait
    for, with their workers, queue and speed; only `kind`'s, or only the model `name`. Three
    reads: the waiting queue grouped by model, the speed table, the workers."""
    now = time.time()
    with ctx.db.read() as session:
        waiting_q = (select(QueueEntry.model, func.count(), func.sum(QueueEntry.megapixelsteps))
                     .join(Generation, Generation.id == QueueEntry.generation_id)
                     .where(Generation.state == "waiting").group_by(QueueEntry.model))
        speed_q = select(ModelStat)
        if name is not None:
            waiting_q = waiting_q.where(QueueEntry.model == name)
            speed_q = speed_q.where(ModelStat.model == name)
        waiting = {m: (jobs, mps or 0.0) for m, jobs, mps in session.execute(waiting_q).all()}
        speed = {s.model: s for s in session.execute(speed_q).scalars()}
        capacity, offered = live_capacity(ctx, session, now)
    kinds = {m.name: m.family.kind for m in ctx.catalog.models}
    for model, worker_type in offered.items():
        kinds.setdefault(model, worker_type)
    for model in waiting:  # known models nobody serves now, with requests waiting for one
        if model not in kinds and (known := model_kind(ctx, model)) is not None:
            kinds[model] = known
    out = []
    for model, its_kind in kinds.items():
        if (kind is not None and its_kind != kind) or (name is not None and model != name):
            continue
        jobs, mps = waiting.get(model, (0, 0.0))
        stat = speed.get(model)
        per_image = stat.ewma_interval if stat else 0.0
        out.append(ActiveModel(
            name=model, count=capacity.get(model, 0),
            performance=round(1 / stat.ewma_seconds, 3) if stat and stat.ewma_seconds else 0.0,
            queued=round(mps, 3), jobs=float(jobs), eta=int(jobs * per_image), type=its_kind,
        ))
    return out


def model_kind(ctx, model: str) -> str | None:
    """"image" or "text" for a model the horde knows: its catalog's, or the AI Horde's model
    reference's (api/known_models.py); None for any other name (a custom model)."""
    entry = ctx.catalog.get(model)
    if entry is not None:
        return entry.family.kind
    reference = getattr(ctx, "reference", None)
    known = reference.get(model) if reference is not None else None
    return known.type if known is not None else None


def _known(ctx, model: str) -> bool:
    return model_kind(ctx, model) is not None


def _model_state(model_state: str) -> str:
    if model_state not in ("known", "custom", "all"):
        raise HordeError(400, "BadRequest", "model_state: one of known, custom, all")
    return model_state


def _in_state(ctx, model: str, state: str) -> bool:
    return state == "all" or _known(ctx, model) == (state == "known")


@router.get("/status/models", response_model=list[ActiveModel])
def status_models(request: Request, type: str = Query("image", pattern="^(image|text)$"),
                  min_count: int | None = Query(None, ge=0, le=10**6),
                  max_count: int | None = Query(None, ge=0, le=10**6),
                  model_state: str = Query("all", max_length=10)):
    """The horde's models of one type; `min_count`/`max_count` bound the workers serving
    them, `model_state` picks known (catalog or model reference) or custom models."""
    ctx = ctx_of(request)
    state = _model_state(model_state)
    return [m for m in active_models(ctx, kind=type)
            if (min_count is None or m.count >= min_count)
            and (max_count is None or m.count <= max_count) and _in_state(ctx, m.name, state)]


@router.get("/status/models/{model_name:path}", response_model=list[ActiveModel])
def status_model(model_name: str, request: Request):
    """One model as a list of one, or an empty list when the horde neither knows the name nor
    has a worker offering it (as the AI Horde answers). Names with a "/" arrive encoded once
    more by clients (horde-sdk does so): decoded here a second time, as the AI Horde does."""
    if len(model_name) > 1000:
        raise HordeError(400, "BadRequest", "model_name: at most 1000 characters")
    return active_models(ctx_of(request), name=urllib.parse.unquote(model_name))


@router.get("/status/news", response_model=list[Newspiece], response_model_exclude_none=True)
def status_news():
    return news.current()


@router.get("/status/performance")
def status_performance(request: Request):
    ctx = ctx_of(request)
    now = time.time()
    G, R = Generation, RequestRow
    with ctx.db.read() as session:
        # Waiting generations by kind: how many, their megapixelsteps, the tokens they ask for.
        queued = {kind: (n, mps or 0.0, tokens or 0) for kind, n, mps, tokens in session.execute(
            select(R.kind, func.count(), func.sum(G.megapixelsteps),
                   func.sum(R.params["max_length"].as_float()))
            .join(R, R.id == G.request_id).where(G.state == "waiting").group_by(R.kind)).all()}
        past_minute = {kind: usage_stats.recent(session, kind, 60, now)
                       for kind in ("image", "text")}
        online = session.execute(select(Worker.type, Worker.threads).where(
            Worker.last_seen > now - ctx.settings.stale_worker_seconds)).all()
        forms = session.execute(select(func.count()).where(
            InterrogationForm.state == "waiting")).scalar_one()

    def workers(kind: str) -> tuple[int, int]:
        mine = [threads for worker_type, threads in online if worker_type == kind]
        return len(mine), sum(mine)

    image_n, image_mps, _ = queued.get("image", (0, 0.0, 0))
    text_n, _, text_tokens = queued.get("text", (0, 0.0, 0))
    (image_workers, image_threads), (text_workers, text_threads), (alchemists, alchemy_threads) = (
        workers("image"), workers("text"), workers("interrogation"))
    return {
        "queued_requests": image_n, "queued_megapixelsteps": round(image_mps, 2),
        "past_minute_megapixelsteps": round(past_minute["image"].megapixelsteps, 2),
        "worker_count": image_workers, "thread_count": image_threads,
        "queued_text_requests": text_n, "text_worker_count": text_workers,
        "text_thread_count": text_threads, "queued_tokens": float(text_tokens),
        "past_minute_tokens": float(past_minute["text"].tokens),
        "queued_forms": float(forms), "interrogator_count": alchemists,
        "interrogator_thread_count": alchemy_threads,
    }


class _StatsCache:
    """Stats answers per app, each computed afresh at most every STATS_CACHE_SECONDS: computing
    one folds the usage counters (a write, see api/usage_stats.py)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[float, object]] = {}

    def get(self, key: str, compute) -> object:
        now = time.time()
        with self._lock:
            cached = self._answers.get(key)
        if cached and now - cached[0] < STATS_CACHE_SECONDS:
            return cached[1]
        answer = compute(now)
        with self._lock:
            self._answers[key] = (now, answer)
        return answer


def _stats(request: Request, key: str, build) -> object:
    """`build(session, folded_until, now)`, cached; the usage counters folded first."""
    ctx = ctx_of(request)
    cache = getattr(request.app.state, "stats_cache", None)
    if cache is None:
        cache = request.app.state.stats_cache = _StatsCache()

    def compute(now: float) -> object:
        with ctx.db.write() as session:
            folded = usage_stats.fold(session, now)
        with ctx.db.read() as session:
            return build(session, folded, now)

    return cache.get(key, compute)


def _model_stats(request: Request, kind: str, state: str) -> ModelStats:
    ctx = ctx_of(request)

    def build(session, folded: float, now: float) -> ModelStats:
        usage = usage_stats.per_model(session, kind, folded, now)
        return ModelStats(**{
            period: {m: u[period].generations for m, u in sorted(usage.items())
                     if u[period].generations and _in_state(ctx, m, state)}
            for period in usage_stats.PERIODS})

    return _stats(request, f"{kind}-models-{state}", build)


@router.get("/stats/img/models", response_model=ModelStats)
def stats_image_models(request: Request, model_state: str = Query("all", max_length=10)):
    """Images finished per model over the last day, month and ever; `model_state` picks
    known (catalog or model reference) or custom models."""
    return _model_stats(request, "image", _model_state(model_state))


@router.get("/stats/text/models", response_model=ModelStats)
def stats_text_models(request: Request, model_state: str = Query("all", max_length=10)):
    return _model_stats(request, "text", _model_state(model_state))


@router.get("/stats/img/totals", response_model=ImageTotals)
def stats_image_totals(request: Request):
    """Images finished and their pixelsteps over the last minute, hour, day, month and ever."""
    def build(session, folded: float, now: float) -> ImageTotals:
        return ImageTotals(**{
            period: ImagePeriod(images=u.generations, ps=int(u.megapixelsteps * 1e6))
            for period, u in usage_stats.totals(session, "image", folded, now).items()})

    return _stats(request, "image-totals", build)


@router.get("/stats/text/totals", response_model=TextTotals)
def stats_text_totals(request: Request):
    """Text generations finished and the tokens they generated, over the same periods."""
    def build(session, folded: float, now: float) -> TextTotals:
        return TextTotals(**{
            period: TextPeriod(requests=u.generations, tokens=u.tokens)
            for period, u in usage_stats.totals(session, "text", folded, now).items()})

    return _stats(request, "text-totals", build)


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
    """Where HTTP workers upload results (to local storage or relayed to S3, see
    api/storage.py): the `r2_upload` URL of a pop, signed for that key (its claim's) until
    `expires` (the claim's deadline), and at most `max_upload_bytes` long, refused as soon as
    it is known to be longer. Any content type; answers 200 as S3 does."""
    ctx = ctx_of(request)
    storage = ctx.storage
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
