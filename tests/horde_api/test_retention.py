"""Retention (api/retention.py): ended requests past `finished_retention_seconds` go with their
images and sources, in bounded passes, while the ledger, the users' counters and the /stats
numbers stay. Through the HTTP API, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from api import retention
from api.app import create_app
from api.db import queue
from api.db.models import Generation, InterrogationForm, KudosEntry, Request
from api.storage import LocalStorage, VISIT_FACTOR
from conftest import add_request, make_ctx
from test_economy import assert_ledger_consistent, make_user, submit
from test_workers import do_job, pop

pytestmark = pytest.mark.timeout(180)
RETENTION = 1800.0  # the default


@pytest.fixture
def api(ctx):
    """A client whose app runs no background sweep (no lifespan): the tests sweep themselves."""
    return TestClient(create_app(ctx))


def age(ctx, request_id: str, seconds: float) -> None:
    """The request's ended generations ended `seconds` ago."""
    with ctx.db.write() as s:
        s.execute(update(Generation).where(Generation.request_id == request_id,
                                           Generation.finished_at.is_not(None))
                  .values(finished_at=time.time() - seconds))


def objects(ctx, prefix: str) -> list[str]:
    root = ctx.storage.root / prefix
    return sorted(str(p.relative_to(ctx.storage.root)) for p in root.rglob("*")) \
        if root.exists() else []


def numbers(ctx, keys: list[dict]) -> dict:
    """What /stats and /users say (a new app each time: stats answers are cached per app)."""
    c = TestClient(create_app(ctx))
    users = {u["id"]: {k: v for k, v in u.items() if k != "account_age"}
             for u in c.get("/api/v2/users").json()}
    mine = [{k: v for k, v in c.get("/api/v2/find_user", headers=h).json().items()
             if k != "account_age"} for h in keys]
    return {"img": c.get("/api/v2/stats/img/totals").json(),
            "models": c.get("/api/v2/stats/img/models").json(),
            "text": c.get("/api/v2/stats/text/totals").json(), "users": users, "mine": mine}


def test_ended_requests_past_retention_go_and_nothing_else_moves(api, ctx):
    alice, ah = make_user(ctx, "alice", kudos=100)
    _, wh = make_user(ctx, "volunteer")
    old_done = submit(api, ah, params={"n": 2, "steps": 10}).json()["id"]
    do_job(api, wh, amount=2)
    old_cancelled = submit(api, ah, params={"steps": 10}).json()["id"]
    assert api.delete(f"/api/v2/generate/status/{old_cancelled}").status_code == 200
    recent_done = submit(api, ah, params={"steps": 10}).json()["id"]
    do_job(api, wh)
    processing = submit(api, ah, params={"steps": 10}).json()["id"]
    assert pop(api, wh).json()["ids"]
    waiting = submit(api, ah, params={"steps": 10}).json()["id"]
    # Ended past the retention (but within the hour: the hour's totals must not drop).
    for rid in (old_done, old_cancelled):
        age(ctx, rid, RETENTION + 100)
    with ctx.db.write() as s:  # the live ones are old too: their age must not matter
        s.execute(update(Request).where(Request.id.in_((processing, waiting)))
                  .values(created_at=time.time() - 10 * RETENTION))
    images = objects(ctx, "images")
    assert len(images) == 3 + 2  # three results and their requests' folders
    with ctx.db.read() as s:
        ledger_rows = s.execute(select(func.count()).select_from(KudosEntry)).scalar()
    before = numbers(ctx, [ah])
    assert before["img"]["hour"]["images"] == 3 and before["img"]["total"]["images"] == 3

    assert retention.sweep(ctx) == 2
    for rid in (old_done, old_cancelled):
        r = api.get(f"/api/v2/generate/status/{rid}")
        assert r.status_code == 404 and r.json()["rc"] == "RequestNotFound"
        assert api.get(f"/api/v2/generate/check/{rid}").status_code == 404
    for rid in (recent_done, processing, waiting):
        assert api.get(f"/api/v2/generate/check/{rid}").status_code == 200
    # The old results and their folder are gone; the recent one stays, and is served.
    assert objects(ctx, "images") == [f"images/{recent_done}",
                                      *[k for k in images if k.startswith(
                                          f"images/{recent_done}/")]]
    img = api.get(f"/api/v2/generate/status/{recent_done}").json()["generations"][0]["img"]
    assert api.get(img.split("127.0.0.1:8000", 1)[1]).status_code == 200
    with ctx.db.read() as s:
        assert s.execute(select(func.count()).select_from(KudosEntry)).scalar() == ledger_rows
        assert s.execute(select(func.count()).select_from(Generation).where(
            Generation.request_id.in_((old_done, old_cancelled)))).scalar() == 0
    assert_ledger_consistent(ctx)
    assert numbers(ctx, [ah]) == before
    assert retention.sweep(ctx) == 0  # nothing more to do


