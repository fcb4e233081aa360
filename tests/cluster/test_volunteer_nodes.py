"""Volunteer Ray nodes through the bridge, on a multi-node cluster in one process tree
(ray.cluster_utils.Cluster, as Ray's own tests do): a node joins, gets its own replica and
work, its owner earns kudos; when it is removed mid-job the job completes on the head and its
worker goes offline; a node naming no user is refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import context_from_settings, create_app
from api.auth import hash_api_key, node_key_digest
from api.db.models import Generation, User
from api.settings import Settings
from cluster.bridge import head_labels, node_labels
from models.catalog import Family

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
KEY = "volunteer-key-00000000"
SD = [Family.stable_diffusion_1]


def wait_for(what: str, check, timeout: float = 120, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def horde(tmp_path_factory):
    """A head node (2 CPUs) running configs/local.yaml with tiny-sd15 only, and an API client
    on the same database (HTTP proxies off: no port is taken)."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from cluster.deploy import deploy, load_config

    workdir = tmp_path_factory.mktemp("volunteers")
    settings = {"database_url": f"sqlite:///{workdir}/rayhorde.db", "storage": "local",
                "storage_dir": str(workdir / "objects"),
                "catalog_path": str(ROOT / "configs" / "models.yaml"),
                "served_models": ["tiny-sd15"], "node_heartbeat_seconds": 1.0,
                "rate_limit_submit": "100000/minute", "rate_limit_poll": "100000/minute"}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "labels": head_labels(list(Family)),
        # Notice a dead node within about 2 s (Ray's default is about 15 s).
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    ray.init(address=cluster.address)
    try:
        config = load_config(ROOT / "configs" / "local.yaml", settings=settings,
                             families={"stable_diffusion_1": {"max_in_flight": 1}},
                             args={"poll_seconds": 0.3})
        config["proxy_location"] = "Disabled"
        app = config["applications"][0]
        app["deployments"] = [d for d in app["deployments"]
                              if d["name"] in ("api", "dispatcher", "postprocess", "alchemy", "sd15")]
        sd15 = next(d for d in app["deployments"] if d["name"] == "sd15")
        sd15["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
        deploy(config)
        ctx = context_from_settings(Settings(**settings))
        with ctx.db.write() as s:
            s.add(User(username="vol", api_key_hash=hash_api_key(KEY, ctx.settings.key_salt),
                       node_key_digest=node_key_digest(KEY)))
        with TestClient(create_app(ctx)) as client:
            yield {"cluster": cluster, "client": client, "ctx": ctx}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def node_worker(client, name_part: str):
    return next((w for w in client.get("/api/v2/workers").json() if name_part in w["name"]), None)


def submit(client, headers=None, **params):
    body = {"prompt": "a lighthouse", "models": ["tiny-sd15"],
            "params": {"width": 64, "height": 64, "steps": 2, **params}}
    workers = body["params"].pop("workers", None)
    if workers:
        body["workers"] = workers
    r = client.post("/api/v2/generate/async", json=body, headers=headers or {"apikey": "0000000000"})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def done(client, rid, timeout=240):
    return wait_for(f"request {rid}", lambda: (lambda st: st if st["done"] else None)(
        client.get(f"/api/v2/generate/status/{rid}").json()), timeout)


def test_volunteer_node_joins_works_and_leaves(horde):
    cluster, client, ctx = horde["cluster"], horde["client"], horde["ctx"]
    node = cluster.add_node(num_cpus=1, resources={"volunteer": 1},
                            labels=node_labels(node_key_digest(KEY), SD))
    worker = wait_for("the node's worker", lambda: (lambda w: w if w and w["online"] else None)(
        node_worker(client, node.node_id[:8])))
    assert worker["models"] == ["tiny-sd15"] and worker["owner"].startswith("vol#")
    # Work for the node's worker runs on the node's own replica and pays its owner.
    before = client.get("/api/v2/find_user", headers={"apikey": KEY}).json()["kudos"]
    st = done(client, submit(client, workers=[worker["id"]], n=2))
    assert {g["worker_id"] for g in st["generations"]} == {worker["id"]}
    after = client.get("/api/v2/find_user", headers={"apikey": KEY}).json()["kudos"]
    assert after > before

    # Two long jobs: one runs on the head's replica and one on the node's (whichever each
    # claims first); the node then leaves mid-job and its job goes back to the queue at once
    # and completes on the head.
    long = {"width": 1024, "height": 1024, "steps": 50}
    jobs = [submit(client, **long), submit(client, **long)]

    def holder(request_id):
        with ctx.db.read() as s:
            g = s.execute(select(Generation).where(Generation.request_id == request_id)).scalar_one()
            return g.claimed_by if g.state == "processing" else None

    def split_between_head_and_node():
        held = [holder(r) for r in jobs]
        return worker["id"] in held and any(h and h != worker["id"] for h in held) and held

    held = wait_for("one job on the head and one on the node", split_between_head_and_node,
                    every=0.1)
    second = jobs[held.index(worker["id"])]
    first = jobs[1 - held.index(worker["id"])]

    def held_by_node():
        return holder(second) == worker["id"]

    time.sleep(0.5)  # inside the pipeline call
    left_at = time.time()
    cluster.remove_node(node)
    wait_for("the node's worker to go offline",
             lambda: not node_worker(client, node.node_id[:8])["online"], timeout=30, every=0.2)
    requeued = wait_for("the second job back in the queue", lambda: not held_by_node(), 30, 0.1)
    assert requeued and time.time() - left_at < 15
    st = done(client, second)
    assert st["generations"][0]["worker_name"] == "rayhorde-cluster/stable_diffusion_1"
    with ctx.db.read() as s:
        g = s.execute(select(Generation).where(Generation.request_id == second)).scalar_one()
        assert g.attempts == 2
    # Not credited twice: the node's worker has only the two small images.
    assert node_worker(client, node.node_id[:8])["requests_fulfilled"] == 2
    assert done(client, first)["finished"] == 1


def test_node_with_an_unknown_key_is_refused(horde):
    from ray import serve

    cluster, client = horde["cluster"], horde["client"]
    node = cluster.add_node(num_cpus=1, resources={"volunteer": 1},
                            labels=node_labels(node_key_digest("nobody-has-this-key-00"), SD))
    from cluster.deploy import APP_NAME

    dispatcher = serve.get_deployment_handle("dispatcher", APP_NAME)
    wait_for("the bridge to refuse the node", lambda: node.node_id in
             dispatcher.stats.remote().result()["refused_nodes"], timeout=60, every=0.2)
    assert node_worker(client, node.node_id[:8]) is None
    assert not [a for a in serve.status().applications if node.node_id[:12] in a]
    cluster.remove_node(node)
