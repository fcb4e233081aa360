"""The claim query, release, expiry and compare-and-set finish, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select

from api.db import queue
from api.db.models import Generation, QueueEntry, User
from conftest import add_request, count_statements

pytestmark = pytest.mark.timeout(120)


def caps(*models, worker="w1", max_pixels=3072 * 3072):
    return queue.Capabilities(worker, list(models), max_pixels=max_pixels)


def test_claim_orders_by_priority_then_age(db):
    now = time.time()
    old_low = add_request(db, created=now - 10)
    new_high = add_request(db, priority=1000, created=now)
    new_low = add_request(db, created=now)
    assert {j.request_id for j in queue.claim(db, caps("tiny-sd15"), 2)} == {new_high, old_low}
    assert [j.request_id for j in queue.claim(db, caps("tiny-sd15"), 3)] == [new_low]
    assert queue.claim(db, caps("tiny-sd15"), 3) == []


def test_claim_priority_sequence(db):
    now = time.time()
    ids = {name: add_request(db, priority=p, created=now - age)
           for name, p, age in (("a", 0, 0), ("b", 50, 0), ("c", 0, 100), ("d", 10, 0))}
    got = []
    while jobs := queue.claim(db, caps("tiny-sd15"), 1):
        got.append(jobs[0].request_id)
    # effective priority = priority + age: c=100, b=50, d=10, a=0
    assert got == [ids["c"], ids["b"], ids["d"], ids["a"]]


def test_claim_filters_models_and_pixels(db):
    sd = add_request(db, models=("tiny-sd15",))
    xl = add_request(db, models=("tiny-sdxl",), width=1024, height=1024)
    anyone = add_request(db, models=(), width=1024, height=1024)
    assert queue.claim(db, caps("tiny-sdxl", max_pixels=512 * 512), 5) == []
    got = queue.claim(db, caps("tiny-sdxl"), 5)
    assert {j.request_id for j in got} == {xl, anyone}
    assert {j.model for j in got} == {"tiny-sdxl"}  # a request naming no model runs on ours
    assert [j.request_id for j in queue.claim(db, caps("tiny-sd15"), 5)] == [sd]


def test_multi_model_request_is_claimed_once(db):
    rid = add_request(db, n=2, models=("tiny-sd15", "tiny-sdxl"))
    got = queue.claim(db, caps("tiny-sd15", "tiny-sdxl"), 10)
    assert len(got) == 2 and {j.request_id for j in got} == {rid}
    assert queue.claim(db, caps("tiny-sdxl"), 10) == []


def test_finish_is_compare_and_set(db):
    add_request(db)
    (job,) = queue.claim(db, caps("tiny-sd15"), 1)
    res = queue.Result(job.generation_id, job.claim_id, "k", 1, "w1", "w1", owner_id=0)
    assert [f.generation_id for f in queue.finish(db, [res])] == [job.generation_id]
    assert queue.finish(db, [res]) == []  # a second submit changes nothing
    stale = queue.Result(job.generation_id, "not-the-claim", "k2", 1, "w2", "w2", owner_id=0)
    assert queue.finish(db, [stale]) == []
    with db.read() as s:
        g = s.get(Generation, job.generation_id)
        assert (g.state, g.storage_key, g.worker_id) == ("done", "k", "w1")
        assert s.scalar(select(func.count()).select_from(QueueEntry)) == 0


def test_release_requeues_then_faults_after_max_attempts(db):
    rid = add_request(db)
    for attempt in range(1, 4):
        (job,) = queue.claim(db, caps("tiny-sd15"), 1)
        assert job.attempts == attempt
        assert queue.release(db, [(job.generation_id, job.claim_id)], "boom", 3) == 1
    assert queue.claim(db, caps("tiny-sd15"), 1) == []
    with db.read() as s:
        g = s.execute(select(Generation).where(Generation.request_id == rid)).scalar_one()
        assert g.state == "faulted" and g.fault_reason == "boom" and g.attempts == 3


def test_expired_claims_return_and_late_results_are_refused(db):
    add_request(db, steps=10)
    (job,) = queue.claim(db, caps("tiny-sd15"), 1)
    assert job.deadline - time.time() == pytest.approx(150, abs=5)
    assert queue.expire(db, 3, now=time.time() + 10) == 0
    assert queue.expire(db, 3, now=job.deadline + 1) == 1
    (again,) = queue.claim(db, caps("tiny-sd15", worker="w2"), 1)
    assert again.generation_id == job.generation_id and again.attempts == 2
    late = queue.Result(job.generation_id, job.claim_id, "late", 1, "w1", "w1", owner_id=0)
    assert queue.finish(db, [late]) == []
    assert [f.generation_id for f in queue.finish(db, [queue.Result(
        again.generation_id, again.claim_id, "k", 1, "w2", "w2", owner_id=0)])] == [again.generation_id]


def test_release_all_claims_of_a_lost_worker(db):
    add_request(db, n=3)
    queue.claim(db, caps("tiny-sd15", worker="gone"), 2)
    assert queue.expire(db, 3, worker_id="gone") == 2
    assert len(queue.claim(db, caps("tiny-sd15"), 5)) == 3


def test_job_ttl_formula():
    assert queue.job_ttl(512, 512, 30) == 150
    assert queue.job_ttl(1024, 1024, 100) == 30 + 100 * 2 * 4
    assert queue.job_ttl(1024, 1024, 100, controlnet=True) == 2 * (30 + 800)


def test_claim_statements_do_not_grow_with_queue(db):
    add_request(db, n=2)
    with count_statements(db) as small:
        queue.claim(db, caps("tiny-sd15"), 2)
    add_request(db, n=2000)  # 2,000 more waiting generations, inserted in bulk
    with count_statements(db) as big:
        assert len(queue.claim(db, caps("tiny-sd15"), 2)) == 2
    # A read that there are any (see below), the candidates and the update, which on
    # PostgreSQL also marks the queue entries claimed (SQLite has no UPDATE in a WITH).
    updates = 1 if db.engine.dialect.name == "postgresql" else 2
    assert small.count == big.count == 2 + updates


def test_a_claim_that_finds_nothing_opens_no_write_transaction(db):
    """SQLite has one writer at a time: the dispatcher's claims on families with nothing to do
    must not make submits wait for the write lock (nor cost PostgreSQL a transaction)."""
    add_request(db, n=1, models=("tiny-sdxl",))
    with count_statements(db) as empty:
        assert queue.claim(db, caps("tiny-sd15"), 4) == []
    with count_statements(db) as found:
        assert len(queue.claim(db, caps("tiny-sdxl"), 4)) == 1
    locking = "BEGIN IMMEDIATE" if db.is_sqlite else "FOR UPDATE"
    assert not any(locking in s.upper() for s in empty.statements) and empty.count == 1
    # (SQLite marks the claimed queue entries in a statement of its own)
    assert any(locking in s.upper() for s in found.statements)
    assert found.count == (4 if db.is_sqlite else 3)


def test_concurrent_claimers_never_share_a_generation(db):
    if db.is_sqlite:
        n_threads = 4
    else:
        n_threads = 16
    add_request(db, n=20)
    add_request(db, n=20)
    add_request(db, n=20)
    got: list[str] = []
    lock = threading.Lock()
    errors = []

    def worker(i):
        try:
            while jobs := queue.claim(db, caps("tiny-sd15", worker=f"w{i}"), 2):
                with lock:
                    got.extend(j.generation_id for j in jobs)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(got) == 60 and len(set(got)) == 60


def test_anonymous_user_exists_from_the_start(db):
    with db.read() as s:
        anon = s.get(User, 0)
        assert anon.username == "Anonymous"


def _claim_plan(db, claimer) -> str:
    """The database's plan for `claimer`'s candidate statement (PostgreSQL: run, with the rows
    each step read), with its values bound as a claim binds them."""
    from sqlalchemy.dialects import sqlite

    pg = not db.is_sqlite
    statement = queue._claim_statement(queue._shape(claimer, pg))
    compiled = statement.compile(dialect=db.engine.dialect if pg else sqlite.dialect(paramstyle="named"))
    params = {**compiled.params, **queue._params(claimer, 1, pg)}
    with db.engine.connect() as conn:
        if db.is_sqlite:
            return "\n".join(row[-1] for row in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + str(compiled), params))
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + str(compiled), params))
        conn.rollback()
        return plan


def test_a_claim_steps_over_no_job_in_flight(db):
    """Claimed generations keep their queue entries (a job handed back keeps its place), but
    marked claimed, out of the partial index claims read: with 300 jobs in flight at the head
    of the queue, the next claim still reads one entry to find the next waiting job. Handed
    back, the jobs are claimable again, in their old places."""
    now = time.time()
    add_request(db, n=300, created=now - 100)
    newer = add_request(db, n=2000, created=now)  # a queue worth reading in index order
    held = queue.claim(db, caps("tiny-sd15", worker="busy"), 300)
    assert len(held) == 300
    with db.read() as s:
        assert s.scalar(select(func.count()).where(QueueEntry.claimed)) == 300
    if not db.is_sqlite:
        with db.engine.begin() as conn:  # what autovacuum does on a live server
            conn.exec_driver_sql("ANALYZE")
    # (one model, no requests naming none: the per-model look-up runs once)
    plan = _claim_plan(db, queue.Capabilities("w1", ["tiny-sd15"], any_model=""))
    assert "ix_queue_claim" in plan, plan  # SQLite too sees that the partial index applies
    if not db.is_sqlite:  # the model's look-up read one entry: the first waiting one
        lines = plan.splitlines()
        scans = [line for line, cond in zip(lines, lines[1:])
                 if "ix_queue_claim" in line and "= models.value)" in cond]
        assert len(scans) == 1 and "(actual rows=1 loops=1)" in scans[0], plan
    assert queue.expire(db, 3, worker_id="busy") == 300
    with db.read() as s:
        assert s.scalar(select(func.count()).where(QueueEntry.claimed)) == 0
    got = queue.claim(db, caps("tiny-sd15"), 2)
    assert [j.generation_id for j in got] == [held[0].generation_id, held[1].generation_id]
    assert newer not in {j.request_id for j in got}
