"""The AI Horde endpoints clients call beside generating (issue 13): one model's status, the
news, the usage stats, the workers by type, and shared keys with the economy behind them; on
SQLite and PostgreSQL. horde-sdk's own models judge the answers in strict mode at the end,
against a live server."""

from __future__ import annotations

import email.utils
import json
import os
import subprocess
import math
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.kudos import REQUEST_TAX
from api import usage_stats
from api.app import create_app
from api.db.models import Generation, Request, SharedKey, SharedKeyRequest, Worker
from conftest import ROOT, app_server, free_port, horde_sdk_python, make_ctx
from test_economy import ANON, assert_ledger_consistent, balances, make_user, submit
from test_text_api import text_pop, text_submit
from test_workers import do_job

pytestmark = pytest.mark.timeout(180)


def fresh(ctx) -> TestClient:
    """A client of a new app: the stats answers are cached per app for 30 s."""
    return TestClient(create_app(ctx))


def finish_text(client, headers, name="scribe", text="there was a lighthouse", **pop) -> dict:
    job = text_pop(client, headers, name, **pop).json()
    assert job["ids"], job
    r = client.post("/api/v2/generate/text/submit", headers=headers,
                    json={"id": job["id"], "generation": text, "state": "ok"})
    assert r.status_code == 200, r.text
    return job


# --- status: one model, news ---

def test_one_model_status_as_the_ai_horde_answers_it(client, ctx):
    _, wh = make_user(ctx, "tinkerer", customizer=True)
    assert submit(client, params={"n": 3, "steps": 10}).status_code == 202
    (sd,) = client.get("/api/v2/status/models/tiny-sd15").json()
    assert (sd["name"], sd["type"], sd["jobs"]) == ("tiny-sd15", "image", 3.0) and sd["queued"] > 0
    (llm,) = client.get("/api/v2/status/models/tiny-llm").json()
    assert (llm["name"], llm["type"]) == ("tiny-llm", "text")
    # A name nobody knows or offers: an empty list (200), as the AI Horde answers.
    assert client.get("/api/v2/status/models/no-such-model").json() == []
    # A model of the AI Horde's model reference that nobody serves, with a request waiting.
    assert client.get("/api/v2/status/models/Deliberate").json() == []
    assert submit(client, models=["Deliberate"], params={"steps": 10}).status_code == 202
    (waiting,) = client.get("/api/v2/status/models/Deliberate").json()
    assert (waiting["type"], waiting["count"], waiting["jobs"]) == ("image", 0, 1.0)
    # A customizer's worker offers a model of its own, its name with a "/": horde-sdk sends it
    # encoded twice, and the server decodes it twice, as the AI Horde does.
    assert text_pop(client, wh, name="kobold", models=["koboldcpp/Custom-13B"]).status_code == 200
    (custom,) = client.get("/api/v2/status/models/koboldcpp%252FCustom-13B").json()
    assert (custom["name"], custom["type"], custom["count"]) == ("koboldcpp/Custom-13B", "text", 1)
    assert client.get("/api/v2/status/models/koboldcpp%2FCustom-13B").json() == [custom]
    # The list: model_state picks known or custom models, min/max_count the workers serving.
    def names(query: str) -> set[str]:
        return {m["name"] for m in client.get(f"/api/v2/status/models?{query}").json()}

    assert names("type=text") == {"tiny-llm", "koboldcpp/Custom-13B"}
    assert names("type=text&model_state=custom") == {"koboldcpp/Custom-13B"}
    assert names("type=text&model_state=known") == {"tiny-llm"}
    assert names("type=text&min_count=1") == {"koboldcpp/Custom-13B"}
    assert names("type=text&max_count=0") == {"tiny-llm"}
    assert "Deliberate" in names("type=image&model_state=known")
    assert names("type=image&model_state=custom") == set()
    for bad in ("model_state=mine", "min_count=-1", "max_count=x", "type=video"):
        r = client.get(f"/api/v2/status/models?{bad}")
        assert r.status_code == 400 and bad.split("=")[0] in r.json()["message"], bad
    assert client.get("/api/v2/status/models/" + "m" * 1001).status_code == 400


