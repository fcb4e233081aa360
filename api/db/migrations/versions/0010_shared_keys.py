"""shared keys (requests paid by another user, within limits) and the usage counters behind
the /stats endpoints

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shared_keys",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("kudos", sa.Double(), nullable=False),
        sa.Column("utilized", sa.Double(), nullable=False),
        sa.Column("expiry", sa.Double(), nullable=True),
        sa.Column("max_image_pixels", sa.Integer(), nullable=False),
        sa.Column("max_image_steps", sa.Integer(), nullable=False),
        sa.Column("max_text_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_shared_keys_user_id", "shared_keys", ["user_id"])
    op.create_table(
        "shared_key_requests",
        sa.Column("request_id", sa.String(36), primary_key=True),
        sa.Column("shared_key_id", sa.String(36), sa.ForeignKey("shared_keys.id"),
                  nullable=False),
        sa.Column("settled", sa.Double(), nullable=False),
    )
    op.create_index("ix_shared_key_requests_shared_key_id", "shared_key_requests",
                    ["shared_key_id"])
    op.create_table(
        "usage_buckets",
        sa.Column("kind", sa.String(8), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("hour", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("generations", sa.BigInteger(), nullable=False),
        sa.Column("megapixelsteps", sa.Double(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
    )
    watermark = op.create_table(
        "usage_watermark",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("folded_until", sa.Double(), nullable=False),
    )
    # Nothing folded yet: the first read of the stats folds all history once.
    op.bulk_insert(watermark, [{"id": 1, "folded_until": 0.0}])


def downgrade() -> None:
    op.drop_table("usage_watermark")
    op.drop_table("usage_buckets")
    op.drop_index("ix_shared_key_requests_shared_key_id", "shared_key_requests")
    op.drop_table("shared_key_requests")
    op.drop_index("ix_shared_keys_user_id", "shared_keys")
    op.drop_table("shared_keys")
