"""Races on PostgreSQL, through the HTTP API (issue 21): what real clients send at once, with
a barrier so the calls start together, and every thread's answer checked.

- first pops of one new worker name from 8 threads (one owner, then two owners);
- pops and submits of ONE worker from 8 threads until the queue is empty;
- 8 pops of one worker once its uptime bonus is due: paid once;
- 8 requests of one requester against its waiting cap, and 8 submits of one generation.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from api.app import create_app
from api.db.models import Generation, KudosEntry, QueueEntry, Request, Worker
from conftest import make_ctx
from test_economy import assert_ledger_consistent, balances, make_user, submit
from test_workers import WEBP, pop, upload

pytestmark = [pytest.mark.timeout(180), pytest.mark.parametrize("db", ["postgres"], indirect=True)]
THREADS = 8


def at_once(app, n: int, call: Callable[[TestClient, int], object]) -> list:
    """`call(client, i)` from n threads, each with its own client, released together by a
    barrier; the answers in thread order. A thread that raises fails the test."""
    barrier = threading.Barrier(n)
    answers: list = [None] * n
    errors: list[str] = []

    def run(i: int) -> None:
        try:
            with TestClient(app) as client:
                barrier.wait(timeout=30)
                answers[i] = call(client, i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return answers


@pytest.fixture
def ctx(db, tmp_path):
    return make_ctx(db, tmp_path, max_waiting_per_user=10_000)


@pytest.fixture
def app(ctx):
    return create_app(ctx)


def queue_jobs(app, headers, count: int) -> list[str]:
    with TestClient(app) as client:
        ids = []
        for _ in range(count):
            r = submit(client, headers, params={"n": 1})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        return ids


def test_first_pops_of_one_new_name_make_one_worker(ctx, app):
    _, requester = make_user(ctx, "asker", kudos=1000)
    _, owner = make_user(ctx, "volunteer")
    queue_jobs(app, requester, 4)
    answers = at_once(app, THREADS, lambda c, i: pop(c, owner, "racer"))
    assert [r.status_code for r in answers] == [200] * THREADS, [r.text for r in answers]
    handed = [gid for r in answers for gid in r.json()["ids"]]
    assert len(handed) == len(set(handed)) == 4  # four jobs, each to one pop
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Worker).where(Worker.name == "racer")) == 1
        assert s.scalar(select(func.count()).select_from(Generation)
                        .where(Generation.state == "processing")) == 4


def test_first_pops_of_one_name_by_two_owners(ctx, app):
    (a, ha), (b, hb) = make_user(ctx, "alice"), make_user(ctx, "bob")
    answers = at_once(app, THREADS, lambda c, i: pop(c, ha if i % 2 else hb, "contested"))
    by_owner = {who: [r for i, r in enumerate(answers) if (i % 2 == 1) == (who == "alice")]
                for who in ("alice", "bob")}
    with ctx.db.read() as s:
        (worker,) = s.execute(select(Worker).where(Worker.name == "contested")).scalars()
    winner, loser = ("alice", "bob") if worker.owner_id == a.id else ("bob", "alice")
    assert worker.owner_id in (a.id, b.id)
    assert [r.status_code for r in by_owner[winner]] == [200] * (THREADS // 2)
    for r in by_owner[loser]:
        assert r.status_code == 403 and r.json()["rc"] == "WrongCredentials", r.text


def test_one_worker_popping_and_submitting_from_eight_threads(ctx, app):
    requester_user, requester = make_user(ctx, "asker", kudos=10_000)
    owner_user, owner = make_user(ctx, "volunteer")
    total = 24
    queue_jobs(app, requester, total)
    held: dict[str, int] = {}
    done: list[str] = []
    rewards: list[float] = []
    problems: list[str] = []
    lock = threading.Lock()

    def work(client: TestClient, i: int) -> int:
        jobs = 0
        while True:
            r = pop(client, owner, "shared-box", amount=1)
            if r.status_code != 200:
                problems.append(f"pop {r.status_code} {r.text}")
                return jobs
            (gid, *_), url = r.json()["ids"] or [None], r.json().get("r2_uploads")
            if gid is None:
                return jobs
            with lock:
                if gid in held:
                    problems.append(f"{gid} held by thread {held[gid]} handed to {i}")
                held[gid] = i
            assert upload(client, url[0]).status_code == 200
            s = client.post("/api/v2/generate/submit", headers=owner,
                            json={"id": gid, "generation": "R2", "state": "ok", "seed": 1})
            with lock:
                del held[gid]
                if s.status_code != 200:
                    problems.append(f"submit {gid}: {s.status_code} {s.text}")
                else:
                    done.append(gid)
                    rewards.append(s.json()["reward"])
            jobs += 1

    before = balances(ctx)
    per_thread = at_once(app, THREADS, work)
    assert not problems, problems[:5]
    assert sum(per_thread) == len(done) == len(set(done)) == total
    assert all(reward > 0 for reward in rewards)
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(QueueEntry)) == 0
        assert dict(s.execute(select(Generation.state, func.count())
                              .group_by(Generation.state)).all()) == {"done": total}
        worker = s.execute(select(Worker).where(Worker.name == "shared-box")).scalar_one()
        assert worker.jobs_done == total
    after = balances(ctx)
    # The owner gained exactly what the submits answered; the requester paid for each job.
    assert after[owner_user.id] - before[owner_user.id] == pytest.approx(sum(rewards), abs=0.05)
    assert after[requester_user.id] < before[requester_user.id]
    assert_ledger_consistent(ctx)


def test_eight_pops_against_a_due_bonus_pay_it_once(ctx, app):
    _, requester = make_user(ctx, "asker", kudos=1000)
    owner_user, owner = make_user(ctx, "volunteer")
    queue_jobs(app, requester, 1)
    with TestClient(app) as client:  # a job done for someone else in this period
        job = pop(client, owner, "bonus-box").json()
        assert upload(client, job["r2_uploads"][0]).status_code == 200
        assert client.post("/api/v2/generate/submit", headers=owner, json={
            "id": job["ids"][0], "generation": "R2", "state": "ok", "seed": 1}).status_code == 200
    with ctx.db.write() as s:  # the period has passed while it stayed online
        s.execute(update(Worker).where(Worker.name == "bonus-box").values(
            last_bonus_at=time.time() - ctx.settings.uptime_bonus_seconds - 1,
            last_seen=time.time() - 5))
    before = balances(ctx)[owner_user.id]
    answers = at_once(app, THREADS, lambda c, i: pop(c, owner, "bonus-box"))
    assert [r.status_code for r in answers] == [200] * THREADS, [r.text for r in answers]
    assert balances(ctx)[owner_user.id] - before == pytest.approx(ctx.settings.uptime_bonus_kudos)
    with ctx.db.read() as s:
        kinds = Counter(s.execute(select(KudosEntry.kind).where(
            KudosEntry.user_id == owner_user.id)).scalars())
    assert kinds["uptime"] == 1
    assert_ledger_consistent(ctx)


def test_requests_racing_the_waiting_cap(db, tmp_path):
    ctx = make_ctx(db, tmp_path, max_waiting_per_user=3)
    app = create_app(ctx)
    _, user = make_user(ctx, "eager", kudos=1000)
    for headers in (user, {"apikey": "0000000000"}):  # a user, and one anonymous address
        answers = at_once(app, THREADS, lambda c, i: submit(c, headers, params={"n": 1}))
        codes = Counter(r.status_code for r in answers)
        assert codes == {202: 3, 429: THREADS - 3}, [r.text for r in answers]
        for r in answers:
            if r.status_code == 429:
                assert r.json()["rc"] == "TooManyPrompts", r.text
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Request)) == 6
        assert s.scalar(select(func.count()).select_from(Generation)
                        .where(Generation.state == "waiting")) == 6


def test_submits_of_one_generation_at_once_pay_once(ctx, app):
    _, requester = make_user(ctx, "asker", kudos=1000)
    owner_user, owner = make_user(ctx, "volunteer")
    queue_jobs(app, requester, 1)
    with TestClient(app) as client:
        job = pop(client, owner, "double").json()
        assert upload(client, job["r2_uploads"][0], WEBP).status_code == 200
    gid = job["ids"][0]
    before = balances(ctx)[owner_user.id]
    answers = at_once(app, THREADS, lambda c, i: c.post("/api/v2/generate/submit", headers=owner,
                      json={"id": gid, "generation": "R2", "state": "ok", "seed": 1}))
    ok = [r for r in answers if r.status_code == 200]
    assert len(ok) == 1, [r.text for r in answers]
    for r in answers:
        if r.status_code != 200:
            assert r.status_code == 400 and r.json()["rc"] == "DuplicateGen", r.text
    assert balances(ctx)[owner_user.id] - before == pytest.approx(ok[0].json()["reward"], abs=0.01)
    assert_ledger_consistent(ctx)
