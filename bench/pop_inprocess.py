"""A pop's own cost, without the ingress: `api.workers.pop_image` called in this process, as
the API's route calls it (the key authenticated inside the pop's transaction), on the database
given. Prints, per pop: the wall time (p50), this process's CPU time, and the round trips to
the database (psycopg's waits for the server: statements, BEGIN and COMMIT). On a shared
machine whose speed changes from hour to hour, the CPU time and round trips say more about a
change than the wall time through Serve and HAProxy does.

    .venv/bin/python bench/pop_inprocess.py [--url postgresql://...] [--pops 500] [--waiting 20000]

Two rows: an empty pop (a model nobody asked for, so it also counts `skipped` over the head
of the queue), and a pop that claims one job of `--waiting` queued ones. It resets the tables
of the database it is given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import psycopg  # noqa: E402
from sqlalchemy import text  # noqa: E402

from api import workers  # noqa: E402
from api.auth import hash_api_key  # noqa: E402
from api.db.migrate import reset  # noqa: E402
from api.db.models import User  # noqa: E402
from api.routes.deps import registered  # noqa: E402
from api.worker_schemas import ImagePopInput  # noqa: E402
from bench_common import UNLIMITED, fill  # noqa: E402
from conftest import make_ctx  # noqa: E402

KEY = "bench-worker-key-00000"


class RoundTrips:
    """Counts psycopg's waits for the server while active."""

    def __init__(self):
        self.count = 0
        self._wait = psycopg.Connection.wait

    def __enter__(self):
        original = self._wait

        def counted(conn, gen, *args, **kwargs):
            self.count += 1
            return original(conn, gen, *args, **kwargs)

        psycopg.Connection.wait = counted
        return self

    def __exit__(self, *exc):
        psycopg.Connection.wait = self._wait


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(pop, pops: int, warm: int = 50) -> dict:
    """{p50, p99: wall ms; cpu: CPU ms per pop; trips: round trips per pop} over `pops` pops,
    after `warm` pops (statements built, prepared, cached)."""
    for _ in range(min(warm, pops)):
        pop()
    walls = []
    with RoundTrips() as trips:
        cpu0 = time.process_time()
        for _ in range(pops):
            t0 = time.perf_counter()
            pop()
            walls.append((time.perf_counter() - t0) * 1000)
        cpu = (time.process_time() - cpu0) / pops * 1000
    return {"p50": statistics.median(walls), "p99": percentile(walls, 0.99), "cpu": cpu,
            "trips": trips.count / pops}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--pops", type=int, default=500)
    ap.add_argument("--waiting", type=int, default=20_000)
    args = ap.parse_args()
    db = reset(args.url)
    ctx = make_ctx(db, Path(tempfile.mkdtemp(prefix="rayhorde-bench-")), **UNLIMITED)
    with db.write() as s:
        s.add(User(username="bench", api_key_hash=hash_api_key(KEY, ctx.settings.key_salt)))
    fill(db, args.waiting)
    if db.engine.dialect.name == "postgresql":
        with db.engine.begin() as conn:  # what autovacuum does on a live server
            conn.execute(text("ANALYZE"))

    def popper(model: str):
        body = ImagePopInput(name=f"bench-{model}", models=[model], max_pixels=1024 * 1024)
        owner = lambda session: registered(ctx, session, KEY, "a worker")  # noqa: E731
        return lambda: workers.pop_image(ctx, owner, body)

    rows = [("empty (nothing fits)", measure(popper("tiny-sdxl"), args.pops)),
            ("claims one job", measure(popper("tiny-sd15"), min(args.pops, args.waiting // 2)))]
    print(f"database: {db.engine.dialect.name}; {args.waiting} waiting; pop_image in process")
    print(f"{'pop':<22}{'p50 ms':>10}{'cpu ms':>10}{'round trips':>13}")
    for name, m in rows:
        print(f"{name:<22}{m['p50']:>10.2f}{m['cpu']:>10.2f}{m['trips']:>13.1f}")
    db.dispose()
    reset(args.url)


if __name__ == "__main__":
    main()
