"""Operations (issue 12): the installation secret, the database going away, the dispatcher's
deadlines, volunteer deploys off its loop and its health check, and OpenAI streams whose
client goes away. Through the HTTP API, and the dispatcher with fake Serve handles."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import stat
import threading
import time
import uuid
from types import SimpleNamespace
from urllib.parse import urlparse

import psycopg
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

import api.installation_secret as installation_secret
import cluster.dispatcher as dispatcher_module
from api.app import create_app
from api.auth import hash_api_key
from api.db import queue
from api.db.migrate import reset, upgrade
from api.db.models import Generation, User
from api.db.session import Database
from api.installation_secret import LEGACY_SALT, load_or_create
from api.settings import Settings
from api.storage import make_storage
from cluster.app import replica_settings
from cluster.bridge import Changes, VolunteerNode
from cluster.dispatcher import MAX_FOLLOWERS_PER_GENERATION, Dispatcher
from conftest import POSTGRES_URL, make_ctx
from models.catalog import Family
from test_economy import ANON, balances, make_user, submit

pytestmark = pytest.mark.timeout(120)
UNREACHABLE_POSTGRES = "postgresql://postgres@127.0.0.1:1/rayhorde"
A_SECRET = "a-configured-secret-0123456789abcdefghij"


def wait_until(what: str, check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


async def async_wait_until(what: str, check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := await check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return value


def generation_of(ctx, request_id: str) -> Generation:
    with ctx.db.read() as s:
        return s.query(Generation).filter_by(request_id=request_id).one()


# --- the installation secret ---

def test_a_secret_is_made_once_with_owner_only_permissions_and_read_back(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYHORDE_KEY_SALT", raising=False)
    url = f"sqlite:///{tmp_path}/rayhorde.db"
    first = Settings(database_url=url, storage_dir=str(tmp_path / "objects"))
    path = tmp_path / "rayhorde.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.key_salt == path.read_text().strip() and len(first.key_salt) >= 40
    assert first.key_salt != LEGACY_SALT
    assert Settings(database_url=url).key_salt == first.key_salt  # a restart
    assert make_storage(first).secret == first.key_salt  # it signs local upload URLs too
    assert Settings(database_url=f"sqlite:///{tmp_path}/b/rayhorde.db").key_salt != first.key_salt
    monkeypatch.setenv("RAYHORDE_KEY_SALT", A_SECRET)
    assert Settings(database_url=f"sqlite:///{tmp_path}/c.db").key_salt == A_SECRET
    assert not (tmp_path / "c.secret").exists()


def test_concurrent_first_starts_agree_on_one_secret(tmp_path):
    path = tmp_path / "data" / "rayhorde.secret"
    barrier, results, errors = threading.Barrier(8), [], []

    def start():
        try:
            barrier.wait()
            results.append(load_or_create(path, f"sqlite:///{tmp_path}/none.db"))
        except Exception as e:  # noqa: BLE001 - every thread's outcome is checked
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 8 and len(set(results)) == 1
    assert results[0] == path.read_text().strip()
    assert [p.name for p in path.parent.iterdir()] == ["rayhorde.secret"]  # no temp file left


def test_a_database_from_before_secrets_keeps_its_api_keys(tmp_path, caplog):
    db = Database(f"sqlite:///{tmp_path}/rayhorde.db")
    upgrade(db)
    key = "old-key-0123456789abcd"
    with db.write() as s:
        s.add(User(username="old", api_key_hash=hash_api_key(key, LEGACY_SALT), kudos=0.0))
    with caplog.at_level(logging.WARNING, "rayhorde.settings"):
        ctx = make_ctx(db, tmp_path)
    assert ctx.settings.key_salt == LEGACY_SALT and "public default salt" in caplog.text
    assert (tmp_path / "rayhorde.secret").read_text().strip() == LEGACY_SALT
    with TestClient(create_app(ctx)) as client:
        r = client.get("/api/v2/find_user", headers={"apikey": key})
        assert r.status_code == 200 and r.json()["username"] == f"old#{r.json()['id']}", r.text
    db.dispose()


def test_a_cluster_config_is_warned_when_it_runs_without_a_configured_secret(
        tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("RAYHORDE_KEY_SALT", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(installation_secret, "_warned", set())
    with caplog.at_level(logging.WARNING, "rayhorde.settings"):
        made = Settings(database_url=UNREACHABLE_POSTGRES)
    assert "RAYHORDE_KEY_SALT" in caplog.text
    assert made.key_salt == (tmp_path / "data" / "rayhorde-cluster.secret").read_text().strip()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "rayhorde.settings"):
        Settings(database_url=f"sqlite:///{tmp_path}/x.db")  # the embedded default
        assert caplog.text == ""
        Settings(database_url=f"sqlite:///{tmp_path}/y.db", storage="s3", key_salt=LEGACY_SALT)
    assert "public default" in caplog.text


def test_replicas_read_settings_from_their_own_environment_and_refuse_a_different_one(
        tmp_path, monkeypatch):
    """What `build` hands its replicas: the config's settings, never what it read from its
    environment (secrets); each replica reads those itself and must find the same."""
    monkeypatch.chdir(tmp_path)
    given = {"database_url": f"sqlite:///{tmp_path}/rayhorde.db", "storage_dir": "objects"}
    monkeypatch.setenv("RAYHORDE_KEY_SALT", A_SECRET)
    monkeypatch.setenv("RAYHORDE_MAX_ATTEMPTS", "7")
    built, plain = replica_settings(given)
    assert "key_salt" not in plain and "max_attempts" not in plain
    assert A_SECRET not in json.dumps(plain)
    assert plain["storage_dir"] == str(tmp_path / "objects")  # replicas have another cwd
    assert set(plain["env_digests"]) == {"key_salt", "max_attempts"}
    replica = Settings(**plain)
    assert (replica.key_salt, replica.max_attempts) == (A_SECRET, 7) == (built.key_salt, 7)
    monkeypatch.setenv("RAYHORDE_KEY_SALT", A_SECRET + "-other")
    with pytest.raises(ValidationError, match="RAYHORDE_KEY_SALT"):
        Settings(**plain)
    monkeypatch.delenv("RAYHORDE_KEY_SALT")
    with pytest.raises(ValidationError, match="RAYHORDE_KEY_SALT"):
        Settings(**plain)
    assert not (tmp_path / "rayhorde.secret").exists()  # refused before making one
    # None configured: the secret made on the build's node goes to every replica (other
    # nodes cannot read its file).
    monkeypatch.delenv("RAYHORDE_MAX_ATTEMPTS")
    built, plain = replica_settings(given)
    assert plain["key_salt"] == built.key_salt == (tmp_path / "rayhorde.secret").read_text().strip()
    assert plain["env_digests"] == {} and Settings(**plain).key_salt == built.key_salt


# --- the database away ---

def pop_body():
    return {"name": "w1", "models": ["tiny-sd15"], "max_pixels": 512 * 512}


def assert_unavailable(r, name):
    assert r.status_code == 503, (name, r.status_code, r.text)
    assert r.headers.get("retry-after") == "5", (name, r.headers)
    body = r.json()
    message = body["error"]["message"] if "error" in body else body["message"]
    assert "database" in message.lower(), (name, body)


def test_an_unreachable_postgresql_answers_503_with_retry_after(tmp_path):
    ctx = make_ctx(Database(UNREACHABLE_POSTGRES), tmp_path, key_salt=A_SECRET)
    key = {"apikey": "some-key-0123456789abc"}
    with TestClient(create_app(ctx)) as client:
        calls = {
            "submit": lambda: submit(client),
            "status": lambda: client.get(f"/api/v2/generate/status/{uuid.uuid4()}"),
            "check": lambda: client.get(f"/api/v2/generate/check/{uuid.uuid4()}"),
            "pop": lambda: client.post("/api/v2/generate/pop", headers=key, json=pop_body()),
            "openai": lambda: client.post("/v1/completions", headers=key, json={
                "model": "tiny-llm", "prompt": "Hi", "max_tokens": 5}),
        }
        for name, call in calls.items():
            assert_unavailable(call(), name)
    ctx.db.dispose()


def test_a_sqlite_database_that_cannot_be_opened_answers_503(tmp_path):
    path = tmp_path / "rayhorde.db"
    db = Database(f"sqlite:///{path}")  # no connection yet
    ctx = make_ctx(db, tmp_path, key_salt=A_SECRET)
    path.mkdir()  # a folder where the file should be: SQLite cannot open it
    with TestClient(create_app(ctx)) as client:
        assert_unavailable(submit(client), "submit")
        assert_unavailable(client.get(f"/api/v2/generate/status/{uuid.uuid4()}"), "status")
    db.dispose()


@pytest.fixture
def pg_ctx(tmp_path):
    db = reset(POSTGRES_URL)
    yield make_ctx(db, tmp_path)
    db.dispose()


def terminate_connections() -> int:
    """Every connection to the test database but this one, as a restart or a failover does."""
    name = urlparse(POSTGRES_URL).path.lstrip("/")
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()[0]


def test_the_api_recovers_when_its_database_connections_are_terminated(pg_ctx):
    _, h = make_user(pg_ctx, "worker-owner")
    with TestClient(create_app(pg_ctx)) as client:
        first = submit(client, params={"width": 64, "height": 64, "steps": 2})
        assert first.status_code == 202, first.text
        rid = first.json()["id"]
        calls = [lambda: submit(client, params={"width": 64, "height": 64, "steps": 2}),
                 lambda: client.get(f"/api/v2/generate/check/{rid}"),
                 lambda: client.get(f"/api/v2/generate/status/{rid}"),
                 lambda: client.post("/api/v2/generate/pop", headers=h, json=pop_body())]
        for call in calls:
            assert terminate_connections() >= 1
            answers = [call(), call()]
            codes = [r.status_code for r in answers]
            # At worst one 503 (with Retry-After), then the pool has reconnected.
            assert codes[1] in (200, 202), (codes, answers[1].text)
            if codes[0] == 503:
                assert_unavailable(answers[0], "after terminate")
            else:
                assert codes[0] in (200, 202), (codes, answers[0].text)


def test_a_pooled_connection_the_server_closed_is_replaced_before_use(pg_ctx):
    """A connection whose server process has ended is found when taken from the pool (its
    socket says so) and replaced, without a round trip per checkout and without failing the
    call: no 503 once the server has closed it."""
    from sqlalchemy import text

    def backend_pid() -> int:
        with pg_ctx.db.read() as session:
            return session.execute(text("SELECT pg_backend_pid()")).scalar_one()

    pid = backend_pid()
    assert pid == backend_pid()  # the pool hands back the same connection
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        deadline = time.time() + 10
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                           (pid,)).fetchone()[0]:  # wait for the server process to be gone
            assert time.time() < deadline, "the terminated backend never exited"
            time.sleep(0.02)
    replacement = backend_pid()  # raises if the closed connection were used
    assert replacement != pid


# --- the dispatcher, with fake Serve handles ---

class HangingCall:
    """A Serve call whose replica never answers."""

    def __init__(self):
        self.cancelled = False

    def __await__(self):
        return asyncio.sleep(3600).__await__()

    def cancel(self):
        self.cancelled = True


class HangingStream:
    """A text stream that gives one delta, then nothing."""

    def __init__(self):
        self.cancelled, self.started = False, asyncio.Event()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.started.is_set():
            self.started.set()
            return {"delta": "Once"}
        await asyncio.sleep(3600)

    def cancel(self):
        self.cancelled = True


class Images:
    """A Serve call that answers at once with an image per seed."""

    def __init__(self, job):
        self.job = job

    def __await__(self):
        async def answer():
            return {"images": [b"RIFF-image"] * len(self.job.seeds), "seeds": list(self.job.seeds)}
        return answer().__await__()

    def cancel(self):
        pass


class FakeHandle:
    """A family deployment's handle: `.options(...).generate.remote(job)` and
    `.generate_stream.remote(job)` give what `answer(job)` makes."""

    deployment_name = "fake"

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def options(self, **_):
        return self

    def __getattr__(self, method):
        def remote(job):
            self.calls.append(self.answer(job))
            return self.calls[-1]
        return SimpleNamespace(remote=remote)


FAMILIES = {"image": ("stable_diffusion_1", ["tiny-sd15"]), "text": ("llm", ["tiny-llm"])}


def started_dispatcher(ctx, kind: str, handle, **options) -> Dispatcher:
    """The dispatcher's replica class itself, its loop running on this event loop."""
    family, models = FAMILIES[kind]
    families = {family: {"handle": handle, "models": models, "max_in_flight": 2,
                         "entries": [{"name": m} for m in models]}}
    options = {"poll_seconds": 0.05, "volunteers": {"enabled": False}, **options}
    return Dispatcher.func_or_class(ctx.settings.model_dump(), families, **options)


