"""The dispatcher: moves work from the database queue to the model deployments.

One replica (the leader) claims generations through the same claim query as `/generate/pop`,
calls the family's deployment with the model name as multiplexed model id, stores the images
and records them with a compare-and-set. It keeps at most `max_in_flight` images per family in
flight: enough for Serve's autoscaler to see the demand, no more, so the rest of the queue keeps
its priority order in the database. Nothing lives only here: if this replica dies, its claims
expire (or are released when the next dispatcher starts) and the work is done again.

It also runs the volunteer bridge (cluster/bridge.py): for each volunteer node that joins, one
application per family it offers, pinned to the node, and a route that claims work as the
node's worker; when the node goes, the routes and applications go with it. Those deploys run
beside the dispatch loop, each given up after a timeout.

Nothing waits without end: each call to a replica has its job's TTL as deadline (then it is
cancelled and its claim released), calls whose generations were cancelled are stopped, and
the health check fails when the loop itself stops making rounds, so Serve replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

from ray import serve
from sqlalchemy import select

from api import ledger, metrics
from api.alchemy import forms as alchemy_forms
from api.db import queue
from api.db.models import Generation, Worker
from api.db.session import get_database
from api.settings import Settings
from api.storage import make_storage
from api.workers import censored_placeholder, image_key
from cluster.alchemy_runner import AlchemyRunner
from cluster.bridge import NODE_ID_LABEL, VolunteerBridge
from deployments import workflows
from deployments.jobs import ImageJob, JobRejected, TextJob, is_rejection
from models.catalog import Family

log = logging.getLogger("ray.serve")

REPLICA_COUNT_SECONDS = 10.0
UNLIMITED = 2**31 - 1  # text limits are checked against the catalog when requests arrive
VOLUNTEER_PAUSE_SECONDS = 30.0
# A volunteer node's replica not running this long after its deploy started (no free GPU on
# the node, a model that never loads) is removed; the deploy runs beside dispatching.
VOLUNTEER_DEPLOY_SECONDS = 600.0
DEPLOY_POLL_SECONDS = 1.0
# check_health fails when no dispatch round has ended for STALL_ROUNDS polls (and at least
# MIN_STALL_SECONDS): Serve then replaces this replica, and its claims go back to the queue.
STALL_ROUNDS = 60
MIN_STALL_SECONDS = 60.0
CANCEL_CHECK_SECONDS = 1.0  # how often generations in flight are checked for cancellation
# Text streams followed at once (each holds one of this replica's max_ongoing_requests), and
# of one generation (one requester's stream, a retry or two).
MAX_FOLLOWERS = 256
MAX_FOLLOWERS_PER_GENERATION = 4


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
    family: Family
    # What requests that name no model run on: the first model that is not inpainting-only
    # ("" when all are: it then takes no such requests).
    any_model: str = ""
    kind: str = "image"  # "text": the llm family
    owner_id: int | None = None  # earns the rewards; None: the horde's account
    app_name: str | None = None  # a volunteer node's own application
    in_flight: int = 0
    # A volunteer node whose replica just failed gets no new work for a while: most often the
    # node is going away, and the bridge has yet to notice (each claim costs an attempt).
    paused_until: float = 0.0

    @property
    def worker_kind(self) -> str:  # as api/metrics.py tags it
        return "cluster" if self.app_name is None else "node"

    def failed(self) -> None:
        if self.app_name is not None:
            self.paused_until = time.monotonic() + VOLUNTEER_PAUSE_SECONDS


def any_model_of(entries: list[dict]) -> str:
    return next((e["name"] for e in entries if not e.get("inpainting")), "")


def load_family_code() -> None:
    """Import the model deployments' code (torch, diffusers, transformers: about 6 s on a
    loaded 2-core machine) at start, not when the first volunteer node joins: that node's
    deploy (cluster.app.family_deployments) then starts at once, while there is work for it."""
    try:
        from cluster.app import family_deployments

        family_deployments()
    except Exception:  # the deploy imports it again, and reports what fails
        log.warning("could not load the model deployments' code", exc_info=True)


def volunteer_app_name(node_id: str, family: Family) -> str:
    return f"volunteer-{node_id[:12]}-{family.value}"


async def until_done(response):
    """Await a Serve call. When the awaiting task is cancelled (its job's deadline passed, its
    generation was cancelled), the call is cancelled on the replica too, so it stops holding
    a slot there."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


