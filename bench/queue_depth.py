"""Check and claim latency with 10 and with 100,000 waiting generations (the ratio should stay
near 1: both read through indexes, neither scans the queue).

    .venv/bin/python bench/queue_depth.py [--url postgresql://postgres@127.0.0.1:5432/test]

It resets the tables of the database it is given: use a scratch database.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from sqlalchemy import text  # noqa: E402

from api.db import queue  # noqa: E402
from api.db.session import Database  # noqa: E402
from api.images import Context, check  # noqa: E402
from api.settings import Settings  # noqa: E402
from api.storage import LocalStorage  # noqa: E402
from api.db.migrate import reset  # noqa: E402
from bench_common import fill, pct  # noqa: E402
from models.catalog import load_catalog  # noqa: E402

def last_request(db: Database) -> str:
    with db.read() as s:
        return s.execute(text("SELECT id FROM requests ORDER BY created_at DESC LIMIT 1")).scalar()


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def measure(db: Database, ctx: Context, waiting: int, repeat: int) -> dict:
    reset(db.url)
    fill(db, waiting)
    with db.engine.begin() as conn:  # what autovacuum does on a live server
        conn.execute(text("ANALYZE"))
    rid = last_request(db)  # the back of the queue: the worst case for its position
    caps = queue.Capabilities("bench", ["tiny-sd15"])

    def do_check():
        with db.read() as s:
            check(ctx, s, rid)

    def do_claim():
        queue.claim(db, caps, 1)
        queue.expire(db, max_attempts=10**9, worker_id="bench")  # keep the depth constant

    do_check(), do_claim()
    return {"check": timed(do_check, repeat), "claim+release": timed(do_claim, repeat)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--repeat", type=int, default=300)
    ap.add_argument("--deep", type=int, default=100_000)
    args = ap.parse_args()
    db = Database(args.url)
    root = Path(__file__).resolve().parent.parent
    settings = Settings(database_url=args.url, catalog_path=str(root / "configs/models.yaml"))
    ctx = Context(settings, db, LocalStorage("/tmp/rayhorde-bench-objects", settings.public_url),
                  load_catalog(settings.catalog_path))
    results = {depth: measure(db, ctx, depth, args.repeat) for depth in (10, args.deep)}
    print(f"database: {db.engine.dialect.name}; {args.repeat} calls each")
    print(f"{'call':<16}{'waiting':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for depth, calls in results.items():
        for name, xs in calls.items():
            print(f"{name:<16}{depth:>10}{statistics.median(xs):>10.2f}{pct(xs, 0.99):>10.2f}")
    for name in ("check", "claim+release"):
        ratio = statistics.median(results[args.deep][name]) / statistics.median(results[10][name])
        print(f"ratio {name} p50 at {args.deep} / at 10 waiting: {ratio:.2f}")
    reset(db.url)


if __name__ == "__main__":
    main()
