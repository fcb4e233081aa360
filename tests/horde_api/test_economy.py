"""Kudos: prices, the ledger, priority, upfront kudos, concurrency caps, roles, transfers and
moderator changes, through the HTTP API on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from api import ledger
from api.auth import hash_api_key
from api.db import queue
from api.db.models import Generation, KudosEntry, QueueEntry, User
from api.kudos import head_start_seconds, image_cost
from models.catalog import Catalog, Family

pytestmark = pytest.mark.timeout(120)
ANON = {"apikey": "0000000000"}


def make_user(ctx, name, kudos=0.0, **roles) -> tuple[User, dict]:
    key = f"{name}-key-0123456789abcdef"[:22]
    with ctx.db.write() as s:
        user = User(username=name, api_key_hash=hash_api_key(key, ctx.settings.key_salt),
                    kudos=0.0, **roles)
        s.add(user)
        s.flush()
        if kudos:
            ledger.award(s, user.id, kudos)
        s.refresh(user)
        s.expunge(user)
    return user, {"apikey": key}


def submit(client, headers=ANON, **body):
    body.setdefault("prompt", "a lighthouse ### fog")
    body.setdefault("models", ["tiny-sd15"])
    return client.post("/api/v2/generate/async", json=body, headers=headers)


def balances(ctx) -> dict[int, float]:
    with ctx.db.read() as s:
        return {u.id: u.kudos for u in s.execute(select(User)).scalars()}


def assert_ledger_consistent(ctx):
    """Every movement sums to zero, and every balance is the sum of its user's rows."""
    with ctx.db.read() as s:
        per_txn = s.execute(select(KudosEntry.txn_id, func.sum(KudosEntry.amount))
                            .group_by(KudosEntry.txn_id)).all()
        assert all(abs(total) < 1e-6 for _, total in per_txn)
        sums = dict(s.execute(select(KudosEntry.user_id, func.sum(KudosEntry.amount))
                              .group_by(KudosEntry.user_id)).all())
        for user in s.execute(select(User)).scalars():
            assert user.kudos == pytest.approx(sums.get(user.id, 0.0), abs=1e-6), user.username
        assert sum(u.kudos for u in s.execute(select(User)).scalars()) == pytest.approx(0, abs=1e-6)


def test_legacy_cost_formula_and_multipliers():
    base = image_cost(width=512, height=512, steps=30, n=1, family=Family.stable_diffusion_1)
    r = ((512 * 512 - 64**2) ** 1.75) / ((1024**2 - 64**2) ** 1.75)
    assert base == round(0.1232 * 30 + r * 0.1232 * 30 * 8.75 + 1, 2)
    per = base - 1
    kw = dict(width=512, height=512, steps=30, n=1, family=Family.stable_diffusion_1)
    assert image_cost(**kw, post_processors=2) == pytest.approx(per * 1.44 + 1, abs=0.02)
    assert image_cost(**kw, controlnet=True) == pytest.approx(per * 3 + 1, abs=0.02)
    assert image_cost(**kw, loras=2) == pytest.approx(per + 6 + 1, abs=0.01)
    assert image_cost(**kw, tis=True) == pytest.approx(per + 1 + 1, abs=0.01)
    assert image_cost(**kw, source_image=True) == pytest.approx(per * 1.3 + 1, abs=0.02)
    assert image_cost(**{**kw, "n": 4}) == pytest.approx(per * 4 + 1, abs=0.03)


def test_head_start_rewards_kudos_on_a_log_scale():
    h = lambda k, anon=False: head_start_seconds(k, anon, 60, 600)  # noqa: E731
    assert h(0) == 0 and h(9) == pytest.approx(60) and h(999) == pytest.approx(180)
    assert h(-99) == pytest.approx(-120)
    assert h(10**9, anon=True) == -600 and h(-10**30) == -600  # nobody below anonymous


def test_queue_order_follows_kudos_then_age(client, ctx):
    rich, rich_h = make_user(ctx, "rich", kudos=10_000)
    poor, poor_h = make_user(ctx, "poor", kudos=0)
    first_anon = submit(client, params={"steps": 10}).json()["id"]
    first_poor = submit(client, poor_h, params={"steps": 10}).json()["id"]
    first_rich = submit(client, rich_h, params={"steps": 10}).json()["id"]
    caps = queue.Capabilities("w", ["tiny-sd15"])
    order = [queue.claim(ctx.db, caps, 1)[0].request_id for _ in range(3)]
    assert order == [first_rich, first_poor, first_anon]
    with ctx.db.read() as s:
        keys = {rid: s.execute(select(QueueEntry.sort_key).join(
            Generation, Generation.id == QueueEntry.generation_id)
            .where(Generation.request_id == rid)).scalar()
            for rid in (first_anon, first_poor, first_rich)}
    # Aging: 10,000 kudos are a 240 s head start, anonymous starts 600 s behind, so an
    # anonymous request 15 minutes old is ahead of a brand-new one from the rich user.
    assert keys[first_anon] - 900 < keys[first_rich] < keys[first_anon] - 800


