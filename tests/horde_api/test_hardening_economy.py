"""Issue 12, the worker economy, through the HTTP API on SQLite and PostgreSQL: the uptime
bonus pays only for work done for others; workers per user are capped by role; upload URLs
belong to one claim (no request id in what a worker is handed, expiring with the claim,
size-capped, a late upload changes nothing); the cluster's worker names are reserved and
volunteer node names stay unique; upfront kudos are reserved, not only checked."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select, update

from api.db import queue
from api.db.models import Generation, Request, User, Worker
from api.workers import RESERVED_NAME_PREFIX, upload_key
from conftest import png_b64
from test_economy import assert_ledger_consistent, balances, make_user, submit
from test_storage import s3_endpoint  # noqa: F401 (a fixture)
from test_workers import WEBP, do_job, pop, upload

pytestmark = pytest.mark.timeout(120)
UPFRONT = {"steps": 60}  # over the AI Horde's 50 steps: needs its kudos upfront


def text_pop(client, headers, name):
    return client.post("/api/v2/generate/text/pop", headers=headers,
                       json={"name": name, "models": ["tiny-llm"]})


def alchemy_pop(client, headers, name, forms=("RealESRGAN_x2plus",)):
    return client.post("/api/v2/interrogate/pop", headers=headers,
                       json={"name": name, "forms": list(forms), "amount": 5})


def submit_r2(client, headers, gid):
    return client.post("/api/v2/generate/submit", headers=headers,
                       json={"id": gid, "generation": "R2", "state": "ok", "seed": 1})


def bonus_period_passed(ctx, owner_id: int) -> None:
    """As if a bonus period had passed for the owner's workers, popping all along: their
    bonus and job times move back by a period (their order unchanged)."""
    back = ctx.settings.uptime_bonus_seconds + 1
    with ctx.db.write() as s:
        s.execute(update(Worker).where(Worker.owner_id == owner_id).values(
            last_bonus_at=Worker.last_bonus_at - back, last_job_at=Worker.last_job_at - back,
            last_seen=time.time() - 10))


# --- kudos minting ---------------------------------------------------------------------------

def test_idle_popping_earns_nothing(client, ctx):
    owner, h = make_user(ctx, "idler")
    names = [f"idle-{i}" for i in range(ctx.settings.max_workers_per_user)]
    for name in names:
        assert pop(client, h, name=name).status_code == 200
    # One of them takes a job and hands it back: popping and faulting is not work either.
    assert submit(client).status_code == 202
    job = pop(client, h, name=names[0]).json()
    r = client.post("/api/v2/generate/submit", headers=h,
                    json={"id": job["ids"][0], "generation": "R2", "state": "faulted"})
    assert r.status_code == 200 and r.json()["reward"] == 0
    for _ in range(3):
        bonus_period_passed(ctx, owner.id)
        for name in names:
            assert pop(client, h, name=name).status_code == 200
    assert balances(ctx)[owner.id] == 0
    assert_ledger_consistent(ctx)


def test_uptime_bonus_needs_work_done_for_someone_else(client, ctx):
    owner, h = make_user(ctx, "volunteer", kudos=100)
    bonus = ctx.settings.uptime_bonus_kudos
    # Its own request, done by its own worker: that is not work for the horde.
    assert submit(client, h).status_code == 202
    assert [a.status_code for a in do_job(client, h)[1]] == [200]
    bonus_period_passed(ctx, owner.id)
    before = balances(ctx)[owner.id]
    assert pop(client, h).status_code == 200
    assert balances(ctx)[owner.id] == before
    # Nor is an anonymous request from the worker's own address: it could be its own.
    assert submit(client).status_code == 202
    (answer,) = do_job(client, h)[1]
    assert answer.status_code == 200
    reward = answer.json()["reward"]
    bonus_period_passed(ctx, owner.id)
    assert pop(client, h).status_code == 200
    assert balances(ctx)[owner.id] == pytest.approx(before + reward, abs=0.01)
    before = balances(ctx)[owner.id]
    # A job for someone else within the period earns the bonus, once per period.
    _, other = make_user(ctx, "someone-else", kudos=100)
    assert submit(client, other).status_code == 202
    (answer,) = do_job(client, h)[1]
    assert answer.status_code == 200
    reward = answer.json()["reward"]
    bonus_period_passed(ctx, owner.id)
    assert pop(client, h).status_code == 200
    assert balances(ctx)[owner.id] == pytest.approx(before + reward + bonus, abs=0.01)
    assert pop(client, h).status_code == 200
    bonus_period_passed(ctx, owner.id)  # the next period, without work: nothing
    assert pop(client, h).status_code == 200
    assert balances(ctx)[owner.id] == pytest.approx(before + reward + bonus, abs=0.01)
    with ctx.db.read() as s:
        assert s.execute(select(Worker.last_job_at).where(Worker.name == "w1")).scalar_one()
    assert_ledger_consistent(ctx)


def test_workers_per_user_are_capped_by_role(client, ctx):
    s = ctx.settings
    assert s.max_workers_per_user < s.max_workers_trusted
    plain, h = make_user(ctx, "plain")
    for i in range(s.max_workers_per_user - 2):
        assert pop(client, h, name=f"image-{i}").status_code == 200
    # Image, text and alchemy workers all count.
    assert text_pop(client, h, "text-0").status_code == 200
    assert alchemy_pop(client, h, "alchemist-0").status_code == 200
    for r in (pop(client, h, name="one-too-many"), text_pop(client, h, "text-1"),
              alchemy_pop(client, h, "alchemist-1")):
        assert r.status_code == 403, r.text
        assert r.json()["rc"] == "TooManyWorkers" and r.json()["message"].startswith("name:")
    assert pop(client, h, name="image-0").status_code == 200  # the ones it has keep working
    trusted, th = make_user(ctx, "trusty", trusted=True)
    for i in range(s.max_workers_trusted):
        assert pop(client, th, name=f"trusted-{i}").status_code == 200, i
    assert pop(client, th, name="trusted-too-many").status_code == 403
    with ctx.db.read() as session:
        counts = dict(session.execute(select(Worker.owner_id, func.count())
                                      .group_by(Worker.owner_id)).all())
    assert counts[plain.id] == s.max_workers_per_user
    assert counts[trusted.id] == s.max_workers_trusted


# --- who can cancel and read -----------------------------------------------------------------

def test_pop_answers_never_name_the_request(client, ctx):
    _, h = make_user(ctx, "volunteer")
    rid = submit(client, params={"n": 2}).json()["id"]
    r = pop(client, h, amount=2)
    assert len(r.json()["ids"]) == 2 and rid not in r.text
    # Nor does the URL of a source image.
    rid = submit(client, source_image=png_b64(Image.new("RGB", (64, 64), (9, 9, 9))),
                 source_processing="img2img").json()["id"]
    r = pop(client, h, allow_img2img=True)
    assert r.json()["source_image"] and rid not in r.text
    # What a worker does have (generation ids, its upload key) neither reads nor cancels.
    gid = r.json()["id"]
    for path in (f"/api/v2/generate/status/{gid}", f"/api/v2/generate/check/{gid}"):
        assert client.get(path).status_code == 404
    assert client.delete(f"/api/v2/generate/status/{gid}").status_code == 404
    # Alchemy: neither the source nor the upload URL names the interrogation.
    iid = client.post("/api/v2/interrogate/async", json={
        "forms": [{"name": "RealESRGAN_x2plus"}],
        "source_image": png_b64(Image.new("RGB", (64, 64), (1, 2, 3)))}).json()["id"]
    r = alchemy_pop(client, h, "alchemist")
    (form,) = r.json()["forms"]
    assert form["r2_upload"] and form["source_image"] and iid not in r.text


def test_upload_urls_expire_with_their_claim(client, ctx):
    _, h = make_user(ctx, "volunteer")
    assert submit(client).status_code == 202
    job = pop(client, h).json()
    with ctx.db.read() as s:
        g = s.get(Generation, job["id"])
    assert urlsplit(job["r2_upload"]).path.endswith(upload_key(g.id, g.claim_id))
    expires = int(parse_qs(urlsplit(job["r2_upload"]).query)["expires"][0])
    assert abs(expires - g.deadline) <= 1


def test_a_late_upload_changes_nothing(client, ctx):
    _, slow_h = make_user(ctx, "slow")
    _, fast_h = make_user(ctx, "fast")
    rid = submit(client).json()["id"]
    first = pop(client, slow_h, name="slow").json()
    gid = first["id"]
    with ctx.db.write() as s:  # its time to live ran out: back to the queue
        s.execute(update(Generation).where(Generation.id == gid).values(deadline=time.time() - 1))
    assert queue.expire(ctx.db, ctx.settings.max_attempts) == 1
    second = pop(client, fast_h, name="fast").json()
    assert second["id"] == gid and second["r2_upload"] != first["r2_upload"]
    # The old claim uploads (its URL has not expired yet): the new claim does not pick it up.
    assert upload(client, first["r2_upload"], b"LATE-1").status_code == 200
    r = submit_r2(client, slow_h, gid)  # and its submit is refused
    assert r.status_code == 400 and r.json()["rc"] == "RequestExpired"
    r = submit_r2(client, fast_h, gid)
    assert r.status_code == 400 and r.json()["rc"] == "MissingUpload"
    assert upload(client, second["r2_upload"], WEBP).status_code == 200
    assert submit_r2(client, fast_h, gid).status_code == 200
    # Once done, submits are refused, and uploads to either URL change nothing the requester
    # reads.
    r = client.post("/api/v2/generate/submit", headers=slow_h,
                    json={"id": gid, "generation": base64.b64encode(b"LATE-2").decode()})
    assert r.status_code == 400 and r.json()["rc"] == "DuplicateGen"
    assert upload(client, first["r2_upload"], b"LATE-3").status_code == 200
    assert upload(client, second["r2_upload"], b"LATE-4").status_code == 200
    (gen,) = client.get(f"/api/v2/generate/status/{rid}").json()["generations"]
    assert client.get(gen["img"].split("127.0.0.1:8000", 1)[1]).content == WEBP


def test_a_faulted_claims_upload_is_not_picked_up(client, ctx):
    _, h = make_user(ctx, "volunteer")
    assert submit(client).status_code == 202
    first = pop(client, h).json()
    assert upload(client, first["r2_upload"], b"BROKEN").status_code == 200
    assert client.post("/api/v2/generate/submit", headers=h, json={
        "id": first["id"], "generation": "R2", "state": "faulted"}).status_code == 200
    assert pop(client, h).json()["ids"] == []  # never back to the owner that faulted it
    _, other = make_user(ctx, "other-volunteer")
    second = pop(client, other, name="w2").json()
    assert second["id"] == first["id"]
    assert submit_r2(client, other, second["id"]).json()["rc"] == "MissingUpload"


def test_oversize_uploads_are_refused(client, ctx):
    ctx.settings.max_upload_bytes = cap = len(WEBP)  # exactly one result of the job's size
    _, h = make_user(ctx, "volunteer")
    rid = submit(client, params={"n": 2}).json()["id"]
    job = pop(client, h, amount=2).json()
    url = job["r2_uploads"][0]
    for body in (b"x" * (cap + 1), iter([b"x" * cap, b"x" * cap])):  # declared, or streamed
        r = upload(client, url, body)
        assert r.status_code == 413 and r.json()["message"].startswith("body:"), r.text
    assert submit_r2(client, h, job["ids"][0]).json()["rc"] == "MissingUpload"
    r = client.post("/api/v2/generate/submit", headers=h, json={
        "id": job["ids"][1], "generation": base64.b64encode(b"y" * (cap + 1)).decode()})
    assert r.status_code == 400 and r.json()["message"].startswith("generation:"), r.text
    exact = WEBP
    assert upload(client, url, exact).status_code == 200
    assert submit_r2(client, h, job["ids"][0]).status_code == 200
    (gen,) = client.get(f"/api/v2/generate/status/{rid}").json()["generations"]
    assert client.get(gen["img"].split("127.0.0.1:8000", 1)[1]).content == exact


def uploads_left(ctx) -> set[str]:
    return set(ctx.storage.older_keys("uploads", time.time() + 60, 1000))


def test_uploads_of_ended_claims_are_swept(client, ctx):
    """Uploads whose claims ended without a submit (expired, cancelled, faulted) are deleted
    by the sweep; the current claim's upload stays until its submit takes it."""
    from api.upload_sweep import sweep_stale_uploads

    _, h = make_user(ctx, "volunteer")
    rid = submit(client, params={"n": 3}).json()["id"]
    job = pop(client, h, amount=3).json()
    urls = dict(zip(job["ids"], job["r2_uploads"]))
    for url in urls.values():
        assert upload(client, url, WEBP).status_code == 200
    expired, faulted, kept = job["ids"]
    with ctx.db.write() as s:  # one claim's time to live runs out
        s.execute(update(Generation).where(Generation.id == expired)
                  .values(deadline=time.time() - 1))
    assert queue.expire(ctx.db, ctx.settings.max_attempts) == 1
    assert client.post("/api/v2/generate/submit", headers=h, json={
        "id": faulted, "generation": "R2", "state": "faulted"}).status_code == 200
    assert len(uploads_left(ctx)) == 2  # the faulted claim's upload went with its submit
    assert sweep_stale_uploads(ctx, min_age=60) == 0  # too young to judge
    assert sweep_stale_uploads(ctx, min_age=0) == 1
    assert uploads_left(ctx) == {urlsplit(urls[kept]).path.split("/objects/", 1)[1]}
    assert submit_r2(client, h, kept).status_code == 200  # the current claim's is still there
    assert client.delete(f"/api/v2/generate/status/{rid}").status_code == 200  # the requeued one
    # A cancelled request's claim: its upload is swept too.
    rid = submit(client).json()["id"]
    job = pop(client, h).json()
    assert upload(client, job["r2_upload"], WEBP).status_code == 200
    assert client.delete(f"/api/v2/generate/status/{rid}").status_code == 200
    assert sweep_stale_uploads(ctx, min_age=0) == 1
    assert uploads_left(ctx) == set()