def test_news_come_from_the_operators_file(client, tmp_path, monkeypatch):
    served = client.get("/api/v2/status/news").json()
    assert served and all(n["date_published"] and n["newspiece"] for n in served)
    dates = [n["date_published"] for n in served]
    assert dates == sorted(dates, reverse=True)
    news = tmp_path / "news.yaml"
    news.write_text('- {date_published: "2024-01-02", newspiece: older}\n'
                    '- {date_published: "2025-03-04", newspiece: newer, title: T, '
                    'tags: [a], importance: Workers}\n')
    monkeypatch.setenv("RAYHORDE_NEWS_PATH", str(news))
    assert client.get("/api/v2/status/news").json() == [
        {"date_published": "2025-03-04", "newspiece": "newer", "title": "T", "tags": ["a"],
         "importance": "Workers", "more_info_urls": []},
        {"date_published": "2024-01-02", "newspiece": "older", "importance": "Information",
         "tags": [], "more_info_urls": []}]
    # Edited in place: served at once. A broken edit keeps what was served, never a 500.
    before = client.get("/api/v2/status/news").json()
    news.write_text('- {date_published: "2025-13-01", newspiece: bad date}\n')
    os.utime(news, (time.time() + 5, time.time() + 5))
    assert client.get("/api/v2/status/news").json() == before
    news.write_text('- {date_published: "2025-05-05", newspiece: fixed}\n')
    os.utime(news, (time.time() + 10, time.time() + 10))
    assert [n["newspiece"] for n in client.get("/api/v2/status/news").json()] == ["fixed"]


# --- stats ---

def test_stats_count_finished_generations_per_model_and_period(client, ctx):
    _, wh = make_user(ctx, "volunteer")
    _, custom = make_user(ctx, "tinkerer", customizer=True)
    for _ in range(3):
        assert submit(client, params={"steps": 10}).status_code == 202
        do_job(client, wh)
    submit(client)  # waiting, not finished: not counted
    assert text_submit(client, params={"max_length": 40}).status_code == 202
    finish_text(client, wh)
    # A custom text model, offered by a customizer's worker, finished once.
    assert text_pop(client, custom, name="kobold", models=["my-custom-llm"]).json()["ids"] == []
    r = text_submit(client, models=["my-custom-llm"], params={"max_length": 30})
    assert r.status_code == 202
    finish_text(client, custom, name="kobold", models=["my-custom-llm"])
    # Of the three images, one finished 3 days ago and one 40 days ago.
    now = time.time()
    with ctx.db.write() as s:
        images = s.execute(select(Generation.id).join(Request, Request.id == Generation.request_id)
                           .where(Generation.state == "done", Request.kind == "image")
                           ).scalars().all()
        assert len(images) == 3
        for gid, age in ((images[0], 3 * 86400), (images[1], 40 * 86400)):
            s.execute(update(Generation).where(Generation.id == gid).values(finished_at=now - age))

    c = fresh(ctx)
    img = c.get("/api/v2/stats/img/models").json()
    assert img == {"day": {"tiny-sd15": 1}, "month": {"tiny-sd15": 2}, "total": {"tiny-sd15": 3}}
    assert c.get("/api/v2/stats/img/models?model_state=known").json() == img
    assert c.get("/api/v2/stats/img/models?model_state=custom").json() == {
        "day": {}, "month": {}, "total": {}}
    bad = c.get("/api/v2/stats/img/models?model_state=everything")
    assert bad.status_code == 400 and bad.json()["message"].startswith("model_state:")
    both = {"tiny-llm": 1, "my-custom-llm": 1}
    assert c.get("/api/v2/stats/text/models").json() == {"day": both, "month": both,
                                                          "total": both}
    assert c.get("/api/v2/stats/text/models?model_state=custom").json()["total"] == {
        "my-custom-llm": 1}

    ps = 512 * 512 * 10  # pixelsteps of one image
    assert c.get("/api/v2/stats/img/totals").json() == {
        "minute": {"images": 1, "ps": ps}, "hour": {"images": 1, "ps": ps},
        "day": {"images": 1, "ps": ps}, "month": {"images": 2, "ps": 2 * ps},
        "total": {"images": 3, "ps": 3 * ps}}
    # HTTP text workers' tokens are counted from what they delivered (a token per four
    # characters, as they are paid: api/db/queue.py text_tokens), not from what was asked.
    delivered = 2 * math.ceil(len("there was a lighthouse") / 4)
    period = {"requests": 2, "tokens": delivered}
    assert c.get("/api/v2/stats/text/totals").json() == {
        p: period for p in ("minute", "hour", "day", "month", "total")}


