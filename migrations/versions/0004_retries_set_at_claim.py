"""retries is NULL until a worker first claims the action; an index for the wake-up

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# A producer that never imported the processor cannot know its retry policy: the row
# says NULL ("the processor's"), and the worker that first claims it fills it in from
# the processor's effective settings there (decorator, then config file).


# The leader wakes listening workers when delayed actions become eligible; this index
# finds them by time alone (the claim index leads with priority).
PENDING = sa.text("status = 'pending'")


def _as_of_0003() -> sa.Table:
    """async_action as 0003 left it, for SQLite's table rebuild when there is no database
    to reflect it from (`db sql` prints the migrations offline)."""
    stamp = sa.DateTime(timezone=True)
    now = sa.text("(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')")
    table = sa.Table(
        "async_action", sa.MetaData(),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("processor", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False, server_default="pending"),
        sa.Column("data", sa.Text()),
        sa.Column("related_id", sa.Text()),
        sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("error", sa.Text()),
        sa.Column("errors", sa.Text()),
        sa.Column("result", sa.Text()),
        sa.Column("unique_key", sa.Text()),
        sa.Column("next_eligible_at", stamp, nullable=False, server_default=now),
        sa.Column("created_at", stamp, nullable=False, server_default=now),
        sa.Column("started_at", stamp),
        sa.Column("finished_at", stamp),
        sa.Column("claimed_by", sa.Text()),
        sa.Column("lease_expires_at", stamp),
        sa.CheckConstraint("status IN ('pending', 'running', 'completed', 'failed', "
                           "'canceled')", name="async_action_status_check"),
    )
    c = table.c
    sa.Index("async_action_claim_idx", c.priority, c.next_eligible_at, c.id,
             sqlite_where=PENDING)
    sa.Index("async_action_unique_key_idx", c.unique_key, unique=True,
             sqlite_where=sa.text("status IN ('pending', 'running') AND unique_key IS NOT NULL"))
    sa.Index("async_action_lease_idx", c.lease_expires_at,
             sqlite_where=sa.text("status = 'running'"))
    sa.Index("async_action_related_idx", c.related_id,
             sqlite_where=sa.text("related_id IS NOT NULL"))
    sa.Index("async_action_status_finished_idx", c.status, c.finished_at,
             sqlite_where=sa.text("finished_at IS NOT NULL"))
    return table


def _retries_nullable(nullable: bool) -> None:
    if op.get_context().dialect.name == "postgresql":
        op.alter_column("async_action", "retries", existing_type=sa.Integer(),
                        nullable=nullable)
        return
    # SQLite cannot alter a column: the table is rebuilt, reflected when online.
    copy_from = _as_of_0003() if op.get_context().as_sql else None
    with op.batch_alter_table("async_action", copy_from=copy_from) as batch:
        batch.alter_column("retries", existing_type=sa.Integer(), nullable=nullable)


def upgrade() -> None:
    _retries_nullable(True)
    op.create_index("async_action_eligible_idx", "async_action", ["next_eligible_at"],
                    postgresql_where=PENDING, sqlite_where=PENDING)


def downgrade() -> None:
    op.drop_index("async_action_eligible_idx", "async_action")
    op.execute("UPDATE async_action SET retries = 3 WHERE retries IS NULL")
    _retries_nullable(False)