# --- worker names ----------------------------------------------------------------------------

def test_the_clusters_names_are_reserved(client, ctx):
    _, h = make_user(ctx, "squatter")
    for name in ("rayhorde-cluster/llm", "rayhorde-cluster/stable_diffusion_1",
                 "RayHorde-Cluster/alchemy", " rayhorde-cluster/llm"):
        for r in (pop(client, h, name=name), text_pop(client, h, name),
                  alchemy_pop(client, h, name)):
            assert r.status_code == 400, (name, r.text)
            assert r.json()["message"].startswith("name:")
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Worker)) == 0
    # Nor can a worker be renamed into them.
    assert pop(client, h, name="innocent").status_code == 200
    wid = client.get("/api/v2/workers").json()[0]["id"]
    r = client.put(f"/api/v2/workers/{wid}", headers=h, json={"name": RESERVED_NAME_PREFIX + "llm"})
    assert r.status_code == 400 and r.json()["message"].startswith("name:")


def test_migration_renames_squatted_cluster_names(db, ctx):
    from alembic import command

    from api.db.migrate import alembic_config, upgrade

    owner, _ = make_user(ctx, "squatter")
    with ctx.db.write() as s:  # taken before the cluster's names were reserved
        s.add(Worker(id="squat", name="rayhorde-cluster/llm", owner_id=owner.id, kind="http",
                     type="text", models=[]))
    with db.engine.connect() as conn:
        command.downgrade(alembic_config(conn), "0008")
        conn.commit()
    upgrade(db)
    with db.read() as s:
        assert s.get(Worker, "squat").name == "renamed-squat"


