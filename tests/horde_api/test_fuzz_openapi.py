"""Every route of the OpenAPI schema (`/api/openapi.json`) fuzzed with schemathesis, in
process against the ASGI app: inputs that fit the schema and inputs that break it, sent as the
anonymous user, a registered user with kudos, a moderator and with a generated `apikey`.
Checks: no answer is a 5xx, and every documented answer matches its own schema.

Besides what schemathesis generates, "steered" cases name things that exist (served models,
held job ids, a stored image; see seed_known) so that they get past the lookups, some with a
NUL character in one string; the requests that fuzzed worker submits finished are read again
at the end. An echo worker answers text jobs, so the OpenAI routes' waits end.

A bounded number of cases per operation here (FUZZ_EXAMPLES, default 60: about 40 s per
database on 2 CPUs; FUZZ_SEED picks other cases than the fixed default);
bench/fuzz_openapi.py runs many more and prints counts per route. Bugs found and not yet fixed
are listed in KNOWN_BUGS, each matched as narrowly as it can be.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import logging
import os
import random
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance
from sqlalchemy import select

from conftest import POSTGRES_URL, TINY_MODELS, make_ctx
from test_economy import make_user as make_economy_user

from api import ledger, openai_api
from api.app import create_app
from api.auth import ANONYMOUS_KEY, hash_api_key
from api.db import queue
from api.db.migrate import reset, upgrade
from api.db.models import ROLES, User, Worker
from api.db.session import Database
from api.images import Context
from api.text_schemas import ChatCompletionRequest, CompletionRequest

pytestmark = pytest.mark.timeout(600)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMA_PATH = "/api/openapi.json"
CHECKS = [not_a_server_error, response_schema_conformance]
CLIENT_AGENT = "rayhorde-fuzz:1:none"
# A fuzzed call that queues text through /v1 waits at most this long for the echo worker.
OPENAI_WAIT_SECONDS = 3.0
# Fuzzed settings: no rate limits (conftest's), no cap on waiting images, and source URLs that
# do not resolve give up quickly.
FUZZ_SETTINGS = {"max_waiting_per_user": 10**9, "max_waiting_education": 10**9,
                 "source_fetch_timeout_seconds": 1.0}


@dataclass(frozen=True)
class KnownBug:
    """A failure the fuzzer finds that is not fixed yet: on `route`, answering `status`, with
    `contains` in what came back (the app's frame that raised, or the check's message). Keep
    it narrow; `what` names the bug and where it is to be fixed."""
    route: str
    status: int
    contains: str
    what: str


KNOWN_BUGS: list[KnownBug] = []


@dataclass
class Target:
    """What the fuzzer runs against: the app, its loaded schema, who calls and known ids."""
    app: object
    schema: object
    identities: dict[str, dict]  # name -> headers (None: the fuzzer generates the apikey)
    ctx: Context | None = None
    # path parameter or route -> values that exist (see seed_known)
    known: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Outcome:
    calls: Counter = field(default_factory=Counter)  # route -> calls
    statuses: Counter = field(default_factory=Counter)  # (route, status) -> calls
    known: Counter = field(default_factory=Counter)  # (route, bug) -> calls
    failures: dict = field(default_factory=dict)  # (route, status, title) -> first report

    def merge(self, other: Outcome) -> None:
        self.calls.update(other.calls)
        self.statuses.update(other.statuses)
        self.known.update(other.known)
        for k, v in other.failures.items():
            self.failures.setdefault(k, v)


def make_user(ctx: Context, name: str, kudos: float = 0.0, **roles) -> dict:
    """The headers of a new user (made straight in the database, as tests/horde_api do)."""
    return make_economy_user(ctx, name, kudos, **roles)[1]


FUZZ_ROLES = {"registered": {}, "moderator": {"moderator": True}}  # and 1e6 kudos each


def restore_identities(target: Target) -> None:
    """Fuzzed moderator calls change users, the fuzzer's own too (PUT /users: roles, kudos,
    names): each operation starts with the identities it was meant to have."""
    with target.ctx.db.write() as s:
        for name, roles in FUZZ_ROLES.items():
            key_hash = hash_api_key(target.identities[name]["apikey"], target.ctx.settings.key_salt)
            user = s.execute(select(User).where(User.api_key_hash == key_hash)).scalar_one()
            for role in ROLES:
                setattr(user, role, roles.get(role, False))
            if user.kudos < 1e5:
                ledger.award(s, user.id, 1e6 - user.kudos)


def _webp_b64() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 80, 20)).save(buf, format="WEBP")
    return base64.b64encode(buf.getvalue()).decode()


TINY_WEBP = _webp_b64()  # a source image, an interrogated image, a worker's result
OPENAI_FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)


class EchoTextWorker:
    """An HTTP text worker answering every text job with a fixed text, and standing in for
    the cluster's LLM deployment for chat jobs (which HTTP workers never get; it claims and
    finishes them through api.db.queue, as the dispatcher does), so that the OpenAI routes'
    calls end (they wait for their text) and their answers are checked too."""

    def __init__(self, ctx: Context, app, headers: dict):
        self.ctx, self.app = ctx, app
        self.headers = {**headers, "Client-Agent": CLIENT_AGENT}
        self.answered = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
            assert not self.thread.is_alive(), "the echo text worker did not stop"
        if self.error is not None:
            raise AssertionError("the echo text worker failed") from self.error

    def _run(self) -> None:
        pop = {"name": "fuzz-echo", "models": ["tiny-llm"], "amount": 20, "nsfw": True,
               "max_length": 4096, "max_context_length": 65536}
        try:
            with asgi.get_client(self.app) as http:
                while not self.stopping.is_set():
                    # Fuzzed calls may put this worker into maintenance, rename it or flag
                    # its owner: a 4xx is waited out, a 5xx is a failure like any other.
                    r = http.post("/api/v2/generate/text/pop", headers=self.headers, json=pop)
                    assert r.status_code < 500, f"text pop: {r.status_code} {r.text}"
                    ids = r.json()["ids"] if r.status_code == 200 else []
                    for gid in ids:
                        a = http.post("/api/v2/generate/text/submit", headers=self.headers,
                                      json={"id": gid, "generation": "echo", "state": "ok"})
                        assert a.status_code < 500, f"text submit: {a.status_code} {a.text}"
                        self.answered += a.status_code == 200
                    if not ids and not self._answer_chats():
                        self.stopping.wait(0.02)
        except BaseException as e:  # noqa: BLE001 - handed to the test in __exit__
            self.error = e

    def _answer_chats(self) -> int:
        with self.ctx.db.read() as s:
            worker = s.execute(select(Worker.id, Worker.owner_id)
                               .where(Worker.name == "fuzz-echo")).first()
        if worker is None:
            return 0
        caps = queue.Capabilities(worker_id=worker.id, models=["tiny-llm"], kind="text",
                                  max_length=4096, max_context_length=65536)
        jobs = queue.claim(self.ctx.db, caps, 20)
        queue.finish(self.ctx.db, [queue.Result(
            generation_id=j.generation_id, claim_id=j.claim_id, storage_key=None, seed=j.seed,
            worker_id=worker.id, worker_name="fuzz-echo", owner_id=worker.owner_id, text="echo",
            prompt_tokens=1, completion_tokens=1, finish_reason="stop") for j in jobs])
        self.answered += len(jobs)
        return len(jobs)


def seed_known(app, identities: dict, echo: EchoTextWorker) -> dict[str, list[str]]:
    """Things that exist, for steered cases to name instead of random ids. For the path
    parameters: an image request with one image done, a text request the echo worker
    answered, an interrogation, a prompt filter, the workers, the users, the stored image.
    For the submit routes (keyed by route): image and text jobs and an interrogation form
    held by the registered user's workers, of requests the path parameters never name, so
    that no fuzzed cancel ends them first; their requests are read again after fuzzing
    (`revisit`). The echo worker starts once the held text jobs are popped, so that it does
    not take them."""
    user = {**identities["registered"], "Client-Agent": CLIENT_AGENT}
    with asgi.get_client(app) as http:
        def post(path: str, body: dict, status: int = 200) -> dict:
            r = http.post(path, headers=user, json=body)
            assert r.status_code == status, f"{path}: {r.status_code} {r.text}"
            return r.json()

        def image_jobs(n: int) -> tuple[str, list[str]]:
            rid = post("/api/v2/generate/async", {
                "prompt": "a lighthouse ### fog", "models": ["tiny-sd15"],
                "params": {"width": 64, "height": 64, "steps": 2, "n": n}}, 202)["id"]
            ids = post("/api/v2/generate/pop", {
                "name": "fuzz-image-worker", "models": ["tiny-sd15"], "amount": n})["ids"]
            assert len(ids) == n, ids
            return rid, ids

        def interrogation() -> tuple[str, list[str]]:
            rid = post("/api/v2/interrogate/async", {
                "source_image": TINY_WEBP, "forms": [{"name": "caption"}]}, 202)["id"]
            forms = post("/api/v2/interrogate/pop", {
                "name": "fuzz-alchemist", "forms": ["caption"], "amount": 20})["forms"]
            assert forms, "no form to hold"
            return rid, [f["id"] for f in forms]

        image_id, (done_job,) = image_jobs(1)
        post("/api/v2/generate/submit", {
            "id": done_job, "generation": TINY_WEBP, "seed": 7, "state": "ok",
            "gen_metadata": [{"type": "censorship", "value": "nsfw"}]})
        held_image_id, held_images = image_jobs(20)
        held_text_id = post("/api/v2/generate/text/async", {
            "prompt": "Hello", "models": ["tiny-llm"], "params": {"n": 20}}, 202)["id"]
        held_texts = post("/api/v2/generate/text/pop", {
            "name": "fuzz-text-worker", "models": ["tiny-llm"], "amount": 20})["ids"]
        assert len(held_texts) == 20, held_texts
        interrogation_id, _ = interrogation()
        held_interrogation_id, held_forms = interrogation()
        echo.start()
        text_id = post("/api/v2/generate/text/async",
                       {"prompt": "Hello", "models": ["tiny-llm"]}, 202)["id"]
        deadline = time.monotonic() + 30
        while not http.get(f"/api/v2/generate/text/status/{text_id}").json()["done"]:
            assert time.monotonic() < deadline, "the echo text worker never answered"
            time.sleep(0.02)
        r = http.put("/api/v2/filters", headers=identities["moderator"],
                     json={"regex": "forbidden ?words", "filter_type": 10})
        assert r.status_code == 201, r.text
        filter_id = r.json()["id"]
        workers = http.get("/api/v2/workers").json()
        users = http.get("/api/v2/users").json()
        status = http.get(f"/api/v2/generate/status/{image_id}").json()
    objects = [g["img"].split("/api/v2/objects/", 1)[1] for g in status["generations"]
               if "/api/v2/objects/" in g["img"]]
    assert objects, status
    return {"request_id": [image_id, text_id], "interrogation_id": [interrogation_id],
            "filter_id": [filter_id],
            "worker_id": [w["id"] for w in workers], "user_id": [str(u["id"]) for u in users],
            "key": objects,
            "POST /api/v2/generate/submit": held_images,
            "POST /api/v2/generate/text/submit": held_texts,
            "POST /api/v2/interrogate/submit": held_forms,
            "revisit": [("GET /api/v2/generate/check/{request_id}", held_image_id),
                        ("GET /api/v2/generate/status/{request_id}", held_image_id),
                        ("GET /api/v2/generate/text/status/{request_id}", held_text_id),
                        ("GET /api/v2/interrogate/status/{interrogation_id}",
                         held_interrogation_id)]}


def _steer(case, target: Target, rnd: random.Random):
    """A fitting case with the fields the server checks against what exists (models, forms,
    job ids, source images) set to things that do, so that it gets past those checks."""
    body = case.body
    if not isinstance(body, dict):
        return case
    if isinstance(body.get("models"), list):
        # Served models, and half the time the generated names after them: a worker's list
        # of whatever it has on disk reaches the claim statement as it is.
        generated = [m for m in body["models"] if isinstance(m, str)]
        body["models"] = rnd.sample(TINY_MODELS, rnd.randint(1, 2)) + (
            generated if rnd.random() < 0.5 else [])
    if isinstance(body.get("model"), str):
        body["model"] = "tiny-llm"
    if isinstance(body.get("forms"), list):
        names = rnd.sample(["caption", "interrogation", "nsfw"], rnd.randint(1, 2))
        body["forms"] = ([{"name": n} for n in names] if case.operation.path.endswith("/async")
                         else names)
    for name in ("source_image", "source_mask"):
        if isinstance(body.get(name), str):
            body[name] = TINY_WEBP
    held = target.known.get(case.operation.label)
    if held and "id" in body:  # a job the registered user's worker holds, submitted by it
        body["id"] = rnd.choice(held)
        case.headers = {**(case.headers or {}), **target.identities["registered"]}
    if case.operation.path.startswith("/v1/"):
        for name in [k for k in body if k not in OPENAI_FIELDS]:
            del body[name]  # anything else is refused by name (UnsupportedParameter)
    return case


def _with_nul(case, rnd: random.Random):
    """One string of the body, query or path with a NUL character added: valid JSON and a
    valid URL, but no PostgreSQL text can hold it (schemathesis seldom makes one)."""
    slots = []  # (container, key) of every string

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(value, str):
                slots.append((node, key))
            elif isinstance(value, (dict, list)):
                walk(value)

    for part in (case.body, case.query, case.path_parameters):
        if isinstance(part, (dict, list)):
            walk(part)
    if slots:
        node, key = rnd.choice(slots)
        node[key] += "\x00"
    return case


def case_strategy(target: Target, operation):
    """Cases for `operation`: fitting and breaking the schema, and fitting with what exists
    steered in (see _steer), as each identity, the last also with a NUL in one string; and
    with each known id in its path parameters."""
    variants = []
    for headers in target.identities.values():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            variants.append(operation.as_strategy(generation_mode=mode, headers=headers))
        steered = st.tuples(operation.as_strategy(headers=headers), st.randoms()).map(
            lambda pair: _steer(pair[0], target, pair[1]))
        variants.append(steered)
        variants.append(st.tuples(steered, st.randoms()).map(
            lambda pair: _with_nul(pair[0], pair[1])))
    for parameter in operation.path_parameters:
        for value in target.known.get(parameter.name, []):
            for headers in target.identities.values():
                variants.append(operation.as_strategy(headers=headers,
                                                      path_parameters={parameter.name: value}))
    return st.one_of(variants)


def _app_frame(exc: BaseException) -> str:
    """Where in this repo an unhandled exception was raised: `api/workers.py:86 (priority_ids)`."""
    where = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.startswith(REPO) and "/tests/" not in frame.filename:
            where = f"{os.path.relpath(frame.filename, REPO)}:{frame.lineno} ({frame.name})"
    return where


class AppErrors(logging.Handler):
    """The exceptions the app logs while it answers (its error handlers log what they turn
    into a 500), so that a failure names where it was raised."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.raised: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.raised.append(record.exc_info[1])


