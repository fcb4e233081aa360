"""configs/cluster.yaml, the GPU cluster's Serve config, tested rather than only written:

(a) Serve's own schema (ServeDeploySchema) and our builder's (cluster/app.py AppArgs) accept the
    file as it is, and the catalog has every model it serves;
(b) the same file runs on this CPU with only its model names and GPU counts swapped for tiny
    ones (the weights settings that name real checkpoints too: `builtin` instead): PostgreSQL,
    S3 through a moto server, the secrets and endpoints from each node's environment as the
    file's header says, its autoscaling (sdxl and cascade start from zero replicas) and label
    selectors as written. One request of each family (sd15, sdxl, cascade, llm) goes through
    the HTTP API, and its images come back from the S3 bucket.

What this does not run: vLLM (the text model's `engine: vllm` becomes the tiny builtin model
with the model names) and anything on a GPU.
"""

from __future__ import annotations

import copy
import io
import os
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx
import pytest
import yaml
from PIL import Image

from conftest import free_port, POSTGRES_URL
from serve_harness import ROOT, SERVE_ENV, assert_served_by_haproxy, haproxy_pids

pytestmark = [pytest.mark.serve, pytest.mark.postgres, pytest.mark.timeout(1200)]
CONFIG = ROOT / "configs" / "cluster.yaml"
API = "http://127.0.0.1:8000/api/v2"
ANON = {"apikey": "0000000000", "Client-Agent": "rayhorde-tests:1:none"}
# The tiny model that stands in for each real one the file serves, by family.
TINY_BY_FAMILY = {"stable_diffusion_1": "tiny-sd15", "stable_diffusion_xl": "tiny-sdxl",
                  "stable_cascade": "tiny-cascade", "llm": "tiny-llm"}
# The settings that name real weights, and the tiny / builtin ones used instead.
WEIGHT_SETTINGS = {"annotator_weights": "builtin", "postprocessor_weights": "builtin", "alchemy_weights": "builtin"}


def cluster_config() -> dict:
    with open(CONFIG) as f:
        return yaml.safe_load(f)


def test_serve_and_our_builder_accept_the_file_as_written():
    from ray.serve.schema import ServeDeploySchema

    from cluster.app import AppArgs
    from models.catalog import load_catalog

    config = cluster_config()
    schema = ServeDeploySchema.model_validate(config)
    (app,) = [a for a in schema.applications if a.name == "rayhorde"]
    assert app.import_path == "cluster.app:build"
    names = {d["name"] for d in config["applications"][0]["deployments"]}
    assert names == {"api", "dispatcher", "sd15", "sdxl", "cascade", "llm", "postprocess", "alchemy"}
    args = AppArgs.model_validate(config["applications"][0]["args"])
    served = load_catalog(ROOT / "configs" / "models.yaml").select(args.settings["served_models"])
    assert {m.family.value for m in served.models} == set(TINY_BY_FAMILY)
    (text_model,) = [m for m in served.models if m.family.value == "llm"]
    assert text_model.engine == "vllm"  # the GPU cluster's text model runs on vLLM


def tiny_twin(entry) -> str:
    """The tiny model standing in for a real one: its family's, the inpainting one for an
    inpainting checkpoint."""
    return TINY_BY_FAMILY[entry.family.value] + ("-inpainting" if entry.inpainting else "")


def tiny_config(config: dict) -> dict:
    """The file with only model names and GPU counts (and weights settings) swapped."""
    from models.catalog import load_catalog

    config = copy.deepcopy(config)
    (app,) = [a for a in config["applications"] if a["name"] == "rayhorde"]
    settings = app["args"]["settings"]
    catalog = load_catalog(ROOT / "configs" / "models.yaml")
    settings["served_models"] = [tiny_twin(catalog.get(n)) for n in settings["served_models"]]
    settings.update(WEIGHT_SETTINGS)
    for deployment in app["deployments"]:
        deployment.get("ray_actor_options", {}).pop("num_gpus", None)
    for options in app["args"].get("volunteers", {}).get("actor_options", {}).values():
        options.pop("num_gpus", None)
    return config


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "moto_server exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


