"""The long fuzzing run: every route of the OpenAPI schema with many more schemathesis cases
than the test (tests/horde_api/test_fuzz_openapi.py, whose fixtures and known bugs this reuses),
in process against the ASGI app. Prints per route the calls, the statuses they got and the
failures (5xx, answers that break their own schema), then every distinct failure in full.

    .venv/bin/python bench/fuzz_openapi.py [--max-examples 300] [--seed N]
        [--db-url postgresql://...]   (default: SQLite in a scratch folder)
        [--route 'POST /api/v2/generate/async' ...]

A PostgreSQL database given has its tables reset. Exits 1 when anything failed.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "horde_api")]

import pytest  # noqa: E402

from conftest import make_ctx  # noqa: E402
from test_fuzz_openapi import (  # noqa: E402
    FUZZ_SETTINGS,
    Outcome,
    fuzz_operation,
    fuzzing,
    operations,
    report,
    revisit,
)

from api.db.migrate import reset, upgrade  # noqa: E402
from api.db.session import Database  # noqa: E402


def show(label: str, out: Outcome, seconds: float) -> None:
    statuses = " ".join(f"{s}:{n}" for (route, s), n in sorted(out.statuses.items())
                        if route == label)
    failed = sum(1 for route, _, _ in out.failures if route == label)
    print(f"{label:<52}{out.calls[label]:>7}{failed:>6}{seconds:>7.1f}  {statuses}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-examples", type=int, default=300, help="cases per route")
    ap.add_argument("--seed", type=int, help="default: a random one (printed)")
    ap.add_argument("--db-url", help="PostgreSQL to fuzz on (its tables are reset)")
    ap.add_argument("--route", action="append", help="only these ('METHOD /path'); repeatable")
    args = ap.parse_args()
    seed_value = args.seed if args.seed is not None else random.randrange(2**32)
    workdir = Path(tempfile.mkdtemp(prefix="rayhorde-fuzz-"))
    if args.db_url:
        db = reset(args.db_url)
    else:
        db = Database(f"sqlite:///{workdir}/rayhorde.db")
        upgrade(db)
    ctx = make_ctx(db, workdir, **FUZZ_SETTINGS)
    monkeypatch = pytest.MonkeyPatch()
    total = Outcome()
    print(f"seed {seed_value}; {args.max_examples} cases per route; "
          f"database {db.url.split(':', 1)[0]}", flush=True)
    print(f"{'route':<52}{'calls':>7}{'fail':>6}{'secs':>7}  statuses", flush=True)
    try:
        with fuzzing(ctx, monkeypatch) as target:
            for operation in operations(target.schema):
                if args.route and operation.label not in args.route:
                    continue
                t0 = time.perf_counter()
                out = fuzz_operation(target, operation, args.max_examples, seed_value)
                total.merge(out)
                show(operation.label, out, time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = revisit(target)
            total.merge(out)
            for label in out.calls:
                show(label, out, time.perf_counter() - t0)
    finally:
        monkeypatch.undo()
        db.dispose()
    print(f"\n{sum(total.calls.values())} calls, {len(total.failures)} distinct failures")
    for (route, bug), n in sorted(total.known.items()):
        print(f"known bug, {n} calls: {route}: {bug}")
    if total.failures:
        print("\n" + report(total))
    sys.exit(1 if total.failures else 0)


if __name__ == "__main__":
    main()
