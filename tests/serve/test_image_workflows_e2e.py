"""Every image workflow of the typed job through the public API on the running cluster
(`make run`'s configs/local.yaml, here on PostgreSQL): img2img from base64 and from a URL,
inpainting (a mask, and an inpainting checkpoint), outpainting, hires fix, transparent images,
LoRA and TI. Each checks what came back (size, mode, alpha, change against the same seed
without the feature), not only that the request finished."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_harness import running_cluster
from conftest import png_b64 as b64
from conftest import serving_png
from conftest import png_bytes as png
from test_cluster_e2e import make_user

pytestmark = [pytest.mark.serve, pytest.mark.postgres, pytest.mark.timeout(900)]
API = "http://127.0.0.1:8000/api/v2"
ANON = {"apikey": "0000000000", "Client-Agent": "rayhorde-tests:1:none"}
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def source_image(size=(128, 128)) -> Image.Image:
    y, x = np.mgrid[: size[1], : size[0]]
    img = np.stack([x * 255 / size[0], y * 255 / size[1], np.full_like(x, 40.0)], -1)
    img[(x - size[0] / 2) ** 2 + (y - size[1] / 2) ** 2 < (size[0] / 4) ** 2] = (250, 240, 60)
    return Image.fromarray(img.astype(np.uint8))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from api.db.migrate import reset

    reset(POSTGRES_URL).dispose()
    # The test's own image server is on loopback: allowed here, refused by default.
    with serving_png(png(source_image())) as url, \
            running_cluster(tmp_path_factory.mktemp("workflows"), database_url=POSTGRES_URL,
                            settings={"allow_private_source_urls": True}) as info:
        yield {**info, "source_url": url}


def generate(http: httpx.Client, headers: dict = ANON, **body) -> list[Image.Image]:
    body.setdefault("prompt", "a red house on a hill ### blur")
    body.setdefault("models", ["tiny-sd15"])
    params = {"width": 128, "height": 128, "steps": 6, "seed": "7", "sampler_name": "k_euler",
              **body.pop("params", {})}
    r = http.post(f"{API}/generate/async", json={**body, "params": params}, headers=headers)
    assert r.status_code == 202, r.text
    rid, deadline = r.json()["id"], time.time() + 300
    while time.time() < deadline:
        chk = http.get(f"{API}/generate/check/{rid}").json()
        if chk["done"] or chk["faulted"]:
            break
        time.sleep(0.3)
    st = http.get(f"{API}/generate/status/{rid}").json()
    assert st["done"] and not st["faulted"], st
    return [Image.open(io.BytesIO(http.get(g["img"]).content)) for g in st["generations"]]


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def differs(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(px(a) - px(b)).mean())


def test_img2img_from_base64_and_from_a_url(cluster):
    with httpx.Client(timeout=30) as http:
        low = generate(http, source_image=b64(source_image()), params={"denoising_strength": 0.05})
        high = generate(http, source_image=b64(source_image()), params={"denoising_strength": 1.0})
        other = generate(http, params={"denoising_strength": 0.05},
                         source_image=b64(source_image().transpose(Image.Transpose.ROTATE_90)))
        from_url = generate(http, source_image=cluster["source_url"], params={"denoising_strength": 0.05})
    assert low[0].size == (128, 128) and low[0].format == "WEBP"
    # A low strength keeps to its source (another source gives another image); a high one
    # departs from it; a URL source is the same source.
    assert differs(low[0], other[0]) > 3 * differs(low[0], from_url[0])
    assert differs(low[0], high[0]) > 3 * differs(low[0], from_url[0])


def test_inpainting_outpainting_and_an_inpainting_model(cluster):
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (64, 0, 128, 128))
    padded = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    padded.paste(source_image((96, 96)).convert("RGBA"), (16, 16))
    with httpx.Client(timeout=30) as http:
        a = generate(http, source_image=b64(source_image()), source_mask=b64(mask),
                     source_processing="inpainting")[0]
        b = generate(http, source_image=b64(source_image()), source_mask=b64(mask),
                     source_processing="inpainting", params={"seed": "8"})[0]
        model = generate(http, models=["tiny-sd15-inpainting"], source_image=b64(padded),
                         source_processing="outpainting", params={"n": 2})
    diff = np.abs(px(a) - px(b)).mean(axis=(0, 2))
    assert a.size == (128, 128) and diff[72:].mean() > 3 * diff[:48].mean()
    assert [im.size for im in model] == [(128, 128)] * 2 and differs(*model) > 1.0


def test_hires_fix_returns_the_requested_size_and_differs_from_one_pass(cluster):
    with httpx.Client(timeout=30) as http:
        hires = generate(http, params={"width": 768, "height": 640, "hires_fix": True,
                                       "hires_fix_denoising_strength": 0.5})[0]
        plain = generate(http, params={"width": 768, "height": 640})[0]
        # Over 1024x1024 the kudos are needed upfront: a registered user pays.
        _, key = make_user(cluster, "hires-payer", kudos=1000)
        cascade = generate(http, {**ANON, "apikey": key}, models=["tiny-cascade"],
                           params={"width": 1280, "height": 1280, "hires_fix": True})[0]
    assert hires.size == plain.size == (768, 640) and differs(hires, plain) > 1.0
    assert cascade.size == (1280, 1280)


def test_transparent_images_are_rgba_webp_with_a_real_alpha(cluster):
    with httpx.Client(timeout=30) as http:
        for model in ("tiny-sd15", "tiny-sdxl"):
            (image,) = generate(http, models=[model], params={"transparent": True})
            assert image.format == "WEBP" and image.mode == "RGBA" and image.size == (128, 128)
            alpha = np.asarray(image.getchannel("A"), dtype=np.float32)
            assert alpha.std() > 1.0


def test_loras_and_tis_change_the_image_at_the_same_seed(cluster):
    with httpx.Client(timeout=30) as http:
        plain = generate(http)[0]
        lora = generate(http, params={"loras": [{"name": "tiny-lora"}]})[0]
        zero = generate(http, params={"loras": [{"name": "tiny-lora", "model": 0, "clip": 0}]})[0]
        both = generate(http, params={"loras": [{"name": "tiny-lora"}, {"name": "tiny-lora-2"}],
                                      "tis": [{"name": "tiny-ti", "inject_ti": "prompt"}]})[0]
        again = generate(http)[0]
    assert differs(lora, plain) > 1.0 and differs(both, lora) > 0.5
    assert differs(zero, plain) < 0.5 and differs(again, plain) < 0.5


def test_controlnet_graph_follows_its_map(cluster):
    """annotate (a Ray task) -> guided pass (the sd15 deployment); image_is_control skips the
    annotator; return_control_map returns the annotator's map itself."""
    import cv2

    squares = Image.fromarray((np.indices((128, 128)).sum(axis=0) // 16 % 2 * 255).astype(np.uint8)).convert("RGB")
    expected = cv2.Canny(np.asarray(squares.convert("L")), 100, 200)
    with httpx.Client(timeout=30) as http:
        edges = generate(http, source_image=b64(squares),
                         params={"control_type": "canny", "return_control_map": True})[0]
        guided = generate(http, source_image=b64(squares), params={"control_type": "canny"})[0]
        # The same map, made here and given as the control (lossless): the same image.
        again = generate(http, source_image=b64(Image.fromarray(expected).convert("RGB")),
                         params={"control_type": "canny", "image_is_control": True})[0]
        blank = generate(http, source_image=b64(Image.new("RGB", (128, 128))),
                         params={"control_type": "canny", "image_is_control": True})[0]
        for control_type in ("hed", "depth", "scribble"):
            (other,) = generate(http, source_image=b64(squares), params={"control_type": control_type})
            assert other.size == (128, 128)
    assert np.array_equal(np.asarray(edges.convert("L")) > 127, expected > 127)
    assert guided.size == (128, 128)
    assert differs(guided, again) < 0.5  # the annotated map, or the same map given directly
    assert differs(guided, blank) > 0.2  # the map is followed


def test_remix_graph_with_extra_images(cluster):
    import os
    import subprocess
    import sys

    alias, key = make_user(cluster, "remixer", kudos=1000)
    env = {**os.environ, "RAYHORDE_DATABASE_URL": cluster["db"].url}
    subprocess.run([sys.executable, "-m", "cluster.cli", "users", "role", alias, "--add", "trusted"],
                   env=env, check=True, capture_output=True)
    headers = {**ANON, "apikey": key}
    red, blue = Image.new("RGB", (96, 96), (220, 30, 30)), Image.new("RGB", (96, 96), (30, 30, 220))
    blue.paste((250, 250, 20), (10, 10, 60, 40))
    with httpx.Client(timeout=30) as http:
        base = dict(models=["tiny-cascade"], source_image=b64(red), source_processing="remix")
        one = generate(http, headers, **base)[0]
        same = generate(http, headers, **base)[0]
        three = generate(http, headers, **base, extra_source_images=[
            {"image": b64(blue), "strength": 3.0}, {"image": b64(source_image())}])[0]
    assert one.size == (128, 128)
    assert differs(one, same) == 0.0  # the same inputs give the same image
    assert differs(one, three) > 0.005  # more images, other results


def test_every_qr_code_result_scans(cluster):
    """render -> passes -> scan (-> passes again -> blend): whatever the tiny random models
    make, each image handed back decodes to the requested text, and says how."""
    from models.qr import decode

    texts = ["https://aihorde.net", "rayhorde", "WIFI:S:horde;;"]
    with httpx.Client(timeout=30) as http:
        for i, text in enumerate(texts):
            extra = [{"reference": "qr_code", "text": text},
                     {"reference": "module_drawer", "text": ["square", "circle", "rounded"][i]}]
            r = http.post(f"{API}/generate/async", headers=ANON, json={
                "prompt": "a garden", "models": ["tiny-sd15"],
                "params": {"width": 512, "height": 512, "steps": 8, "seed": str(i), "n": 2,
                           "workflow": "qr_code", "extra_texts": extra}})
            assert r.status_code == 202, r.text
            rid, deadline = r.json()["id"], time.time() + 300
            while not (chk := http.get(f"{API}/generate/check/{rid}").json())["done"]:
                assert not chk["faulted"] and time.time() < deadline, chk
                time.sleep(0.5)
            st = http.get(f"{API}/generate/status/{rid}").json()
            assert len(st["generations"]) == 2
            for g in st["generations"]:
                image = Image.open(io.BytesIO(http.get(g["img"]).content))
                assert image.size == (512, 512) and text in decode(image)
                (note,) = g["gen_metadata"]
                assert note["type"] == "information" and note["value"] == "see_ref"
                assert note["ref"].startswith("qr: ")


def test_post_processing_nodes_after_generation(cluster):
    """Face fixers, then the upscaler, then strip_background, on the post-processing
    deployment (builtin random weights of the real architectures)."""
    with httpx.Client(timeout=30) as http:
        plain = generate(http)[0]
        x2 = generate(http, params={"post_processing": ["RealESRGAN_x2plus"]})[0]
        x4 = generate(http, params={"post_processing": ["4x_AnimeSharp", "GFPGAN"],
                                    "facefixer_strength": 0.8})[0]
        cut = generate(http, params={"post_processing": ["strip_background", "RealESRGAN_x4plus"], "n": 2})
    assert plain.size == (128, 128) and x2.size == (256, 256) and x4.size == (512, 512)
    assert x2.mode == "RGB" and differs(x2.resize((128, 128)), plain) > 1.0
    # strip_background runs last whatever the order asked: RGBA at the upscaled size.
    assert [(im.size, im.mode) for im in cut] == [((512, 512), "RGBA")] * 2
    assert np.asarray(cut[0].getchannel("A"), np.float32).std() > 1.0
