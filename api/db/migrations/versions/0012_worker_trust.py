"""worker trust: what each finished generation cost its requester; the untrusted owners whose workers faulted or dropped a generation or an alchemy form (it fails
only when several distinct ones did, and they never get it back), the cluster's own failures
counted apart, maintenance the horde imposes until a time, volunteer nodes' public keys, and
per-user counters in place of scans of the ledger and of every finished generation

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

USER_COUNTERS = (("kudos_accumulated", sa.Double()), ("kudos_gifted", sa.Double()),
                 ("kudos_received", sa.Double()), ("kudos_awarded", sa.Double()),
                 ("kudos_admin", sa.Double()), ("usage_requests", sa.BigInteger()),
                 ("usage_megapixelsteps", sa.Double()), ("usage_tokens", sa.BigInteger()))


def upgrade() -> None:
    with op.batch_alter_table("generations") as b:
        b.add_column(sa.Column("failures", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("faulted_owners", sa.String(200), nullable=False,
                               server_default=""))
        b.add_column(sa.Column("charged", sa.Double(), nullable=True))
    # What finished generations cost their requesters until now: their price, or nothing
    # when censored (the horde paid).
    op.execute("UPDATE generations SET charged = CASE WHEN censored THEN 0 ELSE kudos + tax END "
               "WHERE state = 'done'")
    with op.batch_alter_table("interrogation_forms") as b:
        b.add_column(sa.Column("failures", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("faulted_owners", sa.String(200), nullable=False,
                               server_default=""))
    with op.batch_alter_table("queue_entries") as b:
        b.add_column(sa.Column("excluded_owners", sa.String(200), nullable=False,
                               server_default=""))
    with op.batch_alter_table("workers") as b:
        b.add_column(sa.Column("maintenance_until", sa.Double(), nullable=True))
    with op.batch_alter_table("users") as b:
        b.add_column(sa.Column("node_public_key", sa.String(64), nullable=True))
        for name, type_ in USER_COUNTERS:
            b.add_column(sa.Column(name, type_, nullable=False, server_default="0"))
    # A unique index, not a constraint: SQLite would rebuild the table for a constraint.
    op.create_index("ix_users_node_public_key", "users", ["node_public_key"], unique=True)
    # The counters start from what the ledger and the finished generations say now.
    def ledger_sum(expr: str, where: str) -> str:
        return ("COALESCE((SELECT SUM(" + expr + ") FROM kudos_ledger k "
                "WHERE k.user_id = users.id AND " + where + "), 0)")

    def done(agg: str) -> str:
        return ("COALESCE((SELECT " + agg + " FROM generations g WHERE g.user_id = users.id "
                "AND g.state = 'done'), 0)")

    counters = {
        "kudos_accumulated": ledger_sum("amount", "kind = 'reward'"),
        "kudos_gifted": ledger_sum("-amount", "kind = 'transfer' AND amount < 0"),
        "kudos_received": ledger_sum("amount", "kind = 'transfer' AND amount > 0"),
        "kudos_awarded": ledger_sum("amount", "kind IN ('award', 'uptime')"),
        "kudos_admin": ledger_sum("amount", "kind = 'award'"),
        "usage_requests": done("COUNT(*)"),
        "usage_megapixelsteps": done("SUM(g.megapixelsteps)"),
        "usage_tokens": done("SUM(g.completion_tokens)"),
    }
    op.execute("UPDATE users SET " + ", ".join(f"{k} = {v}" for k, v in counters.items()))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35): a batch rebuild of `users` would fail on the foreign
    # keys that point at it.
    op.drop_index("ix_users_node_public_key", table_name="users")
    for name, _ in USER_COUNTERS:
        op.drop_column("users", name)
    op.drop_column("users", "node_public_key")
    op.drop_column("workers", "maintenance_until")
    op.drop_column("queue_entries", "excluded_owners")
    op.drop_column("generations", "faulted_owners")
    op.drop_column("generations", "charged")
    op.drop_column("interrogation_forms", "failures")
    op.drop_column("interrogation_forms", "faulted_owners")
    op.drop_column("generations", "failures")
