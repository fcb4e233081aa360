"""Shared fixtures. Database tests run on both SQLite and PostgreSQL (the local server at
127.0.0.1:5432, db `test`, or RAYHORDE_TEST_POSTGRES_URL)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from contextlib import contextmanager

import pytest
from sqlalchemy import event

from api.app import create_app, make_limiter
from api.db.migrate import reset, upgrade
from api.db.session import Database
from api.images import Context
from api.settings import Settings
from api.storage import LocalStorage
from models.adapters import load_adapter_catalog
from models.catalog import load_catalog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSTGRES_URL = os.environ.get("RAYHORDE_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")
HORDE_SDK_VENV = os.path.join(ROOT, ".cache", "horde-sdk-venv")
HORDE_SDK_VERSION = "0.33.3"  # strict mode accepts exactly the fields this version declares
TINY_MODELS = ["tiny-sd15", "tiny-sd15-inpainting", "tiny-sdxl", "tiny-cascade", "tiny-llm"]


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path}/rayhorde.db")
        upgrade(database)
    else:
        database = reset(POSTGRES_URL)
    yield database
    database.dispose()


@pytest.fixture
def sqlite_db(tmp_path):
    database = Database(f"sqlite:///{tmp_path}/rayhorde.db")
    upgrade(database)
    yield database
    database.dispose()


# Tests make many calls quickly; the rate limit tests set their own limits.
NO_RATE_LIMITS = {"rate_limit_submit": "100000/minute", "rate_limit_poll": "100000/minute",
                  "rate_limit_pop": "100000/minute", "rate_limit_users": "100000/minute",
                  "rate_limit_source_pixels": "100000000000/minute"}


def make_settings(db: Database, tmp_path, **overrides) -> Settings:
    return Settings(**{"database_url": db.url, "storage_dir": str(tmp_path / "objects"),
                       "catalog_path": os.path.join(ROOT, "configs", "models.yaml"),
                       "adapter_catalog_path": os.path.join(ROOT, "configs", "adapters.yaml"),
                       "served_models": TINY_MODELS, **NO_RATE_LIMITS, **overrides})


def make_ctx(db: Database, tmp_path, **overrides) -> Context:
    settings = make_settings(db, tmp_path, **overrides)
    catalog = load_catalog(settings.catalog_path).select(settings.served_models)
    return Context(settings=settings, db=db,
                   storage=LocalStorage(settings.storage_dir, settings.public_url,
                                        settings.key_salt),
                   catalog=catalog, limiter=make_limiter(settings),
                   adapters=load_adapter_catalog(settings.adapter_catalog_path))


@pytest.fixture
def ctx(db, tmp_path) -> Context:
    return make_ctx(db, tmp_path)


@pytest.fixture
def client(ctx):
    from fastapi.testclient import TestClient

    with TestClient(create_app(ctx)) as c:
        yield c


class StatementCounter:
    def __init__(self):
        self.statements: list[str] = []

    def __call__(self, conn, cursor, statement, parameters, context, executemany):
        self.statements.append(statement)

    @property
    def count(self) -> int:
        # BEGIN/COMMIT are transaction control, counted apart by the AI Horde's figures too.
        return sum(1 for s in self.statements
                   if not s.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK")))


@contextmanager
def count_statements(db: Database):
    counter = StatementCounter()
    event.listen(db.engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        event.remove(db.engine, "before_cursor_execute", counter)


def add_request(db: Database, *, n=1, models=("tiny-sd15",), priority=0.0, created=None, steps=10,
                width=512, height=512, user_id=0, kudos=None, prompt="p", filters=None,
                seeds=None) -> str:
    """Queue a request straight through api.db.queue (no HTTP, no pricing rules): `priority`
    is its head start in seconds, `filters` any queue.EntryFilters fields. Returns its id."""
    from api.db import queue
    from api.db.models import Request

    created = time.time() if created is None else created
    kudos = float(n + 1) if kudos is None else kudos
    with db.write() as s:
        req = Request(kind="image", user_id=user_id, prompt=prompt, negative_prompt="", n=n,
                      params={"width": width, "height": height, "steps": steps, "cfg_scale": 5,
                              "sampler_name": "k_euler", "karras": True, "clip_skip": 1,
                              "tiling": False, "hires_fix": False, "post_processing": []},
                      models=list(models), kudos=kudos, created_at=created,
                      requester=f"u:{user_id}")
        s.add(req)
        s.flush()
        queue.enqueue(s, req, list(seeds or range(n)), list(models), sort_key=created - priority,
                      filters=queue.EntryFilters(user_id=user_id, steps=steps,
                                                 pixels=width * height,
                                                 megapixelsteps=width * height * steps / 1e6,
                                                 **(filters or {})),
                      reward=(kudos - 1) / n, tax=1 / n)
        return req.id


def png_bytes(image) -> bytes:
    """A PIL image as lossless PNG bytes (what the API stores sources as)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def webp_bytes(width: int, height: int, color=(90, 120, 150)) -> bytes:
    """A real WebP image of `width` x `height` (what a worker's result must be: the API may
    check the format and the dimensions of every uploaded result)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="WEBP")
    return buf.getvalue()


def result_webp(payload: dict) -> bytes:
    """The WebP result an image job popped with `payload` (its width and height) makes."""
    return webp_bytes(payload["width"], payload["height"])


def png_b64(image) -> str:
    """A PIL image as the base64 PNG a client sends as source_image."""
    import base64

    return base64.b64encode(png_bytes(image)).decode()


@contextmanager
def serving_png(data: bytes, hits: list[str] | None = None):
    """A loopback HTTP server answering every GET with `data` (a source image's bytes); yields
    its URL (any other path on it answers the same), and appends each path asked for to
    `hits`. Sources on loopback are refused unless allow_private_source_urls is set."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if hits is not None:
                hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/source.png"
    finally:
        server.shutdown()
        server.server_close()


def horde_sdk_python() -> str:
    """The venv with horde-sdk (Python 3.12), made on first use."""
    python = os.path.join(HORDE_SDK_VENV, "bin", "python")
    marker = os.path.join(HORDE_SDK_VENV, f".horde-sdk-{HORDE_SDK_VERSION}")
    if not os.path.exists(marker):
        base = subprocess.run(["pyenv", "which", "python"], env={**os.environ,
                              "PYENV_VERSION": "3.12.1"}, capture_output=True, text=True,
                              check=True).stdout.strip()
        subprocess.run([base, "-m", "venv", HORDE_SDK_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q",
                        f"horde-sdk=={HORDE_SDK_VERSION}"], check=True)
        open(marker, "w").close()
    return python


def free_port() -> int:
    """A TCP port nothing listens on now (never Serve's 8000, which the OS does not hand out
    while a test cluster holds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def app_server(app, port: int):
    """`app` served by uvicorn in a thread on 127.0.0.1:`port` while the block runs (for
    clients that need a real socket: CLIs, subprocesses, HTTP workers)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive(), "uvicorn did not stop"
