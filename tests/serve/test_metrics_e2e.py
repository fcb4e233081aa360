"""The cluster's Prometheus metrics (api/metrics.py), scraped from Ray's metrics export of a
running cluster (`make run`'s configs/local.yaml, tiny-sd15 only): the counters move by exactly the work done,
through the cluster's own replicas and through an HTTP volunteer, the queue-depth gauge follows
the queue, kudos burned and minted match the ledger, and a forced 429 is counted."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import webp_bytes
from serve_harness import ROOT, running_cluster, wait_done

pytestmark = [pytest.mark.serve, pytest.mark.timeout(900)]
API = "http://127.0.0.1:8000/api/v2"
ANON = {"apikey": "0000000000", "Client-Agent": "rayhorde-tests:1:none"}
WEBP = base64.b64encode(webp_bytes(64, 64)).decode()  # the result of a 64x64 job
# Exported names: Ray's `ray_` prefix; counters end in `_total`, histograms in `_count` etc.
FINISHED = "ray_rayhorde_jobs_finished_total"
STARTED = "ray_rayhorde_jobs_started_total"
FAULTED = "ray_rayhorde_jobs_faulted_total"
CLAIM_LATENCY = "ray_rayhorde_claim_latency_seconds_count"
GENERATION = "ray_rayhorde_generation_seconds_count"
GRAPH_NODE = "ray_rayhorde_graph_node_seconds_count"
MINTED = "ray_rayhorde_kudos_minted_total"
BURNED = "ray_rayhorde_kudos_burned_total"
RATE_LIMITED = "ray_rayhorde_rate_limited_total"
QUEUE_DEPTH = "ray_rayhorde_queue_depth"
SD15 = {"model": "tiny-sd15", "kind": "image"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """configs/local.yaml serving tiny-sd15 alone (the other families' replicas would only
    slow the start); anonymous submits 3 a minute, so a fourth is refused (users keep their
    own tiers)."""
    workdir = tmp_path_factory.mktemp("metrics")
    with open(ROOT / "configs" / "local.yaml") as f:
        config = yaml.safe_load(f)
    app = config["applications"][0]
    app["deployments"] = [d for d in app["deployments"]
                          if d["name"] in ("api", "dispatcher", "sd15", "postprocess", "alchemy")]
    app["args"]["families"] = {"stable_diffusion_1": app["args"]["families"]["stable_diffusion_1"]}
    with open(workdir / "local-sd15.yaml", "w") as f:
        yaml.safe_dump(config, f)
    with running_cluster(workdir, config=workdir / "local-sd15.yaml", settings={
            "served_models": ["tiny-sd15"], "rate_limit_submit": "3/minute"}) as info:
        yield info


class Scrape:
    def __init__(self, text: str):
        self.samples = [s for family in text_string_to_metric_families(text)
                        for s in family.samples if s.name.startswith("ray_rayhorde_")]

    def total(self, name: str, **labels: str) -> float:
        """The sum over every process's series (Ray labels each with its WorkerId)."""
        return sum(s.value for s in self.samples if s.name == name
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    def gauge(self, name: str, **labels: str) -> float | None:
        values = [s.value for s in self.samples if s.name == name
                  and all(s.labels.get(k) == v for k, v in labels.items())]
        return max(values) if values else None


def scrape(cluster) -> Scrape:
    r = httpx.get(cluster["metrics_url"], timeout=10)
    assert r.status_code == 200
    return Scrape(r.text)


def wait_for(cluster, what: str, check, timeout: float = 120) -> Scrape:
    """Scrape until `check(scrape)` holds: Ray exports what processes record every few
    seconds."""
    deadline = time.monotonic() + timeout
    while True:
        now = scrape(cluster)
        if check(now):
            return now
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def make_user(cluster, name: str, kudos: float = 0) -> dict:
    env = {**os.environ, "RAYHORDE_DATABASE_URL": cluster["db"].url}
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "users", "create", name,
                          "--kudos", str(kudos)], env=env, capture_output=True, text=True,
                         check=True).stdout
    return {"apikey": re.search(r"API key: (\S+)", out).group(1),
            "Client-Agent": "rayhorde-tests:1:none"}