def test_a_pass_is_bounded_and_steps_over_requests_that_still_run(ctx):
    now = time.time()
    # First in the cursor's order: a request with one generation faulted long ago and one
    # still waiting. It must neither go nor hold the sweep up.
    running = add_request(ctx.db, n=2, models=("tiny-sdxl",))
    jobs = queue.claim(ctx.db, queue.Capabilities("w", ["tiny-sdxl"]), 1)
    assert queue.fault(ctx.db, [(jobs[0].generation_id, jobs[0].claim_id)], "bad") == 1
    age(ctx, running, RETENTION + 500)
    ended = []
    for i in range(5):
        rid = add_request(ctx.db)
        job = queue.claim(ctx.db, queue.Capabilities("w", ["tiny-sd15"]), 1)[0]
        queue.finish(ctx.db, [queue.Result(job.generation_id, job.claim_id, None, job.seed,
                                           "w", "w", owner_id=1)])
        age(ctx, rid, RETENTION + 400 - i)
        ended.append(rid)
    passes = [retention.sweep(ctx, now=now, limit=2) for _ in range(5)]
    assert passes == [1, 2, 2, 0, 0]  # the first pass read the running request and one more
    with ctx.db.read() as s:
        left = set(s.execute(select(Request.id)).scalars())
    assert left == {running}
    assert_ledger_consistent(ctx)


def test_sweeps_at_once_are_harmless(ctx):
    ids = []
    for _ in range(12):
        rid = add_request(ctx.db)
        job = queue.claim(ctx.db, queue.Capabilities("w", ["tiny-sd15"]), 1)[0]
        queue.finish(ctx.db, [queue.Result(job.generation_id, job.claim_id, None, job.seed,
                                           "w", "w", owner_id=1)])
        age(ctx, rid, RETENTION + 10)
        ids.append(rid)
    start, deleted, errors = threading.Barrier(4), [], []

    def sweeper():
        start.wait()
        try:
            for _ in range(3):
                deleted.append(retention.sweep(ctx, limit=2))
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=sweeper) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sum(deleted) == 12
    with ctx.db.read() as s:
        assert s.execute(select(func.count()).select_from(Request)).scalar() == 0
    assert_ledger_consistent(ctx)


def test_the_apis_background_loop_sweeps_and_deletes_sources(db, tmp_path):
    """Without any dispatcher: the API's own loop deletes an ended request's source at once
    and the request itself past the retention."""
    from test_image_workflows_api import SOURCE, b64

    ctx = make_ctx(db, tmp_path, expire_every_seconds=0.05)
    with TestClient(create_app(ctx)) as client:
        rid = submit(client, source_image=b64(SOURCE)).json()["id"]
        assert objects(ctx, "sources")
        assert client.delete(f"/api/v2/generate/status/{rid}").status_code == 200
        age(ctx, rid, RETENTION + 10)
        deadline = time.monotonic() + 30
        while client.get(f"/api/v2/generate/check/{rid}").status_code != 404:
            assert time.monotonic() < deadline, "the background sweep never deleted it"
            time.sleep(0.05)
        assert objects(ctx, "sources") == []


