"""Lean indexes: the dashboard's and rate limits' indexes off the hot path

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

Every claim and every outcome write is an update that cannot be HOT (the status is in
index predicates), so it adds an entry to every index whose predicate the new row meets,
whether or not the index's own columns changed. 0007's `(processor, id)` and
`created_at` indexes took 5 of the 15 entries an action cost (enqueue, claim, outcome)
and 0005's `(processor, started_at)` 2 more: they made the drain's statements about
1.4x slower on the server.

- `created_at` windows (stats, bulk confirmation) read recent rows, which sit at the
  end of the table: a BRIN index answers them and costs an update almost nothing.
  (SQLite has no BRIN: a plain index there.)
- Lists by processor read running rows apart (few; the lease index has them), so the
  `(processor, id)` index leaves running rows out: no entry at the claim.
- Rate limits count starts in their window from a table of their own, written by the
  claims of rate-limited processors only.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

NOT_RUNNING = sa.text("status <> 'running'")


def upgrade() -> None:
    op.create_table(
        "async_action_start",
        sa.Column("processor", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("async_action_start_idx", "async_action_start",
                    ["processor", "started_at"])
    op.drop_index("async_action_started_idx", "async_action")
    op.drop_index("async_action_created_idx", "async_action")
    op.drop_index("async_action_processor_id_idx", "async_action")
    op.create_index("async_action_created_idx", "async_action", ["created_at"],
                    postgresql_using="brin")
    op.create_index("async_action_processor_id_idx", "async_action", ["processor", "id"],
                    postgresql_where=NOT_RUNNING, sqlite_where=NOT_RUNNING)


def downgrade() -> None:
    op.create_index("async_action_started_idx", "async_action", ["processor", "started_at"],
                    postgresql_where=sa.text("started_at IS NOT NULL"),
                    sqlite_where=sa.text("started_at IS NOT NULL"))
    op.drop_table("async_action_start")
    op.drop_index("async_action_processor_id_idx", "async_action")
    op.drop_index("async_action_created_idx", "async_action")
    op.create_index("async_action_processor_id_idx", "async_action", ["processor", "id"])
    op.create_index("async_action_created_idx", "async_action", ["created_at"])