def test_long_volunteer_node_names_never_collide(ctx):
    from cluster.bridge import FAMILY_LABEL_PREFIX, Proof, VolunteerBridge
    from models.catalog import Family

    bridge = VolunteerBridge(ctx.db, ctx.settings, {Family.stable_diffusion_1: ["tiny-sd15"]})
    long = "v" * 100  # usernames alike in their first 99 characters, and a short one
    nodes = []
    for i, username in enumerate((long, long[:-1] + "w", "short")):
        user, _ = make_user(ctx, f"owner{i}")
        with ctx.db.write() as s:
            s.execute(update(User).where(User.id == user.id)
                      .values(username=username, node_public_key=f"key-{i}"))
        for _ in range(2):
            node_id = (uuid.uuid4().hex + uuid.uuid4().hex)[:56]  # as Ray's node ids
            info = {"Labels": {FAMILY_LABEL_PREFIX + Family.stable_diffusion_1.value: "yes"}}
            # (as a node whose proof verified: cluster/bridge.py)
            nodes.append(bridge._admit(node_id, info, Proof(user.id, f"key-{i}", b"", None, 0),
                                       time.time()))
    assert None not in nodes
    names = [n.worker_name for n in nodes]
    assert len(set(names)) == len(names) == 6
    assert all(len(name) <= 100 and name.startswith("node-") for name in names)
    assert names[4] == f"node-short-{nodes[4].node_id[:8]}"  # names that fit stay as they were


