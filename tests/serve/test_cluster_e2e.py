"""The whole image path on a real local Ray + Serve (HAProxy ingress): HTTP submit -> database
queue -> dispatcher -> family deployments -> storage -> status, for every family; then a
replica killed mid-generation, and a client built for the AI Horde (horde-sdk, strict mode)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time

import httpx
import pytest
from PIL import Image

from serve_harness import ROOT, running_cluster, wait_done

pytestmark = [pytest.mark.serve, pytest.mark.timeout(900)]
API = "http://127.0.0.1:8000/api/v2"
ANON = {"apikey": "0000000000", "Client-Agent": "rayhorde-tests:1:none"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("cluster")) as info:
        yield info


def make_user(cluster, name: str, kudos: float = 0) -> tuple[str, str]:
    """(alias, API key) of a new user, made with `rayhorde users create`."""
    import re
    import sys

    env = {**os.environ, "RAYHORDE_DATABASE_URL": cluster["db"].url}
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "users", "create", name,
                          "--kudos", str(kudos)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return out.split()[1], re.search(r"API key: (\S+)", out).group(1)


def submit(http: httpx.Client, headers: dict = ANON, **body) -> str:
    body.setdefault("prompt", "a lighthouse on a cliff ### fog")
    body.setdefault("models", ["tiny-sd15"])
    r = http.post(f"{API}/generate/async", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def images_of(http: httpx.Client, status: dict) -> list[bytes]:
    out = []
    for g in status["generations"]:
        img = g["img"]
        out.append(http.get(img).content if img.startswith("http") else
                   __import__("base64").b64decode(img))
    return out


def generate(http, **body) -> tuple[dict, list[bytes]]:
    st = wait_done(http, submit(http, **body))
    assert st["done"] and not st["faulted"], st
    return st, images_of(http, st)


@pytest.mark.parametrize("model, size", [("tiny-sd15", (128, 64)), ("tiny-sdxl", (64, 128)),
                                         ("tiny-cascade", (128, 128))])
def test_each_family_generates_through_the_api(cluster, model, size):
    with httpx.Client(timeout=30) as http:
        st, imgs = generate(http, models=[model], params={
            "width": size[0], "height": size[1], "steps": 4, "seed": "11", "n": 2})
    assert [g["model"] for g in st["generations"]] == [model, model]
    assert [g["seed"] for g in st["generations"]] == ["11", "12"]
    for data in imgs:
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "WEBP" and im.size == size
    assert imgs[0] != imgs[1]


def test_same_seed_same_image_and_n_matches_single_calls(cluster):
    base = {"width": 64, "height": 64, "steps": 3, "sampler_name": "k_euler"}
    with httpx.Client(timeout=30) as http:
        _, batch = generate(http, params={**base, "seed": "100", "n": 3})
        _, single = generate(http, params={**base, "seed": "101"})
        _, again = generate(http, params={**base, "seed": "101"})
        _, other = generate(http, params={**base, "seed": "999"})
        _, inline = generate(http, r2=False, params={**base, "seed": "101"})
    assert single == again == [batch[1]] == inline
    assert other != single


VARIANTS = [
    {"prompt": "a completely different prompt"},
    {"prompt": "a lighthouse on a cliff ### sunshine"},
    {"params": {"cfg_scale": 12}},
    {"params": {"steps": 5}},
    {"params": {"clip_skip": 2}},
    {"params": {"karras": False, "sampler_name": "k_dpmpp_2m"}},
    *[{"params": {"sampler_name": s}} for s in (
        "k_lms", "k_heun", "k_euler_a", "k_dpm_2", "k_dpm_2_a", "k_dpm_fast", "k_dpm_adaptive",
        "k_dpmpp_2s_a", "k_dpmpp_2m", "dpmsolver", "k_dpmpp_sde", "DDIM", "lcm")],
]


def test_parameters_change_the_image(cluster):
    base_params = {"width": 64, "height": 64, "steps": 4, "seed": "5", "sampler_name": "k_euler",
                   "cfg_scale": 7, "karras": True}
    with httpx.Client(timeout=30) as http:
        _, (reference,) = generate(http, params=base_params)
        ids = {}
        for i, variant in enumerate(VARIANTS):
            body = {"prompt": variant.get("prompt", "a lighthouse on a cliff ### fog"),
                    "params": {**base_params, **variant.get("params", {})}}
            ids[i] = submit(http, **body)
        for i, rid in ids.items():
            st = wait_done(http, rid)
            assert st["done"], (VARIANTS[i], st)
            (img,) = images_of(http, st)
            assert img != reference, f"{VARIANTS[i]} gave the reference image"


def test_replica_killed_mid_generation_still_completes(cluster):
    import ray

    _, key = make_user(cluster, "patient", kudos=1000)  # a long job needs its kudos upfront
    with httpx.Client(timeout=30) as http:
        rid = submit(http, {"apikey": key}, models=["tiny-sd15"],
                     params={"width": 512, "height": 512, "steps": 150, "seed": "3"})
        victim = None
        deadline = time.time() + 120
        while time.time() < deadline and victim is None:
            if http.get(f"{API}/generate/check/{rid}").json()["processing"] == 1:
                actor = cluster["replica_actor"]("sd15")
                # Killed inside the call: once the replica itself counts it as ongoing (a 150-step
                # job then runs for seconds), not after a guessed while.
                if ray.get(actor.get_num_ongoing_requests.remote(), timeout=30) >= 1:
                    victim = actor
            time.sleep(0.1)
        assert victim is not None, "the job never started on the replica"
        ray.kill(victim, no_restart=True)
        st = wait_done(http, rid, timeout=400)
    assert st["done"] and st["finished"] == 1, st
    assert st["generations"][0]["seed"] == "3"
    assert cluster["attempts"](rid) == [2]


def test_horde_sdk_client_works_unchanged(cluster):
    python = cluster["horde_sdk_python"]()
    env = {**os.environ, "AI_HORDE_URL": "http://127.0.0.1:8000/api/", "TESTS_ONGOING": "1"}
    proc = subprocess.run(
        [python, str(ROOT / "tests/compat/horde_sdk_image_client.py"), "tiny-sd15"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] and len(summary["images"]) >= 1


def test_cluster_replicas_are_trusted_workers(cluster):
    with httpx.Client(timeout=30) as http:
        deadline = time.time() + 60
        while time.time() < deadline:
            listed = {w["name"]: w for w in http.get(f"{API}/workers").json()}
            sd = listed.get("rayhorde-cluster/stable_diffusion_1")
            if sd and sd["threads"] >= 1 and sd["online"]:
                break
            time.sleep(1)
        assert sd["trusted"] and sd["models"] == ["tiny-sd15", "tiny-sd15-inpainting"], sd
        counts = {m["name"]: m["count"] for m in http.get(f"{API}/status/models").json()}
        assert counts["tiny-sd15"] >= 1 and counts["tiny-cascade"] >= 1
        # A request may target the cluster's own worker, and it does the job.
        st, _ = generate(http, workers=[sd["id"]], params={"width": 64, "height": 64, "steps": 2})
        assert st["generations"][0]["worker_id"] == sd["id"]


def test_horde_sdk_worker_pops_uploads_and_submits(cluster):
    alias, key = make_user(cluster, "sdk-volunteer")
    name = "sdk-worker-1"
    with httpx.Client(timeout=30) as http:
        # Its first pop registers the worker; then a client queues work only it may take (the
        # in-cluster replicas may not), through the request-side `workers` choice.
        first = http.post(f"{API}/generate/pop", headers={"apikey": key},
                          json={"name": name, "models": ["tiny-sd15"], "max_pixels": 262144})
        assert first.status_code == 200 and first.json()["ids"] == []
        wid = next(w["id"] for w in http.get(f"{API}/workers").json() if w["name"] == name)
        rid = submit(http, workers=[wid], prompt="a red boat ### rain",
                     params={"n": 2, "width": 64, "height": 64, "steps": 4, "seed": "77"})
        python = cluster["horde_sdk_python"]()
        env = {**os.environ, "AI_HORDE_URL": "http://127.0.0.1:8000/api/", "TESTS_ONGOING": "1"}
        proc = subprocess.run(
            [python, str(ROOT / "tests/compat/horde_sdk_image_worker.py"), "tiny-sd15",
             "--apikey", key, "--name", name], env=env, capture_output=True, text=True,
            timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["ok"] and out["prompt"] == "a red boat ### rain" and out["seed"] == "77"
        assert len(out["ids"]) == 2 and all(r > 0 for r in out["rewards"])
        assert out["kudos"] == pytest.approx(sum(out["rewards"]), abs=0.02)
        assert out["worker_requests_fulfilled"] == 2
        st = http.get(f"{API}/generate/status/{rid}").json()
        assert st["done"] and {g["worker_name"] for g in st["generations"]} == {name}
        assert sorted(g["seed"] for g in st["generations"]) == ["77", "78"]
        for data in images_of(http, st):
            with Image.open(io.BytesIO(data)) as im:
                assert im.size == (64, 64)


def text_done(http: httpx.Client, rid: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = http.get(f"{API}/generate/text/status/{rid}").json()
        if st["done"] or st["faulted"]:
            return st
        time.sleep(0.2)
    raise AssertionError(f"text request {rid} not done: {st}")


def test_text_through_the_cluster_is_seeded(cluster):
    params = {"max_length": 24, "max_context_length": 256, "temperature": 1.2, "top_k": 0,
              "top_p": 1.0}
    with httpx.Client(timeout=30) as http:
        def generate_text(seed, n=1):
            r = http.post(f"{API}/generate/text/async", headers=ANON, json={
                "prompt": "The lighthouse keeper said", "models": ["tiny-llm"],
                "params": {**params, "seed": seed, "n": n}})
            assert r.status_code == 202, r.text
            st = text_done(http, r.json()["id"])
            assert st["done"], st
            return [g["text"] for g in st["generations"]], st
        (a,), st = generate_text("1234")
        (b,), _ = generate_text("1234")
        (c,), _ = generate_text("99")
        many, many_st = generate_text("1234", n=3)
    assert a == b and a != c and len(a) > 0
    assert many[0] == a and len(set(many)) == 3  # seeds 1234, 1235, 1236
    gen = st["generations"][0]
    assert gen["model"] == "tiny-llm" and gen["worker_name"] == "rayhorde-cluster/llm"
    assert gen["seed"] == 1234


def test_horde_sdk_text_client_works_unchanged(cluster):
    python = cluster["horde_sdk_python"]()
    env = {**os.environ, "AI_HORDE_URL": "http://127.0.0.1:8000/api/", "TESTS_ONGOING": "1"}
    proc = subprocess.run(
        [python, str(ROOT / "tests/compat/horde_sdk_text_client.py"), "tiny-llm"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] and isinstance(summary["texts"][0], str)


def test_openai_client_completions_chat_and_streaming(cluster):
    import openai

    _, key = make_user(cluster, "openai-user", kudos=100)
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=key, max_retries=0)
    assert "tiny-llm" in [m.id for m in client.models.list().data]
    done = client.completions.create(model="tiny-llm", prompt="Once upon a time", max_tokens=12,
                                     seed=7, temperature=0.8)
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.completion_tokens >= 1 and done.usage.prompt_tokens >= 1
    again = client.completions.create(model="tiny-llm", prompt="Once upon a time", max_tokens=12,
                                      seed=7, temperature=0.8)
    assert again.choices[0].text == done.choices[0].text
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=16,
                                          seed=3)
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=16,
                                            seed=3, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # it arrived in parts, as it was generated
    assert "".join(pieces) == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny-llm", prompt="x", presence_penalty=1.0)
    assert "presence_penalty" in str(bad.value)


def test_generate_command_line(cluster, tmp_path):
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cluster.cli", "generate", *args,
                               "--url", "http://127.0.0.1:8000"], capture_output=True, text=True,
                              timeout=300)

    images = cli("a red boat ### rain", "--model", "tiny-sdxl", "--n", "2", "--width", "128",
                 "--height", "64", "--steps", "3", "--seed", "5", "--out", str(tmp_path / "img"))
    assert images.returncode == 0, images.stderr
    saved = sorted((tmp_path / "img").iterdir())
    assert len(saved) == 2 and "queued" in images.stderr and "done" in images.stderr
    for path in saved:
        with Image.open(path) as im:
            assert im.size == (128, 64)
    text = cli("--text", "The keeper said", "--model", "tiny-llm", "--max-length", "20",
               "--seed", "4", "--out", str(tmp_path / "txt"))
    assert text.returncode == 0, text.stderr
    (saved_text,) = (tmp_path / "txt").iterdir()
    assert text.stdout.strip() == saved_text.read_text().strip()
    bad = cli("x", "--model", "no-such-model")
    assert bad.returncode == 1 and "models" in bad.stderr
