"""A submit's own cost, without the ingress: what `POST /generate/async` runs in its thread
(the body validated, `images.prepare`, then in one write transaction the paying user and
`images.submit`), called in this process on the database given, from BENCH_USERS registered
users in turn. Prints the wall time (p50), this process's CPU time and the round trips to the
database per submit. Through Serve, 16 clients keep the API replica's one core busy: its CPU
per submit is what bounds the submits a second, and this bench shows it apart from the
ingress and the machine's noise.

    .venv/bin/python bench/submit_inprocess.py [--url postgresql://...] [--submits 1000]

It resets the tables of the database it is given.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from sqlalchemy import func, select  # noqa: E402

from api import images  # noqa: E402
from api.auth import hash_api_key  # noqa: E402
from api.db.migrate import reset  # noqa: E402
from api.db.models import Request, User  # noqa: E402
from api.routes.deps import paying_user, requester_of  # noqa: E402
from api.schemas import ImageGenerateRequest  # noqa: E402
from bench_common import UNLIMITED  # noqa: E402
from conftest import make_ctx  # noqa: E402
from pop_inprocess import RoundTrips  # noqa: E402

BODY = {"prompt": "a lighthouse on a cliff ### fog", "models": ["tiny-sd15"],
        "params": {"width": 512, "height": 512, "steps": 30, "n": 1}}
BENCH_USERS = 1000  # each under the default cap of generations waiting per user


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--submits", type=int, default=1000)
    args = ap.parse_args()
    db = reset(args.url)
    ctx = make_ctx(db, Path(tempfile.mkdtemp(prefix="rayhorde-bench-")),
                   **{**UNLIMITED, "max_waiting_per_user": 30})
    keys = [f"submit-bench-key-{i:04d}" for i in range(BENCH_USERS)]
    with db.write() as s:
        s.add_all(User(username=f"bench{i}", api_key_hash=hash_api_key(k, ctx.settings.key_salt),
                       kudos=1e6) for i, k in enumerate(keys))
    key = itertools.cycle(keys)
    ids: list[str] = []

    def submit() -> None:
        body, apikey = ImageGenerateRequest.model_validate(BODY), next(key)
        # As the route does (api/routes/deps.py accept_request): the caller first, then the
        # sources, then the write.
        with ctx.db.read() as session:
            caller, _ = paying_user(ctx, session, apikey, body, write=False)
        prepared = images.prepare(ctx, caller, body)
        with ctx.db.write() as session:
            user, _ = paying_user(ctx, session, apikey, body, write=True)
            req, _ = images.submit(ctx, user, body, "bench:1:none",
                                   requester_of(user, "127.0.0.1"), session, prepared)
        ids.append(req.id)

    for _ in range(100):  # warm: statements built, prepared, cached
        submit()
    walls = []
    with RoundTrips() as trips:
        cpu0 = time.process_time()
        for _ in range(args.submits):
            t0 = time.perf_counter()
            submit()
            walls.append((time.perf_counter() - t0) * 1000)
        cpu = (time.process_time() - cpu0) / args.submits * 1000
    with db.read() as s:  # every submit was queued
        assert s.scalar(select(func.count()).select_from(Request)) == len(ids) == 100 + args.submits
    print(f"database: {db.engine.dialect.name}; images.submit in process, {args.submits} submits")
    print(f"{'p50 ms':>10}{'cpu ms':>10}{'round trips':>13}")
    print(f"{statistics.median(walls):>10.2f}{cpu:>10.2f}{trips.count / args.submits:>13.1f}")
    db.dispose()
    reset(args.url)


if __name__ == "__main__":
    main()
