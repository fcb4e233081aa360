"""The AI Horde worker protocol over HTTP (`/generate/pop`, upload, `/generate/submit`) and the
worker records, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import time

import pytest
from sqlalchemy import select, update

from api import ledger
from api.db import queue
from api.db.models import Generation, Worker
from conftest import count_statements, result_webp, webp_bytes
from test_economy import assert_ledger_consistent, balances, make_user, submit

pytestmark = pytest.mark.timeout(120)
WEBP = webp_bytes(512, 512)  # the result of a job of the default size


def pop(client, headers, name="w1", **body):
    body = {"name": name, "models": ["tiny-sd15"], "max_pixels": 1024 * 1024, **body}
    return client.post("/api/v2/generate/pop", json=body, headers=headers)


def upload(client, url: str, data: bytes = WEBP):
    path = url.split("127.0.0.1:8000", 1)[1]
    return client.put(path, content=data)


def do_job(client, headers, name="w1", state="ok", **pop_body):
    job = pop(client, headers, name, **pop_body).json()
    assert job["ids"], job
    for url in job["r2_uploads"]:
        assert upload(client, url, result_webp(job["payload"])).status_code == 200
    return job, [client.post("/api/v2/generate/submit", headers=headers, json={
        "id": gid, "generation": "R2", "state": state, "seed": int(job["payload"]["seed"]) + i})
        for i, gid in enumerate(job["ids"])]


@pytest.fixture
def worker_owner(ctx):
    return make_user(ctx, "volunteer")


def test_empty_pop_says_why(client, ctx, worker_owner):
    _, h = worker_owner
    r = pop(client, h)
    assert r.status_code == 200 and r.json() == {"payload": {}, "ids": [], "skipped": {}}
    submit(client, models=["tiny-sdxl"])
    submit(client, params={"width": 1024, "height": 1024})
    submit(client, nsfw=True)
    body = pop(client, h, max_pixels=512 * 512).json()
    assert body["ids"] == [] and body["payload"] == {}
    assert body["skipped"] == {"models": 1, "max_pixels": 1, "nsfw": 1}


def test_pop_upload_submit_pays_the_owner(client, ctx, worker_owner):
    owner, h = worker_owner
    requester, rh = make_user(ctx, "requester", kudos=100)
    rid = submit(client, rh, prompt="a cat ### dog", params={"n": 3, "seed": "40", "steps": 12,
                                                            "width": 576, "cfg_scale": 6}).json()["id"]
    before = balances(ctx)
    job, answers = do_job(client, h, amount=2)
    p = job["payload"]
    assert (p["prompt"], p["ddim_steps"], p["n_iter"], p["seed"], p["width"], p["cfg_scale"]) == \
        ("a cat ### dog", 12, 2, "40", 576, 6)
    assert job["model"] == "tiny-sd15" and job["ttl"] == 150 and job["id"] == job["ids"][0]
    assert [a.status_code for a in answers] == [200, 200]
    rewards = [a.json()["reward"] for a in answers]
    after = balances(ctx)
    assert after[owner.id] - before[owner.id] == pytest.approx(sum(rewards), abs=0.02)
    assert after[requester.id] < before[requester.id]
    st = client.get(f"/api/v2/generate/status/{rid}").json()
    assert st["finished"] == 2 and st["waiting"] == 1
    gens = {g["seed"]: g for g in st["generations"]}
    assert set(gens) == {"40", "41"} and gens["40"]["worker_name"] == "w1"
    assert client.get(gens["40"]["img"].split("127.0.0.1:8000", 1)[1]).content == result_webp(p)
    # The same job submitted again: DuplicateGen, and no second reward.
    again = client.post("/api/v2/generate/submit", headers=h, json={
        "id": job["ids"][0], "generation": "R2", "state": "ok", "seed": 40})
    assert again.status_code == 400 and again.json()["rc"] == "DuplicateGen"
    assert balances(ctx)[owner.id] == after[owner.id]
    w = client.get("/api/v2/workers", params={"type": ""}).json()
    mine = next(x for x in w if x["name"] == "w1")
    assert mine["requests_fulfilled"] == 2 and mine["online"] and mine["owner"] == f"volunteer#{owner.id}"
    assert mine["kudos_rewards"] == pytest.approx(sum(rewards), abs=0.02)
    assert_ledger_consistent(ctx)


def test_inline_base64_submit_and_bad_submits(client, ctx, worker_owner):
    _, h = worker_owner
    submit(client)
    job = pop(client, h).json()
    gid = job["ids"][0]
    r = client.post("/api/v2/generate/submit", headers=h, json={"id": gid, "generation": "R2"})
    assert r.status_code == 400 and r.json()["rc"] == "MissingUpload"
    r = client.post("/api/v2/generate/submit", headers=h, json={"id": gid, "generation": "!!"})
    assert r.status_code == 400 and "generation" in r.json()["message"]
    r = client.post("/api/v2/generate/submit", headers=h, json={"id": "not-a-uuid"})
    assert r.status_code == 400 and "id" in r.json()["message"]
    r = client.post("/api/v2/generate/submit", headers=h,
                    json={"id": "00000000-0000-0000-0000-000000000000", "generation": "R2"})
    assert r.status_code == 404 and r.json()["rc"] == "InvalidJobID"
    _, other = make_user(ctx, "thief")
    r = client.post("/api/v2/generate/submit", headers=other,
                    json={"id": gid, "generation": base64.b64encode(WEBP).decode()})
    assert r.status_code == 400 and r.json()["rc"] == "RequestExpired"
    r = client.post("/api/v2/generate/submit", headers=h,
                    json={"id": gid, "generation": base64.b64encode(WEBP).decode(), "seed": 7})
    assert r.status_code == 200 and r.json()["reward"] > 0


def test_faulted_goes_back_to_the_queue_for_other_owners(client, ctx, worker_owner):
    _, h = worker_owner
    rid = submit(client).json()["id"]
    job = pop(client, h).json()
    r = client.post("/api/v2/generate/submit", headers=h,
                    json={"id": job["ids"][0], "state": "faulted", "generation": "Faulted"})
    assert r.status_code == 200 and r.json() == {"reward": 0}
    chk = client.get(f"/api/v2/generate/check/{rid}").json()
    assert chk["waiting"] == 1 and chk["restarted"] == 0 and not chk["faulted"]
    # A worker never gets back a generation it faulted, nor do its owner's other workers.
    assert pop(client, h).json()["ids"] == []
    assert pop(client, h, name="w1-twin").json()["ids"] == []
    _, other = make_user(ctx, "other-volunteer")
    again = pop(client, other, name="w2").json()
    assert again["ids"] == job["ids"]
    assert client.get(f"/api/v2/generate/check/{rid}").json()["restarted"] == 1


def test_a_request_fails_only_when_distinct_owners_fault_it(client, ctx, worker_owner):
    """max_attempts (3) distinct owners must fault a generation before its request fails: one
    griefer with many workers can fault it once, however many times it tries."""
    _, h = worker_owner
    rid = submit(client).json()["id"]
    owners = [h] + [make_user(ctx, f"faulter{i}")[1] for i in range(2)]
    for i, headers in enumerate(owners):
        for name in (f"a{i}", f"b{i}"):  # a second worker of the same owner gets nothing
            job = pop(client, headers, name=name).json()
            if name.startswith("b"):
                assert job["ids"] == []
                continue
            assert len(job["ids"]) == 1
            client.post("/api/v2/generate/submit", headers=headers,
                        json={"id": job["ids"][0], "state": "faulted", "generation": "x"})
        chk = client.get(f"/api/v2/generate/check/{rid}").json()
        assert chk["faulted"] == (i == 2), (i, chk)
    with ctx.db.read() as s:
        gen = s.execute(select(Generation).where(Generation.request_id == rid)).scalar_one()
    assert gen.state == "faulted" and gen.failures == 0
    assert sorted(queue.owners_of(gen.faulted_owners)) == sorted(
        u.id for u in _owners_of(ctx, ["volunteer", "faulter0", "faulter1"]))


def _owners_of(ctx, names):
    from api.db.models import User
    with ctx.db.read() as s:
        return list(s.execute(select(User).where(User.username.in_(names))).scalars())


def test_censored_and_csam_are_paid_by_the_requester(client, ctx, worker_owner):
    """A state the worker declares never moves kudos from the horde: the requester pays for a
    censored or csam result as for any other, and sees the placeholder."""
    owner, h = worker_owner
    requester, rh = make_user(ctx, "requester", kudos=1000)
    rid = submit(client, rh, params={"n": 2}).json()["id"]
    before = balances(ctx)
    job = pop(client, h, amount=2).json()
    for url in job["r2_uploads"]:
        upload(client, url, result_webp(job["payload"]))
    a, b = job["ids"]
    ra = client.post("/api/v2/generate/submit", headers=h, json={
        "id": a, "generation": "R2", "state": "censored", "seed": 1})
    rb = client.post("/api/v2/generate/submit", headers=h, json={
        "id": b, "generation": "R2", "state": "csam", "seed": 2})
    assert ra.status_code == 200 and rb.status_code == 200
    rewards = ra.json()["reward"] + rb.json()["reward"]
    after = balances(ctx)
    assert rewards > 0
    assert after[owner.id] - before[owner.id] == pytest.approx(rewards, abs=0.02)
    spent = before[requester.id] - after[requester.id]
    assert spent >= rewards - 0.02  # the job's price (the reward plus the horde's tax)
    with ctx.db.read() as s:
        horde = ledger.horde_account_id(s)
    assert after[horde] >= before[horde]  # the horde never pays for a worker's censored
    assert_ledger_consistent(ctx)
    gens = {g["id"]: g for g in client.get(f"/api/v2/generate/status/{rid}").json()["generations"]}
    assert gens[a]["censored"] and gens[a]["state"] == "censored"
    assert gens[b]["censored"] and {"type": "censorship", "value": "csam"} in [
        {k: v for k, v in m.items() if v is not None} for m in gens[b]["gen_metadata"]]
    # Neither upload is kept, under the worker's upload key or any image key of the request;
    # the requester sees the placeholder.
    for url in job["r2_uploads"]:
        assert not ctx.storage.exists(_upload_key(url))
    assert ctx.storage.older_keys(f"images/{rid}/", time.time() + 60, 10) == []
    assert "placeholders/censored.webp" in gens[a]["img"]
    assert "placeholders/censored.webp" in gens[b]["img"]


def _upload_key(url: str) -> str:
    from urllib.parse import urlparse
    return urlparse(url).path.split("/api/v2/objects/", 1)[1]


def test_expired_job_returns_and_late_worker_is_told(client, ctx, worker_owner):
    _, h = worker_owner
    submit(client)
    job = pop(client, h).json()
    assert queue.expire(ctx.db, 3, now=time.time() + job["ttl"] + 1,
                        max_consecutive_drops=5) == 1
    upload(client, job["r2_upload"])
    r = client.post("/api/v2/generate/submit", headers=h,
                    json={"id": job["ids"][0], "generation": "R2", "seed": 1})
    assert r.status_code == 400 and r.json()["rc"] == "RequestExpired"
    assert "time to live" in r.json()["message"]
    # The owner whose worker let it expire does not get it back; another owner does.
    assert pop(client, h, name="w2").json()["ids"] == []
    _, other = make_user(ctx, "other-volunteer")
    assert pop(client, other, name="w3").json()["ids"] == job["ids"]


def test_dropping_jobs_puts_a_worker_into_maintenance(client, ctx, worker_owner):
    owner, h = worker_owner
    for _ in range(3):  # an owner never gets back what it dropped: a request per round
        submit(client, params={"n": 5})
    for _ in range(3):
        job = pop(client, h, amount=5).json()
        assert len(job["ids"]) == 5
        queue.expire(ctx.db, 10, now=time.time() + job["ttl"] + 1, max_consecutive_drops=12,
                     maintenance_seconds=3600)
    r = pop(client, h)
    assert r.status_code == 403 and r.json()["rc"] == "MaintenanceMode"
    wid = next(w["id"] for w in client.get("/api/v2/workers").json() if w["name"] == "w1")
    detail = client.get(f"/api/v2/workers/{wid}").json()
    assert detail["maintenance_mode"] and detail["uncompleted_jobs"] == 15
    _, stranger = make_user(ctx, "stranger")
    assert client.put(f"/api/v2/workers/{wid}", json={"maintenance": False},
                      headers=stranger).status_code == 403
    # The horde imposed it: the owner cannot lift it before it ends.
    r = client.put(f"/api/v2/workers/{wid}", json={"maintenance": False}, headers=h)
    assert r.status_code == 403 and r.json()["rc"] == "MaintenanceImposed"
    assert pop(client, h).status_code == 403
    with ctx.db.write() as s:  # an hour later
        s.execute(update(Worker).where(Worker.name == "w1").values(
            maintenance_until=time.time() - 1))
    r = client.put(f"/api/v2/workers/{wid}", json={"maintenance": False, "info": "fixed"}, headers=h)
    assert r.status_code == 200 and r.json() == {"maintenance": False, "info": "fixed"}
    submit(client)
    assert pop(client, h).json()["ids"]


def test_faults_count_toward_maintenance(client, ctx, worker_owner):
    _, h = worker_owner
    for _ in range(3):
        submit(client)
    limit = ctx.settings.max_consecutive_drops
    for i in range(limit):
        job = pop(client, h, name="w1").json()
        if not job["ids"]:
            submit(client)
            job = pop(client, h, name="w1").json()
        r = client.post("/api/v2/generate/submit", headers=h,
                        json={"id": job["ids"][0], "state": "faulted", "generation": "x"})
        assert r.status_code == 200
    r = pop(client, h)
    assert r.status_code == 403 and r.json()["rc"] == "MaintenanceMode"


def test_worker_names_belong_to_their_owner(client, ctx, worker_owner):
    _, h = worker_owner
    pop(client, h, name="taken")
    _, other = make_user(ctx, "other")
    r = pop(client, other, name="taken")
    assert r.status_code == 403 and r.json()["rc"] == "WrongCredentials"
    r = pop(client, {"apikey": "0000000000"})
    assert r.status_code == 403 and "apikey" in r.json()["message"]
    r = pop(client, h, models=[])
    assert r.status_code == 400 and "models" in r.json()["message"]


def test_request_side_worker_choice(client, ctx, worker_owner):
    _, h = worker_owner
    trusted_owner, th = make_user(ctx, "trusty", trusted=True)
    pop(client, h, name="plain")
    pop(client, th, name="trusted")
    ids = {w["name"]: w["id"] for w in client.get("/api/v2/workers").json()}
    only_trusted = submit(client, workers=[ids["trusted"]]).json()["id"]
    assert pop(client, h, name="plain").json()["skipped"] == {"worker_id": 1}
    assert pop(client, th, name="trusted").json()["ids"]
    submit(client, workers=[ids["trusted"]], worker_blacklist=True)
    assert pop(client, th, name="trusted").json()["skipped"] == {"worker_id": 1}
    assert pop(client, h, name="plain").json()["ids"]
    submit(client, trusted_workers=True)
    assert pop(client, h, name="plain").json()["skipped"] == {"untrusted": 1}
    assert pop(client, th, name="trusted").json()["ids"]
    r = submit(client, workers=["00000000-0000-0000-0000-000000000001"])
    assert r.status_code == 400 and r.json()["rc"] == "WorkerNotFound"
    assert only_trusted


def test_slow_workers_and_blacklists(client, ctx, worker_owner):
    _, h = worker_owner
    pop(client, h, name="slowpoke")
    with ctx.db.write() as s:  # a measured speed of 0.1 megapixelsteps per second
        s.execute(update(Worker).where(Worker.name == "slowpoke")
                  .values(megapixelsteps_done=10, seconds_working=100))
    submit(client, slow_workers=False)
    assert pop(client, h, name="slowpoke").json()["skipped"] == {"performance": 1}
    assert pop(client, h, name="fast").json()["ids"]
    submit(client, prompt="a red castle")
    assert pop(client, h, name="fast", blacklist=["CASTLE"]).json()["skipped"] == {"blacklist": 1}
    assert pop(client, h, name="fast", blacklist=["dragon"]).json()["ids"]


def test_priority_usernames_go_first(client, ctx, worker_owner):
    owner, h = worker_owner
    fan, fan_h = make_user(ctx, "fan")
    first = submit(client).json()["id"]
    mine = submit(client, fan_h).json()["id"]
    got = pop(client, h, priority_usernames=[f"fan#{fan.id}"]).json()
    with ctx.db.read() as s:
        assert s.get(Generation, got["ids"][0]).request_id == mine
    assert first


def test_pop_and_submit_statement_counts(client, ctx, worker_owner):
    _, h = worker_owner
    pop(client, h)  # creates the worker
    with count_statements(ctx.db) as empty:
        pop(client, h)
    submit(client, params={"n": 2})
    with count_statements(ctx.db) as full:
        job = pop(client, h).json()
    upload(client, job["r2_upload"])
    with ctx.db.read() as s:  # looked up once per process, as any long-running API replica has
        ledger.horde_account_id(s)
    with count_statements(ctx.db) as sub:
        client.post("/api/v2/generate/submit", headers=h,
                    json={"id": job["ids"][0], "generation": "R2", "seed": 1})
    # pop: user, worker, worker update, candidates, then the claim update or the skipped count.
    # An empty pop on PostgreSQL also commits without waiting for the disk; one with work waits.
    lazy = [st for st in empty.statements if "synchronous_commit" in st]
    assert len(lazy) == (1 if ctx.db.engine.dialect.name == "postgresql" else 0)
    assert not any("synchronous_commit" in st for st in full.statements)
    # (a claim on SQLite marks the queue entries in a statement of its own; on PostgreSQL
    # that rides along with the claim update)
    assert empty.count - len(lazy) == 4
    assert full.count == (4 if ctx.db.engine.dialect.name == "postgresql" else 5)
    assert sum(st.lstrip().startswith("UPDATE workers") for st in empty.statements) == 1
    assert not any(st.lstrip().startswith("SELECT workers") for st in empty.statements)
    # submit: user, job; compare-and-set, queue entry, model speed, ledger rows, 3 balances
    # (requester, owner, horde), worker counters.
    assert sub.count == 10


def test_upload_urls_are_signed(client, ctx, worker_owner):
    _, h = worker_owner
    submit(client)
    url = pop(client, h).json()["r2_upload"]
    assert upload(client, url.replace("signature=", "signature=0")).status_code == 403
    assert upload(client, url.replace("expires=", "expires=1")).status_code == 403
    assert upload(client, url, b"").status_code == 400
    assert upload(client, url).status_code == 200


def test_uptime_bonus(client, ctx, worker_owner):
    owner, h = worker_owner
    _, requester = make_user(ctx, "requester", kudos=100)
    submit(client, requester)  # the bonus pays for periods with work for others
    do_job(client, h)
    with ctx.db.write() as s:  # it popped 10 minutes ago and has been online since
        s.execute(update(Worker).where(Worker.name == "w1").values(
            last_bonus_at=time.time() - 601, last_seen=time.time() - 10))
    before = balances(ctx)[owner.id]
    pop(client, h)
    assert balances(ctx)[owner.id] - before == ctx.settings.uptime_bonus_kudos
    pop(client, h)
    assert balances(ctx)[owner.id] - before == ctx.settings.uptime_bonus_kudos  # not again yet
    assert_ledger_consistent(ctx)


def test_a_pop_counts_uptime_while_online_and_none_across_a_gap(client, ctx, worker_owner):
    """The usual pop updates its worker in one statement (api/workers.py _touch), with the
    uptime rules: time since the last pop counts while the worker was online; after a gap
    longer than stale_worker_seconds nothing counts and the bonus period starts again."""
    _, h = worker_owner
    pop(client, h)  # creates w1

    def set_worker(**values):
        with ctx.db.write() as s:
            s.execute(update(Worker).where(Worker.name == "w1").values(**values))

    def worker_times():
        with ctx.db.read() as s:
            return s.execute(select(Worker.uptime_seconds, Worker.last_seen, Worker.last_bonus_at)
                             .where(Worker.name == "w1")).one()

    t0 = time.time()
    set_worker(uptime_seconds=100.0, last_seen=t0 - 10, last_bonus_at=t0 - 20)
    with count_statements(ctx.db) as online:
        assert pop(client, h).status_code == 200
    uptime, seen, bonus_at = worker_times()
    assert 110 <= uptime <= 110 + (time.time() - t0)
    assert seen >= t0 and bonus_at == pytest.approx(t0 - 20)
    assert not any(st.lstrip().startswith("SELECT workers") for st in online.statements)

    t1 = time.time()
    set_worker(last_seen=t1 - ctx.settings.stale_worker_seconds - 50)
    assert pop(client, h).status_code == 200
    after_gap, seen, bonus_at = worker_times()
    assert after_gap == pytest.approx(uptime)
    assert seen >= t1 and bonus_at >= t1


def test_rate_limits(db, tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from conftest import make_ctx

    ctx = make_ctx(db, tmp_path, rate_limit_submit="3/minute", rate_limit_poll="5/minute",
                   rate_limit_pop="2/minute")
    with TestClient(create_app(ctx)) as client:
        owner, h = make_user(ctx, "limited")
        codes = [submit(client).status_code for _ in range(4)]
        assert codes == [202, 202, 202, 429]
        r = submit(client)
        assert r.json()["rc"] == "TooManyRequests" and 1 <= int(r.headers["Retry-After"]) <= 60
        rid = "00000000-0000-0000-0000-000000000000"
        assert [client.get(f"/api/v2/generate/check/{rid}").status_code
                for _ in range(6)] == [404] * 5 + [429]
        assert [pop(client, h).status_code for _ in range(3)] == [200, 200, 429]


def test_rate_limits_shared_through_redis(db, tmp_path):
    """With Redis as the store, two API replicas count one limit together."""
    import uuid

    import redis
    from fastapi.testclient import TestClient

    from api.app import create_app
    from conftest import make_ctx

    try:
        redis.Redis(host="127.0.0.1", port=6379).ping()
    except redis.ConnectionError:
        pytest.fail("Redis is not running on 127.0.0.1:6379 (.ci/run starts it)")
    limit = f"{2}/minute"
    ctxs = [make_ctx(db, tmp_path, rate_limit_storage="redis://127.0.0.1:6379",
                     rate_limit_poll=limit) for _ in range(2)]
    rid = str(uuid.uuid4())  # a fresh address namespace is not needed: the check path differs
    # A fresh peer address each run: Redis keeps the counts of earlier runs for a minute.
    peer = (f"client-{uuid.uuid4()}", 50000)
    with (TestClient(create_app(ctxs[0]), client=peer) as a,
          TestClient(create_app(ctxs[1]), client=peer) as b):
        codes = [c.get(f"/api/v2/generate/check/{rid}").status_code for c in (a, b, a)]
    assert codes == [404, 404, 429]


def test_censoring_requests_go_to_trusted_workers_only(client, ctx, worker_owner):
    """A worker the horde does not trust could simply not censor: requests that ask for
    censoring (and every education account's, always SFW) wait for a trusted one."""
    from api.db.models import User

    _, h = worker_owner
    _, th = make_user(ctx, "trusty", trusted=True)
    student, sh = make_user(ctx, "student", kudos=100)
    with ctx.db.write() as s:
        s.execute(update(User).where(User.id == student.id).values(education=True))
    censored = submit(client, censor_nsfw=True).json()["id"]
    schooled = submit(client, sh).json()["id"]
    r = pop(client, h, name="plain", amount=5).json()
    assert r["ids"] == [] and r["skipped"] == {"untrusted": 2}
    got = set()
    for _ in range(2):
        job = pop(client, th, name="trusted").json()
        got |= {job["id"]}
    with ctx.db.read() as s:
        owners = dict(s.execute(select(Generation.id, Generation.request_id)
                                .where(Generation.id.in_(got))).all())
    assert set(owners.values()) == {censored, schooled}
