"""Issue 21, finding 5: what a pop offers (models, blacklist words, priority users) is bound as
values, never written into the claim's statement: the statement is one text for every worker
of a shape, its bound parameters do not grow with the lists, its cost is linear in the models
offered, and lists past the caps get a 400 naming the field, never a 500."""

from __future__ import annotations

import pytest

from api.db import queue
from api.worker_schemas import MAX_BLACKLIST, MAX_POP_MODELS
from conftest import add_request, count_statements
from test_economy import make_user

pytestmark = pytest.mark.timeout(120)
MODELS = [f"offered-model-{i:04d}" for i in range(MAX_POP_MODELS)]
WORDS = [f"Word{i:04d}" for i in range(MAX_BLACKLIST)]


def offer(client, headers, models, blacklist=(), name="offerer", **body):
    return client.post("/api/v2/generate/pop", headers=headers, json={
        "name": name, "models": list(models), "blacklist": list(blacklist),
        "max_pixels": 1024 * 1024, **body})


def test_a_pop_offering_the_most_models_and_words_claims_the_right_job(client, ctx):
    customizer, h = make_user(ctx, "customizer", customizer=True)  # any model names
    hit = add_request(ctx.db, models=(MODELS[-1],), prompt="a castle with WORD0999 in it")
    clean = add_request(ctx.db, models=(MODELS[500],), prompt="a castle")
    r = offer(client, h, MODELS, WORDS)
    assert r.status_code == 200, r.text
    job = r.json()
    with ctx.db.read() as s:
        from api.db.models import Generation
        gen = s.get(Generation, job["ids"][0])
    assert gen.request_id == clean  # the blacklisted prompt (any case) is skipped
    assert job["model"] == MODELS[500]
    again = offer(client, h, MODELS, WORDS).json()
    assert again["ids"] == [] and again["skipped"] == {"blacklist": 1}
    # Without the word, the other job is claimable.
    got = offer(client, h, MODELS, WORDS[:-1]).json()
    with ctx.db.read() as s:
        assert s.get(Generation, got["ids"][0]).request_id == hit


@pytest.mark.parametrize("field, size", [("models", MAX_POP_MODELS + 1),
                                         ("blacklist", MAX_BLACKLIST + 1)])
def test_lists_past_the_caps_are_400s_naming_the_field(client, ctx, field, size):
    _, h = make_user(ctx, "customizer", customizer=True)
    models = [f"m{i}" for i in range(size)] if field == "models" else ["tiny-sd15"]
    words = [f"w{i}" for i in range(size)] if field == "blacklist" else []
    for route in ("/api/v2/generate/pop", "/api/v2/generate/text/pop"):
        r = client.post(route, headers=h, json={"name": "big", "models": models,
                                                 "blacklist": words})
        assert r.status_code == 400, r.text
        assert r.json()["message"].startswith(field), r.json()


def test_the_statement_is_the_same_whatever_the_lists(ctx):
    """Workers that differ only in their models, words and priority users share one
    statement, whose text holds none of their values and whose bound parameters do not grow
    with their lists."""
    pg = not ctx.db.is_sqlite
    small = queue.Capabilities("w1", MODELS[:2], blacklist=("castle",), owner_id=3,
                               priority_user_ids=(5,))
    large = queue.Capabilities("w2", MODELS, blacklist=tuple(WORDS), owner_id=4,
                               priority_user_ids=tuple(range(1, 51)))
    assert queue._shape(small, pg) == queue._shape(large, pg)
    for build in (queue._claim_statement, queue._skipped_statement):
        statement = build(queue._shape(large, pg))
        assert statement is build(queue._shape(small, pg))
        sql = str(statement.compile(dialect=ctx.db.engine.dialect))
        assert "castle" not in sql and MODELS[0] not in sql and "Word" not in sql
    assert len(queue._params(large, 1, pg)) == len(queue._params(small, 1, pg))


def test_each_offered_model_is_read_once(db):
    """The claim reads each offered model's queue once (a LATERAL look-up or a correlated IN
    per model): its plan has no repetition that grows with the list."""
    add_request(db, models=(MODELS[7],), n=3)
    claimer = queue.Capabilities("w1", MODELS[:300], any_model="", blacklist=("zzz",) * 3)
    with count_statements(db) as counted:
        jobs = queue.claim(db, claimer, 2)
    assert [j.model for j in jobs] == [MODELS[7]] * 2
    # a read that there are any, the candidates, the update (SQLite: and its entries')
    assert counted.count == (4 if db.is_sqlite else 3)
    sql = counted.statements[1]
    assert sql.count("queue_entries.model =") <= 2 and len(sql) < 4000
