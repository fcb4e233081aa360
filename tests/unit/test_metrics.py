"""api/metrics.py without Ray: values stay in the process (nothing imports Ray for them), the
events the bare app's routes record (HTTP worker pops and submits, kudos, rate-limit refusals)
carry the right values, and the queue-depth read counts waiting jobs per model, capped, on
SQLite and PostgreSQL. tests/serve/test_metrics_e2e.py scrapes the same metrics from a cluster."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api import ledger, metrics
from api.app import create_app
from api.auth import hash_api_key
from api.db import queue
from api.db.models import Generation, Interrogation, InterrogationForm, User
from conftest import ROOT, add_request, make_ctx, webp_bytes

pytestmark = pytest.mark.timeout(120)
WEBP = base64.b64encode(webp_bytes(512, 512)).decode()  # the result of a 512x512 job
ANON = {"apikey": "0000000000"}

FALLBACK = """
import json, sys
from api import metrics as m
m.jobs_faulted([], "cluster", rejected=True)  # nothing to count
m.rate_limited("submit"); m.rate_limited("submit"); m.rate_limited("pop")
m._record(m.QUEUE_DEPTH, 7, model="tiny-sd15", kind="image")
m._record(m.QUEUE_DEPTH, 3, model="tiny-sd15", kind="image")
m.graph_timings("qr_code", {"timings": {"scan 1.0": 0.5, "scan 1.1": 0.25, "render": 2.0},
                            "post_processing_timings": {"GFPGAN 0": 1.0}})
