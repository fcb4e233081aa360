"""image workflows: a request's source processing and the stored source image and mask

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as b:
        b.add_column(sa.Column("source_processing", sa.String(16), nullable=True))
        b.add_column(sa.Column("source_image_key", sa.String(300), nullable=True))
        b.add_column(sa.Column("source_mask_key", sa.String(300), nullable=True))
        b.create_index("ix_requests_source_image_key", ["source_image_key"])


def downgrade() -> None:
    with op.batch_alter_table("requests") as b:
        b.drop_index("ix_requests_source_image_key")
        b.drop_column("source_mask_key")
        b.drop_column("source_image_key")
        b.drop_column("source_processing")
