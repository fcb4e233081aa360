"""Object storage: the local folder and S3 (against a moto server), through the same interface
and through the API's status answers."""

from __future__ import annotations

import socket

import httpx
import pytest

from api.db import queue
from api.storage import LocalStorage, S3Storage

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(var, value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_local_storage_round_trip_and_refuses_escaping_keys(tmp_path):
    store = LocalStorage(tmp_path, "http://127.0.0.1:8000")
    store.put("images/a/b.webp", b"data", "image/webp")
    assert store.get("images/a/b.webp") == b"data"
    assert store.url("images/a/b.webp") == "http://127.0.0.1:8000/api/v2/objects/images/a/b.webp"
    for bad in ("../etc/passwd", "/abs", "a/../../b", "sp ace"):
        with pytest.raises(ValueError):
            store.put(bad, b"x", "image/webp")


def test_s3_storage_presigned_urls(s3_endpoint):
    store = S3Storage("rayhorde-test", s3_endpoint, "us-east-1", 600)
    store.ensure_bucket()
    store.put("images/x/y.webp", b"RIFF-s3", "image/webp")
    assert store.get("images/x/y.webp") == b"RIFF-s3"
    url = store.url("images/x/y.webp")
    assert "Signature" in url or "X-Amz-Signature" in url
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == b"RIFF-s3"


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_status_serves_s3_urls(client, ctx, s3_endpoint):
    store = S3Storage("rayhorde-api", s3_endpoint, "us-east-1", 600)
    store.ensure_bucket()
    ctx.storage = store
    rid = client.post("/api/v2/generate/async", json={"prompt": "p", "models": ["tiny-sd15"]},
                      headers={"apikey": "0000000000"}).json()["id"]
    (job,) = queue.claim(ctx.db, queue.Capabilities("w", ["tiny-sd15"]), 1)
    store.put(f"images/{rid}/{job.generation_id}.webp", b"RIFF-api", "image/webp")
    queue.finish(ctx.db, [queue.Result(job.generation_id, job.claim_id,
                                       f"images/{rid}/{job.generation_id}.webp", 1, "w", "w",
                                       owner_id=0)])
    img = client.get(f"/api/v2/generate/status/{rid}").json()["generations"][0]["img"]
    assert img.startswith(s3_endpoint)
    assert httpx.get(img).content == b"RIFF-api"
