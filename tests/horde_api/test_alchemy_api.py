"""Alchemy (`/v2/interrogate/*`) through the public API, on SQLite and PostgreSQL: requests,
the alchemy worker protocol (pop, upload, submit), prices per form, priority, expiry,
cancelling, and the bad input that must be refused with the field named."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from sqlalchemy import select, update

from api.alchemy.protocol import form_kudos
from api.db.models import Interrogation, InterrogationForm, User
from conftest import png_b64, serving_png, png_bytes, webp_bytes
from test_economy import assert_ledger_consistent, balances, make_user
from test_workers import WEBP, upload

pytestmark = pytest.mark.timeout(120)
IMAGE = png_b64(Image.new("RGB", (640, 512), (200, 30, 30)))
DETAILS = {c: [{"text": f"{c} one", "confidence": 21.5}] for c in
           ("tags", "sites", "artists", "flavors", "mediums", "movements", "techniques")}


def ask(client, forms, headers=None, **body):
    return client.post("/api/v2/interrogate/async", headers=headers or {},
                       json={"forms": [{"name": f} for f in forms], "source_image": IMAGE, **body})


def pop(client, headers, forms, name="alchemist", **body):
    return client.post("/api/v2/interrogate/pop", headers=headers,
                       json={"name": name, "forms": forms, "amount": 5, **body})


@pytest.fixture
def alchemist(ctx):
    return make_user(ctx, "alchemist")


def test_forms_run_by_a_worker_and_paid_per_form(client, ctx, alchemist):
    owner, h = alchemist
    requester, rh = make_user(ctx, "asker", kudos=100)
    rid = ask(client, ["caption", "nsfw", "interrogation", "RealESRGAN_x2plus"], rh).json()["id"]
    st = client.get(f"/api/v2/interrogate/status/{rid}").json()
    assert st["state"] == "waiting" and [f["form"] for f in st["forms"]] == [
        "caption", "nsfw", "interrogation", "RealESRGAN_x2plus"]
    before = balances(ctx)
    popped = pop(client, h, ["caption", "nsfw", "interrogation", "RealESRGAN_x2plus"]).json()
    by_form = {f["form"]: f for f in popped["forms"]}
    assert set(by_form) == {"caption", "nsfw", "interrogation", "RealESRGAN_x2plus"}
    # The source is the stored image, as the worker downloads it.
    src = client.get(by_form["caption"]["source_image"].split("127.0.0.1:8000", 1)[1])
    assert src.status_code == 200 and Image.open(io.BytesIO(src.content)).size == (640, 512)
    assert by_form["caption"].get("r2_upload") is None and by_form["RealESRGAN_x2plus"]["r2_upload"]
    assert client.get(f"/api/v2/interrogate/status/{rid}").json()["state"] == "processing"

    results = {"caption": {"caption": "a red square"}, "nsfw": {"nsfw": False},
               "interrogation": {"interrogation": DETAILS}}
    rewards = {}
    for name, result in results.items():
        r = client.post("/api/v2/interrogate/submit", headers=h,
                        json={"id": by_form[name]["id"], "result": result, "state": "ok"})
        assert r.status_code == 200, r.text
        rewards[name] = r.json()["reward"]
    upscaled = webp_bytes(1280, 1024)  # the 640x512 source, twice the size
    assert upload(client, by_form["RealESRGAN_x2plus"]["r2_upload"], WEBP).status_code == 200
    wrong = client.post("/api/v2/interrogate/submit", headers=h,
                        json={"id": by_form["RealESRGAN_x2plus"]["id"], "result": "R2"})
    assert wrong.status_code == 400 and wrong.json()["message"].startswith("result"), wrong.text
    assert upload(client, by_form["RealESRGAN_x2plus"]["r2_upload"], upscaled).status_code == 200
    r = client.post("/api/v2/interrogate/submit", headers=h,
                    json={"id": by_form["RealESRGAN_x2plus"]["id"], "result": "R2", "state": "ok"})
    rewards["RealESRGAN_x2plus"] = r.json()["reward"]
    # 1 per form, 3 for interrogation, 3 per 512x512 tile (640x512 is two tiles).
    assert rewards == {"caption": 1.0, "nsfw": 1.0, "interrogation": 3.0, "RealESRGAN_x2plus": 6.0}
    after = balances(ctx)
    assert after[owner.id] - before[owner.id] == pytest.approx(11.0)
    assert before[requester.id] - after[requester.id] == pytest.approx(11.0)
    assert_ledger_consistent(ctx)

    st = client.get(f"/api/v2/interrogate/status/{rid}").json()
    assert st["state"] == "done"
    got = {f["form"]: f["result"] for f in st["forms"]}
    assert got["caption"] == {"caption": "a red square"} and got["nsfw"] == {"nsfw": False}
    assert got["interrogation"] == {"interrogation": DETAILS}
    url = got["RealESRGAN_x2plus"]["RealESRGAN_x2plus"]
    assert client.get(url.split("127.0.0.1:8000", 1)[1]).content == upscaled
    # Submitting twice is refused and pays nothing more.
    again = client.post("/api/v2/interrogate/submit", headers=h,
                        json={"id": by_form["caption"]["id"], "result": {"caption": "x"}})
    assert again.status_code == 400 and again.json()["rc"] == "DuplicateGen"
    worker = client.get("/api/v2/workers?type=interrogation").json()
    mine = [w for w in worker if w["name"] == "alchemist"]
    assert mine and mine[0]["type"] == "interrogation" and mine[0]["requests_fulfilled"] == 4


def test_results_are_checked_against_the_form(client, ctx, alchemist):
    _, h = alchemist
    ask(client, ["caption", "nsfw", "interrogation", "GFPGAN"])
    forms = {f["form"]: f["id"] for f in pop(client, h, ["caption", "nsfw", "interrogation", "GFPGAN"]).json()["forms"]}
    bad = [
        ("caption", {"caption": 5}, "result.caption"),
        ("caption", "a string", "result"),
        ("caption", {"caption": "x" * 6000}, "result.caption"),
        ("nsfw", {"nsfw": "yes"}, "result.nsfw"),
        ("nsfw", {"caption": "x"}, "result"),
        ("interrogation", {"interrogation": {"tags": []}}, "result.interrogation"),
        ("interrogation", {"interrogation": {**DETAILS, "tags": [{"text": "t", "confidence": "high"}]}},
         "result.interrogation.tags.0.confidence"),
        ("GFPGAN", "R2", "result"),  # nothing uploaded
        ("GFPGAN", "not base64!", "result"),
    ]
    for name, result, field in bad:
        r = client.post("/api/v2/interrogate/submit", headers=h,
                        json={"id": forms[name], "result": result})
        assert r.status_code == 400 and r.json()["message"].startswith(field), (name, r.text)
    # Nothing was recorded: the forms are still held and can be submitted properly.
    r = client.post("/api/v2/interrogate/submit", headers=h,
                    json={"id": forms["GFPGAN"], "result": base64.b64encode(WEBP).decode()})
    assert r.status_code == 400 and "640x512" in r.json()["message"], r.text  # not the source's size
    r = client.post("/api/v2/interrogate/submit", headers=h, json={
        "id": forms["GFPGAN"], "result": base64.b64encode(webp_bytes(640, 512)).decode()})
    assert r.status_code == 200 and r.json()["reward"] == 6.0  # two 512x512 tiles


def test_bad_requests_name_the_field(client, ctx):
    cases = [
        ({"forms": [{"name": "sharpen"}], "source_image": IMAGE}, "forms.0.name"),
        ({"forms": [], "source_image": IMAGE}, "forms"),
        ({"forms": [{"name": "caption"}, {"name": "caption"}], "source_image": IMAGE}, "forms"),
        ({"forms": [{"name": "caption", "payload": {"evil": "x"}}], "source_image": IMAGE},
         "forms.0.payload.evil"),
        ({"forms": [{"name": "caption"}], "source_image": "bm90IGFuIGltYWdl"}, "source_image"),
        ({"forms": [{"name": "caption"}]}, "source_image"),
        ({"forms": [{"name": "caption"}], "source_image": IMAGE, "webhook": "http://x"}, "webhook"),
    ]
    for body, field in cases:
        r = client.post("/api/v2/interrogate/async", json=body)
        assert r.status_code == 400 and field in r.json()["message"], (body, r.text)
    huge = png_b64(Image.new("RGB", (4096, 4097)))
    r = ask(client, ["caption"], source_image=huge)
    assert r.status_code == 400 and "source_image" in r.json()["message"]
    with ctx.db.read() as s:
        assert s.execute(select(Interrogation)).first() is None


def test_a_form_no_worker_runs_is_refused(db, tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from conftest import make_ctx

    ctx = make_ctx(db, tmp_path, postprocessor_weights="catalog", alchemy_weights="catalog")
    ctx.catalog = ctx.catalog.model_copy(update={"postprocessors": [], "alchemy": []})
    with TestClient(create_app(ctx)) as client:
        r = ask(client, ["caption", "GFPGAN"])
        assert r.status_code == 400 and r.json()["rc"] == "UnsupportedForm"
        assert r.json()["message"].startswith("forms[0].name")
        # Once an alchemist offers the form, it is accepted.
        _, h = make_user(ctx, "alchemist")
        assert pop(client, h, ["caption"]).json() == {"forms": [], "skipped": {}}
        assert ask(client, ["caption"]).status_code == 202


def test_source_by_url_and_loopback_refused(client, db, tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from conftest import make_ctx

    with serving_png(png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))) as url:
        refused = ask(client, ["nsfw"], source_image=url)  # the default refuses loopback
        assert refused.status_code == 400 and "source_image" in refused.json()["message"]
        ctx = make_ctx(db, tmp_path, allow_private_source_urls=True)
        with TestClient(create_app(ctx)) as open_client:
            rid = ask(open_client, ["nsfw"], source_image=url).json()["id"]
            _, h = make_user(ctx, "alchemist")
            form = pop(open_client, h, ["nsfw"]).json()["forms"][0]
            got = open_client.get(form["source_image"].split("127.0.0.1:8000", 1)[1]).content
            assert Image.open(io.BytesIO(got)).getpixel((0, 0)) == (1, 2, 3)
            assert open_client.get(f"/api/v2/interrogate/status/{rid}").json()["state"] == "processing"


def test_pop_takes_only_what_the_worker_offers_and_fits(client, ctx, alchemist):
    _, h = alchemist
    big = png_b64(Image.new("RGB", (2048, 2048)))
    ask(client, ["RealESRGAN_x4plus"], source_image=big)  # 16 tiles
    ask(client, ["caption"], trusted_workers=True)
    assert pop(client, h, ["nsfw"]).json() == {"forms": [], "skipped": {}}
    assert pop(client, h, ["RealESRGAN_x4plus"], max_tiles=8).json()["forms"] == []
    assert pop(client, h, ["caption"]).json() == {"forms": [], "skipped": {"untrusted": 1}}
    got = pop(client, h, ["RealESRGAN_x4plus"], max_tiles=16).json()["forms"]
    assert [f["form"] for f in got] == ["RealESRGAN_x4plus"]


def test_priority_and_cancel(client, ctx, alchemist):
    _, h = alchemist
    _, rich = make_user(ctx, "rich", kudos=100000)
    first = ask(client, ["caption"]).json()["id"]  # anonymous, first
    second = ask(client, ["caption"], rich).json()["id"]
    with ctx.db.read() as s:
        by_rid = dict(s.execute(select(InterrogationForm.interrogation_id, InterrogationForm.id)).all())
    got = pop(client, h, ["caption"], amount=1).json()["forms"]
    assert got[0]["id"] == by_rid[second]  # kudos buy priority
    st = client.delete(f"/api/v2/interrogate/status/{first}").json()
    assert st["state"] == "cancelled" and st["forms"][0]["state"] == "cancelled"
    assert pop(client, h, ["caption"]).json()["forms"] == []
    r = client.post("/api/v2/interrogate/submit", headers=h,
                    json={"id": got[0]["id"], "result": {"caption": "ok"}})
    assert r.status_code == 200
    assert client.get("/api/v2/interrogate/status/nope").status_code == 404


def test_a_form_fails_only_when_distinct_owners_fail_it(client, ctx, alchemist):
    """An expiry or a fault (or a csam flag) sends a form to another owner's worker, never
    back to one of the same owner's; max_attempts distinct owners end it as faulted."""
    from api.alchemy import forms

    _, h = alchemist
    requester, rh = make_user(ctx, "asker", kudos=100)
    before = balances(ctx)[requester.id]
    rid = ask(client, ["nsfw"], rh).json()["id"]
    owners = [h] + [make_user(ctx, f"alchemist{i}")[1] for i in range(2)]
    for attempt, headers in enumerate(owners):
        form = pop(client, headers, ["nsfw"], name=f"a{attempt}").json()["forms"][0]
        if attempt == 0:  # an expired claim goes back and the late submit is refused
            with ctx.db.write() as s:
                s.execute(update(InterrogationForm).values(deadline=0))
            assert forms.expire(ctx.db, ctx.settings.max_attempts) == 1
            late = client.post("/api/v2/interrogate/submit", headers=h,
                               json={"id": form["id"], "result": {"nsfw": True}})
            assert late.status_code == 400 and late.json()["rc"] == "RequestExpired"
        else:
            r = client.post("/api/v2/interrogate/submit", headers=headers, json={
                "id": form["id"], "result": {}, "state": "faulted" if attempt == 1 else "csam"})
            assert r.json() == {"reward": 0.0}
        # Neither this worker nor another of its owner's gets it back.
        assert pop(client, headers, ["nsfw"], name=f"a{attempt}").json()["forms"] == []
        assert pop(client, headers, ["nsfw"], name=f"b{attempt}").json()["forms"] == []
        st = client.get(f"/api/v2/interrogate/status/{rid}").json()
        assert (st["state"] == "faulted") == (attempt == 2), st
    assert st["forms"][0]["state"] == "faulted"
    assert balances(ctx)[requester.id] == pytest.approx(before)  # nothing was charged
    assert_ledger_consistent(ctx)


