"""text generation: results and token counts on generations, text sizes on queue entries and
text workers' limits

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations") as b:
        b.add_column(sa.Column("text", sa.Text(), nullable=True))
        b.add_column(sa.Column("prompt_tokens", sa.Integer(), nullable=True))
        b.add_column(sa.Column("completion_tokens", sa.Integer(), nullable=True))
        b.add_column(sa.Column("finish_reason", sa.String(16), nullable=True))
    with op.batch_alter_table("queue_entries") as b:
        b.add_column(sa.Column("kind", sa.String(8), nullable=False, server_default="image"))
        b.add_column(sa.Column("max_length", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("max_context_length", sa.Integer(), nullable=False,
                               server_default="0"))
    with op.batch_alter_table("workers") as b:
        b.add_column(sa.Column("max_length", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("max_context_length", sa.Integer(), nullable=False,
                               server_default="0"))
        b.add_column(sa.Column("tokens_generated", sa.BigInteger(), nullable=False,
                               server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("workers") as b:
        for name in ("max_length", "max_context_length", "tokens_generated"):
            b.drop_column(name)
    with op.batch_alter_table("queue_entries") as b:
        for name in ("kind", "max_length", "max_context_length"):
            b.drop_column(name)
    with op.batch_alter_table("generations") as b:
        for name in ("text", "prompt_tokens", "completion_tokens", "finish_reason"):
            b.drop_column(name)
