"""retention: the retention sweep's cursors over ended generations and alchemy forms (and an
index on the forms' finish time to read them by), and per-minute usage counters for the last
hour's totals once the generation rows are deleted

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_minutes",
        sa.Column("kind", sa.String(8), primary_key=True),
        sa.Column("minute", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("generations", sa.BigInteger(), nullable=False),
        sa.Column("megapixelsteps", sa.Double(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
    )
    cursor = op.create_table(
        "retention_cursor",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("finished_at", sa.Double(), nullable=False),
        sa.Column("row_id", sa.String(36), nullable=False),
    )
    # From the start of history: a deployment upgraded with old ended requests prunes them too.
    op.bulk_insert(cursor, [{"id": 1, "finished_at": 0.0, "row_id": ""},
                            {"id": 2, "finished_at": 0.0, "row_id": ""}])
    op.create_index("ix_forms_finished_at", "interrogation_forms", ["finished_at"])
    # The last hour's generations that are folded already (so before the minute counters
    # existed) are counted into them, so the hour's totals stay right across the upgrade.
    bind = op.get_bind()
    folded = bind.execute(sa.text("SELECT folded_until FROM usage_watermark WHERE id = 1")
                          ).scalar() or 0.0
    minute = ("CAST(FLOOR(g.finished_at / 60) AS BIGINT)" if bind.dialect.name == "postgresql"
              else "CAST(g.finished_at / 60 AS INTEGER)")
    tokens = ("COALESCE(g.completion_tokens, CAST(r.params ->> 'max_length' AS BIGINT), 0)"
              if bind.dialect.name == "postgresql"
              else "COALESCE(g.completion_tokens, json_extract(r.params, '$.max_length'), 0)")
    op.execute(sa.text(
        "INSERT INTO usage_minutes (kind, minute, generations, megapixelsteps, tokens) "
        f"SELECT r.kind, {minute}, COUNT(*), SUM(g.megapixelsteps), SUM({tokens}) "
        "FROM generations g JOIN requests r ON r.id = g.request_id "
        "WHERE g.state = 'done' AND g.model IS NOT NULL AND g.finished_at >= :since "
        f"AND g.finished_at < :folded GROUP BY r.kind, {minute}"
    ).bindparams(since=folded - 2 * 3600, folded=folded))


def downgrade() -> None:
    op.drop_index("ix_forms_finished_at", table_name="interrogation_forms")
    op.drop_table("retention_cursor")
    op.drop_table("usage_minutes")
