"""Load: `--clients` concurrent HTTP clients for `--seconds`, mixing what users and workers do:
submit (`POST /generate/async`, tiny 64x64 2-step jobs on tiny-sd15; a third anonymous, the
rest four registered users), check, status, and workers (one client in 20, each its own user)
that pop, upload the image to their `r2_upload` URL and submit. Prints per call type the
calls, the 2xx, the intended 429s (rate limits, the waiting cap), the errors (anything else,
failed connections included: must be 0) and the p50 and p99 latency of the 2xx answers.

    # against a running API (users are made with `rayhorde users create` on its database, so
    # run it with the API's RAYHORDE_KEY_SALT if one is set):
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --db-url postgresql://...
    # starting the API alone itself (`dispatch: false`, as bench/api_latency.py does, on port
    # 8000; resets the tables of --db-url):
    RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
        .venv/bin/python bench/load.py --start serve --db-url postgresql://...
    # or one uvicorn process on a free port (no Ray; SQLite in a scratch folder by default):
    .venv/bin/python bench/load.py --start uvicorn --clients 20 --seconds 5

`--limits default` keeps the API's own rate limits and waiting cap; `--limits off`
(bench_common.UNLIMITED) measures the API alone. Exits 1 when any call erred.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "serve")]

import httpx  # noqa: E402

from bench_common import UNLIMITED, Http, Reply, pct  # noqa: E402

ANON = "0000000000"
AGENT = "rayhorde-load:1:none"
JOB = {"prompt": "a lighthouse on a cliff ### fog", "models": ["tiny-sd15"],
       "params": {"width": 64, "height": 64, "steps": 2, "n": 1}}
SERVED = ["tiny-sd15", "tiny-sd15-inpainting", "tiny-sdxl", "tiny-cascade", "tiny-llm"]
# Of the clients that are not workers: a share each submits, checks, or reads status.
MIX = {"submit": 0.4, "check": 0.35, "status": 0.25}


# The 429s the API means to give: a rate limit (with Retry-After) or the waiting cap.
INTENDED_429 = {"TooManyRequests", "TooManyPrompts"}


def _rc(r: Reply) -> str | None:
    try:
        return r.json().get("rc")
    except (ValueError, AttributeError):
        return None


class Stats:
    """Per call type: latencies of 2xx answers (ms), intended 429s, and errors (anything
    else, failed connections included) with a few samples."""

    def __init__(self):
        self.ok = collections.defaultdict(list)
        self.limited = collections.Counter()
        self.errors = collections.Counter()
        self.samples: list[str] = []

    def record(self, kind: str, t0: float, r: Reply | None, error: str = "") -> bool:
        if r is not None and 200 <= r.status_code < 300:
            self.ok[kind].append((time.perf_counter() - t0) * 1000)
            return True
        if r is not None and r.status_code == 429 and _rc(r) in INTENDED_429:
            self.limited[kind] += 1
            return False
        self.errors[kind] += 1
        if len(self.samples) < 10:
            self.samples.append(f"{kind}: " + (error or f"{r.status_code} {r.text[:300]}"))
        return False

    def merge(self, other: "Stats") -> None:
        for kind, latencies in other.ok.items():
            self.ok[kind] += latencies
        self.limited.update(other.limited)
        self.errors.update(other.errors)
        self.samples = (self.samples + other.samples)[:10]


async def timed(stats: Stats, kind: str, send) -> Reply | None:
    import aiohttp

    t0 = time.perf_counter()
    try:
        r = await send()
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        stats.record(kind, t0, None, f"{type(e).__name__}: {e}")
        return None
    return r if stats.record(kind, t0, r) else None


def tiny_webp() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 90, 160)).save(buf, format="WEBP")
    return buf.getvalue()


async def work_once(http: Http, api: str, stats: Stats, key: str, name: str,
                    image: bytes) -> int:
    """One pop; each job it got uploaded and submitted. Returns the jobs done."""
    headers = {"apikey": key}
    r = await timed(stats, "pop", lambda: http.post(
        f"{api}/generate/pop", headers=headers,
        json={"name": name, "models": ["tiny-sd15"], "max_pixels": 512 * 512,
              "bridge_agent": AGENT}))
    if r is None:
        return 0
    job = r.json()
    uploads = job.get("r2_uploads") or ([job["r2_upload"]] if job.get("r2_upload") else [])
    for i, gid in enumerate(job.get("ids") or []):
        generation = base64.b64encode(image).decode()
        if i < len(uploads):
            up = await timed(stats, "upload", lambda: http.put(
                uploads[i], content=image, headers={"content-type": "image/webp"}))
            if up is None:
                continue
            generation = "R2"
        await timed(stats, "submit_job", lambda: http.post(
            f"{api}/generate/submit", headers=headers,
            json={"id": gid, "generation": generation, "seed": 1, "state": "ok"}))
    return len(job.get("ids") or [])


def roles_of(clients: int, workers: int) -> list[str]:
    """Each client's role: "worker" for `workers` of them, the rest after MIX."""
    roles = []
    for kind, share in MIX.items():
        roles += [kind] * round((clients - workers) * share)
    return (roles + ["check"] * clients)[:clients - workers] + ["worker"] * workers