@pytest.fixture
def no_serve(monkeypatch):
    """Keep the dispatcher from asking Serve for replica counts (no Ray here)."""
    monkeypatch.setattr(Dispatcher.func_or_class, "_replica_counts", lambda self: {})


async def stop(d: Dispatcher) -> None:
    for task in [d._loop, *d._tasks]:
        task.cancel()
    await asyncio.gather(d._loop, *d._tasks, return_exceptions=True)


def text_submit(client, headers=ANON):
    r = client.post("/api/v2/generate/text/async", headers=headers,
                    json={"prompt": "Once upon a time", "models": ["tiny-llm"]})
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.mark.parametrize("kind", ["image", "text"])
def test_hung_replica_calls_are_cancelled_and_released_at_the_jobs_deadline(
        client, ctx, monkeypatch, no_serve, kind):
    """Each call ends at its job's TTL (shortened here): the call is cancelled on the replica
    and the claim released, so a family never runs out of slots; after max_attempts the
    generation is faulted."""
    claim = queue.claim
    monkeypatch.setattr(queue, "claim", lambda *a, **k: [
        dataclasses.replace(j, ttl=0.3) for j in claim(*a, **k)])
    if kind == "image":
        rid = submit(client, params={"width": 64, "height": 64, "steps": 2}).json()["id"]
        handle = FakeHandle(lambda job: HangingCall())
    else:
        rid = text_submit(client)
        handle = FakeHandle(lambda job: HangingStream())

    async def scenario():
        d = started_dispatcher(ctx, kind, handle)
        try:
            gen = await async_wait_until("the generation to fault", lambda: asyncio.to_thread(
                lambda: (g := generation_of(ctx, rid)).state == "faulted" and g))
            route = next(iter(d.routes.values()))
            await async_wait_until("the last call to end", lambda: asyncio.to_thread(
                lambda: route.in_flight == 0))
            return gen
        finally:
            await stop(d)

    gen = asyncio.run(scenario())
    assert gen.attempts == ctx.settings.max_attempts == len(handle.calls)
    assert "within" in gen.fault_reason, gen.fault_reason
    assert all(call.cancelled for call in handle.calls)


