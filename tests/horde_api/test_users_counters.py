"""The user records (/find_user, /users, /users/{id}) read the users' and workers' counters:
every field says what the history says, a call's statements do not grow with the history,
and the routes have their own rate limit. Through the HTTP API, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from api.db import queue
from api.db.models import Generation, KudosEntry
from conftest import add_request, count_statements, make_ctx
from test_economy import assert_ledger_consistent, make_user, submit
from test_workers import do_job

pytestmark = pytest.mark.timeout(180)


def ledger_sum(ctx, user_id: int, *kinds: str, sign: int = 0) -> float:
    """What the old /users summed from the ledger: the user's rows of `kinds` (of one sign)."""
    q = select(func.coalesce(func.sum(KudosEntry.amount), 0.0)).where(
        KudosEntry.user_id == user_id, KudosEntry.kind.in_(kinds))
    if sign:
        q = q.where(KudosEntry.amount * sign > 0)
    with ctx.db.read() as s:
        return s.execute(q).scalar()


def done_of(ctx, user_id: int) -> tuple[int, float]:
    with ctx.db.read() as s:
        return tuple(s.execute(select(func.count(), func.coalesce(func.sum(
            Generation.megapixelsteps), 0.0)).where(Generation.user_id == user_id,
                                                    Generation.state == "done")).one())


def test_every_field_says_what_the_history_says(client, ctx):
    alice, ah = make_user(ctx, "alice", kudos=100)
    bob, bh = make_user(ctx, "bob")
    owner, oh = make_user(ctx, "volunteer")
    submit(client, ah, params={"n": 2, "steps": 12})
    submit(client, ah, params={"n": 1, "steps": 20, "width": 576})
    submit(client, params={"steps": 10})  # anonymous
    rewards = []
    for _ in range(3):  # one pop hands out jobs of one request: 2, 1, 1
        _, answers = do_job(client, oh, amount=2)
        assert all(a.status_code == 200 for a in answers)
        rewards += [a.json()["reward"] for a in answers]
    assert len(rewards) == 4
    r = client.post("/api/v2/kudos/transfer", headers=ah, json={"username": f"bob#{bob.id}",
                                                               "amount": 5})
    assert r.status_code == 200 and r.json() == {"transferred": 5}

    me = client.get("/api/v2/find_user", headers=ah).json()
    gens, mps = done_of(ctx, alice.id)
    assert gens == 3 and mps > 0
    assert me["usage"] == {"requests": 3, "megapixelsteps": round(mps, 2)}
    assert me["records"]["usage"] == {"megapixelsteps": round(mps, 2), "tokens": 0}
    assert me["kudos_details"] == {
        "accumulated": 0.0, "gifted": 5.0, "received": 0.0, "awarded": 100.0, "admin": 100.0}
    assert me["kudos"] == pytest.approx(100 - 5 + ledger_sum(ctx, alice.id, "generation"),
                                        abs=0.01)
    assert me["worker_count"] == 0 and me["contributions"] == {"megapixelsteps": 0.0,
                                                               "fulfillments": 0}
    assert me["active_generations"] == {"image": []}  # all three finished

    theirs = client.get(f"/api/v2/users/{owner.id}").json()
    earned = ledger_sum(ctx, owner.id, "reward")
    assert earned == pytest.approx(sum(rewards), abs=0.02)
    assert theirs["kudos_details"]["accumulated"] == round(earned, 2)
    assert theirs["kudos"] == round(earned, 2)
    with ctx.db.read() as s:
        worker_mps = s.execute(select(func.sum(Generation.megapixelsteps))
                               .where(Generation.state == "done")).scalar()
    assert theirs["contributions"] == {"fulfillments": 4, "megapixelsteps": round(worker_mps, 2)}
    assert theirs["records"]["fulfillment"] == {"image": 4, "text": 0, "interrogation": 0}
    assert theirs["records"]["contribution"]["megapixelsteps"] == round(worker_mps, 2)
    assert theirs["worker_count"] == 1 and len(theirs["worker_ids"]) == 1
    assert theirs["usage"] == {"requests": 0, "megapixelsteps": 0.0}
    assert "contact" not in theirs and "active_generations" not in theirs

    listed = {u["id"]: u for u in client.get("/api/v2/users").json()}
    for field in ("kudos", "kudos_details", "usage", "records", "contributions"):
        assert listed[alice.id][field] == me[field], field
        assert listed[owner.id][field] == theirs[field], field
    assert listed[bob.id]["kudos_details"]["received"] == 5.0 and listed[bob.id]["kudos"] == 5.0

    anon = client.get("/api/v2/find_user").json()
    anon_gens, anon_mps = done_of(ctx, 0)
    assert anon["id"] == 0 and anon["pseudonymous"] and anon_gens == 1
    assert anon["usage"] == {"requests": 1, "megapixelsteps": round(anon_mps, 2)}
    assert_ledger_consistent(ctx)