def test_local_delete_removes_emptied_folders_up_to_the_root(tmp_path):
    st = LocalStorage(tmp_path / "objects", "http://x")
    st.put("images/r1/a.webp", b"a", "image/webp")
    st.put("images/r1/b.webp", b"b", "image/webp")
    st.put("images/r2/c.webp", b"c", "image/webp")
    st.delete("images/r1/a.webp")
    assert (st.root / "images" / "r1").is_dir()  # b is still there
    st.delete("images/r1/b.webp")
    assert not (st.root / "images" / "r1").exists() and (st.root / "images" / "r2").is_dir()
    st.delete("images/r2/c.webp")
    assert not (st.root / "images").exists() and st.root.is_dir()
    st.delete("images/r2/c.webp")  # again: no error
    st.put("images/r2/c.webp", b"c2", "image/webp")  # its folder made again
    assert st.get("images/r2/c.webp") == b"c2"


def test_older_keys_is_a_bounded_walk(tmp_path, monkeypatch):
    st = LocalStorage(tmp_path / "objects", "http://x")
    for i in range(300):
        st.put(f"uploads/job{i:03d}/claim.webp", b"x", "image/webp")
    old = time.time() - 3600
    os.utime(st.path("uploads/job123/claim.webp"), (old, old))
    assert st.older_keys("uploads", time.time() - 60, 500) == ["uploads/job123/claim.webp"]
    assert st.older_keys("nothing-here", time.time(), 5) == []
    seen = []
    real = os.scandir

    def counting(path):
        it = real(path)

        class Counted:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                it.close()

            def __iter__(self):
                for entry in it:
                    seen.append(entry.name)
                    yield entry

        return Counted()

    monkeypatch.setattr("api.storage.os.scandir", counting)
    st.older_keys("uploads", time.time() - 60, 3)  # 600 entries, all young but one
    assert len(seen) <= VISIT_FACTOR * 3
    for i in range(10):
        os.utime(st.path(f"uploads/job{i + 200:03d}/claim.webp"), (old, old))
    assert len(st.older_keys("uploads", time.time() - 60, 4)) <= 4


def test_a_shared_keys_request_is_settled_before_it_goes(api, ctx):
    """A key is charged lazily, when next used: a request of it swept first is folded into
    it by the sweep, so the key still shows what the request cost."""
    from api.db.models import SharedKeyRequest
    from test_clients_endpoints import create_key, key_headers

    _, h = make_user(ctx, "lender", kudos=200)
    _, wh = make_user(ctx, "volunteer")
    key = create_key(api, h, kudos=100).json()
    r = submit(api, key_headers(key), params={"steps": 10})
    assert r.status_code == 202
    rid, cost = r.json()["id"], r.json()["kudos"]
    do_job(api, wh)
    age(ctx, rid, RETENTION + 10)
    with ctx.db.read() as s:
        assert s.get(SharedKeyRequest, rid) is not None  # not settled yet
    assert retention.sweep(ctx) == 1
    shown = api.get(f"/api/v2/sharedkeys/{key['id']}").json()
    assert (shown["utilized"], shown["kudos"]) == (round(cost), round(100 - cost))
    assert api.get(f"/api/v2/generate/check/{rid}").status_code == 404
    assert_ledger_consistent(ctx)


def test_ended_interrogations_go_with_their_results(api, ctx):
    from api.alchemy.service import result_key
    from test_alchemy_api import ask
    from test_alchemy_api import pop as alchemy_pop

    _, h = make_user(ctx, "alchemist")
    done = ask(api, ["caption"]).json()["id"]
    form = alchemy_pop(api, h, ["caption"]).json()["forms"][0]
    assert api.post("/api/v2/interrogate/submit", headers=h, json={
        "id": form["id"], "result": {"caption": "c"}}).status_code == 200
    waiting = ask(api, ["caption"]).json()["id"]
    # A post-processor's stored result (as service.submit stores one).
    key = result_key(done, form["id"], "a-claim")
    ctx.storage.put(key, b"webp", "image/webp")
    with ctx.db.write() as s:
        s.execute(update(InterrogationForm).where(InterrogationForm.interrogation_id == done)
                  .values(finished_at=time.time() - RETENTION - 10, result_key=key))
    assert retention.sweep(ctx) == 1
    assert api.get(f"/api/v2/interrogate/status/{done}").status_code == 404
    assert api.get(f"/api/v2/interrogate/status/{waiting}").status_code == 200
    assert not ctx.storage.exists(key) and not (ctx.storage.root / key).parent.exists()
    assert_ledger_consistent(ctx)