def cancelled_among(db, generation_ids: list[str]) -> set[str]:
    with db.read() as session:
        return set(session.scalars(select(Generation.id).where(
            Generation.id.in_(generation_ids), Generation.state == "cancelled")))


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
                                kind="cluster", type=route.kind, created_at=now, last_bonus_at=now,
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
                 expire_seconds: float = 5.0, volunteers: dict | None = None,
                 postprocess: object | None = None, alchemy: dict | None = None):
        """`families`: per family, the deployment's handle, its models (names and catalog
        entries) and max_in_flight. `volunteers`: {"enabled": bool, "poll_seconds": float,
        "actor_options": {family: ray_actor_options of a volunteer node's replica}}.
        `postprocess`: {"handle", "names"} of the post-processing deployment; `alchemy`:
        {"handle", "forms", "max_in_flight"} of the alchemy deployment (caption,
        interrogation, nsfw), which also checks images for censor_nsfw."""
        self.settings = Settings(**settings)
        self.db = get_database(self.settings.database_url)
        self.storage = make_storage(self.settings)
        postprocess, alchemy = postprocess or {}, alchemy or {}
        self.postprocess = postprocess.get("handle")  # DeploymentHandle, or None
        self.alchemist = AlchemyRunner(
            self.db, self.storage, self.settings.max_attempts, alchemy=alchemy.get("handle"),
            postprocess=self.postprocess, clip_forms=list(alchemy.get("forms", [])),
            postprocessors=list(postprocess.get("names", [])),
            max_in_flight=int(alchemy.get("max_in_flight", 4)))
        self.routes = {
            name: FamilyRoute(handle=f["handle"], models=list(f["models"]),
                              max_in_flight=int(f.get("max_in_flight", 4)),
                              worker_id=cluster_worker(name)[0], worker_name=cluster_worker(name)[1],
                              family=Family(name), kind=Family(name).kind,
                              any_model=any_model_of(f.get("entries", [])))
            for name, f in families.items()
        }
        # Streams of text being generated here, by generation id (see follow()), and the text
        # each in-flight generation has so far.
        self._followers: dict[str, list[asyncio.Queue]] = defaultdict(list)
        self._follower_count = 0
        self._partial: dict[str, str] = {}
        self.poll_seconds, self.expire_seconds = poll_seconds, expire_seconds
        self.stall_seconds = max(STALL_ROUNDS * poll_seconds, MIN_STALL_SECONDS)
        self._round_ended = time.monotonic()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        # The generations each family call in flight works on (see _stop_cancelled).
        self._running: dict[asyncio.Task, list[str]] = {}
        self.completed = 0
        self.owner_id = register_cluster_workers(self.db, self.routes, {})
        self.families = families
        self.volunteers = {"enabled": True, "poll_seconds": 1.0, "actor_options": {},
                           "deploy_timeout_seconds": VOLUNTEER_DEPLOY_SECONDS,
                           **(volunteers or {})}
        self.bridge = VolunteerBridge(self.db, self.settings,
                                      {Family(n): list(f["models"]) for n, f in families.items()})
        self.volunteer_routes: dict[str, list[FamilyRoute]] = {}
        self._deploying: dict[str, asyncio.Task] = {}  # by node id
        if self.volunteers["enabled"]:
            self._spawn(asyncio.to_thread(load_family_code))
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
                "in_flight": {n: r.in_flight for n, r in self.routes.items()},
                # Volunteer nodes the bridge has looked at and refused (their key names no user).
                "refused_nodes": sorted(self.bridge.refused)}

    async def follow(self, generation_id: str):
        """Stream the text of a generation as this dispatcher's LLM replicas produce it. The
        first item comes at once and acknowledges the subscription: the text generated so
        far ("" when it has not started). Then str deltas, ending when the generation is
        finished and recorded. A generation that runs elsewhere (an HTTP worker) or already
        ended yields nothing more until the caller gives up, so callers also watch the
        database (api/openai_api.py).

        At most MAX_FOLLOWERS_PER_GENERATION streams follow one generation and MAX_FOLLOWERS
        in all; past that the first item is None and the stream ends: the caller then takes
        the text from the database once it is recorded."""
        if (self._follower_count >= MAX_FOLLOWERS or
                len(self._followers.get(generation_id, ())) >= MAX_FOLLOWERS_PER_GENERATION):
            yield None
            return
        deltas: asyncio.Queue = asyncio.Queue()
        # No await between reading the partial text and subscribing: no delta is lost or
        # sent twice.
        self._followers[generation_id].append(deltas)
        self._follower_count += 1
        try:  # from the first item on: a caller may go away at any of them
            yield self._partial.get(generation_id, "")
            while (delta := await deltas.get()) is not None:
                yield delta
        finally:
            self._follower_count -= 1
            followers = self._followers.get(generation_id, [])
            if deltas in followers:
                followers.remove(deltas)
            if not followers:
                self._followers.pop(generation_id, None)

    def _tell_followers(self, generation_id: str, delta: str | None) -> None:
        if delta is None:
            self._partial.pop(generation_id, None)
        else:
            self._partial[generation_id] = self._partial.get(generation_id, "") + delta
        for deltas in self._followers.get(generation_id, []):
            deltas.put_nowait(delta)

    async def check_health(self) -> None:
        if self._loop.done():
            raise RuntimeError(f"dispatch loop ended: {self._loop.exception()!r}")
        stalled = time.monotonic() - self._round_ended
        if stalled > self.stall_seconds:
            raise RuntimeError(f"dispatching stalled: no round has ended for {stalled:.0f} s")

    def _all_routes(self) -> list[FamilyRoute]:
        return [*self.routes.values(), *(r for rs in self.volunteer_routes.values() for r in rs)]

    async def _run_forever(self) -> None:
        last_expire = last_refresh = last_bridge = last_cancel_check = 0.0
        while True:
            try:
                if self.volunteers["enabled"] and \
                        time.monotonic() - last_bridge > self.volunteers["poll_seconds"]:
                    last_bridge = time.monotonic()
                    await self._refresh_volunteers()
                await metrics.refresh_queue_depth(self.db)
                if time.monotonic() - last_expire > self.expire_seconds:
                    last_expire = time.monotonic()
                    await asyncio.to_thread(queue.expire, self.db, self.settings.max_attempts,
                                            max_consecutive_drops=self.settings.max_consecutive_drops,
                                            maintenance_seconds=self.settings.drop_maintenance_seconds)
                    await asyncio.to_thread(alchemy_forms.expire, self.db, self.settings.max_attempts,
                                            max_consecutive_drops=self.settings.max_consecutive_drops,
                                            maintenance_seconds=self.settings.drop_maintenance_seconds)
                if time.monotonic() - last_refresh > REPLICA_COUNT_SECONDS:
                    last_refresh = time.monotonic()
                    replicas = await asyncio.to_thread(self._replica_counts)
                    await asyncio.to_thread(register_cluster_workers, self.db, self.routes, replicas)
                    if self.alchemist.forms:
                        await asyncio.to_thread(self.alchemist.register)
                if self._running and time.monotonic() - last_cancel_check > CANCEL_CHECK_SECONDS:
                    last_cancel_check = time.monotonic()
                    await self._stop_cancelled()
                await self._dispatch()
            except Exception:
                log.exception("dispatch round failed; retrying")
            self._round_ended = time.monotonic()
            try:  # not asyncio.wait_for: on 3.11 it can swallow this task's cancellation
                async with asyncio.timeout(self.poll_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def _refresh_volunteers(self) -> None:
        changes = await asyncio.to_thread(self.bridge.refresh)
        for node in changes.left:
            deploying = self._deploying.pop(node.node_id, None)
            if deploying is not None:
                deploying.cancel()
            self.volunteer_routes.pop(node.node_id, None)
            for family in node.families:  # deployed or still deploying
                await asyncio.to_thread(self._delete_app, volunteer_app_name(node.node_id, family))
        for node in changes.joined:
            # Off the loop: a replica that cannot be placed (the node's one GPU already taken)
            # must not hold up dispatching for the whole cluster.
            self.volunteer_routes[node.node_id] = []
            self._deploying[node.node_id] = self._spawn(self._deploy_node(node))

    async def _deploy_node(self, node) -> None:
        try:
            await asyncio.gather(*(self._deploy_family(node, f) for f in node.families))
        finally:
            if self._deploying.get(node.node_id) is asyncio.current_task():
                del self._deploying[node.node_id]

    async def _deploy_family(self, node, family: Family) -> None:
        """The family's deployment as its own application, one replica pinned to the node;
        its route once the replica runs. Given up (and the application deleted) when it does
        not run within `deploy_timeout_seconds`."""
        app_name = volunteer_app_name(node.node_id, family)
        timeout = float(self.volunteers["deploy_timeout_seconds"])
        try:
            async with asyncio.timeout(timeout):
                deployment = await asyncio.to_thread(self._start_on_node, node, family, app_name)
                while True:
                    status, message = await asyncio.to_thread(self._app_status, app_name)
                    if status == "RUNNING":
                        break
                    if status == "DEPLOY_FAILED":
                        raise RuntimeError(message or "deploy failed")
                    await asyncio.sleep(DEPLOY_POLL_SECONDS)
        except Exception as exc:
            why = (f"not running after {timeout:.0f} s" if isinstance(exc, TimeoutError)
                   else repr(exc))
            log.error("could not deploy %s on volunteer node %s (%s); removing it", family.value,
                      node.node_id, why)
            await asyncio.to_thread(self._delete_app, app_name)
            return
        if node.node_id not in self.volunteer_routes:  # the node left meanwhile
            await asyncio.to_thread(self._delete_app, app_name)
            return
        f = self.families[family.value]
        self.volunteer_routes[node.node_id].append(FamilyRoute(
            handle=serve.get_deployment_handle(deployment, app_name), models=list(f["models"]),
            max_in_flight=int(f.get("max_in_flight", 4)), worker_id=node.worker_id,
            worker_name=node.worker_name, family=family, kind=family.kind, owner_id=node.owner_id,
            any_model=any_model_of(f["entries"]), app_name=app_name))
        self._wake.set()

    def _start_on_node(self, node, family: Family, app_name: str) -> str:
        """Start deploying the family's application on the node (not waiting for it to run);
        returns the deployment's name."""
        from cluster.app import family_deployments

        options = dict(self.volunteers["actor_options"].get(family.value)
                       or ({"num_gpus": 1} if node.gpus else {"num_cpus": 0.5}))
        options["label_selector"] = {NODE_ID_LABEL: node.node_id}
        deployment = family_deployments()[family].options(num_replicas=1, ray_actor_options=options)
        # Not serve.run: it would block until the replica runs, which may be never.
        serve.run_many([serve.RunTarget(deployment.bind(*self.families[family.value]["args"]),
                                        name=app_name, route_prefix=None)],
                       wait_for_applications_running=False)
        return deployment.name

    def _app_status(self, app_name: str) -> tuple[str, str]:
        app = serve.status().applications.get(app_name)
        if app is None:
            return "NOT_STARTED", ""
        return getattr(app.status, "value", str(app.status)), app.message or ""

    def _delete_app(self, app_name: str) -> None:
        try:
            serve.delete(app_name, _blocking=False)
        except Exception:
            log.warning("could not delete application %s", app_name, exc_info=True)

    def _credit(self, route: FamilyRoute, node_id: str | None) -> tuple[str, str, int]:
        """(worker id, worker name, owner id) a result is credited to: the volunteer node it
        ran on when the replica says so, else the route's worker."""
        node = self.bridge.worker_for_node(node_id)
        if node is not None:
            return node.worker_id, node.worker_name, node.owner_id
        owner = route.owner_id if route.owner_id is not None else self.owner_id
        return route.worker_id, route.worker_name, owner

    async def _dispatch(self) -> None:
        for route in self._all_routes():
            room = route.max_in_flight - route.in_flight
            if room <= 0 or route.paused_until > time.monotonic():
                continue
            caps = queue.Capabilities(
                worker_id=route.worker_id, models=route.models, any_model=route.any_model,
                kind=route.kind, trusted=True, max_length=UNLIMITED, max_context_length=UNLIMITED,
                # A volunteer node's owner: a job one of its workers faulted does not come back.
                owner_id=route.owner_id if route.owner_id is not None else -1)
            jobs = await asyncio.to_thread(queue.claim, self.db, caps, room)
            metrics.jobs_claimed(jobs, route.worker_kind)
            # Images of one request go as one batch (one pipeline call); text generations one
            # by one, and the LLM replica batches whatever arrives together.
            groups = batches(jobs) if route.kind == "image" else [[j] for j in jobs]
            for batch in groups:
                route.in_flight += len(batch)
                self._spawn(self._generate(route, batch) if route.kind == "image" else
                            self._generate_text(route, batch[0]),
                            [j.generation_id for j in batch])
        await self.alchemist.dispatch(self._spawn)

    def _spawn(self, work, generation_ids: list[str] | None = None) -> asyncio.Task:
        task = asyncio.get_event_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _t: self._wake.set())
        if generation_ids:
            self._running[task] = generation_ids
            task.add_done_callback(lambda t: self._running.pop(t, None))
        return task

    async def _stop_cancelled(self) -> None:
        """Stop the calls whose generations were all cancelled while in flight (a requester's
        DELETE, an OpenAI stream whose client went away): nothing would record or bill their
        result, and the replica's time goes back to the queue."""
        ids = [g for gens in self._running.values() for g in gens]
        cancelled = await asyncio.to_thread(cancelled_among, self.db, ids)
        for task, gens in list(self._running.items()):
            if all(g in cancelled for g in gens):
                log.info("generations %s were cancelled; stopping their call", ", ".join(gens))
                task.cancel()

    async def _generate(self, route: FamilyRoute, batch: list[queue.ClaimedJob]) -> None:
        claims = [(j.generation_id, j.claim_id) for j in batch]
        ttl = batch[0].ttl
        try:
            # Within the claim's TTL: past it the claim is no longer this dispatcher's, and a
            # hung replica would hold the family's slot forever.
            async with asyncio.timeout(ttl):
                job = await asyncio.to_thread(self._image_job, route, batch)
                if job.workflow.graph:  # a Ray task graph (deployments/workflows/)
                    result = await workflows.run(job, route.handle,
                                                 workflows.graph_options(self.settings))
                else:
                    result = await until_done(route.handle.options(
                        multiplexed_model_id=job.model).generate.remote(job))
                if job.post_processing:  # graph nodes after the generation, on their own deployment
                    result = await self._post_process(job, result)
                metrics.graph_timings(job.workflow.value, result)
                if batch[0].censor_nsfw:  # the requester asked (education accounts always do)
                    flags = await self.alchemist.nsfw_flags(result["images"])
                    result = {**result, "nsfw": flags}
            await asyncio.to_thread(self._store, route, batch, result)
            self.completed += len(batch)
        except TimeoutError:
            metrics.jobs_faulted(batch, route.worker_kind, rejected=False)
            await self._failed(route, claims, TimeoutError(f"no result within the job's {ttl} s"))
        except Exception as exc:
            metrics.jobs_faulted(batch, route.worker_kind, rejected=is_rejection(exc))
            await self._failed(route, claims, exc)
        finally:
            route.in_flight -= len(batch)
            self._wake.set()

    async def _post_process(self, job: ImageJob, result: dict) -> dict:
        from deployments.workflows import post_processing

        if self.postprocess is None:
            raise JobRejected("params.post_processing: this cluster runs no post-processing")
        images, timings = await post_processing.run(result["images"], list(job.post_processing),
                                                    job.facefixer_strength, self.postprocess)
        return {**result, "images": images, "post_processing_timings": timings}

    def _image_job(self, route: FamilyRoute, batch: list[queue.ClaimedJob]) -> ImageJob:
        """The typed job, with the source image and mask stored with the request."""
        first = batch[0]
        read = lambda key: None if key is None else self.storage.get(key)  # noqa: E731
        extras = [{"image": read(e["key"]), "strength": e["strength"]} for e in first.extra_sources or []]
        return ImageJob.from_claim(route.family, batch, read(first.source_image_key),
                                   read(first.source_mask_key), extras)

    async def _failed(self, route: FamilyRoute, claims: list[tuple[str, str]], exc: Exception) -> None:
        """A job the deployment refused for its input is faulted at once with the reason; any
        other failure (a dead replica, a failed load) hands it back to the queue."""
        # A Ray error carries the deployment's exception as its cause; its message (not Ray's
        # traceback) is what the requester and the operator need to read.
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
        reason = f"{type(cause).__name__}: {cause}"[:500]
        if is_rejection(exc):
            log.warning("job refused (%s); faulting %d", reason, len(claims))
            await asyncio.to_thread(queue.fault, self.db, claims, reason)
            return
        log.warning("generation failed (%s); returning %d to the queue", reason, len(claims))
        route.failed()
        await asyncio.to_thread(queue.release, self.db, claims, reason, self.settings.max_attempts)

    async def _generate_text(self, route: FamilyRoute, job: queue.ClaimedJob) -> None:
        try:
            stream = route.handle.options(multiplexed_model_id=job.model, stream=True) \
                .generate_stream.remote(TextJob.from_claim(job))
            result = None
            try:
                async with asyncio.timeout(job.ttl):  # the claim's TTL, as for images
                    async for item in stream:
                        if item["delta"]:
                            self._tell_followers(job.generation_id, item["delta"])
                        result = item.get("result", result)
            except TimeoutError:
                stream.cancel()
                raise TimeoutError(f"no result within the job's {job.ttl} s") from None
            except asyncio.CancelledError:  # the generation was cancelled
                stream.cancel()
                raise
            if result is None:
                raise RuntimeError("the text stream ended without a result")
            worker_id, worker_name, owner_id = self._credit(route, result.get("node_id"))
            finished = await asyncio.to_thread(queue.finish, self.db, [queue.Result(
                generation_id=job.generation_id, claim_id=job.claim_id, storage_key=None,
                seed=job.seed, worker_id=worker_id, worker_name=worker_name,
                owner_id=owner_id, text=result["text"],
                prompt_tokens=result["prompt_tokens"],
                completion_tokens=result["completion_tokens"],
                finish_reason=result["finish_reason"])])
            metrics.jobs_finished([job], route.worker_kind, finished)
            self.completed += 1
        except Exception as exc:
            metrics.jobs_faulted([job], route.worker_kind, rejected=is_rejection(exc))
            await self._failed(route, [(job.generation_id, job.claim_id)], exc)
        finally:
            self._tell_followers(job.generation_id, None)
            route.in_flight -= 1
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
        worker_id, worker_name, owner_id = self._credit(route, result.get("node_id"))
        results = []
        metadata = result.get("metadata") or [[] for _ in batch]  # the graphs' notes per image
        flagged = result.get("nsfw") or [False] * len(batch)
        for job, image, seed, notes, nsfw in zip(batch, result["images"], result["seeds"], metadata,
                                                 flagged, strict=True):
            if nsfw:  # never stored: the requester gets the placeholder, and pays nothing
                key = censored_placeholder(self.storage)
                notes = [*notes, {"type": "censorship", "value": "nsfw"}]
            else:  # under its claim's own key: published only if the claim still holds
                key = image_key(job.request_id, job.generation_id, job.claim_id)
                self.storage.put(key, image, "image/webp")
            results.append(queue.Result(
                generation_id=job.generation_id, claim_id=job.claim_id, storage_key=key,
                seed=seed, worker_id=worker_id, worker_name=worker_name,
                owner_id=owner_id, gen_metadata=notes, censored=nsfw,
                # The cluster's own safety check: the horde pays for what it censored.
                censored_by_horde=nsfw,
            ))
        finished = queue.finish(self.db, results)
        won = {f.generation_id for f in finished}
        for r in results:  # a claim that lost (cancelled, expired meanwhile) leaves nothing
            if r.generation_id not in won and not r.censored:
                self.storage.delete(r.storage_key)
        metrics.jobs_finished(batch, route.worker_kind, finished)
