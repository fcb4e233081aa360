"""What a worker submits is an image of its job before it is stored or paid (api/results.py),
uploads are capped whatever the storage (api/storage.py), a late result never replaces one
another claim committed (api/workers.py image_key), and one status answer inlines a bounded
number of bytes (api/images.py _Inline). SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from sqlalchemy import select

from api.db.models import Generation
from conftest import result_webp, webp_bytes
from test_economy import assert_ledger_consistent, balances, make_user, submit
from test_storage import s3_endpoint  # noqa: F401
from test_workers import pop, upload

pytestmark = pytest.mark.timeout(120)


def submit_result(client, h, gid, generation="R2", **body):
    return client.post("/api/v2/generate/submit", headers=h,
                       json={"id": gid, "generation": generation, "state": "ok", "seed": 1, **body})


@pytest.fixture
def volunteer(ctx):
    return make_user(ctx, "volunteer")


@pytest.fixture
def requester(ctx):
    return make_user(ctx, "requester", kudos=1000)


def _png(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_results_that_are_not_the_jobs_image_are_refused_unpaid(client, ctx, volunteer, requester):
    owner, h = volunteer
    _, rh = requester
    rid = submit(client, rh).json()["id"]
    job = pop(client, h).json()
    before = balances(ctx)
    html = b"<!doctype html><html>" + b"x" * 100_000 + b"</html>"
    for data, says in [(html, "not a WebP, PNG or JPEG"), (webp_bytes(64, 64), "64x64"),
                       (b"GIF89a" + b"\0" * 100, "not a WebP")]:
        assert upload(client, job["r2_upload"], data).status_code == 200
        r = submit_result(client, h, job["id"])
        assert r.status_code == 400 and r.json()["rc"] == "InvalidResult", r.text
        assert r.json()["message"].startswith("generation:") and says in r.json()["message"]
        inline = submit_result(client, h, job["id"], base64.b64encode(data).decode())
        assert inline.status_code == 400 and inline.json()["rc"] == "InvalidResult"
    assert balances(ctx) == before  # nothing paid, nothing charged
    assert client.get(f"/api/v2/generate/check/{rid}").json()["processing"] == 1
    # A PNG of the job's size is an image of the job (the AI Horde takes WebP, PNG and JPEG).
    ok = submit_result(client, h, job["id"], base64.b64encode(_png(512, 512)).decode())
    assert ok.status_code == 200 and ok.json()["reward"] > 0
    assert balances(ctx)[owner.id] - before[owner.id] == pytest.approx(ok.json()["reward"], abs=0.02)
    assert_ledger_consistent(ctx)


def test_the_upscaled_size_is_the_jobs_size(client, ctx, volunteer, requester):
    _, h = volunteer
    _, rh = requester
    submit(client, rh, params={"post_processing": ["RealESRGAN_x2plus"]})
    job = pop(client, h, post_processing=["RealESRGAN_x2plus"]).json()
    assert job["ids"], job
    assert upload(client, job["r2_upload"], result_webp(job["payload"])).status_code == 200
    r = submit_result(client, h, job["id"])
    assert r.status_code == 400 and "1024x1024" in r.json()["message"], r.text
    assert upload(client, job["r2_upload"], webp_bytes(1024, 1024)).status_code == 200
    assert submit_result(client, h, job["id"]).status_code == 200


def test_a_late_result_never_replaces_the_committed_one(client, ctx, volunteer, requester):
    """The second submit of a job (or one from a claim that lost) is refused, and the image the
    requester reads is the first one's, byte for byte."""
    _, h = volunteer
    _, rh = requester
    rid = submit(client, rh).json()["id"]
    job = pop(client, h).json()
    first = webp_bytes(512, 512, color=(10, 20, 30))
    assert upload(client, job["r2_upload"], first).status_code == 200
    assert submit_result(client, h, job["id"]).status_code == 200
    late = webp_bytes(512, 512, color=(250, 0, 0))
    upload(client, job["r2_upload"], late)
    again = submit_result(client, h, job["id"], base64.b64encode(late).decode())
    assert again.status_code == 400 and again.json()["rc"] == "DuplicateGen"
    (gen,) = client.get(f"/api/v2/generate/status/{rid}").json()["generations"]
    assert client.get(gen["img"].split("127.0.0.1:8000", 1)[1]).content == first
    with ctx.db.read() as s:
        key = s.execute(select(Generation.storage_key).where(Generation.request_id == rid)).scalar_one()
    assert ctx.storage.get(key) == first and ctx.storage.older_keys(
        f"images/{rid}", 1e12, 10) == [key]


def test_a_status_inlines_a_bounded_number_of_bytes(client, ctx, volunteer, requester):
    _, h = volunteer
    _, rh = requester
    one = webp_bytes(512, 512)
    ctx.settings.max_inline_status_bytes = len(one) + 10  # room for one image
    rid = submit(client, rh, r2=False, params={"n": 2}).json()["id"]
    job = pop(client, h, amount=2).json()
    for url in job["r2_uploads"]:
        upload(client, url, one)
    for gid in job["ids"]:
        assert submit_result(client, h, gid).status_code == 200
    gens = client.get(f"/api/v2/generate/status/{rid}").json()["generations"]
    inlined = [g for g in gens if not g["img"].startswith("http")]
    linked = [g for g in gens if g["img"].startswith("http")]
    assert len(inlined) == 1 and base64.b64decode(inlined[0]["img"]) == one
    assert len(linked) == 1 and client.get(linked[0]["img"].split("127.0.0.1:8000", 1)[1]).content == one


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_s3_uploads_go_through_the_capped_relay(client, ctx, s3_endpoint):  # noqa: F811
    """Under S3 too a worker PUTs to the API, which refuses a body over the cap before any of
    it reaches the bucket, then stores what fits there."""
    from api.storage import S3Storage

    store = S3Storage("rayhorde-relay", s3_endpoint, "us-east-1", 600,
                      public_url="http://127.0.0.1:8000", secret=ctx.settings.key_salt)
    store.ensure_bucket()
    ctx.storage = store
    ctx.settings.max_upload_bytes = 100_000
    _, h = make_user(ctx, "volunteer")
    _, rh = make_user(ctx, "requester", kudos=1000)
    rid = submit(client, rh).json()["id"]
    job = pop(client, h).json()
    assert job["r2_upload"].startswith("http://127.0.0.1:8000/api/v2/objects/uploads/")
    assert rid not in job["r2_upload"]
    key = job["r2_upload"].split("/api/v2/objects/", 1)[1].split("?")[0]
    r = upload(client, job["r2_upload"], b"x" * 100_001)
    assert r.status_code == 413 and r.json()["message"].startswith("body:")
    assert store.size(key) is None  # nothing reached the bucket
    assert upload(client, job["r2_upload"].replace("signature=", "signature=0"),
                  result_webp(job["payload"])).status_code == 403
    assert upload(client, job["r2_upload"], result_webp(job["payload"])).status_code == 200
    assert store.size(key) == len(result_webp(job["payload"]))
    assert submit_result(client, h, job["id"]).status_code == 200
    (gen,) = client.get(f"/api/v2/generate/status/{rid}").json()["generations"]
    assert gen["img"].startswith(s3_endpoint)
