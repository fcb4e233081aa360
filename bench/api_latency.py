"""API latency of submit (`POST /generate/async`), check and status, through the real ingress
(Ray Serve + HAProxy, configs/local.yaml's API deployment) on PostgreSQL, with 1 and with 16
concurrent clients.

    .venv/bin/python bench/api_latency.py [--url postgresql://postgres@127.0.0.1:5432/test]

The API runs alone (no dispatcher, no models: `dispatch: false`) so that generating images does
not take the CPU the API is measured on; the queue simply grows. Status is measured on a
request with finished images. It resets the tables of the database it is given.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "serve")]

import httpx  # noqa: E402

from api.db import queue  # noqa: E402
from api.db.session import Database  # noqa: E402
from api.storage import LocalStorage  # noqa: E402
from api.db.migrate import reset  # noqa: E402
from bench_common import UNLIMITED, pct  # noqa: E402
from serve_harness import running_cluster  # noqa: E402

API = "http://127.0.0.1:8000/api/v2"
HEADERS = {"apikey": "0000000000", "Client-Agent": "rayhorde-bench:1:none"}
BODY = {"prompt": "a lighthouse on a cliff ### fog", "models": ["tiny-sd15"],
        "params": {"width": 512, "height": 512, "steps": 30, "n": 1}}


async def run_calls(make_call, clients: int, total: int) -> tuple[list[float], float]:
    """`total` calls spread over `clients` concurrent connections: (latencies ms, calls/s)."""
    latencies: list[float] = []
    per_client = total // clients

    async def client_loop(http: httpx.AsyncClient):
        for _ in range(per_client):
            t0 = time.perf_counter()
            r = await make_call(http)
            latencies.append((time.perf_counter() - t0) * 1000)
            if r.status_code >= 400:
                raise RuntimeError(f"{r.status_code}: {r.text}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30, headers=HEADERS) as http:
        await asyncio.gather(*(make_call(http) for _ in range(clients)))  # warm connections
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return latencies, len(latencies) / elapsed


def finished_request(db: Database, storage_dir: Path, n: int = 4) -> str:
    """Submit one request of `n` images and finish them as a worker would."""
    rid = httpx.post(f"{API}/generate/async", json={**BODY, "params": {**BODY["params"], "n": n}},
                     headers=HEADERS).json()["id"]
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
    ap.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--calls", type=int, default=400, help="calls per measurement")
    args = ap.parse_args()
    reset(args.url)
    workdir = Path(tempfile.mkdtemp(prefix="rayhorde-bench-"))
    rows = []
    with running_cluster(workdir, database_url=args.url, dispatch=False,
                         settings=UNLIMITED) as cluster:
        db = cluster["db"]
        done_id = finished_request(db, workdir / "objects")
        waiting_id = httpx.post(f"{API}/generate/async", json=BODY, headers=HEADERS).json()["id"]
        calls = {
            "submit": lambda http: http.post(f"{API}/generate/async", json=BODY),
            "check": lambda http: http.get(f"{API}/generate/check/{waiting_id}"),
            "status": lambda http: http.get(f"{API}/generate/status/{done_id}"),
            "heartbeat": lambda http: http.get(f"{API}/status/heartbeat"),
        }
        for clients in (1, 16):
            for name, call in calls.items():
                lat, rate = asyncio.run(run_calls(call, clients, args.calls))
                rows.append((name, clients, statistics.median(lat), pct(lat, 0.99), rate))
    print(f"database: postgresql; {args.calls} calls per row; API through Serve + HAProxy")
    print(f"{'call':<12}{'clients':>8}{'p50 ms':>10}{'p99 ms':>10}{'calls/s':>10}")
    for name, clients, p50, p99, rate in rows:
        print(f"{name:<12}{clients:>8}{p50:>10.2f}{p99:>10.2f}{rate:>10.1f}")
    reset(args.url)


if __name__ == "__main__":
    main()
