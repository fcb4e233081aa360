"""`rayhorde generate` (cluster/generate_cli.py) against the bare API (uvicorn in a thread,
SQLite) with an HTTP worker thread doing the jobs: its progress bar, the saved images, and a
request for a model nobody serves, which expires."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from api.app import create_app
from cluster import generate_cli
from cluster.cli import main
from conftest import app_server, free_port, make_ctx, webp_bytes
from test_economy import make_user

pytestmark = pytest.mark.timeout(120)
WEBP = webp_bytes(64, 64)  # the result of the 64x64 jobs below


@pytest.fixture
def api(sqlite_db, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ctx = make_ctx(sqlite_db, tmp_path, public_url=url, unclaimed_expiry_seconds=1.0,
                   expire_every_seconds=0.2)
    with app_server(create_app(ctx), port):
        yield ctx, url


def work(url: str, headers: dict, jobs: int, start: threading.Event, errors: list) -> None:
    """An HTTP worker: once `start` is set, pop, upload and submit until `jobs` are done."""
    start.wait(60)
    done, deadline = 0, time.monotonic() + 60
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        while done < jobs and time.monotonic() < deadline:
            job = http.post("/api/v2/generate/pop", json={
                "name": "cli-helper", "models": ["tiny-sd15"], "max_pixels": 1 << 20}).json()
            if not job.get("ids"):
                time.sleep(0.1)
                continue
            for i, gid in enumerate(job["ids"]):
                assert http.put(job["r2_uploads"][i], content=WEBP).status_code == 200
                r = http.post("/api/v2/generate/submit",
                              json={"id": gid, "generation": "R2", "state": "ok"})
                if r.status_code != 200:
                    errors.append(r.text)
                done += 1
    if done < jobs:
        errors.append(f"only {done} of {jobs} jobs done")


def test_generate_shows_progress_and_saves_the_images(api, tmp_path, capsys, monkeypatch):
    ctx, url = api
    _, headers = make_user(ctx, "helper")
    polled, start, errors = [], threading.Event(), []
    show = generate_cli.show

    def recording(bar, state):  # the worker starts once the bar has shown the queue
        polled.append(dict(state))
        show(bar, state)
        start.set()

    monkeypatch.setattr(generate_cli, "show", recording)
    worker = threading.Thread(target=work, args=(url, headers, 2, start, errors), daemon=True)
    worker.start()
    out = tmp_path / "img"
    code = main(["generate", "a lighthouse ### fog", "--model", "tiny-sd15", "--n", "2",
                 "--width", "64", "--height", "64", "--steps", "2", "--url", url,
                 "--out", str(out)])
    captured = capsys.readouterr()
    worker.join(30)
    assert code == 0 and not errors, (captured.err, errors)
    assert polled[0]["waiting"] == 2 and polled[-1]["finished"] == 2
    assert "queued" in captured.err and "queue position 0" in captured.err
    assert "done: 2/2 images" in captured.err  # tqdm's bar at the end
    saved = sorted(out.iterdir())
    assert len(saved) == 2 and all(p.read_bytes() == WEBP for p in saved)
    assert all(str(p) in captured.out for p in saved)


def test_generate_for_a_model_nobody_serves_ends_when_it_expires(api, capsys):
    _, url = api
    code = main(["generate", "a lighthouse", "--model", "Deliberate", "--url", url])
    err = capsys.readouterr().err
    assert code == 1
    assert "warning: models: no worker serves Deliberate right now" in err
    assert "no worker serves its model now" in err  # the bar said so while it waited
    assert "faulted" in err
