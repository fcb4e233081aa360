"""Prometheus metrics, exported by Ray's metrics agent on each node (`ray.util.metrics`).

Every metric the horde exports is defined here, once (`SPECS`); the code that moves work calls
one function of this module per event. Ray prefixes exported names with `ray_` and counters get
a `_total` suffix: `rayhorde_jobs_finished` is scraped as `ray_rayhorde_jobs_finished_total`
(configs/grafana/rayhorde.json reads those names). Each process exports its own series (Ray
adds a `WorkerId` label): dashboards sum over them.

Where values go: inside Ray (the Serve replicas run the API, the dispatcher and the
deployments) through ray.util.metrics objects, made on first use in each process. Outside Ray
(the bare app under uvicorn or TestClient, the command line) there is no metrics agent to send
to, so values go to an in-process registry (`local_value`): a dict update under a lock, which
tests read to check what the cluster would have exported. Recording never raises: a metric
must not fail the request or the job it describes.

Tags are few and bounded: models (checked against the catalog before anything is queued),
kinds, worker kinds, workflow and node names, rate-limit names. Never a user, key or prompt.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import event, func, literal, select, union_all
from sqlalchemy.orm import Session

from api.db.models import UNCLAIMED, Generation, InterrogationForm, QueueEntry

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Spec:
    name: str
    type: str  # "counter" | "gauge" | "histogram"
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()  # histograms


WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)
RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

QUEUE_DEPTH = Spec(
    "rayhorde_queue_depth", "gauge",
    "Waiting jobs a model could take (capped at QUEUE_DEPTH_CAP); model '*': requests naming "
    "no model; kind interrogation: alchemy forms by form name", ("model", "kind"))
CLAIM_LATENCY = Spec(
    "rayhorde_claim_latency_seconds", "histogram",
    "Seconds from a request's submit to the first claim of each of its jobs",
    ("kind", "worker_kind"), WAIT_BUCKETS)
JOBS_STARTED = Spec("rayhorde_jobs_started", "counter", "Jobs claimed by a worker",
                    ("model", "kind", "worker_kind"))
JOBS_FINISHED = Spec("rayhorde_jobs_finished", "counter", "Jobs whose result was recorded",
                     ("model", "kind", "worker_kind"))
JOBS_FAULTED = Spec(
    "rayhorde_jobs_faulted", "counter",
    "Jobs a worker did not finish; reason rejected: it cannot run as given (ended faulted), "
    "failed: the replica or worker failed or ran out of time (back to the queue while it has "
    "attempts left)", ("model", "kind", "worker_kind", "reason"))
GENERATION_SECONDS = Spec(
    "rayhorde_generation_seconds", "histogram",
    "Seconds from a job's claim to its recorded result", ("model", "kind", "worker_kind"),
    RUN_BUCKETS)
GRAPH_NODE_SECONDS = Spec(
    "rayhorde_graph_node_seconds", "histogram",
    "Seconds each node of a workflow graph took (deployments/workflows)", ("workflow", "node"),
    RUN_BUCKETS)
KUDOS_MINTED = Spec(
    "rayhorde_kudos_minted", "counter",
    "Kudos users received for work (reward), from moderators (award) and as uptime bonuses",
    ("kind",))
KUDOS_BURNED = Spec(
    "rayhorde_kudos_burned", "counter",
    "Kudos requesters spent (generation: images and text with the request tax; alchemy) and "
    "awards taken back", ("kind",))
RATE_LIMITED = Spec("rayhorde_rate_limited", "counter", "Calls refused with 429, per limit",
                    ("limit",))

SPECS = (QUEUE_DEPTH, CLAIM_LATENCY, JOBS_STARTED, JOBS_FINISHED, JOBS_FAULTED,
         GENERATION_SECONDS, GRAPH_NODE_SECONDS, KUDOS_MINTED, KUDOS_BURNED, RATE_LIMITED)
WORKER_KINDS = ("cluster", "node", "http")  # the dispatcher's replicas, volunteer nodes, pops
MAX_TAG_LENGTH = 200


# -- where values go ---------------------------------------------------------------------------

def _ray_running() -> bool:
    """Whether this process is connected to Ray (without importing Ray where nothing has)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


