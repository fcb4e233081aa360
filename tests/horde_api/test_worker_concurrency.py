"""The worker protocol under concurrency and under random sequences of events: no generation is
handed out twice or lost, and the kudos ledger always balances."""

from __future__ import annotations

import random
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import func, select

from api import images, workers
from api.db import queue
from api.db.migrate import upgrade
from api.db.models import Generation, QueueEntry, Request, User, Worker
from api.db.session import Database
from api.errors import HordeError
from api.schemas import ImageGenerateRequest
from api.worker_schemas import ImagePopInput, JobSubmitInput
from conftest import make_ctx, webp_bytes
from test_economy import assert_ledger_consistent, make_user

WEBP = webp_bytes(256, 256)  # the result of the 256x256 jobs queue_request makes


def queue_request(ctx, user, n: int, ip: str = "127.0.0.1") -> str:
    body = ImageGenerateRequest(prompt="p", models=["tiny-sd15"],
                                params={"n": n, "steps": 10, "width": 256, "height": 256})
    with ctx.db.write() as s:
        # The user as the API sees it: loaded in this transaction (a stale copy merged in
        # would write its old balance back).
        loaded = s.get(User, user.id)
        req, _ = images.submit(ctx, loaded, body, "tests:1:none", f"u:{user.id}", s,
                               images.prepare(ctx, loaded, body))
        return req.id


def states(ctx) -> dict[str, int]:
    with ctx.db.read() as s:
        return dict(s.execute(select(Generation.state, func.count()).group_by(Generation.state)).all())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("db", ["postgres"], indirect=True)