def kudos_of(http: httpx.Client, headers: dict) -> float:
    r = http.get(f"{API}/find_user", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["kudos"]


def submit(http: httpx.Client, headers: dict, **body) -> dict:
    body = {"prompt": "a lighthouse on a cliff", "models": ["tiny-sd15"], **body}
    r = http.post(f"{API}/generate/async", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()


def test_counters_move_with_the_work(cluster):
    before = scrape(cluster)
    cluster_sd15 = {**SD15, "worker_kind": "cluster"}
    http_sd15 = {**SD15, "worker_kind": "http"}
    with httpx.Client(timeout=30) as http:
        requester = make_user(cluster, "metrics-requester", kudos=1000)
        volunteer = make_user(cluster, "metrics-volunteer")

        # The cluster's own replicas: two images, each post-processed by a graph node.
        paid_before = kudos_of(http, requester)
        accepted = submit(http, requester, params={
            "width": 64, "height": 64, "steps": 3, "n": 2, "seed": "5",
            "post_processing": ["RealESRGAN_x2plus"]})
        chk = wait_done(http, accepted["id"], timeout=300)
        assert chk["finished"] == 2 and not chk["faulted"], chk
        spent = paid_before - kudos_of(http, requester)
        assert spent == pytest.approx(accepted["kudos"], abs=0.01)
        now = wait_for(cluster, "2 more finished tiny-sd15 jobs", lambda s: s.total(
            FINISHED, **cluster_sd15) >= before.total(FINISHED, **cluster_sd15) + 2)

        def moved(name: str, **labels) -> float:  # since `before`, as of the last scrape
            return now.total(name, **labels) - before.total(name, **labels)

        assert moved(FINISHED, **cluster_sd15) == 2
        assert moved(STARTED, **cluster_sd15) == 2
        assert moved(CLAIM_LATENCY, kind="image", worker_kind="cluster") == 2
        assert moved(GENERATION, **cluster_sd15) == 2
        assert moved(GRAPH_NODE, workflow="post-processing", node="RealESRGAN_x2plus") == 2
        # The requester paid the price (the request's tax included); the worker's owner (the
        # horde, for the cluster's replicas) earned it less the tax.
        now = wait_for(cluster, "kudos counted", lambda s: s.total(BURNED, kind="generation")
                       - before.total(BURNED, kind="generation") > 0)
        assert moved(BURNED, kind="generation") == pytest.approx(spent, abs=0.01)
        assert moved(MINTED, kind="reward") == pytest.approx(spent - 1.0, abs=0.01)

        # An HTTP volunteer: three jobs queued for it alone wait (the gauge shows them), it
        # pops them, finishes two and reports the third faulted (back to the queue).
        r = http.post(f"{API}/generate/pop", headers=volunteer, json={
            "name": "metrics-volunteer", "models": ["tiny-sd15"], "max_pixels": 512 * 512})
        assert r.status_code == 200 and r.json()["ids"] == [], r.text
        workers = http.get(f"{API}/workers").json()
        worker_id = next(w["id"] for w in workers if w["name"] == "metrics-volunteer")
        rid = submit(http, requester, workers=[worker_id],
                     params={"width": 64, "height": 64, "steps": 3, "n": 3})["id"]
        wait_for(cluster, "a queue depth of 3", lambda s: s.gauge(QUEUE_DEPTH, **SD15) == 3)
        job = http.post(f"{API}/generate/pop", headers=volunteer, json={
            "name": "metrics-volunteer", "models": ["tiny-sd15"], "max_pixels": 512 * 512,
            "amount": 3}).json()
        assert len(job["ids"]) == 3, job
        for gid, state in zip(job["ids"], ["ok", "ok", "faulted"], strict=True):
            r = http.post(f"{API}/generate/submit", headers=volunteer,
                          json={"id": gid, "generation": WEBP, "state": state})
            assert r.status_code == 200, r.text
        now = wait_for(cluster, "the volunteer's jobs counted", lambda s: s.total(
            FINISHED, **http_sd15) - before.total(FINISHED, **http_sd15) >= 2
            and s.total(FAULTED, **http_sd15) - before.total(FAULTED, **http_sd15) >= 1)
        assert moved(STARTED, **http_sd15) == 3
        assert moved(FINISHED, **http_sd15) == 2
        assert moved(FAULTED, **http_sd15, reason="failed") == 1
        assert moved(GENERATION, **http_sd15) == 2
        assert moved(FINISHED, **cluster_sd15) == 2  # the cluster took none of them
        wait_for(cluster, "the faulted job waiting again",
                 lambda s: s.gauge(QUEUE_DEPTH, **SD15) == 1)
        assert http.delete(f"{API}/generate/status/{rid}").status_code == 200
        wait_for(cluster, "an empty queue", lambda s: s.gauge(QUEUE_DEPTH, **SD15) == 0)

        # Anonymous submits past 3 a minute: the fourth is refused, and counted.
        codes = [http.post(f"{API}/generate/async", headers=ANON, json={
            "prompt": "p", "models": ["tiny-sd15"], "dry_run": True}).status_code
            for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        now = wait_for(cluster, "the refusal counted", lambda s: s.total(
            RATE_LIMITED, limit="submit") > before.total(RATE_LIMITED, limit="submit"))
        assert moved(RATE_LIMITED, limit="submit") == 1
