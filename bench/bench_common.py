"""Helpers the benchmarks share."""

from __future__ import annotations

from sqlalchemy import text

from api.db.migrate import upgrade
from api.db.models import Base
from api.db.session import Database


def pct(xs: list[float], p: float) -> float:
    """The p-quantile (0..1) of `xs`, nearest rank."""
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))]


def reset_database(url: str) -> Database:
    """Empty the database at `url` and migrate it to the latest schema."""
    db = Database(url)
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
        Base.metadata.drop_all(conn)
    upgrade(db)
    return db