APP_ERRORS = AppErrors()


def _unhandled(exc: BaseException) -> str:
    """`ValueError at api/workers.py:86 (priority_ids)`, or where the traceback is gone (the
    app's handlers get some exceptions without one) its message's first line."""
    where = _app_frame(exc)
    if where == "?":
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    return f"{type(exc).__name__} at {where}"


def _call(case) -> tuple[int, str | None, str]:
    """One case: (status, failure title or None, what came back). An exception the app does
    not handle is the 500 its clients get (Starlette re-raises it after answering)."""
    APP_ERRORS.raised.clear()
    try:
        response = case.call(headers={"Client-Agent": CLIENT_AGENT}, timeout=60)
    except Exception as e:  # noqa: BLE001 - what the fuzzer is for
        title = f"500 unhandled {_unhandled(e)}"
        return 500, title, f"{title}: {str(e)[:500]}\n{case.as_curl_command()}"
    if (case.operation.path.startswith("/v1/") and response.status_code == 504
            and '"Timeout"' in response.text):
        # The echo worker never saw the job: a fuzzed pop took it, or a fuzzed change to its
        # owner or itself keeps it from popping. The answer OpenAI clients expect then.
        return 504, None, response.text
    try:
        case.validate_response(response, checks=CHECKS)
    except (FailureGroup, Failure) as e:
        failures = e.exceptions if isinstance(e, FailureGroup) else (e,)
        title, text = ", ".join(sorted({f.title for f in failures})), str(e)
        if APP_ERRORS.raised:
            raised = APP_ERRORS.raised[-1]
            title = f"{title}: {_unhandled(raised)}"
            text = f"{_unhandled(raised)}: {str(raised)[:500]}\n{text}"
        return response.status_code, title, text
    return response.status_code, None, ""


