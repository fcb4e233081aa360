"""Shared fixtures. Database tests run on both SQLite and PostgreSQL (the local server at
127.0.0.1:5432, db `test`, or RAYHORDE_TEST_POSTGRES_URL)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
from sqlalchemy import event, text

from api.app import create_app
from api.db.migrate import upgrade
from api.db.models import Base
from api.db.session import Database
from api.images import Context
from api.settings import Settings
from api.storage import LocalStorage
from models.catalog import load_catalog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSTGRES_URL = os.environ.get("RAYHORDE_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")
TINY_MODELS = ["tiny-sd15", "tiny-sdxl", "tiny-cascade"]


def _reset_postgres(url: str) -> Database:
    db = Database(url)
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
        Base.metadata.drop_all(conn)
    upgrade(db)
    return db


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path}/rayhorde.db")
        upgrade(database)
    else:
        database = _reset_postgres(POSTGRES_URL)
    yield database
    database.dispose()


@pytest.fixture
def sqlite_db(tmp_path):
    database = Database(f"sqlite:///{tmp_path}/rayhorde.db")
    upgrade(database)
    yield database
    database.dispose()


def make_settings(db: Database, tmp_path, **overrides) -> Settings:
    return Settings(database_url=db.url, storage_dir=str(tmp_path / "objects"),
                    catalog_path=os.path.join(ROOT, "configs", "models.yaml"),
                    served_models=TINY_MODELS, **overrides)


@pytest.fixture
def ctx(db, tmp_path) -> Context:
    settings = make_settings(db, tmp_path)
    catalog = load_catalog(settings.catalog_path).select(TINY_MODELS)
    return Context(settings=settings, db=db,
                   storage=LocalStorage(settings.storage_dir, settings.public_url),
                   catalog=catalog)


@pytest.fixture
def client(ctx):
    from fastapi.testclient import TestClient

    with TestClient(create_app(ctx)) as c:
        yield c


class StatementCounter:
    def __init__(self):
        self.statements: list[str] = []

    def __call__(self, conn, cursor, statement, parameters, context, executemany):
        self.statements.append(statement)

    @property
    def count(self) -> int:
        # BEGIN/COMMIT are transaction control, counted apart by the AI Horde's figures too.
        return sum(1 for s in self.statements
                   if not s.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK")))


@contextmanager
def count_statements(db: Database):
    counter = StatementCounter()
    event.listen(db.engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        event.remove(db.engine, "before_cursor_execute", counter)
