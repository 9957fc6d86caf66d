"""async_action and async_action_worker

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = "('pending', 'running', 'completed', 'failed', 'canceled')"
# JSONB on PostgreSQL; TEXT on SQLite (a column declared JSON would get NUMERIC affinity).
PAYLOAD = sa.Text().with_variant(JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    # The database's clock, in the layout each dialect's timestamps are kept in.
    if op.get_context().dialect.name == "sqlite":
        now = sa.text("(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')")
    else:
        now = sa.text("now()")
    op.create_table(
        "async_action",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), sa.Identity(),
                  primary_key=True),
        sa.Column("processor", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False, server_default="pending"),
        sa.Column("data", PAYLOAD),
        sa.Column("related_id", sa.Text()),
        sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("error", sa.Text()),
        sa.Column("errors", PAYLOAD),
        sa.Column("result", PAYLOAD),
        sa.Column("unique_key", sa.Text()),
        sa.Column("next_eligible_at", TIMESTAMP, nullable=False, server_default=now),
        sa.Column("created_at", TIMESTAMP, nullable=False, server_default=now),
        sa.Column("started_at", TIMESTAMP),
        sa.Column("finished_at", TIMESTAMP),
        sa.Column("claimed_by", sa.Text()),
        sa.Column("lease_expires_at", TIMESTAMP),
        sa.CheckConstraint(f"status IN {STATUSES}", name="async_action_status_check"),
    )
    pending = sa.text("status = 'pending'")
    live_key = sa.text("status IN ('pending', 'running') AND unique_key IS NOT NULL")
    running = sa.text("status = 'running'")
    # The claim reads only runnable rows in its own sort order.
    op.create_index("async_action_claim_idx", "async_action",
                    ["priority", "next_eligible_at", "id"],
                    postgresql_where=pending, sqlite_where=pending)
    op.create_index("async_action_unique_key_idx", "async_action", ["unique_key"], unique=True,
                    postgresql_where=live_key, sqlite_where=live_key)
    op.create_index("async_action_lease_idx", "async_action", ["lease_expires_at"],
                    postgresql_where=running, sqlite_where=running)
    op.create_index("async_action_related_idx", "async_action", ["related_id"])
    op.create_index("async_action_status_finished_idx", "async_action",
                    ["status", "finished_at"])
    if op.get_context().dialect.name == "postgresql":
        # Every action is updated at least twice: leave room on each page for the new
        # row versions, and vacuum this hot table far more eagerly than the default.
        op.execute("ALTER TABLE async_action SET (fillfactor = 70, "
                   "autovacuum_vacuum_scale_factor = 0.02, "
                   "autovacuum_analyze_scale_factor = 0.02, "
                   "autovacuum_vacuum_cost_delay = 1)")

    op.create_table(
        "async_action_worker",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("processors", sa.Text(), nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("heartbeat_at", TIMESTAMP, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("async_action_worker")
    op.drop_table("async_action")
