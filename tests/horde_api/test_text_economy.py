"""Text prices and pay (issue 21, finding 2): bounded requests, bounded worker declarations,
upfront kudos for large requests, and pay for the tokens delivered, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from api.kudos import TEXT_CONTEXT_FACTOR_CAP, text_cost
from api.text_schemas import MAX_TEXT_LENGTH
from test_economy import assert_ledger_consistent, balances, make_user
from test_text_api import ANON, text_pop, text_submit

pytestmark = pytest.mark.timeout(120)
REFERENCE_MODEL = "Aeala/Enterredaas-33b"  # the reference gives it no context bound


def submit_text(client, h, gid, text):
    return client.post("/api/v2/generate/text/submit", headers=h,
                       json={"id": gid, "generation": text, "state": "ok"})


def test_the_reported_attack_is_refused(client, ctx):
    """An anonymous n=20, 16384 tokens, 1M context request was quoted 842,138 kudos and its
    sender's own worker, declaring max_length 1e6, was paid all of it for "x" answers."""
    _, h = make_user(ctx, "attacker")
    assert text_pop(client, h, name="mine", models=[REFERENCE_MODEL]).status_code == 200
    r = text_submit(client, models=[REFERENCE_MODEL],
                    params={"n": 20, "max_length": 16384, "max_context_length": 1048576})
    assert r.status_code == 400 and "params.max_length" in r.json()["message"], r.text
    r = text_pop(client, h, name="mine", models=[REFERENCE_MODEL], max_length=1_000_000)
    assert r.status_code == 400 and "max_length" in r.json()["message"], r.text
    # The largest request allowed needs its kudos upfront: the anonymous user has none.
    r = text_submit(client, models=[REFERENCE_MODEL],
                    params={"n": 20, "max_length": MAX_TEXT_LENGTH, "max_context_length": 1048576})
    assert r.status_code == 403 and r.json()["rc"] == "KudosUpfront", r.text
    assert "params.max_length" in r.json()["message"]


def test_the_context_weight_is_capped():
    small = text_cost(max_length=1000, max_context_length=4096, n=1)
    huge = text_cost(max_length=1000, max_context_length=1_048_576, n=1)
    assert huge == pytest.approx(text_cost(max_length=1000,
                                           max_context_length=int(4096 * (TEXT_CONTEXT_FACTOR_CAP - 1)),
                                           n=1))
    assert small < huge <= 1000 / 100 * TEXT_CONTEXT_FACTOR_CAP + 5


def test_large_text_requests_need_kudos_upfront(client, ctx):
    _, poor = make_user(ctx, "poor", kudos=0)
    _, rich = make_user(ctx, "rich", kudos=100_000)
    big = {"max_length": 1024, "max_context_length": 16384}
    for headers, params in [(ANON, big), (poor, big), (ANON, {"max_length": 100}),
                            (poor, {"max_length": 100})]:
        body = {"models": [REFERENCE_MODEL], "params": params}
        if params is not big:
            body["slow_workers"] = False  # asking for fast workers needs upfront kudos too
        r = text_submit(client, headers, **body)
        assert r.status_code == 403 and r.json()["rc"] == "KudosUpfront", (headers, params, r.text)
    ok = text_submit(client, rich, models=[REFERENCE_MODEL], params=big)
    assert ok.status_code == 202 and ok.json()["kudos"] == pytest.approx(
        text_cost(max_length=1024, max_context_length=16384, n=1))
    small = text_submit(client, models=[REFERENCE_MODEL], params={"max_length": 100})
    assert small.status_code == 202  # small requests stay free to ask for


def test_a_text_job_pays_for_the_tokens_delivered(client, ctx):
    owner, h = make_user(ctx, "scribe-owner")
    requester, rh = make_user(ctx, "reader", kudos=1000)
    params = {"max_length": 400, "max_context_length": 1024, "n": 2}
    quoted = text_submit(client, rh, params=params).json()
    assert quoted["kudos"] > 0
    before = balances(ctx)
    job = text_pop(client, h, amount=2).json()
    a, b = job["ids"]
    short = submit_text(client, h, a, "x")  # one token
    full = submit_text(client, h, b, "word " * 320)  # 1600 characters: 400 tokens
    assert short.status_code == 200 and full.status_code == 200
    per_job = text_cost(max_length=400, max_context_length=1024, n=1)
    assert full.json()["reward"] > 0
    assert short.json()["reward"] == pytest.approx(full.json()["reward"] / 400, abs=0.01)
    after = balances(ctx)
    earned = after[owner.id] - before[owner.id]
    assert earned == pytest.approx(short.json()["reward"] + full.json()["reward"], abs=0.02)
    spent = before[requester.id] - after[requester.id]
    assert earned <= spent <= 2 * per_job  # never more than quoted, never less than paid out
    assert_ledger_consistent(ctx)
    # The requester's usage counts what was delivered.
    from api.db.models import User
    with ctx.db.read() as s:
        assert s.get(User, requester.id).usage_tokens == 401