def finish_history(ctx, generations: int, user_id: int = 0) -> None:
    """`generations` finished for `user_id` (anonymous by default) by one cluster worker."""
    for _ in range(generations // 20):
        add_request(ctx.db, n=20, user_id=user_id)
        jobs = queue.claim(ctx.db, queue.Capabilities("w", ["tiny-sd15"]), 20)
        assert len(jobs) == 20
        queue.finish(ctx.db, [queue.Result(j.generation_id, j.claim_id, f"k{j.generation_id}",
                                           j.seed, "w", "w", owner_id=1) for j in jobs])


def test_statements_are_pinned_and_do_not_grow_with_history(client, ctx):
    users = [make_user(ctx, f"user{i:02d}", kudos=i + 1) for i in range(30)]
    _, key = users[-1]
    counts: dict[tuple[str, int], int] = {}
    reads: list[str] = []
    client.get("/api/v2/find_user", headers=key)  # the limiter caches who the key is
    for history in (20, 400):
        finish_history(ctx, history - (20 if history == 400 else 0))
        assert done_of(ctx, 0)[0] == history
        for name, call in (
                ("users", lambda: client.get("/api/v2/users?page=1")),
                ("users by age", lambda: client.get("/api/v2/users?sort=age")),
                ("find_user anonymous", lambda: client.get("/api/v2/find_user")),
                ("find_user", lambda: client.get("/api/v2/find_user", headers=key)),
                ("user", lambda: client.get("/api/v2/users/0"))):
            with count_statements(ctx.db) as c:
                r = call()
            assert r.status_code == 200, r.text
            counts[(name, history)] = c.count
            reads += c.statements
        assert len(client.get("/api/v2/users").json()) == 25
    # /users: the page of users, their workers. /find_user: the key's user, its workers, its
    # queued generations (none for the anonymous user). /users/{id}: the user, its workers.
    expected = {"users": 2, "users by age": 2, "find_user anonymous": 2, "find_user": 3,
                "user": 2}
    assert {k: v for k, v in counts.items() if k[1] == 20} == {
        (k, 20): v for k, v in expected.items()}
    assert {k: v for k, v in counts.items() if k[1] == 400} == {
        (k, 400): v for k, v in expected.items()}
    assert not any("kudos_ledger" in s or "sum(" in s.lower() for s in reads)


def test_user_routes_have_their_own_rate_limit(db, tmp_path):
    ctx = make_ctx(db, tmp_path, rate_limit_users="3/minute")
    with TestClient(create_app(ctx)) as client:
        codes = [client.get(path).status_code
                 for path in ("/api/v2/find_user", "/api/v2/users", "/api/v2/users/0",
                              "/api/v2/users")]
        assert codes == [200, 200, 200, 429]
        r = client.get("/api/v2/find_user")
        assert r.json()["rc"] == "TooManyRequests" and int(r.headers["Retry-After"]) >= 1
        # A registered user's key counts against the user, not the exhausted address.
        _, key = make_user(ctx, "reader")
        assert [client.get("/api/v2/find_user", headers=key).status_code
                for _ in range(4)] == [200, 200, 200, 429]
        # Other groups are not spent by these calls.
        assert client.get("/api/v2/status/heartbeat").status_code == 200
