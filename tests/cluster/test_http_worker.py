"""`rayhorde worker` (cluster/http_worker.py) against the real API: uvicorn on a free port in
this process (SQLite in tmp_path, local storage), the worker on its own private local Ray.

Everything goes through the public interfaces: requests are queued and checked over HTTP as a
client would; the worker is driven through HttpWorker / run_worker or as `python -m cluster.cli
worker`. One Ray at a time: each test that starts one shuts it down in its fixture's teardown
(the subprocess test: the worker process itself, which must leave no Ray process behind).
"""

from __future__ import annotations

import base64

import io
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from api.app import create_app
from api.auth import hash_api_key, new_api_key
from api.db.migrate import upgrade
from api.db.models import User
from api.db.session import Database
from cluster.http_worker import (
    EXIT_CONFIG,
    HttpWorker,
    UnsupportedJob,
    WorkerConfig,
    image_job,
    run_worker,
    text_job,
)
from conftest import app_server, free_port, make_ctx
from deployments.jobs import ImageJob, JobRejected
from models.catalog import Family
from models.workflows import Workflow

ROOT = Path(__file__).resolve().parents[2]
ANON = {"apikey": "0000000000"}
# diffusers' schedulers trip numpy 2's __array__ deprecations on every step.
pytestmark = [pytest.mark.serve, pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")]


class ApiServer:
    """The rayhorde API under uvicorn in a background thread; stop() and start() again on the
    same port and database is an API restart."""

    def __init__(self, tmp_path: Path, **settings):
        self.tmp_path, self.settings = tmp_path, settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = f"sqlite:///{tmp_path}/rayhorde.db"
        upgrade(Database(self.database_url))
        self._server: ExitStack | None = None  # the running app_server
        self.db: Database | None = None

    def start(self) -> None:
        self.db = Database(self.database_url)
        self.ctx = make_ctx(self.db, self.tmp_path, **{
            "public_url": self.url, "served_models": ["tiny-sd15", "tiny-llm"], **self.settings})
        self._server = ExitStack()
        self._server.enter_context(app_server(create_app(self.ctx), self.port))

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            self.db.dispose()

    def create_user(self, name: str, **roles) -> tuple[int, str]:
        key = new_api_key()
        with self.db.write() as s:
            user = User(username=name, api_key_hash=hash_api_key(key, self.ctx.settings.key_salt),
                        kudos=0.0, **roles)
            s.add(user)
            s.flush()
            return user.id, key


@pytest.fixture
def api(tmp_path):
    server = ApiServer(tmp_path)
    server.start()
    yield server
    server.stop()


def queue_image(api: ApiServer, **params) -> str:
    body = {"prompt": "a lighthouse on a cliff ### fog", "models": ["tiny-sd15"],
            "params": {"width": 64, "height": 64, "steps": 4, "n": 1, "seed": "42", **params}}
    r = httpx.post(f"{api.url}/api/v2/generate/async", json=body, headers=ANON)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def queue_text(api: ApiServer) -> str:
    body = {"prompt": "Once upon a time", "models": ["tiny-llm"],
            "params": {"max_length": 16, "max_context_length": 256, "temperature": 0.8}}
    r = httpx.post(f"{api.url}/api/v2/generate/text/async", json=body, headers=ANON)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def image_status(api: ApiServer, rid: str) -> dict:
    return httpx.get(f"{api.url}/api/v2/generate/status/{rid}").json()


def text_status(api: ApiServer, rid: str) -> dict:
    return httpx.get(f"{api.url}/api/v2/generate/text/status/{rid}").json()


def wait_until(condition, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def worker_config(api: ApiServer, key: str, models: list[str], **overrides) -> WorkerConfig:
    return WorkerConfig(url=api.url, api_key=key, models=models, num_cpus=2,
                        idle_seconds=0.3, **overrides)


@contextmanager
def running_worker(config: WorkerConfig):
    """An HttpWorker started in this thread (ray.init wants the main thread), its pop loops
    served from a background thread; stopped, and its Ray shut down, on exit."""
    out = io.StringIO()
    worker = HttpWorker(config, out=out)
    result: dict[str, int] = {}
    runner = None
    try:
        worker.start()
        runner = threading.Thread(target=lambda: result.update(code=worker.serve_forever()),
                                  daemon=True)
        runner.start()
        yield worker, out, runner
    finally:
        worker.request_stop("test over")
        if runner is not None:
            runner.join(timeout=120)
        worker.shutdown()
        print(out.getvalue())  # shown by pytest when the test fails
    assert result.get("code") == 0, out.getvalue()


# ---------------------------------------------------------------------------------- no Ray


@pytest.mark.timeout(30)
def test_payload_mapping_to_deployment_jobs():
    payload = {"prompt": "a cat ### dog, blur", "ddim_steps": 12, "n_iter": 3, "seed": "4294967295",
               "width": 576, "height": 512, "sampler_name": "k_euler_a", "cfg_scale": 6.0,
               "karras": False, "clip_skip": 2, "tiling": False, "hires_fix": False,
               "post_processing": [], "use_nsfw_censor": False}
    sd15 = Family.stable_diffusion_1
    job = image_job(sd15, "tiny-sd15", payload, 3)
    assert job == ImageJob(model="tiny-sd15", prompt="a cat", negative_prompt="dog, blur",
                           width=576, height=512, steps=12, cfg_scale=6.0, sampler_name="k_euler_a",
                           karras=False, clip_skip=2, tiling=False, workflow=Workflow.txt2img,
                           seeds=(4294967295, 0, 1))  # the horde's seed space wraps at 2**32
    # Hires fix past the native size, and a source image, pick their workflows.
    hires = image_job(sd15, "tiny-sd15", {**payload, "hires_fix": True, "width": 1024, "height": 768,
                                          "hires_fix_denoising_strength": 0.3}, 1)
    assert hires.workflow is Workflow.hires_fix and hires.hires_fix_denoising_strength == 0.3
    painted = image_job(sd15, "tiny-sd15", {**payload, "denoising_strength": 0.4}, 1,
                        "inpainting", b"png", b"mask")
    assert painted.workflow is Workflow.inpainting and painted.denoising_strength == 0.4
    with pytest.raises(UnsupportedJob):
        image_job(sd15, "tiny-sd15", {**payload, "post_processing": ["RealESRGAN_x4plus"]}, 1)
    for bad, field in (({"seed": "not-a-number"}, "seed"), ({"ddim_steps": 0}, "steps"),
                       ({"denoising_strength": 2}, "denoising_strength")):
        with pytest.raises(JobRejected, match=field):
            image_job(sd15, "tiny-sd15", {**payload, **bad}, 1)
    text = {"prompt": "Hi", "n": 2, "max_length": 40, "max_context_length": 512,
            "temperature": 0.5, "top_p": None, "rep_pen": 1.2, "stop_sequence": ["\n"]}
    a, b = text_job("tiny-llm", text), text_job("tiny-llm", text)
    assert a.model_dump(exclude={"seed"}, exclude_defaults=True) == {
        "model": "tiny-llm", "prompt": "Hi", "max_length": 40, "max_context_length": 512,
        "temperature": 0.5, "rep_pen": 1.2, "stop_sequence": ("\n",)}
    assert a.seed != b.seed  # one random seed per generation


@pytest.mark.timeout(60)
def test_bad_key_and_unknown_model_stop_before_ray_starts(api, capsys):
    _, key = api.create_user("volunteer")
    assert run_worker(worker_config(api, "not-a-real-key-000000", ["tiny-sd15"])) == EXIT_CONFIG
    assert run_worker(worker_config(api, ANON["apikey"], ["tiny-sd15"])) == EXIT_CONFIG
    assert run_worker(worker_config(api, key, ["tiny-sd15", "no-such-model"])) == EXIT_CONFIG
    assert run_worker(worker_config(api, key, ["tiny-llm"], max_length=1024)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "tiny-llm generates at most 512 tokens" in err
    assert "refused the API key (401" in err
    assert "anonymous key cannot run a worker" in err
    assert "no-such-model" in err and key not in err


@contextmanager
def popping_without_models(config: WorkerConfig, handles: dict | None = None):
    """The pop loops alone, without Ray: either nothing is queued, so no job needs a model, or
    `handles` stand in for the deployments."""
    out = io.StringIO()
    worker = HttpWorker(config, out=out)
    worker.handles.update(handles or {})
    worker.check_api()
    result: dict[str, int] = {}
    runner = threading.Thread(target=lambda: result.update(code=worker.serve_forever()),
                              daemon=True)
    runner.start()
    try:
        yield worker, out, runner, result
    finally:
        worker.request_stop("test over")
        runner.join(timeout=30)
        print(out.getvalue())


class FailingDeployment:
    """Stands in for a deployment handle whose replica fails every job (a crashed replica, an
    out-of-memory GPU): handle.options(...).generate.remote(job).result() raises."""

    def __init__(self):
        self.jobs: list[dict] = []

    def options(self, **_options):
        return self

    @property
    def generate(self):
        return self

    def remote(self, job: dict):
        self.jobs.append(job)
        return self

    def result(self, timeout_s=None):
        raise RuntimeError("replica died")


@pytest.mark.timeout(60)
def test_a_failing_generation_is_submitted_faulted_and_requeued(api):
    _, key = api.create_user("volunteer")
    image_id, text_id = queue_image(api, seed="5"), queue_text(api)
    config = worker_config(api, key, ["tiny-sd15", "tiny-llm"], name="flaky")
    failing = FailingDeployment()
    with popping_without_models(config, handles={"tiny-sd15": failing, "tiny-llm": failing}) \
            as (worker, out, runner, result):
        # A faulted submit hands the job back, and its owner's workers never get it again
        # (api/db/queue.py: one owner cannot fail anyone's request): both wait for others.
        wait_until(lambda: worker.stats.generations_faulted == 2, timeout=30, what="both faulted")
        for status in (image_status(api, image_id), text_status(api, text_id)):
            assert status["waiting"] == 1 and not status["faulted"], status
    assert result["code"] == 0 and worker.stats.generations_faulted == 2
    assert worker.stats.generations_done == 0 and worker.stats.kudos_earned == 0
    assert "faulted: RuntimeError: replica died" in out.getvalue()
    image_jobs = [j for j in failing.jobs if isinstance(j, ImageJob)]
    assert len(image_jobs) == 1 and image_jobs[0].seeds == (5,)
    assert len(failing.jobs) == 2  # neither came back to this owner


@pytest.mark.timeout(60)
def test_maintenance_is_waited_out_not_fatal(api):
    _, key = api.create_user("volunteer")
    config = worker_config(api, key, ["tiny-sd15"], name="fixing", maintenance_retry_seconds=0.2)
    deployment = FailingDeployment()  # records the jobs the worker runs
    with popping_without_models(config, handles={"tiny-sd15": deployment}) \
            as (worker, out, runner, result):
        wait_until(lambda: httpx.get(f"{api.url}/api/v2/workers", params={"name": "fixing"}).json(),
                   timeout=10, what="the worker's first pop")
        (record,) = httpx.get(f"{api.url}/api/v2/workers", params={"name": "fixing"}).json()
        owner = {"apikey": key}
        assert httpx.put(f"{api.url}/api/v2/workers/{record['id']}", headers=owner,
                         json={"maintenance": True, "maintenance_msg": "new GPU"}).status_code == 200
        wait_until(lambda: out.getvalue().count("in maintenance (new GPU)") >= 3, timeout=10,
                   what="the worker asking again during maintenance")
        assert runner.is_alive() and worker.fatal_error is None
        assert httpx.put(f"{api.url}/api/v2/workers/{record['id']}", headers=owner,
                         json={"maintenance": False}).status_code == 200
        seen = out.getvalue().count("in maintenance")
        # Popping normally again: a job queued now reaches the worker's deployment, with at
        # most the one maintenance answer that was in flight when maintenance ended.
        queue_image(api, seed="6")
        wait_until(lambda: deployment.jobs, timeout=15, what="the worker running a job again")
        assert out.getvalue().count("in maintenance") <= seen + 1
    assert result["code"] == 0


@pytest.mark.timeout(60)
def test_a_worker_name_of_another_user_is_fatal(api):
    _, first_key = api.create_user("first")
    _, key = api.create_user("second")
    r = httpx.post(f"{api.url}/api/v2/generate/pop", headers={"apikey": first_key},
                   json={"name": "taken", "models": ["tiny-sd15"]})
    assert r.status_code == 200
    config = worker_config(api, key, ["tiny-sd15"], name="taken")
    with popping_without_models(config) as (worker, out, runner, result):
        runner.join(timeout=20)
    assert result["code"] == EXIT_CONFIG
    assert "WrongCredentials" in worker.fatal_error and "taken" in worker.fatal_error
    assert "the API refused this worker" in out.getvalue()


@pytest.mark.timeout(60)
def test_rate_limited_pops_honour_retry_after(tmp_path):
    server = ApiServer(tmp_path, rate_limit_pop="1/minute")
    server.start()
    try:
        _, key = server.create_user("volunteer")
        config = worker_config(server, key, ["tiny-sd15"], max_backoff_seconds=2.0)
        with popping_without_models(config) as (worker, out, runner, result):
            wait_until(lambda: "429 TooManyRequests" in out.getvalue(), timeout=10,
                       what="a rate-limited pop")
        line = next(x for x in out.getvalue().splitlines() if "429" in x)
        delay = float(line.rsplit("retrying in ", 1)[1].split(" s")[0])
        assert delay >= 50, line  # the server's Retry-After (about a minute), over our 2 s cap
        assert result["code"] == 0  # the stop cut the wait short
    finally:
        server.stop()


# ---------------------------------------------------------------------------------- with Ray


@pytest.mark.timeout(240)
def test_worker_serves_image_and_text_jobs_and_earns_kudos(api):
    owner_id, key = api.create_user("volunteer")
    image_id = queue_image(api, n=2)
    text_id = queue_text(api)
    config = worker_config(api, key, ["tiny-sd15", "tiny-llm"], name="box", max_batch=2)
    with running_worker(config) as (worker, out, _):
        wait_until(lambda: image_status(api, image_id)["done"] and text_status(api, text_id)["done"],
                   timeout=150, what="both requests done")
    # Images: two, from this worker, 64x64 WebP at their URLs, seeds counting up from 42.
    st = image_status(api, image_id)
    assert st["finished"] == 2 and not st["faulted"]
    assert sorted(g["seed"] for g in st["generations"]) == ["42", "43"]
    for g in st["generations"]:
        assert g["worker_name"] == "box" and g["state"] == "ok"
        image = Image.open(io.BytesIO(httpx.get(g["img"]).content))
        assert image.format == "WEBP" and image.size == (64, 64)
    # Text: one generation from the text worker (NAME-text when both kinds are served).
    (gen,) = text_status(api, text_id)["generations"]
    assert gen["state"] == "ok" and gen["worker_name"] == "box-text" and gen["model"] == "tiny-llm"
    assert isinstance(gen["text"], str)
    # The worker records, and the owner's kudos: exactly what the submits rewarded.
    workers = {w["name"]: w for w in httpx.get(f"{api.url}/api/v2/workers").json()}
    assert workers["box"]["requests_fulfilled"] == 2 and workers["box"]["type"] == "image"
    assert workers["box-text"]["requests_fulfilled"] == 1 and workers["box-text"]["type"] == "text"
    assert worker.stats.generations_done == 3 and worker.stats.kudos_earned > 0
    me = httpx.get(f"{api.url}/api/v2/find_user", headers={"apikey": key}).json()
    assert me["id"] == owner_id
    assert me["kudos"] == pytest.approx(worker.stats.kudos_earned, abs=0.05)
    assert me["kudos"] == pytest.approx(workers["box"]["kudos_rewards"]
                                        + workers["box-text"]["kudos_rewards"], abs=0.05)
    # Progress on the terminal: a line per job, running totals, and never the key.
    log = out.getvalue()
    assert "total 3 generations" in log and "tiny-sd15" in log and "tiny-llm" in log
    assert key not in log


def queue_workflow(api: ApiServer, models: list[str], **body) -> str:
    """Queue an anonymous image request (64x64, 4 steps, seed 42 unless `params` says)."""
    params = {"width": 64, "height": 64, "steps": 4, "seed": "42", **body.pop("params", {})}
    r = httpx.post(f"{api.url}/api/v2/generate/async", headers=ANON, json={
        "prompt": "a lighthouse", "models": models, "params": params, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def work_through(api: ApiServer, key: str, models: list[str], name: str,
                 ids: dict[str, str]) -> dict[str, Image.Image]:
    """Run a worker serving `models` until every request of `ids` is done; each one's image,
    checked to come from that worker."""
    with running_worker(worker_config(api, key, models, name=name)):
        wait_until(lambda: all(image_status(api, rid)["done"] for rid in ids.values()),
                   timeout=300, what="every request done")
    images = {}
    for label, rid in ids.items():
        (g,) = image_status(api, rid)["generations"]
        assert g["worker_name"] == name and g["state"] == "ok", (label, g)
        images[label] = Image.open(io.BytesIO(httpx.get(g["img"]).content))
    return images


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.timeout(400)
def test_worker_runs_every_image_workflow(tmp_path):
    """img2img, outpainting on an inpainting checkpoint, hires fix, a transparent image and a
    LoRA, each popped with its source URLs and parameters, generated on the volunteer's own
    Ray and checked in what the requester gets back."""
    api = ApiServer(tmp_path, served_models=["tiny-sd15", "tiny-sd15-inpainting"])
    api.start()
    try:
        _, key = api.create_user("painter")
        source = Image.new("RGB", (64, 64), (20, 20, 20))
        source.paste((250, 240, 60), (8, 8, 56, 24))  # not symmetric: rotated, it differs
        padded = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        padded.paste(source.convert("RGBA").resize((32, 32)), (16, 16))

        def queue(models=("tiny-sd15",), **body) -> str:
            return queue_workflow(api, list(models), **body)

        ids = {
            "plain": queue(),
            "img2img": queue(source_image=_png_b64(source), params={"denoising_strength": 0.05}),
            "img2img_other": queue(source_image=_png_b64(source.transpose(Image.Transpose.ROTATE_90)),
                                   params={"denoising_strength": 0.05}),
            "outpainting": queue(["tiny-sd15-inpainting"], source_image=_png_b64(padded),
                                 source_processing="outpainting"),
            "hires": queue(params={"width": 768, "height": 640, "hires_fix": True}),
            "transparent": queue(params={"transparent": True}),
            "lora": queue(params={"loras": [{"name": "tiny-lora"}]}),
        }
        images = work_through(api, key, ["tiny-sd15", "tiny-sd15-inpainting"], "painter-box", ids)
    finally:
        api.stop()
    pixels = {k: np.asarray(v.convert("RGB"), np.float32) for k, v in images.items()}
    diff = lambda a, b: float(np.abs(pixels[a] - pixels[b]).mean())  # noqa: E731
    assert images["hires"].size == (768, 640)
    assert images["outpainting"].size == (64, 64) and diff("outpainting", "plain") > 1.0
    assert images["transparent"].mode == "RGBA"
    assert np.asarray(images["transparent"].getchannel("A"), np.float32).std() > 1.0
    assert diff("lora", "plain") > 1.0
    assert diff("img2img", "img2img_other") > 3.0  # the source decides at a low strength


@pytest.mark.timeout(400)
def test_worker_runs_the_workflow_graphs(tmp_path):
    """ControlNet (annotator task, guided pass) and remix (encoder nodes, stage C + B) run as
    the same Ray graphs on the volunteer's own Ray as on the cluster."""
    api = ApiServer(tmp_path, served_models=["tiny-sd15", "tiny-cascade"])
    api.start()
    try:
        _, key = api.create_user("grapher")
        squares = Image.fromarray((np.indices((64, 64)).sum(axis=0) // 16 % 2 * 255).astype(np.uint8))

        def queue(models, **body) -> str:
            return queue_workflow(api, models, **body)

        ids = {
            "map": queue(["tiny-sd15"], source_image=_png_b64(squares.convert("RGB")),
                         params={"control_type": "canny", "return_control_map": True}),
            "guided": queue(["tiny-sd15"], source_image=_png_b64(squares.convert("RGB")),
                            params={"control_type": "canny"}),
            "remix": queue(["tiny-cascade"], source_image=_png_b64(squares.convert("RGB")),
                           source_processing="remix", params={"width": 128, "height": 128},
                           extra_source_images=[{"image": _png_b64(Image.new("RGB", (64, 64), (9, 99, 199))),
                                                 "strength": 2.0}]),
        }
        ids["qr"] = queue(["tiny-sd15"], params={
            "width": 512, "height": 512, "steps": 6, "workflow": "qr_code",
            "extra_texts": [{"reference": "qr_code", "text": "rayhorde worker"}]})
        images = work_through(api, key, ["tiny-sd15", "tiny-cascade"], "graph-box", ids)
    finally:
        api.stop()
    import cv2

    expected = cv2.Canny(np.asarray(squares), 100, 200) > 127
    assert np.array_equal(np.asarray(images["map"].convert("L")) > 127, expected)
    assert images["guided"].size == (64, 64) and images["remix"].size == (128, 128)
    from models.qr import decode

    assert "rayhorde worker" in decode(images["qr"])  # scanned (or blended) on the worker too


@pytest.mark.timeout(240)
def test_worker_survives_the_api_restarting(api, tmp_path):
    """The worker (its own process, with its own Ray) keeps running while the API stops and
    starts again on the same port and database, and does the work queued after the restart."""
    _, key = api.create_user("volunteer")
    first = queue_image(api)
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "RAYHORDE_WORKER_API_KEY": key, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "worker", "--url", api.url, "--models",
             "tiny-sd15", "--name", "steady", "--max-backoff", "1"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: image_status(api, first)["done"] or proc.poll() is not None,
                   timeout=180, what="the first request")
        assert proc.poll() is None, log_path.read_text()
        api.stop()
        wait_until(lambda: "cannot reach the API" in log_path.read_text(), timeout=30,
                   what="the worker noticing the API is gone")
        # A few more failed pops, backing off (each one says so).
        failed = log_path.read_text().count("cannot reach the API")
        wait_until(lambda: log_path.read_text().count("cannot reach the API") >= failed + 2,
                   timeout=30, what="more failed pops")
        api.start()  # same port, same database: a restarted API
        second = queue_image(api, seed="7")
        wait_until(lambda: image_status(api, second)["done"], timeout=90,
                   what="the request queued after the restart")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (gen,) = image_status(api, second)["generations"]
    assert gen["worker_name"] == "steady" and gen["seed"] == "7"
    log = log_path.read_text()
    assert "the API answers again" in log and "stopped: 2 generations done" in log


@pytest.mark.timeout(300)
def test_sigterm_finishes_the_job_in_flight_and_exits_cleanly(api, tmp_path):
    _, key = api.create_user("volunteer")
    # Big and long enough to take seconds on the tiny model (an anonymous request may go up to
    # 1024x1024 and 50 steps).
    rid = queue_image(api, width=768, height=768, steps=40, n=2)
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "RAYHORDE_WORKER_API_KEY": key, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "worker", "--url", api.url, "--models",
             "tiny-sd15", "--name", "graceful", "--num-cpus", "2", "--max-batch", "2"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        check = lambda: httpx.get(f"{api.url}/api/v2/generate/check/{rid}").json()  # noqa: E731
        wait_until(lambda: check()["processing"] == 2 or proc.poll() is not None, timeout=180,
                   what="the job in flight", interval=0.1)
        assert proc.poll() is None, log_path.read_text()
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        assert ray_processes, "the worker started no Ray processes?"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    st = image_status(api, rid)
    assert st["done"] and st["finished"] == 2, output
    assert {g["worker_name"] for g in st["generations"]} == {"graceful"}
    assert "received SIGTERM" in output and "2 done" in output and key not in output
    assert output.index("received SIGTERM") < output.index("2 done")  # it was in flight

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    wait_until(lambda: not any(alive(p) for p in ray_processes), timeout=30,
               what=f"the worker's Ray processes to end: {[p.pid for p in ray_processes if alive(p)]}")
