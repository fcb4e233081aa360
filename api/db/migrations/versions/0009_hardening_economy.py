"""hardening the worker economy: when each worker last finished a job (the uptime bonus pays
only for work); names under the cluster's reserved prefix taken by others are renamed

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as b:
        b.add_column(sa.Column("last_job_at", sa.Double(), nullable=True))
    # A worker that took one of the cluster's own names before they were reserved
    # (api/workers.py RESERVED_NAME_PREFIX) would stop the dispatcher registering its worker.
    op.execute("UPDATE workers SET name = 'renamed-' || id "
               "WHERE kind <> 'cluster' AND lower(name) LIKE 'rayhorde-cluster/%'")


def downgrade() -> None:
    with op.batch_alter_table("workers") as b:
        b.drop_column("last_job_at")
