"""Source images cost the horde nothing until the caller is known and its request allowed
(issue 21, finding 6): a bad key, an anonymous caller asking for what only registered or
trusted users may, and a caller past its decoded-pixel budget are refused before any source
is fetched or decoded. On SQLite and PostgreSQL, through the HTTP API."""

from __future__ import annotations

import base64
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from conftest import make_ctx, png_b64, png_bytes, serving_png
from test_economy import ANON, make_user, submit

pytestmark = pytest.mark.timeout(120)

SOURCE = Image.new("RGB", (256, 256), (200, 30, 30))  # 65,536 pixels


@contextmanager
def counting_server(data: bytes):
    """conftest's image server; yields (its base URL, the paths it was asked for)."""
    hits: list[str] = []
    with serving_png(data, hits) as url:
        yield url.rsplit("/", 1)[0], hits


def remix(url: str, extras: int) -> dict:
    return {"source_image": f"{url}/source.png", "source_processing": "remix",
            "models": ["tiny-cascade"],
            "extra_source_images": [{"image": f"{url}/extra-{i}.png"} for i in range(extras)]}


def sources_stored(ctx) -> int:
    root = ctx.storage.root / "sources"
    return sum(1 for _ in root.rglob("*.png")) if root.exists() else 0


@pytest.fixture
def open_ctx(db, tmp_path):
    return make_ctx(db, tmp_path, allow_private_source_urls=True)


def test_refused_callers_cost_no_fetch(open_ctx):
    ctx = open_ctx
    _, registered = make_user(ctx, "plain", kudos=1000)
    with counting_server(png_bytes(SOURCE)) as (url, hits), TestClient(create_app(ctx)) as client:
        # An unknown key: 401, and not one source fetched.
        r = submit(client, headers={"apikey": "not-a-key-of-anyone-here"}, **remix(url, 2))
        assert r.status_code == 401 and r.json()["rc"] == "InvalidAPIKey", r.text
        assert hits == []
        # Anonymous callers and untrusted users may send one extra source, not two: 403
        # before the fetch.
        for headers in (ANON, registered):
            r = submit(client, headers=headers, **remix(url, 2))
            assert r.status_code == 403 and r.json()["rc"] == "InvalidExtraSourceImages", r.text
            assert "extra_source_images" in r.json()["message"]
        assert hits == []
        # A job that needs kudos upfront, sent anonymously: 403, nothing fetched.
        r = submit(client, headers=ANON, source_image=f"{url}/big.png",
                   params={"width": 1024, "height": 1024, "steps": 60})
        assert r.status_code == 403 and r.json()["rc"] == "KudosUpfront", r.text
        assert hits == []
        assert sources_stored(ctx) == 0
        # The same remix with one extra source is accepted: both images fetched, once each.
        r = submit(client, headers=registered, **remix(url, 1))
        assert r.status_code == 202, r.text
        assert sorted(hits) == ["/extra-0.png", "/source.png"]
        assert sources_stored(ctx) == 2


def _truncated_png() -> bytes:
    """A PNG whose header is whole (256x256) and whose pixel data is cut short: reading the
    header succeeds, decoding fails."""
    noise = Image.frombytes("RGB", (256, 256), bytes(range(256)) * 768)
    data = png_bytes(noise)
    return data[: len(data) // 2]


def test_decoded_pixels_count_against_the_callers_budget(db, tmp_path):
    # 200,000 pixels a minute for an address, 400,000 for a registered user: three 256x256
    # sources (65,536 each) fit an address's budget, a fourth does not.
    ctx = make_ctx(db, tmp_path, rate_limit_source_pixels="200000/minute",
                   rate_limit_source_pixels_registered="400000/minute")
    _, registered = make_user(ctx, "painter", kudos=1000)
    with TestClient(create_app(ctx)) as client:
        for _ in range(3):
            r = submit(client, headers=ANON, source_image=png_b64(SOURCE))
            assert r.status_code == 202, r.text
        over = submit(client, headers=ANON, source_image=png_b64(SOURCE))
        assert over.status_code == 429 and over.json()["rc"] == "TooManyRequests", over.text
        assert "source image pixels" in over.json()["message"]
        assert int(over.headers["Retry-After"]) >= 1
        # The budget is spent before pixels are decoded: an image that would fail to decode
        # is refused for the budget, not for its data.
        broken = submit(client, headers=ANON,
                        source_image=base64.b64encode(_truncated_png()).decode())
        assert broken.status_code == 429, broken.text
        # A registered user has a budget of its own, and a larger one: six sources fit.
        for _ in range(6):
            r = submit(client, headers=registered, source_image=png_b64(SOURCE))
            assert r.status_code == 202, r.text
        r = submit(client, headers=registered, source_image=png_b64(SOURCE))
        assert r.status_code == 429, r.text
        # Alchemy's source counts against the same budget.
        r = client.post("/api/v2/interrogate/async", headers=registered,
                        json={"forms": [{"name": "caption"}], "source_image": png_b64(SOURCE)})
        assert r.status_code == 429 and "source image pixels" in r.json()["message"], r.text
    # Exactly the accepted requests' sources were stored.
    assert sources_stored(ctx) == 3 + 6


def test_within_budget_a_broken_source_is_a_400_naming_the_field(db, tmp_path):
    ctx = make_ctx(db, tmp_path, rate_limit_source_pixels="200000/minute")
    with TestClient(create_app(ctx)) as client:
        r = submit(client, headers=ANON, source_image=base64.b64encode(_truncated_png()).decode())
        assert r.status_code == 400 and r.json()["rc"] == "SourceImageInvalid", r.text
        assert r.json()["message"].startswith("source_image:")
