"""Kudos conservation as a stateful property (hypothesis RuleBasedStateMachine), on SQLite and
PostgreSQL, through the public HTTP API: requesters, self-dealing and colluding worker owners,
image and text jobs submitted in every state, cancels, expiries, transfers and uptime bonuses.

After every step: the ledger sums to zero, each generation is paid at most once, a requester
never pays more than it was quoted, and no user (nor the colluding pair together) holds more
than it started with plus what its workers earned doing others' jobs (each bounded by its
price, text by the tokens delivered), transfers received and the bonuses its workers were due."""

from __future__ import annotations

import base64
import io
import math
import shutil
import tempfile
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, \
    run_state_machine_as_test
from sqlalchemy import func, select, update

from api.db import queue
from api.db.models import Generation, KudosEntry, Worker

pytestmark = pytest.mark.timeout(400)
ANON = {"apikey": "0000000000"}
START = 200.0
USERS = ["alice", "bob", "carol", "dave"]
COLLUDERS = frozenset({"bob", "carol"})  # bob's and carol's workers serve each other
EPS = 0.02
STATS = {"examples": 0, "steps": 0}  # per backend, read by the tests below


def _webp(width: int, height: int) -> bytes:
    # Inline (not conftest's webp_bytes) so this file runs unchanged on older checkouts.
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buf, format="WEBP")
    return buf.getvalue()


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


