"""API latency of submit (`POST /generate/async`), check and status, through the real ingress
(Ray Serve + HAProxy, configs/local.yaml's API deployment), with 1 and with 16 concurrent
clients.

    .venv/bin/python bench/api_latency.py [--url postgresql://postgres@127.0.0.1:5432/test]
    .venv/bin/python bench/api_latency.py --url sqlite --dispatch   # the embedded default

By default the API runs alone (no dispatcher, no models: `dispatch: false`) so that generating
images does not take the CPU the API is measured on; the queue simply grows. `--dispatch`
runs the whole embedded cluster (`make run`'s configuration: the dispatcher and the tiny
models generating what is submitted), as users run it. `--url sqlite` is a fresh SQLite file.
Submits come from BENCH_USERS registered users in turn, each under the default cap of
generations waiting per user (as many users submit on a real horde; one anonymous caller
would hit its cap, or with the cap lifted make each submit sum a queue of its own). Status is
measured on a request with finished images. It resets the tables of the database it is given.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "serve")]

import httpx  # noqa: E402

from api.auth import hash_api_key  # noqa: E402
from api.db import queue  # noqa: E402
from api.db.models import User  # noqa: E402
from api.db.session import Database  # noqa: E402
from api.storage import LocalStorage  # noqa: E402
from api.db.migrate import reset  # noqa: E402
from bench_common import UNLIMITED, Http, http_client, pct  # noqa: E402
from serve_harness import running_cluster  # noqa: E402

API = "http://127.0.0.1:8000/api/v2"
HEADERS = {"apikey": "0000000000", "Client-Agent": "rayhorde-bench:1:none"}
BODY = {"prompt": "a lighthouse on a cliff ### fog", "models": ["tiny-sd15"],
        "params": {"width": 512, "height": 512, "steps": 30, "n": 1}}


BENCH_SALT = "api-latency-bench-salt"  # the bench's own users, on its scratch database
BENCH_USERS = 100


def bench_keys(db: Database) -> list[str]:
    """BENCH_USERS registered users with plenty of kudos; their API keys."""
    keys = [f"api-latency-bench-key-{i:03d}" for i in range(BENCH_USERS)]
    with db.write() as s:
        s.add_all(User(username=f"bench{i}", api_key_hash=hash_api_key(k, BENCH_SALT),
                       kudos=10_000.0) for i, k in enumerate(keys))
    return keys


async def run_calls(make_call, clients: int, total: int) -> tuple[list[float], float]:
    """`total` calls spread over `clients` concurrent connections: (latencies ms, calls/s)."""
    latencies: list[float] = []
    per_client = total // clients

    async def client_loop(http: Http):
        for _ in range(per_client):
            t0 = time.perf_counter()
            r = await make_call(http)
            latencies.append((time.perf_counter() - t0) * 1000)
            if r.status_code >= 400:
                raise RuntimeError(f"{r.status_code}: {r.text}")

    async with http_client(clients, HEADERS, timeout=30) as http:
        await asyncio.gather(*(make_call(http) for _ in range(clients)))  # warm connections
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return latencies, len(latencies) / elapsed


def finished_request(db: Database, storage_dir: Path, n: int = 4,
                     dispatched: bool = False) -> str:
    """Submit one request of `n` images and finish them as a worker would (or, with the
    dispatcher running, wait for the cluster to)."""
    rid = httpx.post(f"{API}/generate/async", json={**BODY, "params": {**BODY["params"], "n": n}},
                     headers=HEADERS).json()["id"]
    if dispatched:
        deadline = time.time() + 300
        while not httpx.get(f"{API}/generate/check/{rid}", headers=HEADERS).json()["done"]:
            if time.time() > deadline:
                raise TimeoutError(f"request {rid} did not finish in 300 s")
            time.sleep(0.2)
        return rid
    store = LocalStorage(storage_dir, "http://127.0.0.1:8000")
    while True:
        jobs = queue.claim(db, queue.Capabilities("bench-worker", ["tiny-sd15"]), 50)
        if not jobs:
            break
        results = []
        for j in jobs:
            key = f"images/{j.request_id}/{j.generation_id}.webp"
            store.put(key, b"RIFF" + b"\0" * 20_000, "image/webp")
            results.append(queue.Result(j.generation_id, j.claim_id, key, j.seed,
                                        "bench-worker", "bench worker", owner_id=0))
        queue.finish(db, results)
    return rid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="a scratch PostgreSQL database, or `sqlite` for a fresh SQLite file")
    ap.add_argument("--dispatch", action="store_true",
                    help="run the dispatcher and the tiny models too (make run's cluster)")
    ap.add_argument("--calls", type=int, default=400, help="calls per measurement")
    ap.add_argument("--api-replicas", type=int, default=None,
                    help="API replicas (default: configs/local.yaml's one)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="rayhorde-bench-"))
    sqlite = args.url == "sqlite"
    url = f"sqlite:///{workdir}/rayhorde.db" if sqlite else args.url
    if not sqlite:
        reset(url)
    rows = []
    with running_cluster(workdir, database_url=url, dispatch=args.dispatch,
                         api_replicas=args.api_replicas,
                         settings={**UNLIMITED, "max_waiting_per_user": 30,
                                   "key_salt": BENCH_SALT}) as cluster:
        db = cluster["db"]
        keys = itertools.cycle(bench_keys(db))
        done_id = finished_request(db, workdir / "objects", dispatched=args.dispatch)
        waiting_id = httpx.post(f"{API}/generate/async", json=BODY, headers=HEADERS).json()["id"]
        calls = {
            "submit": lambda http: http.post(f"{API}/generate/async", json=BODY,
                                             headers={**HEADERS, "apikey": next(keys)}),
            "check": lambda http: http.get(f"{API}/generate/check/{waiting_id}"),
            "status": lambda http: http.get(f"{API}/generate/status/{done_id}"),
            "heartbeat": lambda http: http.get(f"{API}/status/heartbeat"),
        }
        for clients in (1, 16):
            for name, call in calls.items():
                lat, rate = asyncio.run(run_calls(call, clients, args.calls))
                rows.append((name, clients, statistics.median(lat), pct(lat, 0.99), rate))
    setup = "the dispatcher and tiny models running" if args.dispatch else "the API alone"
    replicas = args.api_replicas or 1
    print(f"database: {'sqlite' if sqlite else 'postgresql'}; {setup}; {args.calls} calls per "
          f"row; API through Serve + HAProxy, {replicas} API replica{'s' if replicas > 1 else ''}")
    print(f"{'call':<12}{'clients':>8}{'p50 ms':>10}{'p99 ms':>10}{'calls/s':>10}")
    for name, clients, p50, p99, rate in rows:
        print(f"{name:<12}{clients:>8}{p50:>10.2f}{p99:>10.2f}{rate:>10.1f}")
    if not sqlite:
        reset(url)


if __name__ == "__main__":
    main()
