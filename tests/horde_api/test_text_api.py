"""The AI Horde text API and its worker protocol, and the OpenAI-compatible API when an HTTP
worker does the work (the in-cluster LLM path is in tests/serve), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time

import pytest

from conftest import count_statements
from test_economy import assert_ledger_consistent, balances, make_user

pytestmark = pytest.mark.timeout(120)
ANON = {"apikey": "0000000000"}


def text_submit(client, headers=ANON, **body):
    body.setdefault("prompt", "Once upon a time")
    body.setdefault("models", ["tiny-llm"])
    return client.post("/api/v2/generate/text/async", json=body, headers=headers)


def text_pop(client, headers, name="scribe", **body):
    body = {"name": name, "models": ["tiny-llm"], "max_length": 512, "max_context_length": 2048,
            **body}
    return client.post("/api/v2/generate/text/pop", json=body, headers=headers)


def test_text_request_pop_submit_status(client, ctx):
    owner, h = make_user(ctx, "scribe-owner")
    r = text_submit(client, params={"max_length": 40, "max_context_length": 512,
                                    "temperature": 0.9, "top_k": 20, "stop_sequence": ["\n\n"],
                                    "seed": "9"})
    assert r.status_code == 202 and set(r.json()) == {"id", "kudos"}
    rid = r.json()["id"]
    before = balances(ctx)
    job = text_pop(client, h).json()
    p = job["payload"]
    assert (p["prompt"], p["max_length"], p["max_context_length"], p["temperature"], p["top_k"],
            p["stop_sequence"], p["n"]) == ("Once upon a time", 40, 512, 0.9, 20, ["\n\n"], 1)
    assert job["model"] == "tiny-llm" and job["ttl"] == 150 and job["ids"] == [job["id"]]
    sub = client.post("/api/v2/generate/text/submit", headers=h,
                      json={"id": job["id"], "generation": "there was a lighthouse", "state": "ok"})
    assert sub.status_code == 200 and sub.json()["reward"] > 0
    st = client.get(f"/api/v2/generate/text/status/{rid}").json()
    assert st["done"] and st["finished"] == 1
    (gen,) = st["generations"]
    assert gen == {"text": "there was a lighthouse", "seed": 9, "model": "tiny-llm", "state": "ok",
                   "worker_id": gen["worker_id"], "worker_name": "scribe", "gen_metadata": []}
    assert balances(ctx)[owner.id] - before[owner.id] == pytest.approx(sub.json()["reward"], abs=0.01)
    again = client.post("/api/v2/generate/text/submit", headers=h,
                        json={"id": job["id"], "generation": "again", "state": "ok"})
    assert again.json()["rc"] == "DuplicateGen"
    workers = {w["name"]: w for w in client.get("/api/v2/workers?type=text").json()}
    assert workers["scribe"]["type"] == "text" and workers["scribe"]["requests_fulfilled"] == 1
    assert_ledger_consistent(ctx)


def test_text_limits_and_bad_fields(client, ctx):
    for params, field in (({"max_length": 10}, "params.max_length"),
                          ({"max_context_length": 4096}, "params.max_context_length"),
                          ({"max_length": 600}, "params.max_length"),
                          ({"top_p": 0}, "params.top_p"), ({"rep_pen": 4}, "params.rep_pen"),
                          ({"temperature": -1}, "params.temperature"),
                          ({"stop_sequence": [""]}, "params.stop_sequence"),
                          ({"n": 21}, "params.n")):
        r = text_submit(client, params=params)
        assert r.status_code == 400 and field in r.json()["message"], (params, r.text)
    r = text_submit(client, models=["tiny-sd15"])
    assert r.status_code == 400 and "image model" in r.json()["message"]
    r = client.post("/api/v2/generate/async", json={"prompt": "x", "models": ["tiny-llm"]}, headers=ANON)
    assert r.status_code == 400 and "text model" in r.json()["message"]
    r = text_submit(client, webhook="http://example.org/hook")
    assert r.status_code == 400 and "webhook" in r.json()["message"]
    dry = text_submit(client, dry_run=True, params={"max_length": 100, "n": 2})
    assert dry.status_code == 200 and set(dry.json()) == {"kudos"}


def test_unimplemented_parameters_are_named_in_warnings(client, ctx):
    r = text_submit(client, params={"tfs": 0.9, "sampler_order": [6, 0, 1], "mirostat": 2},
                    softprompt="x")
    assert r.status_code == 202
    messages = " ".join(w["message"] for w in r.json()["warnings"])
    for name in ("params.tfs", "params.sampler_order", "params.mirostat", "softprompt"):
        assert name in messages


def test_text_worker_limits_and_kinds(client, ctx):
    _, h = make_user(ctx, "small")
    text_submit(client, params={"max_length": 200, "max_context_length": 1024})
    assert text_pop(client, h, max_length=100).json()["skipped"] == {"max_length": 1}
    assert text_pop(client, h, max_context_length=512).json()["skipped"] == {"max_context_length": 1}
    # An image worker never gets text work, and a text worker's name is its own.
    r = client.post("/api/v2/generate/pop", headers=h,
                    json={"name": "painter", "models": ["tiny-llm"], "max_pixels": 262144})
    assert r.json()["ids"] == [] and r.json()["messages"]
    r = client.post("/api/v2/generate/pop", headers=h,
                    json={"name": "scribe", "models": ["tiny-sd15"]})
    assert r.status_code == 400 and r.json()["rc"] == "WrongWorkerType"
    assert text_pop(client, h).json()["ids"]


def test_text_statement_counts(client, ctx):
    _, h = make_user(ctx, "counted")
    with count_statements(ctx.db) as sub:
        rid = text_submit(client).json()["id"]
    text_pop(client, h, name="counter", models=["tiny-sd15"])  # registers (no text work)
    with count_statements(ctx.db) as pop:
        job = text_pop(client, h, name="counter").json()
    with count_statements(ctx.db) as done:
        client.post("/api/v2/generate/text/submit", headers=h,
                    json={"id": job["id"], "generation": "text", "state": "ok"})
    with count_statements(ctx.db) as st:
        client.get(f"/api/v2/generate/text/status/{rid}")
    # pop: user, the worker's update, candidates, the claim (on SQLite, the claim's marking of
    # the queue entries is a statement of its own). Status of a finished request: the request
    # with its counts, its generations (no queue estimate to make).
    # submit: on PostgreSQL the requester's waiting-cap lock first (api/admission.py).
    pg = ctx.db.engine.dialect.name == "postgresql"
    claim = 1 if pg else 2
    assert (sub.count, pop.count, st.count) == (6 if pg else 5, 3 + claim, 2)
    assert done.count <= 11  # one more than an image the first time: the horde account lookup


def _worker_thread(client, headers, results: list, count: int = 1):
    """An HTTP text worker answering `count` jobs with a fixed text."""
    def run():
        done = 0
        deadline = time.time() + 30
        while done < count and time.time() < deadline:
            job = text_pop(client, headers, name="openai-helper").json()
            if not job["ids"]:
                time.sleep(0.05)
                continue
            for gid in job["ids"]:
                client.post("/api/v2/generate/text/submit", headers=headers,
                            json={"id": gid, "generation": f"answer {done}", "state": "ok"})
                done += 1
        results.append(done)
    t = threading.Thread(target=run)
    t.start()
    return t


def test_openai_completions_answered_by_an_http_worker(client, ctx):
    _, h = make_user(ctx, "helper")
    _, user_h = make_user(ctx, "caller", kudos=100)
    results: list = []
    worker = _worker_thread(client, h, results)
    r = client.post("/v1/completions", headers={"Authorization": f"Bearer {user_h['apikey']}"},
                    json={"model": "tiny-llm", "prompt": "Hello", "max_tokens": 20, "seed": 5})
    worker.join()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "answer 0"
    assert body["id"].startswith("cmpl-") and body["model"] == "tiny-llm"
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-llm"]


def test_openai_stream_without_the_cluster_sends_the_text_in_one_piece(client, ctx):
    _, h = make_user(ctx, "helper")
    results: list = []
    worker = _worker_thread(client, h, results)
    with client.stream("POST", "/v1/completions", headers=ANON, json={
            "model": "tiny-llm", "prompt": "Hello", "max_tokens": 20, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    worker.join()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "answer 0"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_openai_bad_input(client, ctx):
    for body, param in (({"model": "tiny-llm", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
                        ({"model": "tiny-llm", "prompt": "x", "max_tokens": 5000}, "max_tokens"),
                        ({"model": "nope", "prompt": "x"}, "models"),
                        ({"model": "tiny-llm"}, "prompt"),
                        ({"model": "tiny-llm", "prompt": "x", "stream": True, "n": 2}, "n")):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        assert param in r.json()["error"]["message"], r.json()
    r = client.post("/v1/chat/completions", json={"model": "tiny-llm", "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "tiny-llm", "prompt": "x"},
                    headers={"Authorization": "Bearer wrong-key-wrong-key"})
    assert r.status_code == 401
