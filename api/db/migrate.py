"""Apply Alembic migrations on start. Several API replicas may start at once, so the upgrade
runs under a lock: a PostgreSQL advisory lock, or an exclusive SQLite write transaction."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from api.db.session import Database

MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_ID = 0x7261_7968  # "rayh"


def alembic_config(connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(db: Database, revision: str = "head") -> None:
    with db.engine.connect() as conn:
        # On SQLite every write transaction starts with BEGIN IMMEDIATE (session.py), which
        # already serialises concurrent upgrades.
        if not db.is_sqlite:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_ID})
            conn.commit()
        try:
            command.upgrade(alembic_config(conn), revision)
            conn.commit()
        finally:
            if not db.is_sqlite:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_ID})
                conn.commit()


def reset(url: str) -> Database:
    """Drop every table of the database at `url` and migrate it afresh: for tests and
    benchmarks on scratch databases, never a live one."""
    from sqlalchemy import MetaData

    db = Database(url)
    with db.engine.begin() as conn:
        # Every table there is, not only the ones this code knows: a checkout of another
        # revision may have left tables of its own.
        existing = MetaData()
        existing.reflect(conn)
        existing.drop_all(conn)
    upgrade(db)
    return db
