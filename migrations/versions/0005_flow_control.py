"""Flow control and live attempts: ordering_key, progress, async_action_processor

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

PAYLOAD = sa.Text().with_variant(JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
# The claim asks, for a keyed action, whether an earlier live action holds its key:
# one probe of this index. Key-less and finished rows are not in it.
LIVE_ORDERED = sa.text("ordering_key IS NOT NULL AND status IN ('pending', 'running')")
# At most one running action per key, whatever two claimers raced for (see queries.py).
RUNNING_ORDERED = sa.text("ordering_key IS NOT NULL AND status = 'running'")
# Rate limits count the attempts a processor started within the window.
STARTED = sa.text("started_at IS NOT NULL")
PAUSED = sa.text("paused_at IS NOT NULL")


def upgrade() -> None:
    op.add_column("async_action", sa.Column("ordering_key", sa.Text()))
    op.add_column("async_action", sa.Column("progress", PAYLOAD))
    op.create_index("async_action_ordering_idx", "async_action", ["ordering_key", "id"],
                    postgresql_where=LIVE_ORDERED, sqlite_where=LIVE_ORDERED)
    op.create_index("async_action_ordering_running_idx", "async_action", ["ordering_key"],
                    unique=True, postgresql_where=RUNNING_ORDERED,
                    sqlite_where=RUNNING_ORDERED)
    op.create_index("async_action_started_idx", "async_action", ["processor", "started_at"],
                    postgresql_where=STARTED, sqlite_where=STARTED)
    op.create_table(
        "async_action_processor",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("paused_at", TIMESTAMP),
        sa.Column("paused_by", sa.Text()),
    )
    # The claim reads the paused ones (the claim session allows no sequential scan).
    op.create_index("async_action_processor_paused_idx", "async_action_processor", ["name"],
                    postgresql_where=PAUSED, sqlite_where=PAUSED)


def downgrade() -> None:
    op.drop_table("async_action_processor")
    for index in ("async_action_started_idx", "async_action_ordering_running_idx",
                  "async_action_ordering_idx"):
        op.drop_index(index, "async_action")
    op.drop_column("async_action", "progress")
    op.drop_column("async_action", "ordering_key")