def test_kudos_move_when_a_generation_finishes(client, ctx):
    alice, alice_h = make_user(ctx, "alice", kudos=100)
    owner, _ = make_user(ctx, "owner")
    r = submit(client, alice_h, params={"n": 2, "steps": 10})
    kudos = r.json()["kudos"]
    before = balances(ctx)
    jobs = queue.claim(ctx.db, queue.Capabilities("w", ["tiny-sd15"]), 5)
    results = [queue.Result(j.generation_id, j.claim_id, f"k{j.position}", j.seed, "w", "w",
                            owner_id=owner.id) for j in jobs]
    finished = queue.finish(ctx.db, results)
    after = balances(ctx)
    horde = 1
    assert after[alice.id] == pytest.approx(before[alice.id] - kudos)
    assert after[owner.id] == pytest.approx(sum(f.reward for f in finished))
    assert after[owner.id] == pytest.approx(kudos - 1)
    assert after[horde] - before[horde] == pytest.approx(1)  # the request tax
    assert_ledger_consistent(ctx)


def test_anonymous_needs_upfront_kudos_for_large_jobs(client, ctx):
    for params in ({"width": 1024, "height": 1088}, {"steps": 51}):
        r = submit(client, params=params)
        assert r.status_code == 403 and r.json()["rc"] == "KudosUpfront", r.text
        assert "params" in r.json()["message"]
    assert submit(client, params={"width": 1024, "height": 1024, "steps": 50}).status_code == 202
    _, poor_h = make_user(ctx, "poor", kudos=5)
    _, rich_h = make_user(ctx, "rich", kudos=1000)
    assert submit(client, poor_h, params={"steps": 60}).json()["rc"] == "KudosUpfront"
    assert submit(client, rich_h, params={"steps": 60}).status_code == 202


def test_concurrency_cap_per_requester(client, ctx):
    ctx.settings.max_waiting_per_user = 30
    assert submit(client, params={"n": 20}).status_code == 202
    r = submit(client, params={"n": 11})
    assert r.status_code == 429 and r.json()["rc"] == "TooManyPrompts"
    assert submit(client, params={"n": 10}).status_code == 202
    # Another anonymous client (another peer address) has its own.
    from fastapi.testclient import TestClient
    other = TestClient(client.app, client=("203.0.113.9", 50000))
    assert submit(other, params={"n": 20}).status_code == 202
    assert submit(other, params={"n": 11}).status_code == 429
    _, edu_h = make_user(ctx, "teacher", education=True)
    assert submit(client, edu_h, params={"n": 20}).status_code == 202
    assert submit(client, edu_h, params={"n": 20}).status_code == 202  # cap 100


def test_education_forces_sfw_and_says_so(client, ctx):
    _, edu_h = make_user(ctx, "teacher", education=True)
    r = submit(client, edu_h, nsfw=True)
    assert r.status_code == 202
    assert [w["code"] for w in r.json()["warnings"]] == ["EducationSFW"]
    from api.db.models import Request
    with ctx.db.read() as s:
        req = s.get(Request, r.json()["id"])
        assert (req.nsfw, req.censor_nsfw) == (False, True)


def test_out_of_spec_requests_are_accepted_with_warnings(client, ctx):
    catalog = ctx.catalog.model_dump()
    for m in catalog["models"]:
        if m["name"] == "tiny-sd15":
            m["requirements"] = {"min_steps": 10, "max_cfg_scale": 8, "samplers": ["k_euler"],
                                 "clip_skip": 2}
    ctx.catalog = Catalog.model_validate(catalog)
    r = submit(client, params={"steps": 5, "cfg_scale": 9, "sampler_name": "k_lms"})
    assert r.status_code == 202
    codes = {w["code"]: w["message"] for w in r.json()["warnings"]}
    assert set(codes) == {"StepsTooFew", "CfgScaleTooLarge", "SamplerMismatch", "ClipSkipMismatch"}
    assert "params.steps" in codes["StepsTooFew"]
    ok = submit(client, params={"steps": 20, "cfg_scale": 7, "sampler_name": "k_euler",
                                "clip_skip": 2})
    assert "warnings" not in ok.json()


