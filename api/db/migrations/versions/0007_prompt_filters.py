"""prompt filters: moderators' regexes over prompts, their version row, users' suspicion

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as b:
        b.add_column(sa.Column("suspicion", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "prompt_filters",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("regex", sa.String(1000), nullable=False),
        sa.Column("filter_type", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(1000), nullable=False, server_default=""),
        sa.Column("replacement", sa.String(200), nullable=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
    )
    version = op.create_table(
        "prompt_filter_version",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(version, [{"id": 1, "version": 0}])


def downgrade() -> None:
    op.drop_table("prompt_filter_version")
    op.drop_table("prompt_filters")
    with op.batch_alter_table("users") as b:
        b.drop_column("suspicion")
