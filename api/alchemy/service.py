"""Alchemy requests and the alchemy worker protocol: submit, status, cancel, pop, submit a
result. The routes (api/alchemy/router.py) stay thin; the rules live here."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from pydantic import ValidationError
from sqlalchemy import func, select, update

from api import admission, image_workflows, sources
from api.alchemy import forms as queue
from api.alchemy.protocol import (
    CLIP_FORMS,
    RESULT_MODELS,
    AlchemyFormStatus,
    AlchemyPopInput,
    AlchemyPopResponse,
    AlchemyRequest,
    AlchemySkipped,
    AlchemyStatus,
    AlchemySubmitInput,
    PoppedForm,
    form_kudos,
    tiles,
)
from api.db.models import Interrogation, InterrogationForm, User, Worker
from api.errors import HordeError
from api.images import Context
from api.workers import priority_ids, store_result_image, upload_key, worker_for_pop
from models.postprocess.registry import output_size


@dataclass
class StoredSource:
    """The checked source image of a new interrogation, stored under its id."""

    interrogation_id: str
    key: str
    width: int
    height: int

    def delete(self, storage) -> None:
        if storage.exists(self.key):
            storage.delete(self.key)


def result_key(interrogation_id: str, form_id: str, claim_id: str) -> str:
    """Where a post-processor form's image is kept: written by the API and the cluster's
    alchemy runner only (workers upload to their claim's `upload_key`), under a key of the
    claim's own, so a late result never overwrites the one a claim committed."""
    return f"alchemy/{interrogation_id}/{form_id}-{claim_id}.webp"


def served_forms(ctx: Context) -> set[str]:
    """The forms something in this horde runs: the cluster's alchemy models and
    post-processors, and what the alchemy workers that popped lately offer."""
    s, catalog = ctx.settings, ctx.catalog
    served = {e.name for e in catalog.served_postprocessors(s.postprocessor_weights)} | \
        {e.name for e in catalog.served_alchemy(s.alchemy_weights)}
    since = time.time() - s.stale_worker_seconds
    with ctx.db.read() as session:
        for offered in session.execute(select(Worker.models).where(
                Worker.type == "interrogation", Worker.last_seen > since)).scalars():
            served |= set(offered or [])
    return served


def prepare(ctx: Context, body: AlchemyRequest,
            charge: sources.Charge | None = None) -> StoredSource:
    """Fetch or decode the source image with the limits of generation sources and store it
    as PNG (blocking: off the event loop, outside any transaction); `charge` counts its pixels
    against the caller's budget before they are decoded."""
    image = sources.load_source(body.source_image, "source_image",
                                image_workflows.limits(ctx.settings), charge=charge)
    interrogation_id = str(uuid.uuid4())
    # Workers download it by this key: a name of its own, never the interrogation's id (with
    # which anyone can read and cancel it).
    stored = StoredSource(interrogation_id, f"sources/alchemy/{uuid.uuid4()}/image.png",
                          image.width, image.height)
    ctx.storage.put(stored.key, image.png, "image/png")
    return stored


def price(body: AlchemyRequest, width: int = 512, height: int = 512) -> float:
    return round(sum(form_kudos(f.name, width, height) for f in body.forms), 2)


def check_forms(body: AlchemyRequest, served: set[str]) -> None:
    for i, form in enumerate(body.forms):
        if form.name not in served:
            raise HordeError(400, "UnsupportedForm",
                             f"forms[{i}].name: no worker of this horde runs {form.name}")


def submit(ctx: Context, session, user: User, body: AlchemyRequest, requester: str,
           client_agent: str, stored: StoredSource) -> Interrogation:
    """Write the interrogation and one queued form per asked form (check_forms first). What can
    refuse it runs first; the caller's transaction rolls back (and deletes the stored source)
    on error."""
    cap = ctx.settings.max_waiting_education if user.education else ctx.settings.max_waiting_per_user
    active = session.execute(select(func.count()).select_from(
        select(InterrogationForm.id).where(InterrogationForm.requester == requester,
                                           InterrogationForm.state.in_(queue.LIVE))
        .limit(cap + 1).subquery())).scalar_one()
    if active + len(body.forms) > cap:
        raise HordeError(429, "TooManyPrompts",
                         f"forms: {active} of your forms are already queued and you may have "
                         f"at most {cap}; wait for some to finish")
    now = time.time()
    w, h = stored.width, stored.height
    interrogation = Interrogation(
        id=stored.interrogation_id, user_id=user.id, requester=requester,
        source_image_key=stored.key, width=w, height=h, kudos=price(body, w, h),
        cancelled=False, client_agent=client_agent, created_at=now)
    session.add(interrogation)
    session.flush()
    sort_key = now - admission.head_start(ctx, user)
    session.add_all([InterrogationForm(
        id=str(uuid.uuid4()), interrogation_id=interrogation.id, position=i, name=f.name,
        payload=f.payload.model_dump(exclude_none=True) if f.payload else None,
        state="waiting", sort_key=sort_key, tiles=tiles(w, h), trusted_only=body.trusted_workers,
        slow_ok=body.slow_workers, requester=requester, user_id=user.id,
        kudos=form_kudos(f.name, w, h), attempts=0) for i, f in enumerate(body.forms)])
    return interrogation


def _load(session, interrogation_id: str) -> Interrogation:
    found = session.get(Interrogation, interrogation_id)
    if found is None:
        raise HordeError(404, "RequestNotFound", f"id: interrogation {interrogation_id} not found")
    return found


def status(ctx: Context, session, interrogation_id: str) -> AlchemyStatus:
    interrogation = _load(session, interrogation_id)
    rows = session.execute(select(InterrogationForm).where(
        InterrogationForm.interrogation_id == interrogation.id)
        .order_by(InterrogationForm.position)).scalars().all()
    out = []
    for f in rows:
        result = None
        if f.state == "done":
            result = {f.name: ctx.storage.url(f.result_key)} if f.result_key else f.result
        out.append(AlchemyFormStatus(form=f.name, state=f.state, result=result))
    states = {f.state for f in rows}
    if interrogation.cancelled:
        overall = "cancelled"
    elif "processing" in states:
        overall = "processing"
    elif "waiting" in states:
        overall = "waiting"
    elif states == {"done"}:
        overall = "done"
    else:
        overall = "partial" if "done" in states else "faulted"
    return AlchemyStatus(state=overall, forms=out)


def cancel(ctx: Context, session, interrogation_id: str) -> AlchemyStatus:
    """End the forms still to run; what finished stays (and was paid for)."""
    interrogation = _load(session, interrogation_id)
    session.execute(update(InterrogationForm).where(
        InterrogationForm.interrogation_id == interrogation.id,
        InterrogationForm.state.in_(queue.LIVE))
        .values(state="cancelled", claim_id=None, deadline=None, finished_at=time.time()))
    interrogation.cancelled = True
    session.flush()
    return status(ctx, session, interrogation_id)


def pop(ctx: Context, user: User, body: AlchemyPopInput) -> AlchemyPopResponse:
    now = time.time()
    declared = {"models": list(dict.fromkeys(body.forms)), "threads": body.threads,
                "bridge_agent": body.bridge_agent[:200],
                "capabilities": {"max_tiles": body.max_tiles}}
    with ctx.db.write() as session:
        worker = worker_for_pop(ctx, session, user, body.name, "interrogation", declared, now)
        claimer = queue.FormClaimer(worker_id=worker.id, forms=list(body.forms),
                                    max_tiles=body.max_tiles, trusted=user.trusted,
                                    priority_user_ids=priority_ids(body.priority_usernames),
                                    owner_id=user.id)
        claimed = queue.claim_in(session, claimer, body.amount, now)
        if not claimed:
            return AlchemyPopResponse(forms=[], skipped=AlchemySkipped(**queue.skipped_in(session, claimer)))
    # Upload URLs are per claim and valid as long as it (its deadline is now + FORM_TTL too).
    return AlchemyPopResponse(forms=[PoppedForm(
        id=c.form_id, form=c.name, payload=c.payload or None,
        source_image=ctx.storage.url(c.source_image_key),
        r2_upload=None if c.name in CLIP_FORMS else
        ctx.storage.upload_url(upload_key(c.form_id, c.claim_id), queue.FORM_TTL))
        for c in claimed])


def checked_result(name: str, result) -> dict:
    """A data form's result as the status shows it, checked against the form's shape."""
    model = RESULT_MODELS[name]
    if not isinstance(result, dict):
        raise HordeError(400, "BadRequest", f"result: {name} results are an object like "
                         f"{{\"{name}\": ...}}")
    try:
        return model.model_validate(result).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise HordeError(400, "BadRequest", f"result.{where}: {first['msg']}") from None


def submit_result(ctx: Context, user: User, body: AlchemySubmitInput) -> float:
    """A worker's result for a form one of `user`'s workers holds: recorded exactly once."""
    now = time.time()
    with ctx.db.write() as session:
        row = session.execute(
            select(InterrogationForm, Worker).outerjoin(Worker, Worker.id == InterrogationForm.claimed_by)
            .where(InterrogationForm.id == body.id)).first()
        if row is None:
            raise HordeError(404, "InvalidJobID", f"id: no form {body.id}")
        form, worker = row
        if form.state == "done":
            raise HordeError(400, "DuplicateGen", f"id: form {body.id} was already submitted")
        if form.state == "cancelled":
            raise HordeError(400, "AbortedGen", f"id: form {body.id} was cancelled by its requester")
        if form.state != "processing" or worker is None or worker.owner_id != user.id:
            raise HordeError(400, "RequestExpired",
                             f"id: form {body.id} is not held by your workers: its time to live "
                             "ran out and it went back to the queue")
        claim = [(form.id, form.claim_id)]
        upload = upload_key(form.id, form.claim_id)
        uploads = form.name not in CLIP_FORMS
        if body.state in ("faulted", "csam"):
            # A worker's word never ends a form: it goes to another owner's worker (forms.py).
            what = "reported a fault" if body.state == "faulted" else "flagged the source as csam"
            queue.release_in(session, claim, f"worker {worker.name} {what}",
                             ctx.settings.max_attempts, ctx.settings.max_consecutive_drops,
                             ctx.settings.drop_maintenance_seconds, now)
            reward = 0.0
        else:
            data, stored_key = None, None
            if not uploads:
                data = checked_result(form.name, body.result)
            else:
                source = session.get(Interrogation, form.interrogation_id)
                size = output_size(source.width, source.height, [form.name])
                stored_key = _stored_image(ctx, body.result, upload, size,
                                           result_key(form.interrogation_id, form.id, form.claim_id))
            reward = queue.finish_in(session, form.id, form.claim_id, result=data,
                                     result_key=stored_key, worker_id=worker.id,
                                     worker_name=worker.name, owner_id=user.id, now=now)
            if reward is None:
                if stored_key:
                    ctx.storage.delete(stored_key)
                raise HordeError(400, "DuplicateGen", f"id: form {body.id} was already submitted")
    if uploads:
        # Once committed: the result was copied under its final key (or the claim ended), and
        # a submit that failed before this point keeps its upload, to be sent again.
        ctx.storage.delete(upload)
    return reward


def _stored_image(ctx: Context, result, upload: str, size: tuple[int, int], key: str) -> str:
    if not isinstance(result, str):
        raise HordeError(400, "BadRequest", "result: a post-processor's result is 'R2' or base64 WebP")
    return store_result_image(ctx, result, upload, key, "result", {size})
