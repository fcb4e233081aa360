"""Hardening at the boundary (issue 12): who counts against which limit (a client's own
X-Forwarded-For never counts; users count per user, at their tier; Bearer keys count like
`apikey`), bounded request shapes, and client or worker input that used to answer 500. Through
the HTTP API on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from api.app import create_app
from api.db.models import Generation, User
from conftest import make_ctx
from test_economy import ANON, assert_ledger_consistent, balances, make_user, submit
from test_text_api import text_pop, text_submit
from test_workers import WEBP, pop, upload

pytestmark = pytest.mark.timeout(120)
LOOPBACK = ("127.0.0.1", 50000)


def spoofed(i: int) -> dict:
    return {**ANON, "X-Forwarded-For": f"198.51.100.{i}"}


# --------------------------------------------------------------- client addresses and limits


@pytest.mark.parametrize("server", ["app", "uvicorn"])
def test_forwarded_for_never_escapes_the_address_rate_limit(db, tmp_path, server):
    """A new X-Forwarded-For on each call is still one address: whether the app sees the
    loopback peer (Serve's HAProxy on the same node) or the server in front of it rewrote the
    peer from the header (uvicorn does so for loopback peers, as in Serve's replicas)."""
    ctx = make_ctx(db, tmp_path, rate_limit_submit="3/minute")
    app = create_app(ctx)
    if server == "uvicorn":
        app = ProxyHeadersMiddleware(app, trusted_hosts="127.0.0.1")
    with TestClient(app, client=LOOPBACK) as client:
        codes = [submit(client, spoofed(i)).status_code for i in range(4)]
        assert codes == [202, 202, 202, 429]
        # Without the header the caller is its peer, here loopback: its own address.
        assert submit(client).status_code == 202


def test_forwarded_for_never_escapes_the_waiting_cap(db, tmp_path):
    ctx = make_ctx(db, tmp_path, max_waiting_per_user=2)
    with TestClient(create_app(ctx), client=LOOPBACK) as client:
        assert [submit(client, spoofed(i)).status_code for i in range(2)] == [202, 202]
        r = submit(client, spoofed(99))
        assert r.status_code == 429 and r.json()["rc"] == "TooManyPrompts", r.text


def test_users_count_per_user_at_their_tier(db, tmp_path):
    """Anonymous callers share their address's limit; a registered user has its own (the AI
    Horde's 90 a minute, here 2), a trusted one more (300, here 3), from the same address."""
    ctx = make_ctx(db, tmp_path, rate_limit_submit="1/minute",
                   rate_limit_submit_registered="2/minute", rate_limit_submit_trusted="3/minute")
    with TestClient(create_app(ctx)) as client:
        _, plain = make_user(ctx, "plain")
        _, trusted = make_user(ctx, "trusty", trusted=True)
        assert [submit(client).status_code for _ in range(2)] == [202, 429]
        assert [submit(client, plain).status_code for _ in range(3)] == [202, 202, 429]
        assert [submit(client, trusted).status_code for _ in range(4)] == [202, 202, 202, 429]
        r = submit(client, plain)
        assert "user" in r.json()["message"] and int(r.headers["Retry-After"]) >= 1


def test_a_tier_never_gets_less_than_the_one_below(db, tmp_path):
    ctx = make_ctx(db, tmp_path, rate_limit_submit="3/minute",
                   rate_limit_submit_registered="1/minute", rate_limit_submit_trusted="1/minute")
    with TestClient(create_app(ctx)) as client:
        _, trusted = make_user(ctx, "trusty", trusted=True)
        assert [submit(client, trusted).status_code for _ in range(4)] == [202, 202, 202, 429]


def test_bearer_keys_count_against_their_user(db, tmp_path):
    """OpenAI clients send `Authorization: Bearer KEY`: counted for that key's user, not the
    address (calls for an unknown model are refused after being counted)."""
    ctx = make_ctx(db, tmp_path, rate_limit_submit="1/minute",
                   rate_limit_submit_registered="2/minute")
    with TestClient(create_app(ctx)) as client:
        _, h = make_user(ctx, "openai-user")
        bearer = {"Authorization": f"Bearer {h['apikey']}"}
        body = {"model": "no-such-model", "prompt": "x"}
        codes = [client.post("/v1/completions", json=body, headers=bearer).status_code
                 for _ in range(3)]
        assert codes == [400, 400, 429]
        # The address's own limit is untouched by them.
        assert client.post("/v1/completions", json=body).status_code == 400
        assert client.post("/v1/completions", json=body).status_code == 429


def test_unknown_keys_count_against_the_address(db, tmp_path):
    """A made-up key on each call is no way around the address's limit."""
    ctx = make_ctx(db, tmp_path, rate_limit_poll="2/minute")
    with TestClient(create_app(ctx)) as client:
        rid = str(uuid.uuid4())
        codes = [client.get(f"/api/v2/generate/check/{rid}",
                            headers={"apikey": f"made-up-key-{i:010d}"}).status_code
                 for i in range(3)]
        assert codes == [404, 404, 429]


def test_workers_of_two_users_behind_one_address_have_their_own_pop_limits(db, tmp_path):
    ctx = make_ctx(db, tmp_path, rate_limit_pop="2/minute")
    with TestClient(create_app(ctx)) as client:
        _, a = make_user(ctx, "owner-a")
        _, b = make_user(ctx, "owner-b")
        assert [pop(client, a, "wa").status_code for _ in range(3)] == [200, 200, 429]
        assert [pop(client, b, "wb").status_code for _ in range(3)] == [200, 200, 429]


# ----------------------------------------------------------------------- request shapes


def _refused(r, field: str, openai: bool = False) -> None:
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"] if openai else r.json()["message"]
    assert message.startswith(field) or f"; {field}" in message, (field, message)


def test_models_are_capped_and_never_repeated(client, ctx):
    for name in ("tiny-sd15", "tiny-llm"):
        send = submit if name == "tiny-sd15" else text_submit
        _refused(send(client, models=[name] * 5000), "models")
        _refused(send(client, models=[name, name]), "models")
        _refused(send(client, models=[f"m{i}" for i in range(101)]), "models")
        _refused(send(client, models=["x" * 201]), "models.0")
        _refused(send(client, models=[""]), "models.0")
    r = submit(client, models=["tiny-sd15", "tiny-sd15"])
    assert "duplicate" in r.json()["message"] and "'tiny-sd15'" in r.json()["message"]


def test_stop_sequences_are_capped(client, ctx):
    _refused(text_submit(client, params={"stop_sequence": ["\n"] * 33}), "params.stop_sequence")
    _refused(text_submit(client, params={"stop_sequence": ["x" * 129]}), "params.stop_sequence.0")
    assert text_submit(client, params={"stop_sequence": ["x" * 128] * 32}).status_code == 202
    for stop, field in ((["a", "b", "c", "d", "e"], "stop"), ("x" * 129, "stop.0"),
                        (["x" * 129], "stop.0"), ([""], "stop.0")):
        r = client.post("/v1/completions", json={"model": "tiny-llm", "prompt": "x", "stop": stop})
        _refused(r, field, openai=True)


def test_prompts_and_free_text_are_capped(client, ctx):
    _refused(submit(client, prompt="x" * 50_001), "prompt")
    _refused(text_submit(client, prompt="x" * 1_000_001), "prompt")
    messages = [{"role": "user", "content": "x" * 600_000}] * 2
    r = client.post("/v1/chat/completions", json={"model": "tiny-llm", "messages": messages})
    _refused(r, "messages", openai=True)
    _refused(text_submit(client, softprompt="x" * 1001), "softprompt")
    _refused(submit(client, proxied_account="x" * 101), "proxied_account")
    _refused(submit(client, params={"special": {f"k{i}": 1 for i in range(21)}}), "params.special")
    _refused(submit(client, params={"special": {"k": {"nested": [1] * 100}}}), "params.special")
    _refused(text_submit(client, params={f"unknown{i}": 1 for i in range(51)}), "params")
    _refused(text_submit(client, params={"sampler_order": list(range(17))}), "params.sampler_order")
    r = client.post("/v1/completions", json={"model": "tiny-llm", "prompt": "x", "user": "u" * 257})
    _refused(r, "user", openai=True)


def test_worker_inputs_are_bounded(client, ctx):
    _, h = make_user(ctx, "bounded")
    for body, field in (({"max_pixels": 2**63}, "max_pixels"),
                        ({"models": ["x" * 201]}, "models.0"),
                        ({"blacklist": ["x" * 201]}, "blacklist.0"),
                        ({"priority_usernames": ["someone#²"]}, "priority_usernames"),
                        ({"priority_usernames": ["someone#99999999999"]}, "priority_usernames")):
        _refused(pop(client, h, **body), field)
    _refused(text_pop(client, h, softprompts=["x"] * 101), "softprompts")


# ------------------------------------------------------------------------ 500s from input


def test_a_seed_of_non_ascii_digits_is_hashed_not_a_500(client, ctx):
    for seed in ("²", "١٢٣"):
        r = submit(client, params={"seed": seed})
        assert r.status_code == 202, r.text
        assert client.get(f"/api/v2/generate/status/{r.json()['id']}").status_code == 200
        assert text_submit(client, params={"seed": seed}).status_code == 202
    _refused(submit(client, params={"seed": "1" * 257}), "params.seed")
    _refused(text_submit(client, params={"seed": 2**63}), "params.seed")


def _held_job(client, ctx, h):
    rid = submit(client).json()["id"]
    job = pop(client, h).json()
    assert job["ids"], job
    return rid, job


def _state(ctx, gid) -> str:
    with ctx.db.read() as s:
        return s.get(Generation, gid).state


def test_a_worker_seed_out_of_range_is_refused_before_anything_is_stored(client, ctx):
    _, h = make_user(ctx, "seeder")
    rid, job = _held_job(client, ctx, h)
    gid = job["ids"][0]
    inline = base64.b64encode(WEBP).decode()
    for seed in (2**63, -1, 2**64):
        r = client.post("/api/v2/generate/submit", headers=h,
                        json={"id": gid, "generation": inline, "seed": seed})
        _refused(r, "seed")
        assert _state(ctx, gid) == "processing"
    r = client.post("/api/v2/generate/submit", headers=h,
                    json={"id": gid, "generation": inline, "seed": 2**63 - 1})
    assert r.status_code == 200, r.text
    st = client.get(f"/api/v2/generate/status/{rid}").json()
    assert st["generations"][0]["seed"] == str(2**63 - 1)
    assert_ledger_consistent(ctx)


def test_gen_metadata_is_typed_at_submit(client, ctx):
    _, h = make_user(ctx, "annotator")
    rid, job = _held_job(client, ctx, h)
    gid = job["ids"][0]
    assert upload(client, job["r2_upload"]).status_code == 200
    for entry, field in (({"type": "made-up", "value": "nsfw"}, "gen_metadata.0.type"),
                         ({"type": "lora", "value": "made-up"}, "gen_metadata.0.value"),
                         ({"type": "lora", "value": "download_failed", "ref": "x" * 256},
                          "gen_metadata.0.ref"),
                         ({"type": "lora", "value": "download_failed", "extra": 1},
                          "gen_metadata.0.extra"),
                         ({"value": "nsfw"}, "gen_metadata.0.type"),
                         ("censorship", "gen_metadata.0")):
        r = client.post("/api/v2/generate/submit", headers=h,
                        json={"id": gid, "generation": "R2", "seed": 1, "gen_metadata": [entry]})
        _refused(r, field)
    good = [{"type": "lora", "value": "download_failed", "ref": "some-lora"},
            {"type": "information", "value": "see_ref", "ref": "qr: scanned"}]
    r = client.post("/api/v2/generate/submit", headers=h,
                    json={"id": gid, "generation": "R2", "seed": 1, "gen_metadata": good})
    assert r.status_code == 200, r.text
    (gen,) = client.get(f"/api/v2/generate/status/{rid}").json()["generations"]
    assert gen["gen_metadata"] == good
    # Text workers' entries are checked the same way.
    trid = text_submit(client).json()["id"]
    tjob = text_pop(client, h).json()
    r = client.post("/api/v2/generate/text/submit", headers=h,
                    json={"id": tjob["id"], "generation": "t", "gen_metadata": [{"type": "x"}]})
    _refused(r, "gen_metadata.0")
    r = client.post("/api/v2/generate/text/submit", headers=h,
                    json={"id": tjob["id"], "generation": "t" * 1_000_001})
    _refused(r, "generation")
    assert client.get(f"/api/v2/generate/text/status/{trid}").status_code == 200


def test_status_renders_old_rows_with_unknown_metadata(client, ctx):
    """Rows stored before entries were checked at submit may hold anything: the status leaves
    out what a strict client cannot read instead of failing for good."""
    _, h = make_user(ctx, "old-worker")
    rid, job = _held_job(client, ctx, h)
    assert upload(client, job["r2_upload"]).status_code == 200
    r = client.post("/api/v2/generate/submit", headers=h,
                    json={"id": job["ids"][0], "generation": "R2", "seed": 1})
    assert r.status_code == 200
    trid = text_submit(client).json()["id"]
    tjob = text_pop(client, h).json()
    assert client.post("/api/v2/generate/text/submit", headers=h,
                       json={"id": tjob["id"], "generation": "t"}).status_code == 200
    known = {"type": "censorship", "value": "nsfw"}
    junk = [{"anything": 1}, "text", 7, None, {"type": "lora"}, {"type": "x", "value": "y"},
            {"type": "lora", "value": "nsfw", "ref": 5}, known]
    with ctx.db.write() as s:
        s.execute(update(Generation).where(Generation.request_id.in_((rid, trid)))
                  .values(gen_metadata=junk))
    for path in (f"/api/v2/generate/status/{rid}", f"/api/v2/generate/text/status/{trid}"):
        r = client.get(path)
        assert r.status_code == 200, r.text
        assert r.json()["generations"][0]["gen_metadata"] == [{**known, "ref": None}]


# ------------------------------------------------------------------------ users and kudos


def _put(client, user_id: int, headers: dict, raw: str):
    return client.put(f"/api/v2/users/{user_id}", content=raw,
                      headers={**headers, "Content-Type": "application/json"})


def test_moderator_awards_are_finite_and_bounded(client, ctx):
    _, mod = make_user(ctx, "moderator", moderator=True)
    target, _ = make_user(ctx, "target")
    for raw in ('{"kudos": NaN}', '{"kudos": Infinity}', '{"kudos": -Infinity}',
                '{"kudos": 1e10}', '{"kudos": -1e10}'):
        _refused(_put(client, target.id, mod, raw), "kudos")
    assert balances(ctx)[target.id] == 0
    r = _put(client, target.id, mod, '{"kudos": 1000000000}')
    assert r.status_code == 200 and r.json()["new_kudos"] == 1e9
    assert_ledger_consistent(ctx)


def test_transfers_refuse_non_finite_amounts_and_odd_ids(client, ctx):
    sender, h = make_user(ctx, "sender", kudos=100)
    target, _ = make_user(ctx, "receiver")
    for raw, field in (('{"username": "receiver#%d", "amount": NaN}' % target.id, "amount"),
                       ('{"username": "receiver#%d", "amount": Infinity}' % target.id, "amount"),
                       ('{"username": "receiver#²", "amount": 1}', "username")):
        r = client.post("/api/v2/kudos/transfer", content=raw,
                        headers={**h, "Content-Type": "application/json"})
        _refused(r, field)
    r = client.post("/api/v2/kudos/transfer", headers=h,
                    json={"username": "receiver#99999999999999", "amount": 1})
    assert r.status_code == 404 and r.json()["message"].startswith("username"), r.text
    for user_id in (2**31, 10**30):
        _refused(client.get(f"/api/v2/users/{user_id}"), "user_id")
    assert balances(ctx)[sender.id] == 100
    assert_ledger_consistent(ctx)


# ------------------------------------------------------------------------------- workers


def test_the_cluster_llm_worker_is_a_text_worker(client, ctx):
    from cluster.dispatcher import FamilyRoute, cluster_worker, register_cluster_workers
    from models.catalog import Family

    routes = {}
    for family in (Family("llm"), Family("stable_diffusion_1")):
        worker_id, name = cluster_worker(family.value)
        routes[family.value] = FamilyRoute(handle=None, models=["m"], max_in_flight=1,
                                           worker_id=worker_id, worker_name=name, family=family,
                                           kind=family.kind)
    register_cluster_workers(ctx.db, routes, {})
    types = {w["name"]: w["type"] for w in client.get("/api/v2/workers").json()}
    assert types["rayhorde-cluster/llm"] == "text"
    assert types["rayhorde-cluster/stable_diffusion_1"] == "image"
