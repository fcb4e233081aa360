"""Every schema change has its migration: the migrated database matches the ORM models, and
the migrations run down to nothing and back up again."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from api.db.migrate import alembic_config, upgrade
from api.db.models import Base

pytestmark = pytest.mark.timeout(120)


def test_migrated_schema_matches_the_models(db):
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_migrations_go_down_and_up_again(db):
    with db.engine.connect() as conn:
        command.downgrade(alembic_config(conn), "base")
        conn.commit()
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    upgrade(db)
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert {"users", "generations", "queue_entries", "kudos_ledger", "workers"} <= set(
            inspect(conn).get_table_names())
