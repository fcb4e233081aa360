"""Models beyond the cluster's own (api/known_models.py), on SQLite and PostgreSQL: a request
for a model of the AI Horde's model reference that nobody serves is accepted with a
`NoAvailableWorker` warning, waits for an HTTP volunteer offering it, and expires when no
worker takes it in time; unknown names are refused unless a customizer's worker offers them;
workers may offer only served or known models (the rest is ignored)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api import known_models
from api.app import create_app
from api.db import queue
from api.db.models import Generation, QueueEntry, Request
from conftest import make_ctx
from test_economy import make_user, submit
from test_text_api import text_pop, text_submit
from test_workers import do_job, pop

pytestmark = pytest.mark.timeout(120)
# Models of the pinned reference (models/reference/data) that the tests' cluster does not serve.
SD15_KNOWN = "Deliberate"  # baseline stable diffusion 1
SDXL_KNOWN = "AlbedoBase XL (SDXL)"
SD2_KNOWN = "stable_diffusion_2.1"  # stable diffusion 2: no deployment here
FLUX_KNOWN = "Flux.1-Schnell fp8 (Compact)"
CASCADE_KNOWN = "Stable Cascade 1.0"  # requirements: 20 to 30 steps
INPAINTING_KNOWN = "stable_diffusion_inpainting"
TEXT_KNOWN = "koboldcpp/Marx-3B-V3"


def warning_codes(answer) -> list[str]:
    return [w["code"] for w in answer.json().get("warnings") or []]


def check(client, rid, kind="image"):
    path = "generate/text/status" if kind == "text" else "generate/check"
    r = client.get(f"/api/v2/{path}/{rid}")
    assert r.status_code == 200, r.text
    return r.json()


def dry_run_price(client, model: str) -> float:
    r = submit(client, models=[model], dry_run=True, params={"width": 512, "height": 512, "steps": 20})
    assert r.status_code == 200, r.text
    return r.json()["kudos"]


def test_a_known_model_nobody_serves_waits_for_a_volunteer(client, ctx):
    r = submit(client, models=[SD15_KNOWN], params={"n": 2})
    assert r.status_code == 202, r.text
    assert warning_codes(r) == ["NoAvailableWorker"]
    message = r.json()["warnings"][0]["message"]
    assert SD15_KNOWN in message and "20 minutes" in message
    rid = r.json()["id"]
    state = check(client, rid)
    assert (state["waiting"], state["is_possible"], state["faulted"]) == (2, False, False)
    # The cluster's own deployments claim their models only (and '*' for requests naming none).
    own = queue.Capabilities(worker_id="cluster-sd15", models=["tiny-sd15", "tiny-sd15-inpainting"])
    assert queue.claim(ctx.db, own, 5) == []
    # A volunteer offering the model makes it possible, and gets the jobs.
    _, h = make_user(ctx, "volunteer")
    empty = pop(client, h, models=["tiny-sdxl", SD15_KNOWN], amount=1)
    assert empty.status_code == 200
    job = empty.json()
    assert job["model"] == SD15_KNOWN and len(job["ids"]) == 1
    assert check(client, rid)["is_possible"] is True
    again = submit(client, models=[SD15_KNOWN])
    assert again.status_code == 202 and warning_codes(again) == []


def test_known_models_follow_their_baselines_rules(client, ctx):
    assert dry_run_price(client, SD15_KNOWN) == dry_run_price(client, "tiny-sd15")
    assert dry_run_price(client, SDXL_KNOWN) == dry_run_price(client, "tiny-sdxl")
    assert dry_run_price(client, CASCADE_KNOWN) == dry_run_price(client, "tiny-cascade")
    # No deployment here for SD 2 or Flux: SD 2 follows SD 1.5's rules, Flux SDXL's.
    assert dry_run_price(client, SD2_KNOWN) == dry_run_price(client, "tiny-sd15")
    assert dry_run_price(client, FLUX_KNOWN) == dry_run_price(client, "tiny-sdxl")
    assert dry_run_price(client, SDXL_KNOWN) > dry_run_price(client, SD15_KNOWN)
    mixed = submit(client, models=[SD15_KNOWN, SDXL_KNOWN])
    assert mixed.status_code == 400 and mixed.json()["rc"] == "MixedModelFamilies"
    assert submit(client, models=[SD15_KNOWN, "tiny-sd15"]).status_code == 202
    # The reference's requirements and inpainting flag apply to the models it knows.
    few = submit(client, models=[CASCADE_KNOWN], params={"steps": 10})
    assert few.status_code == 202 and "StepsTooFew" in warning_codes(few)
    txt2img = submit(client, models=[INPAINTING_KNOWN])
    assert txt2img.status_code == 400 and txt2img.json()["rc"] == "InpaintingModelMismatch"
    text_model = submit(client, models=[TEXT_KNOWN])
    assert text_model.status_code == 400 and "text model" in text_model.json()["message"]


def test_unknown_names_are_refused_unless_a_customizers_worker_offers_them(client, ctx):
    refused = submit(client, models=["my-own-finetune"])
    assert refused.status_code == 400 and refused.json()["rc"] == "UnknownModel"
    assert "models" in refused.json()["message"]
    dry = submit(client, models=["my-own-finetune"], dry_run=True)
    assert dry.status_code == 400 and dry.json()["rc"] == "UnknownModel"
    # A plain user's worker may not offer it: ignored, and the pop says so.
    _, plain = make_user(ctx, "plain")
    answer = pop(client, plain, name="plain-w", models=["my-own-finetune", "tiny-sd15"]).json()
    assert "my-own-finetune" in answer["messages"][0]["message"]
    assert submit(client, models=["my-own-finetune"]).status_code == 400
    workers = {w["name"]: w for w in client.get("/api/v2/workers").json()}
    assert workers["plain-w"]["models"] == ["tiny-sd15"]
    # A customizer's worker may, and the request then runs on it.
    _, custom = make_user(ctx, "custom", customizer=True)
    assert not pop(client, custom, name="custom-w", models=["my-own-finetune"]).json().get("messages")
    accepted = submit(client, models=["my-own-finetune"])
    assert accepted.status_code == 202 and warning_codes(accepted) == []
    job, answers = do_job(client, custom, name="custom-w", models=["my-own-finetune"])
    assert job["model"] == "my-own-finetune" and [a.status_code for a in answers] == [200]
    done = client.get(f"/api/v2/generate/status/{accepted.json()['id']}").json()
    assert done["done"] and done["generations"][0]["model"] == "my-own-finetune"


def test_workers_may_offer_known_models_of_their_kind_only(client, ctx):
    _, h = make_user(ctx, "offerer")
    answer = pop(client, h, name="img", models=[SDXL_KNOWN, TEXT_KNOWN, "nonsense"]).json()
    ignored = answer["messages"][0]["message"]
    assert TEXT_KNOWN in ignored and "nonsense" in ignored and SDXL_KNOWN not in ignored
    workers = {w["name"]: w for w in client.get("/api/v2/workers").json()}
    assert workers["img"]["models"] == [SDXL_KNOWN]
    text = text_pop(client, h, name="txt", models=[TEXT_KNOWN, SD15_KNOWN]).json()
    assert SD15_KNOWN in text["messages"][0]["message"]


def _generation_ids(ctx, rid: str) -> list[str]:
    with ctx.db.read() as s:
        return list(s.execute(select(Generation.id).where(Generation.request_id == rid)).scalars())


def _age(ctx, rid: str, seconds: float) -> None:
    """Move a request `seconds` into the past, as if it had been waiting that long."""
    gen_ids = _generation_ids(ctx, rid)
    with ctx.db.write() as s:
        s.execute(update(Request).where(Request.id == rid)
                  .values(created_at=Request.created_at - seconds))
        s.execute(update(QueueEntry).where(QueueEntry.generation_id.in_(gen_ids))
                  .values(sort_key=QueueEntry.sort_key - seconds))


def test_a_request_no_worker_takes_expires(client, ctx):
    first = submit(client, models=[SD15_KNOWN], params={"n": 2}).json()["id"]
    second = submit(client, models=[SD15_KNOWN], params={"n": 2}).json()["id"]
    served = submit(client, models=["tiny-sd15"]).json()["id"]
    for rid in (first, second, served):
        _age(ctx, rid, 1000)
    _, h = make_user(ctx, "late")
    # A worker takes one job now: its request stays alive for 20 minutes from now.
    job = pop(client, h, models=[SD15_KNOWN], amount=1).json()
    assert len(job["ids"]) == 1
    kept, other = (first, second) if job["ids"][0] in _generation_ids(ctx, first) else (second, first)
    now = time.time()
    assert known_models.expire_unclaimed(ctx, now=now + 100) == 0  # 1100 s old: not yet
    # 1300 s after submit, 300 s after the claim: `other` and `served` waited too long.
    assert known_models.expire_unclaimed(ctx, now=now + 300) == 3
    gone = check(client, other)
    assert (gone["faulted"], gone["is_possible"], gone["waiting"], gone["done"]) == (True, False, 0, False)
    assert check(client, served)["faulted"] is True
    alive = check(client, kept)
    assert (alive["faulted"], alive["waiting"], alive["processing"]) == (False, 1, 1)
    # The expired ones left the queue: a worker gets only the live request's job.
    again = pop(client, h, name="w2", models=[SD15_KNOWN, "tiny-sd15"], amount=5).json()
    assert again["ids"] and set(again["ids"]) <= set(_generation_ids(ctx, kept))
    assert known_models.expire_unclaimed(ctx, now=now + 300) == 0  # nothing left to end


def test_the_api_sweeps_unclaimed_requests_by_itself(db, tmp_path):
    ctx = make_ctx(db, tmp_path, unclaimed_expiry_seconds=0.5, expire_every_seconds=0.1)
    with TestClient(create_app(ctx)) as client:
        rid = submit(client, models=[SD15_KNOWN]).json()["id"]
        deadline = time.monotonic() + 30
        while not (state := check(client, rid))["faulted"]:
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        assert state["is_possible"] is False and state["waiting"] == 0


def test_a_known_text_model_waits_for_a_text_volunteer(client, ctx):
    r = text_submit(client, models=[TEXT_KNOWN])
    assert r.status_code == 202, r.text
    assert "NoAvailableWorker" in warning_codes(r)
    rid = r.json()["id"]
    assert check(client, rid, "text")["is_possible"] is False
    assert text_submit(client, models=["koboldcpp/no-such-model"]).status_code == 400
    image_model = text_submit(client, models=[SD15_KNOWN])
    assert image_model.status_code == 400 and "image model" in image_model.json()["message"]
    # The OpenAI-compatible API runs on the cluster's own text models only.
    openai = client.post("/v1/completions", json={"model": TEXT_KNOWN, "prompt": "x"})
    assert openai.status_code == 400 and TEXT_KNOWN in openai.json()["error"]["message"]
    _, h = make_user(ctx, "scribe-owner")
    job = text_pop(client, h, models=[TEXT_KNOWN]).json()
    assert job["model"] == TEXT_KNOWN and job["ids"]
    answer = client.post("/api/v2/generate/text/submit", headers=h,
                         json={"id": job["ids"][0], "generation": "once upon", "state": "ok"})
    assert answer.status_code == 200
    status = check(client, rid, "text")
    assert status["done"] and status["generations"][0]["text"] == "once upon"
    assert known_models.expire_unclaimed(ctx, now=time.time() + 3600) == 0  # nothing waits