def test_stats_are_counters_not_a_scan_of_history(client, ctx):
    """Once folded, finished generations are read from the counters: changing history behind
    them changes nothing, and a fold counts each generation once, however often it runs."""
    _, wh = make_user(ctx, "volunteer")
    for _ in range(2):
        submit(client, params={"steps": 10})
        do_job(client, wh)
    later = time.time() + 2 * usage_stats.FOLD_LAG_SECONDS
    with ctx.db.write() as s:
        assert usage_stats.fold(s, later) == later - usage_stats.FOLD_LAG_SECONDS
    with ctx.db.write() as s:  # again: nothing new, nothing counted twice
        usage_stats.fold(s, later + 1)
        # History rewritten behind the counters: the answer must not move.
        s.execute(update(Generation).values(model="rewritten"))
    with ctx.db.read() as s:
        folded = s.execute(select(usage_stats.UsageWatermark.folded_until)).scalar_one()
        per_model = usage_stats.per_model(s, "image", folded, later + 1)
    assert {m: u["total"].generations for m, u in per_model.items()} == {"tiny-sd15": 2}
    assert per_model["tiny-sd15"]["day"].megapixelsteps == pytest.approx(2 * 512 * 512 * 10 / 1e6)


# --- workers by type ---

def test_workers_by_type_with_text_workers_limits(client, ctx):
    _, h = make_user(ctx, "volunteer")
    assert client.post("/api/v2/generate/pop", headers=h, json={
        "name": "Painter", "models": ["tiny-sd15"], "max_pixels": 1024 * 1024}).status_code == 200
    assert text_pop(client, h, name="scribe", max_length=256,
                    max_context_length=1024).status_code == 200
    with ctx.db.write() as s:  # the cluster's own text deployment declares no limits itself
        s.add(Worker(id=str(uuid.uuid4()), name="rayhorde-cluster/llm", owner_id=0,
                     kind="cluster", type="text", models=["tiny-llm"], threads=2))
    text = {w["name"]: w for w in client.get("/api/v2/workers?type=text").json()}
    assert set(text) == {"scribe", "rayhorde-cluster/llm"}
    scribe = text["scribe"]
    assert (scribe["type"], scribe["max_length"], scribe["max_context_length"],
            scribe["tokens_generated"]) == ("text", 256, 1024, 0)
    assert "max_pixels" not in scribe and "img2img" not in scribe
    assert scribe["performance"].endswith("tokens per second")
    cluster = text["rayhorde-cluster/llm"]
    assert (cluster["max_length"], cluster["max_context_length"]) == (512, 2048)  # the catalog's
    (painter,) = client.get("/api/v2/workers?type=image").json()
    assert painter["type"] == "image" and painter["max_pixels"] == 1024 * 1024
    assert "max_length" not in painter and "tokens_generated" not in painter
    assert client.get("/api/v2/workers?type=interrogation").json() == []
    assert {w["name"] for w in client.get("/api/v2/workers?type=").json()} == {
        "Painter", "scribe", "rayhorde-cluster/llm"}
    assert [w["name"] for w in client.get("/api/v2/workers?name=PAINTER").json()] == ["Painter"]
    bad = client.get("/api/v2/workers?type=video")
    assert bad.status_code == 400 and bad.json()["message"].startswith("type:")
    assert client.get("/api/v2/workers?name=" + "n" * 101).status_code == 400


# --- shared keys ---

def create_key(client, headers, **body):
    body.setdefault("name", "Mutual Aid")
    return client.put("/api/v2/sharedkeys", json=body, headers=headers)


def key_headers(key: dict) -> dict:
    return {"apikey": key["id"]}


def price(client, **body) -> float:
    r = submit(client, dry_run=True, **body)
    assert r.status_code == 200, r.text
    return r.json()["kudos"]


