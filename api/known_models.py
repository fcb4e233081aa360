"""Which models requests may name and workers may offer, and whether anyone serves them now.

A name is one of:
- **served**: in the cluster's catalog (`ctx.catalog`): its own deployments run it;
- **known**: in the AI Horde's model reference (`ctx.reference`): accepted whether or not a
  worker offers it now (202 with a `NoAvailableWorker` warning when none does), and HTTP
  volunteers may offer it. Its baseline gives the family whose rules it follows; the cluster's
  deployments never claim it (they claim only their own model names);
- **custom**: neither, but offered right now by an online worker whose owner has the
  customizer role. Anything else is refused (400 `UnknownModel`, naming `models`).

A request that no worker takes a job of for `unclaimed_expiry_seconds` (20 minutes) expires:
its waiting generations end `faulted` and its check answers `is_possible: false`, as on the AI
Horde (which deletes such a request instead).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.orm import aliased

from api.db.models import UNCLAIMED, Generation, QueueEntry, Request, User, Worker
from api.errors import HordeError
from models.catalog import Family, ModelEntry
from models.reference import ReferenceModel

NO_AVAILABLE_WORKER = "NoAvailableWorker"
UNCLAIMED_REASON = "expired: no worker took it in time"
# A model a customizer's worker offers, unknown to the reference, is priced and checked as:
CUSTOM_IMAGE_FAMILY = Family.stable_diffusion_1
WRONG_KIND = {"image": "models: {name!r} is a text model: use /generate/text/async",
              "text": "models: {name!r} is an image model: use /generate/async"}
EXPIRE_BATCH = 1000  # generations one sweep ends at most (the next sweep takes the rest)


@dataclass(frozen=True)
class Offers:
    """Models offered by the online workers of one type: by anyone, and by customizers."""

    models: frozenset[str]
    custom: frozenset[str]


def online_offers(ctx, session, kind: str, now: float | None = None) -> Offers:
    """What online workers of `kind` (image or text) offer now. One statement; it reads the
    online workers, not the queue."""
    now = time.time() if now is None else now
    rows = session.execute(
        select(Worker.models, User.customizer).join(User, User.id == Worker.owner_id)
        .where(Worker.type == kind, Worker.last_seen > now - ctx.settings.stale_worker_seconds,
               (Worker.kind != "node") | Worker.connected,
               Worker.maintenance == False)).all()  # noqa: E712
    models, custom = set(), set()
    for offered, customizer in rows:
        models.update(offered or [])
        if customizer:
            custom.update(offered or [])
    return Offers(frozenset(models), frozenset(custom))


@functools.lru_cache(maxsize=4096)
def reference_entry(model: ReferenceModel) -> ModelEntry:
    """A reference model as a catalog entry without weights (nothing here runs it), for the
    request rules: the family whose rules it follows, inpainting, NSFW, requirements."""
    from models.catalog import catalog_requirements

    if model.type == "text":
        return ModelEntry(name=model.name, family=Family.llm, nsfw=model.nsfw)
    return ModelEntry(name=model.name, family=model.rules_family, nsfw=model.nsfw,
                      inpainting=model.inpainting,
                      requirements=catalog_requirements(model.requirements))


def custom_entry(name: str, kind: str) -> ModelEntry:
    return ModelEntry(name=name, family=Family.llm if kind == "text" else CUSTOM_IMAGE_FAMILY)


def known_entry(ctx, name: str, kind: str) -> ModelEntry | None:
    """What this horde knows of `name` as a model of `kind`: the catalog's entry of a served
    model, else the reference's; None when neither knows it as that kind."""
    entry = ctx.catalog.get(name)
    if entry is not None:
        return entry if entry.family.kind == kind else None
    model = ctx.reference.get(name, kind)
    return reference_entry(model) if model is not None else None


def _wrong_kind(ctx, name: str, kind: str) -> bool:
    other = "text" if kind == "image" else "image"
    entry = ctx.catalog.get(name)
    return (entry is not None and entry.family.kind == other) or \
        (entry is None and ctx.reference.get(name, other) is not None)