async def run_clients(base: str, clients: list[tuple[int, str]], seconds: float,
                      worker_keys: list[str], submitter_keys: list[str],
                      seed_ids: dict) -> tuple[Stats, float]:
    """`clients` ((index, role) pairs) on one event loop for `seconds`."""
    import aiohttp

    api = f"{base}/api/v2"
    stats = Stats()
    recent = collections.deque(seed_ids["waiting"], maxlen=2000)
    finished = seed_ids["finished"]
    image = tiny_webp()
    deadline = 0.0

    async def user(http: Http, kind: str, index: int):
        key = ANON if index % 3 == 0 else submitter_keys[index % len(submitter_keys)]
        headers = {"apikey": key}
        while time.perf_counter() < deadline:
            if kind == "submit":
                r = await timed(stats, "submit", lambda: http.post(
                    f"{api}/generate/async", headers=headers, json=JOB))
                if r is not None:
                    recent.append(r.json()["id"])
            elif kind == "check":
                rid = random.choice(recent)
                await timed(stats, "check", lambda: http.get(f"{api}/generate/check/{rid}",
                                                             headers=headers))
            else:
                rid = random.choice(finished) if index % 2 else random.choice(recent)
                await timed(stats, "status", lambda: http.get(f"{api}/generate/status/{rid}",
                                                              headers=headers))

    async def worker(http: Http, index: int):
        while time.perf_counter() < deadline:
            if not await work_once(http, api, stats, worker_keys[index], f"load-worker-{index}",
                                   image):
                await asyncio.sleep(0.05)  # an empty queue: a worker's pause between pops

    connector = aiohttp.TCPConnector(limit=len(clients) + 8)
    async with aiohttp.ClientSession(connector=connector, headers={"Client-Agent": AGENT},
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        http = Http(session)
        deadline = time.perf_counter() + seconds
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http, i) if kind == "worker" else user(http, kind, i)
                               for i, kind in clients))
        elapsed = time.perf_counter() - t0
    return stats, elapsed


def _client_process(args: tuple) -> tuple[Stats, float]:
    return asyncio.run(run_clients(*args))


def run_load(base: str, clients: int, seconds: float, worker_keys: list[str],
             submitter_keys: list[str], seed_ids: dict, procs: int) -> tuple[Stats, float]:
    """`clients` spread over `procs` processes (a spawned process each: the driver holds
    Ray's threads, which a fork would copy), workers numbered across all of them."""
    import multiprocessing

    indexed = list(enumerate(roles_of(clients, len(worker_keys))))
    workers = [(i - (clients - len(worker_keys)), kind) if kind == "worker" else (i, kind)
               for i, kind in indexed]
    shares = [workers[p::procs] for p in range(procs)]
    jobs = [(base, share, seconds, worker_keys, submitter_keys, seed_ids) for share in shares]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        results = pool.map(_client_process, jobs)
    stats = Stats()
    for part, _ in results:
        stats.merge(part)
    return stats, max(elapsed for _, elapsed in results)


def make_users(db_url: str, names: list[str], kudos: float) -> list[str]:
    """API keys of new users, made with `rayhorde users create` (as an operator would), in
    the repository (where the API finds its installation secret unless RAYHORDE_KEY_SALT is
    set, which then must be the API's too)."""
    env = {**os.environ, "RAYHORDE_DATABASE_URL": db_url}
    procs = [subprocess.Popen([sys.executable, "-m", "cluster.cli", "users", "create", name,
                               "--kudos", str(kudos)], env=env, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in names]
    keys = []
    for name, p in zip(names, procs):
        out, err = p.communicate(timeout=120)
        if p.returncode:
            raise SystemExit(f"rayhorde users create {name} failed: {err}")
        keys.append(re.search(r"API key: (\S+)", out).group(1))
    return keys


def seed_requests(base: str, worker_key: str, submitter_key: str) -> dict:
    """A few waiting requests to check, and one finished by a worker to read the status of."""
    api = f"{base}/api/v2"
    stats = Stats()
    with httpx.Client(timeout=30, headers={"Client-Agent": AGENT}) as http:
        def submit() -> str:
            r = http.post(f"{api}/generate/async", headers={"apikey": submitter_key}, json=JOB)
            if r.status_code != 202:
                raise SystemExit(f"seeding: submit answered {r.status_code}: {r.text}")
            return r.json()["id"]

        finished = submit()

    async def finish():
        import aiohttp

        async with aiohttp.ClientSession(headers={"Client-Agent": AGENT}) as session:
            while await work_once(Http(session), api, stats, worker_key, "load-seeder",
                                  tiny_webp()):
                pass

    asyncio.run(finish())
    if stats.errors or not stats.ok["submit_job"]:
        raise SystemExit(f"seeding: the worker could not finish a job: {stats.samples}")
    with httpx.Client(timeout=30, headers={"Client-Agent": AGENT}) as http:
        waiting = [submit() for _ in range(5)]
    return {"finished": [finished], "waiting": waiting}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def uvicorn_api(settings: dict, port: int):
    """The API (create_app on these settings) in one uvicorn process on `port`."""
    code = ("import json, sys, uvicorn\n"
            "from api.app import context_from_settings, create_app\n"
            "from api.settings import Settings\n"
            "app = create_app(context_from_settings(Settings(**json.loads(sys.argv[1]))))\n"
            "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')\n")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(settings), str(port)], cwd=ROOT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/v2/status/heartbeat").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("the API did not start")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def started_api(how: str, db_url: str, limits: dict, workdir: Path,
                api_replicas: int | None = None):
    """The API alone on `db_url` (its tables reset), with a key salt of its own that
    make_users is given too."""
    from api.db.migrate import reset, upgrade
    from api.db.session import Database

    salt = os.environ.setdefault("RAYHORDE_KEY_SALT", f"load-bench-{os.getpid()}-{time.time()}")
    limits = {**limits, "key_salt": salt}

    if db_url.startswith("sqlite"):
        db = Database(db_url)
        upgrade(db)
        db.dispose()
    else:
        reset(db_url).dispose()
    if how == "serve":
        from serve_harness import running_cluster

        with running_cluster(workdir, database_url=db_url, dispatch=False, settings=limits,
                             api_replicas=api_replicas) as c:
            yield c["url"]
        return
    from serve_harness import settings_for

    port = free_port()
    settings = {**settings_for(workdir, db_url), "public_url": f"http://127.0.0.1:{port}",
                **limits}
    with uvicorn_api(settings, port) as url:
        yield url


