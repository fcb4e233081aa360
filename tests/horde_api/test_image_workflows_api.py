"""Image workflows at the API, on SQLite and PostgreSQL: the AI Horde's rules (each refusal a
400 naming the field), prices, source images stored once with the request, and what the
worker protocol hands out (pop payloads with source URLs, allow_* filters, skipped counts)."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from sqlalchemy import func, select

from api.db.models import Request
from api.kudos import image_cost
from conftest import make_ctx, serving_png
from conftest import png_b64 as b64
from conftest import png_bytes as png
from models.catalog import Family
from test_economy import make_user, submit
from test_workers import pop

pytestmark = pytest.mark.timeout(120)


SOURCE = Image.new("RGB", (96, 64), (200, 30, 30))
PADDED = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
PADDED.paste(Image.new("RGBA", (32, 32), (10, 200, 10, 255)), (16, 16))
MASK = Image.new("L", (96, 64), 0)


def stored_objects(ctx) -> list[str]:
    root = ctx.storage.root / "sources"
    return sorted(str(p.relative_to(ctx.storage.root)) for p in root.rglob("*.png")) if root.exists() else []


@pytest.mark.parametrize("body, field, rc", [
    ({"source_mask": b64(MASK)}, "source_mask", "SourceMaskUnnecessary"),
    ({"source_image": b64(SOURCE), "source_processing": "inpainting"}, "source_mask",
     "InpaintingMissingMask"),
    ({"source_processing": "outpainting"}, "source_processing", "MissingSourceImage"),
    ({"source_image": b64(SOURCE), "source_processing": "remix"}, "source_processing", "InvalidRemix"),
    ({"source_image": b64(SOURCE), "models": ["tiny-cascade"]}, "source_processing",
     "InvalidSourceProcessing"),
    ({"models": ["tiny-sd15-inpainting"]}, "models", "InpaintingModelMismatch"),
    ({"params": {"transparent": True}, "models": ["tiny-cascade"]}, "params.transparent",
     "InvalidTransparency"),
    ({"params": {"transparent": True}, "models": []}, "params.transparent", "InvalidTransparency"),
    ({"params": {"transparent": True}, "source_image": b64(SOURCE)}, "params.transparent",
     "InvalidTransparency"),
    ({"params": {"loras": [{"name": "no-such-lora"}]}}, "params.loras[0]", "UnknownAdapter"),
    ({"params": {"loras": [{"name": "tiny-lora-xl"}]}}, "params.loras[0]", "UnknownAdapter"),
    ({"params": {"tis": [{"name": "tiny-ti", "inject_ti": "sideways"}]}}, "params.tis", "BadRequest"),
    ({"params": {"loras": [{"name": "tiny-lora", "model": 6}]}}, "params.loras", "BadRequest"),
    ({"params": {"loras": [{"name": "x"}] * 6}}, "params.loras", "BadRequest"),
    ({"params": {"loras": [{"name": "tiny-lora"}]}, "models": ["tiny-cascade"]}, "params.loras",
     "InvalidLoRA"),
    ({"source_image": "data:image/gif;base64,R0lGODlhAQABAAAAACw="}, "source_image",
     "SourceImageUnsupported"),
])
def test_workflow_rules_are_400s_naming_the_field(client, ctx, body, field, rc):
    r = submit(client, **body)
    assert r.status_code == 400, r.text
    assert r.json()["rc"] == rc and field in r.json()["message"], r.json()
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Request)) == 0
    assert stored_objects(ctx) == []  # a refused request leaves no source behind


def test_prices_follow_the_horde_rules(client):
    def price(**body) -> float:
        r = submit(client, dry_run=True, **body)
        assert r.status_code == 200, r.text
        return r.json()["kudos"]

    sd1 = Family.stable_diffusion_1
    plain = dict(width=512, height=512, steps=30, n=1, family=sd1)
    assert price() == image_cost(**plain)
    assert price(source_image=b64(SOURCE)) == image_cost(**plain, source_image=True)
    assert price(params={"loras": [{"name": "tiny-lora"}, {"name": "tiny-lora-2"}],
                         "tis": [{"name": "tiny-ti"}]}) == image_cost(**plain, loras=2, tis=True)
    # The hires fix pays for its first pass too (native size, the request's steps).
    hires = dict(plain, width=1024, height=768)
    first = dict(plain, width=640, height=512)  # 1024x768 at shorter side 512, floored to 64
    assert price(params={"hires_fix": True, "width": 1024, "height": 768}) == round(
        image_cost(**hires) + image_cost(**first) - 1, 2)
    # Where it does not run (within the native size), it costs nothing.
    assert price(params={"hires_fix": True}) == price()


def test_sources_are_stored_once_and_handed_to_workers_as_urls(client, ctx):
    _, h = make_user(ctx, "painter")
    r = submit(client, source_image=b64(SOURCE), source_processing="inpainting",
               source_mask=b64(MASK), params={"denoising_strength": 0.6, "n": 2})
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    with ctx.db.read() as s:
        req = s.get(Request, rid)
        assert stored_objects(ctx) == [req.source_image_key, req.source_mask_key]
    assert rid not in req.source_image_key  # workers download it: it must not name the request
    # A worker that does not paint is told why it got nothing.
    body = pop(client, h, allow_painting=False).json()
    assert body["ids"] == [] and body["skipped"] == {"painting": 2}
    job = pop(client, h, allow_painting=True, amount=2).json()
    assert len(job["ids"]) == 2 and job["source_processing"] == "inpainting"
    assert job["payload"]["denoising_strength"] == 0.6
    for url, original in ((job["source_image"], SOURCE), (job["source_mask"], MASK)):
        got = client.get(url.split("127.0.0.1:8000", 1)[1])
        assert got.status_code == 200
        image = Image.open(io.BytesIO(got.content))
        assert image.format == "PNG"
        assert image.convert(original.mode).tobytes() == original.tobytes()  # lossless


def test_img2img_and_lora_need_their_allow_flags(client, ctx):
    _, h = make_user(ctx, "volunteer")
    assert submit(client, source_image=b64(SOURCE)).status_code == 202
    assert submit(client, params={"loras": [{"name": "tiny-lora", "inject_trigger": "any"}]}
                  ).status_code == 202
    body = pop(client, h, allow_img2img=False, allow_lora=False).json()
    assert body["skipped"] == {"img2img": 1, "lora": 1}
    lora_job = pop(client, h, allow_img2img=False, allow_lora=True).json()
    assert lora_job["payload"]["loras"] == [
        {"name": "tiny-lora", "model": 1.0, "clip": 1.0, "inject_trigger": "any", "is_version": False}]
    img_job = pop(client, h, allow_img2img=True).json()
    assert img_job["source_processing"] == "img2img" and img_job["source_image"]
    assert img_job.get("source_mask") is None


def test_inpainting_models_get_only_painting_jobs(client, ctx):
    _, h = make_user(ctx, "inpainter")
    assert submit(client, models=[]).status_code == 202  # any model: not an inpainting one
    body = pop(client, h, models=["tiny-sd15-inpainting"], allow_painting=True).json()
    assert body["ids"] == [] and body["skipped"] == {"models": 1}
    r = submit(client, models=["tiny-sd15-inpainting"], source_image=b64(PADDED),
               source_processing="outpainting")  # the mask is the source's transparency
    assert r.status_code == 202, r.text
    job = pop(client, h, models=["tiny-sd15-inpainting"], allow_painting=True).json()
    assert job["model"] == "tiny-sd15-inpainting" and job["source_processing"] == "outpainting"
    assert job.get("source_mask") is None


@pytest.fixture
def image_server():
    with serving_png(png(SOURCE)) as url:
        yield url


def test_url_sources_are_fetched_but_never_from_private_addresses(db, tmp_path, image_server):
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(make_ctx(db, tmp_path))) as client:
        r = submit(client, source_image=image_server)
        assert r.status_code == 400 and r.json()["rc"] == "SourceUrlRefused"
        assert "source_image" in r.json()["message"]
    ctx = make_ctx(db, tmp_path, allow_private_source_urls=True)
    with TestClient(create_app(ctx)) as client:
        r = submit(client, source_image=image_server)
        assert r.status_code == 202, r.text
        with ctx.db.read() as s:
            stored = ctx.storage.get(s.get(Request, r.json()["id"]).source_image_key)
        assert Image.open(io.BytesIO(stored)).tobytes() == SOURCE.tobytes()


@pytest.mark.parametrize("body, field, rc", [
    ({"params": {"control_type": "canny"}}, "source_image", "ControlNetSourceMissing"),
    ({"params": {"control_type": "canny"}, "source_image": b64(PADDED), "source_processing": "inpainting"},
     "source_processing", "ControlNetInpaintingMismatch"),
    ({"params": {"control_type": "canny", "transparent": True}, "source_image": b64(SOURCE)},
     "params.transparent", "InvalidTransparency"),
    ({"params": {"control_type": "sketchy"}, "source_image": b64(SOURCE)}, "params.control_type", "BadRequest"),
    ({"params": {"control_type": "canny", "control_strength": 9}, "source_image": b64(SOURCE)},
     "params.control_strength", "BadRequest"),
    ({"extra_source_images": [{"image": b64(SOURCE)}], "source_image": b64(SOURCE)},
     "extra_source_images", "InvalidExtraSourceImages"),
    ({"extra_source_images": [{"image": b64(SOURCE), "strength": 6}], "source_image": b64(SOURCE),
      "source_processing": "remix", "models": ["tiny-cascade"]}, "extra_source_images", "BadRequest"),
    ({"extra_source_images": [{"image": b64(SOURCE)}] * 6, "source_image": b64(SOURCE),
      "source_processing": "remix", "models": ["tiny-cascade"]}, "extra_source_images", "BadRequest"),
    ({"extra_source_images": [{"image": b64(SOURCE)}] * 2, "source_image": b64(SOURCE),
      "source_processing": "remix", "models": ["tiny-cascade"]}, "extra_source_images",
     "InvalidExtraSourceImages"),  # more than one extra image: trusted users only
    ({"source_processing": "remix", "models": ["tiny-cascade"]}, "source_processing", "MissingSourceImage"),
])
def test_controlnet_and_remix_rules(client, ctx, body, field, rc):
    r = submit(client, **body)
    assert r.status_code in (400, 403), r.text
    assert r.json()["rc"] == rc and field in r.json()["message"], r.json()
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Request)) == 0
    assert stored_objects(ctx) == []


def test_controlnet_and_remix_prices_pop_payloads_and_filters(client, ctx):
    from api.images import EXTRA_SOURCE_TAX

    _, h = make_user(ctx, "graph-runner")
    _, trusted_h = make_user(ctx, "trusted", trusted=True)
    sd1, cascade = Family.stable_diffusion_1, Family.stable_cascade
    cn = {"params": {"control_type": "hed", "control_strength": 0.7, "return_control_map": True},
          "source_image": b64(SOURCE)}
    price = submit(client, dry_run=True, **cn).json()["kudos"]
    assert price == image_cost(width=512, height=512, steps=30, n=1, family=sd1, controlnet=True,
                               source_image=True)
    remix = {"source_image": b64(SOURCE), "source_processing": "remix", "models": ["tiny-cascade"],
             "extra_source_images": [{"image": b64(PADDED), "strength": 2.5}, {"image": b64(MASK)}]}
    assert submit(client, trusted_h, dry_run=True, **remix).json()["kudos"] == round(
        image_cost(width=512, height=512, steps=30, n=1, family=cascade, source_image=True)
        + 2 * EXTRA_SOURCE_TAX, 2)
    assert submit(client, **cn).status_code == 202
    r = submit(client, trusted_h, **remix)
    assert r.status_code == 202, r.text
    assert len(stored_objects(ctx)) == 4  # the ControlNet source; the remix source and 2 extras
    # Workers that do not run ControlNet are told so; the TTL doubles for ControlNet.
    body = pop(client, h, allow_controlnet=False).json()
    assert body["skipped"] == {"controlnet": 1, "models": 1}  # and the remix is for Cascade
    job = pop(client, h, allow_controlnet=True).json()
    p = job["payload"]
    assert (p["control_type"], p["control_strength"], p["return_control_map"]) == ("hed", 0.7, True)
    assert job["ttl"] == 2 * 150
    rjob = pop(client, h, models=["tiny-cascade"]).json()
    assert rjob["source_processing"] == "remix"
    extras = rjob["extra_source_images"]
    assert [e["strength"] for e in extras] == [2.5, 1.0]
    got = client.get(extras[0]["image"].split("127.0.0.1:8000", 1)[1])
    assert Image.open(io.BytesIO(got.content)).convert("RGBA").tobytes() == PADDED.tobytes()


QR = [{"reference": "qr_code", "text": "https://aihorde.net"}]


@pytest.mark.parametrize("body, field, rc", [
    ({"params": {"workflow": "qr_code"}}, "params.extra_texts", "MissingExtraTexts"),
    ({"params": {"extra_texts": QR}}, "params.extra_texts", "InvalidExtraTexts"),
    ({"params": {"workflow": "qr_code", "extra_texts": [{"reference": "protocol", "text": "https"}]}},
     "extra_texts", "InvalidExtraTexts"),  # no qr_code reference
    ({"params": {"workflow": "qr_code", "extra_texts": QR + [{"reference": "colour", "text": "red"}]}},
     "extra_texts", "InvalidExtraTexts"),
    ({"params": {"workflow": "qr_code", "width": 256, "height": 256,
                 "extra_texts": [{"reference": "qr_code", "text": "x" * 400}]}},
     "extra_texts", "InvalidExtraTexts"),  # too large for the image: refused, not replaced
    ({"params": {"workflow": "qr_code", "extra_texts": QR}, "models": ["tiny-cascade"]},
     "params.workflow", "InvalidWorkflow"),
    ({"params": {"workflow": "qr_code", "extra_texts": QR}, "source_image": b64(SOURCE)},
     "source_image", "InvalidWorkflow"),
    ({"params": {"workflow": "spiral"}}, "params.workflow", "BadRequest"),
])
def test_qr_code_rules(client, ctx, body, field, rc):
    r = submit(client, **body)
    assert r.status_code == 400, r.text
    assert r.json()["rc"] == rc and field in r.json()["message"], r.json()


def test_qr_code_price_and_pop(client, ctx):
    _, h = make_user(ctx, "qr-worker")
    body = {"params": {"workflow": "qr_code", "extra_texts": QR}}
    assert submit(client, dry_run=True, **body).json()["kudos"] == image_cost(
        width=512, height=512, steps=30, n=1, family=Family.stable_diffusion_1, controlnet=True)
    assert submit(client, **body).status_code == 202
    assert pop(client, h, allow_controlnet=False).json()["skipped"] == {"controlnet": 1}
    job = pop(client, h, allow_controlnet=True).json()
    assert job["payload"]["workflow"] == "qr_code" and job["payload"]["extra_texts"] == QR
    assert job["ttl"] == 300


@pytest.mark.parametrize("body, field, rc", [
    ({"params": {"post_processing": ["RealESRGAN_x4plus", "NMKD_Siax"]}}, "params.post_processing",
     "TooManyUpscalers"),
    ({"params": {"post_processing": ["Waifu2x"]}}, "params.post_processing", "BadRequest"),
    ({"params": {"post_processing": ["GFPGAN", "GFPGAN"]}}, "params.post_processing", "BadRequest"),
    ({"params": {"facefixer_strength": 1.5}}, "params.facefixer_strength", "BadRequest"),
])
def test_post_processing_rules(client, body, field, rc):
    r = submit(client, **body)
    assert r.status_code == 400, r.text
    assert r.json()["rc"] == rc and field in r.json()["message"], r.json()


def test_post_processing_price_and_worker_filter(client, ctx):
    _, h = make_user(ctx, "pp-worker")
    body = {"params": {"post_processing": ["strip_background", "GFPGAN", "RealESRGAN_x2plus"]}}
    assert submit(client, dry_run=True, **body).json()["kudos"] == image_cost(
        width=512, height=512, steps=30, n=1, family=Family.stable_diffusion_1, post_processors=3)
    assert submit(client, **body).status_code == 202
    assert pop(client, h, allow_post_processing=False).json()["skipped"] == {"post-processing": 1}
    job = pop(client, h, allow_post_processing=True).json()
    assert job["payload"]["post_processing"] == ["strip_background", "GFPGAN", "RealESRGAN_x2plus"]
