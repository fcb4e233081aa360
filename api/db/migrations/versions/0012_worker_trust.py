"""worker trust: the untrusted owners whose workers faulted or dropped a generation (it fails
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
    with op.batch_alter_table("queue_entries") as b:
        b.add_column(sa.Column("excluded_owners", sa.String(200), nullable=False,
                               server_default=""))
    with op.batch_alter_table("workers") as b:
        b.add_column(sa.Column("maintenance_until", sa.Double(), nullable=True))
    with op.batch_alter_table("users") as b:
        b.add_column(sa.Column("node_public_key", sa.String(64), nullable=True))
        for name, type_ in USER_COUNTERS:
            b.add_column(sa.Column(name, type_, nullable=False, server_default="0"))
        b.create_unique_constraint("uq_users_node_public_key", ["node_public_key"])
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
    with op.batch_alter_table("users") as b:
        b.drop_constraint("uq_users_node_public_key", type_="unique")
        for name, _ in USER_COUNTERS:
            b.drop_column(name)
        b.drop_column("node_public_key")
    with op.batch_alter_table("workers") as b:
        b.drop_column("maintenance_until")
    with op.batch_alter_table("queue_entries") as b:
        b.drop_column("excluded_owners")
    with op.batch_alter_table("generations") as b:
        b.drop_column("faulted_owners")
        b.drop_column("failures")