def test_volunteer_nodes_earn_the_uptime_bonus_only_for_work(ctx):
    """A Ray-joined node's heartbeat pays the bonus as HTTP pops do: for a period with work."""
    from cluster.bridge import FAMILY_LABEL_PREFIX, Proof, VolunteerBridge
    from models.catalog import Family

    bridge = VolunteerBridge(ctx.db, ctx.settings, {Family.stable_diffusion_1: ["tiny-sd15"]})
    owner, _ = make_user(ctx, "node-owner")
    with ctx.db.write() as s:
        s.execute(update(User).where(User.id == owner.id).values(node_public_key="key-n"))
    info = {"Labels": {FAMILY_LABEL_PREFIX + Family.stable_diffusion_1.value: "yes"}}
    node = bridge._admit("n" * 56, info, Proof(owner.id, "key-n", b"", None, 0), time.time())
    bridge.nodes[node.node_id] = node
    period, bonus = ctx.settings.uptime_bonus_seconds, ctx.settings.uptime_bonus_kudos
    assert bonus > 0
    now = time.time()
    for _ in range(3):  # connected for three periods, idle: nothing
        now += period + 1
        bridge._heartbeat(now)
    assert balances(ctx)[owner.id] == 0
    with ctx.db.write() as s:  # a job finished for someone else in this period
        s.execute(update(Worker).where(Worker.id == node.worker_id).values(last_job_at=now + 5))
    now += period + 1
    bridge._heartbeat(now)
    assert balances(ctx)[owner.id] == pytest.approx(bonus)
    now += period + 1
    bridge._heartbeat(now)  # the next period, without work: nothing more
    assert balances(ctx)[owner.id] == pytest.approx(bonus)
    assert_ledger_consistent(ctx)