def wait_done(http: httpx.Client, url: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = http.get(url).json()
        if status.get("done") or status.get("faulted"):
            return status
        time.sleep(0.5)
    raise TimeoutError(f"{url} not done in {timeout} s: {status}")


def test_the_file_runs_on_a_cpu_with_tiny_models(tmp_path):
    import boto3
    import ray
    from ray import serve

    from api.db.migrate import reset
    from cluster.deploy import deploy

    config = tiny_config(cluster_config())
    served = config["applications"][0]["args"]["settings"]["served_models"]
    assert sorted(served) == sorted([*TINY_BY_FAMILY.values(), "tiny-sd15-inpainting"])
    reset(POSTGRES_URL).dispose()

    s3_port = free_port()
    moto = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(s3_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # What the file's header says each node's environment holds (secrets, endpoints).
    node_env = {
        **SERVE_ENV,
        "RAYHORDE_DATABASE_URL": POSTGRES_URL,
        "RAYHORDE_KEY_SALT": "cluster-config-test-salt-0123456789abcdef",
        "RAYHORDE_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    }
    saved_env = {k: os.environ.get(k) for k in node_env}
    node_id = None
    try:
        wait_for_port(s3_port, moto)
        bucket = config["applications"][0]["args"]["settings"]["s3_bucket"]
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket=bucket)
        os.environ.update(node_env)
        # The file's CPU reservations as written: logical CPUs enough for every replica at once.
        ray.init(address="local", num_cpus=16, include_dashboard=False)
        node_id = ray.get_runtime_context().get_node_id()
        deploy(config)
        assert_served_by_haproxy(node_id)

        with httpx.Client(timeout=60) as http:
            image_requests = {}
            for model, side in (("tiny-sd15", 64), ("tiny-sdxl", 64), ("tiny-cascade", 128)):
                r = http.post(f"{API}/generate/async", headers=ANON, json={
                    "prompt": "a lighthouse on a cliff", "models": [model],
                    "params": {"width": side, "height": side, "steps": 3, "n": 2, "seed": "7"}})
                assert r.status_code == 202, r.text
                image_requests[model] = (r.json()["id"], side)
            r = http.post(f"{API}/generate/text/async", headers=ANON, json={
                "prompt": "Once upon a time", "models": ["tiny-llm"],
                "params": {"max_length": 16, "max_context_length": 512, "seed": 3}})
            assert r.status_code == 202, r.text
            text_id = r.json()["id"]

            for model, (rid, side) in image_requests.items():
                status = wait_done(http, f"{API}/generate/status/{rid}")
                assert status["done"] and not status["faulted"], (model, status)
                gens = status["generations"]
                assert [g["model"] for g in gens] == [model, model]
                for g in gens:  # a presigned URL of the bucket, not base64
                    assert urlparse(g["img"]).port == s3_port and bucket in g["img"], g["img"]
                    data = http.get(g["img"]).content
                    with Image.open(io.BytesIO(data)) as im:
                        assert im.format == "WEBP" and im.size == (side, side)
            text = wait_done(http, f"{API}/generate/text/status/{text_id}")
            assert text["done"] and not text["faulted"], text
            (gen,) = text["generations"]
            assert gen["model"] == "tiny-llm" and gen["text"]
        stored = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
        assert len([o for o in stored if o["Key"].endswith(".webp")]) >= 6

        # Autoscaling as written: sdxl and cascade started from zero replicas and scaled up for
        # their requests; the label selectors kept every replica on this (non-volunteer) node.
        apps = serve.status().applications["rayhorde"].deployments
        for name in ("sdxl", "cascade"):
            assert apps[name].replica_states.get("RUNNING", 0) >= 1, (name, apps[name])
        assert apps["api"].replica_states.get("RUNNING", 0) >= 2  # min_replicas: 2
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            moto.send_signal(signal.SIGTERM)
            moto.wait(timeout=30)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        if node_id is not None:
            deadline = time.time() + 30
            while haproxy_pids(node_id) and time.time() < deadline:
                time.sleep(0.5)
            left = haproxy_pids(node_id)
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            assert not left, f"haproxy outlived the cluster: {left}"
