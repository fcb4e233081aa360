"""What every workflow graph shares: a node is one awaitable step (a Ray task or a call to a
Serve deployment); `Graph.node` runs it, retries it when its replica, worker or node died
(Serve routes the retry to a live replica, so the graph does not start over), records its
time, and turns a failure for good into `GraphFailed` naming the node. GraphFailed is a
JobRejected: the dispatcher faults the job at once and the requester is not charged."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ray import exceptions as ray_errors

from deployments.jobs import JobRejected, is_rejection

log = logging.getLogger("ray.serve")
T = TypeVar("T")
# What a dead replica, worker or node looks like to the caller: worth another try elsewhere.
SYSTEM_FAILURES = (ray_errors.RayActorError, ray_errors.WorkerCrashedError, ray_errors.NodeDiedError,
                   ray_errors.ObjectLostError, ray_errors.ActorUnavailableError)


class GraphFailed(JobRejected):
    """A graph that failed for good; the message names the node."""


def _cause(exc: BaseException) -> BaseException:
    return exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc


@dataclass
class Graph:
    workflow: str
    attempts: int = 3  # tries per node when its replica or node dies
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    async def node(self, name: str, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(1, self.attempts + 1):
            t0 = time.perf_counter()
            try:
                result = await call()
            except Exception as exc:  # noqa: BLE001 - sorted below
                cause = _cause(exc)
                if is_rejection(exc):
                    raise GraphFailed(f"{self.workflow} node {name}: {cause}") from None
                if isinstance(exc, SYSTEM_FAILURES) and attempt < self.attempts:
                    log.warning("%s node %s: %s; retrying (%d/%d)", self.workflow, name,
                                type(exc).__name__, attempt, self.attempts)
                    continue
                raise GraphFailed(f"{self.workflow} node {name} failed: "
                                  f"{type(cause).__name__}: {cause}"[:500]) from None
            self.timings[name] = time.perf_counter() - t0
            return result
        raise AssertionError("unreachable")

    def finish(self, reply: dict) -> dict:
        """The reply with the per-node timings; logged, for operators and (later) metrics."""
        wall = time.perf_counter() - self.started
        log.info("%s graph: %.3f s wall; %s", self.workflow, wall,
                 ", ".join(f"{n} {s:.3f} s" for n, s in self.timings.items()))
        return {**reply, "timings": dict(self.timings), "graph_seconds": wall}


def reply_of(images: list[bytes], seeds: list[int]) -> dict[str, Any]:
    """A reply for images made by graph code itself (not by a replica): credited to the
    caller's worker (no node_id)."""
    return {"images": images, "seeds": seeds, "node_id": None, "replica": None, "seconds": 0.0}
