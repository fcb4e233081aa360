"""horde-sdk's own live-API tests, run against rayhorde: how many pass, which fail, and why.

horde-sdk 0.33.3 (the version tests/compat pins) ships its test suite in its source
distribution; its live tests are the modules ending in `api_calls.py` (its conftest runs
them only with --run-network-tests and a registered AI_HORDE_DEV_APIKEY). This fetches that
sdist with pip into .cache/, installs pytest, pytest-asyncio and pytest-timeout into the
horde-sdk venv (tests/conftest.py horde_sdk_python builds it), starts a horde, makes a
registered user with kudos as the dev key, has one tiny image made (stats to read, as any live
horde has), runs the live tests in strict mode (TESTS_ONGOING=1) and prints the passed, failed and skipped counts, the failures grouped by their message, and
the tests left out (EXCLUDED: they need real model weights or the internet).

    # what `make run` starts (`rayhorde run configs/local.yaml`: tiny models, its alchemy
    # and post-processing deployments), on a free port, under /tmp/port8000.lock:
    .venv/bin/python bench/horde_sdk_live.py
    # the API alone (uvicorn on a free port, SQLite, no workers: generation and alchemy
    # requests are accepted and wait):
    .venv/bin/python bench/horde_sdk_live.py --start uvicorn
    # a horde already running (API root URL and a registered user's 22-character key):
    .venv/bin/python bench/horde_sdk_live.py --url http://127.0.0.1:8000 --apikey KEY

`-k EXPR` narrows the tests (pytest's -k); `--json FILE` writes the per-test outcomes.
Exits 0 whatever the outcome: the figures are the result.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "serve")]

from conftest import HORDE_SDK_VERSION, horde_sdk_python  # noqa: E402

SOURCES = ROOT / ".cache" / "horde-sdk-src"
TEST_TOOLS = ["pytest>=8.3.3,<9", "pytest-asyncio>=0.25.3,<2", "pytest-timeout>=2.3,<3"]
# Every module of the suite whose name ends in api_calls.py. The worker round trip first: it
# is the AI Horde's API-side CI test and wants the queue empty (its fake worker must find no
# job before its own request), while others leave requests for 'Deliberate' waiting.
LIVE_MODULES = [
    "tests/ai_horde_api/test_ai_worker_roundtrip_api_calls.py",
    "tests/ai_horde_api/test_ai_horde_alchemy_api_calls.py",
    "tests/ai_horde_api/test_ai_horde_api_calls.py",
    "tests/ai_horde_api/test_ai_horde_generate_api_calls.py",
    "tests/ai_horde_api/test_ai_horde_generate_text_api_calls.py",
    "tests/ai_horde_api/test_ai_horde_stats_api_calls.py",
    "tests/ai_horde_api/test_ai_horde_status_api_calls.py",
    "tests/ai_horde_api/test_shared_keys_api_calls.py",
    "tests/ai_horde_worker/test_model_meta_api_calls.py",
]
_GEN = "tests/ai_horde_api/test_ai_horde_generate_api_calls.py::TestAIHordeGenerate::"
_TEXT = "tests/ai_horde_api/test_ai_horde_generate_text_api_calls.py::"
_WEIGHTS = ("needs real model weights: waits for images of the AI Horde's 'Deliberate' "
            "(or 'Stable Cascade 1.0'), which no worker here can run")
EXCLUDED = {
    **{_GEN + name: _WEIGHTS for name in (
        "test_simple_client_image_generate",
        "test_simple_client_image_generate_with_post_process",
        "test_simple_client_image_generate_with_post_process_costly_order",
        "test_simple_client_image_generate_with_post_process_fix_costly_order",
        "test_simple_client_image_generate_no_apikey_specified",
        "test_simple_client_async_image_generate",
        "test_simple_client_image_generate_multiple_n",
        "test_simple_client_image_generate_multiple_requests",
        "test_simple_client_async_image_generate_multiple",
        "test_multiple_concurrent_async_requests_cancel_single_task",
        "test_check_image_gen_callback",
        "test_remix")},
    _GEN + "test_simple_client_image_generate_loras":
        _WEIGHTS + "; and its LoRA (CivitAI 76693) is fetched from the internet",
    _TEXT + "TestAIHordeTextGenerate::test_text_generate":
        "needs real model weights: waits for text of 'koboldcpp/LLaMA2-13B-Psyfighter2'",
    _TEXT + "TestAIHordeTextGenerateAsync::test_text_generate_async":
        "needs real model weights: waits for text of 'koboldcpp/LLaMA2-13B-Psyfighter2'",
    "tests/ai_horde_worker/test_model_meta_api_calls.py":
        "needs the internet: ImageModelLoadResolver downloads the AI Horde's model reference "
        "from GitHub",
}


def ensure_sources(python: str) -> Path:
    """The unpacked sdist of the pinned horde-sdk (its tests), fetched once."""
    folder = SOURCES / f"horde_sdk-{HORDE_SDK_VERSION}"
    if not (folder / "tests" / "conftest.py").exists():
        SOURCES.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                        ":all:", f"horde-sdk=={HORDE_SDK_VERSION}", "-d", str(SOURCES)],
                       check=True)
        with tarfile.open(SOURCES / f"horde_sdk-{HORDE_SDK_VERSION}.tar.gz") as tar:
            tar.extractall(SOURCES, filter="data")
    return folder


def ensure_test_tools(python: str) -> None:
    probe = "import pytest, pytest_asyncio, pytest_timeout"
    if subprocess.run([python, "-c", probe], capture_output=True).returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "-q", *TEST_TOOLS], check=True)


def make_user(db, salt: str) -> str:
    """A registered user holding kudos; returns its key (22 characters, as horde-sdk wants)."""
    from api import ledger
    from api.auth import hash_api_key, new_api_key
    from api.db.models import User

    key = new_api_key()
    with db.write() as s:
        user = User(username="horde-sdk-tests", api_key_hash=hash_api_key(key, salt), kudos=0.0)
        s.add(user)
        s.flush()
        ledger.award(s, user.id, 100_000.0)
    return key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A 1x1 WebP: what the stand-in worker of the API-alone run uploads.
WEBP = base64.b64decode("UklGRiIAAABXRUJQVlA4IBYAAAAwAQCdASoBAAEADsD+JaQAA3AAAAAA")


def seed_history(url: str, key: str, worker: bool) -> None:
    """One tiny-sd15 image finished before the suite runs, so the stats have something of a
    known model, as any live horde's do (test_get_image_stats_models compares the models of
    all and of custom ones). `worker`: no worker runs here, so pop, upload and submit it as
    one; else wait for the cluster to make it."""
    import httpx

    with httpx.Client(base_url=f"{url}/api/v2", headers={"apikey": key}, timeout=60) as http:
        r = http.post("/generate/async", json={"prompt": "a lighthouse", "models": ["tiny-sd15"],
                                               "params": {"width": 64, "height": 64,
                                                          "steps": 4, "n": 1}})
        r.raise_for_status()
        rid = r.json()["id"]
        if worker:
            job = http.post("/generate/pop", json={"name": "bench-seeder",
                                                   "models": ["tiny-sd15"]}).json()
            upload = httpx.put(job["r2_upload"], content=WEBP, timeout=60)
            upload.raise_for_status()
            http.post("/generate/submit", json={"id": job["id"], "generation": "R2",
                                                "state": "ok", "seed": 1}).raise_for_status()
        deadline = time.time() + 600
        while not http.get(f"/generate/check/{rid}").json()["done"]:
            if time.time() > deadline:
                raise SystemExit("the seed image was not made in 10 minutes")
            time.sleep(1)


@contextlib.contextmanager
def uvicorn_horde(workdir: Path, salt: str):
    """The API alone: create_app on the tiny models, SQLite in `workdir`, a free port."""
    import httpx

    from api.db.migrate import upgrade
    from api.db.session import Database
    from serve_harness import settings_for

    port = free_port()
    settings = {**settings_for(workdir), "key_salt": salt,
                "public_url": f"http://127.0.0.1:{port}"}
    db = Database(settings["database_url"])
    upgrade(db)
    code = ("import json, sys, uvicorn\n"
            "from api.app import context_from_settings, create_app\n"
            "from api.settings import Settings\n"
            "app = create_app(context_from_settings(Settings(**json.loads(sys.argv[1]))))\n"
            "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')\n")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(settings), str(port)],
                            cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/api/v2/status/heartbeat").status_code == 200:
                    break
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("the API did not start")
            time.sleep(0.2)
        key = make_user(db, salt)
        seed_history(url, key, worker=True)
        yield url, key
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        db.dispose()


@contextlib.contextmanager
def cluster_horde(workdir: Path, salt: str):
    """What `make run` starts (`rayhorde run configs/local.yaml`: the embedded cluster, tiny
    models), its settings pointed at `workdir`, on a free port, holding the shared lock that
    every start of Ray Serve here takes. Stopped as Ctrl-C stops it."""
    import httpx

    from api.db.session import Database

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {"database_url": f"sqlite:///{workdir}/rayhorde.db", "key_salt": salt,
                "storage_dir": str(workdir / "objects"), "public_url": url}
    command = [sys.executable, "-m", "cluster.cli", "run", "configs/local.yaml",
               "--http-port", str(port), "--metrics-port", "0"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    with open("/tmp/port8000.lock", "w") as lock:
        print("waiting for /tmp/port8000.lock ...", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen(command, cwd=ROOT)
        try:
            deadline = time.time() + 1200
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/api/v2/status/heartbeat").status_code == 200:
                        break
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit("the cluster did not start")
                time.sleep(1)
            db = Database(settings["database_url"])
            key = make_user(db, salt)
            db.dispose()
            seed_history(url, key, worker=False)
            yield url, key
        finally:
            proc.send_signal(signal.SIGINT)  # its clean shutdown, HAProxy and Ray included
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_suite(python: str, sources: Path, url: str, key: str, keyword: str | None,
              timeout: int) -> Path:
    report = Path(tempfile.mkdtemp(prefix="horde-sdk-live-")) / "junit.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AI_HORDE_", "RAYHORDE_"))}
    env.update(AI_HORDE_URL=url.rstrip("/") + "/api/", AI_HORDE_DEV_APIKEY=key,
               TESTS_ONGOING="1", HORDE_SDK_TESTING="1", LOGFIRE_IGNORE_NO_CONFIG="1")
    pytest = [python, "-m", "pytest", "--run-network-tests", "-p", "no:cacheprovider"]
    # The tests by their exact ids, less the excluded ones (pytest's --deselect would also
    # drop every test whose id merely starts with an excluded one's).
    listed = subprocess.run([*pytest, "--collect-only", "-q", *LIVE_MODULES,
                             *(["-k", keyword] if keyword else [])],
                            cwd=sources, env=env, capture_output=True, text=True)
    tests = [line for line in listed.stdout.splitlines() if "::" in line
             and line not in EXCLUDED and line.split("::")[0] not in EXCLUDED]
    if not tests:
        raise SystemExit(f"no test collected:\n{listed.stdout}{listed.stderr}")
    subprocess.run([*pytest, "-q", "-rN", f"--timeout={timeout}", f"--junitxml={report}",
                    *tests], cwd=sources, env=env)
    return report


_VOLATILE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\b\d+(\.\d+)?\b")


def outcomes(report: Path) -> list[dict]:
    out = []
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        result, why = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                result = "skipped" if tag == "skipped" else "failed"
                why = (node.get("message") or node.text or tag).strip().splitlines()[0][:300]
        out.append({"test": name, "outcome": result, "why": why})
    return out


def print_summary(results: list[dict], target: str) -> None:
    counts = collections.Counter(r["outcome"] for r in results)
    print(f"\nhorde-sdk {HORDE_SDK_VERSION} live-API tests against {target}: "
          f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
          f"(of {len(results)} run; {len(EXCLUDED)} left out)")
    for outcome in ("failed", "skipped"):
        groups: dict[str, list[str]] = collections.defaultdict(list)
        for r in results:
            if r["outcome"] == outcome:
                groups[_VOLATILE.sub("N", r["why"])].append(r["test"].rsplit("::", 1)[-1])
        for why, tests in sorted(groups.items(), key=lambda g: -len(g[1])):
            print(f"\n{outcome} ({len(tests)}): {why}")
            for test in tests:
                print(f"    {test}")
    print("\nleft out:")
    for nodeid, why in EXCLUDED.items():
        print(f"    {nodeid.rsplit('::', 1)[-1].rsplit('/', 1)[-1]}: {why}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", choices=("cluster", "uvicorn"), default="cluster")
    ap.add_argument("--url", help="a running horde's root URL (then --apikey too); starts none")
    ap.add_argument("--apikey", help="a registered user's key on the --url horde")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression")
    ap.add_argument("--timeout", type=int, default=300, help="seconds one test may take")
    ap.add_argument("--json", type=Path, help="write the per-test outcomes here")
    args = ap.parse_args()
    if bool(args.url) != bool(args.apikey):
        ap.error("--url and --apikey go together")
    python = horde_sdk_python()
    ensure_test_tools(python)
    sources = ensure_sources(python)
    started = time.monotonic()
    if args.url:
        report, target = run_suite(python, sources, args.url, args.apikey, args.keyword,
                                   args.timeout), args.url
    else:
        salt = f"horde-sdk-live-{os.getpid()}-{time.time()}"
        with tempfile.TemporaryDirectory(prefix="horde-sdk-live-") as workdir:
            horde = cluster_horde if args.start == "cluster" else uvicorn_horde
            with horde(Path(workdir), salt) as (url, key):
                report = run_suite(python, sources, url, key, args.keyword, args.timeout)
        target = ("`rayhorde run configs/local.yaml` (make run)" if args.start == "cluster"
                  else "the API alone (uvicorn, no workers)")
    results = outcomes(report)
    print_summary(results, target)
    print(f"\n{time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