def test_a_cancelled_generation_stops_on_its_replica_and_is_not_billed(client, ctx, no_serve):
    user, h = make_user(ctx, "reader", kudos=100)
    rid = text_submit(client, headers=h)
    before = balances(ctx)
    stream = HangingStream()
    handle = FakeHandle(lambda job: stream)

    async def scenario():
        d = started_dispatcher(ctx, "text", handle)
        try:
            await asyncio.wait_for(stream.started.wait(), 20)
            r = await asyncio.to_thread(client.delete, f"/api/v2/generate/text/status/{rid}")
            assert r.status_code == 200, r.text
            route = d.routes["llm"]
            await async_wait_until("the stream to be cancelled", lambda: asyncio.to_thread(
                lambda: stream.cancelled and route.in_flight == 0))
            return d
        finally:
            await stop(d)

    d = asyncio.run(scenario())
    assert generation_of(ctx, rid).state == "cancelled" and d.completed == 0
    assert balances(ctx) == before


def test_health_fails_once_dispatching_stalls(ctx, no_serve):
    async def scenario():
        d = started_dispatcher(ctx, "image", FakeHandle(Images))
        d.stall_seconds = 0.5
        try:
            started = time.monotonic()
            while time.monotonic() - started < 3 * d.stall_seconds:  # rounds go on: healthy
                await d.check_health()
                await asyncio.sleep(0.05)
            stuck = asyncio.Event()

            async def hang():
                stuck.set()
                await asyncio.sleep(3600)

            d._dispatch = hang
            await asyncio.wait_for(stuck.wait(), 10)

            async def unhealthy():
                try:
                    await d.check_health()
                except RuntimeError as e:
                    return str(e)
                return None

            return await async_wait_until("the health check to fail", unhealthy, timeout=10)
        finally:
            await stop(d)

    assert "stalled" in asyncio.run(scenario())


