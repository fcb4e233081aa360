"""The cluster's own alchemist, run by the dispatcher: it claims interrogation forms through the
same queue as `/interrogate/pop` (api/alchemy/forms.py) and runs them on the cluster's
deployments: caption, interrogation and nsfw on the alchemy deployment, post-processors on the
post-processing deployment. Like image work, nothing lives only here: a claim that is not
finished expires and the form runs again.

It also holds the NSFW check the dispatcher runs on generated images (`nsfw_flags`)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from api import ledger
from api.alchemy import forms as queue
from api.alchemy.service import result_key
from api.db.models import Worker
from deployments.jobs import JobRejected, is_rejection

log = logging.getLogger("ray.serve")
WORKER_NAME = "rayhorde-cluster/alchemy"
WORKER_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "rayhorde:" + WORKER_NAME))


class AlchemyRunner:
    def __init__(self, db, storage, max_attempts: int, alchemy=None, postprocess=None,
                 clip_forms: list[str] = (), postprocessors: list[str] = (), max_in_flight: int = 4):
        """`alchemy` / `postprocess`: DeploymentHandles (None: not served); `clip_forms` and
        `postprocessors`: the form names each serves."""
        self.db, self.storage, self.max_attempts = db, storage, max_attempts
        self.alchemy, self.postprocess = alchemy, postprocess
        self.forms = [*(clip_forms if alchemy is not None else ()),
                      *(postprocessors if postprocess is not None else ())]
        self.max_in_flight, self.in_flight = max_in_flight, 0
        self.completed = 0
        if self.forms:
            self.register()
            returned = queue.expire(db, max_attempts, worker_id=WORKER_ID)
            if returned:
                log.info("returned %d alchemy forms held by a previous dispatcher", returned)

    def register(self) -> None:
        """Create or refresh the cluster's alchemist record (the horde's, trusted, online)."""
        now = time.time()
        with self.db.write() as session:
            worker = session.get(Worker, WORKER_ID)
            if worker is None:
                worker = Worker(id=WORKER_ID, name=WORKER_NAME, owner_id=ledger.horde_account_id(session),
                                kind="cluster", type="interrogation", created_at=now,
                                last_bonus_at=now, bridge_agent="rayhorde dispatcher", nsfw=True)
                session.add(worker)
            worker.models, worker.last_seen = list(self.forms), now

    async def dispatch(self, spawn) -> None:
        """Claim what there is room for; `spawn(coroutine)` runs each form as a task."""
        room = self.max_in_flight - self.in_flight
        if not self.forms or room <= 0:
            return
        claimer = queue.FormClaimer(worker_id=WORKER_ID, forms=self.forms, trusted=True)

        def claim():
            with self.db.write() as session:
                return queue.claim_in(session, claimer, room, time.time())

        for form in await asyncio.to_thread(claim):
            self.in_flight += 1
            spawn(self.run(form))

    async def run(self, form: queue.ClaimedForm) -> None:
        claim = [(form.form_id, form.claim_id)]
        try:
            source = await asyncio.to_thread(self.storage.get, form.source_image_key)
            data, key = None, None
            if form.name == "caption":
                data = {"caption": await self.alchemy.caption.remote(source)}
            elif form.name == "nsfw":
                data = {"nsfw": (await self.alchemy.nsfw.remote([source]))[0]}
            elif form.name == "interrogation":
                data = {"interrogation": await self.alchemy.interrogate.remote(source)}
            else:
                image = await self.postprocess.options(multiplexed_model_id=form.name) \
                    .process.remote(form.name, source, 1.0)
                key = result_key(form.interrogation_id, form.form_id, form.claim_id)
                await asyncio.to_thread(self.storage.put, key, image, "image/webp")
            await asyncio.to_thread(self._finish, form, data, key)
            self.completed += 1
        except Exception as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
            reason = f"{type(cause).__name__}: {cause}"[:500]
            with self.db.write() as session:
                if is_rejection(exc):
                    log.warning("alchemy form refused (%s)", reason)
                    queue.fault_in(session, claim, reason)
                else:
                    log.warning("alchemy form failed (%s); back to the queue", reason)
                    queue.release_in(session, claim, reason, self.max_attempts)
        finally:
            self.in_flight -= 1

    def _finish(self, form: queue.ClaimedForm, data: dict | None, key: str | None) -> None:
        with self.db.write() as session:
            queue.finish_in(session, form.form_id, form.claim_id, result=data, result_key=key,
                            worker_id=WORKER_ID, worker_name=WORKER_NAME,
                            owner_id=ledger.horde_account_id(session), now=time.time())

    async def nsfw_flags(self, images: list[bytes]) -> list[bool]:
        """The safety checker's verdict on each generated image (one batched call)."""
        if self.alchemy is None or "nsfw" not in self.forms:
            raise JobRejected("censor_nsfw: this cluster runs no NSFW classifier")
        return list(await self.alchemy.nsfw.remote(images))
