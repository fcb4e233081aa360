"""queue entries marked while their generation is claimed, and the claim and sort indexes
made partial over unclaimed entries (a claim no longer steps over the jobs in flight)

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UNCLAIMED = sa.text("NOT claimed")


def upgrade() -> None:
    with op.batch_alter_table("queue_entries") as b:
        b.add_column(sa.Column("claimed", sa.Boolean(), nullable=False,
                               server_default=sa.false()))
    op.execute("UPDATE queue_entries SET claimed = true WHERE generation_id IN "
               "(SELECT id FROM generations WHERE state = 'processing')")
    for name, columns in (("ix_queue_claim", ["model", "sort_key", "id"]),
                          ("ix_queue_sort", ["sort_key", "id"])):
        op.drop_index(name, table_name="queue_entries")
        op.create_index(name, "queue_entries", columns, postgresql_where=UNCLAIMED,
                        sqlite_where=UNCLAIMED)


def downgrade() -> None:
    for name, columns in (("ix_queue_claim", ["model", "sort_key", "id"]),
                          ("ix_queue_sort", ["sort_key", "id"])):
        op.drop_index(name, table_name="queue_entries")
        op.create_index(name, "queue_entries", columns)
    with op.batch_alter_table("queue_entries") as b:
        b.drop_column("claimed")