class OneNodeBridge:
    """A bridge that sees one volunteer node join, then nothing change."""

    def __init__(self, node):
        self.node, self.told = node, False

    def refresh(self):
        if self.told:
            return Changes()
        self.told = True
        return Changes(joined=[self.node])

    def worker_for_node(self, node_id):
        return None


def test_a_volunteer_replica_that_cannot_be_placed_does_not_stop_dispatching(
        client, ctx, no_serve):
    node = VolunteerNode(node_id="n" * 56, worker_id=str(uuid.uuid4()), worker_name="vol/n",
                         owner_id=0, families=[Family.stable_diffusion_1], gpus=1)
    started, deleted = [], []
    rids = []

    async def scenario():
        d = started_dispatcher(ctx, "image", FakeHandle(Images), volunteers={
            "enabled": True, "poll_seconds": 0.05, "deploy_timeout_seconds": 3.0})
        d.bridge = OneNodeBridge(node)
        d._start_on_node = lambda node, family, app: started.append(app) or "sd15"
        d._app_status = lambda app: ("DEPLOYING", "no node has a free GPU")  # never placed
        d._delete_app = deleted.append
        try:
            await async_wait_until("the deploy to start", lambda: asyncio.to_thread(
                lambda: started))
            for _ in range(2):
                r = await asyncio.to_thread(submit, client, params={"width": 64, "height": 64,
                                                                      "steps": 2})
                rids.append(r.json()["id"])
                await async_wait_until("the job to be done", lambda: asyncio.to_thread(
                    lambda: generation_of(ctx, rids[-1]).state == "done"), timeout=10)
                assert deleted == [], "the deploy gave up before dispatching went on"
                await d.check_health()
            await async_wait_until("the deploy to be given up", lambda: asyncio.to_thread(
                lambda: deleted), timeout=20)
            assert d.volunteer_routes[node.node_id] == []
            r = await asyncio.to_thread(submit, client, params={"width": 64, "height": 64,
                                                                  "steps": 2})
            rids.append(r.json()["id"])
            await async_wait_until("dispatching after the deploy gave up",
                                   lambda: asyncio.to_thread(
                                       lambda: generation_of(ctx, rids[-1]).state == "done"),
                                   timeout=10)
            await d.check_health()
        finally:
            await stop(d)

    asyncio.run(scenario())
    assert deleted == started == [f"volunteer-{node.node_id[:12]}-stable_diffusion_1"]