def resolve(ctx, names: list[str], kind: str, session=None) -> list[ModelEntry]:
    """The entries of the models a request names, in its order (duplicates once): served,
    known, or offered now by a customizer's worker (looked up only for names neither the
    catalog nor the reference knows, in `session` or a read of its own). Refuses any other."""
    out: dict[str, ModelEntry | None] = {}
    for name in names:
        if name not in out:
            if _wrong_kind(ctx, name, kind):
                raise HordeError(400, "UnknownModel", WRONG_KIND[kind].format(name=name))
            out[name] = known_entry(ctx, name, kind)
    unknown = [name for name, entry in out.items() if entry is None]
    if unknown:
        offers = _offers(ctx, session, kind)
        for name in unknown:
            if name not in offers.custom:
                raise HordeError(400, "UnknownModel",
                                 f"models: {name!r} is neither served here nor a model of the "
                                 "AI Horde's model reference")
            out[name] = custom_entry(name, kind)
    return list(out.values())


def _offers(ctx, session, kind: str) -> Offers:
    if session is not None:
        return online_offers(ctx, session, kind)
    with ctx.db.read() as own:
        return online_offers(ctx, own, kind)


def availability_warnings(ctx, session, names: list[str], kind: str) -> list[dict[str, str]]:
    """A `NoAvailableWorker` warning when the request names models and none of them has a
    worker now: neither served here nor offered by an online worker. One statement, and only
    when it names no served model."""
    if not names or any(ctx.catalog.get(n) is not None for n in names):
        return []
    if online_offers(ctx, session, kind).models & set(names):
        return []
    minutes = ctx.settings.unclaimed_expiry_seconds / 60
    waits = (f"it waits for one, and expires if none takes it within {minutes:g} minutes"
             if minutes else "it waits for one")
    return [{"code": NO_AVAILABLE_WORKER,
             "message": f"models: no worker serves {', '.join(names[:5])} right now; {waits}"}]


def is_possible(ctx, session, req: Request, expired: bool) -> bool:
    """The AI Horde's `is_possible`: some worker can take the request now. A request that
    names a served model (or none) always can; otherwise one statement over the online
    workers."""
    if expired:
        return False
    if not req.models or any(ctx.catalog.get(n) is not None for n in req.models):
        return True
    return bool(online_offers(ctx, session, req.kind).models & set(req.models))


def accepted_offer(ctx, user: User, models: list[str], kind: str) -> tuple[list[str], list[str]]:
    """(the models a worker's pop may offer, the ones it may not): served or known models of
    its kind; a customizer's workers also any name not known as the other kind."""
    accepted, refused = [], []
    for name in models:
        ok = known_entry(ctx, name, kind) is not None or \
            (user.customizer and not _wrong_kind(ctx, name, kind))
        (accepted if ok else refused).append(name)
    return accepted, refused


def expire_unclaimed(ctx, now: float | None = None) -> int:
    """End as `faulted` the waiting generations of requests older than
    `unclaimed_expiry_seconds` of which no generation was claimed or finished in that time.
    Returns how many ended.

    It reads the queue in sort-key order up to where such requests can sit (a request's sort
    key is its age shifted by at most `anonymous_penalty_seconds` back; richer requesters' keys
    are earlier), so its cost follows the old entries, not the queue's depth."""
    s = ctx.settings
    if s.unclaimed_expiry_seconds <= 0:
        return 0
    now = time.time() if now is None else now
    cutoff = now - s.unclaimed_expiry_seconds
    Q, G, R = QueueEntry, Generation, Request
    other = aliased(Generation)
    recent = select(other.id).where(other.request_id == G.request_id,
                                    (other.started_at >= cutoff) | (other.finished_at >= cutoff))
    with ctx.db.write() as session:
        ids = session.execute(
            select(G.id).join(Q, Q.generation_id == G.id).join(R, R.id == G.request_id)
            .where(UNCLAIMED, Q.sort_key < cutoff + s.anonymous_penalty_seconds,
                   G.state == "waiting",
                   R.created_at < cutoff, ~recent.exists())
            .order_by(Q.sort_key).limit(EXPIRE_BATCH)).scalars().all()
        if not ids:
            return 0
        ended = session.execute(
            update(G).where(G.id.in_(set(ids)), G.state == "waiting")
            .values(state="faulted", fault_reason=UNCLAIMED_REASON, finished_at=now)
            .returning(G.id)).scalars().all()
        if ended:
            session.execute(delete(Q).where(Q.generation_id.in_(ended)))
        return len(ended)
