"""The AI Horde v2 image API through HTTP (FastAPI TestClient), on SQLite and PostgreSQL."""

from __future__ import annotations

import base64

import pytest
from sqlalchemy import func, select

from api.auth import hash_api_key
from api.db import queue
from api.db.models import Generation, QueueEntry, Request, User
from conftest import count_statements

pytestmark = pytest.mark.timeout(60)
ANON = {"apikey": "0000000000"}


def submit(client, **body):
    body.setdefault("prompt", "a lighthouse ### fog")
    body.setdefault("models", ["tiny-sd15"])
    return client.post("/api/v2/generate/async", json=body, headers=ANON)


def test_submit_answers_202_with_id_and_kudos(client, ctx):
    r = submit(client, params={"n": 3, "steps": 10, "seed": "7", "width": 576})
    assert r.status_code == 202
    body = r.json()
    assert set(body) == {"id", "kudos"} and body["kudos"] > 1
    with ctx.db.read() as s:
        req = s.get(Request, body["id"])
        assert (req.prompt, req.negative_prompt, req.n) == ("a lighthouse", "fog", 3)
        seeds = s.execute(select(Generation.seed).where(Generation.request_id == req.id)
                          .order_by(Generation.position)).scalars().all()
    assert seeds == [7, 8, 9]  # seed_variation defaults to 1 so n images differ


def test_dry_run_prices_without_queueing(client, ctx):
    r = submit(client, dry_run=True, params={"steps": 20})
    assert r.status_code == 200 and set(r.json()) == {"kudos"}
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Request)) == 0


def test_price_follows_family_multiplier(client):
    sd = submit(client, dry_run=True, models=["tiny-sd15"]).json()["kudos"]
    xl = submit(client, dry_run=True, models=["tiny-sdxl"]).json()["kudos"]
    cascade = submit(client, dry_run=True, models=["tiny-cascade"]).json()["kudos"]
    assert (xl - 1) == pytest.approx(2 * (sd - 1), abs=0.02)
    assert (cascade - 1) == pytest.approx(4 * (sd - 1), abs=0.02)


def test_check_counts_and_queue_position(client, ctx):
    first = submit(client, params={"n": 2}).json()["id"]
    second = submit(client, params={"n": 1}).json()["id"]
    c1 = client.get(f"/api/v2/generate/check/{first}").json()
    c2 = client.get(f"/api/v2/generate/check/{second}").json()
    assert c1["waiting"] == 2 and c1["queue_position"] == 0 and not c1["done"]
    assert c2["queue_position"] == 2 and c2["wait_time"] > 0
    assert set(c1) == {"finished", "processing", "restarted", "waiting", "done", "faulted",
                       "wait_time", "queue_position", "kudos", "is_possible"}
    # Jobs workers hold are no longer ahead of anyone; handed back, they are again.
    held = queue.claim(ctx.db, queue.Capabilities("w-test", ["tiny-sd15"]), 2)
    assert {j.request_id for j in held} == {first}
    assert client.get(f"/api/v2/generate/check/{second}").json()["queue_position"] == 0
    queue.release(ctx.db, [(j.generation_id, j.claim_id) for j in held], "test", 3)
    assert client.get(f"/api/v2/generate/check/{second}").json()["queue_position"] == 2


def _complete_all(ctx, worker="w-test"):
    jobs = queue.claim(ctx.db, queue.Capabilities(worker, ["tiny-sd15"]), 50)
    for j in jobs:
        key = f"images/{j.request_id}/{j.generation_id}.webp"
        ctx.storage.put(key, b"RIFF-fake-" + j.generation_id.encode(), "image/webp")
    queue.finish(ctx.db, [queue.Result(j.generation_id, j.claim_id,
                                       f"images/{j.request_id}/{j.generation_id}.webp",
                                       j.seed, worker, "test worker", owner_id=0) for j in jobs])
    return jobs


def test_status_returns_urls_or_base64(client, ctx):
    with_url = submit(client, params={"n": 2, "seed": "3"}).json()["id"]
    inline = submit(client, r2=False).json()["id"]
    _complete_all(ctx)
    st = client.get(f"/api/v2/generate/status/{with_url}").json()
    assert st["done"] and st["finished"] == 2
    assert [g["seed"] for g in st["generations"]] == ["3", "4"]
    url = st["generations"][0]["img"]
    path = url.split("127.0.0.1:8000", 1)[1]
    fetched = client.get(path)
    assert fetched.status_code == 200 and fetched.content.startswith(b"RIFF-fake-")
    st2 = client.get(f"/api/v2/generate/status/{inline}").json()
    assert base64.b64decode(st2["generations"][0]["img"]).startswith(b"RIFF-fake-")
    g = st2["generations"][0]
    assert g["state"] == "ok" and g["worker_name"] == "test worker" and g["model"] == "tiny-sd15"


def test_cancel_returns_finished_and_drops_the_rest(client, ctx):
    rid = submit(client, params={"n": 3}).json()["id"]
    jobs = queue.claim(ctx.db, queue.Capabilities("w", ["tiny-sd15"]), 1)
    ctx.storage.put("images/a.webp", b"RIFF", "image/webp")
    queue.finish(ctx.db, [queue.Result(jobs[0].generation_id, jobs[0].claim_id,
                                       "images/a.webp", 1, "w", "w", owner_id=0)])
    st = client.delete(f"/api/v2/generate/status/{rid}").json()
    assert st["finished"] == 1 and len(st["generations"]) == 1 and st["waiting"] == 0
    assert queue.claim(ctx.db, queue.Capabilities("w", ["tiny-sd15"]), 5) == []
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(QueueEntry)) == 0


