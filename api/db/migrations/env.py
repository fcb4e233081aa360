"""Alembic environment: the URL comes from `api.db.migrate.upgrade` (config attribute), not
from an ini file, so the app, the CLI and the tests migrate exactly the same way."""

from alembic import context

from api.db.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through api.db.migrate.upgrade()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
