"""alchemy: interrogations and their forms; worker types long enough for "interrogation"

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "interrogations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("requester", sa.String(64), nullable=False),
        sa.Column("source_image_key", sa.String(300), nullable=True),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("kudos", sa.Double(), nullable=False),
        sa.Column("cancelled", sa.Boolean(), nullable=False),
        sa.Column("client_agent", sa.String(200), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_interrogations_user_id", "interrogations", ["user_id"])
    op.create_index("ix_interrogations_source_image_key", "interrogations", ["source_image_key"])
    op.create_table(
        "interrogation_forms",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("interrogation_id", sa.String(36), sa.ForeignKey("interrogations.id"),
                  nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("sort_key", sa.Double(), nullable=False),
        sa.Column("tiles", sa.Integer(), nullable=False),
        sa.Column("trusted_only", sa.Boolean(), nullable=False),
        sa.Column("slow_ok", sa.Boolean(), nullable=False),
        sa.Column("requester", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("kudos", sa.Double(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claim_id", sa.String(36), nullable=True),
        sa.Column("claimed_by", sa.String(36), nullable=True),
        sa.Column("deadline", sa.Double(), nullable=True),
        sa.Column("started_at", sa.Double(), nullable=True),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.Column("worker_id", sa.String(36), nullable=True),
        sa.Column("worker_name", sa.String(100), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("result_key", sa.String(300), nullable=True),
        sa.Column("fault_reason", sa.Text(), nullable=True),
    )
    op.create_index("ix_interrogation_forms_interrogation_id", "interrogation_forms",
                    ["interrogation_id"])
    op.create_index("ix_forms_claim", "interrogation_forms", ["state", "name", "sort_key"])
    op.create_index("ix_forms_state_deadline", "interrogation_forms", ["state", "deadline"])
    op.create_index("ix_forms_requester_state", "interrogation_forms", ["requester", "state"])
    with op.batch_alter_table("workers") as b:
        b.alter_column("type", existing_type=sa.String(8), type_=sa.String(16))


def downgrade() -> None:
    with op.batch_alter_table("workers") as b:
        b.alter_column("type", existing_type=sa.String(16), type_=sa.String(8))
    op.drop_table("interrogation_forms")
    op.drop_table("interrogations")
