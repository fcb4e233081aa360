"""Database statements per API call (BEGIN/COMMIT not counted), with a small and a deep queue,
counted by a SQLAlchemy `before_cursor_execute` listener. tests/horde_api pins the same counts.

    .venv/bin/python bench/statements.py [--url postgresql://postgres@127.0.0.1:5432/test]

It resets the tables of the database it is given.
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fastapi.testclient import TestClient  # noqa: E402

from api import ledger  # noqa: E402
from api.app import context_from_settings, create_app  # noqa: E402
from api.auth import hash_api_key  # noqa: E402
from api.db.models import User  # noqa: E402
from api.settings import Settings  # noqa: E402
from api.db.migrate import reset  # noqa: E402
from bench_common import UNLIMITED  # noqa: E402
from conftest import TINY_MODELS, count_statements  # noqa: E402

HEADERS = {"apikey": "0000000000"}
WORKER = {"apikey": "bench-worker-key-00000"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    db = reset(args.url)
    settings = Settings(database_url=args.url, storage_dir=tempfile.mkdtemp(),
                        catalog_path=str(ROOT / "configs" / "models.yaml"),
                        served_models=TINY_MODELS, **UNLIMITED)
    ctx = context_from_settings(settings)
    ctx.db = db
    with db.write() as session:
        session.add(User(username="bench", api_key_hash=hash_api_key(WORKER["apikey"],
                                                                     settings.key_salt)))
        ledger.horde_account_id(session)  # looked up once per process, as in a live replica
    rows = []
    with TestClient(create_app(ctx)) as client:
        client.post("/api/v2/generate/pop", headers=WORKER, json={  # registers the worker
            "name": "bench-worker", "models": ["tiny-sdxl"]})
        for n, backlog in ((1, 0), (20, 2000)):
            for _ in range(backlog // 20):
                client.post("/api/v2/generate/async", headers=HEADERS,
                            json={"prompt": "p", "models": ["tiny-sd15"], "params": {"n": 20}})
            calls = {
                "submit": lambda: client.post("/api/v2/generate/async", headers=HEADERS,
                                              json={"prompt": "p", "models": ["tiny-sd15"],
                                                    "params": {"n": n}}),
            }
            with count_statements(db) as c:
                rid = calls["submit"]().json()["id"]
            rows.append(("submit", n, backlog, c.count))
            for name, path in (("check", f"/api/v2/generate/check/{rid}"),
                               ("status", f"/api/v2/generate/status/{rid}")):
                with count_statements(db) as c:
                    assert client.get(path).status_code == 200
                rows.append((name, n, backlog, c.count))
            # A worker: an empty pop (a model nobody asked for), a pop with work, its submit.
            pop = {"name": "bench-worker", "max_pixels": 1024 * 1024}
            with count_statements(db) as c:
                assert client.post("/api/v2/generate/pop", headers=WORKER,
                                   json={**pop, "models": ["tiny-sdxl"]}).json()["ids"] == []
            rows.append(("pop, empty", n, backlog, c.count))
            with count_statements(db) as c:
                job = client.post("/api/v2/generate/pop", headers=WORKER,
                                  json={**pop, "models": ["tiny-sd15"]}).json()
            rows.append(("pop, work", n, backlog, c.count))
            with count_statements(db) as c:
                assert client.post("/api/v2/generate/submit", headers=WORKER, json={
                    "id": job["ids"][0], "generation": base64.b64encode(b"RIFFWEBP").decode(),
                    "seed": 1}).status_code == 200
            rows.append(("submit job", n, backlog, c.count))
    print(f"database: {db.engine.dialect.name}")
    print(f"{'call':<14}{'n':>4}{'waiting before':>16}{'statements':>12}")
    for name, n, backlog, count in rows:
        print(f"{name:<14}{n:>4}{backlog:>16}{count:>12}")
    reset(args.url)


if __name__ == "__main__":
    main()
