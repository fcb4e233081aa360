"""graph workflows: a remix request's extra source images (stored keys and strengths)

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as b:
        b.add_column(sa.Column("extra_sources", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as b:
        b.drop_column("extra_sources")