class Conservation(RuleBasedStateMachine):
    backend = "sqlite"

    def __init__(self):
        super().__init__()
        from fastapi.testclient import TestClient

        from api.app import create_app
        from api.db.migrate import reset, upgrade
        from api.db.session import Database
        from conftest import POSTGRES_URL, make_ctx
        from test_economy import make_user

        self.tmp = tempfile.mkdtemp(prefix="conservation-")
        if self.backend == "sqlite":
            self.db = Database(f"sqlite:///{self.tmp}/rayhorde.db")
            upgrade(self.db)
        else:
            self.db = reset(POSTGRES_URL)
        from pathlib import Path
        self.ctx = make_ctx(self.db, Path(self.tmp))
        app = create_app(self.ctx)
        self.client = TestClient(app).__enter__()
        # Anonymous requests from another address (the workers all pop from "testclient").
        self.elsewhere = TestClient(app, client=("203.0.113.9", 50000))
        self.users = {}
        for name in USERS:
            user, headers = make_user(self.ctx, name, kudos=START)
            self.users[name] = (user.id, headers)
        self.workers = {}  # name -> (owner, kind)
        for name in USERS:
            self.workers[f"{name}-img"] = (name, "image")
            self.workers[f"{name}-txt"] = (name, "text")
        self.workers["bob-img2"] = ("bob", "image")  # a second image worker of one owner
        self.requests = {}  # request id -> {requester, quote, n, kind}
        self.in_flight = []  # popped jobs, each a dict
        self.stale = []  # jobs whose claims expired or whose answer was given
        # What may raise a balance: (owner, requester, bound), (src, dst, amount), (owner, amount)
        self.jobs_paid = []
        self.transfers = []
        self.bonuses = []
        self.worked_for_others = set()  # worker names that finished a job for someone else
        STATS["examples"] += 1

    def teardown(self):
        self.client.__exit__(None, None, None)
        self.db.dispose()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------

    def balance(self, name: str) -> float:
        from api.db.models import User
        with self.db.read() as s:
            return s.get(User, self.users[name][0]).kudos

    def step(self):
        STATS["steps"] += 1

    def _record_request(self, r, requester, n, kind, max_length=None):
        if r.status_code == 202:
            self.requests[r.json()["id"]] = {"requester": requester, "quote": r.json()["kudos"],
                                             "n": n, "kind": kind, "max_length": max_length}
        else:  # the waiting cap, or upfront kudos: refused cleanly
            assert r.status_code in (403, 429), r.text

    # -- rules ----------------------------------------------------------------------------

    @rule(who=st.sampled_from(USERS + ["anon", "anon-elsewhere"]), n=st.integers(1, 3),
          width=st.sampled_from([64, 128, 192]), height=st.sampled_from([64, 128]))
    def image_request(self, who, n, width, height):
        self.step()
        client = self.elsewhere if who == "anon-elsewhere" else self.client
        headers = self.users[who][1] if who in self.users else ANON
        r = client.post("/api/v2/generate/async", headers=headers, json={
            "prompt": "a lighthouse", "models": ["tiny-sd15"],
            "params": {"n": n, "width": width, "height": height, "steps": 10}})
        self._record_request(r, who, n, "image")

    @rule(who=st.sampled_from(USERS + ["anon", "anon-elsewhere"]), n=st.integers(1, 3),
          max_length=st.sampled_from([16, 40, 100, 200]))
    def text_request(self, who, n, max_length):
        self.step()
        client = self.elsewhere if who == "anon-elsewhere" else self.client
        headers = self.users[who][1] if who in self.users else ANON
        r = client.post("/api/v2/generate/text/async", headers=headers, json={
            "prompt": "Once upon a time", "models": ["tiny-llm"],
            "params": {"n": n, "max_length": max_length, "max_context_length": 1024}})
        self._record_request(r, who, n, "text", max_length)

    @rule(worker=st.sampled_from(sorted(["alice-img", "bob-img", "carol-img", "dave-img",
                                         "bob-img2"])), amount=st.integers(1, 3))
    def image_pop(self, worker, amount):
        self.step()
        owner, _ = self.workers[worker]
        r = self.client.post("/api/v2/generate/pop", headers=self.users[owner][1], json={
            "name": worker, "models": ["tiny-sd15"], "max_pixels": 1024 * 1024,
            "amount": amount})
        self._record_pop(r, worker, "image")

    @rule(worker=st.sampled_from(["alice-txt", "bob-txt", "carol-txt", "dave-txt"]),
          amount=st.integers(1, 2))
    def text_pop(self, worker, amount):
        self.step()
        owner, _ = self.workers[worker]
        r = self.client.post("/api/v2/generate/text/pop", headers=self.users[owner][1], json={
            "name": worker, "models": ["tiny-llm"], "max_length": 512,
            "max_context_length": 2048, "amount": amount})
        self._record_pop(r, worker, "text")

    def _record_pop(self, r, worker, kind):
        if r.status_code == 403:  # faults put a worker into maintenance
            assert r.json()["rc"] == "MaintenanceMode", r.text
            return
        assert r.status_code == 200, r.text
        body = r.json()
        with self.db.read() as s:
            owners = dict(s.execute(select(Generation.id, Generation.request_id)
                                    .where(Generation.id.in_(body["ids"]))).all())
        claimed = {j["gid"] for j in self.in_flight}
        for i, gid in enumerate(body["ids"]):
            assert gid not in claimed, f"{gid} handed out twice at once"
            req = self.requests[owners[gid]]
            assert req["kind"] == kind
            self.in_flight.append({"gid": gid, "worker": worker, "kind": kind,
                                   "payload": body["payload"], "seed_offset": i,
                                   "request": owners[gid]})

    @precondition(lambda self: self.in_flight or self.stale)
    @rule(data=st.data(), state=st.sampled_from(["ok", "censored", "csam", "faulted", "garbage"]),
          text_len=st.sampled_from([1, 3, 17, 80, 400, 900]), stale=st.booleans())
    def submit(self, data, state, text_len, stale):
        self.step()
        pool = self.stale if stale and self.stale else (self.in_flight or self.stale)
        job = data.draw(st.sampled_from(pool))
        worker = job["worker"]
        owner, kind = self.workers[worker]
        headers = self.users[owner][1]
        req = self.requests[job["request"]]
        before = self.balance(owner)
        if kind == "image":
            p = job["payload"]
            size = (p["width"] + 64, p["height"]) if state == "garbage" else (p["width"], p["height"])
            body = {"id": job["gid"], "state": "ok" if state == "garbage" else state,
                    "seed": int(p["seed"]) + job["seed_offset"],
                    "generation": base64.b64encode(_webp(*size)).decode()}
            if state == "faulted":
                body["generation"] = "Faulted"
            r = self.client.post("/api/v2/generate/submit", headers=headers, json=body)
            bound = req["quote"] / req["n"]
        else:
            text = ("x" * text_len)
            gid = "00000000-0000-0000-0000-000000000000" if state == "garbage" else job["gid"]
            r = self.client.post("/api/v2/generate/text/submit", headers=headers, json={
                "id": gid, "generation": text, "state": state})
            bound = req["quote"] / req["n"] * min(1.0, _tokens(text) / req["max_length"])
        earned = self.balance(owner) - before
        if r.status_code == 400 and r.json()["rc"] == "AbortedGen":
            assert req.get("cancelled") and earned == 0, r.text
            if job in self.in_flight:
                self.in_flight.remove(job)
                self.stale.append(job)
        elif job in self.stale or state == "garbage":
            assert r.status_code in (400, 404), (state, r.text)
            assert earned == pytest.approx(0, abs=1e-9) or req["requester"] == owner
        else:
            assert r.status_code == 200, (state, r.text)
            self.in_flight.remove(job)
            if state == "faulted":
                assert r.json()["reward"] == 0
            else:
                self.stale.append(job)
                requester = req["requester"]
                self.jobs_paid.append((owner, requester, bound + EPS))
                if requester in self.users and requester != owner or requester == "anon-elsewhere":
                    self.worked_for_others.add(worker)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def cancel(self, data):
        self.step()
        rid = data.draw(st.sampled_from(list(self.requests)))  # (not sorted: ids are random)
        req = self.requests[rid]
        headers = self.users[req["requester"]][1] if req["requester"] in self.users else ANON
        path = "text/status" if req["kind"] == "text" else "status"
        r = self.client.delete(f"/api/v2/generate/{path}/{rid}", headers=headers)
        assert r.status_code == 200, r.text
        req["cancelled"] = True

    @rule()
    def expire(self):
        self.step()
        queue.expire(self.db, 3, now=time.time() + 3600)
        self.stale.extend(self.in_flight)
        self.in_flight = []

    @rule(src=st.sampled_from(USERS), dst=st.sampled_from(USERS), amount=st.integers(1, 120))
    def transfer(self, src, dst, amount):
        self.step()
        r = self.client.post("/api/v2/kudos/transfer", headers=self.users[src][1],
                             json={"username": f"{dst}#{self.users[dst][0]}", "amount": amount})
        if src == dst:
            assert r.status_code == 400 and r.json()["rc"] == "KudosTransferToSelf", r.text
        elif r.status_code == 200:
            assert r.json() == {"transferred": amount}
            self.transfers.append((src, dst, float(amount)))
        else:
            assert r.status_code == 400 and r.json()["rc"] == "KudosTransferNotEnough", r.text

    @rule(worker=st.sampled_from(sorted(["alice-img", "bob-img", "carol-img", "dave-img",
                                         "bob-img2", "alice-txt", "bob-txt", "carol-txt",
                                         "dave-txt"])))
    def uptime_bonus(self, worker):
        """A period passes (as test_workers.py test_uptime_bonus makes it), then the worker pops
        twice: the bonus is paid once, and only if it did work for someone else."""
        self.step()
        owner, kind = self.workers[worker]
        with self.db.write() as s:
            touched = s.execute(update(Worker).where(Worker.name == worker).values(
                last_bonus_at=time.time() - self.ctx.settings.uptime_bonus_seconds - 1,
                last_seen=time.time() - 10)).rowcount
        if not touched:
            return  # never popped
        before = self.balance(owner)
        for _ in range(2):
            if kind == "image":
                r = self.client.post("/api/v2/generate/pop", headers=self.users[owner][1], json={
                    "name": worker, "models": ["tiny-sdxl"], "max_pixels": 64 * 64})
            else:
                r = self.client.post("/api/v2/generate/text/pop", headers=self.users[owner][1],
                                     json={"name": worker, "models": ["tiny-llm"],
                                           "max_length": 1, "max_context_length": 1})
            assert r.status_code in (200, 403), r.text
            if r.status_code == 200:
                assert r.json()["ids"] == [], r.json()  # asked for nothing queued
        paid = self.balance(owner) - before
        due = self.ctx.settings.uptime_bonus_kudos if worker in self.worked_for_others else 0.0
        assert paid == pytest.approx(due, abs=1e-6) or (paid == 0 and r.status_code == 403), \
            (worker, paid, due)
        if paid:
            self.bonuses.append((owner, paid))

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def ledger_sums_to_zero(self):
        from test_economy import assert_ledger_consistent
        assert_ledger_consistent(self.ctx)

    @invariant()
    def each_generation_paid_at_most_once(self):
        with self.db.read() as s:
            rows = s.execute(select(KudosEntry.ref, KudosEntry.kind, func.count())
                             .where(KudosEntry.kind.in_(["generation", "reward", "tax"]))
                             .group_by(KudosEntry.ref, KudosEntry.kind)).all()
        assert all(ref is not None for ref, _, _ in rows), rows  # one submit pays one generation
        assert all(count == 1 for _, _, count in rows), rows

    @invariant()
    def requesters_pay_at_most_their_quotes(self):
        with self.db.read() as s:
            paid = dict(s.execute(
                select(Generation.request_id, -func.sum(KudosEntry.amount))
                .join(Generation, Generation.id == KudosEntry.ref)
                .where(KudosEntry.kind == "generation").group_by(Generation.request_id)).all())
        for rid, amount in paid.items():
            assert amount <= self.requests[rid]["quote"] + EPS, (rid, amount, self.requests[rid])

    @invariant()
    def nobody_gains_but_by_work_for_others(self):
        groups = [frozenset({u}) for u in USERS] + [COLLUDERS]
        for group in groups:
            bound = START * len(group)
            bound += sum(b for o, r, b in self.jobs_paid if o in group and r not in group)
            bound += sum(a for src, dst, a in self.transfers if dst in group and src not in group)
            bound += sum(a for o, a in self.bonuses if o in group)
            held = sum(self.balance(u) for u in group)
            assert held <= bound + 1e-6, (sorted(group), held, bound)


RUN = settings(max_examples=25, stateful_step_count=25, deadline=None, derandomize=False,
               suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_kudos_are_conserved(backend, capsys):
    machine = type(f"Conservation_{backend}", (Conservation,), {"backend": backend})
    STATS.update(examples=0, steps=0)
    started = time.monotonic()
    run_state_machine_as_test(machine, settings=RUN)
    with capsys.disabled():
        print(f"\nconservation[{backend}]: {STATS['examples']} examples, {STATS['steps']} steps, "
              f"{time.monotonic() - started:.0f} s")
    assert STATS["examples"] >= 10 and STATS["steps"] >= 100  # it really ran