def test_the_dispatcher_bounds_its_followers(ctx, monkeypatch, no_serve):
    monkeypatch.setattr(dispatcher_module, "MAX_FOLLOWERS", MAX_FOLLOWERS_PER_GENERATION + 2)

    async def scenario():
        d = started_dispatcher(ctx, "text", FakeHandle(lambda job: HangingStream()))
        try:
            one = [d.follow("g1") for _ in range(MAX_FOLLOWERS_PER_GENERATION + 1)]
            firsts = [await s.__anext__() for s in one]
            assert firsts == [""] * MAX_FOLLOWERS_PER_GENERATION + [None]  # None: not followed
            with pytest.raises(StopAsyncIteration):
                await one[-1].__anext__()
            await one[0].aclose()  # a follower that goes away frees its place
            again = d.follow("g1")
            assert await again.__anext__() == ""
            others = [d.follow(f"g{i}") for i in range(2, 5)]
            assert [await s.__anext__() for s in others] == ["", "", None]  # all in all
            for s in [*one, again, *others]:
                await s.aclose()
            return dict(d._followers), d._follower_count
        finally:
            await stop(d)

    assert asyncio.run(scenario()) == ({}, 0)


# --- OpenAI streams whose client goes away ---

class Follower:
    """The dispatcher's follow stream for a generation: the text so far, one delta, then
    nothing more while the generation runs on."""

    def __init__(self, generation_id):
        self.generation_id, self.items = generation_id, ["", "Hel"]
        self.cancelled = asyncio.Event()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.items:
            return self.items.pop(0)
        await asyncio.sleep(3600)

    def cancel(self):
        self.cancelled.set()