_ray_metrics: dict[str, object] = {}
_ray_lock = threading.Lock()


def _ray_metric(spec: Spec):
    metric = _ray_metrics.get(spec.name)
    if metric is None:
        from ray.util import metrics as ray_metrics

        with _ray_lock:
            metric = _ray_metrics.get(spec.name)
            if metric is None:
                if spec.type == "counter":
                    metric = ray_metrics.Counter(spec.name, spec.description, spec.tags)
                elif spec.type == "gauge":
                    metric = ray_metrics.Gauge(spec.name, spec.description, spec.tags)
                else:
                    metric = ray_metrics.Histogram(spec.name, spec.description,
                                                   list(spec.boundaries), spec.tags)
                _ray_metrics[spec.name] = metric
    return metric


class LocalRegistry:
    """What would have been exported, in this process: counters' sums, gauges' last values,
    histograms' counts and sums. Bounded by the tags' own bounds."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple], float | list[float]] = {}

    def record(self, spec: Spec, value: float, tags: dict[str, str]) -> None:
        key = (spec.name, tuple(tags[t] for t in spec.tags))
        with self._lock:
            if spec.type == "counter":
                self._values[key] = self._values.get(key, 0.0) + value
            elif spec.type == "gauge":
                self._values[key] = value
            else:
                count_sum = self._values.setdefault(key, [0.0, 0.0])
                count_sum[0] += 1
                count_sum[1] += value

    def value(self, spec: Spec, tags: dict[str, str]) -> float | tuple[float, float] | None:
        with self._lock:
            v = self._values.get((spec.name, tuple(tags[t] for t in spec.tags)))
        return tuple(v) if isinstance(v, list) else v

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


LOCAL = LocalRegistry()
_warned: set[str] = set()


def _record(spec: Spec, value: float, **tags: str) -> None:
    try:
        tags = {k: str(v)[:MAX_TAG_LENGTH] for k, v in tags.items()}
        if _ray_running():
            metric = _ray_metric(spec)
            if spec.type == "counter":
                if value > 0:  # Ray's counters refuse 0
                    metric.inc(value, tags)
            elif spec.type == "gauge":
                metric.set(value, tags)
            else:
                metric.observe(value, tags)
        else:
            LOCAL.record(spec, value, tags)
    except Exception:  # noqa: BLE001 - a metric never fails what it measures
        if spec.name not in _warned:
            _warned.add(spec.name)
            log.warning("could not record metric %s", spec.name, exc_info=True)


# Values of a database transaction count once it commits, never when it rolls back.
_PENDING = "rayhorde_metrics"


def _on_commit(session, spec: Spec, value: float, **tags: str) -> None:
    session.info.setdefault(_PENDING, []).append((spec, value, tags))


@event.listens_for(Session, "after_commit")
def _committed(session) -> None:
    for spec, value, tags in session.info.pop(_PENDING, ()):
        _record(spec, value, **tags)


@event.listens_for(Session, "after_rollback")
def _rolled_back(session) -> None:
    session.info.pop(_PENDING, None)


def local_value(spec: Spec, **tags: str):
    """The in-process value (no Ray): a counter's sum or gauge's value, a histogram's (count,
    sum); None when nothing was recorded under these tags."""
    return LOCAL.value(spec, tags)


# -- events ------------------------------------------------------------------------------------

def jobs_claimed(jobs: Iterable, worker_kind: str) -> None:
    """Jobs (api.db.queue.ClaimedJob) a worker claimed, and the claim latency of first
    attempts (from their requests' submit times, which the claim read)."""
    for job in jobs:
        _record(JOBS_STARTED, 1, model=job.model, kind=job.kind, worker_kind=worker_kind)
        if job.attempts == 1 and job.submitted_at is not None:
            claimed_at = job.deadline - job.ttl
            _record(CLAIM_LATENCY, max(0.0, claimed_at - job.submitted_at),
                    kind=job.kind, worker_kind=worker_kind)


def jobs_finished(jobs: Iterable, worker_kind: str, recorded: Iterable | None = None,
                  now: float | None = None) -> None:
    """Claimed jobs whose results were recorded (`recorded`: queue.finish's answer, whose
    generation ids count; None: all of `jobs`), and their time from claim to now."""
    now = time.time() if now is None else now
    done = None if recorded is None else {f.generation_id for f in recorded}
    for job in jobs:
        if done is None or job.generation_id in done:
            _record(JOBS_FINISHED, 1, model=job.model, kind=job.kind, worker_kind=worker_kind)
            _record(GENERATION_SECONDS, max(0.0, now - (job.deadline - job.ttl)),
                    model=job.model, kind=job.kind, worker_kind=worker_kind)


def jobs_faulted(jobs: Iterable, worker_kind: str, rejected: bool) -> None:
    reason = "rejected" if rejected else "failed"
    for job in jobs:
        _record(JOBS_FAULTED, 1, model=job.model, kind=job.kind, worker_kind=worker_kind,
                reason=reason)


def job_submitted(model: str | None, kind: str, state: str, started_at: float | None,
                  now: float | None = None) -> None:
    """An HTTP worker's submit, recorded (any state but "faulted") or reporting a fault."""
    model = model or "*"
    if state == "faulted":
        _record(JOBS_FAULTED, 1, model=model, kind=kind, worker_kind="http", reason="failed")
        return
    _record(JOBS_FINISHED, 1, model=model, kind=kind, worker_kind="http")
    if started_at is not None:
        now = time.time() if now is None else now
        _record(GENERATION_SECONDS, max(0.0, now - started_at), model=model, kind=kind,
                worker_kind="http")


_NODE_INDEX = re.compile(r"\s+[\d.]+$")


def node_name(name: str) -> str:
    """A graph node's name without the index of the image or attempt it ran for ("GFPGAN 0",
    "scan 1.2" -> "GFPGAN", "scan"): one series per kind of node."""
    return _NODE_INDEX.sub("", name) or name


def graph_timings(workflow: str, reply: dict) -> None:
    """The node timings a graph's reply carries (deployments/workflows/graph.py finish):
    `timings` of the job's own workflow, `post_processing_timings` of the nodes after it."""
    for name, graph in ((workflow, "timings"), ("post-processing", "post_processing_timings")):
        for node, seconds in (reply.get(graph) or {}).items():
            _record(GRAPH_NODE_SECONDS, float(seconds), workflow=name, node=node_name(node))


MINTED_KINDS = ("reward",)  # of ledger rows; awards and bonuses come through kudos_awarded
BURNED_KINDS = ("generation", "alchemy")


def kudos_moved(session, rows: Iterable[tuple[int, float, str]]) -> None:
    """A ledger movement (api/ledger.py record): what its workers earned and its requesters
    spent, counted when `session` commits. Transfers between users and the horde's own rows
    are neither."""
    for _user, amount, kind in rows:
        if kind in MINTED_KINDS and amount > 0:
            _on_commit(session, KUDOS_MINTED, amount, kind=kind)
        elif kind in BURNED_KINDS and amount < 0:
            _on_commit(session, KUDOS_BURNED, -amount, kind=kind)


def kudos_awarded(session, amount: float, kind: str) -> None:
    """Kudos from the horde's account (api/ledger.py award), counted when `session` commits;
    a negative award takes back."""
    if amount > 0:
        _on_commit(session, KUDOS_MINTED, amount, kind=kind)
    elif amount < 0:
        _on_commit(session, KUDOS_BURNED, -amount, kind=kind)


def rate_limited(limit: str) -> None:
    _record(RATE_LIMITED, 1, limit=limit)


# -- queue depth -------------------------------------------------------------------------------

QUEUE_DEPTH_SECONDS = 5.0  # how often the dispatcher refreshes the gauge
QUEUE_DEPTH_CAP = 1000  # counted per model at most: the read stays as cheap at any backlog
MAX_QUEUED_MODELS = 500
_UNION_CHUNK = 100  # SQLite allows at most 500 terms in one compound SELECT
Q = QueueEntry.__table__
G = Generation.__table__
F = InterrogationForm.__table__


def _queued_models(session) -> list[str]:
    """The distinct models of the queue's unclaimed entries, by a loose scan of ix_queue_claim
    (one index probe per model, whatever the number of entries)."""
    seen = (select(func.min(Q.c.model).label("model")).where(UNCLAIMED)
            .cte("queued_models", recursive=True))
    following = (select(func.min(Q.c.model)).where(UNCLAIMED, Q.c.model > seen.c.model)
                 .scalar_subquery())
    seen = seen.union_all(select(following).where(seen.c.model.is_not(None)))
    return list(session.scalars(select(seen.c.model).where(seen.c.model.is_not(None))
                                .limit(MAX_QUEUED_MODELS)))


def waiting_counts(db, cap: int = QUEUE_DEPTH_CAP) -> dict[tuple[str, str], int]:
    """Waiting jobs per (model, kind), each counted up to `cap`, and waiting alchemy forms per
    form name (kind interrogation). A few statements that read at most `cap` index entries per
    model or form, so their cost does not grow with the queue past that."""
    from api.alchemy.protocol import FORMS

    counts: dict[tuple[str, str], int] = {}
    with db.read() as session:
        models = _queued_models(session)
        for i in range(0, len(models), _UNION_CHUNK):
            parts = []
            for model in models[i:i + _UNION_CHUNK]:
                waiting = (select(Q.c.kind).join(G, G.c.id == Q.c.generation_id)
                           .where(UNCLAIMED, Q.c.model == model, G.c.state == "waiting")
                           .limit(cap)
                           .subquery())
                parts.append(select(literal(model), waiting.c.kind, func.count())
                             .group_by(waiting.c.kind))
            for model, kind, n in session.execute(union_all(*parts)):
                counts[(model, kind)] = n
        parts = []
        for form in FORMS:  # reads ix_forms_claim (state, name, sort_key)
            waiting = (select(F.c.id).where(F.c.state == "waiting", F.c.name == form)
                       .limit(cap).subquery())
            parts.append(select(literal(form), func.count()).select_from(waiting))
        for form, n in session.execute(union_all(*parts)):
            counts[(form, "interrogation")] = n
    return counts


class QueueDepth:
    """The queue-depth gauge, refreshed at most every QUEUE_DEPTH_SECONDS. A model that leaves
    the queue is reported once more, at 0, so its last value does not stay up."""

    def __init__(self):
        self._due = 0.0
        self._shown: set[tuple[str, str]] = set()

    async def refresh(self, db) -> None:
        if time.monotonic() < self._due:
            return
        self._due = time.monotonic() + QUEUE_DEPTH_SECONDS
        try:
            counts = await asyncio.to_thread(waiting_counts, db)
        except Exception:  # noqa: BLE001 - the dispatcher goes on; the gauge waits
            log.warning("could not count the queue for its metric", exc_info=True)
            return
        for key in self._shown - counts.keys():
            counts[key] = 0
        for (model, kind), n in sorted(counts.items()):
            _record(QUEUE_DEPTH, n, model=model, kind=kind)
        self._shown = {key for key, n in counts.items() if n}


_queue_depth = QueueDepth()


async def refresh_queue_depth(db) -> None:
    """Called by the dispatcher on every round; reads the queue when the gauge is due."""
    await _queue_depth.refresh(db)