m._record(m.RATE_LIMITED, 1, limit="x" * 500)
print(json.dumps({
    "submit": m.local_value(m.RATE_LIMITED, limit="submit"),
    "pop": m.local_value(m.RATE_LIMITED, limit="pop"),
    "poll": m.local_value(m.RATE_LIMITED, limit="poll"),
    "depth": m.local_value(m.QUEUE_DEPTH, model="tiny-sd15", kind="image"),
    "scan": m.local_value(m.GRAPH_NODE_SECONDS, workflow="qr_code", node="scan"),
    "render": m.local_value(m.GRAPH_NODE_SECONDS, workflow="qr_code", node="render"),
    "gfpgan": m.local_value(m.GRAPH_NODE_SECONDS, workflow="post-processing", node="GFPGAN"),
    "long": m.local_value(m.RATE_LIMITED, limit="x" * m.MAX_TAG_LENGTH),
    "ray_imported": "ray" in sys.modules,
}))
"""


def test_without_ray_values_stay_in_the_process():
    """In a fresh process that never started Ray: recording imports no Ray, and what would be
    exported is kept (counters add, a gauge keeps its last value, histograms count and sum)."""
    out = subprocess.run([sys.executable, "-c", FALLBACK], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got == {"submit": 2.0, "pop": 1.0, "poll": None, "depth": 3, "scan": [2, 0.75],
                   "render": [1, 2.0], "gfpgan": [1, 1.0], "long": 1.0, "ray_imported": False}


def test_node_names_lose_their_image_index():
    assert [metrics.node_name(n) for n in ("GFPGAN 0", "scan 1.12", "passes 2", "stage C + B",
                                           "guided pass", "encode 10")] == \
        ["GFPGAN", "scan", "passes", "stage C + B", "guided pass", "encode"]


@pytest.fixture
def local():
    metrics.LOCAL.clear()
    yield metrics.local_value
    metrics.LOCAL.clear()


def user(ctx, name: str, kudos: float = 0.0) -> tuple[int, dict]:
    key = f"{name}-key-0123456789abcdef"[:22]
    with ctx.db.write() as s:
        u = User(username=name, api_key_hash=hash_api_key(key, ctx.settings.key_salt), kudos=0.0)
        s.add(u)
        s.flush()
        if kudos:
            ledger.award(s, u.id, kudos)
        return u.id, {"apikey": key}


def balance(ctx, user_id: int) -> float:
    with ctx.db.read() as s:
        return s.get(User, user_id).kudos


def test_http_worker_jobs_and_kudos(client, ctx, local):
    owner, worker_key = user(ctx, "volunteer")
    requester, requester_key = user(ctx, "requester", kudos=100)
    assert local(metrics.KUDOS_MINTED, kind="award") == 100
    r = client.post("/api/v2/generate/async", headers=requester_key, json={
        "prompt": "a lighthouse", "models": ["tiny-sd15"],
        "params": {"n": 3, "width": 512, "height": 512, "steps": 10}})
    assert r.status_code == 202, r.text
    before = balance(ctx, requester), balance(ctx, owner)
    job = client.post("/api/v2/generate/pop", headers=worker_key, json={
        "name": "w1", "models": ["tiny-sd15"], "max_pixels": 1024 * 1024, "amount": 3}).json()
    assert len(job["ids"]) == 3, job
    tags = {"model": "tiny-sd15", "kind": "image", "worker_kind": "http"}
    assert local(metrics.JOBS_STARTED, **tags) == 3
    count, waited = local(metrics.CLAIM_LATENCY, kind="image", worker_kind="http")
    assert count == 3 and 0 <= waited < 60  # from the submit to this pop
    rewards = []
    for gid, state in zip(job["ids"], ["ok", "ok", "faulted"], strict=True):
        a = client.post("/api/v2/generate/submit", headers=worker_key,
                        json={"id": gid, "generation": WEBP, "state": state})
        assert a.status_code == 200, a.text
        rewards.append(a.json()["reward"])
    assert local(metrics.JOBS_FINISHED, **tags) == 2
    assert local(metrics.JOBS_FAULTED, **tags, reason="failed") == 1
    assert local(metrics.JOBS_FAULTED, **tags, reason="rejected") is None
    count, seconds = local(metrics.GENERATION_SECONDS, **tags)
    assert count == 2 and 0 <= seconds < 60
    spent, earned = before[0] - balance(ctx, requester), balance(ctx, owner) - before[1]
    assert spent > earned > 0  # the requester also pays the request's tax
    assert local(metrics.KUDOS_BURNED, kind="generation") == pytest.approx(spent)
    assert local(metrics.KUDOS_MINTED, kind="reward") == pytest.approx(earned)
    assert earned == pytest.approx(sum(rewards), abs=0.02)
    # A second submit of a finished job is refused and counts nothing more.
    again = client.post("/api/v2/generate/submit", headers=worker_key,
                        json={"id": job["ids"][0], "generation": WEBP})
    assert again.status_code == 400
    assert local(metrics.JOBS_FINISHED, **tags) == 2


def test_kudos_count_only_when_committed(ctx, local):
    uid, _ = user(ctx, "someone")
    with pytest.raises(RuntimeError), ctx.db.write() as s:
        ledger.award(s, uid, 5)
        raise RuntimeError("the transaction rolls back")
    assert local(metrics.KUDOS_MINTED, kind="award") is None
    with ctx.db.write() as s:
        ledger.award(s, uid, 5, kind="uptime")
        ledger.award(s, uid, -2)  # a moderator takes some back
        ledger.transfer(s, uid, 0, 1)  # between users: neither minted nor burned
    assert local(metrics.KUDOS_MINTED, kind="uptime") == 5
    assert local(metrics.KUDOS_BURNED, kind="award") == 2
    assert local(metrics.KUDOS_MINTED, kind="award") is None


def test_rate_limit_refusals_are_counted(db, tmp_path, local):
    ctx = make_ctx(db, tmp_path, rate_limit_submit="2/minute")
    with TestClient(create_app(ctx)) as client:
        codes = [client.post("/api/v2/generate/async", headers=ANON, json={
            "prompt": "p", "models": ["tiny-sd15"], "dry_run": True}).status_code
            for _ in range(4)]
    assert codes == [200, 200, 429, 429]
    assert local(metrics.RATE_LIMITED, limit="submit") == 2
    assert local(metrics.RATE_LIMITED, limit="poll") is None


def add_form(db, name: str, state: str = "waiting") -> None:
    with db.write() as s:
        i = Interrogation(user_id=0, width=64, height=64)
        s.add(i)
        s.flush()
        s.add(InterrogationForm(interrogation_id=i.id, position=0, name=name, state=state,
                                sort_key=0.0))


def test_queue_depth_counts_waiting_jobs_per_model(db, local):
    add_request(db, n=3, models=("tiny-sd15",))
    add_request(db, n=2, models=())  # names no model: one '*' entry each
    add_request(db, n=1, models=("tiny-sd15", "tiny-sdxl"))  # waits for either
    add_request(db, n=2, models=("tiny-llm",), filters={"kind": "text"})
    add_form(db, "caption")
    add_form(db, "caption")
    add_form(db, "nsfw", state="processing")
    # A claimed job no longer waits (its queue entry stays until it ends).
    claimed = queue.claim(db, queue.Capabilities(worker_id="w", models=["tiny-sd15"],
                                                 any_model=""), 1)
    assert len(claimed) == 1
    counts = metrics.waiting_counts(db)
    interrogation = {k: v for k, v in counts.items() if k[1] == "interrogation"}
    assert {k: v for k, v in counts.items() if k[1] != "interrogation"} == {
        ("tiny-sd15", "image"): 3, ("*", "image"): 2, ("tiny-sdxl", "image"): 1,
        ("tiny-llm", "text"): 2}
    assert interrogation[("caption", "interrogation")] == 2
    assert set(interrogation.values()) == {0, 2} and len(interrogation) > 3
    assert metrics.waiting_counts(db, cap=2)[("tiny-sd15", "image")] == 2

    # The gauge: each refresh sets it; a model gone from the queue drops to 0 once.
    depth = metrics.QueueDepth()
    asyncio.run(depth.refresh(db))
    assert local(metrics.QUEUE_DEPTH, model="tiny-sd15", kind="image") == 3
    assert local(metrics.QUEUE_DEPTH, model="tiny-llm", kind="text") == 2
    with db.write() as s:
        s.execute(update(Generation).where(Generation.state == "waiting")
                  .values(state="cancelled"))
    depth._due = 0.0  # due again now
    asyncio.run(depth.refresh(db))
    assert local(metrics.QUEUE_DEPTH, model="tiny-sd15", kind="image") == 0
    assert local(metrics.QUEUE_DEPTH, model="tiny-llm", kind="text") == 0
    with db.read() as s:
        assert s.scalars(select(Generation.state).where(Generation.state == "processing")).all() \
            == ["processing"]


def exported(spec: metrics.Spec) -> set[str]:
    """The names Ray's Prometheus export gives a metric (tests/serve/test_metrics_e2e.py scrapes
    them): `ray_` in front; `_total` after a counter; a histogram's series."""
    name = "ray_" + spec.name
    return {"counter": {name + "_total"}, "gauge": {name},
            "histogram": {name + "_bucket", name + "_count", name + "_sum"}}[spec.type]


def test_the_dashboard_shows_every_metric_by_its_exported_name():
    import re

    with open(os.path.join(ROOT, "configs", "grafana", "rayhorde.json")) as f:
        dashboard = json.load(f)
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource"}
    by_name = {n: spec for spec in metrics.SPECS for n in exported(spec)}
    shown = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            expr = target["expr"]
            names = re.findall(r"\bray_rayhorde_\w+", expr)
            assert names, expr
            for name in names:
                assert name in by_name, f"{panel['title']}: {name} is not exported"
                spec = by_name[name]
                shown.add(spec.name)
                labels = set(spec.tags) | ({"le"} if name.endswith("_bucket") else set())
                used = {lbl.strip() for group in re.findall(r"by \(([^)]*)\)", expr)
                        for lbl in group.split(",")}
                used |= set(re.findall(r"(\w+)=~?\"", expr))
                assert used <= labels, f"{panel['title']}: {used - labels} not tags of {name}"
    assert shown == {spec.name for spec in metrics.SPECS}