def test_shared_key_records_and_their_secret(client, ctx):
    owner, h = make_user(ctx, "lender", kudos=100)
    r = create_key(client, h)
    assert r.status_code == 200, r.text
    key = r.json()
    assert key == {"id": key["id"], "username": f"lender#{owner.id}", "name": "Mutual Aid",
                   "kudos": 5000, "utilized": 0, "max_image_pixels": -1, "max_image_steps": -1,
                   "max_text_tokens": -1}  # no expiry: never expires
    assert str(uuid.UUID(key["id"])) == key["id"]
    assert client.get(f"/api/v2/sharedkeys/{key['id']}").json() == key
    assert client.get(f"/api/v2/sharedkeys/{key['id'].upper()}").json() == key
    # Stored as a digest only: no column holds the secret.
    with ctx.db.read() as s:
        (row,) = s.execute(select(SharedKey)).scalars().all()
        assert key["id"] not in {row.id, row.key_hash, row.name}
        assert len(row.key_hash) == 64
    for unknown in (str(uuid.uuid4()), "not-a-key"):
        r = client.get(f"/api/v2/sharedkeys/{unknown}")
        assert r.status_code == 401 and r.json()["rc"] == "InvalidAPIKey"
    # Who may make one: registered users only, at most 3 each (trusted users 10).
    assert create_key(client, ANON).json()["rc"] == "AnonForbidden"
    assert create_key(client, {"apikey": "nobody-key-0000000000"}).status_code == 401
    assert all(create_key(client, h).status_code == 200 for _ in range(2))
    r = create_key(client, h)
    assert r.status_code == 403 and r.json()["message"].startswith("apikey:")
    _, th = make_user(ctx, "trusted", trusted=True)
    assert [create_key(client, th).status_code for _ in range(11)] == [200] * 10 + [403]
    # An expiry in days comes back as a date (RFC 822, as the AI Horde).
    _, eh = make_user(ctx, "expiring")
    dated = create_key(client, eh, expiry=30, kudos=-1).json()
    when = email.utils.parsedate_to_datetime(dated["expiry"]).timestamp()
    assert when == pytest.approx(time.time() + 30 * 86400, abs=60) and dated["kudos"] == -1


@pytest.mark.parametrize("field, bad", [
    ("kudos", -2), ("kudos", 50_000_001), ("kudos", "lots"), ("expiry", 0), ("expiry", -5),
    ("expiry", 36_501), ("name", "ab"), ("name", "n" * 256), ("max_image_pixels", -2),
    ("max_image_pixels", 4_194_305), ("max_image_steps", 501), ("max_text_tokens", 501),
    ("max_text_tokens", -3)])
def test_shared_key_fields_are_bounded(client, ctx, field, bad):
    _, h = make_user(ctx, "lender")
    r = create_key(client, h, **{field: bad})
    assert r.status_code == 400 and r.json()["message"].startswith(f"{field}:"), r.text
    key = create_key(client, h).json()
    r = client.patch(f"/api/v2/sharedkeys/{key['id']}", json={field: bad}, headers=h)
    assert r.status_code == 400 and r.json()["message"].startswith(f"{field}:"), r.text


def test_requests_with_a_shared_key_are_paid_by_its_owner(client, ctx):
    owner, h = make_user(ctx, "lender", kudos=200)
    _, wh = make_user(ctx, "volunteer")
    key = create_key(client, h, kudos=100).json()
    cost = price(client, params={"steps": 10})
    r = submit(client, key_headers(key), params={"steps": 10})
    assert r.status_code == 202 and r.json()["kudos"] == cost
    rid = r.json()["id"]
    with ctx.db.read() as s:
        req = s.get(Request, rid)
        assert (req.user_id, req.requester) == (owner.id, f"u:{owner.id}")
        assert s.get(SharedKeyRequest, rid).settled == 0
    before = balances(ctx)[owner.id]
    # Nothing is spent before the image is made.
    assert client.get(f"/api/v2/sharedkeys/{key['id']}").json()["utilized"] == 0
    do_job(client, wh)
    assert balances(ctx)[owner.id] == pytest.approx(before - cost, abs=1e-6)
    shown = client.get(f"/api/v2/sharedkeys/{key['id']}").json()
    assert (shown["utilized"], shown["kudos"]) == (round(cost), round(100 - cost))
    # A text request too: the key's kudos and utilized move by what it cost the owner.
    quote = text_submit(client, dry_run=True, params={"max_length": 40}).json()["kudos"]
    assert text_submit(client, key_headers(key), params={"max_length": 40}).status_code == 202
    finish_text(client, wh)
    # (paid for the tokens delivered: 6 of the 40 asked for, and the request tax)
    tokens = math.ceil(len("there was a lighthouse") / 4)
    text_cost = (quote - REQUEST_TAX) * tokens / 40 + REQUEST_TAX
    shown = client.get(f"/api/v2/sharedkeys/{key['id']}").json()
    assert shown["utilized"] == round(cost + text_cost)
    assert text_cost < quote
    assert shown["kudos"] == round(100 - cost - text_cost)
    assert balances(ctx)[owner.id] == pytest.approx(before - cost - text_cost, abs=1e-6)
    # The next request made with it settles the finished ones into the key.
    assert submit(client, key_headers(key), params={"steps": 10}).status_code == 202
    with ctx.db.read() as s:
        row = s.execute(select(SharedKey)).scalar_one()
        assert row.utilized == pytest.approx(cost + text_cost)
        assert s.execute(select(SharedKeyRequest.request_id)).scalars().all() != [rid]
    # A dry run with it is priced like any other.
    assert submit(client, key_headers(key), dry_run=True, params={"steps": 10}).json() == {
        "kudos": cost}
    assert_ledger_consistent(ctx)


