"""Prompt filters (`/v2/filters`) and the CSAM guard at image submit, through HTTP on SQLite
and PostgreSQL: moderators' CRUD in horde-sdk's shapes, validation, what each filter type does
to a request, and a change reaching another API replica."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from api.db.models import Generation, PromptFilter, PromptFilterVersion, QueueEntry, Request, User
from api.db.session import Database
from api.filters import store
from conftest import count_statements, horde_sdk_python, make_ctx
from test_economy import make_user

pytestmark = pytest.mark.timeout(120)
ANON = {"apikey": "0000000000"}
DETAILS_KEYS = {"id", "regex", "filter_type", "description", "replacement", "user"}


@pytest.fixture
def mod(ctx):
    return make_user(ctx, "mod", moderator=True)


def put(client, headers, **body):
    return client.put("/api/v2/filters", json=body, headers=headers)


def add(client, headers, regex, filter_type, **body) -> str:
    r = put(client, headers, regex=regex, filter_type=filter_type, **body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def submit(client, headers=ANON, **body):
    body.setdefault("prompt", "a lighthouse ### fog")
    body.setdefault("models", ["tiny-sd15"])
    body.setdefault("params", {"steps": 10})
    return client.post("/api/v2/generate/async", json=body, headers=headers)


def rows(ctx) -> tuple[int, int, int]:
    with ctx.db.read() as s:
        return tuple(s.scalar(select(func.count()).select_from(t))
                     for t in (Request, Generation, QueueEntry))


def suspicion(ctx, user_id: int) -> int:
    with ctx.db.read() as s:
        return s.get(User, user_id).suspicion


def refused(r, message: str) -> bool:
    return r.status_code == 400 and r.json() == {"message": message, "rc": "CorruptPrompt"}


def wait_for(condition, timeout: float) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - start


# ---------------------------------------------------------------------------- the API


def test_crud_round_trip_in_horde_sdk_shapes(client, ctx, mod):
    (m, h), (m2, h2) = mod, make_user(ctx, "mod2", moderator=True)
    r = put(client, h, regex="light ?house", filter_type=20, description="Towers")
    assert r.status_code == 201
    first = r.json()
    assert set(first) == DETAILS_KEYS and str(uuid.UUID(first["id"])) == first["id"]
    assert first == {"id": first["id"], "regex": "light ?house", "filter_type": 20,
                     "description": "Towers", "replacement": "", "user": f"mod#{m.id}"}
    minors = put(client, h, regex="girl", filter_type=10, replacement="woman").json()
    assert (minors["replacement"], minors["description"]) == ("woman", "")

    listed = client.get("/api/v2/filters", headers=h).json()
    assert [f["id"] for f in listed] == [first["id"], minors["id"]]
    assert all(set(f) == DETAILS_KEYS for f in listed)
    assert [f["id"] for f in client.get("/api/v2/filters?filter_type=20", headers=h).json()] \
        == [first["id"]]
    for needle in ("TOWER", "house"):  # the description or the regex, ignoring case
        assert [f["id"] for f in client.get(f"/api/v2/filters?contains={needle}",
                                            headers=h).json()] == [first["id"]]
    assert client.get("/api/v2/filters?contains=%25", headers=h).json() == []  # % is literal
    assert client.get(f"/api/v2/filters/{first['id']}", headers=h).json() == first

    r = client.patch(f"/api/v2/filters/{first['id']}", headers=h2,
                     json={"description": "changed", "replacement": "x"})
    assert r.status_code == 200
    assert r.json() == {**first, "description": "changed", "replacement": "x",
                        "user": f"mod2#{m2.id}"}
    r = client.patch(f"/api/v2/filters/{first['id']}", headers=h,
                     json={"regex": "castle", "filter_type": 21, "replacement": ""})
    assert r.json() == {**first, "regex": "castle", "filter_type": 21, "description": "changed",
                        "user": f"mod#{m.id}"}
    fog = add(client, h, "fog", 21)
    assert client.get("/api/v2/filters/regex", headers=h).json() == [
        {"filter_type": 10, "regex": "girl"}, {"filter_type": 21, "regex": "castle|fog"}]
    assert client.get("/api/v2/filters/regex?filter_type=21", headers=h).json() == [
        {"filter_type": 21, "regex": "castle|fog"}]

    r = client.delete(f"/api/v2/filters/{first['id']}", headers=h)
    assert (r.status_code, r.json()) == (200, {"message": "OK"})
    for method in ("get", "patch", "delete"):
        r = client.request(method, f"/api/v2/filters/{first['id']}", headers=h,
                           json={"description": "d"} if method == "patch" else None)
        assert (r.status_code, r.json()["rc"]) == (404, "FilterNotFound")
    assert client.get("/api/v2/filters/not-a-uuid" + "x" * 40, headers=h).status_code == 404
    assert [f["id"] for f in client.get("/api/v2/filters", headers=h).json()] == [minors["id"], fog]
    with ctx.db.read() as s:  # every change (3 additions, 2 changes, 1 deletion) raised it
        assert s.get(PromptFilterVersion, 1).version == 6


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_answers_validate_against_horde_sdk_strict_models(client, ctx, mod):
    _, h = mod
    details = put(client, h, regex="girl", filter_type=10, replacement="woman").json()
    add(client, h, "nude", 11, description="d")
    answers = {
        "FilterDetails": [details, client.get(f"/api/v2/filters/{details['id']}", headers=h).json(),
                          client.patch(f"/api/v2/filters/{details['id']}", headers=h,
                                       json={"description": "x"}).json()],
        "FiltersListResponse": [client.get("/api/v2/filters", headers=h).json()],
        "FilterRegexResponse": [client.get("/api/v2/filters/regex", headers=h).json()],
        "FilterPromptSuspicionResponse": [
            client.post("/api/v2/filters", headers=h, json={"prompt": "girl nude"}).json(),
            client.post("/api/v2/filters", headers=h,
                        json={"prompt": "fog", "filter_type": 10}).json()],
        "DeleteFilterResponse": [client.delete(f"/api/v2/filters/{details['id']}",
                                               headers=h).json()],
    }
    script = ("import json, sys\n"
              "from horde_sdk.ai_horde_api import apimodels as m\n"
              "for name, values in json.load(sys.stdin).items():\n"
              "    for v in values:\n"
              "        getattr(m, name).model_validate(v)\n"
              "print('ok')\n")
    proc = subprocess.run([horde_sdk_python(), "-c", script], input=json.dumps(answers), text=True,
                          capture_output=True, timeout=90, env={**os.environ, "TESTS_ONGOING": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_only_moderators(client, ctx, mod):
    _, h = mod
    fid = add(client, h, "castle", 20)
    _, user_h = make_user(ctx, "plain")
    calls = [("get", "/api/v2/filters", None),
             ("put", "/api/v2/filters", {"regex": "x", "filter_type": 20}),
             ("post", "/api/v2/filters", {"prompt": "castle"}),
             ("get", "/api/v2/filters/regex", None), ("get", f"/api/v2/filters/{fid}", None),
             ("patch", f"/api/v2/filters/{fid}", {"description": "d"}),
             ("delete", f"/api/v2/filters/{fid}", None)]
    for headers, status, rc in ((user_h, 403, "NotModerator"), (ANON, 403, "AnonForbidden"),
                                ({}, 403, "AnonForbidden"),
                                ({"apikey": "not-a-key-0123456"}, 401, "InvalidAPIKey")):
        for method, path, body in calls:
            r = client.request(method, path, headers=headers, json=body)
            assert (r.status_code, r.json()["rc"]) == (status, rc), (method, path, headers)
    assert client.get(f"/api/v2/filters/{fid}", headers=h).json()["description"] == ""
    assert len(client.get("/api/v2/filters", headers=h).json()) == 1


@pytest.mark.parametrize("method,body,field,rc", [
    ("put", {"regex": "(unclosed", "filter_type": 20}, "regex", "InvalidRegex"),
    ("put", {"regex": "a*", "filter_type": 20}, "regex", "InvalidRegex"),  # matches everything
    ("put", {"regex": "(a+)+$", "filter_type": 20}, "regex", "InvalidRegex"),  # backtracks
    ("put", {"regex": "x" * 1001, "filter_type": 20}, "regex", "BadRequest"),
    ("put", {"regex": "", "filter_type": 20}, "regex", "BadRequest"),
    ("put", {"regex": "x", "filter_type": 9}, "filter_type", "BadRequest"),
    ("put", {"regex": "x", "filter_type": 30}, "filter_type", "BadRequest"),
    ("put", {"regex": "x"}, "filter_type", "BadRequest"),
    ("put", {"regex": "x", "filter_type": 20, "description": "d" * 1001}, "description",
     "BadRequest"),
    ("put", {"regex": "x", "filter_type": 10, "replacement": "r" * 201}, "replacement",
     "BadRequest"),
    ("patch", {"regex": "[z-a]"}, "regex", "InvalidRegex"),
    ("patch", {"filter_type": 30}, "filter_type", "BadRequest"),
    ("patch", {"replacement": "r" * 201}, "replacement", "BadRequest"),
    ("patch", {}, "body", "NoValidActions"),
    ("post", {"prompt": "p" * 10_001}, "prompt", "BadRequest"),
    ("post", {"prompt": "p", "filter_type": 5}, "filter_type", "BadRequest"),
])
def test_bad_input_is_refused_naming_the_field(client, ctx, mod, method, body, field, rc):
    _, h = mod
    fid = add(client, h, "castle", 20)
    path = f"/api/v2/filters/{fid}" if method == "patch" else "/api/v2/filters"
    r = client.request(method, path, headers=h, json=body)
    assert (r.status_code, r.json()["rc"]) == (400, rc), r.text
    assert r.json()["message"].startswith(f"{field}:"), r.text
    assert client.get(f"/api/v2/filters/{fid}", headers=h).json()["regex"] == "castle"
    assert len(client.get("/api/v2/filters", headers=h).json()) == 1


def test_at_most_a_thousand_filters(client, ctx, mod):
    m, h = mod
    with ctx.db.write() as s:
        s.add_all(PromptFilter(regex=f"word{i}", filter_type=21, user_id=m.id)
                  for i in range(store.MAX_FILTERS - 1))
    add(client, h, "the thousandth", 21)
    r = put(client, h, regex="one too many", filter_type=21)
    assert (r.status_code, r.json()["rc"]) == (400, "TooManyFilters")
    assert r.json()["message"].startswith("regex:")
    with ctx.db.read() as s:
        assert s.scalar(select(func.count()).select_from(PromptFilter)) == store.MAX_FILTERS


# ---------------------------------------------------------------------------- at submit


def test_a_blocked_term_refuses_the_prompt_without_suspicion(client, ctx, mod):
    _, h = mod
    user, user_h = make_user(ctx, "requester", kudos=1000)
    add(client, h, "CASTLE", 20)  # matched ignoring case
    for prompt in ("a castle ### fog", "A CaStLe", "castles on a hill"):
        assert refused(submit(client, user_h, prompt=prompt), store.BLOCKED_MESSAGE), prompt
    assert refused(submit(client, user_h, prompt="a castle", dry_run=True), store.BLOCKED_MESSAGE)
    assert rows(ctx) == (0, 0, 0)
    assert suspicion(ctx, user.id) == 0
    # Only the positive part is screened.
    assert submit(client, user_h, prompt="a lighthouse ### castle").status_code == 202
    assert submit(client, user_h, prompt="a lighthouse").status_code == 202
    assert rows(ctx) == (2, 2, 2)


def test_the_csam_pair_refuses_and_counts_suspicion(client, ctx, mod):
    _, h = mod
    user, user_h = make_user(ctx, "requester", kudos=1000)
    add(client, h, r"\bkids?\b", 10)  # no replacement: the pair is always refused
    add(client, h, r"\bnude\b", 11)
    for n, prompt in enumerate(("two kids, nude", "Kid NUDE ### fog"), start=1):
        assert refused(submit(client, user_h, prompt=prompt), store.TOS_MESSAGE)
        assert suspicion(ctx, user.id) == n
    r = submit(client, user_h, prompt="kid nude", replacement_filter=False)
    assert refused(r, store.TOS_MESSAGE) and suspicion(ctx, user.id) == 3
    # Anonymous requests count against the anonymous account.
    assert refused(submit(client, prompt="kid nude"), store.TOS_MESSAGE)
    assert suspicion(ctx, 0) == 1
    # A dry run is refused alike, without a user to count it against.
    assert refused(submit(client, user_h, prompt="kid nude", dry_run=True), store.TOS_MESSAGE)
    assert suspicion(ctx, user.id) == 3
    assert rows(ctx) == (0, 0, 0)
    # One half alone, or the other half in the negative prompt, passes.
    for prompt in ("a kid flying a kite", "a nude statue", "a kid ### nude"):
        assert submit(client, user_h, prompt=prompt).status_code == 202, prompt
    assert rows(ctx) == (3, 3, 3) and suspicion(ctx, user.id) == 3


def test_the_replacement_filter(client, ctx, mod):
    _, h = mod
    user, user_h = make_user(ctx, "requester", kudos=1000)
    add(client, h, r"\bgirls?\b", 10, replacement="woman")
    add(client, h, r"\bchild\b", 10, replacement="adult")
    add(client, h, r"\bnude\b", 11)
    r = submit(client, user_h, prompt="a GIRL and a child, nude ### girl")
    assert r.status_code == 202, r.text
    assert store.REPLACED_WARNING in r.json()["warnings"]
    with ctx.db.read() as s:
        req = s.get(Request, r.json()["id"])
        assert (req.prompt, req.negative_prompt) == ("a woman and a adult, nude", "girl")
    assert suspicion(ctx, user.id) == 0
    assert submit(client, user_h, prompt="girl nude", dry_run=True).status_code == 200
    # Without the replacement filter the same prompt is refused and counted.
    assert refused(submit(client, user_h, prompt="a girl, nude", replacement_filter=False),
                   store.TOS_MESSAGE)
    assert suspicion(ctx, user.id) == 1
    # Every matched type-10 filter must have a replacement ...
    add(client, h, r"\bteen\b", 10)
    assert refused(submit(client, user_h, prompt="a teen girl, nude"), store.TOS_MESSAGE)
    assert suspicion(ctx, user.id) == 2
    # ... and the replaced prompt is screened again.
    add(client, h, r"\bkid\b", 10, replacement="kid")
    assert refused(submit(client, user_h, prompt="a kid, nude"), store.TOS_MESSAGE)
    assert suspicion(ctx, user.id) == 3
    assert rows(ctx) == (1, 1, 1)


def test_the_check_endpoint(client, ctx, mod):
    _, h = mod
    add(client, h, "girl|boy", 10)
    add(client, h, "NUDE", 11)
    add(client, h, "castle", 20)
    add(client, h, "fog", 15)  # stored and checked, but no effect on requests

    def check(**body):
        r = client.post("/api/v2/filters", headers=h, json=body)
        assert r.status_code == 200 and set(r.json()) == {"suspicion", "matches"}
        return r.json()

    assert check(prompt="a Girl and a boy, nude, girl; castle in fog") == {
        "suspicion": 4, "matches": ["Girl", "boy", "girl", "nude", "fog", "castle"]}  # by type
    assert check(prompt="a girl and a boy", filter_type=10) == {
        "suspicion": 1, "matches": ["girl", "boy"]}
    assert check(prompt="castle", filter_type=10) == {"suspicion": 0, "matches": []}
    assert check(prompt="lighthouse") == {"suspicion": 0, "matches": []}
    assert submit(client, prompt="a castle in fog").status_code == 400
    assert submit(client, prompt="a lighthouse in fog").status_code == 202  # type 15: no effect


def test_screening_costs_no_statement(client, ctx, mod):
    _, h = mod
    add(client, h, "castle", 20)
    add(client, h, "girl", 10)
    add(client, h, "nude", 11)
    submit(client)
    with count_statements(ctx.db) as c:
        assert submit(client, prompt="a girl on a hill ### castle").status_code == 202
    # As without filters (test_generate_api): the cache is in memory. PostgreSQL takes the
    # requester's waiting-cap lock first (api/admission.py).
    assert c.count == (6 if ctx.db.engine.dialect.name == "postgresql" else 5)


def test_a_slow_regex_cannot_hold_a_request(client, ctx, mod):
    _, h = mod
    add(client, h, "(q+q+)+y", 20)  # fast on the probes, catastrophic on q's
    start = time.monotonic()
    r = submit(client, prompt="q" * 5000)
    assert refused(r, store.SLOW_MESSAGE)
    assert time.monotonic() - start < store.MATCH_BUDGET_SECONDS + 2
    assert rows(ctx) == (0, 0, 0)


# ---------------------------------------------------------------------------- replicas


def test_a_change_reaches_another_replica_within_seconds(db, tmp_path):
    other_db = Database(db.url)  # a replica of its own: its own engine and cache
    a_ctx, b_ctx = make_ctx(db, tmp_path), make_ctx(other_db, tmp_path)
    # The poll carries it: within the poll under way and the next (a refresh that had just
    # read when the change landed), with slack for a loaded host. One poll plus 1.5 s was
    # missed by 0.13 s once in a full suite run on two busy cores.
    limit = 2 * b_ctx.settings.filter_refresh_seconds + 1.5
    try:
        with TestClient(create_app(a_ctx)) as a, TestClient(create_app(b_ctx)) as b:
            assert a_ctx.filters is not b_ctx.filters
            _, h = make_user(a_ctx, "mod", moderator=True)

            def blocks(word: str) -> bool:
                r = submit(b, prompt=f"a {word}", dry_run=True)
                assert r.status_code in (200, 400), r.text
                return r.status_code == 400

            assert not blocks("castle")
            castle = add(a, h, "castle", 20)
            assert wait_for(lambda: blocks("castle"), timeout=10) < limit
            assert refused(submit(b, prompt="a castle"), store.BLOCKED_MESSAGE)
            assert rows(b_ctx) == (0, 0, 0)
            # A deletion and an addition leave the count as it was; both are noticed.
            assert a.delete(f"/api/v2/filters/{castle}", headers=h).status_code == 200
            add(a, h, "tower", 20)
            assert wait_for(lambda: blocks("tower") and not blocks("castle"), timeout=10) < limit
            tower = a.get("/api/v2/filters", headers=h).json()[0]["id"]
            assert a.delete(f"/api/v2/filters/{tower}", headers=h).status_code == 200
            assert wait_for(lambda: not blocks("tower"), timeout=10) < limit
            assert submit(b, prompt="a tower").status_code == 202
    finally:
        other_db.dispose()
