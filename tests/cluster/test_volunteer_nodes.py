"""Volunteer Ray nodes through the bridge, on a multi-node cluster in one process tree
(ray.cluster_utils.Cluster, as Ray's own tests do): a node joins, gets its own replica and
work, its owner earns kudos; when it is removed mid-job the job completes on the head and its
worker goes offline; a node naming no user's key, or naming one it cannot sign with, is
refused and earns its named owner nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import context_from_settings, create_app
from api.auth import hash_api_key
from api.db.models import Generation, User, Worker
from api.node_keys import node_private_key, node_public_key
from api.settings import Settings
from cluster.bridge import head_labels, node_labels
from cluster.node_proof import KEY_FILE_ENV, write_key
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
                       node_public_key=node_public_key(KEY)))
        with TestClient(create_app(ctx)) as client:
            yield {"cluster": cluster, "client": client, "ctx": ctx, "workdir": workdir}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def key_file(workdir: Path, api_key: str) -> str:
    """A node's key file as `rayhorde join` writes it, for the key `api_key` derives."""
    path = workdir / f"node-key-{api_key}.pem"
    write_key(path, node_private_key(api_key))
    return str(path)


def dispatcher_stats():
    from ray import serve

    from cluster.deploy import APP_NAME

    return serve.get_deployment_handle("dispatcher", APP_NAME).stats.remote().result()


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
                            labels=node_labels(node_public_key(KEY), SD),
                            env_vars={KEY_FILE_ENV: key_file(horde["workdir"], KEY)})
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

    # The node holds it (its replica's call starts as the claim is made): it leaves now.
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


@pytest.mark.parametrize("case", ["unknown key", "copied label, other key", "copied label, no key"])
def test_a_node_that_cannot_prove_its_owner_is_refused(horde, case):
    """A node gets an owner only by signing with the key its label names: one naming no user's
    key, or copying a user's key label (labels are public) without holding the key, gets no
    worker, no application and no work, and the user its label names earns nothing."""
    from ray import serve

    cluster, client, ctx = horde["cluster"], horde["client"], horde["ctx"]
    label = node_public_key("nobody-has-this-key-00") if case == "unknown key" \
        else node_public_key(KEY)
    env = {} if case == "copied label, no key" else \
        {KEY_FILE_ENV: key_file(horde["workdir"], "an-attackers-own-key0")}
    before = client.get("/api/v2/find_user", headers={"apikey": KEY}).json()["kudos"]
    node = cluster.add_node(num_cpus=1, resources={"volunteer": 1},
                            labels=node_labels(label, SD), env_vars=env)
    try:
        wait_for("the bridge to refuse the node",
                 lambda: node.node_id in dispatcher_stats()["refused_nodes"], timeout=90, every=0.2)
        assert node_worker(client, node.node_id[:8]) is None
        with ctx.db.read() as s:  # no worker row names the node, so no owner is credited for it
            assert s.execute(select(Worker).where(Worker.node_id == node.node_id)).first() is None
        assert not [a for a in serve.status().applications if node.node_id[:12] in a]
        st = done(client, submit(client))  # work still runs, on the head
        assert st["generations"][0]["worker_name"] == "rayhorde-cluster/stable_diffusion_1"
        assert client.get("/api/v2/find_user", headers={"apikey": KEY}).json()["kudos"] == before
    finally:
        cluster.remove_node(node)
