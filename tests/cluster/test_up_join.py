"""A real second node on loopback: `rayhorde up`, then `rayhorde join` in another process; a
node without the token cannot join; kill -9 the volunteer's raylet while it generates and the
job completes on the head; `rayhorde down` leaves nothing of the cluster running."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from sqlalchemy import select

from api.db.models import Generation, Worker
from api.db.session import Database
from node_harness import API, cli, haproxy_count, horde_up, node_worker, raylet_of, wait_for

pytestmark = [pytest.mark.serve, pytest.mark.timeout(900)]
ANON = {"apikey": "0000000000"}
LONG = {"width": 1024, "height": 1024, "steps": 50}


def submit(http, workers: tuple[str, ...] = (), **params):
    r = http.post(f"{API}/generate/async", headers=ANON, json={
        "prompt": "a lighthouse", "models": ["tiny-sd15"], "params": params, "workers": list(workers)})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_up_join_and_a_dying_node(tmp_path):
    haproxies_before = haproxy_count()
    with horde_up(tmp_path) as h:
        http, db = h["http"], Database(h["db_url"])
        assert f"--token {h['token']}" in h["up_output"]
        wait_for("the API", lambda: http.get(f"{API}/status/heartbeat").status_code == 200)

        # Without the cluster's token a node cannot join.
        ray = str(os.path.join(os.path.dirname(os.sys.executable), "ray"))
        refused = subprocess.run([ray, "start", "--address", f"127.0.0.1:{h['port']}",
                                  "--num-cpus", "1"], capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr

        joined = cli("join", "--address", f"127.0.0.1:{h['port']}", "--token", h["token"],
                     "--api-key", h["key"], "--num-cpus", "1", "--models", "tiny-sd15",
                     "--key-file", str(tmp_path / "node_key.pem"))
        assert joined.returncode == 0, joined.stdout + joined.stderr
        worker = wait_for("the node's worker", lambda: (lambda w: w if w and w["online"] else None)(
            node_worker(http)))
        assert worker["models"] == ["tiny-sd15"] and worker["owner"].startswith("volunteer#")

        # The node's replica is up once a job for its worker alone has finished on it.
        small = submit(http, workers=(worker["id"],), width=64, height=64, steps=2)
        wait_for("the node's first job", lambda: http.get(f"{API}/generate/check/{small}").json()["done"])

        # Two long jobs: one on the head's replica, one on the node's (whichever claims which).
        jobs = [submit(http, **LONG), submit(http, **LONG)]

        def holder(request_id):
            with db.read() as s:
                g = s.execute(select(Generation).where(Generation.request_id == request_id)).scalar_one()
                return g.claimed_by if g.state == "processing" else None

        seen: list = []

        def split_between_head_and_node():
            held = [holder(r) for r in jobs]
            seen[:] = held
            return worker["id"] in held and any(h and h != worker["id"] for h in held) and held

        try:
            held = wait_for("one job on the head and one on the node", split_between_head_and_node,
                            every=0.05)
        except AssertionError:
            raise AssertionError(f"no split: the jobs' holders {seen}, node worker {worker['id']}") from None
        second = jobs[held.index(worker["id"])]

        def second_on_node():
            return holder(second) == worker["id"]

        # The node holds it (its replica's call starts as the claim is made): it dies now.
        with db.read() as s:
            node_id = s.get(Worker, worker["id"]).node_id
        os.kill(raylet_of(node_id), signal.SIGKILL)
        wait_for("the job back in the queue", lambda: not second_on_node(), timeout=60)
        wait_for("the node's worker offline", lambda: not node_worker(http)["online"], timeout=60)
        st = wait_for("the second job", lambda: (lambda s: s if s["done"] else None)(
            http.get(f"{API}/generate/status/{second}").json()), timeout=300)
        assert st["generations"][0]["worker_name"] == "rayhorde-cluster/stable_diffusion_1"
        with db.read() as s:
            assert s.execute(select(Generation.attempts).where(
                Generation.request_id == second)).scalar_one() == 2
        db.dispose()
    from cluster.nodes_cli import processes_of

    assert processes_of(h["ray_dir"]) == [], "rayhorde down left processes behind"
    wait_for("haproxy to exit", lambda: haproxy_count() <= haproxies_before, timeout=30)