@pytest.mark.parametrize("how", ["disconnect", "cancelled"])
def test_a_stream_whose_client_goes_away_is_cancelled_unbilled_and_unfollowed(ctx, how):
    """`disconnect`: the client closes the connection (Starlette cancels the response);
    `cancelled`: Serve cancels the request. Either way the generation is cancelled in the
    database (a late result records and bills nothing) and the dispatcher's stream stopped."""
    user, h = make_user(ctx, "streamer", kudos=100)
    followers: list[Follower] = []
    app = create_app(ctx, follow=lambda gid: followers.append(Follower(gid)) or followers[-1])
    body = json.dumps({"model": "tiny-llm", "prompt": "Hello", "max_tokens": 20,
                       "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "",
             "query_string": b"", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()),
                         (b"authorization", f"Bearer {h['apikey']}".encode())]}
    before = balances(ctx)
    text_caps = queue.Capabilities("cluster", ["tiny-llm"], kind="text", trusted=True,
                                   max_length=10**6, max_context_length=10**6)

    async def scenario():
        gone, text_seen, requested = asyncio.Event(), asyncio.Event(), []

        async def receive():
            if not requested:
                requested.append(True)
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and b"Hel" in message.get("body", b""):
                text_seen.set()

        call = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(text_seen.wait(), 20)
        (job,) = await asyncio.to_thread(queue.claim, ctx.db, text_caps, 1)  # the cluster's
        gone.set() if how == "disconnect" else call.cancel()
        await asyncio.wait({call}, timeout=20)
        assert call.done()
        await asyncio.wait_for(followers[0].cancelled.wait(), 20)
        return job

    job = asyncio.run(scenario())
    gen = wait_until("the generation to be cancelled",
                     lambda: (g := generation_of(ctx, job.request_id)).state == "cancelled" and g)
    assert gen.id == job.generation_id
    late = queue.Result(generation_id=job.generation_id, claim_id=job.claim_id, storage_key=None,
                        seed=job.seed, worker_id="cluster", worker_name="c", owner_id=0,
                        text="Hello there", prompt_tokens=1, completion_tokens=2,
                        finish_reason="stop")
    assert queue.finish(ctx.db, [late]) == []
    assert balances(ctx) == before