def _known_bug(label: str, status: int, text: str) -> KnownBug | None:
    for bug in KNOWN_BUGS:
        if bug.route == label and bug.status == status and bug.contains in text:
            return bug
    return None


def _record(out: Outcome, label: str, case) -> None:
    status, title, text = _call(case)
    out.calls[label] += 1
    out.statuses[(label, status)] += 1
    if title is None:
        return
    bug = _known_bug(label, status, text)
    if bug is not None:
        out.known[(label, bug.what)] += 1
    else:
        out.failures.setdefault((label, status, title), text)


def fuzz_operation(target: Target, operation, max_examples: int, seed_value: int | None) -> Outcome:
    """Up to `max_examples` cases of one operation; every distinct failure recorded (its first
    case) rather than raised, so that one run lists them all."""
    out = Outcome()
    if target.ctx is not None:
        restore_identities(target)

    @settings(max_examples=max_examples, deadline=None, database=None,
              derandomize=seed_value is None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=case_strategy(target, operation))
    def run(case):
        _record(out, operation.label, case)

    if seed_value is not None:
        run = seed(seed_value)(run)
    run()
    return out


def operations(schema) -> list:
    ops = []
    for result in schema.get_all_operations():
        ops.append(result.ok())  # a route whose schema cannot be parsed fails here, by name
    return ops


