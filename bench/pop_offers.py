"""A pop's cost against what the worker offers: `api.workers.pop_image` / `pop_text` called in
this process, as the API's routes call them, with many models and blacklist words offered and a
deep queue waiting. Prints, per row, the p50 and p99 wall time of a pop, its CPU time and, on
PostgreSQL, its round trips; and how long a submit waits while such pops run back to back
(SQLite has one writer at a time: a pop's write transaction holds every submit).

    .venv/bin/python bench/pop_offers.py [--url sqlite|postgresql://...] [--waiting 100000]
                                         [--pops 200]

Rows (issue 21's table): an image pop offering 200 models and 200 blacklist words, claiming
one job of the `--waiting` queued ones, and finding nothing; a text pop offering 1,000 models,
claiming and empty; the same image pop with 1,000 models and 1,000 words (the caps). The
worker's owner is a customizer, so the names need not be in the model reference. The waiting
jobs are spread over ten of the offered models. It resets the tables of the database given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sqlalchemy import text  # noqa: E402

from api import workers  # noqa: E402
from api.auth import hash_api_key  # noqa: E402
from api.db.migrate import reset, upgrade  # noqa: E402
from api.db.models import User  # noqa: E402
from api.db.session import Database  # noqa: E402
from api.routes.deps import registered  # noqa: E402
from api.text_schemas import TextPopInput  # noqa: E402
from api.worker_schemas import ImagePopInput  # noqa: E402
from bench_common import UNLIMITED, fill  # noqa: E402
from conftest import make_ctx  # noqa: E402
from pop_inprocess import measure  # noqa: E402

KEY = "bench-worker-key-00000"
IMAGE_MODELS = [f"bench-image-model-{i:04d}" for i in range(1000)]
TEXT_MODELS = [f"bench/text-model-{i:04d}" for i in range(1000)]
WORDS = [f"blacklisted-word-{i:04d}" for i in range(1000)]


def submit_wait(ctx, pop, seconds: float = 3.0) -> float:
    """The p50 ms a one-row write waits while `pop` runs back to back in another thread."""
    stop = threading.Event()

    def popping():
        while not stop.is_set():
            pop()

    thread = threading.Thread(target=popping, daemon=True)
    thread.start()
    waits = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            with ctx.db.write() as s:
                s.execute(text("UPDATE users SET contact = 'x' WHERE id = 0"))
            waits.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join()
    return statistics.median(waits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="sqlite")
    ap.add_argument("--waiting", type=int, default=100_000)
    ap.add_argument("--pops", type=int, default=200)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rayhorde-bench-"))
    if args.url == "sqlite":
        db = Database(f"sqlite:///{tmp}/bench.db")
        upgrade(db)
    else:
        db = reset(args.url)
    ctx = make_ctx(db, tmp, **UNLIMITED)
    with db.write() as s:
        s.add(User(username="bench", customizer=True,
                   api_key_hash=hash_api_key(KEY, ctx.settings.key_salt)))
    for i in range(10):  # the queue, over ten of the offered models
        fill(db, args.waiting // 10, model=IMAGE_MODELS[i * 17])
    fill(db, 2_000, model=TEXT_MODELS[3])  # a few text jobs (stored as image-sized rows)
    if db.engine.dialect.name == "postgresql":
        with db.engine.begin() as conn:  # what autovacuum does on a live server
            conn.execute(text("ANALYZE"))
    owner = lambda session: registered(ctx, session, KEY, "a worker")  # noqa: E731

    def image_pop(models: list[str], words: list[str], name: str):
        body = ImagePopInput(name=name, models=models, blacklist=words, max_pixels=1024 * 1024)
        return lambda: workers.pop_image(ctx, owner, body)

    def text_pop(models: list[str], name: str):
        body = TextPopInput(name=name, models=models, max_length=512, max_context_length=4096)
        return lambda: workers.pop_text(ctx, owner, body)

    nothing = [f"bench-unwanted-{i:04d}" for i in range(200)]
    rows = [
        ("image: 200 models + 200 words, claims", image_pop(IMAGE_MODELS[:200], WORDS[:200], "i1")),
        ("image: 200 models + 200 words, empty", image_pop(nothing, WORDS[:200], "i2")),
        ("image: 1,000 models + 1,000 words, claims", image_pop(IMAGE_MODELS, WORDS, "i3")),
        ("text: 1,000 models, empty", text_pop(TEXT_MODELS, "t1")),
    ]
    print(f"database: {db.engine.dialect.name}; {args.waiting} waiting; pops in process")
    print(f"{'pop':<44}{'p50 ms':>9}{'p99 ms':>9}{'cpu ms':>9}{'trips':>7}{'write waits ms':>16}")
    for label, pop in rows:
        try:
            m = measure(pop, args.pops, warm=5)
            wait = submit_wait(ctx, pop)
        except Exception as exc:  # the old code's 500s (too many terms, parameters) show here
            print(f"{label:<44}  failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            continue
        print(f"{label:<44}{m['p50']:>9.2f}{m['p99']:>9.2f}{m['cpu']:>9.2f}{m['trips']:>7.1f}"
              f"{wait:>16.2f}")
    db.dispose()
    if args.url != "sqlite":
        reset(args.url).dispose()


if __name__ == "__main__":
    main()
