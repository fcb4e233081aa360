"""`POST /generate/pop` latency through the real ingress (Ray Serve + HAProxy, configs/local.yaml's
API deployment) on PostgreSQL, with 1 and 16 concurrent workers and 100,000 waiting
generations: pops that find work, and empty pops (a model nobody asked for, so the answer also
counts `skipped` over the head of the queue). Also the same with an empty queue.

    .venv/bin/python bench/pop_latency.py [--url postgresql://...] [--waiting 100000]

The API runs alone (`dispatch: false`): only these workers take work. Pops that find work
claim it; the depth falls by the number of pops (a few thousand of the 100,000). It resets the
tables of the database it is given.
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "serve")]

from sqlalchemy import text  # noqa: E402

from api.auth import hash_api_key  # noqa: E402
from api.db.models import User  # noqa: E402
from api.db.migrate import reset  # noqa: E402
from bench_common import UNLIMITED, Http, fill, http_client, pct  # noqa: E402
from serve_harness import running_cluster  # noqa: E402

API = "http://127.0.0.1:8000/api/v2"
KEY = "bench-worker-key-00000"


async def pops(model: str, workers: int, total: int) -> tuple[list[float], float, int]:
    """`total` pops spread over `workers` concurrent workers: (latencies ms, pops/s, jobs)."""
    latencies: list[float] = []
    jobs = 0

    async def worker(http: Http, index: int):
        nonlocal jobs
        body = {"name": f"bench-{index}", "models": [model], "max_pixels": 1024 * 1024}
        for _ in range(total // workers):
            t0 = time.perf_counter()
            r = await http.post(f"{API}/generate/pop", json=body)
            latencies.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.text}")
            jobs += len(r.json()["ids"])

    async with http_client(workers, {"apikey": KEY}) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http, i) for i in range(workers)))
        elapsed = time.perf_counter() - t0
    return latencies, len(latencies) / elapsed, jobs


BENCH_SALT = "pop-latency-bench-salt"  # the bench's own users, on its scratch database


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--waiting", type=int, default=100_000)
    ap.add_argument("--pops", type=int, default=800, help="pops per measurement")
    ap.add_argument("--api-replicas", type=int, default=None,
                    help="API replicas (default: configs/local.yaml's one)")
    args = ap.parse_args()
    db = reset(args.url)
    with db.write() as s:
        s.add(User(username="bench", api_key_hash=hash_api_key(KEY, BENCH_SALT)))
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="rayhorde-bench-"))
    with running_cluster(workdir, database_url=args.url, dispatch=False,
                         api_replicas=args.api_replicas,
                         settings={**UNLIMITED, "key_salt": BENCH_SALT}):
        for clients in (1, 16):  # register the workers (first pops create them)
            asyncio.run(pops("tiny-sdxl", clients, clients))
        for clients in (1, 16):
            lat, rate, _ = asyncio.run(pops("tiny-sd15", clients, args.pops))
            rows.append(("empty queue", clients, lat, rate))
        fill(db, args.waiting)
        with db.engine.begin() as conn:  # what autovacuum does on a live server
            conn.execute(text("ANALYZE"))
        for clients in (1, 16):
            lat, rate, _ = asyncio.run(pops("tiny-sdxl", clients, args.pops))
            rows.append((f"{args.waiting} waiting, none fit", clients, lat, rate))
            lat, rate, jobs = asyncio.run(pops("tiny-sd15", clients, args.pops))
            assert jobs == len(lat), "every pop should have found work"
            rows.append((f"{args.waiting} waiting, with work", clients, lat, rate))
    print(f"database: postgresql; {args.pops} pops per row; API through Serve + HAProxy, "
          f"{args.api_replicas or 1} API replica(s)")
    print(f"{'queue':<30}{'workers':>8}{'p50 ms':>10}{'p99 ms':>10}{'pops/s':>10}")
    for name, clients, lat, rate in rows:
        print(f"{name:<30}{clients:>8}{statistics.median(lat):>10.2f}{pct(lat, 0.99):>10.2f}"
              f"{rate:>10.1f}")
    reset(args.url)


if __name__ == "__main__":
    main()
