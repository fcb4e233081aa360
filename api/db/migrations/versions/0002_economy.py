"""economy and workers: roles, kudos ledger, idempotency keys, worker details, queue filters

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_false = sa.false()
_true = sa.true()


def upgrade() -> None:
    with op.batch_alter_table("users") as b:
        for role in ("trusted", "moderator", "flagged", "education", "customizer", "service"):
            b.add_column(sa.Column(role, sa.Boolean(), nullable=False, server_default=_false))
        b.add_column(sa.Column("contact", sa.String(500), nullable=True))
    # The horde's own account: it owns the cluster's workers, collects the request tax and
    # mints awards and uptime bonuses. Its hash column holds a marker no SHA-256 hex digest
    # can equal, so no API key opens it.
    users = sa.table("users", sa.column("username", sa.String), sa.column("api_key_hash", sa.String),
                     sa.column("kudos", sa.Double), sa.column("created_at", sa.Double),
                     sa.column("service", sa.Boolean))
    op.bulk_insert(users, [{"username": "rayhorde", "api_key_hash": "horde", "kudos": 0.0,
                            "created_at": 0.0, "service": True}])

    op.create_table(
        "kudos_ledger",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("txn_id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("amount", sa.Double(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ref", sa.String(100), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_kudos_ledger_txn_id", "kudos_ledger", ["txn_id"])
    op.create_index("ix_kudos_ledger_user_id", "kudos_ledger", ["user_id"])
    op.create_table(
        "idempotency_keys",
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), primary_key=True),
        sa.Column("key", sa.String(100), primary_key=True),
        sa.Column("response", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
    )

    with op.batch_alter_table("workers") as b:
        b.add_column(sa.Column("type", sa.String(8), nullable=False, server_default="image"))
        b.add_column(sa.Column("max_pixels", sa.BigInteger(), nullable=False,
                               server_default=str(512 * 512)))
        b.add_column(sa.Column("nsfw", sa.Boolean(), nullable=False, server_default=_false))
        b.add_column(sa.Column("threads", sa.Integer(), nullable=False, server_default="1"))
        b.add_column(sa.Column("bridge_agent", sa.String(200), nullable=False, server_default=""))
        b.add_column(sa.Column("capabilities", sa.JSON(), nullable=False, server_default="{}"))
        b.add_column(sa.Column("info", sa.String(1000), nullable=True))
        b.add_column(sa.Column("maintenance", sa.Boolean(), nullable=False, server_default=_false))
        b.add_column(sa.Column("maintenance_msg", sa.String(500), nullable=True))
        for name in ("jobs_done", "dropped_jobs"):
            b.add_column(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
        for name in ("megapixelsteps_done", "kudos_earned", "seconds_working", "uptime_seconds",
                     "last_bonus_at"):
            b.add_column(sa.Column(name, sa.Double(), nullable=False, server_default="0"))
        b.add_column(sa.Column("consecutive_drops", sa.Integer(), nullable=False,
                               server_default="0"))
        b.create_index("ix_workers_owner_id", ["owner_id"])

    with op.batch_alter_table("requests") as b:
        b.add_column(sa.Column("requester", sa.String(64), nullable=False, server_default=""))
        b.add_column(sa.Column("workers", sa.JSON(), nullable=False, server_default="[]"))
        b.add_column(sa.Column("worker_blacklist", sa.Boolean(), nullable=False,
                               server_default=_false))
        b.add_column(sa.Column("trusted_workers", sa.Boolean(), nullable=False,
                               server_default=_false))
        b.add_column(sa.Column("slow_workers", sa.Boolean(), nullable=False, server_default=_true))
        b.add_column(sa.Column("extra_slow_workers", sa.Boolean(), nullable=False,
                               server_default=_false))

    with op.batch_alter_table("generations") as b:
        b.add_column(sa.Column("requester", sa.String(64), nullable=False, server_default=""))
        b.add_column(sa.Column("user_id", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("kudos", sa.Double(), nullable=False, server_default="0"))
        b.add_column(sa.Column("tax", sa.Double(), nullable=False, server_default="0"))
        b.add_column(sa.Column("megapixelsteps", sa.Double(), nullable=False, server_default="0"))
        b.create_index("ix_generations_requester_state", ["requester", "state"])
        b.create_index("ix_generations_finished_at", ["finished_at"])

    with op.batch_alter_table("queue_entries") as b:
        for name in ("steps", "user_id", "features", "target_mode"):
            b.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
        for name, default in (("nsfw", _false), ("trusted_only", _false), ("slow_ok", _true),
                              ("extra_slow_ok", _false), ("upfront", _false)):
            b.add_column(sa.Column(name, sa.Boolean(), nullable=False, server_default=default))
        b.add_column(sa.Column("target_workers", sa.String(200), nullable=False,
                               server_default=""))
        b.create_index("ix_queue_user", ["user_id", "sort_key"])


def downgrade() -> None:
    with op.batch_alter_table("queue_entries") as b:
        b.drop_index("ix_queue_user")
        for name in ("steps", "user_id", "features", "nsfw", "trusted_only", "slow_ok",
                     "extra_slow_ok", "upfront", "target_mode", "target_workers"):
            b.drop_column(name)
    with op.batch_alter_table("generations") as b:
        b.drop_index("ix_generations_requester_state")
        b.drop_index("ix_generations_finished_at")
        for name in ("requester", "user_id", "kudos", "tax", "megapixelsteps"):
            b.drop_column(name)
    with op.batch_alter_table("requests") as b:
        for name in ("requester", "workers", "worker_blacklist", "trusted_workers",
                     "slow_workers", "extra_slow_workers"):
            b.drop_column(name)
    with op.batch_alter_table("workers") as b:
        b.drop_index("ix_workers_owner_id")
        for name in ("type", "max_pixels", "nsfw", "threads", "bridge_agent", "capabilities",
                     "info", "maintenance", "maintenance_msg", "jobs_done", "dropped_jobs",
                     "megapixelsteps_done", "kudos_earned", "seconds_working", "uptime_seconds",
                     "last_bonus_at", "consecutive_drops"):
            b.drop_column(name)
    op.drop_table("idempotency_keys")
    op.drop_index("ix_kudos_ledger_user_id", "kudos_ledger")
    op.drop_index("ix_kudos_ledger_txn_id", "kudos_ledger")
    op.drop_table("kudos_ledger")
    op.execute("DELETE FROM users WHERE api_key_hash = 'horde'")
    with op.batch_alter_table("users") as b:
        for role in ("trusted", "moderator", "flagged", "education", "customizer", "service",
                     "contact"):
            b.drop_column(role)