def revisit(target: Target) -> Outcome:
    """The requests whose held jobs fuzzed submits finished, read as each identity: whatever
    a worker sent must not break what the requester reads."""
    out = Outcome()
    by_label = {op.label: op for op in operations(target.schema)}
    for label, request_id in target.known["revisit"]:
        operation = by_label[label]
        name = next(p.name for p in operation.path_parameters)
        for headers in target.identities.values():
            _record(out, f"{label} (after fuzzed submits)", operation.Case(
                path_parameters={name: request_id}, headers=headers or {}))
    return out


def fuzz_all(target: Target, max_examples: int, seed_value: int | None = None) -> Outcome:
    """Every operation, then `revisit`."""
    total = Outcome()
    for operation in operations(target.schema):
        total.merge(fuzz_operation(target, operation, max_examples, seed_value))
    total.merge(revisit(target))
    return total


def report(outcome: Outcome) -> str:
    return "\n\n".join(f"{route} -> {status}: {title}\n{text}"
                       for (route, status, title), text in sorted(outcome.failures.items()))


@contextlib.contextmanager
def fuzzing(ctx: Context, monkeypatch):
    """The app on `ctx`, its schema loaded, its users made, things seeded and the echo text
    worker running; everything the ASGI transport started is stopped on exit."""
    identities = {
        "anonymous": {"apikey": ANONYMOUS_KEY},
        **{name: make_user(ctx, f"fuzz-{name}", kudos=1e6, **roles)
           for name, roles in FUZZ_ROLES.items()},
        "generated": None,
    }
    monkeypatch.setattr(openai_api, "wait_ended",
                        functools.partial(openai_api.wait_ended, timeout=OPENAI_WAIT_SECONDS))
    app = create_app(ctx)
    echo = EchoTextWorker(ctx, app, make_user(ctx, "fuzzecho"))
    app_log = logging.getLogger("rayhorde.api")
    app_log.addHandler(APP_ERRORS)
    try:
        schema = schemathesis.openapi.from_asgi(SCHEMA_PATH, app)
        target = Target(app=app, schema=schema, identities=identities, ctx=ctx)
        target.known = seed_known(app, identities, echo)
        yield target
        echo.stop()  # raises what made it fail, if anything did
    finally:
        echo.stopping.set()
        app_log.removeHandler(APP_ERRORS)
        asgi.shutdown_lifespans()  # the app's sweeper and filter poller, started by the transport