def test_sixteen_workers_pop_at_once(db, tmp_path):
    """16 HTTP workers (threads, through the API) pop, fail now and then, upload and submit
    until the queue is empty. Any exception in a worker fails the test."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    ctx = make_ctx(db, tmp_path, max_waiting_per_user=10_000)
    requesters = [make_user(ctx, f"req{i}", kudos=10_000)[0] for i in range(3)]
    owners = [make_user(ctx, f"owner{i}")[1] for i in range(4)]
    total = 0
    for i in range(30):
        n = 1 + i % 7
        queue_request(ctx, requesters[i % 3], n)
        total += n
    held: dict[str, str] = {}  # generation -> worker holding it now
    handed_out: list[str] = []
    errors: list[str] = []
    finished: list[int] = []
    lock = threading.Lock()
    app = create_app(ctx)

    def work(index: int, client: TestClient):
        rng = random.Random(index)
        headers = owners[index % 4]
        name = f"worker-{index % 4}"  # four threads per worker name: real races on one worker
        idle = 0
        while idle < 3:
            r = client.post("/api/v2/generate/pop", headers=headers, json={
                "name": name, "models": ["tiny-sd15"], "max_pixels": 1024 * 1024,
                "amount": rng.randint(1, 3)})
            assert r.status_code == 200, r.text
            job = r.json()
            if not job["ids"]:
                idle += 1
                time.sleep(0.05)
                continue
            idle = 0
            with lock:
                for gid in job["ids"]:
                    if gid in held:
                        errors.append(f"{gid} handed to {name} while {held[gid]} holds it")
                    held[gid] = name
                    handed_out.append(gid)
            for gid, url in zip(job["ids"], job["r2_uploads"], strict=True):
                fault = rng.random() < 0.1
                if not fault:
                    up = client.put(url.split("127.0.0.1:8000", 1)[1], content=WEBP)
                    assert up.status_code == 200, up.text
                with lock:
                    del held[gid]
                r = client.post("/api/v2/generate/submit", headers=headers, json={
                    "id": gid, "generation": "R2", "state": "faulted" if fault else "ok", "seed": 1})
                if r.status_code != 200:
                    with lock:
                        errors.append(f"submit {gid}: {r.status_code} {r.text}")

    def guarded(index: int):
        try:
            with TestClient(app) as client:
                work(index, client)
            with lock:
                finished.append(index)
        except BaseException as e:  # a thread that dies must fail the test, not vanish
            with lock:
                errors.append(f"worker {index} crashed: {e!r}")

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert sorted(finished) == list(range(16))
    final = states(ctx)
    # Everything finished or, after max_attempts faults, ended faulted: nothing lost or stuck.
    assert final.get("done", 0) + final.get("faulted", 0) == total, final
    assert "waiting" not in final and "processing" not in final
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(QueueEntry)) == 0
    assert len(handed_out) >= total
    assert_ledger_consistent(ctx)


def _upload_key_of(ctx, gid: str) -> str:
    """Where the worker holding `gid` now uploads (its pop's r2_upload URL)."""
    with ctx.db.read() as s:
        return workers.upload_key(gid, s.get(Generation, gid).claim_id)


class WorkerProtocolMachine(RuleBasedStateMachine):
    """Random pops, submits, faults, expiries and cancels against a fresh SQLite database."""

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="rayhorde-prop-")
        db = Database(f"sqlite:///{self.tmp}/h.db")
        upgrade(db)
        from pathlib import Path

        self.ctx = make_ctx(db, Path(self.tmp), max_waiting_per_user=10_000)
        self.requester = make_user(self.ctx, "requester", kudos=50)[0]
        self.owners = [make_user(self.ctx, f"owner{i}")[0] for i in range(2)]
        self.held: dict[str, int] = {}  # generation -> index of the owner whose worker holds it
        self.requests: list[str] = []
        self.queued = 0

    @rule(n=st.integers(1, 4))
    def request(self, n):
        self.requests.append(queue_request(self.ctx, self.requester, n))
        self.queued += n

    @rule(who=st.integers(0, 1), amount=st.integers(1, 3))
    def pop(self, who, amount):
        body = ImagePopInput(name=f"w{who}", models=["tiny-sd15"], max_pixels=1024 * 1024,
                             amount=amount)
        try:
            job = workers.pop_image(self.ctx, self.owners[who], body)
        except HordeError as e:
            # Expiries and faults count as drops: enough in a row put the worker into a
            # maintenance the horde imposes (a job it still held may since have been submitted,
            # which restarts the count), which a moderator then ends.
            assert e.rc == "MaintenanceMode", e.message
            limit = self.ctx.settings.max_consecutive_drops
            with self.ctx.db.write() as s:
                worker = s.execute(select(Worker).where(Worker.name == f"w{who}")).scalar_one()
                assert worker.maintenance and worker.maintenance_until is not None
                assert worker.maintenance_msg == f"dropped or faulted {limit} jobs in a row"
                assert worker.dropped_jobs >= limit
                worker.maintenance, worker.maintenance_until = False, None
                worker.consecutive_drops = 0
            return
        for gid in job.ids:
            assert gid not in self.held, "handed out twice"
            self.held[gid] = who

    @precondition(lambda self: self.held)
    @rule(data=st.data(), fault=st.booleans())
    def submit(self, data, fault):
        gid = data.draw(st.sampled_from(list(self.held)))  # pop order: ids are random
        who = self.held.pop(gid)
        if not fault:
            self.ctx.storage.put(_upload_key_of(self.ctx, gid), WEBP, "image/webp")
        try:
            reward = workers.submit_image(self.ctx, self.owners[who], JobSubmitInput(
                id=gid, generation="R2", state="faulted" if fault else "ok", seed=3))
            assert reward == 0 if fault else reward > 0
        except HordeError as e:  # cancelled while the worker held it
            assert e.rc == "AbortedGen", e.message

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def submit_twice(self, data):
        gid = data.draw(st.sampled_from(list(self.held)))  # pop order: ids are random
        who = self.held.pop(gid)
        self.ctx.storage.put(_upload_key_of(self.ctx, gid), WEBP, "image/webp")
        body = JobSubmitInput(id=gid, generation="R2", state="ok", seed=3)
        try:
            workers.submit_image(self.ctx, self.owners[who], body)
        except HordeError as e:
            assert e.rc == "AbortedGen"
            return
        with pytest.raises(HordeError) as second:
            workers.submit_image(self.ctx, self.owners[who], body)
        assert second.value.rc == "DuplicateGen"

    @rule()
    def expire_everything(self):
        queue.expire(self.ctx.db, self.ctx.settings.max_attempts, now=time.time() + 10_000,
                     max_consecutive_drops=self.ctx.settings.max_consecutive_drops)
        self.held.clear()

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def cancel(self, data):
        rid = data.draw(st.sampled_from(self.requests))
        with self.ctx.db.write() as s:
            images.cancel(self.ctx, s, rid)

    @invariant()
    def ledger_balances(self):
        assert_ledger_consistent(self.ctx)

    @invariant()
    def nothing_lost(self):
        with self.ctx.db.read() as s:
            counts = dict(s.execute(select(Generation.state, func.count())
                                    .group_by(Generation.state)).all())
            assert sum(counts.values()) == self.queued
            # Waiting and processing generations keep their queue entries; ended ones have none.
            live = s.scalar(select(func.count(func.distinct(QueueEntry.generation_id))))
            assert live == counts.get("waiting", 0) + counts.get("processing", 0)
            # Each done generation was paid for exactly once.
            from api.db.models import KudosEntry
            paid = s.scalar(select(func.count()).select_from(KudosEntry)
                            .where(KudosEntry.kind == "generation"))
            assert paid == counts.get("done", 0)
            assert s.scalar(select(func.count()).select_from(Request)) == len(self.requests)

    def teardown(self):
        self.ctx.db.dispose()


TestWorkerProtocol = WorkerProtocolMachine.TestCase
TestWorkerProtocol.settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