def test_transfer_is_idempotent_and_checked(client, ctx):
    alice, alice_h = make_user(ctx, "alice", kudos=100)
    bob, _ = make_user(ctx, "bob")
    body = {"username": f"bob#{bob.id}", "amount": 30}
    headers = {**alice_h, "Idempotency-Key": "transfer-1"}
    for _ in range(3):  # retries with the same key move nothing more
        r = client.post("/api/v2/kudos/transfer", json=body, headers=headers)
        assert r.status_code == 200 and r.json() == {"transferred": 30}
    assert balances(ctx)[bob.id] == 30 and balances(ctx)[alice.id] == 70
    r = client.post("/api/v2/kudos/transfer", json={**body, "amount": 71}, headers=alice_h)
    assert r.status_code == 400 and r.json()["rc"] == "KudosTransferNotEnough"
    r = client.post("/api/v2/kudos/transfer", json={**body, "username": f"alice#{alice.id}"},
                    headers=alice_h)
    assert r.json()["rc"] == "KudosTransferToSelf"
    r = client.post("/api/v2/kudos/transfer", json={**body, "username": "nobody#999"},
                    headers=alice_h)
    assert r.status_code == 404
    r = client.post("/api/v2/kudos/transfer", json={**body, "amount": -5}, headers=alice_h)
    assert r.status_code == 400 and "amount" in r.json()["message"]
    r = client.post("/api/v2/kudos/transfer", json=body, headers=ANON)
    assert r.status_code == 403
    assert_ledger_consistent(ctx)


def test_concurrent_transfers_never_overdraw(client, ctx):
    alice, alice_h = make_user(ctx, "alice", kudos=100)
    bob, bob_h = make_user(ctx, "bob", kudos=100)
    sent: dict[str, list[int]] = {"alice": [], "bob": []}
    crashed: list[str] = []

    def send(sender, headers, to):
        try:
            for _ in range(10):
                r = client.post("/api/v2/kudos/transfer", headers=headers,
                                json={"username": to, "amount": 15})
                assert r.status_code == 200 or r.json()["rc"] == "KudosTransferNotEnough", r.text
                sent[sender].append(r.status_code)
        except BaseException as e:  # a thread that dies must fail the test, not vanish
            crashed.append(repr(e))

    threads = [threading.Thread(target=send, args=("alice", alice_h, f"bob#{bob.id}")),
               threading.Thread(target=send, args=("bob", bob_h, f"alice#{alice.id}")),
               threading.Thread(target=send, args=("alice", alice_h, f"bob#{bob.id}"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not crashed, crashed
    assert len(sent["alice"]) == 20 and len(sent["bob"]) == 10
    ok = {who: codes.count(200) for who, codes in sent.items()}
    assert ok["alice"] > 0 and ok["bob"] > 0
    b = balances(ctx)
    # Every accepted transfer moved exactly 15, every refused one nothing; nobody overdrew.
    assert b[alice.id] == pytest.approx(100 - 15 * ok["alice"] + 15 * ok["bob"])
    assert b[bob.id] == pytest.approx(100 - 15 * ok["bob"] + 15 * ok["alice"])
    assert b[alice.id] >= 0 and b[bob.id] >= 0
    assert_ledger_consistent(ctx)


def test_moderators_change_users(client, ctx):
    mod, mod_h = make_user(ctx, "mod", moderator=True)
    carol, carol_h = make_user(ctx, "carol")
    r = client.put(f"/api/v2/users/{carol.id}", json={"kudos": 50, "trusted": True}, headers=mod_h)
    assert r.status_code == 200 and r.json() == {"new_kudos": 50, "trusted": True}
    r = client.put(f"/api/v2/users/{mod.id}", json={"kudos": 50}, headers=carol_h)
    assert r.status_code == 403
    r = client.put(f"/api/v2/users/{carol.id}", json={"vip": True}, headers=mod_h)
    assert r.status_code == 400 and "vip" in r.json()["message"]
    me = client.get("/api/v2/find_user", headers=carol_h).json()
    assert me["trusted"] and me["kudos"] == 50 and me["kudos_details"]["admin"] == 50
    public = client.get(f"/api/v2/users/{carol.id}").json()
    assert public["username"] == f"carol#{carol.id}" and "contact" not in public
    assert client.get("/api/v2/users/99999").status_code == 404
    page = client.get("/api/v2/users?page=1&sort=kudos").json()
    assert page[0]["username"] == f"carol#{carol.id}"  # the most kudos first
    assert_ledger_consistent(ctx)


def test_cli_roles_and_kudos(db, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAYHORDE_DATABASE_URL": db.url}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=env,
                              capture_output=True, text=True, check=True).stdout

    out = cli("users", "create", "dave", "--kudos", "25", "--role", "trusted")
    alias = out.split()[1]
    assert cli("users", "role", alias, "--add", "moderator", "--remove", "trusted").strip() \
        .endswith("moderator")
    assert "35.00 kudos" in cli("users", "kudos", alias, "10")
    with db.read() as s:
        dave = s.execute(select(User).where(User.username == "dave")).scalar_one()
        assert (dave.kudos, dave.moderator, dave.trusted) == (35, True, False)
        rows = s.execute(select(KudosEntry.amount).where(KudosEntry.user_id == dave.id)).scalars()
        assert sorted(rows) == [10, 25]