def test_unknown_request_is_404(client):
    r = client.get("/api/v2/generate/check/00000000-0000-0000-0000-000000000000")
    assert r.status_code == 404 and r.json()["rc"] == "RequestNotFound"


@pytest.mark.parametrize("body, field", [
    ({"params": {"steps": 0}}, "params.steps"),
    ({"params": {"steps": 501}}, "params.steps"),
    ({"params": {"width": 100}}, "params.width"),
    ({"params": {"height": 4096}}, "params.height"),
    ({"params": {"n": 21}}, "params.n"),
    ({"params": {"cfg_scale": -1}}, "params.cfg_scale"),
    ({"params": {"clip_skip": 13}}, "params.clip_skip"),
    ({"params": {"sampler_name": "k_nope"}}, "params.sampler_name"),
    ({"params": {"seed_variation": 0}}, "params.seed_variation"),
    ({"params": {"karras": "maybe"}}, "params.karras"),
    ({"params": {"hires_fix_denoising_strength": 0}}, "params.hires_fix_denoising_strength"),
    ({"params": {"denoising_strength": 1.5}}, "params.denoising_strength"),
    ({"source_mask": "aGVsbG8="}, "source_mask"),
    ({"source_processing": "inpainting"}, "source_processing"),
    ({"source_processing": "remix", "source_image": "aGVsbG8="}, "source_processing"),
    ({"models": ["tiny-sd15-inpainting"]}, "models"),
    ({"models": ["tiny-cascade"], "source_image": "aGVsbG8="}, "source_processing"),
    ({"params": {"post_processing": ["Waifu2x"]}}, "params.post_processing"),
    ({"params": "not an object"}, "params"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"models": "tiny-sd15"}, "models"),
    ({"r2": "sometimes"}, "r2"),
    ({"source_image": "aGVsbG8="}, "source_image"),
    ({"workers": ["a", "b", "c", "d", "e", "f"]}, "workers"),
])
def test_bad_input_is_400_naming_the_field(client, ctx, body, field):
    r = submit(client, **body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert set(err) >= {"message", "rc"} and field in err["message"]
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Request)) == 0


def test_missing_prompt_and_bad_json(client):
    r = client.post("/api/v2/generate/async", json={"models": []}, headers=ANON)
    assert r.status_code == 400 and "prompt" in r.json()["message"]
    r = client.post("/api/v2/generate/async", content=b"{not json", headers=ANON)
    assert r.status_code == 400 and r.json()["rc"] == "BadRequest"


def test_unknown_model_is_400(client):
    r = submit(client, models=["no-such-model"])
    assert r.status_code == 400 and "models" in r.json()["message"]


def test_oversized_body_is_413(client, ctx):
    big = "x" * (ctx.settings.max_body_bytes + 10)
    r = submit(client, prompt=big)
    assert r.status_code == 413 and r.json()["rc"] == "PayloadTooLarge"


def test_invalid_or_unknown_api_key_is_401(client, ctx):
    for key in ("short", "a-key-nobody-has-at-all"):
        r = client.post("/api/v2/generate/async", json={"prompt": "x"}, headers={"apikey": key})
        assert r.status_code == 401 and "apikey" in r.json()["message"]
    with ctx.db.write() as s:
        s.add(User(username="alice", api_key_hash=hash_api_key("alice-key-123456",
                                                              ctx.settings.key_salt), kudos=50))
    r = client.post("/api/v2/generate/async", json={"prompt": "x"},
                    headers={"apikey": "alice-key-123456"})
    assert r.status_code == 202
    assert client.get("/api/v2/find_user", headers={"apikey": "alice-key-123456"}
                      ).json()["username"].startswith("alice#")


def test_find_user_anonymous_and_heartbeat(client):
    assert client.get("/api/v2/find_user", headers=ANON).json()["id"] == 0
    hb = client.get("/api/v2/status/heartbeat").json()
    assert hb["message"] == "OK" and hb["version"]


def test_status_models_lists_served_models_with_queue(client):
    submit(client, params={"n": 4, "steps": 10})
    models = {m["name"]: m for m in client.get("/api/v2/status/models?type=image").json()}
    assert set(models) == {"tiny-sd15", "tiny-sd15-inpainting", "tiny-sdxl", "tiny-cascade"}
    assert models["tiny-sd15"]["jobs"] == 4 and models["tiny-sd15"]["queued"] > 0
    assert [m["name"] for m in client.get("/api/v2/status/models?type=text").json()] == ["tiny-llm"]
    assert client.get("/api/v2/status/models?type=video").status_code == 400


def test_statement_counts_are_pinned_and_flat(client, ctx):
    ctx.settings.max_waiting_per_user = 10**6  # a deep backlog from one requester
    counts = {}
    for n, backlog in ((1, 0), (20, 50)):
        for _ in range(backlog):
            submit(client, params={"n": 2})
        with count_statements(ctx.db) as c:
            rid = submit(client, params={"n": n}).json()["id"]
        counts[("submit", n)] = c.count
        with count_statements(ctx.db) as c:
            client.get(f"/api/v2/generate/check/{rid}")
        counts[("check", n)] = c.count
        with count_statements(ctx.db) as c:
            client.get(f"/api/v2/generate/status/{rid}")
        counts[("status", n)] = c.count
    # submit: user, the requester's active count (on PostgreSQL after its lock, so that its
    # submits at once count one after the other), request, generations (one multi-row
    # insert), queue entries.
    assert counts[("submit", 1)] == counts[("submit", 20)] == (5 if ctx.db.is_sqlite else 6)
    # check: the request with its counts per state, its place in the queue; status: those and
    # its finished generations.
    assert counts[("check", 1)] == counts[("check", 20)] == 2
    assert counts[("status", 1)] == counts[("status", 20)] == 3