def test_shared_key_kudos_limit_counts_requests_in_flight(client, ctx):
    _, h = make_user(ctx, "lender", kudos=500)
    _, wh = make_user(ctx, "volunteer")
    cost = price(client, params={"steps": 10})
    key = create_key(client, h, kudos=int(cost * 1.5) + 1).json()
    assert submit(client, key_headers(key), params={"steps": 10}).status_code == 202
    # A second one would spend more than what is left once the first is paid.
    r = submit(client, key_headers(key), params={"steps": 10})
    assert r.status_code == 403 and r.json()["rc"] == "SharedKeyInsufficientKudos"
    with ctx.db.read() as s:  # refused: nothing of it stays
        assert s.execute(select(Request.id)).scalars().all().__len__() == 1
    do_job(client, wh)
    # Spent: what is left (less than one request) still refuses it.
    r = submit(client, key_headers(key), params={"steps": 10})
    assert r.status_code == 403 and r.json()["rc"] == "SharedKeyInsufficientKudos"
    # A key with nothing left is empty.
    empty = create_key(client, h, kudos=0).json()
    r = submit(client, key_headers(empty), params={"steps": 10})
    assert r.status_code == 403 and r.json()["rc"] == "SharedKeyEmpty"
    # No limit: -1 stays -1, utilized grows.
    unlimited = create_key(client, h, kudos=-1).json()
    for _ in range(2):
        assert submit(client, key_headers(unlimited), params={"steps": 10}).status_code == 202
        do_job(client, wh)
    shown = client.get(f"/api/v2/sharedkeys/{unlimited['id']}").json()
    assert (shown["kudos"], shown["utilized"]) == (-1, round(2 * cost))
    assert_ledger_consistent(ctx)


def test_shared_key_per_request_limits_and_expiry(client, ctx):
    _, h = make_user(ctx, "lender", kudos=500)
    key = create_key(client, h, max_image_pixels=512 * 512, max_image_steps=20,
                     max_text_tokens=64).json()
    kh = key_headers(key)
    for params, field in (({"width": 576, "height": 512}, "params.width"),
                          ({"steps": 21}, "params.steps")):
        r = submit(client, kh, params=params)
        assert r.status_code == 400 and r.json()["message"].startswith(field), r.text
    r = text_submit(client, kh, params={"max_length": 65})
    assert r.status_code == 400 and r.json()["message"].startswith("params.max_length")
    assert submit(client, kh, params={"width": 512, "height": 512, "steps": 20}).status_code == 202
    assert text_submit(client, kh, params={"max_length": 64}).status_code == 202
    # Expired: refused, dry runs too.
    with ctx.db.write() as s:
        s.execute(update(SharedKey).values(expiry=time.time() - 1))
    for r in (submit(client, kh), submit(client, kh, dry_run=True)):
        assert r.status_code == 403 and r.json()["rc"] == "SharedKeyExpired"
    # Its owner extends it: usable again.
    r = client.patch(f"/api/v2/sharedkeys/{key['id']}", json={"expiry": 2}, headers=h)
    assert r.status_code == 200 and r.json()["expiry"]
    assert submit(client, kh, params={"steps": 10}).status_code == 202