@pytest.fixture
def fuzz_target(request, tmp_path, monkeypatch):
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path}/rayhorde.db")
        upgrade(db)
    else:
        db = reset(POSTGRES_URL)
    try:
        with fuzzing(make_ctx(db, tmp_path, **FUZZ_SETTINGS), monkeypatch) as target:
            yield target
    finally:
        db.dispose()


EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
SEED = int(os.environ["FUZZ_SEED"]) if os.environ.get("FUZZ_SEED") else None


@pytest.mark.parametrize("fuzz_target", ["sqlite", pytest.param("postgres",
                                                                  marks=pytest.mark.postgres)],
                         indirect=True)
def test_no_route_answers_5xx_or_breaks_its_schema(fuzz_target):
    outcome = fuzz_all(fuzz_target, EXAMPLES, SEED)
    labels = {op.label for op in operations(fuzz_target.schema)}
    assert labels <= set(outcome.calls), f"never called: {labels - set(outcome.calls)}"
    if outcome.failures:
        pytest.fail(f"{len(outcome.failures)} distinct failures (FUZZ_SEED={SEED}, "
                    f"FUZZ_EXAMPLES={EXAMPLES}):\n\n{report(outcome)}", pytrace=False)


def test_the_fuzzer_reports_a_500_and_an_answer_that_breaks_its_schema():
    """The harness itself: an app with a route that raises on some input and one whose
    answer does not match its declared schema gets both reported, by route."""
    from fastapi import FastAPI

    app = FastAPI(openapi_url="/openapi.json")

    @app.get("/half/{n}")
    def half(n: int):
        if n % 2:
            raise ValueError("odd")
        return {"half": n // 2}

    @app.get("/count", responses={200: {"content": {"application/json": {"schema": {
        "type": "object", "required": ["count"],
        "properties": {"count": {"type": "integer"}}}}}}})
    def count():
        return {"count": "many"}

    target = Target(app=app, schema=schemathesis.openapi.from_asgi("/openapi.json", app),
                    identities={"anonymous": None})
    try:
        found = Outcome()
        for operation in operations(target.schema):
            found.merge(fuzz_operation(target, operation, 20, None))
    finally:
        asgi.shutdown_lifespans()
    titles = {(route, status): title for route, status, title in found.failures}
    assert set(titles) == {("GET /half/{n}", 500), ("GET /count", 200)}, report(found)
    assert "ValueError" in titles[("GET /half/{n}", 500)], report(found)
    assert "schema" in titles[("GET /count", 200)].lower(), report(found)


@pytest.mark.parametrize("method, path, body, where", [
    ("post", "/api/v2/generate/async", {"prompt": "a\x00b"}, "prompt"),
    ("post", "/api/v2/generate/pop", {"name": "w", "models": ["tiny-sd15", "x\x00"]}, "models.1"),
    ("get", "/api/v2/workers?name=a%00", None, "name"),
    ("get", "/api/v2/generate/status/abc%00def", None, "path"),
])
def test_a_nul_character_is_refused_naming_where_it_is(client, method, path, body, where):
    """What fuzzing found on PostgreSQL (which cannot store a NUL): 500s on 20 routes."""
    r = client.request(method.upper(), path, json=body, headers={"apikey": ANONYMOUS_KEY})
    assert r.status_code == 400, r.text
    assert r.json() == {"message": f"{where}: NUL characters are not allowed", "rc": "BadRequest"}


def test_only_a_real_nul_is_refused(client):
    # "\\u0000" in the prompt's text (an escaped backslash, then u0000) is no NUL.
    r = client.post("/api/v2/generate/async", headers={"apikey": ANONYMOUS_KEY},
                    json={"prompt": "a\\u0000", "models": ["tiny-sd15"]})
    assert r.status_code == 202, r.text
    r = client.post("/v1/completions", json={"model": "tiny-llm", "prompt": ["x", "\x00"]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt.1", r.json()


def test_an_upload_signature_that_is_not_ascii_is_refused_not_a_500(client):
    """Found by fuzzing: hmac.compare_digest raised TypeError on it (api/routes/status.py)."""
    r = client.put("/api/v2/objects/images/a/b.webp?expires=99999999999&signature=%C2%91ab",
                   content=b"RIFF")
    assert r.status_code == 403, r.text
    assert r.json()["message"].startswith("signature:"), r.json()