def test_others_cannot_submit_and_anonymous_cannot_pop(client, ctx, alchemist):
    _, h = alchemist
    _, other = make_user(ctx, "other")
    ask(client, ["caption"])
    form = pop(client, h, ["caption"]).json()["forms"][0]
    r = client.post("/api/v2/interrogate/submit", headers=other,
                    json={"id": form["id"], "result": {"caption": "mine"}})
    assert r.status_code == 400 and r.json()["rc"] == "RequestExpired"
    assert client.post("/api/v2/interrogate/pop", json={"name": "x", "forms": ["caption"]}).status_code == 403


def test_ended_interrogations_lose_their_source(client, ctx, alchemist):
    from api.alchemy import forms

    _, h = alchemist
    rid = ask(client, ["caption"]).json()["id"]
    with ctx.db.read() as s:
        key = s.get(Interrogation, rid).source_image_key
    assert ctx.storage.exists(key)
    assert forms.delete_ended_sources(ctx.db, ctx.storage) == 0  # still to run
    form = pop(client, h, ["caption"]).json()["forms"][0]
    client.post("/api/v2/interrogate/submit", headers=h, json={"id": form["id"], "result": {"caption": "c"}})
    assert forms.delete_ended_sources(ctx.db, ctx.storage) == 1
    assert not ctx.storage.exists(key)
    with ctx.db.read() as s:
        assert s.get(Interrogation, rid).source_image_key is None


def test_waiting_forms_are_capped_per_user(db, tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from conftest import make_ctx

    ctx = make_ctx(db, tmp_path, max_waiting_per_user=3)
    with TestClient(create_app(ctx)) as client:
        _, h = make_user(ctx, "busy")
        assert ask(client, ["caption", "nsfw"], h).status_code == 202
        r = ask(client, ["caption", "nsfw"], h)
        assert r.status_code == 429 and r.json()["rc"] == "TooManyPrompts"
        with ctx.db.read() as s:
            assert len(s.execute(select(InterrogationForm)).all()) == 2
            assert s.execute(select(User.kudos).where(User.username == "busy")).scalar_one() == 0


def test_prices():
    assert form_kudos("caption", 4096, 4096) == 1.0
    assert form_kudos("interrogation", 64, 64) == 3.0
    assert form_kudos("strip_background", 512, 512) == 3.0
    assert form_kudos("RealESRGAN_x4plus", 513, 512) == 6.0
