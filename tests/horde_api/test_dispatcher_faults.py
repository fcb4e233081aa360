"""The dispatcher's two kinds of failure, on a real database: a job the deployment refused for
its input (JobRejected, also when Ray wraps it) is faulted at once with the reason and never
retried; anything else (a dead replica) goes back to the queue until max_attempts."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayTaskError

from api.db import queue
from api.db.models import Generation
from api.settings import Settings
from cluster.dispatcher import Dispatcher, FamilyRoute
from deployments.jobs import JobRejected
from models.catalog import Family
from test_economy import submit

pytestmark = pytest.mark.timeout(120)


def dispatcher_over(ctx) -> Dispatcher:
    """The dispatcher's failure handling, without its Serve replica and loops."""
    d = Dispatcher.func_or_class.__new__(Dispatcher.func_or_class)
    d.db, d.settings = ctx.db, Settings(**{**ctx.settings.model_dump(), "max_attempts": 3})
    return d


def claim_one(ctx):
    (job,) = queue.claim(ctx.db, queue.Capabilities("cluster", ["tiny-sd15"]), 1)
    return [(job.generation_id, job.claim_id)], job.generation_id


def state(ctx, gid) -> tuple[str, int, str | None]:
    with ctx.db.read() as s:
        g = s.get(Generation, gid)
        return g.state, g.attempts, g.fault_reason


@pytest.mark.parametrize("wrap", [False, True])
def test_a_rejected_job_is_faulted_at_once(client, ctx, wrap):
    assert submit(client).status_code == 202
    d, route = dispatcher_over(ctx), FamilyRoute(handle=None, models=["tiny-sd15"], max_in_flight=1,
                                                 worker_id="cluster", worker_name="c",
                                                 family=Family.stable_diffusion_1)
    claims, gid = claim_one(ctx)
    error = JobRejected("params.loras[0]: no lora of that name")
    if wrap:  # as a Serve call raises it: a RayTaskError that is also a JobRejected
        error = RayTaskError("generate", "traceback", error).as_instanceof_cause()
    asyncio.run(d._failed(route, claims, error))
    s, attempts, reason = state(ctx, gid)
    assert (s, attempts) == ("faulted", 1) and "params.loras[0]" in reason
    assert client.get(f"/api/v2/generate/check/{_request_of(ctx, gid)}").json()["faulted"]


def test_a_crash_goes_back_to_the_queue(client, ctx):
    assert submit(client).status_code == 202
    d, route = dispatcher_over(ctx), FamilyRoute(handle=None, models=["tiny-sd15"], max_in_flight=1,
                                                 worker_id="cluster", worker_name="c",
                                                 family=Family.stable_diffusion_1)
    for attempt in (1, 2):
        claims, gid = claim_one(ctx)
        asyncio.run(d._failed(route, claims, RuntimeError("replica died")))
        assert state(ctx, gid)[:2] == ("waiting", attempt)
    claims, gid = claim_one(ctx)
    asyncio.run(d._failed(route, claims, RuntimeError("replica died")))
    assert state(ctx, gid)[:2] == ("faulted", 3)


def _request_of(ctx, gid) -> str:
    with ctx.db.read() as s:
        return s.get(Generation, gid).request_id


def test_sources_are_deleted_once_their_request_has_nothing_left_to_do(client, ctx):
    """By the API's sweep (api/retention.py), so deployments without a dispatcher too."""
    from api import retention
    from test_image_workflows_api import SOURCE, b64, stored_objects

    d = dispatcher_over(ctx)
    d.storage = ctx.storage
    r = submit(client, source_image=b64(SOURCE), params={"n": 2})
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    with ctx.db.read() as s:
        from api.db.models import Request

        source = s.get(Request, rid).source_image_key
    retention.delete_ended_sources(ctx)  # both still waiting: kept
    assert stored_objects(ctx) == [source]
    claims, gid = claim_one(ctx)
    asyncio.run(d._failed(None, claims, JobRejected("bad")))
    retention.delete_ended_sources(ctx)  # one faulted, one still waiting: kept
    assert stored_objects(ctx) == [source]
    assert client.delete(f"/api/v2/generate/status/{rid}").status_code == 200
    retention.delete_ended_sources(ctx)  # cancelled: nothing left to generate
    assert stored_objects(ctx) == []
    with ctx.db.read() as s:
        from api.db.models import Request

        assert s.get(Request, rid).source_image_key is None
