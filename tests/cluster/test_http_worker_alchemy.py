"""`rayhorde worker`'s post-processing, NSFW censoring and alchemy forms (cluster/http_alchemist.py)
against the real API (uvicorn in this process, SQLite, local storage, as in test_http_worker.py).

One worker serves every test that needs Ray (a module fixture: its Ray starts once): tiny-sd15
with the builtin post-processors and alchemy models, NSFW (so only requests that ask are
censored), a strictness that flags part of a batch, and the alchemy forms caption,
interrogation, nsfw and RealESRGAN_x2plus. Results are checked against what the requester gets
over HTTP and against the same builtin models called here.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from cluster import http_alchemist
from cluster.http_worker import HttpWorker, WorkerConfig, WorkerConfigError
from test_http_worker import ANON, ApiServer, _png_b64, running_worker, wait_until, worker_config

pytestmark = [pytest.mark.serve, pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")]
ROOT = Path(__file__).resolve().parents[2]
NAME = "alchemy-box"
# The tiny SD 1.5 model's images score about -0.19 to -0.12 with the tiny checker: with this,
# part of a batch is flagged (the censoring test checks that its batch is mixed).
STRICTNESS = 0.15
FORMS = ["caption", "interrogation", "nsfw", "RealESRGAN_x2plus"]


def builtin(name: str):
    from models.alchemy.registry import AlchemyModelEntry, load

    return load(AlchemyModelEntry(name=name))


def fetch(url: str) -> Image.Image:
    r = httpx.get(url)
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(r.content))


def generate(api: ApiServer, body: dict, timeout: float = 240) -> dict:
    """Queue an anonymous tiny-sd15 request and wait until it is done; its status."""
    r = httpx.post(f"{api.url}/api/v2/generate/async", headers=ANON, json={
        "prompt": "a lighthouse on a cliff", "models": ["tiny-sd15"], **body})
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    status = lambda: httpx.get(f"{api.url}/api/v2/generate/status/{rid}").json()  # noqa: E731
    wait_until(lambda: status()["done"], timeout=timeout, what=f"request {rid}")
    return status()


def params(**extra) -> dict:
    return {"width": 64, "height": 64, "steps": 4, "n": 1, "seed": "42", **extra}


# ---------------------------------------------------------------------------------- no Ray


@pytest.mark.timeout(60)
def test_bad_or_unsupported_alchemy_forms_are_config_errors(tmp_path):
    config = dict(url="http://127.0.0.1:1", api_key="key", models=["tiny-sd15"])
    with pytest.raises(WorkerConfigError, match="--alchemy: no such form: captions"):
        WorkerConfig(**config, alchemy=["caption", "captions"])
    with pytest.raises(WorkerConfigError, match="--alchemy: GFPGAN: post-processors"):
        WorkerConfig(**config, alchemy=["GFPGAN"], post_processing=False)
    with pytest.raises(WorkerConfigError, match="--alchemy-weights"):
        WorkerConfig(**config, alchemy_weights="huggingface")
    # With catalog weights, only the catalog's entries are served.
    catalog = yaml.safe_load((ROOT / "configs" / "models.yaml").read_text())
    catalog["alchemy"] = [e for e in catalog["alchemy"] if e["name"] != "interrogation"]
    catalog["postprocessors"] = [e for e in catalog["postprocessors"] if e["name"] != "NMKD_Siax"]
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(catalog))
    for forms in (["caption", "interrogation"], ["NMKD_Siax"]):
        with pytest.raises(WorkerConfigError, match=f"--alchemy: {forms[-1]} not in the catalog"):
            HttpWorker(WorkerConfig(**config, alchemy=forms, catalog_path=str(path),
                                    alchemy_weights="catalog", postprocessor_weights="catalog"))
    # The builtin weights serve every form; an image worker always brings the NSFW checker.
    worker = HttpWorker(WorkerConfig(**config, name="box",
                                     alchemy=["caption", "caption", "NMKD_Siax"]))
    assert worker.extras.forms == ["caption", "NMKD_Siax"]
    assert worker.alchemy_worker_name == "box-alchemy"
    assert [e.name for e in worker.extras.alchemy] == ["caption", "nsfw"]
    text_only = HttpWorker(WorkerConfig(**{**config, "models": ["tiny-llm"]}))
    assert text_only.extras.alchemy == [] and text_only.extras.postprocessors == []
    # Who censors: the requester's use_nsfw_censor, and an SFW worker always.
    assert http_alchemist.censors({"use_nsfw_censor": True}, worker_nsfw=True)
    assert http_alchemist.censors({"use_nsfw_censor": False}, worker_nsfw=False)
    assert not http_alchemist.censors({"use_nsfw_censor": False}, worker_nsfw=True)


# ---------------------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def horde(tmp_path_factory):
    api = ApiServer(tmp_path_factory.mktemp("http-alchemist"))
    api.start()
    try:
        # Trusted: requests with censor_nsfw go only to workers the horde trusts to censor.
        _, key = api.create_user("alchemist", trusted=True)
        config = worker_config(api, key, ["tiny-sd15"], name=NAME, nsfw=True, max_batch=8,
                               nsfw_strictness=STRICTNESS, alchemy=FORMS)
        started = time.monotonic()
        with running_worker(config) as (worker, out, _):
            print(f"worker started in {time.monotonic() - started:.1f} s")
            yield SimpleNamespace(api=api, worker=worker, out=out)
    finally:
        api.stop()


@pytest.mark.timeout(600)
def test_post_processing_runs_on_the_worker(horde):
    api = horde.api
    upscaled = generate(api, {"params": params(post_processing=["RealESRGAN_x2plus"])})
    stripped = generate(api, {"params": params(post_processing=["strip_background"])})
    for status in (upscaled, stripped):
        (g,) = status["generations"]
        assert g["worker_name"] == NAME and g["state"] == "ok" and not status["faulted"], g
    assert fetch(upscaled["generations"][0]["img"]).size == (128, 128)
    image = fetch(stripped["generations"][0]["img"])
    assert image.size == (64, 64) and image.mode == "RGBA"
    (record,) = httpx.get(f"{api.url}/api/v2/workers", params={"name": NAME}).json()
    assert record["post-processing"] is True


@pytest.mark.timeout(600)
def test_censor_nsfw_checks_the_images_and_uploads_no_flagged_one(horde):
    api = horde.api
    body = {"params": params(n=8, seed="5", sampler_name="k_euler")}
    plain = generate(api, body)  # the worker is NSFW: nothing is checked unless asked
    assert all(g["state"] == "ok" and not g["censored"] and g["worker_name"] == NAME
               for g in plain["generations"])
    by_seed = {g["seed"]: fetch(g["img"]) for g in plain["generations"]}
    seeds = sorted(by_seed, key=int)
    expected = [v.nsfw for v in builtin("nsfw").check([by_seed[s] for s in seeds], STRICTNESS)]
    assert 0 < sum(expected) < len(expected), "pick another STRICTNESS: the batch is not mixed"
    censored = generate(api, {**body, "censor_nsfw": True})
    got = {g["seed"]: g for g in censored["generations"]}
    assert sorted(got, key=int) == seeds
    assert [got[s]["censored"] for s in seeds] == expected
    for s, flagged in zip(seeds, expected):
        g = got[s]
        assert g["worker_name"] == NAME and (g["state"] == "censored") == flagged
        notes = [{k: v for k, v in m.items() if v is not None} for m in g["gen_metadata"]]
        assert ({"type": "censorship", "value": "nsfw"} in notes) == flagged
        image = fetch(g["img"])
        if flagged:  # the API's placeholder: plain grey
            assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) == 1
        else:  # the same image as without the check
            assert np.array_equal(np.asarray(image), np.asarray(by_seed[s]))


@pytest.mark.timeout(600)
def test_alchemy_forms_are_run_by_the_worker(horde):
    api = horde.api
    y, x = np.mgrid[:48, :64]
    source = Image.fromarray(np.stack([x * 4, y * 5, np.full_like(x, 90)], -1).astype(np.uint8))
    r = httpx.post(f"{api.url}/api/v2/interrogate/async", headers=ANON, json={
        "forms": [{"name": f} for f in FORMS], "source_image": _png_b64(source)})
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    status = lambda: httpx.get(f"{api.url}/api/v2/interrogate/status/{rid}").json()  # noqa: E731
    wait_until(lambda: status()["state"] not in ("waiting", "processing"), timeout=240,
               what="the interrogation")
    st = status()
    assert st["state"] == "done", (st, horde.out.getvalue()[-3000:])
    got = {f["form"]: f["result"] for f in st["forms"]}
    assert got["caption"] == {"caption": builtin("caption").caption([source])[0]}
    assert got["nsfw"] == {"nsfw": builtin("nsfw").check([source], STRICTNESS)[0].nsfw}
    direct = builtin("interrogation").interrogate(source, 5)
    assert {c: [t["text"] for t in ts] for c, ts in got["interrogation"]["interrogation"].items()} \
        == {c: [t["text"] for t in ts] for c, ts in direct.items()}
    assert fetch(got["RealESRGAN_x2plus"]["RealESRGAN_x2plus"]).size == (128, 96)
    # Done by the worker's own alchemist record, the only interrogation worker here.
    (alchemist,) = httpx.get(f"{api.url}/api/v2/workers", params={"type": "interrogation"}).json()
    assert alchemist["name"] == f"{NAME}-alchemy" and alchemist["online"]
    assert alchemist["requests_fulfilled"] == len(FORMS) and set(alchemist["models"]) == set(FORMS)
    assert horde.worker.stats.forms_done == len(FORMS)