# --- upfront kudos ---------------------------------------------------------------------------

def upfront_price(client) -> float:
    r = submit(client, dry_run=True, params=UPFRONT)
    assert r.status_code == 200, r.text
    return r.json()["kudos"]


def test_upfront_kudos_are_reserved(client, ctx):
    price = upfront_price(client)
    saver, h = make_user(ctx, "saver", kudos=price * 1.5)
    assert submit(client, h, params=UPFRONT).status_code == 202
    r = submit(client, h, params=UPFRONT)  # the first one's kudos are spoken for
    assert r.status_code == 403 and r.json()["rc"] == "KudosUpfront", r.text
    assert r.json()["message"].startswith("params")
    assert submit(client, h).status_code == 202  # small jobs need nothing upfront
    # Once the first has been paid for, what is left still does not cover another.
    _, wh = make_user(ctx, "volunteer")
    for _ in range(2):
        assert [a.status_code for a in do_job(client, wh)[1]] == [200]
    assert balances(ctx)[saver.id] < price
    assert submit(client, h, params=UPFRONT).json()["rc"] == "KudosUpfront"
    assert_ledger_consistent(ctx)


def test_concurrent_upfront_requests_cannot_share_kudos(client, ctx):
    price = upfront_price(client)
    _, h = make_user(ctx, "racer", kudos=price * 1.5)
    barrier, codes = threading.Barrier(4), []

    def send():
        barrier.wait()
        codes.append(submit(client, h, params=UPFRONT).status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [202, 403, 403, 403]
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Request)) == 1


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_s3_uploads_of_ended_claims_are_swept(client, ctx, s3_endpoint):  # noqa: F811
    from api.storage import S3Storage
    from api.upload_sweep import sweep_stale_uploads

    store = S3Storage("rayhorde-sweep", s3_endpoint, "us-east-1", 600,
                      secret=ctx.settings.key_salt)
    store.ensure_bucket()
    ctx.storage = store
    _, h = make_user(ctx, "volunteer")
    rid = submit(client).json()["id"]
    job = pop(client, h).json()
    assert upload(client, job["r2_upload"], WEBP).status_code == 200  # relayed to the bucket
    assert sweep_stale_uploads(ctx, min_age=0) == 0  # its claim is current
    assert client.delete(f"/api/v2/generate/status/{rid}").status_code == 200
    assert sweep_stale_uploads(ctx, min_age=0) == 1
    assert store.older_keys("uploads", time.time() + 60, 10) == []
