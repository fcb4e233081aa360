"""Faults on the configuration operators run: Serve (`make run`'s configs/local.yaml) on
PostgreSQL, so the dispatcher's FOR UPDATE SKIP LOCKED path runs under Serve. With 100 jobs
queued and in flight, each of: the dispatcher replica killed, an API replica killed, the model
replica killed, every database connection terminated, PostgreSQL stopped and started again.
Every time: all 100 finish, none is paid twice, the ledger balances; while the database is
away the API answers 503 with Retry-After, never 500."""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest
from sqlalchemy import create_engine, func, select, text

from api.db.models import Generation, KudosEntry, User
from serve_harness import running_cluster
from test_cluster_e2e import make_user

pytestmark = [pytest.mark.serve, pytest.mark.postgres, pytest.mark.timeout(900)]
API = "http://127.0.0.1:8000/api/v2"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
JOBS = 100


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from api.db.migrate import reset

    reset(POSTGRES_URL).dispose()
    with running_cluster(tmp_path_factory.mktemp("faults"), database_url=POSTGRES_URL, settings={
            "rate_limit_submit": "100000/minute", "rate_limit_poll": "100000/minute",
            "max_waiting_per_user": 1000}) as info:
        _, key = make_user(info, "flooder", kudos=100000)
        yield {**info, "headers": {"apikey": key}}


def call(http: httpx.Client, method: str, path: str, **kw) -> httpx.Response | None:
    """One call; None when the ingress could not reach an API replica (one was just killed):
    the connection fails, or Serve answers its own plain-text 5xx. Our API always answers
    JSON, so a 5xx from it still fails the test."""
    try:
        r = http.request(method, f"{API}{path}", **kw)
    except httpx.TransportError:
        return None
    if r.status_code >= 500 and "json" not in r.headers.get("content-type", ""):
        return None
    return r


def flood(http: httpx.Client, headers: dict) -> list[str]:
    ids = []
    for i in range(JOBS):
        r = call(http, "POST", "/generate/async", headers=headers, json={
            "prompt": f"fault test {i}", "models": ["tiny-sd15"],
            "params": {"width": 64, "height": 64, "steps": 2, "seed": str(i)}})
        assert r is not None and r.status_code == 202, r and r.text
        ids.append(r.json()["id"])
    return ids


def wait_all_done(http: httpx.Client, ids: list[str], timeout: float = 600) -> None:
    left, deadline = set(ids), time.time() + timeout
    while left and time.time() < deadline:
        for rid in list(left):
            r = call(http, "GET", f"/generate/check/{rid}")
            if r is not None and r.status_code == 200 and r.json()["done"]:
                left.discard(rid)
            elif r is not None:
                assert r.status_code in (200, 503), (r.status_code, r.text)
        time.sleep(0.2)
    assert not left, f"{len(left)} of {len(ids)} requests never finished"


def wait_some_in_flight(http: httpx.Client, ids: list[str]) -> None:
    """Until some jobs are finished and others not yet: the fault lands mid-flood."""
    deadline = time.time() + 120
    while time.time() < deadline:
        done = sum(1 for rid in ids[:20] if (r := call(http, "GET", f"/generate/check/{rid}"))
                   is not None and r.status_code == 200 and r.json()["done"])
        if 0 < done and not all_done(http, ids[-5:]):
            return
        time.sleep(0.1)
    raise AssertionError("the flood never got under way")


def all_done(http: httpx.Client, ids: list[str]) -> bool:
    return all((r := call(http, "GET", f"/generate/check/{rid}")) is not None
               and r.status_code == 200 and r.json()["done"] for rid in ids)


def assert_each_once_and_balanced(db, ids: list[str]) -> None:
    with db.read() as s:
        gens = s.execute(select(Generation.id, Generation.state)
                         .where(Generation.request_id.in_(ids))).all()
        assert len(gens) == JOBS and {state for _, state in gens} == {"done"}
        # Each generation's requester was charged exactly once (one ledger row, its id as ref).
        charged = dict(s.execute(select(KudosEntry.ref, func.count()).where(
            KudosEntry.kind == "generation", KudosEntry.ref.in_([g for g, _ in gens]))
            .group_by(KudosEntry.ref)).all())
        assert charged == {g: 1 for g, _ in gens}
        per_txn = s.execute(select(func.sum(KudosEntry.amount)).group_by(KudosEntry.txn_id)).scalars()
        assert all(abs(total) < 1e-6 for total in per_txn)
        sums = dict(s.execute(select(KudosEntry.user_id, func.sum(KudosEntry.amount))
                              .group_by(KudosEntry.user_id)).all())
        for user in s.execute(select(User)).scalars():
            assert user.kudos == pytest.approx(sums.get(user.id, 0.0), abs=1e-6), user.username


def run_with_fault(cluster, fault) -> None:
    with httpx.Client(timeout=30) as http:
        ids = flood(http, cluster["headers"])
        wait_some_in_flight(http, ids)
        fault(http)
        wait_all_done(http, ids)
    assert_each_once_and_balanced(cluster["db"], ids)


def kill_replica(cluster, deployment: str):
    import ray

    def fault(_http):
        victim = cluster["replica_actor"](deployment)
        assert victim is not None, f"no {deployment} replica"
        ray.kill(victim, no_restart=True)
    return fault


def test_dispatcher_replica_killed(cluster):
    run_with_fault(cluster, kill_replica(cluster, "dispatcher"))


def test_api_replica_killed(cluster):
    run_with_fault(cluster, kill_replica(cluster, "api"))


def test_model_replica_killed(cluster):
    run_with_fault(cluster, kill_replica(cluster, "sd15"))


def test_database_connections_terminated(cluster):
    def fault(_http):
        engine = create_engine(POSTGRES_URL)
        with engine.connect() as conn:
            n = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE datname = 'test' AND pid <> pg_backend_pid()")).scalar()
        engine.dispose()
        assert n > 0
    run_with_fault(cluster, fault)


def pg_ctl(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
                   check=True, capture_output=True, timeout=120)


def test_postgresql_stopped_and_started(cluster):
    def fault(http):
        pg_ctl("stop")
        try:
            answers = [call(http, "GET", f"/generate/check/{cluster['probe']}") for _ in range(3)]
            answers = [r for r in answers if r is not None]
            assert answers and all(r.status_code == 503 for r in answers), \
                [(r.status_code, r.text) for r in answers]
            assert all(r.headers.get("retry-after") for r in answers)
        finally:
            pg_ctl("start")

    with httpx.Client(timeout=30) as http:
        r = call(http, "POST", "/generate/async", headers=cluster["headers"], json={
            "prompt": "probe", "models": ["tiny-sd15"], "params": {"width": 64, "height": 64, "steps": 2}})
        assert r is not None and r.status_code == 202
        cluster["probe"] = r.json()["id"]
    run_with_fault(cluster, fault)
