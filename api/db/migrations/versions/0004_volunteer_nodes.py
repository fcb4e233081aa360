"""volunteer nodes: the owner digest a Ray node carries, and node workers

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as b:
        b.add_column(sa.Column("node_key_digest", sa.String(48), nullable=True))
        b.create_unique_constraint("uq_users_node_key_digest", ["node_key_digest"])
    with op.batch_alter_table("workers") as b:
        b.add_column(sa.Column("node_id", sa.String(64), nullable=True))
        b.add_column(sa.Column("connected", sa.Boolean(), nullable=False, server_default=sa.false()))
        b.create_index("ix_workers_node_id", ["node_id"])


def downgrade() -> None:
    with op.batch_alter_table("workers") as b:
        b.drop_index("ix_workers_node_id")
        b.drop_column("connected")
        b.drop_column("node_id")
    with op.batch_alter_table("users") as b:
        b.drop_constraint("uq_users_node_key_digest", type_="unique")
        b.drop_column("node_key_digest")
