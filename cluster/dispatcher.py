"""The dispatcher: moves work from the database queue to the model deployments.

One replica (the leader) claims generations through the same claim query as `/generate/pop`,
calls the family's deployment with the model name as multiplexed model id, stores the images
and records them with a compare-and-set. It keeps at most `max_in_flight` images per family in
flight: enough for Serve's autoscaler to see the demand, no more, so the rest of the queue keeps
its priority order in the database. Nothing lives only here: if this replica dies, its claims
expire (or are released when the next dispatcher starts) and the work is done again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

from ray import serve

from api import ledger
from api.db import queue
from api.db.models import Worker
from api.db.session import get_database
from api.settings import Settings
from api.storage import make_storage

log = logging.getLogger("ray.serve")

REPLICA_COUNT_SECONDS = 10.0


def cluster_worker(family: str) -> tuple[str, str]:
    """(id, name) of the worker record that stands for the cluster's own deployment of a
    family: stable across restarts, so its claims and counters carry over."""
    name = f"rayhorde-cluster/{family}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "rayhorde:" + name)), name


@dataclass
class FamilyRoute:
    handle: object  # DeploymentHandle of the family's deployment
    models: list[str]
    max_in_flight: int
    worker_id: str
    worker_name: str
    in_flight: int = 0


def job_payload(jobs: list[queue.ClaimedJob]) -> dict:
    """The deployment's input for claimed generations of one request: one pipeline call, one
    seed per image."""
    first, p = jobs[0], jobs[0].params
    return {
        "model": first.model, "prompt": first.prompt, "negative_prompt": first.negative_prompt,
        "width": p["width"], "height": p["height"], "steps": p["steps"],
        "cfg_scale": p["cfg_scale"], "sampler_name": p["sampler_name"], "karras": p["karras"],
        "clip_skip": p["clip_skip"], "tiling": p["tiling"], "seeds": [j.seed for j in jobs],
    }


def batches(jobs: list[queue.ClaimedJob]) -> list[list[queue.ClaimedJob]]:
    grouped: dict[tuple[str, str], list[queue.ClaimedJob]] = defaultdict(list)
    for job in jobs:
        grouped[(job.request_id, job.model)].append(job)
    return list(grouped.values())


def register_cluster_workers(db, routes: dict[str, FamilyRoute], replicas: dict[str, int]) -> int:
    """Create or refresh the cluster's worker records (owned by the horde's account, trusted,
    online while the dispatcher runs, `threads` = running replicas). Returns the owner id."""
    now = time.time()
    with db.write() as session:
        owner = ledger.horde_account_id(session)
        for family, route in routes.items():
            worker = session.get(Worker, route.worker_id)
            if worker is None:
                worker = Worker(id=route.worker_id, name=route.worker_name, owner_id=owner,
                                kind="cluster", type="image", created_at=now, last_bonus_at=now,
                                bridge_agent="rayhorde dispatcher", nsfw=True,
                                max_pixels=3072 * 3072)
                session.add(worker)
            online = now - worker.last_seen < 60 if worker.last_seen else False
            worker.uptime_seconds = (worker.uptime_seconds or 0.0) + (
                now - worker.last_seen if online else 0.0)
            worker.models, worker.last_seen = route.models, now
            worker.threads = replicas.get(family, worker.threads or 1)
    return owner


@serve.deployment(name="dispatcher", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0})
class Dispatcher:
    def __init__(self, settings: dict, families: dict[str, dict], poll_seconds: float = 1.0,
                 expire_seconds: float = 5.0):
        self.settings = Settings(**settings)
        self.db = get_database(self.settings.database_url)
        self.storage = make_storage(self.settings)
        self.routes = {
            name: FamilyRoute(handle=f["handle"], models=list(f["models"]),
                              max_in_flight=int(f.get("max_in_flight", 4)),
                              worker_id=cluster_worker(name)[0], worker_name=cluster_worker(name)[1])
            for name, f in families.items()
        }
        self.poll_seconds, self.expire_seconds = poll_seconds, expire_seconds
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.completed = 0
        self.owner_id = register_cluster_workers(self.db, self.routes, {})
        # Whatever a previous dispatcher had in flight died with it: hand it back now rather
        # than waiting for the deadlines.
        for route in self.routes.values():
            returned = queue.expire(self.db, self.settings.max_attempts, worker_id=route.worker_id)
            if returned:
                log.info("returned %d generations held by a previous dispatcher", returned)
        self._loop = asyncio.get_event_loop().create_task(self._run_forever())

    async def wake(self) -> None:
        """Called by the API after a submit, so new work starts without waiting for a poll."""
        self._wake.set()

    async def stats(self) -> dict:
        return {"completed": self.completed,
                "in_flight": {n: r.in_flight for n, r in self.routes.items()}}

    async def check_health(self) -> None:
        if self._loop.done():
            raise RuntimeError(f"dispatch loop ended: {self._loop.exception()!r}")

    async def _run_forever(self) -> None:
        last_expire = last_refresh = 0.0
        while True:
            try:
                if time.monotonic() - last_expire > self.expire_seconds:
                    last_expire = time.monotonic()
                    await asyncio.to_thread(queue.expire, self.db, self.settings.max_attempts,
                                            max_consecutive_drops=self.settings.max_consecutive_drops)
                if time.monotonic() - last_refresh > REPLICA_COUNT_SECONDS:
                    last_refresh = time.monotonic()
                    replicas = await asyncio.to_thread(self._replica_counts)
                    await asyncio.to_thread(register_cluster_workers, self.db, self.routes, replicas)
                await self._dispatch()
            except Exception:
                log.exception("dispatch round failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _dispatch(self) -> None:
        for route in self.routes.values():
            room = route.max_in_flight - route.in_flight
            if room <= 0:
                continue
            caps = queue.Capabilities(worker_id=route.worker_id, models=route.models, trusted=True)
            jobs = await asyncio.to_thread(queue.claim, self.db, caps, room)
            for batch in batches(jobs):
                route.in_flight += len(batch)
                task = asyncio.get_event_loop().create_task(self._generate(route, batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _generate(self, route: FamilyRoute, batch: list[queue.ClaimedJob]) -> None:
        claims = [(j.generation_id, j.claim_id) for j in batch]
        try:
            result = await route.handle.options(
                multiplexed_model_id=batch[0].model
            ).generate.remote(job_payload(batch))
            await asyncio.to_thread(self._store, route, batch, result)
            self.completed += len(batch)
        except Exception as exc:  # a dead replica, a failed load, a bad input: try again
            log.warning("generation failed (%s); returning %d to the queue", exc, len(batch))
            await asyncio.to_thread(queue.release, self.db, claims,
                                    f"{type(exc).__name__}: {exc}"[:500],
                                    self.settings.max_attempts)
        finally:
            route.in_flight -= len(batch)
            self._wake.set()

    def _replica_counts(self) -> dict[str, int]:
        """Running replicas of each family's deployment, from the Serve controller."""
        try:
            apps = serve.status().applications
        except Exception:
            log.warning("could not read replica counts from Serve", exc_info=True)
            return {}
        counts = {}
        for family, route in self.routes.items():
            for app in apps.values():
                dep = app.deployments.get(route.handle.deployment_name)
                if dep is not None:
                    counts[family] = dep.replica_states.get("RUNNING", 0)
        return counts

    def _store(self, route: FamilyRoute, batch: list[queue.ClaimedJob], result: dict) -> None:
        results = []
        for job, image, seed in zip(batch, result["images"], result["seeds"], strict=True):
            key = f"images/{job.request_id}/{job.generation_id}.webp"
            self.storage.put(key, image, "image/webp")
            results.append(queue.Result(
                generation_id=job.generation_id, claim_id=job.claim_id, storage_key=key,
                seed=seed, worker_id=route.worker_id, worker_name=route.worker_name,
                owner_id=self.owner_id, gen_metadata=[],
            ))
        queue.finish(self.db, results)