def print_table(stats: Stats, elapsed: float) -> None:
    kinds = ["submit", "check", "status", "pop", "upload", "submit_job"]
    print(f"{'call':<12}{'calls':>8}{'2xx':>8}{'429':>8}{'errors':>8}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'2xx/s':>9}")
    for kind in kinds:
        ok = stats.ok[kind]
        calls = len(ok) + stats.limited[kind] + stats.errors[kind]
        p50 = f"{statistics.median(ok):.1f}" if ok else "-"
        p99 = f"{pct(ok, 0.99):.1f}" if ok else "-"
        print(f"{kind:<12}{calls:>8}{len(ok):>8}{stats.limited[kind]:>8}{stats.errors[kind]:>8}"
              f"{p50:>10}{p99:>10}{len(ok) / elapsed:>9.1f}")
    print(f"errors other than 429: {sum(stats.errors.values())}")
    for sample in stats.samples:
        print("  " + sample)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="a running API")
    ap.add_argument("--start", choices=["serve", "uvicorn"],
                    help="start the API alone on --db-url (its tables are reset) instead")
    ap.add_argument("--db-url", help="the API's database: users are made there (default with "
                                     "--start uvicorn: SQLite in a scratch folder)")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--workers", type=int, help="of the clients, how many are workers, each its "
                                                "own user (default: one in 20)")
    ap.add_argument("--api-replicas", type=int, default=None,
                    help="with --start serve: API replicas (default: configs/local.yaml's one)")
    ap.add_argument("--procs", type=int, default=2,
                    help="client processes the clients are spread over (default 2)")
    ap.add_argument("--limits", choices=["default", "off"], default="default",
                    help="with --start: the API's own rate limits and waiting cap, or none")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="rayhorde-load-"))
    db_url = args.db_url
    if db_url is None:
        if args.start == "uvicorn":
            db_url = f"sqlite:///{workdir}/rayhorde.db"
        else:
            ap.error("--db-url is needed: the users this makes must be in the API's database")
    workers = args.workers if args.workers is not None else max(1, args.clients // 20)
    if not 0 < workers < args.clients:
        ap.error("--workers must leave clients for the other calls")
    limits = UNLIMITED if args.limits == "off" else {}

    @contextmanager
    def api():
        if args.start:
            with started_api(args.start, db_url, limits, workdir, args.api_replicas) as url:
                yield url
        else:
            yield args.url.rstrip("/")

    with api() as base:
        keys = make_users(db_url, [f"load-worker-{i}-{os.getpid()}" for i in range(workers)]
                          + [f"load-user-{i}-{os.getpid()}" for i in range(4)], kudos=1e6)
        worker_keys, submitter_keys = keys[:workers], keys[workers:]
        seed_ids = seed_requests(base, worker_keys[0], submitter_keys[0])
        stats, elapsed = run_load(base, args.clients, args.seconds, worker_keys,
                                  submitter_keys, seed_ids, args.procs)
    where = f"the API started with {args.start}" if args.start else args.url
    limits_used = ("the API's defaults" if args.limits == "default" else "off") if args.start \
        else "the API's own"
    print(f"{args.clients} clients ({workers} workers, {args.procs} client processes, aiohttp) "
          f"for {elapsed:.1f} s against {where}; "
          f"database {db_url.split(':', 1)[0]}; rate limits and waiting cap: {limits_used}")
    print_table(stats, elapsed)
    sys.exit(1 if stats.errors else 0)


if __name__ == "__main__":
    main()