def test_only_the_owner_changes_or_deletes_a_shared_key(client, ctx):
    owner, h = make_user(ctx, "lender", kudos=500)
    _, other = make_user(ctx, "stranger")
    key = create_key(client, h, kudos=10).json()
    url = f"/api/v2/sharedkeys/{key['id']}"
    r = client.patch(url, json={"kudos": 20}, headers=other)
    assert r.status_code == 403 and r.json()["rc"] == "Forbidden"
    assert client.delete(url, headers=other).status_code == 403
    assert client.patch(url, json={"kudos": 20}, headers=ANON).status_code == 403
    r = client.patch(url, json={}, headers=h)
    assert r.status_code == 400 and r.json()["rc"] == "NoSharedKeyModSelected"
    r = client.patch(url, json={"kudos": -1, "name": "Renamed", "max_image_steps": 30,
                                "expiry": -1}, headers=h)
    assert r.status_code == 200
    assert {k: r.json()[k] for k in ("kudos", "name", "max_image_steps")} == {
        "kudos": -1, "name": "Renamed", "max_image_steps": 30}
    assert "expiry" not in r.json()
    assert client.patch(f"/api/v2/sharedkeys/{uuid.uuid4()}", json={"kudos": 1},
                        headers=h).status_code == 401
    # Deleting it cancels what its requests have not finished; the key is then unknown.
    rid = submit(client, key_headers(key), params={"steps": 10, "n": 2}).json()["id"]
    assert client.delete(url, headers=h).json() == {"message": "OK"}
    with ctx.db.read() as s:
        states = s.execute(select(Generation.state).where(Generation.request_id == rid)).scalars()
        assert set(states) == {"cancelled"}
        assert s.execute(select(SharedKeyRequest)).first() is None
    for r in (client.get(url), submit(client, key_headers(key)), client.delete(url, headers=h)):
        assert r.status_code == 401 and r.json()["rc"] == "InvalidAPIKey"
    assert_ledger_consistent(ctx)


def test_a_worker_censored_image_costs_a_shared_key_like_any_other(client, ctx):
    """A state the worker declares never moves kudos from the horde: its censored image is
    paid by the key's owner like any other (issue 21, finding 1), and the key counts it."""
    lender, h = make_user(ctx, "lender", kudos=100)
    worker_owner, wh = make_user(ctx, "volunteer")
    key = create_key(client, h).json()
    cost = price(client, params={"steps": 10})
    assert submit(client, key_headers(key), params={"steps": 10}).status_code == 202
    before = balances(ctx)
    _, (answer,) = do_job(client, wh, state="censored")
    reward = answer.json()["reward"]
    assert reward == pytest.approx(cost - REQUEST_TAX, abs=0.01)
    after = balances(ctx)
    assert after[lender.id] == pytest.approx(before[lender.id] - cost, abs=1e-6)
    assert after[worker_owner.id] == pytest.approx(before[worker_owner.id] + reward, abs=1e-6)
    assert client.get(f"/api/v2/sharedkeys/{key['id']}").json()["utilized"] == round(cost)
    assert_ledger_consistent(ctx)


# --- horde-sdk 0.33.3, strict, against a live server ---

def test_horde_sdk_strict_clients_of_these_endpoints(sqlite_db, tmp_path):
    ctx = make_ctx(sqlite_db, tmp_path)
    owner, h = make_user(ctx, "lender", kudos=500)
    _, wh = make_user(ctx, "volunteer")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with app_server(create_app(ctx), port):
        ctx.settings.public_url = url
        local = TestClient(create_app(ctx))
        assert text_pop(local, wh, name="scribe").status_code == 200
        submit(local, params={"steps": 10})
        do_job(local, wh)
        script = Path(ROOT) / "tests" / "compat" / "horde_sdk_clients_endpoints.py"
        proc = subprocess.run(
            [horde_sdk_python(), str(script), "--apikey", h["apikey"]],
            env={**os.environ, "AI_HORDE_URL": f"{url}/api/"}, capture_output=True,
            text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"], out
    assert out["model"] == {"name": "tiny-sd15", "type": "image"}
    assert out["unknown_model"] == [] and out["news"] >= 1
    assert out["img_models_total"] == {"tiny-sd15": 1} and out["img_models_custom"] == {}
    assert out["img_totals_images"] == 1 and out["text_totals_periods"] == 5
    assert out["workers"] == {"image": ["w1"], "text": ["scribe"], "interrogation": []}
    assert out["text_worker_limits"] == [512, 2048]
    key = out["shared_key"]
    assert (key["created"]["username"], key["created"]["kudos"]) == (f"lender#{owner.id}", 50)
    assert key["modified"]["kudos"] == 60 and key["modified"]["name"] == "SDK key"
    assert key["read"] == key["modified"] and key["deleted"] == "OK"
    assert key["generate_answer"] == "ImageGenerateAsyncResponse" and key["generate_kudos"] > 0
    with ctx.db.read() as s:
        assert s.execute(select(SharedKey)).first() is None
        req = s.get(Request, key["generate_id"])
        assert (req.user_id, req.kudos) == (owner.id, key["generate_kudos"])
